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
