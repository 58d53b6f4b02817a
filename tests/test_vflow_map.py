"""studies/vflow_map.py and studies/ranking_study.py: which visual tokens the rankings keep, and what it costs."""

import importlib.util
from pathlib import Path

import numpy as np

from schedsearch.toy.scenes import CELL, Obj, Scene

ROOT = Path(__file__).resolve().parents[1]


def _study(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_object_mask_marks_the_tokens_under_an_object():
    vm = _study("vflow_map")
    o = Obj(shape="square", colour="red", size="large", row=0, col=0, cx=CELL / 2, cy=CELL / 2)
    mask = vm.object_mask(Scene(objects=(o,), background=40, noise=0)).reshape(16, 16)
    assert mask[:2, :2].any() and not mask[8:, 8:].any()  # the top-left cell, nothing in the bottom-right
    assert 4 <= mask.sum() <= 16 and mask[:4, :4].sum() == mask.sum()  # a 22 px square: within 4 x 4 tokens of 8 px


def test_ratios_and_table_on_the_shipped_model():
    import torch

    from schedsearch.models import load_model

    vm = _study("vflow_map")
    torch.manual_seed(0)
    res = vm.ratios(load_model("toy"), 3, ts=(1.0, 2.0))
    assert set(res) == {1.0, 2.0, "received"}
    assert all(len(v) == 3 and all(np.isfinite(v)) and min(v) > 0 for v in res.values())
    assert res[1.0] != res[2.0]  # the threshold changes the map
    text = vm.table(res)
    assert text.count("\n") == 4 and "t = 2.0" in text and "attention received" in text


def test_ranking_study_rows_and_table():
    """studies/ranking_study.py: one row per (keep, ranking); the rankings differ; the table is relative to uniform."""
    import torch

    from schedsearch.models import load_model

    rs = _study("ranking_study")
    torch.manual_seed(0)
    rows = rs.run(load_model("toy"), 8, [0.22], batch=4)
    names = [r["ranking"] for r in rows]
    assert names[:3] == ["uniform", "random", "objects first (oracle)"] and len(rows) == 5 + len(rs.DIVERSE_SPATIAL)
    assert "diverse, spatial 0 (DivPrune)" in names
    values = [r["discrepancy"] for r in rows]
    assert all(0 < v < 2 for v in values) and len(set(values)) == len(rows)
    text = rs.table(rows)
    assert "| 0.22 | uniform |" in text and "1.00x" in text and text.count("\n") == len(rows) + 1


def test_readme_ranking_figures_come_from_the_study():
    import re

    table = (ROOT / "studies" / "results" / "ranking_study.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bullet = readme[readme.index("**Where the gain comes from: the scorer more than the profile.**"):]
    bullet = bullet[: bullet.index("\n* ")]
    quoted = re.findall(r"\b\d\.\d\dx\b", bullet)[:6]  # the ratios to uniform quoted from the study
    assert len(quoted) == 6 and all(f"| {q} |" in table for q in quoted), quoted
    assert "| 0.22 | uniform | 0.1163 |" in table and "0.1163" in bullet
    assert "| 0.22 | diverse, spatial 4 | 0.0409 |" in table and "0.0409" in bullet
