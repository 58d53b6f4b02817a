"""Fixed baselines in the schedule format, budget-matched by solving their one free ratio.

* ``fastv`` (Chen et al., arXiv 2403.06764, Sec. 4): after layer K keep fraction 1 - R of the visual
  tokens: r_l = 1 for l < K, 1 - R for l >= K. Budget matched by solving R (K fixed, default 2).
* ``pdrop`` (Xing et al., PyramidDrop, arXiv 2410.17247, Sec. 3): stages at fixed depths (8/16/24 of
  32 layers -> L/4, L/2, 3L/4); stage i keeps lambda^i of the original tokens. Budget matched by
  solving lambda (paper default 0.5).
* ``uniform``: the same keep ratio at every layer from layer 0 (prune before the decoder).
"""

from __future__ import annotations

from collections.abc import Sequence

from schedsearch.search.budget import BudgetFn, InfeasibleBudget, solve_increasing


def fastv_ratios(num_layers: int, k: int, r: float) -> list[float]:
    return [1.0 if i < k else 1.0 - r for i in range(num_layers)]


def pdrop_stage_layers(num_layers: int) -> list[int]:
    """PyramidDrop's [8, 16, 24] of 32 scaled to this depth."""
    return sorted({max(1, min(num_layers - 1, round(num_layers * q))) for q in (0.25, 0.5, 0.75)})


def pdrop_ratios(num_layers: int, stages: Sequence[int], lam: float) -> list[float]:
    out = []
    for i in range(num_layers):
        passed = sum(1 for s in stages if i >= s)
        out.append(lam**passed)
    return out


def uniform_ratios(num_layers: int, r: float) -> list[float]:
    return [r] * num_layers


def fastv(num_layers: int, budget_fn: BudgetFn, target: float, k: int = 2) -> tuple[list[float], dict]:
    """Budget-matched FastV: solve the kept fraction 1 - R; if even R = 1 at layer K is over budget,
    K is lowered (recorded in the params) until the budget is met."""
    last: InfeasibleBudget | None = None
    for kk in range(k, -1, -1):
        try:
            keep = solve_increasing(lambda x, kk=kk: budget_fn(fastv_ratios(num_layers, kk, 1.0 - x)), target, 0.0, 1.0)
        except InfeasibleBudget as err:
            last = err
            continue
        return fastv_ratios(num_layers, kk, 1.0 - keep), {"K": kk, "R": 1.0 - keep}
    raise InfeasibleBudget(f"fastv cannot meet budget {target}: {last}")


def pdrop(num_layers: int, budget_fn: BudgetFn, target: float, stages: Sequence[int] | None = None
          ) -> tuple[list[float], dict]:
    """Budget-matched PyramidDrop. With the default stages a small budget can be out of reach (the
    first quarter of the layers runs on every token); then the stages are moved proportionally
    earlier (scale recorded in the params) until the budget is met."""
    if stages is not None:
        scales = [1.0]
    else:
        scales = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    last: InfeasibleBudget | None = None
    for scale in scales:
        st = list(stages) if stages is not None else sorted({round(s * scale) for s in pdrop_stage_layers(num_layers)})
        try:
            lam = solve_increasing(lambda x, st=st: budget_fn(pdrop_ratios(num_layers, st, x)), target, 0.0, 1.0)
        except InfeasibleBudget as err:
            last = err
            continue
        return pdrop_ratios(num_layers, st, lam), {"stages": st, "lambda": lam, "stage_scale": scale}
    raise InfeasibleBudget(f"pdrop cannot meet budget {target}: {last}")


def uniform(num_layers: int, budget_fn: BudgetFn, target: float) -> tuple[list[float], dict]:
    r = solve_increasing(lambda x: budget_fn(uniform_ratios(num_layers, x)), target, 0.0, 1.0)
    return uniform_ratios(num_layers, r), {"r": r}


BASELINES = {"fastv": fastv, "pdrop": pdrop, "uniform": uniform}
