"""Meeting a budget exactly: solve one scalar parameter of a schedule family by bisection.

A ``BudgetFn`` maps per-layer keep ratios to the achieved budget value (a ratio in (0, 1], e.g.
pruned / unpruned decoder prefill FLOPs over the calibration token counts). Every schedule family
here is monotone in the solved parameter, so bisection finds the *largest* keep (best quality)
whose achieved value is still <= the requested budget. Kept counts are integers (the contract's
rounding rule), so achieved values are a step function; the invariant ``f(lo) <= target`` makes the
returned point feasible even on a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

BudgetFn = Callable[[Sequence[float]], float]


class InfeasibleBudget(ValueError):
    """The requested budget cannot be met by this family/parameters."""


def solve_increasing(g: Callable[[float], float], target: float, lo: float, hi: float,
                     iters: int = 60) -> float:
    """Largest x in [lo, hi] with g(x) <= target, for g non-decreasing in x.

    Raises InfeasibleBudget when g(lo) > target. Returns hi when g(hi) <= target.
    """
    if g(lo) > target + 1e-12:
        raise InfeasibleBudget(f"even the smallest setting gives {g(lo):.4f} > {target:.4f}")
    if g(hi) <= target + 1e-12:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if g(mid) <= target + 1e-12:
            lo = mid
        else:
            hi = mid
    return lo


def clamp_non_increasing(ratios: Sequence[float]) -> list[float]:
    """Clip to [0, 1] and make non-increasing with depth (running minimum)."""
    out, cur = [], 1.0
    for r in ratios:
        cur = min(cur, max(0.0, min(1.0, float(r))))
        out.append(cur)
    return out
