"""Observation hooks shared by decoder-side rankings (see ``Scorer.attach`` in base.py).

:class:`PreviousLayer` lets a ranking at drop layer ``l`` use layer ``l - 1`` -- the last layer that ran on every
token still alive -- the way the references do (DART reads layer K-1's keys, SparseVLM and TransPrune the attention
of the layer whose output they prune). Lifecycle::

    prev = PreviousLayer()
    handles = prev.attach(text_model, view)   # a pre-hook on every decoder layer (after the runtime's own)
    prev.begin()                              # every pruning prefill
    ctx_prev = prev.context(ctx)              # at a drop: ctx with layer l-1's module, input and rotary tables

The hook keeps a reference to the last layer's input only during a pruning prefill (``view()`` is not None), so
it holds at most one extra activation and nothing across batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from schedsearch.runtime.scorers.base import PrefillView, ScoreContext, batch_rows


class PreviousLayer:
    def __init__(self) -> None:
        self.last: tuple[int, Any, torch.Tensor, Any] | None = None

    def attach(self, text_model: Any, view: Callable[[], PrefillView | None]) -> list:
        def pre(i: int, module: Any, args: tuple, kwargs: dict) -> None:
            if view() is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            self.last = (i, module, h, kwargs.get("position_embeddings"))
            return None

        return [layer.register_forward_pre_hook(lambda m, a, k, _i=i: pre(_i, m, a, k), with_kwargs=True)
                for i, layer in enumerate(text_model.layers)]

    def begin(self) -> None:
        self.last = None

    def context(self, ctx: ScoreContext) -> ScoreContext:
        """``ctx`` as seen by layer ``ctx.layer_idx - 1`` (same alive tokens); ``ctx`` itself at layer 0 or when the
        previous layer was not observed (e.g. a scorer used without ``apply_schedule``)."""
        last = self.last
        if last is None or last[0] != ctx.layer_idx - 1 or last[2].shape[1] != ctx.hidden_states.shape[1]:
            return ctx
        i, module, h, pe = last
        bsz = h.shape[0]  # the whole batch: a ragged batch's sub-batch takes its rows
        cos, sin = (batch_rows(ctx, t.expand(bsz, *t.shape[1:])) for t in pe) if pe is not None else (ctx.cos, ctx.sin)
        h = batch_rows(ctx, h)
        return dataclasses.replace(ctx, layer=module, layer_idx=i, hidden_states=h, cos=cos, sin=sin, scratch={})


class ReadsPreviousLayer:
    """Base of the scorers that rank with layer l-1 at a drop before layer l (FastV, FEATHER, DART): installs
    the :class:`PreviousLayer` observer with the runtime's hooks and resets it at every pruning prefill."""

    def __init__(self) -> None:
        self._prev = PreviousLayer()

    def attach(self, text_model: Any, view: Callable[[], PrefillView | None]) -> list:
        return self._prev.attach(text_model, view)

    def begin(self, batch_info: dict) -> None:
        self._prev.begin()
