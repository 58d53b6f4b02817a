"""Toy testbed: deterministic generator, manifest-loader errors, and the shipped model's accuracy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from schedsearch.calibration import load_manifest
from schedsearch.errors import CalibrationError
from schedsearch.toy import CALIB_SEED, HELDOUT_SEED, MODEL_DIR, TRAIN_SEED, sample, write_dataset
from schedsearch.toy.__main__ import main as toy_main
from schedsearch.toy.questions import QTYPES
from schedsearch.toy.scenes import GRID

#: Issue 3 asks for >= 90 % exact match on held-out questions; the shipped model answers 0.903 of 1,000
#: (studies/toy_model/results/train_toy.heldout.md). The test checks that threshold on the first 200 held-out
#: questions, a fixed set answered deterministically: the shipped model gets 0.915 of them (183), a margin of 3
#: answers for numerical differences between machines, so a broken loading path, processor or a worse model fails.
SHIPPED_FLOOR = 0.90
#: every question type must stay far above its chance rate (uniform guess over the answers the template allows)
CHANCE = {"presence": 0.5, "counting": 1 / 7, "attribute": 1 / 3, "spatial": 0.40}


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_seeds_differ(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert toy_main(["generate", "--n", "12", "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b and len(a) == 13
    assert a["manifest.jsonl"] != c["manifest.jsonl"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) >= 10


def test_manifest_fields_and_loader(tmp_path):
    write_dataset(tmp_path, 40, seed=11)
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    for rec in lines:
        assert {"image", "prompt", "answer", "qtype"} <= set(rec) and rec["qtype"] in QTYPES
        assert ("region" in rec) == (rec["qtype"] == "spatial")
    samples = load_manifest(tmp_path)
    assert len(samples) == 40 and samples[0].images[0].size == (128, 128)
    assert samples[0].extra["qtype"] == lines[0]["qtype"]


def test_streams_are_disjoint_and_objects_cover_every_region():
    assert len({TRAIN_SEED, HELDOUT_SEED, CALIB_SEED}) == 3
    cal = [json.loads(x) for x in (Path(__file__).parents[1] / "calibration_data" / "toy"
                                   / "manifest.jsonl").read_text().splitlines()]
    assert len(cal) == 64 and {r["seed"] for r in cal} == {CALIB_SEED}
    cells, qtypes, regions = Counter(), Counter(), Counter()
    for i in range(400):
        _, q, scene = sample(HELDOUT_SEED, i)
        qtypes[q["qtype"]] += 1
        regions[q.get("region")] += 1
        for o in scene.objects:
            cells[(o.row, o.col)] += 1
        if q["prompt"] == "how many shapes are there ?":
            assert q["answer"] == str(len(scene.objects))
    assert len(cells) == GRID * GRID and min(cells.values()) > 40  # every cell of the image holds objects
    assert all(qtypes[t] > 60 for t in QTYPES)
    assert {"top left", "top right", "bottom left", "bottom right"} <= set(regions)


@pytest.fixture
def toy_set(tmp_path):
    write_dataset(tmp_path, 3, seed=4)
    return tmp_path


def _expect_one_line(path, expect, lineno=None):
    with pytest.raises(CalibrationError) as ei:
        load_manifest(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and expect in msg, msg
    if lineno is not None:
        assert f"{path}:{lineno}:" in msg, msg


def _rewrite(d, edit):
    m = d / "manifest.jsonl"
    lines = m.read_text().splitlines()
    edit(lines)
    m.write_text("\n".join(lines) + "\n")
    return m


def test_loader_missing_image(toy_set):
    (toy_set / "images" / "00001.png").unlink()
    _expect_one_line(toy_set / "manifest.jsonl", "does not exist", 2)


def test_loader_corrupt_png(toy_set):
    (toy_set / "images" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    _expect_one_line(toy_set / "manifest.jsonl", "cannot be decoded", 3)


def test_loader_empty_manifest(toy_set):
    (toy_set / "manifest.jsonl").write_text("\n# nothing here\n")
    _expect_one_line(toy_set / "manifest.jsonl", "no samples")


def test_loader_line_not_json(toy_set):
    m = _rewrite(toy_set, lambda ls: ls.insert(1, '{"image": "images/00000.png", "prompt": '))
    _expect_one_line(m, "not valid JSON", 2)


def test_loader_prompt_without_image(toy_set):
    m = _rewrite(toy_set, lambda ls: ls.append('{"prompt": "is there a red circle ?", "answer": "no"}'))
    _expect_one_line(m, "has no image", 4)


def test_loader_missing_manifest(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")


def test_shipped_model_accuracy_on_heldout(tmp_path):
    import torch

    from schedsearch.models import load_model
    from schedsearch.toy.eval import accuracy

    torch.manual_seed(0)
    adapter = load_model("toy")
    assert adapter.num_layers >= 8
    write_dataset(tmp_path, 200, seed=HELDOUT_SEED)
    samples = load_manifest(tmp_path)
    batch = adapter.prepare([list(samples[0].images)], [samples[0].prompt])
    assert int(adapter.visual_mask(batch["input_ids"]).sum()) >= 256
    rep = accuracy(adapter, samples, batch_size=50)
    assert (MODEL_DIR / "model.safetensors").is_file()
    assert rep["overall"] >= SHIPPED_FLOOR, {k: rep[k] for k in ("overall", "by_qtype")}
    for qtype, chance in CHANCE.items():
        assert rep["by_qtype"][qtype] >= chance + 0.12, (qtype, rep["by_qtype"])


def test_readme_embeds_the_reported_heldout_table():
    """README and studies/toy_model/train_toy.md show exactly the table `train_toy.py --report` wrote for the model."""
    root = Path(__file__).resolve().parents[1]
    table = (root / "studies" / "toy_model" / "results" / "train_toy.heldout.md").read_text(encoding="utf-8").strip()
    assert table.count("\n| ") >= 4
    for doc in ("README.md", "studies/toy_model/train_toy.md"):
        assert table in (root / doc).read_text(encoding="utf-8"), doc
