"""``random``: a seeded random ranking, identical for every sample with the same visual count."""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext


class SeededRandom:
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx)
        return torch.rand(v, generator=gen).to(ctx.visual_local.device).expand(bsz, v)
