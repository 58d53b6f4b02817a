"""Analytic decoder prefill FLOPs and KV-cache bytes for Qwen2.5-VL-7B text shapes.

1,000 visual + 60 text tokens, uniform FastV-like schedules: every visual token kept in
layers 0-1, then keep ratio r from layer 2 on. Pure arithmetic (schedsearch.flops), no model.

    python studies/bench_flops_shapes.py
"""

from __future__ import annotations

from schedsearch.flops import DecoderShape, budget_report, kv_cache_bytes, prefill_flops
from schedsearch.schedule import kept_counts

SHAPE = DecoderShape(hidden=3584, num_heads=28, num_kv_heads=4, head_dim=128, intermediate=18944, num_layers=28)
N_TEXT, N_VISUAL, START = 60, 1000, 2
KEEPS = (1.0, 0.5, 0.2, 0.1)


def schedule(keep: float) -> list[float]:
    return [1.0] * START + [keep] * (SHAPE.num_layers - START)


def main() -> None:
    print(f"Qwen2.5-VL-7B text decoder: {SHAPE}")
    print(f"{N_TEXT} text + {N_VISUAL} visual tokens; keep ratio r from layer {START} on; bf16 KV (2 bytes)\n")
    scheds = {k: schedule(k) for k in KEEPS}
    per_layer = {k: prefill_flops(SHAPE, N_TEXT, N_VISUAL, s) for k, s in scheds.items()}
    counts = {k: kept_counts(s, N_VISUAL) for k, s in scheds.items()}
    kv_per_token = 2 * SHAPE.num_kv_heads * SHAPE.head_dim * 2

    head = "layer " + "".join(f"| r={k:<4} tokens  GFLOPs  KV MiB " for k in KEEPS)
    print(head)
    print("-" * len(head))
    for layer in range(SHAPE.num_layers):
        cells = []
        for k in KEEPS:
            n = N_TEXT + counts[k][layer]
            cells.append(f"| {n:>11d} {per_layer[k][layer] / 1e9:7.1f} {n * kv_per_token / 2**20:7.2f} ")
        print(f"{layer:>5} " + "".join(cells))
    print("-" * len(head))

    print(f"\n{'r':>5} {'TFLOPs':>8} {'FLOPs':>7} {'KV MiB':>8} {'KV':>7} {'tokens':>7}")
    for k, s in scheds.items():
        rep = budget_report(SHAPE, [(N_TEXT, N_VISUAL)], s)
        kv = kv_cache_bytes(SHAPE, N_TEXT, N_VISUAL, s)
        print(f"{k:>5} {rep.flops / 1e12:8.2f} {rep.flops_ratio:7.1%} {kv / 2**20:8.1f} "
              f"{rep.kv_ratio:7.1%} {rep.token_ratio:7.1%}")
    print("\nFLOPs/KV/tokens are ratios to r=1.0; 'tokens' is the layer-averaged kept visual fraction.")


if __name__ == "__main__":
    main()
