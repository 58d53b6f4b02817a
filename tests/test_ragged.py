"""Ragged batches: samples with different numbers of visual tokens (image sizes, numbers of images) in one batch.

Each sample of a ragged batch must give what it gives alone: the same kept visual tokens at every layer and the
same last-token logits (<= 1e-4), under every scorer, on every family; greedy ``generate`` with the KV cache must
equal recomputing each sample's sequence alone without a cache.

"Alone" runs without padding. Left padding shifts the positions of a padded sample unless the position ids come
from the attention mask, as ``generate()`` makes them (a plain ``model(**batch)`` of a Llama-type model counts
from the first pad), and some rankings (DART's key norms) see absolute positions; so the batch runs through
``generate()``, except on families whose prefill inside ``generate()`` lacks the image sizes (LLaVA-NeXT,
OneVision: 0-indexed Llama/Qwen2 text models), which get ``model(**batch)`` with mask-derived position ids.
"""

from __future__ import annotations

import pytest
import torch

from schedsearch.errors import SchedsearchError
from schedsearch.runtime import RuntimeScheduleError, apply_schedule
from schedsearch.scorer_specs import SCORERS
from schedsearch.testing.tiny import tiny_images

PROMPTS = ["what is it ?", "describe the picture", "is there a red square in the top left ?"]
SCORER_NAMES = [n for n in SCORERS if n != "external"]  # external needs a caller's map: test_external_ragged


def _images():
    wide = tiny_images(1, size=(160, 96), seed=1)[0]
    tall = tiny_images(1, size=(96, 160), seed=2)[0]
    square = tiny_images(1, seed=3)[0]
    return [[wide], [tall], [square, wide]]  # different sizes, and one sample with two images


def _sched(n_layers: int, scorer: str, grid: int | None = None, ratios=None) -> dict:
    if ratios is None:
        ratios = [1.0] + [0.5] * (n_layers - 2) + [0.25]
    return {"keep_ratios": list(ratios), "scorer": {"name": scorer, "params": {}},
            "recycling": {"grid": grid, "weighting": "importance"} if grid else None}


