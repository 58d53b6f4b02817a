"""The schedule contract (standard library only). Being written: see schedule.schema.json."""

from __future__ import annotations

import math


def kept_counts(keep_ratios: list[float] | tuple[float, ...], n_visual: int) -> list[int]:
    """Visual tokens kept *entering* each decoder layer: round-half-up of ratio x count, clamped.

    This rounding rule is part of the contract: every runtime must use it so that FLOPs,
    KV bytes and the tokens actually dropped agree. n_l = min(n_visual, floor(r_l * n_visual + 0.5)).
    """
    return [min(n_visual, max(0, math.floor(float(r) * n_visual + 0.5))) for r in keep_ratios]
