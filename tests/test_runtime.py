"""Runtime invariants on tiny random-init models of the four real transformers classes.

Fixtures (tests/conftest.py): ``family_adapter`` is a loaded adapter per family, built from a config,
saved and reloaded with ``from_pretrained``.
"""

from __future__ import annotations

import pytest
import torch

from schedsearch.errors import IncompatibleScheduleError
from schedsearch.runtime import RuntimeScheduleError, apply_schedule
from schedsearch.runtime.recycle import merge_into_kept
from schedsearch.testing.tiny import AttentionUnavailable, attention_implementation, tiny_images


def _sched(n_layers: int, ratios=None, scorer="uniform", params=None, grid=None) -> dict:
    if ratios is None:  # drop at layer 1 and again at the last layer
        ratios = [1.0] + [0.5] * (n_layers - 2) + [0.25]
    return {"keep_ratios": list(ratios), "scorer": {"name": scorer, "params": params or {}},
            "recycling": {"grid": grid, "weighting": "importance"} if grid else None}


def _batch(adapter, prompts, seed=0):
    imgs = tiny_images(1, seed=seed)
    return adapter.prepare([[imgs[0]] for _ in prompts], prompts)


def _hooks(model) -> dict:
    """Every module's hook ids (transformers itself registers some, e.g. on LLaVA's vision tower)."""
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()}


def _suppress(adapter):
    tok = adapter.processor.tokenizer if hasattr(adapter.processor, "tokenizer") else adapter.processor
    return sorted(set(tok.all_special_ids) | {adapter.image_token_id})


@torch.no_grad()
def test_all_ones_identical_and_restored(family_adapter):
    ad = family_adapter
    batch = _batch(ad, ["what colour is it?", "is there a red square in the top left?"])
    ref = ad.model(**batch).logits
    state = {k: v.clone() for k, v in ad.model.state_dict().items()}
    hooks_before = _hooks(ad.model)
    with apply_schedule(ad.model, _sched(ad.num_layers, [1.0] * ad.num_layers, "last_token_attention"),
                        adapter=ad):
        assert torch.equal(ad.model(**batch).logits, ref)
    with apply_schedule(ad.model, _sched(ad.num_layers), adapter=ad):
        pruned = ad.model(**batch).logits
    assert pruned.shape[1] < ref.shape[1]  # tokens were really dropped
    assert _hooks(ad.model) == hooks_before
    assert torch.equal(ad.model(**batch).logits, ref)
    for k, v in ad.model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.fixture(params=["sdpa", "eager"])
def attn_adapter(request, family_adapter):
    try:
        with attention_implementation(family_adapter.model, request.param):
            yield family_adapter
    except AttentionUnavailable as e:  # e.g. Gemma 2 (PaliGemma 2) has no SDPA path: its logits are soft-capped
        pytest.skip(str(e))


@pytest.mark.parametrize("ratios_kind", ["mid", "layer0"])
@torch.no_grad()
def test_cached_generate_equals_recompute(attn_adapter, ratios_kind):
    """Greedy generate with the KV cache == recomputing the whole sequence without cache each step
    (SDPA and eager attention; eager gets additive float masks, SDPA boolean ones)."""
    ad = attn_adapter
    n = ad.num_layers
    ratios = [1.0] + [0.5] * (n - 2) + [0.25] if ratios_kind == "mid" else [0.5] * (n - 1) + [0.25]
    for scorer in ("uniform", "random"):
        sched = _sched(n, ratios, scorer, {"seed": 3} if scorer == "random" else None)
        batch = _batch(ad, ["describe the picture"])
        steps = 4
        with apply_schedule(ad.model, sched, adapter=ad):
            out = ad.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                    suppress_tokens=_suppress(ad), output_logits=True,
                                    return_dict_in_generate=True)
            prompt_len = batch["input_ids"].shape[1]
            for s in range(steps):
                seq = out.sequences[:, : prompt_len + s]
                full = dict(batch)
                full["input_ids"] = seq
                full["attention_mask"] = torch.ones_like(seq)
                for key, new in ad.spec.token_types:  # e.g. Qwen's mm_token_type_ids: generated tokens get 0
                    if key in batch:
                        grown = torch.full_like(seq[:, prompt_len:], new).to(batch[key].dtype)
                        full[key] = torch.cat([batch[key], grown], dim=1)
                logits = ad.model(**full, use_cache=False).logits[:, -1]
                torch.testing.assert_close(logits, out.logits[s], atol=1e-4, rtol=1e-4)
                logits[:, _suppress(ad)] = float("-inf")  # generate() suppressed these
                assert torch.equal(logits.argmax(-1), out.sequences[:, prompt_len + s])


