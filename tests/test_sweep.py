"""studies/sweep.py: the committed results match the script's preset; the sweep runs end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("schedsearch_studies_sweep", ROOT / "studies" / "sweep.py")
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def _cells(rows: list[dict]) -> set[tuple[float, str]]:
    return {(float(r["budget"]), r["method"]) for r in rows if r["method"] != "unpruned"}


def test_committed_results_match_the_preset_in_their_header():
    sweep = _sweep_module()
    md = ROOT / "studies" / "results" / "sweep.md"
    head, rows = sweep.read_table(md.read_text(encoding="utf-8"))
    preset = sweep.PRESETS[head["preset"]]
    assert head["command"].startswith("python studies/sweep.py") and f"--preset {preset.name}" in head["command"]
    assert _cells(rows) == {(b, m) for b in preset.budgets for m in preset.methods}
    from schedsearch.search.fixed import BASELINES

    # every method's published profile is a budget-matched peer row, besides the three searches
    assert set(preset.methods) == set(BASELINES) | {"psigmoid", "twostage", "gsearch", "vflow"}
    assert {"fastv", "pdrop", "uniform", "fastervlm", "sparsevlm", "dart"} <= set(BASELINES)
    assert set(preset.budgets) == {0.5, 0.3, 0.2, 0.1, 0.05}
    for r in rows:
        assert set(sweep.COLUMNS + sweep.TAIL_COLUMNS) <= set(r)
        if r["FLOPs"] != "infeasible":
            assert 0.0 < float(r["FLOPs"]) <= 1.0 and 0.0 <= float(r["acc"]) <= 1.0
    data = json.loads((ROOT / "studies" / "results" / "sweep.json").read_text(encoding="utf-8"))
    assert data["meta"]["preset"] == preset.name
    assert {(c["budget"], c["method"]) for c in data["cells"]} == _cells(rows)
    for name in ("sweep_accuracy.png", "sweep_discrepancy.png"):
        assert (ROOT / "studies" / "results" / name).stat().st_size > 1000


def test_readme_table_is_the_committed_sweep_table():
    """The README embeds exactly the table the script wrote (rerun the sweep -> copy its table)."""
    blocks, cur = [], []
    for ln in (ROOT / "studies" / "results" / "sweep.md").read_text(encoding="utf-8").splitlines() + [""]:
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(blocks) == 2 and blocks[0].count("\n") > 10  # the sweep's table and the best-vs-peer summary
    for table in blocks:
        assert table in readme


def test_presets_cover_every_budget_and_method():
    sweep = _sweep_module()
    from schedsearch.search.optimize import SAMPLERS

    for p in sweep.PRESETS.values():
        assert p.budgets == sweep.BUDGETS and p.methods == sweep.METHODS
        assert p.sampler in SAMPLERS and p.trials >= 1 and p.n_heldout >= 1


def test_sweep_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    sweep = _sweep_module()
    from schedsearch.models import load_model
    from schedsearch.testing.tiny import tiny_samples

    adapter = load_model(str(tiny_dir("qwen2_5_vl")))
    calib = tiny_samples(tmp_path / "calib", 6, seed=5, prompt="where is object {i}?")
    regions = ["top left", "bottom right", "top right", "bottom left"]
    held = [replace(s, answer="yes", extra={"qtype": "spatial", "region": regions[i % 4]} if i % 2 else
                    {"qtype": "presence"}) for i, s in enumerate(tiny_samples(tmp_path / "held", 6, seed=6))]
    preset = replace(sweep.PRESETS["quick"], name="test", budgets=(0.5, 0.01), trials=2, sampler="random",
                     gsearch_step=0.25, n_heldout=len(held), n_calibration=None, timing_samples=2,
                     timing_repeats=1, batch_size=4)
    out = tmp_path / "out"
    res = sweep.run_sweep(adapter, calib, held, preset, out_dir=out, tracking_uri=f"sqlite:///{tmp_path}/m.db",
                          log=lambda s: None)

    assert {(c["budget"], c["method"]) for c in res["cells"]} == {(b, m) for b in (0.5, 0.01) for m in sweep.METHODS}
    lo = res["meta"]["lowest_feasible"]
    assert lo > 0.01  # text tokens alone cost more than 1% on the tiny model: every 0.01 cell is infeasible
    for c in res["cells"]:
        if c["budget"] == 0.01:
            assert c["status"] == "infeasible" and "0.01" in c["reason"]
            continue
        assert c["status"] == "ok", c
        for key in ("flops_ratio", "kv_ratio", "token_ratio", "discrepancy", "accuracy", "accuracy_by_qtype",
                    "accuracy_top", "accuracy_bottom", "speedup", "trials", "search_s", "keep_ratios"):
            assert key in c, key
        assert c["calibration_flops_ratio"] <= 0.5 + 1e-9
        assert set(c["accuracy_by_qtype"]) == {"presence", "spatial"}
        assert (c["trials"] == 0) == (c["method"] in sweep.FIXED)
        timed = c["method"] in sweep.SEARCHED or c["method"] in preset.timed_peers
        assert (c["speedup"] is not None) == timed, c["method"]
        if c["method"] in ("psigmoid", "twostage", "vflow"):
            assert c["trials"] == 2
        if c["method"] in ("psigmoid", "twostage", "gsearch"):  # --scorer auto: the screen is recorded with the cell
            labels = {r["label"] for r in c["screen"]}
            assert {"uniform", "fastervlm", "sparsevlm", "last_token_attention:rope=false"} <= labels
            assert c["scorer_choices"] and c["scorer"]["name"] in {"composite"} | {
                r["label"].split(":")[0] for r in c["screen"]}
        assert 0.0 <= c["accuracy_se"] <= 0.5
    summ = res["summary"]
    assert [r["budget"] for r in summ["rows"]] == [0.5, 0.01]
    row = summ["rows"][0]
    searched = [c for c in res["cells"] if c["budget"] == 0.5 and c["kind"] == "searched"]
    assert row["searched"] == min(searched, key=lambda c: c["search_discrepancy"])["method"]  # chosen on search set
    peers = [c for c in res["cells"] if c["budget"] == 0.5 and c["kind"] == "fixed"]
    assert row["peer_discrepancy"] == min(c["discrepancy"] for c in peers)
    assert row["peer_accuracy"] == max(c["accuracy"] for c in peers)
    assert "searched" not in summ["rows"][1]  # 0.01 is infeasible for every method

    head, rows = sweep.read_table((out / "sweep.md").read_text(encoding="utf-8"))
    assert head["preset"] == "test" and _cells(rows) == {(c["budget"], c["method"]) for c in res["cells"]}
    assert rows[0]["method"] == "unpruned" and rows[0]["1-cos"] == "0.0000"
    assert "## Best searched schedule against the best peer" in (out / "sweep.md").read_text(encoding="utf-8")
    assert json.loads((out / "sweep.json").read_text())["cells"][0]["method"] == "fastv"
    for name in ("sweep_accuracy.png", "sweep_discrepancy.png", "sweep_keep_psigmoid.png", "sweep_keep_gsearch.png",
                 "sweep_keep_vflow.png", "sweep_keep_twostage.png"):
        assert (out / name).stat().st_size > 1000, name

    from schedsearch.tracking import Tracker

    tr = Tracker(f"sqlite:///{tmp_path}/m.db", experiment="schedsearch-sweep")
    runs = tr.client.search_runs([tr.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + len(res["cells"])
    # the searched cells' ranking screens are in their child runs (MLflow keys sanitized: "rank(a+b)" -> "rank_a_b_")
    assert any(k.startswith("screen_fastervlm") for r in runs for k in r.data.metrics)


def test_readme_search_set_size_figures_come_from_the_study():
    """The README's 'What the search set says' bullet quotes studies/results/search_set_size.md, number for number."""
    import re

    root = Path(__file__).resolve().parents[1]
    table = (root / "studies" / "results" / "search_set_size.md").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    bullet = readme[readme.index("**What the search set says**"):]
    bullet = bullet[: bullet.index("\n* ")]
    quoted = re.findall(r"\b0\.\d{4}\b", bullet)
    assert len(quoted) >= 6
    cells = set(re.findall(r"\b0\.\d{4}\b", table))
    assert set(quoted) <= cells, set(quoted) - cells
    shares = re.findall(r"\b(\d\d) %", bullet)  # the worst 5 %'s share of uniform's and of vflow's mean
    assert len(shares) == 2
    for pct in shares:
        assert f"| 0.{pct} |" in table


