"""Which ranking of visual tokens loses least on the toy model? (flat keep ratio from layer 0, held-out scenes)

Holds the schedule fixed -- the same keep ratio at every decoder layer, tokens dropped before layer 0 -- and
changes only which tokens survive, then reports the held-out discrepancy (mean 1 - cos of the last token's
final-norm hidden state against the unpruned model, the search objective):

* ``uniform``: evenly spaced in raster order (the runtime's ``uniform`` scorer);
* ``random``: a seeded random subset (the runtime's ``random`` scorer);
* ``objects first``: an oracle that keeps every token covering an object (> 5 % object pixels, from the scene's
  ``label_map``) before any background token (ties broken by a seeded jitter);
* ``distinct``: tokens whose vision-tower output is least similar to the image's mean token first, a
  duplication-style ranking in the spirit of DART (Wen et al., arXiv 2502.11494: keep tokens that are not
  duplicates), computed here against the mean token instead of pivot tokens;
* ``vflow map, t = T``: the `vflow` scorer's importance map (VFlowOpt, arXiv 2508.05211, Sec. 3.2);
* ``diverse, spatial S``: the runtime's ``diverse`` scorer, greedy max-min diversity of the visual tokens' states
  (DivPrune, arXiv 2503.02175) plus S times their distance on the image grid (S = 0 is DivPrune's distance).

If the object oracle does not beat ``uniform``, no importance ranking can do much better on this model, and the
searches' choice of the ``uniform`` scorer at small budgets (studies/results/sweep.md) is the right one.

    python studies/ranking_study.py [--n 256] [--keep 0.22 0.09] [--out studies/results/ranking_study.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


#: spatial weights of the runtime's ``diverse`` scorer shown (0 = DivPrune's feature-only distance; 4 and 16 are
#: two of the values the searches choose from, schedsearch.search.methods.SCORER_CHOICES)
DIVERSE_SPATIAL = (0, 4, 16)


def rankings(adapter, t: float):
    """name -> (scorer dict, importance builder(batch kwargs, object tokens (B, V) as 0/1) or None)."""
    import torch

    from schedsearch.runtime.importance import importance_from_attention

    gen = torch.Generator().manual_seed(0)

    def objects_first(kw, occ):
        return occ + 1e-3 * torch.rand(occ.shape, generator=gen)

    def distinct(kw, occ):
        with torch.no_grad():
            out = adapter.model.model.get_image_features(pixel_values=kw["pixel_values"],
                                                         image_grid_thw=kw["image_grid_thw"])
        x = out.pooler_output if getattr(out, "pooler_output", None) is not None else out
        x = torch.cat(list(x)) if isinstance(x, (list, tuple)) else x
        x = x.reshape(occ.shape[0], occ.shape[1], -1).float()
        return 1 - torch.nn.functional.cosine_similarity(x, x.mean(1, keepdim=True), dim=-1)

    def vflow(kw, occ):
        maps = adapter.vision_attention(kw)
        return torch.stack([importance_from_attention(m, t) for m in maps])

    ext = {"name": "external", "params": {}}
    return {"uniform": ({"name": "uniform", "params": {}}, None),
            "random": ({"name": "random", "params": {"seed": 0}}, None),
            "objects first (oracle)": (ext, objects_first),
            "distinct (vs the mean token)": (ext, distinct),
            f"vflow map, t = {t:g}": (ext, vflow),
            **{f"diverse, spatial {s:g}" + (" (DivPrune)" if s == 0 else ""):
               ({"name": "diverse", "params": {"spatial": float(s)}}, None) for s in DIVERSE_SPATIAL}}


def run(adapter, n: int, keeps, t: float = 2.0, batch: int = 8) -> list[dict]:
    import torch
    from vflow_map import object_mask

    from schedsearch.evaluation import cosine_discrepancy, last_token_states
    from schedsearch.toy import HELDOUT_SEED, sample

    items = [sample(HELDOUT_SEED, i) for i in range(n)]
    batches, occs = [], []
    for i in range(0, n, batch):
        chunk = items[i : i + batch]
        batches.append(adapter.prepare([[img] for img, _, _ in chunk], [q["prompt"] for _, q, _ in chunk]))
        occs.append(torch.tensor(np.stack([object_mask(sc) for _, _, sc in chunk])).float())  # 1 = object token
    ref = last_token_states(adapter, batches)
    layers = adapter.num_layers
    rows = []
    for keep in keeps:
        for name, (scorer, build) in rankings(adapter, t).items():
            sched = {"keep_ratios": [float(keep)] * layers, "scorer": scorer, "recycling": None}
            outs = [last_token_states(adapter, [b], sched, importance=None if build is None else build(b, occ))
                    for b, occ in zip(batches, occs, strict=True)]
            d = cosine_discrepancy(ref, torch.cat(outs))
            rows.append({"keep": float(keep), "ranking": name, "discrepancy": float(d.mean()),
                         "stderr": float(d.std() / len(d) ** 0.5)})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| keep (every layer) | ranking | held-out 1-cos | ± s.e. | vs uniform |", "|---|---|---|---|---|"]
    base = {r["keep"]: r["discrepancy"] for r in rows if r["ranking"] == "uniform"}
    for r in rows:
        out.append(f"| {r['keep']:g} | {r['ranking']} | {r['discrepancy']:.4f} | {r['stderr']:.4f} | "
                   f"{r['discrepancy'] / base[r['keep']]:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from schedsearch.devices import add_arguments, load_kwargs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.22, 0.09])
    ap.add_argument("--t", type=float, default=2.0, help="vflow threshold (2 ranks objects first most often)")
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "ranking_study.md"))
    add_arguments(ap)  # --device / --dtype, as on the CLI
    args = ap.parse_args(argv)
    import torch

    from schedsearch.models import load_model

    torch.manual_seed(0)
    t0 = time.time()
    rows = run(load_model(args.model, **load_kwargs(args.device, args.dtype)), args.n, args.keep, args.t)
    text = (f"# `python studies/ranking_study.py --n {args.n}` ({time.time() - t0:.0f} s, torch threads "
            f"{torch.get_num_threads()})\n\nSame flat keep ratio at every decoder layer (dropped before layer 0), only "
            f"the ranking changes; {args.n} held-out toy samples of stream `HELDOUT_SEED`.\n\n{table(rows)}\n")
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