@pytest.mark.parametrize("scorer", ["last_token_attention", "text_attention", "random", "diverse"])
@torch.no_grad()
def test_left_padded_batch_equals_alone(attn_adapter, scorer):
    ad = attn_adapter
    sched = _sched(ad.num_layers, scorer=scorer)
    prompts = ["what is it?", "count the shapes in the top half of the image please"]
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=_suppress(ad))
    if scorer == "diverse" and not ad.spec.positions_in_generate:
        # generate() passes image_sizes only to the image encoder: token positions are unknown in the prefill
        with apply_schedule(ad.model, sched, adapter=ad), pytest.raises(RuntimeScheduleError,
                                                                         match="scorer diverse needs .*image_sizes"):
            ad.model.generate(**_batch(ad, prompts), **gen)
        return
    with apply_schedule(ad.model, sched, adapter=ad):
        both = ad.model.generate(**_batch(ad, prompts), **gen)
        both_new = both[:, -4:]
        for i, p in enumerate(prompts):
            alone = ad.model.generate(**_batch(ad, [p]), **gen)[:, -4:]
            assert torch.equal(both_new[i], alone[0]), (i, both_new[i].tolist(), alone[0].tolist())
    batch = _batch(ad, prompts)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # really left-padded
    assert bool((batch["attention_mask"][:, -1] == 1).all())


@torch.no_grad()
def test_survivors_keep_original_positions(family_adapter):
    """The rotary cos/sin each layer sees for a survivor are those of its ORIGINAL position
    (Qwen: computed from 3-D mRoPE ids)."""
    ad = family_adapter
    batch = _batch(ad, ["where is the circle?", "a longer prompt about the circle and square"])
    seen: dict[int, tuple] = {}

    def capture(i):
        def hook(module, args, kwargs):
            seen[i] = tuple(t.clone() for t in kwargs["position_embeddings"])
        return hook

    hs = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(ad.decoder_layers)]
    ad.model(**batch)
    ref = dict(seen)
    for h in hs:
        h.remove()
    handle = apply_schedule(ad.model, _sched(ad.num_layers, scorer="last_token_attention"), adapter=ad)
    hs = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(ad.decoder_layers)]
    try:
        ad.model(**batch)
        assert handle.kept_indices, "no layer ran on a pruned sequence"
        for l, idx in handle.kept_indices.items():
            for got, full in zip(seen[l], ref[l], strict=False):
                full = full.expand(idx.shape[0], *full.shape[1:])
                want = full.gather(1, idx[..., None].expand(-1, -1, full.shape[-1]))
                assert torch.equal(got, want), l
            vis = ad.visual_mask(batch["input_ids"]).gather(1, idx)
            assert int(vis[0].sum()) < int(ad.visual_mask(batch["input_ids"])[0].sum())
            assert bool((idx[:, 1:] > idx[:, :-1]).all())  # order preserved
    finally:
        for h in hs:
            h.remove()
        handle.remove()


@torch.no_grad()
def test_kv_cache_holds_only_survivors(family_adapter):
    ad = family_adapter
    batch = _batch(ad, ["what colour is the shape?"])
    n_tok = batch["input_ids"].shape[1]
    n_vis = int(ad.visual_mask(batch["input_ids"])[0].sum())
    sched = _sched(ad.num_layers, [0.5] + [0.5] * (ad.num_layers - 2) + [0.25])
    from schedsearch.runtime.masks import window_of
    from schedsearch.schedule import kept_counts

    counts = kept_counts(sched["keep_ratios"], n_vis)
    with apply_schedule(ad.model, sched, adapter=ad):
        out = ad.model(**batch, use_cache=True)
    lens = [out.past_key_values.layers[l].keys.shape[-2] for l in range(ad.num_layers)]
    # a sliding-window layer (Gemma 3) keeps only its last window - 1 entries
    windows = [window_of(out.past_key_values, l) for l in range(ad.num_layers)]
    want = [n_tok - n_vis + c for c in counts]
    assert lens == [n if w is None else min(n, w - 1) for n, w in zip(want, windows, strict=True)]


