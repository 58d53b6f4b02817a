"""The field's rankings (schema 1.2 scorers) on the toy model at a flat keep ratio, against ``uniform``.

Same protocol as ``ranking_study.py``: the same keep ratio at every decoder layer (tokens dropped before layer 0),
only the ranking changes; held-out discrepancy = mean 1 - cos of the last token's final-norm hidden state against
the unpruned model, on the held-out toy stream. Every scorer runs with its registry defaults (the authors'
published settings). On the toy's 2-block vision tower every vision-layer parameter resolves to its one
full-attention block, so FasterVLM, VTC-CLS and FlowCut read the same layer, HiPrune's object and deep layers
coincide, and HiRED's early and late layers too.

    python studies/peer_rankings.py [--n 128] [--keep 0.22 0.09] [--out studies/results/peer_rankings.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: rows: label -> scorer section; the first three are the existing references
ROWS = {
    "uniform": {"name": "uniform", "params": {}},
    "random": {"name": "random", "params": {"seed": 0}},
    "diverse, spatial 4": {"name": "diverse", "params": {"spatial": 4.0}},
    **{name: {"name": name, "params": {}} for name in (
        "fastervlm", "vtc_cls", "visionzip", "hiprune", "flowcut", "hired", "dart", "mmtok", "todre", "sparsevlm",
        "transprune")},
}


def run(adapter, n: int, keeps, batch: int = 8) -> list[dict]:
    import torch

    from schedsearch.evaluation import cosine_discrepancy, last_token_states
    from schedsearch.toy import HELDOUT_SEED, sample

    items = [sample(HELDOUT_SEED, i) for i in range(n)]
    batches = [adapter.prepare([[img] for img, _, _ in items[i : i + batch]],
                               [q["prompt"] for _, q, _ in items[i : i + batch]]) for i in range(0, n, batch)]
    with torch.no_grad():
        ref = last_token_states(adapter, batches)
    rows = []
    for keep in keeps:
        for label, scorer in ROWS.items():
            sched = {"keep_ratios": [float(keep)] * adapter.num_layers, "scorer": scorer, "recycling": None}
            t0 = time.perf_counter()
            with torch.no_grad():
                d = cosine_discrepancy(ref, last_token_states(adapter, batches, sched))
            rows.append({"keep": float(keep), "ranking": label, "discrepancy": float(d.mean()),
                         "stderr": float(d.std() / len(d) ** 0.5), "seconds": time.perf_counter() - t0})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| keep (every layer) | ranking | held-out 1-cos | ± s.e. | vs uniform | s (all batches) |",
           "|---|---|---|---|---|---|"]
    base = {r["keep"]: r["discrepancy"] for r in rows if r["ranking"] == "uniform"}
    for r in rows:
        out.append(f"| {r['keep']:g} | {r['ranking']} | {r['discrepancy']:.4f} | {r['stderr']:.4f} | "
                   f"{r['discrepancy'] / base[r['keep']]:.2f}x | {r['seconds']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.22, 0.09])
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "peer_rankings.md"))
    args = ap.parse_args(argv)
    import torch

    from schedsearch.models import load_model

    torch.manual_seed(0)
    t0 = time.time()
    rows = run(load_model(args.model), args.n, args.keep)
    text = (f"# `python studies/peer_rankings.py --n {args.n}` ({time.time() - t0:.0f} s, torch threads "
            f"{torch.get_num_threads()})\n\nSame flat keep ratio at every decoder layer (dropped before layer 0), only "
            f"the ranking changes; {args.n} held-out toy samples of stream `HELDOUT_SEED`; every scorer with its "
            f"registry defaults.\n\n{table(rows)}\n")
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
