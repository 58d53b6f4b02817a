"""Property test of the calibration manifest reader: whatever the file holds, the result is samples whose images
decode to RGB, or one CalibrationError line naming the manifest -- never another exception.

Generated manifests mix valid records, records with wrong types, odd paths (missing, a folder, NUL bytes,
absolute, very long), every image the folder holds (16-bit PNG, truncated PNG, 1:300 strip, RGBA), prompts
with markers and lone surrogates, deep nesting, huge integers, NaN, raw text and bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from schedsearch.calibration import load_manifest
from schedsearch.errors import CalibrationError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    Image.new("RGB", (16, 16), (10, 200, 30)).save(d / "ok.png")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(d / "g16.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(d / "rgba.png")
    Image.new("L", (300, 1)).save(d / "strip.png")
    (d / "bad.png").write_bytes((d / "ok.png").read_bytes()[:40])  # truncated
    (d / "adir").mkdir()
    return d


PATHS = st.sampled_from(["ok.png", "g16.png", "rgba.png", "strip.png", "bad.png", "adir", "missing.png", "",
                         "ok.png\x00", "../fuzz/ok.png", "/", "x" * 300 + ".png", "ok.png\ud800", "./ok.png"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                    PATHS)
JSON = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                    max_leaves=12)
PROMPTS = st.one_of(st.text(max_size=40), st.just("<image> and <image>?"), st.just("what \ud800?"),
                    st.just("   "), JSON)
RECORD = st.fixed_dictionaries(
    {},
    optional={"image": st.one_of(PATHS, JSON), "images": st.one_of(st.lists(PATHS, max_size=3), JSON),
              "prompt": PROMPTS, "answer": JSON, "qtype": JSON, "extra": JSON})


def _dump(obj, ascii_only: bool) -> str:
    return json.dumps(obj, ensure_ascii=ascii_only, allow_nan=True)


GOOD = st.fixed_dictionaries(  # a record the reader must accept (images it can show, a real prompt)
    {"image": st.sampled_from(["ok.png", "g16.png", "rgba.png", "./ok.png"]),
     "prompt": st.text(min_size=1, max_size=30).filter(lambda t: t.strip() and "<image>" not in t)},
    optional={"answer": JSON, "qtype": JSON})
ODD_PATH = st.fixed_dictionaries({"prompt": st.just("what is it?")},
                                 optional={"image": PATHS, "images": st.lists(PATHS, max_size=3)})
FAULT = st.one_of(
    st.builds(_dump, ODD_PATH, st.booleans()),
    st.builds(_dump, RECORD, st.booleans()),
    st.text(max_size=60),
    st.just('{"image": "ok.png", "prompt": "q", "x": ' + "[" * 5000 + "]" * 5000 + "}"),
    st.just('{"image": "ok.png", "prompt": "q"'),  # cut short
    st.just('{"image": "ok.png", "prompt": "q", "n": 1' + "0" * 5000 + "}"),  # beyond int() of 4300 digits
    st.just("# comment"),
)


def _assemble(good: list, fault: str | None, at: int) -> bytes:
    lines = [_dump(g, True) for g in good]
    if fault is not None:
        lines.insert(min(at, len(lines)), fault)
    return "\n".join(lines).encode("utf-8", "surrogatepass")  # lone surrogates written raw, as a broken file


CONTENT = st.one_of(
    st.builds(_assemble, st.lists(GOOD, max_size=4), st.one_of(st.none(), FAULT, FAULT, FAULT), st.integers(0, 4)),
    st.binary(max_size=80),
)


EXAMPLES = int(os.environ.get("SCHEDSEARCH_FUZZ_EXAMPLES", "300"))  # 5000 passed once in ~100 s


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=CONTENT, require_images=st.booleans())
def test_manifest_reader_yields_samples_or_one_calibration_error(folder, content, require_images):
    path = folder / "manifest.jsonl"
    path.write_bytes(content)
    try:
        samples = load_manifest(path, require_images=require_images)
    except CalibrationError as err:
        msg = str(err)
        assert msg and "\n" not in msg and str(path) in msg, msg
        event(f"refused: {msg[len(str(path)):].lstrip(':0123456789 ')[:28]}")
        return
    event("accepted")
    assert samples
    for s in samples:
        assert isinstance(s.prompt, str) and s.prompt.strip()
        s.prompt.encode("utf-8")  # valid text all the way to the tokenizer
        assert all(im.mode == "RGB" for im in s.images)
        if require_images:
            assert s.image_paths
