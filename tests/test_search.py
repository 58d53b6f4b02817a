"""Search building blocks: budget-matched families, G-Search, the objective's caches, a small study."""

from __future__ import annotations

import random

import pytest
import torch

from schedsearch.schedule import kept_counts
from schedsearch.search.budget import InfeasibleBudget, solve_increasing
from schedsearch.search.fixed import fastv, pdrop, uniform
from schedsearch.search.gsearch import GreedySearch
from schedsearch.search.psigmoid import pcosine, psigmoid

L, V, T = 12, 400, 30


def token_budget(ratios):
    """Fraction of token-layers kept (a FLOPs-like monotone proxy)."""
    return sum(T + c for c in kept_counts(ratios, V)) / (L * (T + V))


def _non_increasing(r):
    return all(a >= b for a, b in zip(r, r[1:], strict=False)) and all(0 <= x <= 1 for x in r)


@pytest.mark.parametrize("target", [0.5, 0.2, 0.1])
def test_families_meet_budget_exactly_from_below(target):
    rng = random.Random(0)
    cands = [fastv(L, token_budget, target), pdrop(L, token_budget, target), uniform(L, token_budget, target)]
    for _ in range(25):  # any sampled point is feasible: no wasted trial
        cands.append(psigmoid(L, token_budget, target, rng.uniform(2, 60), rng.uniform(0, 0.95)))
        cands.append(pcosine(L, token_budget, target, rng.uniform(0.05, 1), rng.uniform(0, 0.95)))
    one_token = 1 / (L * (T + V))
    for ratios, _params in cands:
        assert _non_increasing(ratios)
        b = token_budget(ratios)
        assert b <= target + 1e-12
        assert b >= target - L * one_token - 1e-9  # within one kept token per layer of the request


def test_solve_increasing_and_infeasible():
    assert solve_increasing(lambda x: x, 0.3, 0.0, 1.0) == pytest.approx(0.3, abs=1e-9)
    with pytest.raises(InfeasibleBudget):
        solve_increasing(lambda x: 0.5 + x, 0.3, 0.0, 1.0)


def test_gsearch_tolerance_and_budget():
    calls = []

    def damage(r):  # losing tokens early hurts more
        calls.append(tuple(r))
        return sum((1 - x) ** 2 * (L - i) for i, x in enumerate(r)) / L**2

    g = GreedySearch(L, damage, step=0.05)
    r = g.at_tolerance(0.05)
    assert _non_increasing(r) and damage(r) <= 0.05
    assert r[0] > r[-1]  # deeper layers keep fewer
    r2, tol = g.at_budget(token_budget, 0.3)
    assert token_budget(r2) <= 0.3 and _non_increasing(r2)
    assert len(g.memo) < len(calls)  # repeated schedules are answered from the memo


@pytest.fixture(scope="module")
def qwen_objective(tiny_dir, tmp_path_factory):
    from schedsearch.models import load_model
    from schedsearch.search.objective import Objective
    from schedsearch.testing.tiny import tiny_samples

    ad = load_model(str(tiny_dir("qwen2_5_vl")))
    samples = tiny_samples(tmp_path_factory.mktemp("calib"), 8, seed=11, prompt="where is object {i}?")
    cache = tmp_path_factory.mktemp("cache")
    obj = Objective(ad, samples, heldout_fraction=0.25, seed=0, batch_size=4, cache_dir=cache,
                    calibration_hash="test")
    return obj, ad, samples, cache


