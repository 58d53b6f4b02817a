"""Runtime invariants for the issue-13 rankings (schema 1.2 scorers) on the tiny families.

For every scorer of :data:`CASES`: a pruned run really drops tokens and leaves the model exactly as before (hooks,
weights, outputs); a left-padded batch gives each sample what it gets alone; greedy generation with the KV cache
equals recomputing without it where the ranking does not depend on the tokens after the image; an all-ones
schedule gives exactly the unpruned logits; the kept count is the schedule's.
"""

from __future__ import annotations

import pytest
import torch

from schedsearch.runtime import RuntimeScheduleError, apply_schedule
from schedsearch.schedule import kept_counts
from schedsearch.testing.tiny import tiny_images

#: name -> (params, prefix-stable ranking (cache consistency holds), reads vision maps or positions: LLaVA-NeXT
#: needs image_sizes, which generate() hands only to the encoder)
CASES: dict[str, tuple[dict, bool, bool]] = {
    "fastervlm": ({}, True, True),
    "vtc_cls": ({}, True, True),
    "visionzip": ({}, True, True),
    "visionzip/states": ({"similarity": "states", "contextual": 0.3}, True, True),
    "hiprune": ({"alpha": 0.5}, True, True),
    "dart": ({"image_pivots": 2, "text_pivots": 2}, False, False),
    "transprune": ({"start": 0}, False, False),
    "transprune/ttv": ({"start": 0, "iga": False}, False, False),  # its softmax spans the whole sequence
    "flowcut": ({"layer": -1}, True, True),
    "mmtok": ({}, False, False),
    "todre": ({}, False, False),
    "sparsevlm": ({}, False, False),
    "sparsevlm/plain": ({"recycle": False}, False, False),
    "hired": ({}, True, True),
    # schema 1.3: composites and the references' own rules
    "composite": ({}, False, False),
    "fastv": ({}, False, False),
    "fastv/norope": ({"rope": False}, False, False),
    "divprune": ({}, True, False),
    "feather": ({}, False, True),
    "composite/rank": ({"mode": "rank", "members": [{"name": "diverse", "params": {"spatial": 4.0}},
                                                    {"name": "text_attention", "weight": 2.0}]}, False, True),
}


def _sched(n_layers: int, name: str, params: dict, ratios=None) -> dict:
    name = name.split("/")[0]  # "name/variant" rows test one scorer with other params
    if ratios is None:  # drop before layer 0 and again at the last layer
        ratios = [0.5] * (n_layers - 1) + [0.25]
    return {"keep_ratios": list(ratios), "scorer": {"name": name, "params": params}, "recycling": None}


def _batch(ad, prompts, seed=0):
    imgs = tiny_images(len(prompts), seed=seed)
    return ad.prepare([[im] for im in imgs], prompts)


def _suppress(ad):
    tok = ad.processor.tokenizer if hasattr(ad.processor, "tokenizer") else ad.processor
    return sorted(set(tok.all_special_ids) | {ad.image_token_id})


def _hooks(model) -> dict:
    return {n: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for n, m in model.named_modules()}


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_drops_counts_and_restores(tiny_adapter, name):
    ad = tiny_adapter
    params = CASES[name][0]
    batch = _batch(ad, ["what colour is it?", "is there a red square in the top left?"])
    ref = ad.model(**batch).logits
    state = {k: v.clone() for k, v in ad.model.state_dict().items()}
    hooks = _hooks(ad.model)
    with apply_schedule(ad.model, _sched(ad.num_layers, name, params, [1.0] * ad.num_layers), adapter=ad):
        assert torch.equal(ad.model(**batch).logits, ref)
    sched = _sched(ad.num_layers, name, params)
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        pruned = ad.model(**batch).logits
        vis = ad.visual_mask(batch["input_ids"])
        counts = kept_counts(sched["keep_ratios"], int(vis[0].sum()))
        for layer, idx in h.kept_indices.items():
            assert (vis.gather(1, idx).sum(1) == counts[layer]).all(), layer
    assert pruned.shape[1] < ref.shape[1]
    assert _hooks(ad.model) == hooks
    assert torch.equal(ad.model(**batch).logits, ref)
    for k, v in ad.model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_batch_equals_each_sample_alone(tiny_adapter, name):
    ad = tiny_adapter
    params, _, needs_sizes = CASES[name]
    sched = _sched(ad.num_layers, name, params)
    prompts = ["what is it?", "count the shapes in the top half of the image please"]
    imgs = tiny_images(2, seed=0)
    batch = ad.prepare([[im] for im in imgs], prompts)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # really left-padded
    # generate() derives position ids from the padding mask (a plain LLaVA forward does not, and a ranking by the
    # L1 norm of rotated keys, like DART's, depends on absolute positions); LLaVA-NeXT's generate() cannot place
    # vision maps (image_sizes), so those scorers are compared on the prefill's logits
    forward = needs_sizes and ad.family == "llava_next"
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=_suppress(ad))

    def run(b):
        return ad.model(**b).logits[:, -1] if forward else ad.model.generate(**b, **gen)[:, -3:]

    with apply_schedule(ad.model, sched, adapter=ad) as h:
        both = run(batch)
        kept_both = {l: t.clone() for l, t in h.kept_indices.items()}
        assert kept_both
        for i, p in enumerate(prompts):
            alone = run(ad.prepare([[imgs[i]]], [p]))
            if forward:
                torch.testing.assert_close(both[i], alone[0], atol=1e-4, rtol=1e-4)
            else:
                assert torch.equal(both[i], alone[0]), (i, both[i].tolist(), alone[0].tolist())
            pad = int((batch["attention_mask"][i] == 0).sum())
            for l, idx in h.kept_indices.items():  # the same survivors, shifted by the sample's left padding
                mine = kept_both[l][i]
                assert torch.equal(mine[mine >= pad] - pad, idx[0]), (l, i)
    if needs_sizes and ad.family == "llava_next":
        with apply_schedule(ad.model, sched, adapter=ad), pytest.raises(RuntimeScheduleError, match="image_sizes"):
            ad.model.generate(**batch, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[1]])
