"""DeepStack features under token dropping (Qwen3-VL).

DeepStack (Meng et al., arXiv 2406.04334) feeds features of intermediate vision-encoder blocks into
the first decoder layers: ``Qwen3VLTextModel.forward`` (transformers 5.24) receives ``visual_pos_masks`` (B, N)
and ``deepstack_visual_embeds`` (a list of (total visual tokens, D) tensors) and, right after decoder layer
``i``, does ``h = h.clone(); h[mask] = h[mask] + embeds[i]``. Both have the full sequence length, so once
tokens are dropped before one of those layers the stock addition no longer lines up.

Lifecycle, driven by the runtime (``ScheduleHandle``) for families whose ``FamilySpec.deepstack_kwargs`` names
the two kwargs:

1. ``take(kwargs)`` in the text model's pre-hook of a prefill that will prune: the two kwargs are moved out
   of the stock forward's reach (set to None) and kept here;
2. ``add(i, hidden, visual, cur_idx)`` in decoder layer ``i``'s forward hook: adds ``embeds[i]`` at the visual
   tokens alive after layer ``i`` (rows picked by their ORIGINAL visual rank), with exactly the stock
   arithmetic, so before the first drop the result is bitwise the stock one;
3. ``clear()`` at the next prefill / on removal.

A prefill that prunes nothing is left to the stock forward.
"""

from __future__ import annotations

from typing import Any

import torch


class DeepStack:
    """Holds one prefill's DeepStack features and adds them at the surviving visual positions."""

    def __init__(self, kwarg_names: tuple[str, ...]):
        self.mask_key, self.embeds_key = kwarg_names
        self.mask: torch.Tensor | None = None  # (B, N) bool, original sequence
        self.embeds: list[torch.Tensor] | None = None

    def clear(self) -> None:
        self.mask = self.embeds = None

    def take(self, kwargs: dict) -> bool:
        """Move the features out of ``kwargs`` (the text model's forward kwargs). True if there were any."""
        self.clear()
        embeds = kwargs.get(self.embeds_key)
        if embeds is None:
            return False
        self.mask, self.embeds = kwargs.get(self.mask_key), list(embeds)
        kwargs[self.embeds_key] = None
        kwargs[self.mask_key] = None
        return True

    def add(self, layer_idx: int, hidden: torch.Tensor, cur_idx: torch.Tensor | None) -> torch.Tensor | None:
        """``hidden`` (B, n, D) after decoder layer ``layer_idx`` plus that layer's features; None if it has none.

        ``cur_idx`` (B, n): original positions of the alive tokens (None: nothing dropped yet).
        """
        if self.embeds is None or layer_idx >= len(self.embeds):
            return None
        mask = self.mask.to(hidden.device)
        feats = self.embeds[layer_idx].to(hidden.device, hidden.dtype)
        if cur_idx is None:  # the stock arithmetic, verbatim in effect
            out = hidden.clone()
            out[mask, :] = out[mask, :] + feats
            return out
        counts = mask.long().sum(dim=1)  # visual tokens per sample (a ragged batch: different counts)
        start = counts.cumsum(0) - counts  # each sample's first row in the flat features
        rank = mask.long().cumsum(1) - 1  # original visual rank of each position
        alive_vis = mask.gather(1, cur_idx)  # (B, n); a ragged batch's filler slots get features too (never read)
        rows = rank.gather(1, cur_idx) + start[:, None]
        out = hidden.clone()
        out[alive_vis, :] = out[alive_vis, :] + feats[rows[alive_vis]]
        return out


def deepstack_post_hook(store: DeepStack, state: Any, layer_idx: int):
    """A decoder-layer forward hook adding ``store``'s features of ``layer_idx``; ``state()`` gives the alive
    original positions (or None) and whether this forward is a pruning prefill."""

    def hook(module: Any, args: tuple, output: Any) -> Any:
        active, cur_idx = state()
        if not active:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = store.add(layer_idx, hidden, cur_idx)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook
