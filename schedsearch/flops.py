"""Analytic decoder prefill FLOPs and KV-cache bytes under a visual-token pruning schedule.

Pure arithmetic (no torch import): usable from the search loop, the CLI and reports.

Source of the formula: FastV (Chen et al., arXiv 2403.06764) counts one decoder layer with
n tokens, hidden size d and FFN width m as C(n) = 4·n·d² + 2·n²·d + 2·n·d·m (multiply-adds
x2 folded in the paper's own way, full multi-head attention, two-matrix FFN). Qwen2/2.5,
Llama and Mistral use grouped-query attention (K/V projections of width Hkv·hd, not d) and a
three-matrix SwiGLU FFN, so this module counts from the real projection shapes instead:

    q_proj, o_proj   2 · n · d · (H·hd)        each
    k_proj, v_proj   2 · n · d · (Hkv·hd)      each
    QK^T and A·V     2 · 2 · H · hd · n_q · n_kv   (the full square, see ``layer_flops``)
    MLP              2 · n · d · m · 3 (gated: gate/up/down) or · 2 (plain: up/down)

Mixture-of-experts layers (Qwen3-VL-MoE) count the ACTIVE parameters: the router (2 · n · d · E) plus
``top_k`` experts of width m_e per token (2 · n · d · m_e · 3 · top_k), the convention of the Switch
Transformer (Fedus et al., arXiv 2101.03961, Sec. 2: "FLOPs per token" follow the experts a token is routed
to) and what the expert loop of transformers computes. Sliding-window layers (Gemma 3) cost the full square at
prefill like the others -- eager and SDPA's math kernel compute every score and mask the ones outside the
window -- but their KV cache keeps only the last ``window - 1`` tokens (``DynamicSlidingWindowLayer``), which
``kv_cache_bytes`` counts.

FLOPs are 2 per multiply-add, the convention of ``torch.utils.flop_counter.FlopCounterMode``.
RMSNorm, RoPE, softmax, residual adds and the SiLU gate are elementwise, O(n·d), and are
ignored (well under 1% of a layer for any realistic shape). The LM head and the vision
tower are not part of the decoder prefill and are not counted.

The number of visual tokens a layer sees is ``schedsearch.schedule.kept_counts`` — the
contract's rounding rule — so FLOPs, KV bytes and the tokens the runtime drops agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from schedsearch.errors import ScheduleError
from schedsearch.schedule import kept_counts, modality_kept_counts

__all__ = [
    "BUDGET_KINDS",
    "BudgetReport",
    "DecoderShape",
    "budget_report",
    "feasible_range",
    "kv_cache_bytes",
    "layer_flops",
    "prefill_flops",
    "token_keep_fraction",
    "validate_budget",
]

BUDGET_KINDS = ("flops", "kv", "tokens")

@dataclass(frozen=True)
class DecoderShape:
    """The shapes of a decoder-only text model that determine its prefill cost."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    num_layers: int
    mlp: str = "gated"  # "gated": 3 matrices (SwiGLU), "plain": 2 matrices
    #: mixture of experts: number of experts E, experts per token, expert width, and the layers that are MoE
    #: (the others use the dense ``intermediate``); 0 experts = a dense model
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    moe_layers: tuple[int, ...] = ()
    #: sliding-window attention: the window and the layers that use it (their KV cache holds window - 1 tokens)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ScheduleError(f"DecoderShape.{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ScheduleError(
                f"DecoderShape.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.mlp not in ("gated", "plain"):
            raise ScheduleError(f"DecoderShape.mlp={self.mlp!r} must be 'gated' or 'plain'")
        if self.moe_layers and not (self.num_experts > 0 and 0 < self.experts_per_token <= self.num_experts
                                    and self.expert_intermediate > 0):
            raise ScheduleError(f"DecoderShape: MoE layers {self.moe_layers} need num_experts > 0, 0 < "
                                f"experts_per_token <= num_experts and expert_intermediate > 0")
        if self.sliding_layers and not (self.sliding_window and self.sliding_window > 1):
            raise ScheduleError(f"DecoderShape: sliding layers {self.sliding_layers} need sliding_window > 1, got "
                                f"{self.sliding_window!r}")
        for name in ("moe_layers", "sliding_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if bad:
                raise ScheduleError(f"DecoderShape.{name} has layer indices {bad} outside 0..{self.num_layers - 1}")

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: full attention)."""
        return self.sliding_window if layer in self.sliding_layers else None

    @classmethod
    def from_config(cls, config: Any, mlp: str | None = None) -> DecoderShape:
        """Read the shape from a transformers config (duck-typed).

        Accepts a text config (LlamaConfig, MistralConfig, Qwen2Config, Qwen2_5_VLTextConfig)
        or a multimodal config with ``get_text_config()``/``text_config``.
        ``num_key_value_heads`` defaults to ``num_attention_heads``; ``head_dim`` defaults to
        ``hidden_size // num_attention_heads``. All supported families use gated MLPs (SwiGLU / GeGLU),
        which is the default; pass ``mlp="plain"`` for a two-matrix FFN. Experts are read the way Qwen-MoE
        configs (Qwen3-VL-MoE) lay them out: ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
        MoE in layer l unless l is in ``mlp_only_layers`` or (l + 1) is not a multiple of ``decoder_sparse_step``.
        Sliding layers as transformers' caches find them: ``layer_types`` entries ``"sliding_attention"``, or
        every layer when there is no ``layer_types`` but a ``sliding_window``.
        """
        text = config
        getter = getattr(config, "get_text_config", None)
        if callable(getter):
            text = getter()
        elif getattr(config, "text_config", None) is not None:
            text = config.text_config

        def need(name: str) -> int:
            value = getattr(text, name, None)
            if value is None:
                raise ScheduleError(f"model config has no {name}: cannot count decoder FLOPs")
            return int(value)

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv = getattr(text, "num_key_value_heads", None)
        kv = heads if kv is None else int(kv)
        head_dim = getattr(text, "head_dim", None)
        head_dim = hidden // heads if head_dim is None else int(head_dim)
        layers = need("num_hidden_layers")
        experts = int(getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0)
        moe: dict[str, Any] = {}
        if experts > 0 and getattr(text, "moe_intermediate_size", None):
            step = int(getattr(text, "decoder_sparse_step", 1) or 1)
            dense = set(getattr(text, "mlp_only_layers", None) or ())
            moe = dict(num_experts=experts, experts_per_token=need("num_experts_per_tok"),
                       expert_intermediate=need("moe_intermediate_size"),
                       moe_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0))
        window = getattr(text, "sliding_window", None)
        types = getattr(text, "layer_types", None)
        sliding: tuple[int, ...] = ()
        if window:
            sliding = tuple(i for i in range(layers) if types is None or types[i] == "sliding_attention")
        return cls(
            hidden=hidden,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate=need("intermediate_size"),
            num_layers=layers,
            mlp=mlp or "gated",
            sliding_window=int(window) if sliding else None,
            sliding_layers=sliding,
            **moe,
        )


def layer_flops(shape: DecoderShape, n_q: int, n_kv: int | None = None, layer: int | None = None) -> float:
    """Forward FLOPs (2 per multiply-add) of one decoder layer (``layer``: its index, for MoE models whose
    layers differ; None = a dense layer).

    ``n_q`` tokens go through the projections and the MLP and attend to ``n_kv`` keys
    (``n_kv`` defaults to ``n_q``, the prefill case; decode is ``n_q=1``). The attention term
    2·2·H·hd·n_q·n_kv counts the full n_q x n_kv score matrix even for a causal prefill:
    eager attention (and FlopCounterMode counting it) computes the whole square and masks it.
    Norms, RoPE, softmax and activations are ignored (elementwise, <1%).
    """
    if n_kv is None:
        n_kv = n_q
    if n_q < 0 or n_kv < 0:
        raise ScheduleError(f"token counts must be >= 0, got n_q={n_q}, n_kv={n_kv}")
    d = shape.hidden
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    proj = 2.0 * n_q * d * (2 * q_width + 2 * kv_width)  # q, o + k, v
    attn = 2.0 * 2.0 * shape.num_heads * shape.head_dim * n_q * n_kv  # QK^T and A·V
    mats = 3 if shape.mlp == "gated" else 2
    if layer is not None and layer in shape.moe_layers:  # router + the top-k experts each token is routed to
        mlp = 2.0 * n_q * d * shape.num_experts + 2.0 * n_q * d * shape.expert_intermediate * mats \
            * shape.experts_per_token
    else:
        mlp = 2.0 * n_q * d * shape.intermediate * mats
    return proj + attn + mlp


def visual_layer_counts(keep_ratios: Sequence[float], n_visual: int, n_video: int = 0,
                        modality_ratios: Mapping[str, Sequence[float]] | None = None) -> list[int]:
    """Visual tokens entering each layer: ``kept_counts(keep_ratios, n_visual)``, or with ``modality_ratios`` (a
    schedule's ``modality_keep_ratios``, schema 1.4) the sum of the image (``n_visual - n_video`` tokens) and
    video (``n_video``) counts, each by the rounding rule on its own ratios (what the runtime keeps)."""
    if not modality_ratios:
        return kept_counts(list(keep_ratios), n_visual)
    if not 0 <= n_video <= n_visual:
        raise ScheduleError(f"token counts: n_video={n_video} must be in [0, n_visual={n_visual}]")
    per = modality_kept_counts(list(keep_ratios), modality_ratios, {"image": n_visual - n_video, "video": n_video})
    return [a + b for a, b in zip(per["image"], per["video"], strict=True)]


def _layer_tokens(shape: DecoderShape, n_text: int, n_visual: int, keep_ratios: Sequence[float],
                  n_video: int = 0, modality_ratios: Mapping[str, Sequence[float]] | None = None) -> list[int]:
    ratios = list(keep_ratios)
    if len(ratios) != shape.num_layers:
        raise ScheduleError(
            f"schedule has {len(ratios)} keep ratios but the decoder has {shape.num_layers} layers"
        )
    if n_text < 0 or n_visual < 0:
        raise ScheduleError(f"token counts must be >= 0, got n_text={n_text}, n_visual={n_visual}")
    return [n_text + k for k in visual_layer_counts(ratios, n_visual, n_video, modality_ratios)]


def prefill_flops(shape: DecoderShape, n_text: int, n_visual: int, keep_ratios: Sequence[float], *,
                  n_video: int = 0, modality_ratios: Mapping[str, Sequence[float]] | None = None) -> list[float]:
    """Per-layer prefill FLOPs: layer l runs on n_text + kept_counts(keep_ratios, n_visual)[l] tokens (with
    ``modality_ratios``: image and video tokens counted on their own, see :func:`visual_layer_counts`)."""
    tokens = _layer_tokens(shape, n_text, n_visual, keep_ratios, n_video, modality_ratios)
    return [layer_flops(shape, n, n, i) for i, n in enumerate(tokens)]


def kv_cache_bytes(
    shape: DecoderShape, n_text: int, n_visual: int, keep_ratios: Sequence[float], dtype_bytes: int = 2, *,
    n_video: int = 0, modality_ratios: Mapping[str, Sequence[float]] | None = None,
) -> int:
    """KV-cache size after prefill: sum over layers of 2 (K and V) · Hkv · hd · n_l · dtype_bytes, where a
    sliding-window layer holds n_l = min(tokens, window - 1)."""
    per_token = 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes
    total = 0
    for i, n in enumerate(_layer_tokens(shape, n_text, n_visual, keep_ratios, n_video, modality_ratios)):
        w = shape.window(i)
        total += per_token * (n if w is None else min(n, w - 1))
    return total


def token_keep_fraction(keep_ratios: Sequence[float], n_visual: int, *, n_video: int = 0,
                        modality_ratios: Mapping[str, Sequence[float]] | None = None) -> float:
    """Layer-averaged kept visual fraction, mean_l n_l / n_visual (1.0 when there are none)."""
    ratios = list(keep_ratios)
    if not ratios:
        raise ScheduleError("schedule has no keep ratios")
    if n_visual <= 0:
        return 1.0
    counts = visual_layer_counts(ratios, n_visual, n_video, modality_ratios)
    return sum(counts) / (len(counts) * n_visual)


@dataclass(frozen=True)
class BudgetReport:
    """Cost of a schedule over a set of samples, as ratios to the unpruned model and absolutes."""

    flops_ratio: float
    kv_ratio: float
    token_ratio: float
    flops: float  # pruned decoder prefill FLOPs, summed over samples
    flops_full: float
    kv_bytes: int  # pruned KV-cache bytes after prefill, summed over samples
    kv_bytes_full: int
    visual_tokens_kept: float  # layer-averaged kept visual tokens, summed over samples
    visual_tokens: int
    num_samples: int
    per_layer_flops: tuple[float, ...] = field(default=(), repr=False)

    def value(self, kind: str) -> float:
        """The ratio for a budget kind: "flops", "kv" or "tokens"."""
        if kind == "flops":
            return self.flops_ratio
        if kind == "kv":
            return self.kv_ratio
        if kind == "tokens":
            return self.token_ratio
        raise ScheduleError(f"budget kind {kind!r} is not one of {', '.join(BUDGET_KINDS)}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "flops_ratio": self.flops_ratio,
            "kv_ratio": self.kv_ratio,
            "token_ratio": self.token_ratio,
            "flops": self.flops,
            "flops_full": self.flops_full,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_full": self.kv_bytes_full,
            "visual_tokens_kept": self.visual_tokens_kept,
            "visual_tokens": self.visual_tokens,
            "num_samples": self.num_samples,
        }


def _counts(token_counts: Iterable[Sequence[int]]) -> list[tuple[int, int, int]]:
    """(n_text, n_visual, n_video) per sample; a pair (n_text, n_visual) has no video tokens."""
    out = [(int(c[0]), int(c[1]), int(c[2]) if len(c) > 2 else 0) for c in token_counts]
    if not out:
        raise ScheduleError("token_counts is empty: need at least one (n_text, n_visual) sample")
    return out


def budget_report(
    shape: DecoderShape,
    token_counts: Iterable[Sequence[int]],
    keep_ratios: Sequence[float],
    dtype_bytes: int = 2,
    modality_ratios: Mapping[str, Sequence[float]] | None = None,
) -> BudgetReport:
    """Aggregate cost of ``keep_ratios`` over samples given as (n_text, n_visual) pairs, or (n_text, n_visual,
    n_video) triples where ``n_video`` of the visual tokens are video tokens; ``modality_ratios`` (a schedule's
    ``modality_keep_ratios``) then counts image and video tokens on their own ratios, as the runtime keeps them.

    flops_ratio and kv_ratio are pruned/unpruned totals summed over samples (so long samples
    weigh more, as they do in wall time); token_ratio is kept visual tokens (layer-averaged)
    over visual tokens, summed over samples.
    """
    pairs = _counts(token_counts)
    ratios = list(keep_ratios)
    full = [1.0] * shape.num_layers
    flops = flops_full = 0.0
    kv = kv_full = 0
    kept = 0.0
    vis = 0
    per_layer = [0.0] * shape.num_layers
    mods = dict(modality_ratios or {})
    for n_text, n_visual, n_video in pairs:
        layer = prefill_flops(shape, n_text, n_visual, ratios, n_video=n_video, modality_ratios=mods)
        per_layer = [a + b for a, b in zip(per_layer, layer, strict=False)]
        flops += sum(layer)
        flops_full += sum(prefill_flops(shape, n_text, n_visual, full))
        kv += kv_cache_bytes(shape, n_text, n_visual, ratios, dtype_bytes, n_video=n_video, modality_ratios=mods)
        kv_full += kv_cache_bytes(shape, n_text, n_visual, full, dtype_bytes)
        kept += token_keep_fraction(ratios, n_visual, n_video=n_video, modality_ratios=mods) * n_visual
        vis += n_visual
    return BudgetReport(
        flops_ratio=flops / flops_full if flops_full else 1.0,
        kv_ratio=kv / kv_full if kv_full else 1.0,
        token_ratio=kept / vis if vis else 1.0,
        flops=flops,
        flops_full=flops_full,
        kv_bytes=kv,
        kv_bytes_full=kv_full,
        visual_tokens_kept=kept,
        visual_tokens=vis,
        num_samples=len(pairs),
        per_layer_flops=tuple(per_layer),
    )


def validate_budget(value: Any, kind: str | None = None) -> float:
    """Return ``value`` as a float if it is a usable budget ratio in (0, 1], else raise ScheduleError."""
    label = f"{kind} budget" if kind else "budget"
    if kind is not None and kind not in BUDGET_KINDS:
        raise ScheduleError(f"budget kind {kind!r} is not one of {', '.join(BUDGET_KINDS)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ScheduleError(f"{label}={value!r} is not a number; give a ratio in (0, 1], e.g. 0.5") from None
    if not 0 < number <= 1:  # also rejects NaN
        raise ScheduleError(
            f"{label}={value!r} is out of range; give a fraction of the unpruned cost in (0, 1], e.g. 0.5"
        )
    return number


def feasible_range(
    shape: DecoderShape, token_counts: Iterable[Sequence[int]], kind: str
) -> tuple[float, float]:
    """(smallest achievable ratio, 1.0) for a budget kind over these samples.

    The minimum is every visual token dropped before layer 0: the text tokens still cost
    FLOPs and KV, so a FLOPs or KV budget below it is infeasible; the token minimum is 0.
    """
    if kind not in BUDGET_KINDS:
        raise ScheduleError(f"budget kind {kind!r} is not one of {', '.join(BUDGET_KINDS)}")
    report = budget_report(shape, token_counts, [0.0] * shape.num_layers)
    return report.value(kind), 1.0
