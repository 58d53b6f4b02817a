"""VFlowOpt-style importance maps and schedules on the tiny Qwen families."""

from __future__ import annotations

import pytest
import torch

from schedsearch.runtime import apply_schedule
from schedsearch.runtime.importance import importance_from_attention, patch_entropy
from schedsearch.search.vflow import solve_stages, stage_ratios
from schedsearch.testing.tiny import tiny_images, tiny_samples


def test_importance_by_hand():
    a = torch.tensor([[0.1, 0.8, 0.1], [0.0, 0.9, 0.1], [0.2, 0.6, 0.2]])
    # received = [0.1, 0.7667, 0.1333]; mean 1/3; t=1.5 -> only token 1 is global; relevance = row 1
    assert torch.allclose(importance_from_attention(a, t=1.5), torch.tensor([0.0, 0.9, 0.1]))
    # t=0 -> every token global: relevance = column means
    assert torch.allclose(importance_from_attention(a, t=0.0), a.mean(0))
    flat = patch_entropy(torch.zeros(1, 64))
    busy = patch_entropy(torch.linspace(0, 1, 64)[None])
    assert float(flat) == pytest.approx(0.0) and float(busy) > 3.0


def test_stage_budget_solved():
    def bfn(r):
        return sum(r) / len(r)

    ratios, r_v = solve_stages(12, bfn, 0.2, 3, 0.5, 8, 0.5)
    assert bfn(ratios) == pytest.approx(0.2, abs=1e-6)
    assert ratios == pytest.approx(stage_ratios(12, r_v, 3, 0.5, 8, 0.5))


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl"])
def qwen(request, tiny_dir):
    from schedsearch.models import load_model

    return load_model(str(tiny_dir(request.param)))


@torch.no_grad()
def test_maps_follow_original_token_order(qwen):
    """The window permutation is undone: check the index mapping against the tower's own un-permutation."""
    batch = qwen.prepare([[tiny_images(1, seed=4)[0]]], ["a"])
    maps = qwen.vision_attention(batch)
    v = int(qwen.visual_mask(batch["input_ids"]).sum())
    assert len(maps) == 1 and maps[0].shape == (v, v)
    torch.testing.assert_close(maps[0].sum(1), torch.ones(v))
    visual = qwen.vision_tower
    merged_perm = {}
    h = visual.merger.register_forward_hook(lambda m, a, out: merged_perm.setdefault("x", out))
    try:
        pooled = qwen.model.base_model.get_image_features(pixel_values=batch["pixel_values"],
                                                          image_grid_thw=batch["image_grid_thw"],
                                                          return_dict=True).pooler_output[0]
    finally:
        h.remove()
    window = qwen._window_index(visual, batch["image_grid_thw"], v, pooled.device)
    torch.testing.assert_close(pooled[window], merged_perm["x"])  # the same map we use for attention rows


@torch.no_grad()
def test_live_vision_map_equals_cached_objective(qwen, tmp_path):
    from schedsearch.search.objective import Objective

    samples = tiny_samples(tmp_path, 4, seed=9, prompt="what is at {i}?")
    obj = Objective(qwen, samples, heldout_fraction=0.0, batch_size=4, vision_maps=True)
    n = qwen.num_layers
    sched = {"keep_ratios": stage_ratios(n, 0.75, 1, 0.5, 3, 0.5),
             "scorer": {"name": "external", "params": {"source": "vision_attention", "t": 1.0, "alpha": 0.2}},
             "recycling": {"grid": 2, "weighting": "importance"}}
    cached = obj._outputs("search", sched)
    from schedsearch.evaluation import make_batches

    raw = make_batches(qwen, obj.samples["search"], 4)
    with apply_schedule(qwen.model, sched, adapter=qwen) as h:
        live = torch.cat([qwen.last_hidden_state(b).float() for b in raw])
        assert 0 in h.kept_indices  # dropped before layer 0 (the stage after the vision encoder)
    torch.testing.assert_close(live, cached, atol=1e-5, rtol=1e-5)
    assert obj.score(sched) > 1e-5


def test_vflow_study_runs(qwen, tmp_path):
    pytest.importorskip("optuna")
    from schedsearch.search.objective import Objective
    from schedsearch.search.optimize import StudySettings, run_study

    samples = tiny_samples(tmp_path, 6, seed=3, prompt="count {i}")
    obj = Objective(qwen, samples, heldout_fraction=0.34, batch_size=4, vision_maps=True)
    res = run_study(StudySettings(budget=0.4, method="vflow", sampler="random", trials=3, seed=0), obj)
    assert res.budget["achieved"] <= 0.4 + 1e-12
    assert res.best.scorer["name"] == "vflow" and res.best.recycling is None  # the reference recycles in the scorer
    assert res.search_value == pytest.approx(res.study.best_value, abs=1e-6)


def test_vflow_on_a_family_without_vision_maps_is_one_line(tiny_dir):
    """LLaVA's CLIP tower has no VFlowOpt map hook: building the objective is one project error, not a traceback."""
    from schedsearch.errors import SchedsearchError
    from schedsearch.models import load_model
    from schedsearch.search.objective import Objective
    from schedsearch.testing.tiny import tiny_images

    ad = load_model(tiny_dir("llava"))

    class S:  # a calibration sample
        def __init__(self, im):
            self.images, self.prompt, self.answer = [im], "what is it ?", None

    with pytest.raises(SchedsearchError, match="method vflow needs vision-attention maps") as ei:
        Objective(ad, [S(im) for im in tiny_images(2)], heldout_fraction=0.0, vision_maps=True)
    assert "\n" not in str(ei.value)
