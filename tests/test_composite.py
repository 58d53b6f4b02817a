"""The ``composite`` scorer (schema 1.3): rank fusion and FEATHER-style union of registered rankings."""

from __future__ import annotations

import pytest
import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers import build_scorer
from schedsearch.runtime.scorers.base import ScoreContext
from schedsearch.runtime.scorers.composite import rank_percentile


def _ctx(bsz: int, v: int, n_keep: int) -> ScoreContext:
    z = torch.zeros(bsz, v)
    return ScoreContext(layer=None, layer_idx=3, hidden_states=torch.zeros(bsz, v, 4), cos=z, sin=z,
                        key_valid=torch.ones(bsz, v, dtype=torch.bool),
                        visual_local=torch.arange(v).expand(bsz, v), visual_orig=torch.arange(v).expand(bsz, v),
                        text_mask=torch.zeros(bsz, v, dtype=torch.bool), n_keep=n_keep, head_dim=2, num_heads=1,
                        num_kv_heads=1)


def _kept(scores: torch.Tensor, n: int) -> set[int]:
    return set(torch.argsort(scores[0], descending=True, stable=True)[:n].tolist())


def test_rank_percentile_orders_and_breaks_ties_earlier_first():
    p = rank_percentile(torch.tensor([[0.2, 0.9, 0.2, 0.1]]))
    assert p.tolist() == [[pytest.approx(2 / 3), 1.0, pytest.approx(1 / 3), 0.0]]


def test_rank_mode_of_one_ranking_twice_is_that_ranking():
    ctx = _ctx(2, 40, 10)
    alone = build_scorer("random", {"seed": 7})(ctx)
    both = build_scorer("composite", {"parts": [{"name": "random", "params": {"seed": 7}},
                                                {"name": "random", "params": {"seed": 7}, "weight": 3}]})(ctx)
    assert _kept(both, 10) == _kept(alone, 10)


def test_rank_mode_weights_move_the_kept_set_towards_the_heavier_part():
    ctx = _ctx(1, 60, 12)
    r, u = build_scorer("random", {"seed": 1})(ctx), build_scorer("uniform")(ctx)
    heavy_r = build_scorer("composite", {"parts": [{"name": "random", "params": {"seed": 1}, "weight": 10},
                                                   {"name": "uniform"}]})(ctx)
    heavy_u = build_scorer("composite", {"parts": [{"name": "random", "params": {"seed": 1}},
                                                   {"name": "uniform", "weight": 10}]})(ctx)
    assert len(_kept(heavy_r, 12) & _kept(r, 12)) > len(_kept(heavy_u, 12) & _kept(r, 12))
    assert len(_kept(heavy_u, 12) & _kept(u, 12)) > len(_kept(heavy_r, 12) & _kept(u, 12))


def test_union_mode_takes_each_parts_share_then_fills():
    ctx = _ctx(2, 50, 12)
    comp = build_scorer("composite", {"mode": "union", "parts": [
        {"name": "random", "params": {"seed": 3}, "weight": 3}, {"name": "uniform", "weight": 1}]})
    out = comp(ctx)
    kept = _kept(out, 12)
    top_random = _kept(build_scorer("random", {"seed": 3})(ctx), 9)  # 3/4 of 12
    assert top_random <= kept
    # the rest is uniform's spacing for its own share (3 tokens), moved on where random took the spot
    spaced = _kept(build_scorer("uniform")(_ctx(2, 50, 3)), 3)
    assert len((kept - top_random) & spaced) >= 3 - len(spaced & top_random)
    assert out.min() >= 0 and torch.equal(out[0], out[1])
    # exactly n_keep tokens score above every other token (the runtime keeps exactly these)
    assert (out > 1.0).sum(1).tolist() == [12, 12] and (out[out <= 1.0] <= 0.5).all()


def test_composite_forwards_the_runtime_hooks_only_when_a_part_has_them():
    plain = build_scorer("composite", {"parts": [{"name": "uniform"}, {"name": "random"}]})
    assert not hasattr(plain, "vision_layers") and not hasattr(plain, "attach") and not plain.needs_coords
    mixed = build_scorer("composite", {"parts": [{"name": "fastervlm"}, {"name": "dart"}, {"name": "diverse"}]})
    assert hasattr(mixed, "vision_layers") and hasattr(mixed, "attach") and hasattr(mixed, "begin")
    assert mixed.needs_coords
    req = mixed.vision_layers(4, (1, 3))
    assert req and all(isinstance(k, tuple) for k in req.values())


@pytest.mark.parametrize(("params", "needle"), [
    ({"parts": [{"name": "uniform"}]}, "is not a list of 2 to 3 rankings"),
    ({"parts": [{"name": "external"}, {"name": "uniform"}]}, "parts[0].name='external' cannot be a part"),
    ({"parts": [{"name": "uniform"}, {"name": "composite"}]}, "parts[1].name='composite' cannot be a part"),
    ({"parts": [{"name": "uniform"}, {"name": "nope"}]}, "parts[1].name='nope' is not known"),
    ({"parts": [{"name": "uniform"}, {"name": "diverse", "params": {"spatial": -1}}]},
     "parts[1].params.spatial=-1.0 is outside"),
    ({"parts": [{"name": "uniform"}, {"name": "random", "weight": 0}]}, "parts[1].weight=0.0 is outside"),
    ({"parts": [{"name": "uniform"}, {"name": "random", "colour": 1}]}, "parts[1].colour is not known"),
    ({"mode": "mean"}, "scorer.params.mode='mean' is not known"),
])
def test_bad_composites_are_one_line_errors(params, needle):
    with pytest.raises(ScheduleError) as err:
        build_scorer("composite", params)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_composite_schedule_round_trips_and_prunes_on_a_tiny_model(tiny_dir, tmp_path):
    from schedsearch.models import load_model
    from schedsearch.runtime import apply_schedule
    from schedsearch.schedule import kept_counts, load_schedule
    from schedsearch.testing.tiny import tiny_images

    ad = load_model(str(tiny_dir("qwen2_5_vl")))
    from schedsearch.testing.tiny import schedule_for

    scorer = {"parts": [{"name": "fastervlm"}, {"name": "diverse", "params": {"spatial": 4.0}, "weight": 0.5}],
              "mode": "union"}
    n = ad.num_layers
    sched = schedule_for(ad, [1.0] + [0.5] * (n - 1), scorer="composite", params=scorer)
    sched.save(tmp_path / "s.json")
    back = load_schedule(tmp_path / "s.json")
    assert back.schema_version == "1.3" and back.scorer.name == "composite"
    imgs = tiny_images(2, seed=1)
    batch = ad.prepare([[imgs[0]], [imgs[1]]], ["where is the square ?", "what colour ?"])
    n_vis = int(ad.visual_mask(batch["input_ids"])[0].sum())
    with torch.no_grad(), apply_schedule(ad.model, back, adapter=ad) as handle:
        ad.model(**batch)
        kept = {layer: idx.shape[1] for layer, idx in handle.kept_indices.items()}
    text = int(batch["input_ids"].shape[1]) - n_vis
    want = kept_counts(back.keep_ratios, n_vis)
    assert kept and all(alive == text + want[layer] for layer, alive in kept.items())


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
