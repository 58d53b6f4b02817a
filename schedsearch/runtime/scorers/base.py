"""What every ranking sees and returns: the :class:`ScoreContext` and the :class:`Scorer` protocol.

A scorer is called by the runtime just before decoder layer ``l`` runs, when the schedule says the kept
visual count falls at ``l``. It receives a :class:`ScoreContext` describing the tokens currently alive (for a
ragged batch: one call per group of samples with equal counts, ``ScoreContext.rows``) and
returns non-negative scores, one per alive visual token; the runtime keeps the ``n_keep`` highest (stable
ties: earlier token wins) and the scores double as recycling weights.

Shared helpers for attention-based rankings live here too: they compute the scoring rows from a decoder
layer's *own* q/k projections on its input (after its input norm), so they work with every attention
backend (SDPA and flash return no attention weights; see PLATFORM.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    #: vision-encoder maps per ORIGINAL visual token, filled only for scorers with ``vision_layers`` (see
    #: :func:`vision_map`): ``{(layer, kind): (B, V_orig[, d])}`` plus the geometry ``"layout"`` (0 = base view,
    #: k >= 1 = tile k, -1 = no spatial cell, e.g. LLaVA-NeXT's newline tokens), ``"image"`` and ``"cell"``
    #: (integer row, col in the view's grid); see ``VLMAdapter.vision_token_maps``
    vision: dict | None = None
    #: (B, n) ORIGINAL sequence position of every alive token (what observers, see :class:`Scorer`, index by)
    alive_orig: torch.Tensor | None = None
    #: number of visual tokens per sample before any drop of this prefill
    n_visual: int | None = None
    #: (B, V, 2) long (clip, frame) of the alive visual tokens -- the sample's video number and temporal patch, or
    #: (-1, 0) for image tokens; filled only for scorers with ``needs_time = True`` (and ``needs_coords``)
    time: torch.Tensor | None = None
    #: (B, V) long modality of the alive visual tokens: 1 = image, 2 = video
    modality: torch.Tensor | None = None
    #: {1: image count, 2: video count} kept at this drop when the schedule prunes modalities on their own
    #: (``modality_keep_ratios``); None = ``n_keep`` covers all visual tokens together
    n_keep_modality: dict[int, int] | None = None
    #: (B,) indices of these samples in the whole batch, when the runtime scores a ragged batch in rectangular
    #: sub-batches (samples grouped by visual count, alive visual count and n_keep); None = the whole batch.
    #: Per-prefill state a scorer keeps for the whole batch is read through :func:`batch_rows`.
    rows: torch.Tensor | None = None
    #: scratch space shared by ``__call__`` and ``merge`` of ONE drop (a plan computed once, used twice)
    scratch: dict = field(default_factory=dict)


class Scorer(Protocol):
    """A ranking. Only ``name`` and ``__call__`` are required; the runtime also uses, when a scorer has them:

    * ``needs_coords = True``: fill ``ctx.coords``. ``needs_time = True`` (with ``needs_coords``): fill
      ``ctx.time`` (video rankings: which clip and frame each token belongs to).
    * ``vision_layers(depth, global_layers) -> {layer: kinds}``: called once when the schedule is applied, with
      the vision encoder's depth and the layers whose attention is global (adapter ``vision_encoder_layers``);
      the runtime records those maps during every vision-encoder run (adapter ``vision_maps_hook``) and fills
      ``ctx.vision`` per original visual token. Kinds are those of ``schedsearch.models.vision_maps.KINDS``.
    * ``attach(text_model, view) -> [handles]``: called once at install with the decoder stack (``.layers``,
      ``.norm``); the scorer may put observation hooks on it (never changing outputs), registered after the
      runtime's own, so a layer pre-hook sees the survivors' inputs; ``view()`` returns the current prefill's
      :class:`PrefillView` or None (no pruning prefill running, or a decode step). The runtime removes the
      handles on exit.
    * ``begin(batch_info)``: called at the start of every prefill that prunes (reset per-prefill state).
    * ``merge(ctx, keep, scores) -> (B, V, D) | None``: new states for the alive visual tokens after the keep
      set is chosen (only rows where ``keep`` is True are used); lets a scorer fold pruned tokens into kept ones
      (VisionZip's contextual tokens, SparseVLM's recycling) without changing the kept count.
    """

    name: str

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:  # (B, V) >= 0
        ...


@dataclass
class PrefillView:
    """What an observer hook may know about the prefill it runs in (see ``Scorer.attach``)."""

    alive: torch.Tensor  # (B, n) original sequence positions of the tokens this layer runs on
    valid: torch.Tensor  # (B, n) bool: not padding
    visual: torch.Tensor  # (B, n) bool: visual tokens


def batch_rows(ctx: ScoreContext, t: torch.Tensor) -> torch.Tensor:
    """``t`` (B_whole, ...) -- state a scorer or observer kept for the whole batch -- at the samples of ``ctx``."""
    return t if ctx.rows is None else t.index_select(0, ctx.rows.to(t.device))


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
    logits = attention_logits(ctx, query_local, use_rope)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs.mean(dim=1)  # (B, Q, n)


def attention_logits(ctx: ScoreContext, query_local: torch.Tensor, use_rope: bool) -> torch.Tensor:
    """(B, H, Q, n) float32 scaled attention logits of the given queries over the alive keys, -inf where the layer's
    mask forbids the pair (causal, padding, windows): the rows :func:`attention_rows` takes the softmax of."""
    layer = ctx.layer
    attn = layer.self_attn
    h = layer.input_layernorm(ctx.hidden_states)
    bsz, n, _ = h.shape
    hq = h.gather(1, query_local[..., None].expand(-1, -1, h.shape[-1]))
    q = attn.q_proj(hq).view(bsz, -1, ctx.num_heads, ctx.head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:  # optional per-head norms (Qwen3-style models)
        q = attn.q_norm(q)
    k = layer_keys(ctx, use_rope, normed=h)
    if use_rope:
        qc = ctx.cos.gather(1, query_local[..., None].expand(-1, -1, ctx.cos.shape[-1]))
        qs = ctx.sin.gather(1, query_local[..., None].expand(-1, -1, ctx.sin.shape[-1]))
        q = (ctx.rotary or rope)(q, qc, qs)
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
    return logits.masked_fill(~allowed, float("-inf"))


def layer_keys(ctx: ScoreContext, use_rope: bool = True, normed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H_kv, n, hd) keys the drop layer computes for the alive tokens (what its KV cache would hold)."""
    attn = ctx.layer.self_attn
    h = ctx.layer.input_layernorm(ctx.hidden_states) if normed is None else normed
    bsz, n, _ = h.shape
    k = attn.k_proj(h).view(bsz, n, ctx.num_kv_heads, ctx.head_dim).transpose(1, 2)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    return (ctx.rotary or rope)(k, ctx.cos, ctx.sin) if use_rope else k


