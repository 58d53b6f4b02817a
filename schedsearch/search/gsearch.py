"""G-Search: greedy shallow-to-deep search over a discrete grid of keep ratios.

Zhao et al. (arXiv 2412.00556, Sec. 3.2): visual-token importance ranks barely change after the
first layers, so the kept set should not grow with depth; going from shallow to deep, each layer
keeps as few tokens as the quality signal allows, given the choices made for shallower layers.
The paper's exact stopping rule is not public: here the quality signal is our objective and the
rule is a tolerance ``tol`` on it (a visible parameter), the granularity is the grid ``step``.

* Scenario I (``tolerance`` mode): for l = 0..L-1, binary-search the smallest grid value v <= r_{l-1}
  such that the schedule (r_0..r_{l-1}, v, v, ..., v) scores <= tol; set r_l..r_{L-1} = v.
  The objective is assumed monotone in v for the binary search (kept tokens only add information).
* ``budget`` mode: the cheapest-at-tolerance schedule's budget falls as tol grows, so tol is found
  by bisection on log(tol) as the smallest value whose greedy schedule meets the budget.

Every distinct evaluation goes through ``evaluate(ratios) -> value`` which the caller records as a
trial (Optuna ask/tell); repeated schedules are answered from a memo and not re-run. A caller that caps
the evaluations raises :class:`EvaluationCap` from ``evaluate``; :func:`best_evaluated` then picks the
best schedule among those evaluated so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from schedsearch.search.budget import BudgetFn


class EvaluationCap(Exception):  # noqa: N818 - a control-flow signal, not an error the user sees
    """Raised by a capped ``evaluate`` when the allowed number of evaluations is used up."""


class GSearchWarning(UserWarning):
    """The greedy search was cut short by --trials; the best evaluated schedule was used."""


def best_evaluated(evaluated: Sequence[tuple[list[float], dict, float]], budget_fn: BudgetFn, target: float,
                   tolerance: float | None, num_layers: int, scorer: dict) -> tuple[list[float], dict, float]:
    """The best (ratios, scorer, value) among evaluated schedules when the search was cut short.

    Tolerance mode: the cheapest (lowest ``budget_fn``) with value <= tolerance, ties to the lower value;
    all ones (discrepancy 0 by definition) when none is. Budget mode: the lowest value among those with
    ``budget_fn <= target``; a SearchError-worthy ValueError when none meets the budget.
    """
    if tolerance is not None:
        ok = [e for e in evaluated if e[2] <= tolerance]
        if not ok:
            return [1.0] * num_layers, scorer, 0.0
        return min(ok, key=lambda e: (budget_fn(e[0]), e[2]))
    ok = [e for e in evaluated if budget_fn(e[0]) <= target + 1e-12]
    if not ok:
        raise ValueError("no evaluated schedule meets the budget")
    return min(ok, key=lambda e: e[2])


def grid_values(step: float) -> list[float]:
    n = max(1, int(round(1.0 / step)))
    return [round(1.0 - i / n, 10) for i in range(n + 1)]  # 1.0 ... 0.0


class GreedySearch:
    def __init__(self, num_layers: int, evaluate: Callable[[list[float]], float], step: float = 0.05):
        self.num_layers = num_layers
        self._evaluate = evaluate
        self.grid = grid_values(step)
        self.memo: dict[tuple[float, ...], float] = {}

    def value(self, ratios: Sequence[float]) -> float:
        key = tuple(round(r, 10) for r in ratios)
        if key not in self.memo:
            self.memo[key] = float(self._evaluate(list(key)))
        return self.memo[key]

    def at_tolerance(self, tol: float) -> list[float]:
        ratios = [1.0] * self.num_layers
        upper = 1.0
        for layer in range(self.num_layers):
            cands = [v for v in self.grid if v <= upper + 1e-12]  # descending
            # largest index i (smallest value) with value <= tol; cands[0] == upper is always acceptable
            lo, hi = 0, len(cands) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                trial = ratios[:layer] + [cands[mid]] * (self.num_layers - layer)
                if self.value(trial) <= tol:
                    lo = mid
                else:
                    hi = mid - 1
            v = cands[lo]
            ratios = ratios[:layer] + [v] * (self.num_layers - layer)
            upper = v
        return ratios

    def at_budget(self, budget_fn: BudgetFn, target: float, iters: int = 7,
                  tol_range: tuple[float, float] = (1e-6, 1.0)) -> tuple[list[float], float]:
        """Smallest tolerance whose greedy schedule meets ``budget_fn(r) <= target``."""
        lo, hi = math.log(tol_range[0]), math.log(tol_range[1])
        best = self.at_tolerance(math.exp(hi))
        if budget_fn(best) > target + 1e-12:
            # even the loosest tolerance keeps too much: finish with all-zero visual tokens at the deepest layers
            best = [0.0] * self.num_layers
            return best, math.exp(hi)
        best_tol = math.exp(hi)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            r = self.at_tolerance(math.exp(mid))
            if budget_fn(r) <= target + 1e-12:
                hi, best, best_tol = mid, r, math.exp(mid)
            else:
                lo = mid
        return best, best_tol
