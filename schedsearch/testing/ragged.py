"""Ragged batch vs each sample alone, on the tiny checkpoint of every family, under every scorer.

    python -m schedsearch.testing.ragged [--families llava_next,qwen2_5_vl] [--out DIR]

Prints a Markdown table (the README's "Ragged batches" figures): per family the samples' visual-token counts,
how many scorers ran (the others refuse in one line on that family, e.g. vision-encoder rankings without
vision maps), whether every sample kept the same visual tokens at every layer as alone, and the largest
|last-token logit difference| batch vs alone over all scorers. The batch is three samples: a 160x96 image,
a 96x160 image, and two images (112x112 + 160x96); schedule 1.0, 0.5, ..., 0.5, 0.25. Positions come from
the attention mask as in ``generate()`` (tests/test_ragged.py explains why).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

PROMPTS = ["what is it ?", "describe the picture", "is there a red square in the top left ?"]


def _images() -> list[list[Any]]:
    from schedsearch.testing.tiny import tiny_images

    wide = tiny_images(1, size=(160, 96), seed=1)[0]
    tall = tiny_images(1, size=(96, 160), seed=2)[0]
    return [[wide], [tall], [tiny_images(1, seed=3)[0], wide]]


def _kept(ad: Any, ids: Any, kept: dict, row: int) -> dict[int, list[int]]:
    vis = ad.visual_mask(ids)[row]
    rank = vis.long().cumsum(0) - 1
    out = {}
    for layer, idx in kept.items():
        i = idx[row][idx[row] >= 0]
        out[layer] = sorted(rank[i[vis[i]]].tolist())
    return out


def compare(ad: Any, scorer: str) -> tuple[bool, float]:
    """(kept tokens equal alone for every sample and layer, max |logit diff|) for one scorer on one adapter."""
    import torch

    from schedsearch.runtime import apply_schedule

    n = ad.num_layers
    sched = {"keep_ratios": [1.0] + [0.5] * (n - 2) + [0.25], "scorer": {"name": scorer, "params": {}},
             "recycling": None}
    imgs = _images()
    batch = ad.prepare(imgs, PROMPTS)
    same, worst = True, 0.0
    with torch.no_grad(), apply_schedule(ad.model, sched, adapter=ad) as handle:
        if ad.spec.positions_in_generate:
            logits = ad.model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True).logits[0]
        else:
            pos = (batch["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
            logits = ad.model(**batch, position_ids=pos).logits[:, -1]
        kept = {layer: idx.clone() for layer, idx in handle.kept_indices.items()}
        for i, p in enumerate(PROMPTS):
            one = ad.prepare([imgs[i]], [p])
            alone = ad.model(**one).logits[0, -1]
            same &= _kept(ad, batch["input_ids"], kept, i) == _kept(ad, one["input_ids"], handle.kept_indices, 0)
            worst = max(worst, float((alone - logits[i]).abs().max()))
    return same, worst


def main(argv: list[str] | None = None) -> int:
    from schedsearch.errors import SchedsearchError
    from schedsearch.models import load_model
    from schedsearch.scorer_specs import SCORERS
    from schedsearch.testing.tiny import ALL_FAMILIES, make_tiny

    ap = argparse.ArgumentParser(prog="python -m schedsearch.testing.ragged", description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(ALL_FAMILIES))
    ap.add_argument("--out", default=None, help="where the tiny checkpoints go (default: a temporary directory)")
    args = ap.parse_args(argv)
    scorers = [s for s in SCORERS if s != "external"]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or tmp
        print("| family | visual tokens per sample | scorers run | kept = alone | max abs logit diff |")
        print("|---|---|---|---|---|")
        for fam in args.families.split(","):
            ad = load_model(make_tiny(fam, f"{root}/{fam}"))
            counts = ad.visual_mask(ad.prepare(_images(), PROMPTS)["input_ids"]).sum(1).tolist()
            ran, same, worst = 0, True, 0.0
            for name in scorers:
                try:
                    ok, diff = compare(ad, name)
                except SchedsearchError:
                    continue
                ran += 1
                same &= ok
                worst = max(worst, diff)
            print(f"| {fam} | {', '.join(map(str, counts))} | {ran}/{len(scorers)} | {'yes' if same else 'NO'} | "
                  f"{worst:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
