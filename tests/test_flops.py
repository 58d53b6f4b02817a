"""Analytic FLOPs/KV bytes (schedsearch.flops) against real tiny transformers text decoders.

FlopCounterMode counts zero for CPU SDPA, so the models use ``attn_implementation="eager"``,
whose attention is two matmuls FlopCounterMode does count (the full n x n square).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from schedsearch.errors import ScheduleError
from schedsearch.flops import (
    BudgetReport,
    DecoderShape,
    budget_report,
    feasible_range,
    kv_cache_bytes,
    layer_flops,
    prefill_flops,
    token_keep_fraction,
    validate_budget,
)
from schedsearch.schedule import kept_counts

VOCAB = 64


def _qwen25_text():
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    # head_dim 16 -> rotary half-dim 8 = sum(mrope_section)
    cfg = Qwen2_5_VLTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=0, eos_token_id=1, pad_token_id=2, attn_implementation="eager",
    )
    return Qwen2_5_VLTextModel(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12,  # head_dim != hidden/heads
        bos_token_id=0, eos_token_id=1, pad_token_id=2, attn_implementation="eager",
    )
    return LlamaModel(cfg).eval()


BUILDERS = {"qwen2_5_vl_text": _qwen25_text, "llama": _llama}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request):
    torch.manual_seed(0)
    model = BUILDERS[request.param]()
    assert model.config._attn_implementation == "eager"
    return model


def _measured_per_layer(model, ids, **kw) -> tuple[list[float], float]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, **kw)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    per_layer = [counts.get(f"{root}.layers.{i}", 0) for i in range(len(model.layers))]
    return per_layer, counts["Global"]


def _close(analytic: float, measured: float, tol: float = 0.03) -> bool:
    return measured > 0 and abs(analytic - measured) / measured <= tol


def test_from_config_reads_real_fields(tiny):
    shape = DecoderShape.from_config(tiny.config)
    attn = tiny.layers[0].self_attn
    assert shape.num_layers == len(tiny.layers)
    assert shape.hidden == tiny.config.hidden_size
    assert shape.num_heads * shape.head_dim == attn.q_proj.out_features
    assert shape.num_kv_heads * shape.head_dim == attn.k_proj.out_features
    assert shape.intermediate == tiny.layers[0].mlp.gate_proj.out_features
    assert shape.mlp == "gated"


@pytest.mark.parametrize("n", [9, 40])
def test_layer_flops_match_flop_counter(tiny, n):
    shape = DecoderShape.from_config(tiny.config)
    ids = torch.randint(3, VOCAB, (1, n))
    per_layer, total = _measured_per_layer(tiny, ids, use_cache=False)
    analytic = layer_flops(shape, n, n)
    for got in per_layer:
        assert _close(analytic, got), (analytic, got)
    # nothing outside the decoder layers (embeddings, rope, final norm) is material
    assert _close(analytic * shape.num_layers, total)
    assert sum(prefill_flops(shape, n, 0, [1.0] * shape.num_layers)) == pytest.approx(analytic * shape.num_layers)


def _prune_hooks(model, n_text: int, counts: list[int]):
    """Emulate a schedule: layer l sees only the first n_text + counts[l] tokens (counts non-increasing)."""

    def make(keep):
        def hook(_module, args, kwargs):
            if args:
                args = (args[0][:, :keep],) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = kwargs["hidden_states"][:, :keep]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = mask[..., :keep, :keep]
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(t[..., :keep, :] for t in pe)
            pos = kwargs.get("position_ids")
            if isinstance(pos, torch.Tensor):
                kwargs["position_ids"] = pos[..., :keep]
            return args, kwargs

        return hook

    return [layer.register_forward_pre_hook(make(n_text + c), with_kwargs=True)
            for layer, c in zip(model.layers, counts, strict=False)]


def test_pruned_prefill_matches_flop_counter(tiny):
    shape = DecoderShape.from_config(tiny.config)
    n_text, n_visual = 7, 30
    ratios = [1.0, 0.5, 0.2][: shape.num_layers]
    counts = kept_counts(ratios, n_visual)
    assert counts == [30, 15, 6]
    handles = _prune_hooks(tiny, n_text, counts)
    try:
        per_layer, _ = _measured_per_layer(tiny, torch.randint(3, VOCAB, (1, n_text + n_visual)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    analytic = prefill_flops(shape, n_text, n_visual, ratios)
    assert analytic == [layer_flops(shape, n_text + c) for c in counts]
    for a, m in zip(analytic, per_layer, strict=False):
        assert _close(a, m), (a, m)
    assert _close(sum(analytic), sum(per_layer))


def test_kv_bytes_match_dynamic_cache(tiny):
    shape = DecoderShape.from_config(tiny.config)
    n_text, n_visual = 5, 20
    ids = torch.randint(3, VOCAB, (1, n_text + n_visual))
    with torch.no_grad():
        out = tiny(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    assert cache is not None and next(tiny.parameters()).dtype == torch.float32
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(shape, n_text, n_visual, [1.0] * shape.num_layers, dtype_bytes=4) == real
    # pruned: every layer holds fewer tokens
    half = kv_cache_bytes(shape, n_text, n_visual, [1.0] + [0.5] * (shape.num_layers - 1), dtype_bytes=4)
    assert half == sum(2 * shape.num_kv_heads * shape.head_dim * 4 * (n_text + c)
                       for c in kept_counts([1.0] + [0.5] * (shape.num_layers - 1), n_visual))
    assert half < real


QWEN7B = DecoderShape(hidden=3584, num_heads=28, num_kv_heads=4, head_dim=128, intermediate=18944, num_layers=28)


def test_budget_report_all_ones_and_monotonic():
    samples = [(60, 1000), (25, 400), (80, 0)]
    full = budget_report(QWEN7B, samples, [1.0] * 28)
    assert isinstance(full, BudgetReport)
    assert full.flops_ratio == full.kv_ratio == full.token_ratio == 1.0
    assert full.flops == full.flops_full and full.kv_bytes == full.kv_bytes_full
    prev = full
    for keep in (0.8, 0.5, 0.2, 0.1, 0.0):
        rep = budget_report(QWEN7B, samples, [1.0, 1.0] + [keep] * 26)
        for kind in ("flops", "kv", "tokens"):
            assert rep.value(kind) < prev.value(kind)
        prev = rep
    assert 0 < prev.flops_ratio < 1 and prev.token_ratio == pytest.approx(2 / 28)
    # the layer-0 drop-all schedule is the floor
    lo_f, hi = feasible_range(QWEN7B, samples, "flops")
    assert hi == 1.0 and 0 < lo_f < prev.flops_ratio
    assert feasible_range(QWEN7B, samples, "tokens") == (0.0, 1.0)
    # text only
    assert feasible_range(QWEN7B, samples, "kv")[0] == pytest.approx((60 + 25 + 80) / (60 + 1000 + 25 + 400 + 80))
    with pytest.raises(ScheduleError):
        full.value("latency")
    with pytest.raises(ScheduleError):
        feasible_range(QWEN7B, samples, "latency")


def test_fastv_formula_special_case():
    # MHA + plain 2-matrix FFN reduces to FastV's C(n) = 4nd^2 + 2n^2d + 2ndm, x2 for FLOPs/MAC on
    # the attention and FFN terms: projections 4 * (2nd^2), attention 2 * (2 n^2 d), FFN 2 * (2ndm).
    d, m, n = 64, 256, 50
    shape = DecoderShape(hidden=d, num_heads=4, num_kv_heads=4, head_dim=16, intermediate=m, num_layers=1, mlp="plain")
    assert layer_flops(shape, n) == 2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def test_token_keep_fraction_uses_contract_rounding():
    assert token_keep_fraction([1.0, 0.5, 0.25], 10) == pytest.approx((10 + 5 + 3) / 30)  # 2.5 -> 3
    assert token_keep_fraction([0.5], 0) == 1.0


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, float("nan"), "x", None])
def test_bad_budgets_raise(bad):
    with pytest.raises(ScheduleError) as err:
        validate_budget(bad)
    assert "\n" not in str(err.value)


def test_good_budget_and_bad_inputs():
    assert validate_budget("0.5") == 0.5 and validate_budget(1) == 1.0
    with pytest.raises(ScheduleError):
        validate_budget(0.5, kind="watts")
    with pytest.raises(ScheduleError):
        prefill_flops(QWEN7B, 10, 10, [1.0] * 3)  # wrong layer count
    with pytest.raises(ScheduleError):
        budget_report(QWEN7B, [], [1.0] * 28)
    with pytest.raises(ScheduleError):
        DecoderShape(hidden=8, num_heads=3, num_kv_heads=2, head_dim=4, intermediate=8, num_layers=1)
    assert not math.isnan(budget_report(QWEN7B, [(10, 0)], [0.5] * 28).token_ratio)
