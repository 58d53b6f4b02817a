"""Attention-mask helpers for families that build their own masks (Gemma 3's per-layer-type dict, sliding windows).

Used by :mod:`schedsearch.runtime.apply`:

* :func:`padding_mask` — the (B, L) padding mask of a forward. Most text models receive it as their
  ``attention_mask``; Gemma 3's base model turns it into a dict of 4-D masks (one per layer type) before the
  text model runs, so the runtime falls back to the 2-D mask the base model was called with.
* :func:`window_of` / :func:`cached_keys` — which keys a decoder layer's KV cache hands its attention at a
  decode step. A sliding-window cache layer (``DynamicSlidingWindowLayer``, ``is_sliding``) keeps only its
  last ``window - 1`` entries; after pruning those entries span more than ``window`` original positions, so
  the decode mask is built over exactly the cached keys and also applies the window on ORIGINAL positions
  (transformers' ``sliding_window_overlay``: a query at p sees key k iff p - k < window).
* :func:`mask_keys` — a layer's mask with the filler slots of a ragged batch disallowed as keys.
* :func:`layer_allowed` — the layer's own mask over the alive tokens as booleans (True = may attend), for the
  attention scorers, so they follow sliding windows and bidirectional image blocks.
"""

from __future__ import annotations

from typing import Any

import torch


def padding_mask(text_mask: Any, base_mask: Any, seq_len: int) -> torch.Tensor | None:
    """(B, L) bool padding mask (True = real token) from the text model's or else the base model's mask."""
    for m in (text_mask, base_mask):
        if isinstance(m, torch.Tensor) and m.dim() == 2 and m.shape[1] >= seq_len:
            return m.bool()
    return None


def window_of(cache: Any, layer_idx: int) -> int | None:
    """The sliding window of ``cache``'s layer ``layer_idx`` (None: the layer keeps every key)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if not getattr(layer, "is_sliding", False):
        return None
    window = getattr(layer, "sliding_window", None)
    return int(window) if window else None


def cached_keys(keys: torch.Tensor, q_len: int, window: int | None) -> torch.Tensor:
    """Original positions of the keys a layer attends to at a decode step.

    ``keys`` (B, K): every key the layer ever cached, in cache order (prefill survivors, then decoded tokens),
    the last ``q_len`` of them being this step's. A sliding cache returns its last ``window - 1`` earlier
    entries plus this step's (``DynamicSlidingWindowLayer.update``).
    """
    if window is None:
        return keys
    past = keys.shape[1] - q_len
    return keys[:, max(0, past - (window - 1)):]


def decode_allowed(keys: torch.Tensor, valid: torch.Tensor, total: int, q_len: int,
                   window: int | None) -> torch.Tensor:
    """(B, 1, q, K) bool: query positions total-q..total-1 may attend key positions ``keys`` (causal, not padding,
    inside the sliding window when there is one)."""
    qpos = torch.arange(total - q_len, total, device=keys.device)
    k = keys[:, None, None, :]
    q = qpos[None, None, :, None]
    allowed = valid[:, None, None, :] & (k <= q)
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed


def as_mask_like(allowed: torch.Tensor, like: Any, attn_implementation: str | None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``allowed`` in the format the layer expects: the dtype of the stock mask ``like`` if there is one, else
    bool for SDPA and an additive ``dtype`` mask (0 / dtype min) for eager attention."""
    if isinstance(like, torch.Tensor):
        if like.dtype == torch.bool:
            return allowed
        dtype = like.dtype
    elif attn_implementation is None or "sdpa" in str(attn_implementation):
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def mask_keys(mask: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, 1|H, q, K) 4-D or (B, K) 2-D, with the keys where ``ok`` (B, K) is False disallowed (the filler
    slots of a ragged batch, see runtime/apply.py): bool masks get False, additive ones the dtype's minimum."""
    if mask.dim() == 2:
        return mask & ok if mask.dtype == torch.bool else mask * ok.to(mask.dtype)
    k = ok[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & k
    return mask.masked_fill(~k, torch.finfo(mask.dtype).min)


def layer_allowed(mask: Any, idx: torch.Tensor) -> torch.Tensor | None:
    """The layer's 4-D mask (B|1, 1|H, N, N) gathered to the alive tokens ``idx`` (B, n) as bool (B, 1, n, n),
    or None when the layer has no 4-D tensor mask (plain causal)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    bsz, n = idx.shape
    m = mask[:, :1].expand(bsz, 1, *mask.shape[2:])
    m = m.gather(2, idx[:, None, :, None].expand(bsz, 1, n, m.shape[3]))
    m = m.gather(3, idx[:, None, None, :].expand(bsz, 1, n, n))
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
