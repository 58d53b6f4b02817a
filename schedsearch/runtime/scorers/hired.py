"""``hired``: the budget split across an image's partitions (LLaVA-NeXT's base view and tiles) by importance.

HiRED (Arif et al., arXiv 2408.10945, Sec. 3); reference hasanar1f/HiRED
``transformers/src/transformers/models/llava_next/modeling_llava_next.py`` (``HiRED_token_selection``,
``HiRED_sub_img_budgets``; the single-partition version in ``llava/modeling_llava.py``). With b the image's
share of n_keep (images of a sample share it in proportion to their token counts), ``alpha`` (default 0.5):

1. the base view gets min(int(b * alpha), its size) tokens, the tiles the rest (at most their size);
2. the tiles' budget follows their visual importance: the int(P * (1 - alpha)) base-view tokens with the largest
   [CLS] attention in an early vision layer (``early_layer``, default 0) are mapped to the tile that covers them,
   and each tile gets floor(share * budget) (at most its size);
3. each partition keeps its tokens with the largest [CLS] attention in a late layer (``late_layer``, default -2).

Families without tiles (LLaVA-1.5, Qwen) have one partition per image: the top-b by late-layer attention, as the
reference's LLaVA-1.5 version. Slots lost to the floors (the reference loses them) are filled by late-layer
attention over the sample's remaining tokens, so exactly n_keep are kept; LLaVA-NeXT newline tokens come last (the
reference drops them all). Deliberate difference: the reference maps base-view tokens to tiles by reshaping the
raster order into (tiles_h, tiles_w, -1), which groups horizontal bands rather than the tiles' areas; here a
base-view token belongs to the tile of its nearest high-resolution token (by image coordinates).
"""

from __future__ import annotations

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext, resolve_vision_layer, vision_map


def shares(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``sizes``: floors, then the largest remainders (ties: earlier)."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    raw = [total * s / whole for s in sizes]
    out = [int(r) for r in raw]
    for i in sorted(range(len(sizes)), key=lambda i: (-(raw[i] - out[i]), i))[: total - sum(out)]:
        out[i] += 1
    return out


class HiRED:
    name = "hired"
    needs_coords = True

    def __init__(self, alpha: float = 0.5, early_layer: int = 0, late_layer: int = -2):
        self.alpha = float(alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ScheduleError(f"scorer hired: params.alpha={alpha!r} must be in [0, 1]")
        self.early_layer, self.late_layer = int(early_layer), int(late_layer)
        self._layers: tuple[int, int] | None = None

    def vision_layers(self, depth: int, global_layers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        self._layers = (resolve_vision_layer(self.early_layer, depth, global_layers),
                        resolve_vision_layer(self.late_layer, depth, global_layers))
        return {layer: ("cls",) for layer in self._layers}

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        if self._layers is None:
            raise ScheduleError(f"scorer {self.name} was not installed by apply_schedule (no vision layer resolved)")
        early = vision_map(ctx, self._layers[0], "cls", self.name, non_spatial="zero")
        late = vision_map(ctx, self._layers[1], "cls", self.name, non_spatial="zero").clamp(0, 1)
        layout = ctx.vision["layout"].to(late.device).gather(1, ctx.visual_orig)
        image = ctx.vision["image"].to(late.device).gather(1, ctx.visual_orig)
        chosen = torch.zeros_like(late, dtype=torch.bool)
        for b in range(late.shape[0]):  # loops over images and partitions, never over tokens
            ids = torch.unique(image[b][layout[b] >= 0])
            sizes = [int((image[b] == i).sum()) for i in ids.tolist()]
            for img, budget in zip(ids.tolist(), shares(min(ctx.n_keep, late.shape[1]), sizes), strict=True):
                chosen[b] |= self._image(ctx, b, image[b] == img, layout[b], early[b], late[b], budget)
        fill = torch.where(layout >= 0, 0.5 + 0.5 * late, torch.zeros_like(late))  # leftover slots; newlines last
        return torch.where(chosen, 2.0 + late, fill)

    def _image(self, ctx: ScoreContext, b: int, mine: torch.Tensor, layout: torch.Tensor, early: torch.Tensor,
               late: torch.Tensor, budget: int) -> torch.Tensor:
        """(V,) bool: the tokens HiRED keeps for one image of sample ``b`` with ``budget`` slots."""
        base = mine & (layout == 0)
        tiles = sorted(int(t) for t in torch.unique(layout[mine & (layout > 0)]).tolist())
        keep = torch.zeros_like(mine)
        n_base = int(base.sum())
        full = min(int(budget * self.alpha), n_base) if tiles else min(budget, n_base)
        keep |= _top(late, base, full)
        sub = min(budget - full, int((mine & (layout > 0)).sum()))
        if sub <= 0 or not tiles:
            return keep
        # visual importance of each tile: the early layer's top base tokens that fall into it
        top_early = _top(early, base, int(n_base * (1 - self.alpha)))
        hi = mine & (layout > 0)
        coords = ctx.coords[b].to(late.device)
        if int(top_early.sum()) and int(hi.sum()):
            d = torch.cdist(coords[top_early][:, 1:].float(), coords[hi][:, 1:].float())
            owner = layout[hi][d.argmin(dim=1)]
            counts = [int((owner == t).sum()) for t in tiles]
        else:
            counts = [0] * len(tiles)
        sizes = [int((hi & (layout == t)).sum()) for t in tiles]
        total = sum(counts)
        for t, count, size in zip(tiles, counts, sizes, strict=True):
            share = count / total if total else size / sum(sizes)
            keep |= _top(late, hi & (layout == t), min(int(share * sub), size))
        return keep


def _top(score: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
    """(V,) bool: the k tokens of ``among`` with the largest ``score`` (ties: earlier token)."""
    out = torch.zeros_like(among)
    if k <= 0:
        return out
    order = torch.argsort(score.masked_fill(~among, float("-inf")), descending=True, stable=True)[:k]
    return out.scatter(0, order, True) & among
