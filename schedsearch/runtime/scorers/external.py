"""``external``: scores supplied from outside, per ORIGINAL visual token.

``importance`` is a (B, V_orig) tensor (a ragged batch: V_orig = the largest sample's count, other rows padded
at the end), or a callable ``f(batch_kwargs) -> (B, V_orig)`` that the runtime calls once per prefill with the
base model's forward kwargs (pixel_values, grids, ...). With
``params.source = "vision_attention"`` the runtime itself supplies VFlowOpt's map from the vision tower
(runtime/importance.py; ``t`` and ``alpha`` are its parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext, batch_rows


class External:
    name = "external"
    takes_importance = True

    def __init__(self, importance: torch.Tensor | Callable[[dict], torch.Tensor] | None = None, *,
                 source: str = "caller", t: float = 1.0, alpha: float = 0.0):
        self.importance = importance
        self.source, self.t, self.alpha = source, float(t), float(alpha)
        self.current: torch.Tensor | None = None

    def begin(self, batch_kwargs: dict[str, Any]) -> None:
        imp = self.importance
        self.current = imp(batch_kwargs) if callable(imp) else imp

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        if self.current is None:
            raise ScheduleError(
                "scorer 'external' needs an importance map: pass apply_schedule(..., importance=TENSOR or CALLABLE)"
            )
        imp = self.current.to(ctx.visual_orig.device)
        bsz = ctx.visual_orig.shape[0] if ctx.rows is None else None
        if (bsz is not None and imp.shape[0] != bsz) or (ctx.rows is not None and imp.shape[0] <= int(ctx.rows.max())):
            raise ScheduleError(f"importance map has batch {imp.shape[0]}, which does not fit the batch")
        imp = batch_rows(ctx, imp)
        if imp.shape[1] <= int(ctx.visual_orig.max()):
            raise ScheduleError(f"importance map has {imp.shape[1]} columns but a sample has "
                                f"{int(ctx.visual_orig.max()) + 1} visual tokens")
        return imp.gather(1, ctx.visual_orig).float().clamp_min(0)
