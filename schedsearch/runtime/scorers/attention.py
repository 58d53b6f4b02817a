"""Rankings by the attention the text pays to each visual token, from the drop layer's own q/k.

* ``last_token_attention``: FastV's criterion (Chen et al., arXiv 2403.06764, Sec. 4): the attention the last
  token pays to each visual token. ``rope=False`` ranks with un-rotated q/k: FEATHER (Endo et al., arXiv
  2412.13180) shows RoPE biases the last token towards the bottom of the image.
* ``text_attention``: mean attention all (non-padding) text tokens pay to each visual token (SparseVLM-like).

Deliberate difference from the FastV reference code: these rank with the attention layer ``l`` is about to
compute on its input; FastV's code ranks with the attention map returned by layer ``K-1``.
"""

from __future__ import annotations

import torch

from schedsearch.runtime.scorers.base import ScoreContext, attention_rows, mean_attention, take_visual


class LastTokenAttention:
    name = "last_token_attention"

    def __init__(self, rope: bool = True):
        self.rope = bool(rope)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, n = ctx.key_valid.shape
        last = torch.full((bsz, 1), n - 1, dtype=torch.long, device=ctx.key_valid.device)
        return take_visual(attention_rows(ctx, last, self.rope)[:, 0], ctx)


class TextAttention:
    name = "text_attention"

    def __init__(self, rope: bool = True):
        self.rope = bool(rope)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        # only the text tokens' query rows: projecting and scoring every alive token's query (n x n) cost 9 % of a
        # real-width pruned prefill (studies/results/bench_scorers.md); the text rows give the same mean
        return mean_attention(ctx, ctx.text_mask, self.rope)
