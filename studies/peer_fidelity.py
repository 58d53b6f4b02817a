"""How closely the rankings named after published methods keep what the authors' rules keep (issue 13).

On the shipped toy model (``load_model("toy")``, eager attention) and held-out toy samples, one sample at a time,
the runtime's kept visual tokens at every drop are compared with a hand-written loop of the published rule
(schedsearch/testing/peers.py) at the same kept counts: overlap = |ours & reference| / |reference|. The
"previous variant" column is what schedsearch did before issue 13 under that name (FastV: the drop layer's own
attention; DivPrune: ``diverse`` with its spatial term and DART's first pick; FEATHER: the RoPE-free
``last_token_attention`` alone; VFlowOpt: importance top-k with pruned tokens merged into kept ones).
Schedules: FastV K = 2, R = 0.5 / 0.75; PyramidDrop stages L/4, L/2, 3L/4 with lambda 0.5 and the budget-matched
``schedsearch baseline`` schedules at FLOPs 0.5 and 0.3; DivPrune keeps 0.1 / 0.3 from layer 0; FEATHER stages L/4,
L/2 with the reference's counts; VFlowOpt keeps 0.2 at layer 0 with 4 x 4-token cells on the toy's vision map.

    python studies/peer_fidelity.py [--n 24] [--out studies/results/peer_fidelity.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def baseline_ratios(adapter, name: str, budget: float) -> list[float]:
    """The keep ratios ``schedsearch baseline NAME --budget B`` writes (FLOPs, the toy's calibration set)."""
    from schedsearch.calibration import load_manifest
    from schedsearch.evaluation import make_batches, token_counts
    from schedsearch.flops import DecoderShape, budget_report
    from schedsearch.search.driver import _default_calibration
    from schedsearch.search.methods import SearchContext, baseline_candidate

    counts = token_counts(adapter, make_batches(adapter, load_manifest(_default_calibration("toy"))))
    shape = DecoderShape.from_config(adapter.text_config)
    ctx = SearchContext(num_layers=adapter.num_layers, target=budget, kind="flops",
                        budget_fn=lambda r: budget_report(shape, counts, list(r)).value("flops"))
    return baseline_candidate(name, ctx).ratios


def run(n: int) -> list[dict]:
    import torch

    from schedsearch.models import load_model
    from schedsearch.runtime.importance import importance_for_batch
    from schedsearch.runtime.scorers.feather import grid_cells
    from schedsearch.schedule import kept_counts
    from schedsearch.search.fixed import pdrop_ratios, pdrop_stage_layers
    from schedsearch.testing import peers
    from schedsearch.toy import HELDOUT_SEED, sample

    ad = load_model("toy", attn_implementation="eager")
    L = ad.num_layers
    batches = []
    for i in range(n):
        img, q, _ = sample(HELDOUT_SEED, i)
        batches.append(ad.prepare([[img]], [q["prompt"]]))
    rows: dict[tuple, dict] = {}

    def add(method, setting, layer, ours, ref, old=None):
        r = rows.setdefault((method, setting, layer), {"ours": [], "old": []})
        r["ours"].append(peers.overlap(ours, ref))
        if old is not None:
            r["old"].append(peers.overlap(old, ref))

    def kept(batch, ratios, scorer, **kw):
        return peers.runtime_kept(ad, batch, ratios, scorer, **kw)

    pstages = pdrop_stage_layers(L)
    plans = {
        "FastV K=2 R=0.5": [1.0, 1.0] + [0.5] * (L - 2),
        "FastV K=2 R=0.75": [1.0, 1.0] + [0.25] * (L - 2),
        "`baseline fastv` FLOPs 0.5": baseline_ratios(ad, "fastv", 0.5),
        "`baseline fastv` FLOPs 0.3": baseline_ratios(ad, "fastv", 0.3),
    }
    pplans = {
        "lambda 0.5": pdrop_ratios(L, pstages, 0.5),
        "`baseline pdrop` FLOPs 0.5": baseline_ratios(ad, "pdrop", 0.5),
        "`baseline pdrop` FLOPs 0.3": baseline_ratios(ad, "pdrop", 0.3),
    }
    dplans = {"keep 0.1": [0.1] * L, "keep 0.3": [0.3] * L,
              "`baseline divprune` FLOPs 0.5": baseline_ratios(ad, "divprune", 0.5),
              "`baseline divprune` FLOPs 0.3": baseline_ratios(ad, "divprune", 0.3)}
    for batch in batches:
        v = int(ad.visual_mask(batch["input_ids"])[0].sum())
        with torch.no_grad():
            for setting, ratios in plans.items():
                k = next(i for i, r in enumerate(ratios) if r < 1.0)
                c = kept_counts(ratios, v)[k]
                ref = peers.reference_run(ad, batch, {k: peers.fastv_rule(c)}).kept[k]
                add("FastV", setting, k, kept(batch, ratios, {"name": "fastv", "params": {}})[k], ref,
                    kept(batch, ratios, {"name": "last_token_attention", "params": {"rope": True}})[k])
            for setting, ratios in pplans.items():
                counts = kept_counts(ratios, v)
                stages = [i for i in range(L) if counts[i] < (counts[i - 1] if i else v)]
                rules = {s: peers.pdrop_rule(counts[s]) for s in stages}
                ref = peers.reference_run(ad, batch, rules).kept
                ren = peers.reference_run(ad, batch, rules, positions="renumber").kept
                got = kept(batch, ratios, {"name": "last_token_attention", "params": {"rope": True}})
                for s in stages:
                    add("PyramidDrop", setting, s, got[s], ref[s])
                    add("PyramidDrop vs renumbered positions", setting, s, got[s], ren[s])
            for setting, ratios in dplans.items():
                k = next(i for i, r in enumerate(ratios) if r < 1.0)
                c = kept_counts(ratios, v)[k]
                ref = peers.reference_run(ad, batch, {k: peers.divprune_rule(c)}).kept[k]
                add("DivPrune", setting, k, kept(batch, ratios, {"name": "divprune", "params": {}})[k], ref,
                    kept(batch, ratios, {"name": "diverse", "params": {}})[k])
            k1, k2 = L // 4, L // 2
            s1 = peers.reference_run(ad, batch, {k1: peers.feather_rule(int(v * 0.3))}).kept[k1]
            n2 = int(len(s1) * 0.09)
            ref = peers.reference_run(ad, batch, {k1: peers.feather_rule(int(v * 0.3)),
                                                  k2: peers.feather_rule(n2)}).kept
            ratios = [1.0] * k1 + [len(s1) / v] * (k2 - k1) + [n2 / v] * (L - k2)
            got = kept(batch, ratios, {"name": "feather", "params": {}})
            old = kept(batch, ratios, {"name": "last_token_attention", "params": {"rope": False}})
            for s in (k1, k2):
                add("FEATHER", "K = L/4, L/2; r = 0.7, stride 3", s, got[s], ref[s], old[s])
            imp = importance_for_batch(ad.vision_attention(batch), [v], 1.0, 0.0)
            cells_rc = grid_cells(ad.visual_coords(batch)) // 4
            cells = cells_rc[0, :, 0] * 1000 + cells_rc[0, :, 1]
            refk = peers.vflow_reference(imp[0], cells, 0.2, 4)
            ratios = [int(refk.sum()) / v] * L
            got = kept(batch, ratios, {"name": "vflow", "params": {"cell": 4}}, importance=imp)
            old = kept(batch, ratios, {"name": "external", "params": {}}, importance=imp,
                       recycling={"grid": 4, "weighting": "importance"})
            add("VFlowOpt", "vision stage keep 0.2, cells 4 x 4", 0, got[0], refk.nonzero()[:, 0].tolist(), old[0])
    out = []
    for (method, setting, layer), r in rows.items():
        out.append({"method": method, "setting": setting, "layer": layer, "mean": statistics.mean(r["ours"]),
                    "min": min(r["ours"]), "old": statistics.mean(r["old"]) if r["old"] else None})
    return out


def table(rows: list[dict]) -> str:
    out = ["| method | schedule | drop before layer | ours vs reference: mean overlap | min | previous variant |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        old = "" if r["old"] is None else f"{r['old']:.1%}"
        out.append(f"| {r['method']} | {r['setting']} | {r['layer']} | {r['mean']:.1%} | {r['min']:.1%} | {old} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="held-out toy samples")
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "peer_fidelity.md"))
    args = ap.parse_args(argv)
    import torch

    torch.manual_seed(0)
    t0 = time.time()
    rows = run(args.n)
    text = (f"# `python studies/peer_fidelity.py --n {args.n}` ({time.time() - t0:.0f} s)\n\n"
            "Overlap of the runtime's kept visual tokens with a hand-written loop of each method's published rule, "
            f"same kept counts, {args.n} held-out toy samples one at a time (see the script's docstring). "
            "'PyramidDrop vs renumbered positions' compares our kept sets (original position ids, our default) "
            "with the reference rule run with PyramidDrop's position update after each drop.\n\n" + table(rows) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