def take_visual(rows: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Columns of ``rows`` (..., n) at the alive visual tokens -> (..., V)."""
    return rows.gather(-1, ctx.visual_local)


def visual_states(ctx: ScoreContext) -> torch.Tensor:
    """(B, V, D) float32 states of the alive visual tokens entering the drop layer."""
    hs = ctx.hidden_states
    return hs.gather(1, ctx.visual_local[..., None].expand(-1, -1, hs.shape[-1])).float()


def text_after_visual(ctx: ScoreContext) -> torch.Tensor:
    """(B, n) bool: alive non-padding text tokens placed after the last alive visual token (the instruction).

    Falls back to all alive text tokens for a sample whose text all precedes its image.
    """
    n = ctx.text_mask.shape[1]
    pos = torch.arange(n, device=ctx.text_mask.device)
    last = ctx.visual_local.max(dim=1, keepdim=True).values  # a drop always has alive visual tokens
    after = ctx.text_mask & (pos[None, :] > last)
    return torch.where(after.any(dim=1, keepdim=True), after, ctx.text_mask)


def resolve_vision_layer(index: int, depth: int, global_layers: tuple[int, ...] | list[int]) -> int:
    """A vision-layer parameter (Python index, negative = from the end) -> the encoder layer whose maps are read.

    The index is clamped into the encoder (a profile written for a 24-layer CLIP runs on a 2-layer tower), then
    moved to the nearest layer with global attention (ties: the later one): Qwen2.5-VL's windowed blocks see only
    their window, and VisionZip/VisPruner for Qwen (LightCompress) read a full-attention block.
    """
    i = index + depth if index < 0 else index
    i = min(max(i, 0), depth - 1)
    layers = sorted(global_layers) or list(range(depth))
    return min(layers, key=lambda g: (abs(g - i), -g))


def vision_map(ctx: ScoreContext, layer: int, kind: str, scorer: str, non_spatial: str = "max") -> torch.Tensor:
    """The vision map ``kind`` of encoder layer ``layer`` at the alive visual tokens: (B, V) or (B, V, d), float32.

    Tokens without a spatial cell (LLaVA-NeXT's newlines; NaN in the map) get, per sample, the map's largest
    value (``non_spatial="max"``: kept first, as FasterVLM/VisPruner keep every newline), its smallest (``"min"``)
    or 0 (``"zero"``, vector maps always).
    """
    from schedsearch.errors import ScheduleError

    if ctx.vision is None or (layer, kind) not in ctx.vision:
        raise ScheduleError(f"scorer {scorer} needs the vision encoder's {kind!r} map of layer {layer}, which this "
                            "run did not record")
    m = ctx.vision[(layer, kind)].to(ctx.visual_orig.device).float()
    if m.dim() == 3:
        m = m.gather(1, ctx.visual_orig[..., None].expand(-1, -1, m.shape[-1]))
        return m.nan_to_num(0.0)
    m = m.gather(1, ctx.visual_orig)
    bad = m.isnan()
    if not bool(bad.any()):
        return m
    if non_spatial == "zero":
        return m.masked_fill(bad, 0.0)
    big = torch.finfo(m.dtype).max
    fill = m.masked_fill(bad, -big).max(dim=1, keepdim=True).values if non_spatial == "max" else \
        m.masked_fill(bad, big).min(dim=1, keepdim=True).values
    return torch.where(bad, fill.expand_as(m), m)


def mask_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) bool -> (idx (B, m), valid (B, m)) with m the largest count: each row's True positions in order,
    then (padding, ``valid`` False) its first False positions."""
    m = int(mask.sum(dim=1).max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = mask.gather(1, order)
    return order, valid


def mean_attention(ctx: ScoreContext, queries: torch.Tensor, use_rope: bool = True) -> torch.Tensor:
    """(B, V) attention the ``queries`` (B, n) bool tokens pay to each alive visual token, mean over heads and over
    those queries (the drop layer's own q/k; see :func:`attention_rows`). Only the query rows are computed."""
    idx, valid = mask_indices(queries)
    rows = attention_rows(ctx, idx, use_rope)  # (B, m, n)
    w = valid.float()
    return take_visual((rows * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1.0), ctx)


def tiered(values: torch.Tensor, first: torch.Tensor, second: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) scores in tiers: the ``first`` (B, k) tokens 2 + value (by ``values`` in [0, 1] among themselves),
    then the ``second`` (B, c) tokens 1, the rest 0 -- for rankings whose kept set is a union of two picks."""
    scores = torch.zeros_like(values)
    scores.scatter_(1, first, 2.0 + values.gather(1, first).clamp_min(0))
    if second is not None:
        scores.scatter_(1, second, 1.0)
    return scores
