"""``fastv``: FastV's rule -- the last token's attention returned by the layer BEFORE the drop.

FastV (Chen et al., arXiv 2403.06764, Sec. 4); reference pkunlp-icler/FastV,
``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py::fastv_forward``: layer K-1 runs
with ``output_attentions`` switched on; its attention map (softmax over all keys, causal) is averaged over heads, the
last query row is taken, sliced to the image keys, and the top ``round(V (1 - R))`` image tokens survive into
layer K. Layer K-1 is the last layer that ran on every token still alive.

Here the same row is computed from layer K-1's own q/k projections on its input (observed by a pre-hook, see
:class:`~schedsearch.runtime.scorers.observers.PreviousLayer`), so it works under SDPA/flash attention, which return
no weights. ``rope=False`` ranks with un-rotated q/k (FEATHER's criterion; the full FEATHER rule is ``feather``).

Deliberate differences: at K = 0 there is no earlier layer and layer 0's own attention ranks (FastV's code needs
K >= 1); the kept count follows the schedule's rounding (round half up; FastV's Python ``round`` rounds halves to
even, so the two can differ by one token when V (1 - R) ends in .5). ``last_token_attention`` is the variant that
ranks with the drop layer's OWN attention (PyramidDrop's choice).
"""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext, attention_rows, take_visual
from schedsearch.runtime.scorers.observers import ReadsPreviousLayer


def last_position(ctx: ScoreContext) -> torch.Tensor:
    """(B, 1) the last alive position (with left padding, every sample's last real token)."""
    bsz, n = ctx.key_valid.shape
    return torch.full((bsz, 1), n - 1, dtype=torch.long, device=ctx.key_valid.device)


class FastV(ReadsPreviousLayer):
    name = "fastv"

    def __init__(self, rope: bool = True):
        self.rope = bool(rope)
        super().__init__()

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        prev = self._prev.context(ctx)  # layer K-1's module, input and rotary tables (ctx itself at K = 0)
        return take_visual(attention_rows(prev, last_position(ctx), self.rope)[:, 0], ctx)
