"""Importance scorers: which visual tokens survive a drop.

A scorer is called by the runtime just before decoder layer ``l`` runs, when the schedule says
the kept visual count falls at ``l``. It receives a :class:`ScoreContext` describing the tokens
currently alive and returns non-negative scores, one per alive visual token; the runtime keeps
the ``n_keep`` highest (stable ties: earlier token wins) and the scores double as recycling
weights.

Attention-based scorers compute the scoring rows from layer ``l``'s *own* q/k projections on its
input (after its input norm), so they work with every attention backend (SDPA and flash return
no attention weights) — see PLATFORM.md. This is a design choice: FastV (arXiv 2403.06764) ranks
with the attention map of layer K-1 after it ran; we rank with the attention layer K is about to
compute, which needs no state from the previous layer and costs one k-projection of the alive
tokens plus one query row per drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from schedsearch.errors import ScheduleError
from schedsearch.schedule import SCORER_NAMES


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
    #: some layers), from the adapter (``VLMAdapter.rotary``); None = rotate-half over the whole head (``_rope``)
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


class Scorer(Protocol):
    name: str

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:  # (B, V) >= 0
        ...


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # RoFormer (arXiv 2104.09864) eq. 34 in the rotate-half layout used by Llama/Qwen in transformers;
    # x: (B, H, n, hd), cos/sin: (B, n, hd). Qwen's 3-D mRoPE is already folded into cos/sin.
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _attention_rows(ctx: ScoreContext, query_local: torch.Tensor, rope: bool) -> torch.Tensor:
    """Head-averaged softmax attention of the given query positions over all alive keys.

    query_local: (B, Q) positions. Returns (B, Q, n). Causal: a query never attends to later keys.
    """
    layer = ctx.layer
    attn = layer.self_attn
    h = layer.input_layernorm(ctx.hidden_states)
    bsz, n, _ = h.shape
    hq = h.gather(1, query_local[..., None].expand(-1, -1, h.shape[-1]))
    q = attn.q_proj(hq).view(bsz, -1, ctx.num_heads, ctx.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(bsz, n, ctx.num_kv_heads, ctx.head_dim).transpose(1, 2)
    # optional per-head norms (Qwen3-style models); absent in the four supported families
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    if rope:
        qc = ctx.cos.gather(1, query_local[..., None].expand(-1, -1, ctx.cos.shape[-1]))
        qs = ctx.sin.gather(1, query_local[..., None].expand(-1, -1, ctx.sin.shape[-1]))
        rotate = ctx.rotary or _rope
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


def _take_visual(rows: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    return rows.gather(-1, ctx.visual_local)


class LastTokenAttention:
    """Attention that the last token pays to each visual token (FastV, arXiv 2403.06764, Sec. 4).

    ``rope=False`` ranks with un-rotated q/k: FEATHER (arXiv 2412.13180) shows RoPE biases the
    last token towards the bottom of the image.
    """

    name = "last_token_attention"

    def __init__(self, rope: bool = True):
        self.rope = bool(rope)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, n = ctx.key_valid.shape
        last = torch.full((bsz, 1), n - 1, dtype=torch.long, device=ctx.key_valid.device)
        return _take_visual(_attention_rows(ctx, last, self.rope)[:, 0], ctx)


class TextAttention:
    """Mean attention that all (non-padding) text tokens pay to each visual token (SparseVLM-like)."""

    name = "text_attention"

    def __init__(self, rope: bool = True):
        self.rope = bool(rope)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, n = ctx.text_mask.shape
        queries = torch.arange(n, device=ctx.text_mask.device).expand(bsz, n)
        rows = _attention_rows(ctx, queries, self.rope)  # (B, n, n)
        w = ctx.text_mask.float()
        mean = (rows * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
        return _take_visual(mean, ctx)


class UniformSpatial:
    """Evenly spaced survivors in token order (raster order = spatially uniform sampling).

    Keeps alive visual token floor((i + 0.5) * V / n_keep) for i < n_keep; score 1 for kept, 0 else.
    """

    name = "uniform"

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        scores = torch.zeros(bsz, v, device=ctx.visual_local.device)
        if ctx.n_keep > 0:
            idx = ((torch.arange(ctx.n_keep, dtype=torch.float64) + 0.5) * v / ctx.n_keep).floor().long()
            scores[:, idx.clamp(max=v - 1).to(scores.device)] = 1.0
        return scores


class Diverse:
    """Max-min diversity: keep the tokens that are least like the ones already kept.

    DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175, Sec. 3) casts pruning as the max-min diversity
    problem -- choose S, |S| = n_keep, maximizing min_{i != j in S} d(i, j) -- and solves it greedily:
    repeatedly add the token whose smallest distance to S is largest. There d is the cosine distance of the
    visual tokens' features; here the features are the states entering the drop layer, and we add a spatial
    term (our addition, weight ``spatial``; 0 gives DivPrune's distance):

        d(i, j) = 1 - cos(h_i, h_j) + spatial * ||p_i - p_j||_2

    with p = (row, col) of the token's cell in [0, 1) of its image (tokens of different images are sqrt(2)
    apart). The first pick is the token least similar to the mean visual token (the pivot choice of DART,
    Wen et al., arXiv 2502.11494, Sec. 3.2), so the result is deterministic. Score: n_keep - i for the i-th
    pick (earlier picks rank higher), 0 for the rest.
    """

    name = "diverse"
    needs_coords = True

    def __init__(self, spatial: float = 1.0):
        self.spatial = float(spatial)
        if not self.spatial >= 0:
            raise ScheduleError(f"scorer diverse: params.spatial={spatial!r} must be a number >= 0")

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        raw = ctx.hidden_states.gather(1, ctx.visual_local[..., None].expand(-1, -1, ctx.hidden_states.shape[-1]))
        raw = raw.float()
        h = torch.nn.functional.normalize(raw, dim=-1)
        dist = 1.0 - h @ h.transpose(1, 2)  # (B, V, V) cosine distance
        if self.spatial > 0:
            if ctx.coords is None:
                raise ScheduleError("scorer diverse needs the visual tokens' coordinates (ScoreContext.coords)")
            c = ctx.coords.to(h.device).float()
            img = c[..., 0]
            same = img[:, :, None] == img[:, None, :]  # (B, V, V): same image
            space = torch.cdist(c[..., 1:], c[..., 1:]).masked_fill(~same, 2**0.5)
            dist = dist + self.spatial * space
        scores = torch.zeros(bsz, v, device=h.device)
        n = min(ctx.n_keep, v)
        if n <= 0:
            return scores
        mean = torch.nn.functional.normalize(raw.mean(dim=1, keepdim=True), dim=-1)
        pick = (h * mean).sum(-1).argmin(dim=1)  # (B,) least like the mean token
        rows = torch.arange(bsz, device=h.device)
        nearest = torch.full((bsz, v), float("inf"), device=h.device)  # distance to the kept set
        for i in range(n):
            scores[rows, pick] = float(n - i)
            nearest = torch.minimum(nearest, dist[rows, pick])
            pick = nearest.masked_fill(scores > 0, float("-inf")).argmax(dim=1)
        return scores


class SeededRandom:
    """Seeded random ranking, identical for every sample with the same visual count (batch-invariant)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx)
        return torch.rand(v, generator=gen).to(ctx.visual_local.device).expand(bsz, v)


