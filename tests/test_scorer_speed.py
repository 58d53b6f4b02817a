"""The run-time fixes bench_runtime.py --scorers asked for keep each ranking's result: text_attention scores only
the text rows, mmtok's greedy coverage updates its gains incrementally."""

from __future__ import annotations

import torch


def test_text_attention_scores_only_the_text_rows_with_the_same_result(tiny_dir):
    """text_attention computes the text tokens' query rows only (bench_scorers: the n x n version cost 9 % of a
    real-width prefill); the mean over them equals the mean over the text rows of the full n x n attention."""
    from schedsearch.models import load_model
    from schedsearch.runtime import apply_schedule
    from schedsearch.runtime.scorers.attention import TextAttention
    from schedsearch.runtime.scorers.base import attention_rows, take_visual
    from schedsearch.testing.tiny import tiny_images

    ad = load_model(str(tiny_dir("qwen2_5_vl")))
    imgs = tiny_images(2, seed=4)
    batch = ad.prepare([[imgs[0]], [imgs[1]]], ["where is the red square ?", "colour ?"])
    seen = []

    class Spy(TextAttention):
        def __call__(self, ctx):
            got = super().__call__(ctx)
            bsz, n = ctx.text_mask.shape
            rows = attention_rows(ctx, torch.arange(n).expand(bsz, n), self.rope)
            w = ctx.text_mask.float()
            want = take_visual((rows * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0), ctx)
            seen.append((got, want))
            return got

    n = ad.num_layers
    with torch.no_grad(), apply_schedule(ad.model, {"keep_ratios": [1.0] + [0.4] * (n - 1),
                                                    "scorer": {"name": "text_attention", "params": {}}},
                                         adapter=ad) as handle:
        handle.scorer = Spy(rope=True)
        ad.model(**batch)
    assert seen
    for got, want in seen:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_mmtok_incremental_greedy_equals_the_full_recompute():
    """mmtok's greedy coverage updates the gains on the changed rows only (bench_scorers: 4-5 % of a real-width
    prefill before); the picks equal the plain loop that recomputes every gain at every step."""
    from schedsearch.runtime.scorers.mmtok import TIE, greedy_coverage

    def plain(cover, k):
        bsz, _, n = cover.shape
        scores, best = torch.zeros(bsz, n), torch.zeros(bsz, cover.shape[1])
        taken, rows = torch.zeros(bsz, n, dtype=torch.bool), torch.arange(bsz)
        for i in range(min(k, n)):
            gain = (cover - best[..., None]).clamp_min(0).sum(dim=1).masked_fill(taken, float("-inf"))
            top = gain.max(dim=1, keepdim=True).values
            pick = (gain >= top - TIE * top.abs()).float().argmax(dim=1)
            scores[rows, pick] = float(k - i)
            taken[rows, pick] = True
            best = torch.maximum(best, cover[rows, :, pick])
        return scores

    gen = torch.Generator().manual_seed(0)
    for bsz, m, n, k in [(2, 6, 120, 30), (1, 9, 200, 150), (3, 4, 50, 50)]:
        x = torch.nn.functional.normalize(torch.randn(bsz, n, 16, generator=gen), dim=-1)
        z = torch.nn.functional.normalize(torch.randn(bsz, m, 16, generator=gen), dim=-1)
        cover = torch.cat([torch.softmax(z @ x.transpose(1, 2) / 0.02, 2) / m,
                           0.5 * torch.softmax(x @ x.transpose(1, 2) / 0.2, 2) / n], dim=1)
        assert torch.equal(greedy_coverage(cover, k), plain(cover, k))