def _prefill_logits(ad, batch) -> torch.Tensor:
    """(B, vocab) last-token logits of the batch's prefill, positions from the attention mask."""
    if ad.spec.positions_in_generate:
        out = ad.model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        return out.logits[0]
    pos = (batch["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
    return ad.model(**batch, position_ids=pos).logits[:, -1]


def _kept_visual(ad, ids: torch.Tensor, kept: dict, row: int) -> dict[int, list[int]]:
    """{layer: sorted visual ranks kept} for sample ``row`` (filler slots, -1, left out)."""
    vis = ad.visual_mask(ids)[row]
    rank = vis.long().cumsum(0) - 1
    out = {}
    for layer, idx in kept.items():
        i = idx[row]
        i = i[i >= 0]
        out[layer] = sorted(rank[i[vis[i]]].tolist())
    return out


@torch.no_grad()
def _check_alone(ad, sched) -> float:
    """Run the ragged batch and each sample alone under ``sched``; assert kept tokens equal; return the largest
    |logit difference| of the last token."""
    imgs = _images()
    batch = ad.prepare(imgs, PROMPTS)
    counts = ad.visual_mask(batch["input_ids"]).sum(1).tolist()
    assert len(set(counts)) > 1, counts  # really ragged
    worst = 0.0
    with apply_schedule(ad.model, sched, adapter=ad) as handle:
        logits = _prefill_logits(ad, batch)
        kept = {layer: idx.clone() for layer, idx in handle.kept_indices.items()}
        assert kept, "nothing was dropped"
        for i, p in enumerate(PROMPTS):
            one = ad.prepare([imgs[i]], [p])
            alone = ad.model(**one).logits[:, -1]
            assert _kept_visual(ad, batch["input_ids"], kept, i) == \
                _kept_visual(ad, one["input_ids"], handle.kept_indices, 0), (sched["scorer"]["name"], i)
            worst = max(worst, float((alone[0] - logits[i]).abs().max()))
    assert worst <= 1e-4, (sched["scorer"]["name"], worst)
    return worst


@pytest.mark.parametrize("scorer", ["uniform", "last_token_attention"])
def test_ragged_batch_equals_alone(family_adapter, scorer):
    _check_alone(family_adapter, _sched(family_adapter.num_layers, scorer))


@pytest.mark.slow
def test_ragged_every_scorer_equals_alone(family_adapter):
    ad = family_adapter
    ran = []
    for name in SCORER_NAMES:
        try:
            _check_alone(ad, _sched(ad.num_layers, name))
        except SchedsearchError as err:  # e.g. a vision-encoder ranking on a family without vision maps
            assert "\n" not in str(err), (name, str(err))
            continue
        ran.append(name)
    assert {"uniform", "random", "last_token_attention", "text_attention", "diverse"} <= set(ran)


def test_ragged_recycling_equals_alone(family_adapter):
    _check_alone(family_adapter, _sched(family_adapter.num_layers, "text_attention", grid=2))


def _suppress(ad):
    tok = ad.processor.tokenizer if hasattr(ad.processor, "tokenizer") else ad.processor
    return sorted(set(tok.all_special_ids) | {ad.image_token_id})


@pytest.mark.parametrize("ratios_kind", ["mid", "layer0"])
@torch.no_grad()
def test_ragged_cached_generate_equals_alone_recompute(family_adapter, ratios_kind):
    """Greedy generate of a ragged batch with the KV cache == each sample's sequence recomputed alone, without a
    cache, at every step (the decode masks leave the filler slots out of every layer's cache)."""
    ad = family_adapter
    n = ad.num_layers
    ratios = [1.0] + [0.5] * (n - 2) + [0.25] if ratios_kind == "mid" else [0.5] * (n - 1) + [0.25]
    imgs = _images()
    batch = ad.prepare(imgs, PROMPTS)
    steps = 3
    with apply_schedule(ad.model, _sched(n, "random", ratios=ratios), adapter=ad):
        out = ad.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                suppress_tokens=_suppress(ad), output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        for i, p in enumerate(PROMPTS):
            one = ad.prepare([imgs[i]], [p])
            for s in range(steps):
                full = dict(one)
                full["input_ids"] = torch.cat([one["input_ids"], new[i:i + 1, :s]], dim=1)
                full["attention_mask"] = torch.ones_like(full["input_ids"])
                for key, value in ad.spec.token_types:
                    if key in one:
                        grown = torch.full_like(new[i:i + 1, :s], value).to(one[key].dtype)
                        full[key] = torch.cat([one[key], grown], dim=1)
                logits = ad.model(**full, use_cache=False).logits[0, -1]
                torch.testing.assert_close(logits, out.logits[s][i], atol=1e-4, rtol=1e-4)


def test_ragged_refusals_are_gone_for_all_ones(family_adapter):
    """An all-ones schedule on a ragged batch is the stock model, bit for bit."""
    ad = family_adapter
    batch = ad.prepare(_images(), PROMPTS)
    with torch.no_grad():
        ref = ad.model(**batch).logits
        with apply_schedule(ad.model, _sched(ad.num_layers, "uniform", ratios=[1.0] * ad.num_layers), adapter=ad):
            assert torch.equal(ad.model(**batch).logits, ref)


def test_diverse_in_generate_is_refused_or_runs(family_adapter):
    """Inside generate() a scorer needing positions on LLaVA-NeXT/OneVision is refused in one line, ragged or not."""
    ad = family_adapter
    if ad.spec.positions_in_generate:
        pytest.skip("positions reach the prefill on this family")
    with torch.no_grad(), apply_schedule(ad.model, _sched(ad.num_layers, "diverse"), adapter=ad), \
            pytest.raises(RuntimeScheduleError, match="diverse"):
        ad.model.generate(**ad.prepare(_images(), PROMPTS), max_new_tokens=1)


def _samples(tmp_path, n: int = 5):
    """Calibration samples of mixed image sizes and numbers of images."""
    from schedsearch.calibration import Sample

    sizes = [(160, 96), (96, 160), (112, 112), (128, 96), (96, 96)]
    out = []
    for i in range(n):
        paths = []
        for j in range(1 + (i % 2)):
            p = tmp_path / f"{i}_{j}.png"
            tiny_images(1, size=sizes[(i + j) % len(sizes)], seed=10 + i + j)[0].save(p)
            paths.append(p)
        out.append(Sample(prompt=PROMPTS[i % len(PROMPTS)], image_paths=tuple(paths)))
    return out


@torch.no_grad()
def test_make_batches_mixes_sizes_and_states_equal_alone(tiny_dir, tmp_path):
    """make_batches keeps order and mixes visual counts; pruned last-token states of the mixed batches equal those
    of batches of one (what evaluate/optimize compute the discrepancy from)."""
    from schedsearch.evaluation import last_token_states, make_batches
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("llava_next"))
    samples = _samples(tmp_path)
    mixed = make_batches(ad, samples, 4)
    assert [b["input_ids"].shape[0] for b in mixed] == [4, 1]
    assert len(set(ad.visual_mask(mixed[0]["input_ids"]).sum(1).tolist())) > 1  # really ragged
    sched = _sched(ad.num_layers, "text_attention")
    got = last_token_states(ad, mixed, sched)
    want = last_token_states(ad, make_batches(ad, samples, 1), sched)
    # model(**batch) counts a padded sample's positions from its first pad: attention sees relative positions
    # only, so the states (and text_attention's ranking) are those alone up to float rounding
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_runtime_counts_match_the_flops_accounting(tiny_dir):
    """Each sample of a ragged batch runs every layer on exactly the tokens flops.layer_tokens counts for it
    (its own kept_counts; padding and filler slots not counted), so budgets over a mixed calibration set are
    per-sample sums as before."""
    from schedsearch.flops import DecoderShape, _layer_tokens
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("llava_next"))
    batch = ad.prepare(_images(), PROMPTS)
    vis = ad.visual_mask(batch["input_ids"])
    real = batch["attention_mask"].bool()
    ratios = [1.0, 0.6, 0.3, 0.1]
    with apply_schedule(ad.model, _sched(ad.num_layers, "uniform", ratios=ratios), adapter=ad) as handle:
        ad.model(**batch)
        for i in range(vis.shape[0]):
            n_vis = int(vis[i].sum())
            want = _layer_tokens(DecoderShape.from_config(ad.text_config), int(real[i].sum()) - n_vis, n_vis, ratios)
            for layer, idx in handle.kept_indices.items():
                alive = idx[i][idx[i] >= 0]
                assert int(real[i][alive].sum()) == want[layer], (i, layer)


