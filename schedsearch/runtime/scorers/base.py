"""What every ranking sees and returns: the :class:`ScoreContext` and the :class:`Scorer` protocol.

A scorer is called by the runtime just before decoder layer ``l`` runs, when the schedule says the kept
visual count falls at ``l``. It receives a :class:`ScoreContext` describing the tokens currently alive and
returns non-negative scores, one per alive visual token; the runtime keeps the ``n_keep`` highest (stable
ties: earlier token wins) and the scores double as recycling weights.

Shared helpers for attention-based rankings live here too: they compute the scoring rows from a decoder
layer's *own* q/k projections on its input (after its input norm), so they work with every attention
backend (SDPA and flash return no attention weights; see PLATFORM.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class ScoreContext:
    """What a scorer may look at. Shapes: B batch, n alive tokens, V alive visual tokens."""

    layer: torch.nn.Module  # the decoder layer about to run
    layer_idx: int
    hidden_states: torch.Tensor  # (B, n, D) input of the layer
    cos: torch.Tensor  # (B, n, head_dim) rotary cos of the alive tokens (original positions)
    sin: torch.Tensor
    key_valid: torch.Tensor  # (B, n) bool: False for padding
    visual_local: torch.Tensor  # (B, V) positions of alive visual tokens in the alive sequence
    visual_orig: torch.Tensor  # (B, V) index of each alive visual token in the ORIGINAL visual order
    text_mask: torch.Tensor  # (B, n) bool: alive non-padding text tokens
    n_keep: int  # how many visual tokens will be kept
    head_dim: int
    num_heads: int
    num_kv_heads: int
    #: (B, V, 3) (image index, row, col in [0, 1)) of the alive visual tokens; filled only for scorers that set
    #: ``needs_coords = True`` (the runtime asks the adapter's ``visual_coords`` once per prefill)
    coords: torch.Tensor | None = None
    #: (B, 1, n, n) bool, True = query may attend key: the layer's own attention mask over the alive tokens
    #: (sliding windows, bidirectional image blocks, padding); None = plain causal over ``key_valid``
    attention_mask: torch.Tensor | None = None
    #: ``(x, cos, sin) -> x`` rotated the way this layer rotates its q/k (partial or interleaved rotary, no RoPE on
    #: some layers), from the adapter (``VLMAdapter.rotary``); None = rotate-half over the whole head (``rope``)
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


class Scorer(Protocol):
    name: str

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:  # (B, V) >= 0
        ...


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # RoFormer (arXiv 2104.09864) eq. 34 in the rotate-half layout used by Llama/Qwen in transformers;
    # x: (B, H, n, hd), cos/sin: (B, n, hd). Qwen's 3-D mRoPE is already folded into cos/sin.
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention_rows(ctx: ScoreContext, query_local: torch.Tensor, use_rope: bool) -> torch.Tensor:
    """Head-averaged softmax attention of the given query positions over all alive keys.

    query_local: (B, Q) positions. Returns (B, Q, n) in float32. Causal: a query never attends to later keys.
    """
    layer = ctx.layer
    attn = layer.self_attn
    h = layer.input_layernorm(ctx.hidden_states)
    bsz, n, _ = h.shape
    hq = h.gather(1, query_local[..., None].expand(-1, -1, h.shape[-1]))
    q = attn.q_proj(hq).view(bsz, -1, ctx.num_heads, ctx.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(bsz, n, ctx.num_kv_heads, ctx.head_dim).transpose(1, 2)
    # optional per-head norms (Qwen3-style models)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    if use_rope:
        qc = ctx.cos.gather(1, query_local[..., None].expand(-1, -1, ctx.cos.shape[-1]))
        qs = ctx.sin.gather(1, query_local[..., None].expand(-1, -1, ctx.sin.shape[-1]))
        rotate = ctx.rotary or rope
        q = rotate(q, qc, qs)
        k = rotate(k, ctx.cos, ctx.sin)
    groups = ctx.num_heads // ctx.num_kv_heads
    k = k.repeat_interleave(groups, dim=1)  # GQA: (B, H, n, hd)
    scale = getattr(attn, "scaling", None) or ctx.head_dim**-0.5  # Gemma 3: query_pre_attn_scalar**-0.5
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Q, n)
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap:  # Gemma 2 (arXiv 2408.00118, Sec. 2): logits <- cap * tanh(logits / cap), as its eager attention does
        logits = torch.tanh(logits / cap) * cap
    keys = torch.arange(n, device=h.device)
    if ctx.attention_mask is not None:  # the layer's own mask (sliding window, image blocks), rows of the queries
        rows = ctx.attention_mask[:, 0].gather(1, query_local[..., None].expand(-1, -1, n))
        allowed = ctx.key_valid[:, None, None, :] & rows[:, None]
    else:
        allowed = ctx.key_valid[:, None, None, :] & (keys[None, None, None, :] <= query_local[:, None, :, None])
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs.mean(dim=1)  # (B, Q, n)


def take_visual(rows: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Columns of ``rows`` (..., n) at the alive visual tokens -> (..., V)."""
    return rows.gather(-1, ctx.visual_local)
