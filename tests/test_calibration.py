"""Manifest loader: good manifests parse; every bad input is one CalibrationError line naming file:line."""

from __future__ import annotations

import pytest
from PIL import Image

from schedsearch.calibration import calibration_hash, load_manifest
from schedsearch.errors import CalibrationError


def _write(tmp_path, lines, name="manifest.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture
def imgs(tmp_path):
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / f"i{i}.png")
    return tmp_path


def test_good_manifest(imgs):
    p = _write(imgs, ['{"images": ["i0.png", "i1.png"], "prompt": "which is red?", "answer": "right", "qtype": "x"}',
                      "", "# a comment", '{"image": "i2.png", "prompt": "colour?"}'])
    s = load_manifest(imgs)  # the folder works too
    assert [len(x.image_paths) for x in s] == [2, 1]
    assert s[0].answer == "right" and s[0].extra == {"qtype": "x"} and s[1].answer is None
    assert s[0].images[1].size == (16, 16)
    assert load_manifest(p)[1].prompt == "colour?"
    h = calibration_hash(s)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(imgs / "i2.png")
    assert calibration_hash(load_manifest(p)) != h  # image bytes are part of the hash


@pytest.mark.parametrize("lines,expect", [
    ([], "no samples"),
    (['{"image": "i0.png", "prompt": "a"}', "{not json"], ":2: not valid JSON"),
    (['["a"]'], ":1: each line must be a JSON object"),
    (['{"image": "missing.png", "prompt": "a"}'], ":1: image"),
    (['{"image": "bad.png", "prompt": "a"}'], "cannot be decoded"),
    (['{"prompt": "a"}'], ":1: the prompt has no image"),
    (['{"image": "i0.png"}'], ":1: missing or empty \"prompt\""),
    (['{"image": "i0.png", "prompt": "a <image> or <image> ?"}'], ":1: the prompt has 2 <image> marker(s) but 1"),
])
def test_bad_manifests(imgs, lines, expect):
    (imgs / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    p = _write(imgs, lines)
    with pytest.raises(CalibrationError) as ei:
        load_manifest(p)
    msg = str(ei.value)
    assert expect in msg and "\n" not in msg and str(p) in msg


def test_missing_manifest(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_manifest(tmp_path / "nope.jsonl")


def test_cli_manifest_error_is_one_line(imgs, tmp_path, tiny_dir):
    import subprocess
    import sys

    from schedsearch.models import load_model
    from schedsearch.testing.tiny import schedule_for

    d = tiny_dir("qwen2_5_vl")
    sched = tmp_path / "s.json"
    schedule_for(load_model(str(d)), [1.0] * 4).save(sched)
    p = _write(imgs, ['{"image": "i0.png", "prompt": "a"}', "{oops"])
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "evaluate", str(sched), "--model", str(d),
                           "--calibration", str(p)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and ":2: not valid JSON" in lines[0], lines


def test_public_api_is_lazy_and_complete():
    import subprocess
    import sys

    code = ("import sys, schedsearch; assert 'torch' not in sys.modules; "
            "assert set(schedsearch.__all__) >= {'Schedule','load_schedule','apply_schedule','load_model'}; "
            "from schedsearch import apply_schedule, load_schedule, load_model, Schedule; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "ok"
