"""VFlowOpt-style schedules (Yang et al., arXiv 2508.05211; paraphrased from the paper, no code taken).

Importance map (Sec. 3.2). From a late vision-encoder layer's head-averaged self-attention A
(rows = queries), the attention a token *receives* is ``r_j = mean_i A_ij``. Global tokens are
those with ``r_j > t * mean(r)``; the context relevance of token j is the mean attention the global
tokens pay to it, ``c_j = mean_{i in G} A_ij``; the importance is ``c_j + alpha * softmax(H)_j`` with
H the Shannon entropy of the patch's 256-bin grey histogram (alpha = 0 in all released configs).

Progressive pruning (Sec. 3.3): a stage right after the vision encoder keeps ``r_v``; decoder stages
at layers l1 and l2 keep ``r1`` and ``r2`` of what is left; ranking reuses the vision-side map; at the vision
stage each cell's pruned tokens are merged into its most important pruned token, which is kept (scorer
``vflow``, runtime/scorers/vflow.py).

Budget (Sec. 3.4): the paper solves r2 in closed form so the layer-averaged kept fraction equals the
target. For any budget kind (FLOPs included) we solve ``r_v`` by bisection instead: the budget is
non-decreasing in r_v and at r_v = 0 only text tokens remain, so every sampled (r1, r2, l1, l2) has a
solution whenever the budget is feasible at all. This is our design choice, not the paper's.
"""

from __future__ import annotations

from typing import Any

from schedsearch.runtime.importance import importance_for_batch, importance_from_attention, patch_entropy
from schedsearch.search.budget import BudgetFn, solve_increasing
from schedsearch.search.methods import Candidate, SearchContext


def stage_ratios(num_layers: int, r_v: float, l1: int, r1: float, l2: int, r2: float) -> list[float]:
    out = []
    for i in range(num_layers):
        r = r_v
        if i >= l1:
            r *= r1
        if i >= l2:
            r *= r2
        out.append(r)
    return out


def solve_stages(num_layers: int, budget_fn: BudgetFn, target: float, l1: int, r1: float, l2: int, r2: float
                 ) -> tuple[list[float], float]:
    r_v = solve_increasing(lambda x: budget_fn(stage_ratios(num_layers, x, l1, r1, l2, r2)), target, 0.0, 1.0)
    return stage_ratios(num_layers, r_v, l1, r1, l2, r2), r_v


def vflow_stage_layers(num_layers: int) -> tuple[int, int]:
    """The reference's LLM stages: fixed layers near 1/3 and 2/3 of the depth (9 and 18 of 28 there)."""
    l1 = min(max(1, round(num_layers / 3)), max(1, num_layers - 2))
    l2 = min(max(l1 + 1, round(2 * num_layers / 3)), num_layers - 1)
    return l1, max(l1, l2)


class VFlow:
    """VFlowOpt's search space (sihany077/VFlowOpt; default): threshold t in [0, 50], entropy weight alpha in
    [-1, 1], recycling cell side m in [3, 24] tokens (vision stage only: scorer ``vflow``), stage layers fixed near
    1/3 and 2/3 of the depth, relative ratios r1, r2 searched; r_v solved for the budget (our choice; the reference
    solves r2 in closed form for a token-average budget)."""

    name = "vflow"

    def suggest(self, trial: Any, ctx: SearchContext) -> Candidate:
        n = ctx.num_layers
        t = trial.suggest_float("t", 0.0, 50.0)
        alpha = trial.suggest_float("alpha", -1.0, 1.0)
        cell = trial.suggest_int("cell", 3, 24)
        l1, l2 = vflow_stage_layers(n)
        r1 = trial.suggest_float("r1", 0.05, 1.0)
        r2 = trial.suggest_float("r2", 0.05, 1.0)
        ratios, r_v = solve_stages(n, ctx.budget_fn, ctx.target, l1, r1, l2, r2)
        scorer = {"name": "vflow", "params": {"t": t, "alpha": alpha, "cell": cell}}
        return Candidate(ratios, {"r_v": r_v, "l1": l1, "l2": l2}, scorer, None)


class VFlowOurs:
    """schedsearch's earlier variant (kept for comparison, not registered as a method): t in [0.5, 4], alpha in
    [0, 0.5], stage layers l1 < l2 searched, recycling into the best KEPT token of each cell of an m x m grid per
    image at every drop (the schedule's ``recycling`` section)."""

    name = "vflow_ours"

    def suggest(self, trial: Any, ctx: SearchContext) -> Candidate:
        n = ctx.num_layers
        t = trial.suggest_float("t", 0.5, 4.0)
        alpha = trial.suggest_float("alpha", 0.0, 0.5)
        grid = trial.suggest_int("grid", 1, 8)
        l1 = trial.suggest_int("l1", 1, max(1, n // 2))
        l2 = trial.suggest_int("l2", min(l1 + 1, n - 1), n - 1)
        r1 = trial.suggest_float("r1", 0.05, 1.0)
        r2 = trial.suggest_float("r2", 0.05, 1.0)
        ratios, r_v = solve_stages(n, ctx.budget_fn, ctx.target, l1, r1, l2, r2)
        scorer = {"name": "external", "params": {"source": "vision_attention", "t": t, "alpha": alpha}}
        recycling = {"grid": grid, "weighting": "importance"} if grid > 1 else None
        return Candidate(ratios, {"r_v": r_v}, scorer, recycling)


__all__ = [
    "VFlow",
    "VFlowOurs",
    "vflow_stage_layers",
    "stage_ratios",
    "solve_stages",
    "importance_from_attention",
    "importance_for_batch",
    "patch_entropy",
]