@torch.no_grad()
def test_serving_batches_mixed_requests(tiny_dir):
    """The serving endpoint's generate() batches records of different sizes, image counts and text-only ones;
    each gets the text it gets alone."""
    from schedsearch.models import load_model
    from schedsearch.serving import encode_image, generate

    ad = load_model(tiny_dir("qwen2_5_vl"))
    imgs = _images()
    records = [{"prompt": p, "images": [encode_image(im) for im in ims]} for p, ims in zip(PROMPTS, imgs, strict=True)]
    records.insert(1, {"prompt": "what is it ?"})  # no image
    sched = _sched(ad.num_layers, "last_token_attention")
    together = generate(ad, sched, records, max_new_tokens=4, batch_size=8)
    alone = [generate(ad, sched, [r], max_new_tokens=4, batch_size=1)[0] for r in records]
    assert together == alone and len(together) == 4


@torch.no_grad()
def test_external_importance_ragged(tiny_dir):
    """external: the caller's map is (B, V_max) for a ragged batch, shorter rows padded; each sample ranks by its
    own row, as alone. A map narrower than a sample's visual count is one line."""
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("llava_next"))
    imgs = _images()
    batch = ad.prepare(imgs, PROMPTS)
    counts = ad.visual_mask(batch["input_ids"]).sum(1).tolist()

    def imp(n_rows: int, width: int) -> torch.Tensor:
        j = torch.arange(width, dtype=torch.float32)
        return (torch.sin(j * 0.37 + 1.0) + 1.0).expand(n_rows, width).clone()

    sched = _sched(ad.num_layers, "external")
    with apply_schedule(ad.model, sched, adapter=ad, importance=imp(3, max(counts))) as handle:
        ad.model(**batch)
        kept = {layer: idx.clone() for layer, idx in handle.kept_indices.items()}
    for i, p in enumerate(PROMPTS):
        one = ad.prepare([imgs[i]], [p])
        with apply_schedule(ad.model, sched, adapter=ad, importance=imp(1, counts[i])) as handle:
            ad.model(**one)
            assert _kept_visual(ad, batch["input_ids"], kept, i) == _kept_visual(ad, one["input_ids"],
                                                                                handle.kept_indices, 0)
    with apply_schedule(ad.model, sched, adapter=ad, importance=imp(3, min(counts))), \
            pytest.raises(SchedsearchError, match="columns") as err:
        ad.model(**batch)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_ragged_without_padding_builds_a_mask(tiny_dir, impl):
    """Different visual counts but equal lengths (no padding): SDPA then runs its layers with no mask at all
    (is_causal); after a drop the filler slots need one, which the runtime builds (causal on original positions)."""
    from schedsearch.models import load_model
    from schedsearch.testing.tiny import attention_implementation

    ad = load_model(tiny_dir("qwen2_5_vl"))
    wide, square = tiny_images(1, size=(160, 96), seed=1)[0], tiny_images(1, seed=3)[0]
    imgs = [[wide], [square, wide]]
    for k in range(40):  # lengthen the one-image prompt until both samples are equally long
        prompts = [" ".join(["red"] * k + ["what is it ?"]), "what is it ?"]
        batch = ad.prepare(imgs, prompts)
        if bool(batch["attention_mask"].all()):
            break
    counts = ad.visual_mask(batch["input_ids"]).sum(1).tolist()
    assert bool(batch["attention_mask"].all()) and counts[0] != counts[1], counts
    with attention_implementation(ad.model, impl), apply_schedule(
            ad.model, _sched(ad.num_layers, "text_attention"), adapter=ad):
        seen = []
        hook = ad.decoder_layers[ad.num_layers - 1].register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
        try:
            logits = ad.model(**batch).logits[:, -1]
        finally:
            hook.remove()
        assert seen[0] is not None  # fillers exist, so the last layer has a mask
        for i in range(2):
            alone = ad.model(**ad.prepare([imgs[i]], [prompts[i]])).logits[0, -1]
            torch.testing.assert_close(alone, logits[i], atol=1e-4, rtol=1e-4)
