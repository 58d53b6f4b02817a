"""``uniform``: evenly spaced survivors in token order (raster order = spatially uniform sampling)."""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext


class UniformSpatial:
    """Keeps alive visual token floor((i + 0.5) * V / n_keep) for i < n_keep; score 1 for kept, 0 else."""

    name = "uniform"

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        scores = torch.zeros(bsz, v, device=ctx.visual_local.device)
        if ctx.n_keep > 0:
            idx = ((torch.arange(ctx.n_keep, dtype=torch.float64) + 0.5) * v / ctx.n_keep).floor().long()
            scores[:, idx.clamp(max=v - 1).to(scores.device)] = 1.0
        return scores