@torch.no_grad()
def test_last_token_scorer_matches_eager_attention(family_adapter):
    """The q/k scorer reproduces the layer's own attention row: compare with eager attention weights."""
    ad = family_adapter
    with attention_implementation(ad.model, "eager"):
        batch = _batch(ad, ["is the square above the circle?"])
        layer = 1
        out = ad.model(**batch, output_attentions=True)
        row = out.attentions[layer][0, :, -1, :].mean(0)  # head-averaged last-token row
        vis = ad.visual_mask(batch["input_ids"])[0]
        n_vis = int(vis.sum())
        ratios = [1.0] * layer + [0.5] * (ad.num_layers - layer)
        with apply_schedule(ad.model, _sched(ad.num_layers, ratios, "last_token_attention"), adapter=ad) as h:
            ad.model(**batch)
            kept = set(h.kept_indices[layer][0].tolist())
        vis_pos = vis.nonzero().squeeze(1)
        from schedsearch.schedule import kept_counts

        n_keep = kept_counts([0.5], n_vis)[0]  # the contract's rounding (half up)
        top = vis_pos[torch.argsort(row[vis_pos], descending=True, stable=True)[:n_keep]]
        assert {int(i) for i in top} == {i for i in kept if vis[i]}


@torch.no_grad()
def test_recycling_changes_states_not_selection(family_adapter):
    ad = family_adapter
    batch = _batch(ad, ["where is the red triangle?"])
    base = _sched(ad.num_layers, scorer="last_token_attention")
    rec = _sched(ad.num_layers, scorer="last_token_attention", grid=2)
    with apply_schedule(ad.model, base, adapter=ad) as h1:
        a = ad.model(**batch).logits
        k1 = {l: t.clone() for l, t in h1.kept_indices.items()}
    with apply_schedule(ad.model, rec, adapter=ad) as h2:
        b = ad.model(**batch).logits
        first = min(h2.kept_indices)
        assert torch.equal(h2.kept_indices[first], k1[first])
    assert not torch.allclose(a, b)


def test_dict_schedule_with_unknown_recycling_weighting_is_refused(family_adapter):
    """A dict schedule skips Schedule's validation; an unknown weighting must not be silently ignored."""
    from schedsearch.errors import ScheduleError

    sched = {"keep_ratios": [0.5] * family_adapter.num_layers, "scorer": {"name": "uniform", "params": {}},
             "recycling": {"grid": 2, "weighting": "uniform"}}
    with pytest.raises(ScheduleError, match="recycling.weighting must be one of importance, got 'uniform'"):
        apply_schedule(family_adapter.model, sched, adapter=family_adapter)
    sched["recycling"]["weighting"] = "importance"
    apply_schedule(family_adapter.model, sched, adapter=family_adapter).remove()


def test_merge_into_kept_by_hand():
    h = torch.tensor([[[1.0], [3.0], [10.0], [5.0]]])
    keep = torch.tensor([[True, False, True, False]])
    w = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    cells = torch.tensor([[0, 0, 1, 2]])  # token 3 is alone in cell 2: dropped without merge
    out = merge_into_kept(h, keep, w, cells)
    assert out[0, 0, 0].item() == pytest.approx((1 * 1 + 1 * 3) / 2)
    assert out[0, 2, 0].item() == pytest.approx(10.0)


def test_layer_count_mismatch(family_adapter):
    with pytest.raises(IncompatibleScheduleError, match="decoder layers"):
        apply_schedule(family_adapter.model, {"keep_ratios": [1.0] * (family_adapter.num_layers + 1)},
                       adapter=family_adapter)


@torch.no_grad()
def test_apply_without_adapter(family_adapter):
    """apply_schedule(model, schedule) finds the family adapter from the model config."""

    ad = family_adapter
    batch = _batch(ad, ["what is it?"])
    sched = _sched(ad.num_layers)
    with apply_schedule(ad.model, sched, adapter=ad):
        want = ad.model(**batch).logits
    with apply_schedule(ad.model, sched):
        got = ad.model(**batch).logits
    assert torch.equal(want, got)


def test_survival_grid(family_adapter):
    from schedsearch.evaluation import survival_grid

    ad = family_adapter
    img = tiny_images(1, seed=1)[0]
    n = ad.num_layers
    grid = survival_grid(ad, _sched(n, [1.0] + [0.5] * (n - 1)), [img], "where?")
    coords = ad.visual_coords(ad.prepare([[img]], ["where?"]))[0]
    first = coords[coords[:, 0] == 0]
    one_grid = len(first[:, 1].unique()) * len(first[:, 2].unique()) == len(first)
    if not one_grid:  # e.g. LLaVA-NeXT's base + high-res grids, InternVL's tiles + thumbnail
        assert grid is None
        return
    v = int(ad.visual_mask(_batch(ad, ["where?"])["input_ids"])[0].sum())
    assert grid.size == v
    # layer 0 keeps everything; from layer 1 half: survivors 1.0, the rest 1/n
    assert sorted(set(grid.flatten().round(6))) == sorted({1.0, round(1 / n, 6)})
    from schedsearch.schedule import kept_counts

    assert int((grid == 1.0).sum()) == kept_counts([0.5], v)[0]  # the contract's rounding (half up)
