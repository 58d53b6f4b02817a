"""The issue-13 rankings against hand-written loops of their authors' published rules, on small inputs.

Vision-side rankings run on the tiny LLaVA (CLIP with [CLS]) and Qwen towers, whose eager attention weights give
the reference's inputs; decoder-side rankings run on hand-made score contexts.
"""

from __future__ import annotations

import pytest
import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime import apply_schedule
from schedsearch.runtime.scorers import build_scorer
from schedsearch.testing.tiny import tiny_images


def _kept_at0(ad, batch, name, params, keep=0.25):
    """Visual positions (per sample, sorted) kept by a schedule that drops to ``keep`` before decoder layer 0."""
    sched = {"keep_ratios": [keep] * ad.num_layers, "scorer": {"name": name, "params": params}, "recycling": None}
    vis = ad.visual_mask(batch["input_ids"])
    with torch.no_grad(), apply_schedule(ad.model, sched, adapter=ad) as h:
        ad.model(**batch)
        idx = h.kept_indices[0]
    order = vis.long().cumsum(1) - 1  # visual order of each visual position
    return [sorted(int(order[b, i]) for i in idx[b].tolist() if vis[b, i]) for b in range(idx.shape[0])]


def _top_by_hand(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values (earlier index wins ties), sorted: the references' torch.topk + sort."""
    ranked = sorted(range(len(values)), key=lambda j: (-values[j], j))
    return sorted(ranked[:k])


def _eager_attentions(ad, batch):
    ad.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return [a.float() for a in ad.vision_tower(batch["pixel_values"], output_attentions=True).attentions]
    finally:
        ad.model.set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def llava(tiny_dir):
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("llava"))
    batch = ad.prepare([[im] for im in tiny_images(2, seed=3)], ["what is it?", "where is the square?"])
    return ad, batch


@pytest.fixture(scope="module")
def qwen(tiny_dir):
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("qwen2_5_vl"))
    batch = ad.prepare([[im] for im in tiny_images(2, seed=3)], ["what is it?", "where is the square?"])
    return ad, batch


# ----------------------------------------------------------------------------- FasterVLM / VTC-CLS
def test_fastervlm_keeps_the_top_cls_attention_of_the_penultimate_layer(llava):
    ad, batch = llava
    att = _eager_attentions(ad, batch)  # per layer (B, H, 1 + P, 1 + P)
    n = att[0].shape[-1] - 1
    k = round(0.25 * n)
    kept = _kept_at0(ad, batch, "fastervlm", {"layer": -2})
    for b in range(2):  # FasterVLM: image_attentions = attentions[-2][:, :, 0, 1:].mean(heads); topk
        cls = [sum(float(att[-2][b, h, 0, 1 + j]) for h in range(att[-2].shape[1])) for j in range(n)]
        assert kept[b] == _top_by_hand(cls, k)
    assert _kept_at0(ad, batch, "fastervlm", {"layer": 0}) == kept  # -2 of this 2-layer tower is layer 0
    assert _kept_at0(ad, batch, "fastervlm", {"layer": 1}) != kept


def test_vtc_cls_sums_cls_attention_over_the_layer_range(llava):
    ad, batch = llava
    att = _eager_attentions(ad, batch)
    n = att[0].shape[-1] - 1
    k = round(0.25 * n)
    kept = _kept_at0(ad, batch, "vtc_cls", {"start": 0, "end": -1})
    heads = att[0].shape[1]
    for b in range(2):  # VTC-CLS: sum over layers start..end of attentions[l].mean(heads)[0, 1:]
        total = [sum(float(att[l][b, h, 0, 1 + j]) / heads for l in range(len(att)) for h in range(heads))
                 for j in range(n)]
        assert kept[b] == _top_by_hand(total, k)
    with pytest.raises(ScheduleError, match="start=1 comes after params.end=0"):
        with apply_schedule(ad.model, {"keep_ratios": [0.5] * ad.num_layers,
                                       "scorer": {"name": "vtc_cls", "params": {"start": 1, "end": 0}}}, adapter=ad):
            pass


def test_fastervlm_on_qwen_ranks_by_attention_received(qwen):
    """No [CLS]: the mean attention each merged token receives in the last full-attention block (LightCompress's
    VisPruner/VisionZip for Qwen: column sums, averaged over the 2x2 patches)."""
    ad, batch = qwen
    depth, glob = ad.vision_encoder_layers()
    maps = ad.vision_attention(batch, block=glob[-1])  # per image (V, V): rows average queries, columns sum keys
    kept = _kept_at0(ad, batch, "fastervlm", {"layer": -2})
    for b, m in enumerate(maps):
        received = [float(m[:, j].sum()) for j in range(m.shape[1])]
        assert kept[b] == _top_by_hand(received, round(0.25 * m.shape[1]))


def test_vision_scorers_refuse_families_without_maps_and_batches_without_an_encoder_run(qwen):
    ad, batch = qwen
    from schedsearch.runtime import RuntimeScheduleError

    pre = ad.precompute_vision(batch)  # the encoder does not run in the forward below
    sched = {"keep_ratios": [0.5] * ad.num_layers, "scorer": {"name": "fastervlm", "params": {}}}
    with apply_schedule(ad.model, sched, adapter=ad), pytest.raises(RuntimeScheduleError,
                                                                     match="vision encoder did not run"):
        with torch.no_grad():
            ad.model(**pre)

    class NoMaps:  # an adapter without the optional interface
        family = "fake"

    from schedsearch.runtime.apply import ScheduleHandle

    with pytest.raises(ScheduleError, match="fake adapter does not provide"):
        ScheduleHandle(NoMaps(), sched)


def test_registry_builds_the_new_names():
    assert build_scorer("fastervlm", {}).layer == -2
    assert (build_scorer("vtc_cls", {}).start, build_scorer("vtc_cls", {}).end) == (-8, -2)
    with pytest.raises(ScheduleError, match="scorer.params.layer=99 is outside"):
        build_scorer("fastervlm", {"layer": 99})
