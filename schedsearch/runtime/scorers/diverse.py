"""``diverse``: max-min diversity of the visual tokens' states, plus a spatial term (ours).

DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175, Sec. 3) casts pruning as the max-min diversity problem --
choose S, |S| = n_keep, maximizing min_{i != j in S} d(i, j) -- and solves it greedily: repeatedly add the
token whose smallest distance to S is largest. There d is the cosine distance of the visual tokens' features;
here the features are the states entering the drop layer, and we add a spatial term (weight ``spatial``;
0 gives DivPrune's distance):

    d(i, j) = 1 - cos(h_i, h_j) + spatial * ||p_i - p_j||_2

with p = (row, col) of the token's cell in [0, 1) of its image (tokens of different images are sqrt(2) apart).
The first pick is the token least similar to the mean visual token (the pivot choice of DART, Wen et al.,
arXiv 2502.11494, Sec. 3.2); DivPrune's reference code picks first the token whose nearest neighbour is
farthest. Score: n_keep - i for the i-th pick (earlier picks rank higher), 0 for the rest.
"""

from __future__ import annotations

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext


class Diverse:
    name = "diverse"
    needs_coords = True

    def __init__(self, spatial: float = 1.0):
        self.spatial = float(spatial)
        if not self.spatial >= 0:
            raise ScheduleError(f"scorer diverse: params.spatial={spatial!r} must be a number >= 0")

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        raw = ctx.hidden_states.gather(1, ctx.visual_local[..., None].expand(-1, -1, ctx.hidden_states.shape[-1]))
        raw = raw.float()
        h = torch.nn.functional.normalize(raw, dim=-1)
        dist = 1.0 - h @ h.transpose(1, 2)  # (B, V, V) cosine distance
        if self.spatial > 0:
            if ctx.coords is None:
                raise ScheduleError("scorer diverse needs the visual tokens' coordinates (ScoreContext.coords)")
            c = ctx.coords.to(h.device).float()
            img = c[..., 0]
            same = img[:, :, None] == img[:, None, :]  # (B, V, V): same image
            space = torch.cdist(c[..., 1:], c[..., 1:]).masked_fill(~same, 2**0.5)
            dist = dist + self.spatial * space
        scores = torch.zeros(bsz, v, device=h.device)
        n = min(ctx.n_keep, v)
        if n <= 0:
            return scores
        mean = torch.nn.functional.normalize(raw.mean(dim=1, keepdim=True), dim=-1)
        pick = (h * mean).sum(-1).argmin(dim=1)  # (B,) least like the mean token
        rows = torch.arange(bsz, device=h.device)
        nearest = torch.full((bsz, v), float("inf"), device=h.device)  # distance to the kept set
        for i in range(n):
            scores[rows, pick] = float(n - i)
            nearest = torch.minimum(nearest, dist[rows, pick])
            pick = nearest.masked_fill(scores > 0, float("-inf")).argmax(dim=1)
        return scores
