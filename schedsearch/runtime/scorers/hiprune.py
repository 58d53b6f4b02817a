"""``hiprune``: anchor tokens (mid-layer attention) + buffer (their grid neighbours) + registers (deep attention).

HiPrune (Liu et al., arXiv 2508.00553, Sec. 3); reference Danielement321/HiPrune
``LLaVA/llava/model/llava_arch.py::encode_images`` (LLaVA) and ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` (Qwen). Both
layers' maps are the *global* attention, the mean attention each token receives (``attn.mean(heads).mean(queries)``;
Qwen: summed over queries, 2x2-averaged -- the same ranking). With n = n_keep:

1. anchors: the k = round(n * alpha / 5) tokens with the largest attention in the object layer
   (``object_layer``, default 8 = the reference's 9th CLIP layer; the reference uses the 16th block on Qwen);
2. buffer: the 4-neighbours (up, down, left, right) of every anchor on the image grid;
3. registers: the remaining n - |anchors + buffer| slots go to the tokens with the largest attention in the deep
   layer (``deep_layer``, default -2, LLaVA's feature layer; the reference uses the last block on Qwen).

Deliberate differences: the reference finds neighbours as raster index +-1, +-width (wrapping across row ends and
clamped at the image border); here neighbours are true grid neighbours within the same image and view (LLaVA-NeXT:
base view and stitched tiles separately), so an anchor at a row end gets no neighbour from the next row. If anchors
and buffer exceed n (only for tiny n or alpha near 1), anchors come first, then buffer tokens by object attention.
LLaVA-NeXT newline tokens are never anchors and rank first among registers (the references keep every newline).
"""

from __future__ import annotations

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext, resolve_vision_layer, vision_map


def grid_neighbours(ctx: ScoreContext, seeds: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: alive visual tokens that are 4-neighbours of any ``seeds`` (B, k) token in the same view."""
    geo = ctx.vision or {}
    if "cell" not in geo:
        raise ScheduleError("the vision maps carry no grid cells (adapter vision_token_maps must return 'cell')")
    idx = ctx.visual_orig
    dev = idx.device
    cell = geo["cell"].to(dev).float().gather(1, idx[..., None].expand(-1, -1, 2))
    layout = geo["layout"].to(dev).gather(1, idx)
    group = geo["image"].to(dev).gather(1, idx) * 2 + (layout > 0).long()  # base view / stitched tiles apart
    pick = seeds[..., None]
    s_cell = cell.gather(1, pick.expand(-1, -1, 2))  # (B, k, 2)
    d = (cell[:, :, None, :] - s_cell[:, None, :, :]).abs()  # (B, V, k, 2)
    adjacent = ((d[..., 0] == 1) & (d[..., 1] == 0)) | ((d[..., 0] == 0) & (d[..., 1] == 1))
    same = group[:, :, None] == group.gather(1, seeds)[:, None, :]
    spatial = (layout >= 0)[:, :, None] & (layout.gather(1, seeds) >= 0)[:, None, :]
    return (adjacent & same & spatial).any(dim=2)


class HiPrune:
    name = "hiprune"

    def __init__(self, object_layer: int = 8, deep_layer: int = -2, alpha: float = 0.1):
        self.object_layer, self.deep_layer = int(object_layer), int(deep_layer)
        self.alpha = float(alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ScheduleError(f"scorer hiprune: params.alpha={alpha!r} must be in [0, 1]")
        self._layers: tuple[int, int] | None = None

    def vision_layers(self, depth: int, global_layers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        self._layers = (resolve_vision_layer(self.object_layer, depth, global_layers),
                        resolve_vision_layer(self.deep_layer, depth, global_layers))
        return {layer: ("received",) for layer in self._layers}

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        if self._layers is None:
            raise ScheduleError(f"scorer {self.name} was not installed by apply_schedule (no vision layer resolved)")
        obj = vision_map(ctx, self._layers[0], "received", self.name, non_spatial="min").clamp(0, 1)
        deep = vision_map(ctx, self._layers[1], "received", self.name, non_spatial="max").clamp(0, 1)
        k = min(round(ctx.n_keep * self.alpha / 5), obj.shape[1])  # HiPrune: round(N' * alpha / 5) anchors
        scores = deep.clone()  # registers: deep-layer attention
        if k > 0:
            anchors = torch.argsort(obj, dim=1, descending=True, stable=True)[:, :k]
            buffer = grid_neighbours(ctx, anchors)
            scores = torch.where(buffer, 2.0 + obj, scores)
            scores.scatter_(1, anchors, 3.0 + obj.gather(1, anchors))
        return scores