def test_accuracy_on_batches_encoded_once_gives_the_raw_answers(tiny_dir, tmp_path):
    """The sweep's accuracy runs on image features encoded once (toy.eval.prepare_groups): same predictions as raw
    batches, for a ranking that reads the vision encoder's maps too (replayed by the adapter)."""
    sweep = _sweep_module()
    from schedsearch.models import load_model
    from schedsearch.testing.tiny import tiny_samples
    from schedsearch.toy.eval import predict, prepare_groups

    ad = load_model(str(tiny_dir("qwen2_5_vl")))
    samples = tiny_samples(tmp_path, 5, seed=9, prompt="what is object {i}?")
    prepared = prepare_groups(ad, samples, 2, precompute=True)
    assert all("mm_encoder_outputs" in b for _, b in prepared)
    n = ad.num_layers
    for name in ("uniform", "fastervlm", "last_token_attention"):
        sched = {"keep_ratios": [0.3] * n, "scorer": {"name": name, "params": {}}}
        assert not sweep.needs_encoder_run(sched)
        assert predict(ad, samples, schedule=sched, batch_size=2, prepared=prepared) == \
            predict(ad, samples, schedule=sched, batch_size=2)
    for sched in ({"keep_ratios": [0.3] * n, "scorer": {"name": "diverse", "params": {}}},
                  {"keep_ratios": [0.3] * n, "scorer": {"name": "uniform"}, "recycling": {"grid": 2}},
                  {"keep_ratios": [0.3] * n, "scorer": {"name": "external", "params": {"source": "vision_attention"}}}):
        assert sweep.needs_encoder_run(sched)
