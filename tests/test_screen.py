"""--scorer auto: every registered ranking screened once, trials choose among the best few and composites."""

from __future__ import annotations

import pytest

from schedsearch.scorer_specs import SCORERS
from schedsearch.search import screen as scr


@pytest.fixture(scope="module")
def objective(tiny_dir, tmp_path_factory):
    from schedsearch.models import load_model
    from schedsearch.search.objective import Objective
    from schedsearch.testing.tiny import tiny_samples

    ad = load_model(str(tiny_dir("qwen2_5_vl")))
    samples = tiny_samples(tmp_path_factory.mktemp("calib"), 8, seed=11, prompt="where is object {i}?")
    return Objective(ad, samples, heldout_fraction=0.25, seed=0, batch_size=4)


def test_candidates_cover_every_registered_ranking_and_labels_are_stable():
    cands = scr.screen_candidates()
    names = {sc["name"] for sc in cands.values()}
    assert names == set(SCORERS) - set(scr.NOT_SCREENED)
    assert "last_token_attention:rope=false" in cands and "diverse:spatial=4.0" in cands
    assert scr.label({"name": "diverse", "params": {"spatial": 1.0}}) == "diverse"  # the default is the bare name
    mix = scr.composite([cands["diverse:spatial=4.0"], cands["fastervlm"]], "union")
    assert scr.label(mix) == "union(diverse:spatial=4.0+fastervlm)"
    from schedsearch.schedule import Scorer

    Scorer(name=mix["name"], params=mix["params"])  # a valid schedule scorer section


def test_choices_are_the_best_few_plus_composites_of_the_best():
    rows = [{"label": f"r{i}", "scorer": {"name": n, "params": {}}, "value": v}
            for i, (n, v) in enumerate([("uniform", 0.1), ("dart", 0.2), ("mmtok", 0.3), ("todre", 0.4),
                                        ("random", 0.5)])]
    rows.append({"label": "hired", "scorer": {"name": "hired", "params": {}}, "value": None, "error": "refused"})
    ch = scr.auto_choices(rows, top=3)
    singles = [k for k, sc in ch.items() if sc["name"] != "composite"]
    assert singles == ["r0", "r1", "r2"]
    mixes = [k for k, sc in ch.items() if sc["name"] == "composite"]
    assert mixes == ["rank(uniform+dart)", "union(uniform+dart)", "rank(uniform+dart+mmtok)"]
    # composites mix different rankings: the best variant of each name
    variants = [{"label": lab, "scorer": sc, "value": v} for lab, sc, v in [
        ("diverse:spatial=4.0", {"name": "diverse", "params": {"spatial": 4.0}}, 0.1),
        ("diverse", {"name": "diverse", "params": {}}, 0.2), ("dart", {"name": "dart", "params": {}}, 0.3)]]
    assert [k for k, sc in scr.auto_choices(variants).items() if sc["name"] == "composite"] == [
        "rank(diverse:spatial=4.0+dart)", "union(diverse:spatial=4.0+dart)"]
    with pytest.raises(Exception, match="no ranking could be scored"):
        scr.auto_choices(rows[-1:])


def test_screen_scores_every_candidate_once_and_is_cached(objective):
    calls = []
    score = objective.score
    objective.score = lambda *a, **k: calls.append(1) or score(*a, **k)
    try:
        rows = scr.screen(objective, "flops", 0.6)
        n = len(calls)
        again = scr.screen(objective, "flops", 0.6)
    finally:
        del objective.score
    shapes = scr.profiles(objective, "flops", 0.6)
    assert set(shapes) == {"flat", "late"}  # a budget the late profile reaches
    # a served ranking once per profile, a refused one until its refusal; the second screen came from the cache
    assert n == sum(len(r["values"]) if r["value"] is not None else 1 for r in rows) and len(calls) == n
    assert len(rows) == len(scr.screen_candidates())
    assert [r["label"] for r in rows] == [r["label"] for r in again]
    ok = [r["value"] for r in rows if r["value"] is not None]
    assert ok == sorted(ok) and len(ok) >= 10  # best first; the Qwen tiny model serves nearly every ranking
    for r in rows:
        assert (r["value"] is None) == ("error" in r) and r["seconds"] >= 0
        if r["value"] is not None:  # a ranking's value is its best profile
            assert r["value"] == min(r["values"].values()) == r["values"][r["profile"]]
    # the flat schedule it used is budget-matched
    ratios = scr.flat_ratios(objective, "flops", 0.6)
    assert len(set(ratios)) == 1 and objective.budget_fn("flops")(ratios) <= 0.6 + 1e-12
    late = shapes["late"]  # every token up to L/4, then one ratio, also budget-matched
    k = max(1, round(len(late) / 4))
    assert late[:k] == [1.0] * k and len(set(late[k:])) == 1 and late[k] < 1.0
    assert objective.budget_fn("flops")(late) <= 0.6 + 1e-12