class External:
    """Scores supplied from outside (e.g. a vision-encoder importance map), per ORIGINAL visual token.

    ``importance`` is a (B, V_orig) tensor, or a callable ``f(batch_kwargs) -> (B, V_orig)`` that the
    runtime calls once per prefill with the base model's forward kwargs (pixel_values, grids, ...).
    """

    name = "external"

    def __init__(self, importance: torch.Tensor | Callable[[dict], torch.Tensor] | None = None):
        self.importance = importance
        self.current: torch.Tensor | None = None

    def begin(self, batch_kwargs: dict[str, Any]) -> None:
        imp = self.importance
        self.current = imp(batch_kwargs) if callable(imp) else imp

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        if self.current is None:
            raise ScheduleError(
                "scorer 'external' needs an importance map: pass apply_schedule(..., importance=TENSOR or CALLABLE)"
            )
        imp = self.current.to(ctx.visual_orig.device)
        if imp.shape[0] != ctx.visual_orig.shape[0]:
            raise ScheduleError(f"importance map has batch {imp.shape[0]} but the batch has {ctx.visual_orig.shape[0]}")
        return imp.gather(1, ctx.visual_orig).float().clamp_min(0)


def build_scorer(name: str, params: dict[str, Any] | None = None, importance: Any = None) -> Scorer:
    """Scorer from a schedule's ``scorer`` section (name + params)."""
    params = dict(params or {})
    if name == "last_token_attention":
        return LastTokenAttention(rope=params.get("rope", True))
    if name == "text_attention":
        return TextAttention(rope=params.get("rope", True))
    if name == "uniform":
        return UniformSpatial()
    if name == "random":
        return SeededRandom(seed=params.get("seed", 0))
    if name == "diverse":
        spatial = params.get("spatial")
        return Diverse(spatial=1.0 if spatial is None else spatial)
    if name == "external":
        return External(importance)
    raise ScheduleError(f"scorer.name={name!r} is not known: use one of {', '.join(SCORER_NAMES)}")