@torch.no_grad()
def test_cached_generate_equals_recompute(tiny_adapter, name):
    ad = tiny_adapter
    params, _, needs_sizes = CASES[name]
    if needs_sizes and ad.family == "llava_next":
        pytest.skip("LLaVA-NeXT generate() hands image_sizes only to the encoder (tested above: one-line error)")
    sched = _sched(ad.num_layers, name, params)
    batch = _batch(ad, ["describe the picture"])
    steps = 3
    with apply_schedule(ad.model, sched, adapter=ad):
        out = ad.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                suppress_tokens=_suppress(ad), output_logits=True, return_dict_in_generate=True)
        n = batch["input_ids"].shape[1]
        for s in range(steps):
            full = dict(batch)
            full["input_ids"] = out.sequences[:, : n + s]
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            if "mm_token_type_ids" in batch:
                is_img = full["input_ids"] == ad.image_token_id
                full["mm_token_type_ids"] = is_img.to(batch["mm_token_type_ids"].dtype)
            logits = ad.model(**full, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[s], atol=1e-4, rtol=1e-4)


def _same_keep_without_merge(ad, batch, sched):
    """Logits of ``sched`` and of the same kept set chosen by an external importance (no merge step)."""
    vis = ad.visual_mask(batch["input_ids"])
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        merged = ad.model(**batch).logits
        kept = h.kept_indices[0]
    order = vis.long().cumsum(1) - 1
    imp = torch.zeros(vis.shape[0], int(vis[0].sum()))
    for b in range(vis.shape[0]):
        imp[b, order[b, kept[b][vis[b, kept[b]]]]] = 1.0
    plain = dict(sched, scorer={"name": "external", "params": {}})
    with apply_schedule(ad.model, plain, adapter=ad, importance=imp) as h:
        kept_plain = ad.model(**batch).logits
        assert torch.equal(h.kept_indices[0], kept)
    return merged, kept_plain


@pytest.mark.parametrize(("name", "params", "merges"), [
    ("visionzip", {"contextual": 0.3}, True), ("visionzip", {"contextual": 0.0}, False),
    ("sparsevlm", {}, True), ("sparsevlm", {"recycle": False}, False),
])
@torch.no_grad()
def test_merge_changes_states_not_the_kept_set(tiny_dir, name, params, merges):
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("qwen2_5_vl"))
    batch = _batch(ad, ["what is it?"])
    sched = _sched(ad.num_layers, name, params, [0.5] * ad.num_layers)
    merged, plain = _same_keep_without_merge(ad, batch, sched)
    assert torch.equal(merged, plain) != merges


@pytest.mark.parametrize("name", [n for n in CASES if "/" not in n])
@torch.no_grad()
def test_dropping_every_visual_token_works(tiny_dir, name):
    """A schedule may keep nothing (ToDRE's profile does, from half depth): every scorer copes with n_keep = 0."""
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("qwen2_5_vl"))
    batch = _batch(ad, ["what is it?", "where is the square?"])
    vis = ad.visual_mask(batch["input_ids"])
    sched = _sched(ad.num_layers, name, CASES[name][0], [0.5] * (ad.num_layers - 1) + [0.0])
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        out = ad.model(**batch).logits
        last = h.kept_indices[ad.num_layers - 1]
    assert torch.isfinite(out).all()
    assert int(vis.gather(1, last).sum()) == 0


@torch.no_grad()
def test_vision_scorers_with_precomputed_features(tiny_dir):
    """The search precomputes image features once (the encoder then does not run per trial): a vision-map scorer
    replays the encoder once per batch and gets the same survivors; maps of an earlier batch are never reused."""
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("qwen2_5_vl"))
    b1 = _batch(ad, ["what is it?"], seed=1)
    b2 = _batch(ad, ["what is it?"], seed=2)
    sched = _sched(ad.num_layers, "hiprune", {"alpha": 0.5})
    with apply_schedule(ad.model, sched, adapter=ad) as h:
        ad.model(**b1)
        want1 = h.kept_indices[0].clone()
        ad.model(**b2)
        want2 = h.kept_indices[0].clone()
    assert not torch.equal(want1, want2)
    p1, p2 = ad.precompute_vision(b1), ad.precompute_vision(b2)
    calls = []
    hook = ad.vision_tower.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for _ in range(2):  # a second handle (trial) reuses the kept record: no further encoder run
            with apply_schedule(ad.model, sched, adapter=ad) as h:
                ad.model(**p1)
                assert torch.equal(h.kept_indices[0], want1)
                ad.model(**p2)  # the store holds b1's record: it must not be used for b2
                assert torch.equal(h.kept_indices[0], want2)
    finally:
        hook.remove()
    assert len(calls) == 2  # one replay per batch
