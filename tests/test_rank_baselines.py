"""The published default profiles of the issue-13 methods as budget-matched fixed baselines (search/fixed.py)."""

from __future__ import annotations

import pytest

from schedsearch.schedule import Scorer, kept_counts
from schedsearch.search.fixed import BASELINE_SCORERS, BASELINES, SPARSEVLM_STAGES, TRANSPRUNE_STAGES, staged_ratios

L, V, T = 32, 576, 40
NEW = sorted(BASELINE_SCORERS)


def token_budget(ratios):
    return sum(T + c for c in kept_counts(ratios, V)) / (len(ratios) * (T + V))


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("target", [0.5, 0.2, 0.1])
def test_profiles_meet_the_budget_and_name_a_valid_scorer(name, target):
    ratios, params = BASELINES[name](L, token_budget, target)
    assert all(a >= b for a, b in zip(ratios, ratios[1:], strict=False)) and all(0 <= r <= 1 for r in ratios)
    assert target - 0.01 <= token_budget(ratios) <= target + 1e-12
    sc = BASELINE_SCORERS[name]
    Scorer(name=sc["name"], params=sc["params"])  # a valid schedule scorer (the registry's name)


def test_profile_shapes_follow_the_references():
    # SparseVLM's 192-token profile: 300/200/110 of 576 after layers 2, 6, 15 (drops before 3, 7, 16)
    r = staged_ratios(32, SPARSEVLM_STAGES, 1.0)
    assert [kept_counts(r, 576)[i] for i in (2, 3, 7, 16, 31)] == [576, 300, 200, 110, 110]
    # TransPrune: 0.875 / 0.625 / 0.125 before layers 7, 9, 12
    r = staged_ratios(32, TRANSPRUNE_STAGES, 1.0)
    assert (r[6], r[7], r[9], r[12]) == (1.0, 0.875, 0.625, 0.125)
    # DART drops once before layer 2; the encoder-side methods from layer 0; ToDRE drops everything at half depth
    dart, _ = BASELINES["dart"](L, token_budget, 0.3)
    assert dart[:2] == [1.0, 1.0] and len(set(dart[2:])) == 1
    hiprune, _ = BASELINES["hiprune"](L, token_budget, 0.3)
    assert len(set(hiprune)) == 1
    todre, _ = BASELINES["todre"](L, token_budget, 0.3)
    assert todre[16:] == [0.0] * 16 and len(set(todre[:16])) == 1


def test_readme_quotes_the_peer_rankings_table():
    """The README's sentence on studies/peer_rankings.py quotes its results table, number for number."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    table = (root / "studies" / "results" / "peer_rankings.md").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    para = readme[readme.index("`studies/peer_rankings.py` compares them"):]
    para = para[: para.index("\n\n")]
    quoted = re.findall(r"\b\d\.\d{2,4}x?\b", para)
    assert len(quoted) >= 8
    cells = set(re.findall(r"\b\d\.\d{2,4}x?\b", table))
    assert set(quoted) <= cells, set(quoted) - cells