def test_objective_reference_cached_and_vision_precomputed(qwen_objective):
    from schedsearch.search.objective import Objective

    obj, ad, samples, cache = qwen_objective
    assert len(obj.samples["search"]) == 6 and len(obj.samples["heldout"]) == 2
    assert len(list(cache.glob("ref-*.pt"))) == 2
    # precomputed vision features give the same last-token states as raw pixels
    from schedsearch.evaluation import make_batches

    raw = make_batches(ad, obj.samples["search"], 4)
    want = torch.cat([ad.last_hidden_state(b) for b in raw])
    torch.testing.assert_close(obj.reference["search"], want, atol=1e-5, rtol=1e-5)
    assert all("pixel_values" not in b and "mm_encoder_outputs" in b for b in obj.batches["search"])
    # a second objective on the same set loads the reference from disk: no decoder forward for it
    calls = []
    h = ad.text_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        Objective(ad, samples, heldout_fraction=0.25, seed=0, batch_size=4, cache_dir=cache, calibration_hash="test")
    finally:
        h.remove()
    assert calls == []
    # the all-ones schedule has zero discrepancy; pruning has some
    n = ad.num_layers
    assert obj.score({"keep_ratios": [1.0] * n}) == pytest.approx(0.0, abs=1e-6)
    assert obj.score({"keep_ratios": [0.25] * n, "scorer": {"name": "uniform"}}) > 1e-4


def test_small_study_replays_winner(qwen_objective):
    optuna = pytest.importorskip("optuna")
    from schedsearch.search.optimize import StudySettings, run_study

    obj, ad, _, _ = qwen_objective
    settings = StudySettings(budget=0.5, method="psigmoid", sampler="random", trials=4, seed=1)
    res = run_study(settings, obj)
    done = [t for t in res.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    assert all(t.user_attrs["constraint"][0] <= 1e-12 for t in done)  # every trial feasible
    assert res.search_value == pytest.approx(res.study.best_value, abs=1e-6)  # replay == best trial
    assert res.budget["achieved"] <= 0.5
    assert set(res.baselines) >= {"fastv", "uniform"}
    assert res.heldout_value is not None


def test_bad_settings():
    from schedsearch.errors import SchedsearchError
    from schedsearch.search.optimize import StudySettings

    for kw in ({"budget": 0.0}, {"budget": 1.5}, {"method": "nope"}, {"sampler": "nope"}, {"kind": "x"},
               {"trials": 0}, {"timeout": -5}):
        with pytest.raises(SchedsearchError):
            StudySettings(**kw).validate()


def test_pareto_one_study_many_budgets(qwen_objective):
    pytest.importorskip("optuna")
    from schedsearch.search.optimize import StudySettings, run_pareto

    obj, *_ = qwen_objective
    res = run_pareto(StudySettings(method="psigmoid", sampler="random", trials=8, seed=0), obj, [0.6, 0.8])
    assert len(res.study.trials) == 8 and len(res.study.directions) == 2
    assert set(res.per_budget) <= {0.6, 0.8} and res.per_budget
    for b, r in res.per_budget.items():
        assert r["budget"]["achieved"] <= b + 1e-12
        assert r["search"] == pytest.approx(res.study.trials[r["trial"]].values[0], abs=1e-6)
    if {0.6, 0.8} <= set(res.per_budget):  # a looser budget never does worse on the search split
        assert res.per_budget[0.8]["search"] <= res.per_budget[0.6]["search"] + 1e-9
    achieved = [a for a, _ in res.front]
    assert achieved == sorted(achieved)


def test_infeasible_budget_names_the_range(qwen_objective):
    from schedsearch.search.optimize import SearchError, StudySettings, run_study

    obj, *_ = qwen_objective
    with pytest.raises(SearchError, match=r"infeasible.*from 0\.\d+ .* to 1\.0"):
        run_study(StudySettings(budget=0.05, sampler="random", trials=1), obj)


def test_grouped_budget_fn_equals_budget_report(qwen_objective):
    from schedsearch.flops import budget_report

    obj, *_ = qwen_objective
    rng = random.Random(3)
    for kind in ("flops", "kv", "tokens"):
        fn = obj.budget_fn(kind)
        for _ in range(5):
            r = sorted((rng.random() for _ in range(obj.adapter.num_layers)), reverse=True)
            want = budget_report(obj.shape, obj.counts["search"], r).value(kind)
            assert fn(r) == pytest.approx(want, rel=1e-12)
