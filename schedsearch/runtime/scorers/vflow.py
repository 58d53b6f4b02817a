"""``vflow``: VFlowOpt's ranking and its vision-stage recycling (Yang et al., arXiv 2508.05211, Sec. 3.2-3.3).

Reference sihany077/VFlowOpt (non-commercial licence: read for the rules, nothing copied):
``multimodal_encoder/siglip_encoder.py`` (importance map) and ``language_model/llava_qwen_training_free.py``
(recycling, the "token merging" block).

* Importance: the map of :mod:`schedsearch.runtime.importance` -- the context relevance of each token to the
  vision encoder's "global" tokens (those receiving more than ``t`` times the mean attention) plus ``alpha`` times
  the softmax of the patch entropies (log2, as the reference). Where no token passes the threshold the reference
  averages an empty set (NaN); here the most-attended token is the global one.
* Recycling, at the FIRST drop only (the reference merges at the vision stage; the LLM stages only rank): the
  tokens that fall out are grouped by cells of ``cell`` x ``cell`` tokens of their image; each group is replaced by
  its most important member, which stays, carrying the group's importance-weighted mean state. ``cell = 0``: no
  recycling.

The reference prunes ``round(V (1 - r)) + int(V / m^2)`` tokens and keeps one representative per non-empty cell,
so its kept count varies with the image; here it is the schedule's exact count: the top t tokens by importance
are kept with the representatives of the cells of the others, t chosen so that t + (number of those cells) equals
the count (always possible when the count is at least the number of cells; below that, the most important
representatives are kept). Our own recycling -- pruned tokens merged into the best KEPT token of their cell, at
every drop -- is the schedule's ``recycling`` section.
"""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext, batch_rows
from schedsearch.runtime.scorers.external import External
from schedsearch.runtime.scorers.feather import grid_cells


def recycle_plan(imp: torch.Tensor, cells: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: (V,) importance, (V,) cell ids -> (kept (V,) bool, rep (V,) long: the representative each
    pruned token merges into, -1 for kept tokens that absorb nothing). Exactly ``n_keep`` tokens are kept."""
    v = imp.shape[0]
    order = torch.argsort(imp, descending=True, stable=True)
    n_keep = min(n_keep, v)

    def groups(t: int) -> int:
        return int(torch.unique(cells[order[t:]]).numel()) if t < v else 0

    lo, hi = 0, n_keep  # f(t) = t + groups(t) rises by 0 or 1 per step: find the largest t with f(t) <= n_keep
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid + groups(mid) <= n_keep:
            lo = mid
        else:
            hi = mid - 1
    t = lo
    kept = torch.zeros(v, dtype=torch.bool, device=imp.device)
    kept[order[:t]] = True
    rep = torch.full((v,), -1, dtype=torch.long, device=imp.device)
    rest = order[t:]  # by importance, descending: the first token of each cell is its representative
    seen: dict[int, int] = {}
    for j in rest.tolist():
        c = int(cells[j])
        if c not in seen:
            if int(kept.sum()) >= n_keep:  # fewer slots than cells: the least important cells are dropped
                seen[c] = -1
                continue
            seen[c] = j
            kept[j] = True
        elif seen[c] >= 0:
            rep[j] = seen[c]
    return kept, rep


class VFlow(External):
    name = "vflow"

    def __init__(self, importance=None, *, t: float = 1.0, alpha: float = 0.0, cell: int = 3):
        super().__init__(importance, source="vision_attention", t=t, alpha=alpha)
        self.cell = int(cell)
        self.needs_coords = self.cell > 0

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        super().__call__(ctx)  # the checks (a map, the right batch)
        raw = batch_rows(ctx, self.current.to(ctx.visual_orig.device)).gather(1, ctx.visual_orig).float()
        # alpha < 0 can make the map negative: shift it (order kept) instead of clamping, as scores are >= 0
        imp = raw - raw.min(dim=1, keepdim=True).values.clamp_max(0.0)
        first = ctx.n_visual is None or ctx.visual_local.shape[1] == ctx.n_visual
        if not first or self.cell <= 0 or ctx.coords is None or ctx.n_keep >= imp.shape[1]:
            return imp
        cells = grid_cells(ctx.coords) // self.cell
        ids = ctx.coords[..., 0].long().to(cells.device) * 1_000_000 + cells[..., 0] * 1000 + cells[..., 1]
        plans = [recycle_plan(imp[b], ids[b], ctx.n_keep) for b in range(imp.shape[0])]
        ctx.scratch["vflow"] = (plans, raw)  # the reference weights the merge by the raw importance
        kept = torch.stack([p[0] for p in plans])
        return torch.where(kept, 1.0 + imp / imp.max(dim=1, keepdim=True).values.clamp_min(1e-12), imp * 0.0)

    def merge(self, ctx: ScoreContext, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        if "vflow" not in ctx.scratch:
            return None
        plans, imp = ctx.scratch.pop("vflow")
        hs = ctx.hidden_states
        x = hs.gather(1, ctx.visual_local[..., None].expand(-1, -1, hs.shape[-1])).float()
        out = x.clone()
        for b, (_, rep) in enumerate(plans):
            for r in torch.unique(rep[rep >= 0]).tolist():
                members = torch.cat([torch.tensor([r], device=rep.device), (rep == r).nonzero()[:, 0]])
                w = imp[b, members].float()
                w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))
                out[b, r] = (w[:, None] * x[b, members]).sum(dim=0)
        return out
