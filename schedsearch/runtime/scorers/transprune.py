"""``transprune``: token transition variation accumulated over layers, plus instruction-guided attention.

TransPrune (Li et al., arXiv 2507.20630, Sec. 3); reference liaolea/TransPrune
``llava/model/modeling_llama_transprune.py`` (``compute_transf_weight``, ``transprune_rank_drop``). For every
decoder layer from ``start`` up to the drop (default -1: from the layer just before the prefill's first drop --
the reference accumulates its layers 7..12, 1-indexed, and first prunes after layer 7 -- so the window follows the
schedule's depth), and for both sublayers (attention, MLP) with input x (after the sublayer's norm) and output y
(before the residual):

    TV(token) = ||y|| / ||x||  *  exp(1 - cos(x, y)) / sum over the sequence of exp(1 - cos(x, y))

TTV = the sum of TV over those layers and both sublayers. At the drop the score of a visual token is
TTV / sum_visual(TTV) + IGA / sum_visual(IGA), where IGA (``iga``, default on) is the attention the instruction
tokens (the text after the image) pay to it in the drop layer, mean over heads and those tokens (the reference
computes it with the layer the pruned sequence enters next, as here).

Deliberate differences: the sequence-wide softmax skips padding tokens (the reference runs one sample at a time);
positions are not renumbered after a drop (the reference renumbers); a drop with no layer in the window (e.g.
before layer 0) ranks by IGA alone (all-zero scores, i.e. the earliest tokens, when ``iga`` is off too). With
``start = -1`` every layer is observed (the window is known only at the first drop); a fixed ``start`` observes
only the layers from there on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from schedsearch.runtime.scorers.base import PrefillView, ScoreContext, batch_rows, mean_attention, text_after_visual


def transition(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, n) TransPrune's transition weight of each token for one sublayer (``compute_transf_weight``)."""
    x, y = x.float(), y.float()
    length = y.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
    e = torch.exp(1.0 - torch.nn.functional.cosine_similarity(x, y, dim=-1)) * valid
    return length * e / e.sum(dim=1, keepdim=True).clamp_min(1e-12)


class TransPrune:
    name = "transprune"

    def __init__(self, start: int = -1, iga: bool = True):
        self.start = int(start)
        self.iga = bool(iga)
        self._acc: dict[int, torch.Tensor] = {}  # layer -> (B, N_prefill) TV per ORIGINAL position
        self._first: int | None = None  # the first drop layer of this prefill

    def attach(self, text_model: Any, view: Callable[[], PrefillView | None]) -> list:
        def observe(i: int, x: torch.Tensor, y: Any) -> None:
            v = view()
            if v is None:
                return
            y = y[0] if isinstance(y, tuple) else y
            with torch.no_grad():
                w = transition(x, y, v.valid)
                if i not in self._acc:
                    self._acc[i] = torch.zeros(w.shape[0], int(v.alive.max()) + 1, device=w.device)
                self._acc[i].scatter_add_(1, v.alive, w)

        handles = []
        for i, layer in enumerate(text_model.layers):
            if 0 <= self.start and i < self.start:
                continue
            handles.append(layer.self_attn.register_forward_hook(
                lambda m, a, kw, out, _i=i: observe(_i, a[0] if a else kw["hidden_states"], out), with_kwargs=True))
            handles.append(layer.mlp.register_forward_hook(lambda m, a, out, _i=i: observe(_i, a[0], out)))
        return handles

    def begin(self, batch_info: dict) -> None:
        self._acc = {}
        self._first = None

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        score = torch.zeros(bsz, v, device=ctx.visual_local.device)
        if self._first is None:
            self._first = ctx.layer_idx
        start = self.start if self.start >= 0 else max(0, self._first - 1)
        layers = [i for i in self._acc if start <= i < ctx.layer_idx]
        if layers and ctx.alive_orig is not None:
            acc = batch_rows(ctx, sum(self._acc[i] for i in layers).to(score.device))
            ttv = acc.gather(1, ctx.alive_orig.gather(1, ctx.visual_local).clamp(max=acc.shape[1] - 1))
            score = score + ttv / ttv.sum(dim=1, keepdim=True).clamp_min(1e-8)
        if self.iga:
            iga = mean_attention(ctx, text_after_visual(ctx))  # instruction-guided attention
            score = score + iga / iga.sum(dim=1, keepdim=True).clamp_min(1e-8)
        return score
