"""Does the VFlowOpt-style importance map point at the objects? (toy model, held-out scenes)

For held-out toy scenes this computes the `vflow` scorer's importance per merged visual token
(``importance_from_attention``: attention of the global tokens, threshold ``t``; VFlowOpt, arXiv 2508.05211,
Sec. 3.2) and compares it on the tokens that cover an object (> 5 % of the token's 8 x 8 px are object pixels,
from the scene's ``label_map``) with the background tokens. A map that ranks objects first has a ratio
object / background > 1 on every image; one below 1 keeps background first, which on this task throws away
exactly what the questions are about. The same ratio for the raw attention each token receives is printed as a
reference.

    python studies/vflow_map.py [--model toy] [--n 64] [--out studies/results/vflow_map.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def object_mask(scene, grid: int = 16) -> np.ndarray:
    """(grid * grid,) bool: merged tokens (row-major) with more than 5 % object pixels."""
    from schedsearch.toy.scenes import label_map

    lm = label_map(scene) > 0
    cell = lm.shape[0] // grid
    return lm.reshape(grid, cell, grid, cell).mean(axis=(1, 3)).reshape(-1) > 0.05


def ratios(adapter, n: int, ts=TS, seed: int | None = None) -> dict:
    """Per t (and ``"received"``): the per-image ratio mean importance on object tokens / on background tokens."""
    import torch

    from schedsearch.runtime.importance import importance_from_attention
    from schedsearch.toy import HELDOUT_SEED, sample

    out: dict = {t: [] for t in ts}
    out["received"] = []
    for i in range(n):
        img, q, scene = sample(HELDOUT_SEED if seed is None else seed, i)
        attn = adapter.vision_attention(adapter.prepare([[img]], [q["prompt"]]))[0]
        obj = torch.from_numpy(object_mask(scene, int(round(attn.shape[0] ** 0.5))))
        if obj.all() or not obj.any():
            continue
        for t in ts:
            imp = importance_from_attention(attn, t)
            out[t].append(float(imp[obj].mean() / imp[~obj].mean()))
        r = attn.mean(0)  # attention each token receives, averaged over queries
        out["received"].append(float(r[obj].mean() / r[~obj].mean()))
    return out


def table(res: dict) -> str:
    rows = ["| map | images | median object / background | share of images below 1 (background first) |",
            "|---|---|---|---|"]
    for k, v in res.items():
        name = "attention received (reference)" if k == "received" else f"vflow importance, t = {k}"
        v = np.asarray(v)
        rows.append(f"| {name} | {len(v)} | {np.median(v):.3f} | {(v < 1).mean():.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from schedsearch.devices import add_arguments, load_kwargs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "vflow_map.md"))
    add_arguments(ap)  # --device / --dtype, as on the CLI
    args = ap.parse_args(argv)
    import torch

    from schedsearch.models import load_model

    torch.manual_seed(0)
    t0 = time.time()
    res = ratios(load_model(args.model, **load_kwargs(args.device, args.dtype)), args.n)
    text = (f"# `python studies/vflow_map.py --model {args.model} --n {args.n}` ({time.time() - t0:.0f} s)\n\n"
            "Importance of object tokens vs background tokens under the `vflow` scorer's map, held-out toy scenes.\n\n"
            + table(res) + "\n")
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
