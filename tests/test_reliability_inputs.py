"""Inputs that used to be silently wrong or end in a traceback: each class is refused in one line or handled right.

Images of every PIL mode (the RGB a viewer shows, or refused), decompression bombs and extreme aspect ratios,
lone-surrogate prompts, deeply nested JSON (manifest and schedule), truncated safetensors, the toy generator's
arguments, gsearch's --tolerance and --trials, --timeout <= 0 and a study left empty by a failed start.
Real files and real ``python -m ...`` processes; no model is loaded except where the fault lives in loading.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schedsearch.calibration import load_manifest
from schedsearch.errors import CalibrationError, ImageError, ModelLoadError, ScheduleError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=300, check=False)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def _manifest(folder: Path, records: list[dict | str]) -> Path:
    p = folder / "manifest.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return p


def _load_one(folder: Path, image: Image.Image, name: str = "x.png") -> np.ndarray:
    image.save(folder / name)
    (sample,) = load_manifest(_manifest(folder, [{"image": name, "prompt": "what?"}]))
    (rgb,) = sample.images
    assert rgb.mode == "RGB"
    return np.asarray(rgb).astype(int)


# ---------------------------------------------------------------------------------------------- images
def test_16_bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    ramp[0, 0], ramp[0, 1], ramp[0, 2] = 0, 32768, 65535
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # PIL opens it as 16-bit
    a = _load_one(tmp_path, Image.open(tmp_path / "g16.png"), "g16b.png")
    assert a[0, 0].tolist() == [0, 0, 0] and a[0, 1].tolist() == [128, 128, 128] and a[0, 2].tolist() == [255] * 3
    assert abs(a.mean() - 127.5) < 1.0  # before: 254.5 (every value above 255 clipped to white)
    want = np.rint(ramp.astype(float) * 255 / 65535)
    assert np.abs(a[..., 0] - want).max() <= 1


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "I", "I;16",
                                  "I;16B", "F", "RGBA", "LA", "PA", "La", "RGBa"])
def test_every_pil_mode_becomes_rgb(tmp_path, mode):
    from schedsearch.images import to_rgb

    base = Image.radial_gradient("L").resize((32, 32))
    im = base.convert(mode) if mode not in ("I;16", "I;16B", "F", "La", "RGBa", "PA") else None
    if mode in ("I;16", "I;16B"):  # (PIL's own I;16 -> I;16B conversion clips at 255, so build it from bytes)
        sixteen = np.asarray(base).astype(np.uint16) * 257
        im = Image.frombytes(mode, base.size, sixteen.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    elif mode == "F":
        im = Image.fromarray(np.asarray(base).astype(np.float32) / 255.0)
    elif mode in ("La", "RGBa", "PA"):
        im = base.convert("RGBA" if mode != "La" else "LA").convert(mode) if mode != "PA" else \
            base.convert("P").convert("PA")
    assert im.mode == mode
    rgb = to_rgb(im)
    assert rgb.mode == "RGB" and rgb.size == (32, 32)
    if mode in ("L", "I", "I;16", "I;16B", "F", "RGB", "RGBX", "RGBA", "LA", "La", "RGBa"):
        # grey data keeps its grey levels (alpha is opaque here), whatever the storage mode
        got = np.asarray(rgb).astype(int)
        assert np.abs(got - np.asarray(base.convert("RGB")).astype(int)).max() <= 1, mode


def test_transparency_is_composited_over_white(tmp_path):
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    half = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    assert _load_one(tmp_path, clear, "c.png")[0, 0].tolist() == [255, 255, 255]  # before: red
    assert _load_one(tmp_path, half, "h.png")[0, 0].tolist() == [255, 127, 127]
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1  # palette index 1 (green) is transparent
    assert _load_one(tmp_path, pal, "p.png")[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "o.jpg", exif=exif)
    (sample,) = load_manifest(_manifest(tmp_path, [{"image": "o.jpg", "prompt": "q"}]))
    assert sample.images[0].size == (20, 40)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (no pixel data needed: the size check reads only the header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"")
    data += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    path.write_bytes(data + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


@pytest.mark.parametrize("size,expect", [((30000, 30000), "downscale it"), ((100000, 100000), "downscale it"),
                                         ((1000, 3), "aspect ratio of 1:333"), ((2, 600), "aspect ratio of 1:300")])
def test_bombs_and_extreme_aspect_ratios_are_refused_in_one_line(tmp_path, size, expect):
    if size[0] * size[1] < 10_000_000:
        Image.new("L", size).save(tmp_path / "x.png")
    else:
        _png_header_only(tmp_path / "x.png", *size)
    with pytest.raises(ImageError) as ei:
        load_manifest(_manifest(tmp_path, [{"image": "x.png", "prompt": "q"}]))
    assert expect in str(ei.value) and "x.png" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("values,expect", [([-1.0, 5.0], "float image with values in [-1, 5]"),
                                           ([0.0, float("nan")], "NaN")])
def test_float_images_without_a_display_range_are_refused(values, expect):
    from schedsearch.images import to_rgb

    im = Image.fromarray(np.array([values], dtype=np.float32))
    with pytest.raises(ImageError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        to_rgb(im)


# ---------------------------------------------------------------------------------------------- text / JSON
def test_lone_surrogate_prompt_is_one_line_and_pairs_are_fine(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    ok = load_manifest(_manifest(tmp_path, ['{"image": "i.png", "prompt": "smile \\ud83d\\ude00?"}']))
    assert ok[0].prompt == "smile \U0001F600?"
    for line in ('{"image": "i.png", "prompt": "bad \\ud800 prompt"}', '{"image": "i.png", "prompt": "q", '
                 '"answer": "\\udfff"}', '{"image": "i\\ud800.png", "prompt": "q"}'):
        with pytest.raises(CalibrationError) as ei:
            load_manifest(_manifest(tmp_path, [line]))
        assert "lone surrogate" in str(ei.value) and ":1:" in str(ei.value)


def test_deeply_nested_json_is_one_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    deep = '{"image": "i.png", "prompt": "q", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(CalibrationError, match="nested too deeply"):
        load_manifest(_manifest(tmp_path, [deep]))
    huge_int = '{"image": "i.png", "prompt": "q", "x": 1' + "0" * 5000 + "}"
    with pytest.raises(CalibrationError, match="not usable JSON"):
        load_manifest(_manifest(tmp_path, [huge_int]))
    # a schedule: too deep for the parser, and deep enough to overflow the validator (both one line)
    from schedsearch.schedule import load_schedule

    for depth in (100_000, 500):
        (tmp_path / "s.json").write_text('{"schema_version": "1.0", "x": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(ScheduleError) as ei:
            load_schedule(tmp_path / "s.json")
        assert "nested" in str(ei.value) and "\n" not in str(ei.value)
    proc = _run("-m", "schedsearch", "validate", str(tmp_path / "s.json"), cwd=tmp_path)
    assert "nested" in _one_line(proc)


def test_u2028_inside_a_json_string_does_not_split_the_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    line = json.dumps({"image": "i.png", "prompt": "a\u2028b\x85c"}, ensure_ascii=False)
    (tmp_path / "manifest.jsonl").write_text(line + "\n", encoding="utf-8")
    assert load_manifest(tmp_path)[0].prompt == "a\u2028b\x85c"


# ---------------------------------------------------------------------------------------------- weights
def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, tiny_dir):
    from schedsearch.models import load_model

    for cut in ("half", "header"):
        d = tmp_path / cut
        shutil.copytree(tiny_dir("qwen2_5_vl"), d)
        f = d / "model.safetensors"
        os.truncate(f, f.stat().st_size // 2 if cut == "half" else 5)
        with pytest.raises(ModelLoadError) as ei:
            load_model(str(d))
        msg = str(ei.value)
        assert str(f) in msg and "truncated or corrupt" in msg and "re-download" in msg, msg
    calib = tmp_path / "calib"
    calib.mkdir()
    Image.new("RGB", (16, 16)).save(calib / "i.png")
    _manifest(calib, [{"image": "i.png", "prompt": "q"}])
    proc = _run("-m", "schedsearch", "optimize", "--model", str(tmp_path / "half"), "--calibration", str(calib),
                "--budget", "0.5", cwd=tmp_path)
    err = _one_line(proc)  # the single stderr line: no "Loading weights" progress bar before it
    assert "model.safetensors" in err and "truncated" in err


# ---------------------------------------------------------------------------------------------- toy generator
@pytest.mark.parametrize("args,expect", [
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--max-objects", "0"], "--max-objects must be between 1 and 16"),
    (["--max-objects", "17"], "--max-objects must be between 1 and 16"),
    (["--out", "FILE/sub"], "is a file, not a folder"),
    (["--out", "FILE"], "is a file, not a folder"),
    (["--n", "0"], "--n must be positive"),
])
def test_toy_generator_arguments(tmp_path, args, expect):
    (tmp_path / "FILE").write_text("x")
    full = {"--n": "2", "--seed": "1", "--out": "out"}
    for k, v in zip(args[::2], args[1::2], strict=True):
        full[k] = v
    argv = [x for kv in full.items() for x in kv]
    proc = _run("-m", "schedsearch.toy", "generate", *argv, cwd=tmp_path)
    assert expect in _one_line(proc)
    assert not (tmp_path / "out").exists()


def test_toy_generator_extremes_that_are_valid(tmp_path):
    from schedsearch.toy import write_dataset

    for k in (1, 16):
        path = write_dataset(tmp_path / f"k{k}", 3, 5, max_objects=k)
        assert len(load_manifest(path)) == 3


# ---------------------------------------------------------------------------------------------- search settings
def _calibration(tmp_path: Path) -> Path:
    c = tmp_path / "calib"
    c.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16)).save(c / "i.png")
    return _manifest(c, [{"image": "i.png", "prompt": "q"}])


@pytest.mark.parametrize("args,expect", [
    (["--method", "gsearch", "--tolerance", "-1"], "--tolerance -1.0 is out of range: it must be x>=0"),
    (["--method", "gsearch", "--tolerance", "nan"], "--tolerance nan is out of range: it must be x>=0"),
    (["--timeout", "-5"], "--timeout -5.0 is out of range: it must be x>0"),
    (["--timeout", "0"], "--timeout 0.0 is out of range: it must be x>0"),
])
def test_bad_search_numbers_are_refused_before_a_study_exists(tmp_path, args, expect):
    proc = _run("-m", "schedsearch", "optimize", "--model", str(tmp_path / "no-model"), "--calibration",
                str(_calibration(tmp_path)), "--budget", "0.5", *args, cwd=tmp_path)
    assert expect in _one_line(proc)
    assert not (tmp_path / ".schedsearch").exists()  # no study storage, hence no study left behind


def test_study_left_empty_by_a_failed_start_does_not_block_the_rerun(tmp_path):
    import optuna

    from schedsearch.search.optimize import SearchError, StudySettings, check_study_name, open_study

    url = f"sqlite:///{tmp_path}/studies.db"
    optuna.create_study(study_name="s", storage=url)  # what a run that died before its first trial leaves
    s = StudySettings(storage=url, study_name="s", sampler="random")
    check_study_name(s)  # no "already exists: use --resume"
    study = open_study(s)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with pytest.raises(SearchError, match="already exists"):  # a study WITH trials still needs --resume
        check_study_name(StudySettings(storage=url, study_name="s"))


def _fake_objective(num_layers: int = 4):
    """An objective whose discrepancy falls as more tokens are kept (for G-Search's control flow only)."""
    from types import SimpleNamespace

    class Obj:
        adapter = SimpleNamespace(num_layers=num_layers)
        batches = {"heldout": []}
        calls = 0

        def budget_fn(self, kind):
            return lambda ratios: sum(ratios) / len(ratios)

        def score(self, sched, split="search"):
            Obj.calls += 1
            return float(sum((1 - r) ** 2 * (i + 1) for i, r in enumerate(sched["keep_ratios"]))) / 40

    return Obj()


UNIFORM = {"name": "uniform", "params": {}}


def test_gsearch_trials_caps_evaluations_and_resume_continues(tmp_path, monkeypatch):
    import optuna

    from schedsearch.search import driver
    from schedsearch.search.gsearch import GSearchWarning
    from schedsearch.search.optimize import StudySettings, open_study

    monkeypatch.setattr(driver, "budget_dict", lambda obj, ratios, settings: dict(
        kind="flops", requested=settings.budget, achieved=sum(ratios) / len(ratios), flops_ratio=0.5,
        kv_ratio=0.5, token_ratio=0.5))
    url = f"sqlite:///{tmp_path}/s.db"

    def run(trials, resume):
        s = StudySettings(budget=0.5, storage=url, study_name="g", resume=resume, sampler="random", scorer=UNIFORM)
        study = open_study(s)
        return driver.run_gsearch(s, _fake_objective(), {"step": 0.1, "tolerance": None, "trials": trials}, [],
                                  study)

    full = driver.run_gsearch(StudySettings(budget=0.5, scorer=UNIFORM), _fake_objective(),
                              {"step": 0.1, "tolerance": None}, [], open_study(StudySettings(budget=0.5)))
    n_full = full.best.params["evaluations"]
    assert full.best.params["complete"] and n_full > 10
    with pytest.warns(GSearchWarning, match="stopped at --trials 5"):
        cut = run(5, False)
    st = optuna.load_study(study_name="g", storage=url)
    assert len(st.trials) == 5 and not cut.best.params["complete"]  # before: --trials ignored
    assert sum(cut.best.ratios) / 4 <= 0.5 + 1e-9  # the best evaluated schedule within the budget
    done = run(None, True)  # --resume without a cap: continues, reusing the 5 stored evaluations
    st = optuna.load_study(study_name="g", storage=url)
    assert len(st.trials) == n_full  # not 5 + n_full: nothing evaluated twice
    assert done.best.params["complete"] and done.best.ratios == full.best.ratios
