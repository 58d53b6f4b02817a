"""P-Sigmoid and shifted-cosine keep-ratio curves over depth, budget met by bisection.

P-Sigmoid (Zhao et al., arXiv 2412.00556, Sec. 3.3; the exact form is from secondary sources, see
METHODS.md §1): r(i) = 1 / (1 + exp(k (i - alpha))) falls with depth for k > 0. We add a floor f
(mentioned but unconfirmed in the paper) and use normalised depth x = i / (L - 1):

    r(x) = f + (1 - f) / (1 + exp(k (x - m)))

Shifted cosine (p-MoD, arXiv 2412.04449, Sec. 3.2 uses a shifted cosine decay over depth):

    r(x) = f + (1 - f) * (1 + cos(pi * clip((x - m) / w, 0, 1))) / 2

Budget: for fixed shape parameters (k or w) and floor f, the achieved budget is non-decreasing
in the midpoint/start m, so m is solved by bisection. The floor is searched as a fraction
``phi`` in [0, 1) of the budget-matched *uniform* ratio u: f = phi * u < u, which guarantees a
solution exists (m -> -inf gives r = f everywhere, below budget; m -> +inf gives r = 1). So no
trial is spent on an infeasible point.
"""

from __future__ import annotations

import math

from schedsearch.search.budget import BudgetFn, clamp_non_increasing, solve_increasing
from schedsearch.search.fixed import uniform


def sigmoid_ratios(num_layers: int, k: float, m: float, floor: float) -> list[float]:
    out = []
    for i in range(num_layers):
        x = i / max(1, num_layers - 1)
        z = k * (x - m)
        s = 0.0 if z > 60 else 1.0 / (1.0 + math.exp(z))
        out.append(floor + (1.0 - floor) * s)
    return clamp_non_increasing(out)


def cosine_ratios(num_layers: int, w: float, m: float, floor: float) -> list[float]:
    out = []
    for i in range(num_layers):
        x = i / max(1, num_layers - 1)
        t = min(1.0, max(0.0, (x - m) / max(w, 1e-6)))
        out.append(floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))
    return clamp_non_increasing(out)


def _solve(curve, num_layers: int, shape: float, phi: float, budget_fn: BudgetFn, target: float,
           m_lo: float) -> tuple[list[float], dict]:
    # m_lo puts every layer on the floor (budget <= target since floor < u); m = 2 keeps every layer ~1
    u_ratios, _ = uniform(num_layers, budget_fn, target)
    floor = max(0.0, min(0.999, phi)) * u_ratios[0]
    m = solve_increasing(lambda mm: budget_fn(curve(num_layers, shape, mm, floor)), target, m_lo, 2.0)
    return curve(num_layers, shape, m, floor), {"m": m, "floor": floor}


def psigmoid(num_layers: int, budget_fn: BudgetFn, target: float, k: float, phi: float
             ) -> tuple[list[float], dict]:
    """Budget-matched sigmoid; k = steepness (> 0), phi = floor as a fraction of the uniform ratio."""
    ratios, solved = _solve(sigmoid_ratios, num_layers, k, phi, budget_fn, target, m_lo=-40.0 / max(k, 1e-3))
    return ratios, {"k": k, "phi": phi, **solved}


def pcosine(num_layers: int, budget_fn: BudgetFn, target: float, w: float, phi: float
            ) -> tuple[list[float], dict]:
    """Budget-matched shifted cosine; w = width of the decay in normalised depth (0, 1]."""
    ratios, solved = _solve(cosine_ratios, num_layers, w, phi, budget_fn, target, m_lo=-1.0 - w)
    return ratios, {"w": w, "phi": phi, **solved}
