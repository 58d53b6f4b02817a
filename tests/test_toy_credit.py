"""studies/toy_model/toy_credit.py: the question generators of its arms and a short run of every arm."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies" / "toy_model"))
toy_credit = pytest.importorskip("toy_credit")

from schedsearch.toy.scenes import COLOURS, SHAPES  # noqa: E402


def test_text_question_answer_depends_only_on_the_named_colour():
    seen = {}
    for i in range(200):
        q = toy_credit.text_question(None, np.random.default_rng(i))
        colour = q["prompt"].split()[3]
        assert colour in COLOURS
        seen.setdefault(colour, set()).add(q["answer"])
    assert all(len(a) == 1 for a in seen.values())  # one answer per word, whatever the scene
    assert {a for s in seen.values() for a in s} == {"yes", "no"}


def test_named_value_indexes_colours_then_shapes():
    assert toy_credit.named_value(f"is there a {list(COLOURS)[1]} shape ?") == 1
    assert toy_credit.named_value(f"is there a {SHAPES[0]} ?") == len(COLOURS)


def test_every_arm_trains_and_the_table_has_one_row_each():
    results = {arm: toy_credit.run_arm(arm, steps=2, batch=2, rope_theta=20.0, probe_layer=1, log=lambda s: None)
               for arm in toy_credit.ARMS}
    assert all(len(r["acc"]) == 2 for r in results.values())
    assert len(results["image-word-probe"]["probe"]) == 2 and not results["image-word"]["probe"]
    assert all(r["seconds"] > 0 for r in results.values())
    text = toy_credit.table(results, steps=2, window=1)
    assert text.count("\n") == 1 + len(toy_credit.ARMS)
    assert "(probe " in next(line for line in text.splitlines() if "image-word-probe" in line)


def test_unknown_arm_is_one_line_and_exit_2(capsys):
    assert toy_credit.main(["--arms", "nope", "--out", "unused.md"]) == 2
    assert "unknown arm" in capsys.readouterr().err
