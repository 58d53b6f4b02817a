"""``divprune``: DivPrune's rule -- greedy max-min cosine diversity, seeded by the most isolated token.

DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175, Sec. 3, Alg. 1); reference vbdi/divprune,
``LLaVA/llava/model/llava_arch.py::DivPrune``: with d(i, j) = 1 - cos(x_i, x_j) over the visual tokens x entering
the LLM,

1. the first token is the one whose nearest neighbour is farthest: argmax_j of the second-smallest entry of column
   j of d (the smallest is the token's distance to itself);
2. then, repeatedly, the token whose smallest distance to the chosen set is largest (argmax, first on ties).

The reference prunes once, before layer 0 (``LAYER_INDEX=0``), keeping ``round(ratio V)`` tokens; the ``divprune``
baseline does the same (one keep ratio from layer 0 on). At a later drop the states entering that layer are used.
Score: n_keep - i for the i-th pick, 0 for the rest. Differences: the kept count follows the schedule's rounding
(round half up, the reference's Python ``round`` rounds halves to even); a token already chosen is never chosen
again (the reference could pick a duplicate when every remaining token has distance <= 0 to the set). Our own
variant with a spatial term and DART's first pick is ``diverse``.
"""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext, visual_states


def divprune_order(x: torch.Tensor, n_keep: int) -> torch.Tensor:
    """(B, V, D) features -> (B, n_keep) indices in DivPrune's pick order."""
    bsz, v, _ = x.shape
    n = min(n_keep, v)
    h = x.float() / x.float().norm(dim=-1, keepdim=True)
    dist = 1.0 - h @ h.transpose(1, 2)  # (B, V, V); symmetric, so rows and columns agree
    picks = torch.empty(bsz, n, dtype=torch.long, device=x.device)
    if n == 0:
        return picks
    rows = torch.arange(bsz, device=x.device)
    if v > 1:
        first = torch.topk(dist, 2, dim=1, largest=False).values[:, 1, :]  # (B, V): 2nd smallest per column
    else:
        first = dist[:, 0, :]
    pick = first.argmax(dim=1)
    chosen = torch.zeros(bsz, v, dtype=torch.bool, device=x.device)
    nearest = torch.full((bsz, v), float("inf"), device=x.device)
    for i in range(n):
        picks[:, i] = pick
        chosen[rows, pick] = True
        nearest = torch.minimum(nearest, dist[rows, pick])
        pick = nearest.masked_fill(chosen, float("-inf")).argmax(dim=1)
    return picks


class DivPrune:
    name = "divprune"

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        scores = torch.zeros(bsz, v, device=ctx.visual_local.device)
        n = min(ctx.n_keep, v)
        if n <= 0:
            return scores
        order = divprune_order(visual_states(ctx), n)
        rows = torch.arange(bsz, device=scores.device)[:, None]
        scores[rows, order] = torch.arange(n, 0, -1, device=scores.device, dtype=scores.dtype).expand(bsz, n)
        return scores