def test_auto_study_searches_the_screened_choices_and_records_the_screen(objective):
    optuna = pytest.importorskip("optuna")
    from schedsearch.search.optimize import StudySettings, run_study

    settings = StudySettings(budget=0.6, method="psigmoid", sampler="random", trials=6, seed=3)
    res = run_study(settings, objective, baselines=())
    stored = res.study.user_attrs
    choices = dict((lab, sc) for lab, sc in stored["scorer_choices"])
    assert len(choices) == scr.TOP + 3 and res.screen and stored["scorer_screen"][0]["label"] == res.screen[0]["label"]
    best_labels = [r["label"] for r in res.screen if r["value"] is not None][: scr.TOP]
    assert list(choices)[: scr.TOP] == best_labels
    done = [t for t in res.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(t.params["scorer"] in choices and t.user_attrs["scorer"] == choices[t.params["scorer"]] for t in done)
    assert res.best.scorer == choices[res.best_params["scorer"]]
    # a fixed scorer is not screened
    fixed = run_study(StudySettings(budget=0.6, method="psigmoid", sampler="random", trials=2, seed=3,
                                    scorer={"name": "uniform", "params": {}}), objective, baselines=())
    assert fixed.screen is None and "scorer_choices" not in fixed.study.user_attrs


def test_resumed_study_reuses_the_stored_choices(objective, tmp_path):
    pytest.importorskip("optuna")
    from schedsearch.search.optimize import StudySettings, run_study

    url = f"sqlite:///{tmp_path}/s.db"
    s1 = StudySettings(budget=0.6, method="pcosine", sampler="random", trials=2, seed=0, storage=url,
                       study_name="auto")
    first = run_study(s1, objective, baselines=())
    objective.__dict__.pop("_scorer_screens", None)  # a new process: no cached screen
    calls = []
    score = objective.score
    objective.score = lambda *a, **k: calls.append(1) or score(*a, **k)
    try:
        s2 = StudySettings(budget=0.6, method="pcosine", sampler="random", trials=2, seed=0, storage=url,
                           study_name="auto", resume=True)
        second = run_study(s2, objective, baselines=())
    finally:
        del objective.score
    assert len(calls) <= 2 + 2  # two trials + the winner's replay (search and held-out): no screen again
    assert second.study.user_attrs["scorer_choices"] == first.study.user_attrs["scorer_choices"]
    assert len(second.study.trials) == 4


def test_twostage_meets_the_budget_and_covers_the_one_drop_profiles(objective):
    """twostage: keep r0 from layer 0, f * r0 from layer l; r0 solved, so every sampled (l, f) meets the budget."""
    import optuna

    from schedsearch.search.methods import SearchContext, TwoStage

    n = objective.adapter.num_layers
    bfn = objective.budget_fn("flops")
    ctx = SearchContext(num_layers=n, budget_fn=bfn, target=0.6, kind="flops", scorer={"name": "uniform"})
    for layer, f in [(1, 0.0), (n // 2, 0.0), (n - 1, 0.5), (2, 1.0)]:
        cand = TwoStage().suggest(optuna.trial.FixedTrial({"l": layer, "f": f}), ctx)
        r = cand.ratios
        assert bfn(r) <= 0.6 + 1e-12 and bfn(r) > 0.5  # budget-matched from below
        assert all(x == r[0] for x in r[:layer]) and all(x == pytest.approx(r[0] * f) for x in r[layer:])
        assert cand.params["r0"] == r[0] and cand.scorer == {"name": "uniform"}
