"""``feather``: FEATHER's rule -- a stride grid united with RoPE-free last-token attention of the layer before.

FEATHER (Endo et al., arXiv 2412.13180, Sec. 5); reference markendo/FEATHER,
``prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py`` (``FastVLlamaModel.forward`` with
``fastv_predefined_mask="no_rope_s=3"`` and ``calculate_attention_weight``):

* the criterion: at the layer before the drop (K-1), the last token's query against the IMAGE keys only, q/k
  WITHOUT rotary embeddings (FEATHER's fix for RoPE's bias towards the bottom of the image), softmax over the image
  keys, mean over heads;
* first drop: the kept set is the union of the attention top-k and a uniform grid -- every ``stride``-th row and
  column of the image's token grid (``grid[::stride, ::stride]``);
* later drops (the reference allows exactly one more): attention top-k among the survivors only, no grid.

Here the kept count is the schedule's: at the first drop the grid tokens rank first (among themselves by
attention), then the other tokens by attention. When the count equals the reference's union size this is exactly
the reference's union (the top non-grid tokens by attention are the attention top-k minus the grid). The
reference's stage counts -- int(0.3 V) attention tokens plus the grid, then 0.09 of the stage-1 survivors
(``fastv_ratio`` 0.7 at K = [8, 16] of 32) -- are the ``feather`` baseline's profile (search/fixed.py).
A drop is "first" when every visual token of the prefill is still alive. At K = 0 layer 0's own q/k rank.
"""

from __future__ import annotations

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext, attention_logits
from schedsearch.runtime.scorers.fastv import last_position
from schedsearch.runtime.scorers.observers import ReadsPreviousLayer


def grid_cells(coords: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) (image, row, col in [0, 1)) -> (B, V, 2) integer (row, col) of each token in its image's grid."""
    out = torch.zeros(*coords.shape[:2], 2, dtype=torch.long, device=coords.device)
    for b in range(coords.shape[0]):
        for img in torch.unique(coords[b, :, 0]):
            sel = coords[b, :, 0] == img
            for d in (1, 2):
                vals = coords[b, sel, d].contiguous()
                out[b, sel, d - 1] = torch.searchsorted(torch.unique(vals), vals)
    return out


def image_key_attention(ctx: ScoreContext, use_rope: bool) -> torch.Tensor:
    """(B, V) the last token's attention over the alive visual keys only (softmax over them), mean over heads."""
    logits = attention_logits(ctx, last_position(ctx), use_rope)[:, :, 0]  # (B, H, n)
    vis = logits.gather(-1, ctx.visual_local[:, None, :].expand(-1, logits.shape[1], -1))
    return torch.softmax(vis, dim=-1).nan_to_num(0.0).mean(dim=1)


class Feather(ReadsPreviousLayer):
    name = "feather"
    needs_coords = True

    def __init__(self, stride: int = 3, rope: bool = False):
        self.stride, self.rope = int(stride), bool(rope)
        super().__init__()

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        att = image_key_attention(self._prev.context(ctx), self.rope)
        first = ctx.n_visual is None or ctx.visual_local.shape[1] == ctx.n_visual
        if not first or self.stride <= 0:
            return att
        if ctx.coords is None:
            raise ScheduleError("scorer feather needs the visual tokens' coordinates (ScoreContext.coords)")
        cell = grid_cells(ctx.coords)
        on_grid = ((cell % self.stride) == 0).all(dim=-1)
        return torch.where(on_grid, 2.0 + att, att)
