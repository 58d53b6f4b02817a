"""``todre``: greedy k-center diversity at the first drop, task relevance at the later ones.

ToDRE (Li et al., arXiv 2505.18757 v1, "greedy k-center" version; no public code could be found, so this follows
the paper's description and every detail below not stated there is our choice):

* the first drop of a prefill (all visual tokens alive -- the paper prunes right after the vision encoder) keeps a
  diverse subset by greedy k-center (farthest-point traversal, Gonzalez 1985) on the cosine distance of the
  visual tokens' states: repeatedly add the token farthest from the chosen set. The first center is the token
  most relevant to the task (ours: the paper does not say how the traversal starts);
* every later drop ("information migration": the paper removes the task-irrelevant visual tokens inside the
  decoder, all of them at some layer) keeps the tokens the instruction attends to most: task relevance = the
  attention of the text after the image to each visual token in the drop layer, mean over heads and tokens.

Greedy k-center is the same traversal as DivPrune's max-min selection (``diverse`` at spatial 0) except for the
first pick.
"""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext, mean_attention, text_after_visual, visual_states


def k_center(dist: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center on (B, V, V) distances from ``first`` (B,): (B, V) scores, k - i for the i-th center."""
    bsz, v, _ = dist.shape
    scores = torch.zeros(bsz, v, device=dist.device)
    rows = torch.arange(bsz, device=dist.device)
    nearest = torch.full((bsz, v), float("inf"), device=dist.device)  # distance to the chosen centers
    pick = first
    for i in range(min(k, v)):
        scores[rows, pick] = float(k - i)
        nearest = torch.minimum(nearest, dist[rows, pick])
        pick = nearest.masked_fill(scores > 0, float("-inf")).argmax(dim=1)
    return scores


class ToDRE:
    name = "todre"

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        relevance = mean_attention(ctx, text_after_visual(ctx))  # (B, V)
        first_drop = ctx.n_visual is None or ctx.visual_local.shape[1] == ctx.n_visual
        if not first_drop:
            return relevance
        h = torch.nn.functional.normalize(visual_states(ctx), dim=-1)
        dist = 1.0 - h @ h.transpose(1, 2)
        return k_center(dist, relevance.argmax(dim=1), ctx.n_keep)
