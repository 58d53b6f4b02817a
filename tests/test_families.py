"""Families added for issue 16 (Qwen3-VL / -MoE, InternVL, Gemma 3, LLaVA-OneVision, Idefics3 / SmolVLM, Mistral 3,
...): checks beyond tests/test_runtime.py's invariants, on tiny random-init checkpoints loaded with load_model(DIR).

* pruning == masking: a pruned prefill gives the same last-token logits as the UNPRUNED model run with eager
  attention where every dropped token's key is masked out from the layer it is dropped at on (an independent
  reference: dropped tokens then influence nothing, and survivors keep everything else -- positions, DeepStack
  features, bidirectional image blocks, sliding windows);
* a left-padded batch gives each sample's prefill logits (not only its greedy tokens) as when run alone;
* visual_coords for every layout the family has.
"""

from __future__ import annotations

import pytest
import torch

from schedsearch.runtime import apply_schedule
from schedsearch.testing.tiny import NEW_FAMILIES, attention_implementation, tiny_images

PROMPTS = ["what is it?", "count the shapes in the top half of the image please"]


def _sched(n: int, ratios, scorer: str = "uniform") -> dict:
    return {"keep_ratios": list(ratios), "scorer": {"name": scorer, "params": {}}, "recycling": None}


def _batch(ad, prompts, seed=0):
    img = tiny_images(1, seed=seed)[0]
    return ad.prepare([[img] for _ in prompts], prompts)


def _masking_hooks(ad, kept: dict[int, torch.Tensor], n: int) -> list:
    """Per-layer pre-hooks that mask out, in each layer's own 4-D (eager, additive) mask, the keys not in
    ``kept[l]`` (original positions alive at layer l)."""

    def make(l):
        def hook(module, args, kwargs):
            if l not in kept:
                return None
            mask = kwargs["attention_mask"]
            assert isinstance(mask, torch.Tensor) and mask.dim() == 4, type(mask)
            alive = torch.zeros(mask.shape[0] if mask.shape[0] > 1 else kept[l].shape[0], n, dtype=torch.bool)
            alive.scatter_(1, kept[l], True)
            mask = mask.expand(alive.shape[0], *mask.shape[1:]).clone()
            mask.masked_fill_(~alive[:, None, None, :], torch.finfo(mask.dtype).min)
            kwargs["attention_mask"] = mask
            return args, kwargs
        return hook

    return [layer.register_forward_pre_hook(make(l), with_kwargs=True) for l, layer in enumerate(ad.decoder_layers)]


@pytest.mark.parametrize("where", ["layer0", "mid"])
@torch.no_grad()
def test_pruning_equals_masking(family_adapter, where):
    ad = family_adapter
    n_layers = ad.num_layers
    ratios = [0.5] * (n_layers - 1) + [0.25] if where == "layer0" else [1.0] + [0.5] * (n_layers - 2) + [0.25]
    with attention_implementation(ad.model, "eager"):
        batch = _batch(ad, PROMPTS)
        with apply_schedule(ad.model, _sched(n_layers, ratios, "last_token_attention"), adapter=ad) as h:
            pruned = ad.model(**batch).logits[:, -1]
            kept = {l: t.clone() for l, t in h.kept_indices.items()}
        assert kept, "nothing was dropped"
        hooks = _masking_hooks(ad, kept, batch["input_ids"].shape[1])
        try:
            ref = ad.model(**batch).logits[:, -1]
        finally:
            for hd in hooks:
                hd.remove()
    torch.testing.assert_close(pruned, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scorer", ["last_token_attention", "diverse"])
@torch.no_grad()
def test_padded_prefill_logits_equal_alone(family_adapter, scorer):
    ad = family_adapter
    n = ad.num_layers
    sched = _sched(n, [1.0] + [0.5] * (n - 2) + [0.25], scorer)
    both = _batch(ad, PROMPTS)
    assert int((both["attention_mask"] == 0).sum()) > 0
    with apply_schedule(ad.model, sched, adapter=ad):
        got = ad.model(**both).logits[:, -1]
        for i, p in enumerate(PROMPTS):
            alone = ad.model(**_batch(ad, [p])).logits[:, -1]
            torch.testing.assert_close(got[i], alone[0], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- FLOPs / KV
def _moe_text():
    from transformers import Qwen3VLMoeTextConfig, Qwen3VLMoeTextModel

    # layer 1 dense (mlp_only_layers); experts run by transformers' eager loop so FlopCounterMode sees them
    cfg = Qwen3VLMoeTextConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                               num_attention_heads=6, num_key_value_heads=2, head_dim=12, num_experts=6,
                               num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[1],
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 2, 2]},
                               attn_implementation="eager", experts_implementation="eager")
    return Qwen3VLMoeTextModel(cfg).eval()


def _gemma3_text():
    from transformers import Gemma3TextConfig, Gemma3TextModel

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                           query_pre_attn_scalar=20, attn_implementation="eager",
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    return Gemma3TextModel(cfg).eval()


def _glm4v_text():
    from transformers import Glm4vTextConfig, Glm4vTextModel

    # partial interleaved rotary, q/k/v biases, fused gate_up MLP, extra post-norms
    cfg = Glm4vTextConfig(vocab_size=64, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                           "mrope_section": [1, 1, 2]})
    return Glm4vTextModel(cfg).eval()


TEXT_BUILDERS = {"qwen3_vl_moe_text": _moe_text, "gemma3_text": _gemma3_text, "glm4v_text": _glm4v_text}


@pytest.mark.parametrize("name", sorted(TEXT_BUILDERS))
@torch.no_grad()
def test_family_flops_and_kv_match_real_model(name):
    """Per-layer analytic FLOPs (MoE: router + active experts; sliding layers: the full square eager computes)
    within 3% of FlopCounterMode with eager attention, unpruned and pruned; KV bytes (sliding layers: window - 1
    tokens) equal to the real DynamicCache."""
    from torch.utils.flop_counter import FlopCounterMode

    from schedsearch.flops import DecoderShape, kv_cache_bytes, prefill_flops
    from schedsearch.schedule import kept_counts

    torch.manual_seed(0)
    model = TEXT_BUILDERS[name]()
    shape = DecoderShape.from_config(model.config)
    assert shape.moe_layers == ((0, 2) if name.startswith("qwen3") else ())
    assert shape.sliding_layers == ((0, 2) if name.startswith("gemma3") else ())
    n_text, n_visual = 7, 24
    ratios = [1.0, 0.5] + [0.25] * (shape.num_layers - 2)
    counts = kept_counts(ratios, n_visual)

    def keep_first(k):
        def hook(_m, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            hs = hs[:, :k]
            args = (hs, *args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = hs
            if isinstance(kwargs.get("attention_mask"), torch.Tensor):
                kwargs["attention_mask"] = kwargs["attention_mask"][..., :k, :k]
            kwargs["position_embeddings"] = tuple(t[..., :k, :] for t in kwargs["position_embeddings"])
            return args, kwargs
        return hook

    for rat, cnt in (([1.0] * shape.num_layers, [n_visual] * shape.num_layers), (ratios, counts)):
        hooks = [layer.register_forward_pre_hook(keep_first(n_text + c), with_kwargs=True)
                 for layer, c in zip(model.layers, cnt, strict=True)]
        try:
            with FlopCounterMode(display=False) as counter:
                out = model(input_ids=torch.randint(3, 64, (1, n_text + n_visual)), use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        measured = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        root = type(model).__name__
        analytic = prefill_flops(shape, n_text, n_visual, rat)
        for i, a in enumerate(analytic):
            m = measured.get(f"{root}.layers.{i}", 0)
            assert m > 0 and abs(a - m) / m <= 0.03, (i, a, m)
        real = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys,
                                                                                                  layer.values))
        assert kv_cache_bytes(shape, n_text, n_visual, rat, dtype_bytes=4) == real


# ------------------------------------------------------------------------------------------------- layouts
SIZES = [(112, 112), (112, 60), (60, 112)]  # (width, height): square, wide, tall


@pytest.mark.parametrize("size", SIZES)
@torch.no_grad()
def test_visual_coords_every_layout(family_adapter, size):
    """visual_coords for square / wide / tall images and two images in one prompt: one row per visual token, inside
    the image, identical from the processor batch and from precompute_vision's (the objective's path)."""
    ad = family_adapter
    ims = tiny_images(3, size=size)
    for images, prompts in (([[ims[0]], [ims[1]]], PROMPTS), ([[ims[0], ims[2]]], ["compare <image> and <image>"])):
        batch = ad.prepare(images, prompts)
        vis = ad.visual_mask(batch["input_ids"])
        coords = ad.visual_coords(batch)
        assert coords.shape == (len(prompts), int(vis.sum(1)[0]), 3)
        assert ((coords[..., 1:] >= 0) & (coords[..., 1:] < 1)).all()
        assert sorted(coords[0, :, 0].unique().tolist()) == list(range(len(images[0])))
        torch.testing.assert_close(ad.visual_coords(ad.precompute_vision(batch)), coords)
        ad.model(**batch)  # the model accepts what the processor made


@torch.no_grad()
def test_images_reach_the_model(family_adapter):
    """Two different images give different last-token logits (no zero-initialised projector hides them)."""
    ad = family_adapter
    a, b = tiny_images(2, seed=3)
    la = ad.model(**ad.prepare([[a]], ["what is it?"])).logits[0, -1]
    lb = ad.model(**ad.prepare([[b]], ["what is it?"])).logits[0, -1]
    assert not torch.allclose(la, lb, atol=1e-4)


@pytest.mark.parametrize("size", [(112, 112), (112, 60), (60, 112), (200, 60), (60, 200), (150, 100)])
@torch.no_grad()
def test_internvl_tile_grid_is_the_processors(tiny_dir, size):
    """The grid found from the tiles and the thumbnail is the one GotOcr2's processor chose from the image size."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    from schedsearch.models import load_model

    ad = load_model(tiny_dir("internvl"))
    ip = ad.processor.image_processor
    w, h = size
    cols, rows = get_optimal_tiled_canvas((h, w), (ip.size["height"], ip.size["width"]), ip.min_patches,
                                          ip.max_patches)
    batch = ad.prepare([tiny_images(1, size=size, seed=7)], ["where?"])
    assert ad.image_layout(batch) == [(rows, cols)]
    coords = ad.visual_coords(batch)[0]
    side = ad.tile_side
    n_tiles = rows * cols
    assert coords.shape[0] == side * side * (n_tiles + (1 if n_tiles > 1 else 0))
    tiles = coords[: side * side * n_tiles]
    assert len(tiles[:, 1].unique()) == rows * side and len(tiles[:, 2].unique()) == cols * side


@torch.no_grad()
def test_idefics3_stand_in_processor_equals_stock(tiny_dir):
    """The image-only stand-in (what SmolVLM uses without torchvision) gives exactly the stock Idefics3Processor's
    batch: ids with <row_i_col_j> / <global-img> tags, mask, pixels."""
    from transformers import AutoTokenizer, Idefics3ImageProcessorPil

    from schedsearch.models import load_model
    from schedsearch.models.idefics3 import Idefics3ImageProcessor

    d = tiny_dir("idefics3")
    ad = load_model(d)
    assert type(ad.processor).__name__ == "Idefics3Processor"  # stock (no torchvision needed for Idefics3)
    stand_in = Idefics3ImageProcessor(AutoTokenizer.from_pretrained(d), Idefics3ImageProcessorPil.from_pretrained(d),
                                      ad.processor.chat_template, image_seq_len=16)
    images = [[tiny_images(1, size=(112, 60))[0]], [tiny_images(1, size=(200, 60), seed=1)[0]]]
    want = ad.prepare(images, PROMPTS)
    ad.processor, stock = stand_in, ad.processor
    try:
        got = ad.prepare(images, PROMPTS)
    finally:
        ad.processor = stock
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@torch.no_grad()
def test_idefics3_coords_follow_the_row_col_tags(tiny_dir):
    from schedsearch.models import load_model

    ad = load_model(tiny_dir("smolvlm"))
    batch = ad.prepare([tiny_images(1, size=(200, 60))], ["where?"])  # one row of 2 tiles, then the global image
    ids = batch["input_ids"][0].tolist()
    tok = ad.processor.tokenizer
    tags = [tok.convert_ids_to_tokens(ids[i - 1]) for i in range(1, len(ids))
            if ids[i] == ad.image_token_id and ids[i - 1] != ad.image_token_id]
    assert tags == ["<row_1_col_1>", "<row_1_col_2>", "<global-img>"]
    c = ad.visual_coords(batch)[0]
    left, right, glob = c[:16], c[16:32], c[32:]
    assert (left[:, 2] < 0.5).all() and (right[:, 2] >= 0.5).all()  # tile 1 is the left half, tile 2 the right
    assert len(glob[:, 1].unique()) == 4 and len(glob[:, 2].unique()) == 4  # the global image: its own 4x4 grid


@pytest.mark.parametrize("family", ["mistral3", "llava_pixtral"])
@torch.no_grad()
def test_pixtral_token_rows(tiny_dir, family):
    """PixtralProcessor's rule, without torchvision: per row of the resized image [IMG] x cols + [IMG_BREAK], the
    last break replaced by [IMG_END]; rows/cols = image_sizes // (patch x merge); coords follow that grid."""
    from schedsearch.models import load_model

    ad = load_model(tiny_dir(family))
    unit = ad.processor.unit
    batch = ad.prepare([tiny_images(1, size=(112, 60))], ["where?"])
    h, w = batch["image_sizes"][0].tolist()
    rows, cols = h // unit, w // unit
    tok = ad.processor.tokenizer
    ids = batch["input_ids"][0].tolist()
    start = ids.index(ad.image_token_id)
    want = ([ad.image_token_id] * cols + [tok.convert_tokens_to_ids("[IMG_BREAK]")]) * rows
    want[-1] = tok.convert_tokens_to_ids("[IMG_END]")
    assert ids[start:start + len(want)] == want
    c = ad.visual_coords(batch)[0]
    assert len(c[:, 1].unique()) == rows and len(c[:, 2].unique()) == cols


def test_llava_processor_error_is_one_line_with_its_reason(tiny_dir, monkeypatch):
    """transformers' ImportError texts start with a newline: the one-line error must still carry the reason."""
    import transformers

    from schedsearch.errors import ModelLoadError
    from schedsearch.models import load_model

    def broken(*a, **k):
        raise ImportError("\nPixtralProcessor requires the Torchvision library but it was not found in your "
                          "environment.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken)
    with pytest.raises(ModelLoadError) as err:
        load_model(tiny_dir("llava"))
    msg = str(err.value)
    assert "\n" not in msg and "requires the Torchvision library" in msg


@pytest.mark.parametrize("model_type,why", [("qwen3_5", "linear-attention"), ("qwen3_5_moe", "recurrent state"),
                                            ("llama4", "inputs_embeds only")])
def test_refused_families_say_why_in_one_line(tmp_path, model_type, why):
    import json

    from schedsearch.errors import ModelLoadError
    from schedsearch.models import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and model_type in msg and "not supported" in msg and why in msg


@pytest.mark.slow
def test_refused_family_on_the_command_line(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4"}))
    img = tmp_path / "a.png"
    tiny_images(1)[0].save(img)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "what is it?"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "optimize", "--model", str(tmp_path), "--budget",
                           "0.5", "--calibration", str(tmp_path / "m.jsonl")], capture_output=True, text=True,
                          timeout=180, check=False, cwd=tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "'llama4' is not supported: Llama 4" in errors[0], proc.stderr


@torch.no_grad()
def test_position_schedule_on_precomputed_vision(family_adapter):
    """The objective's path: a schedule that needs token positions (diverse scorer + recycling) gives the same
    last-token state on a precompute_vision batch (no pixels) as on the processor's batch."""
    ad = family_adapter
    n = ad.num_layers
    sched = {"keep_ratios": [1.0] + [0.5] * (n - 1), "scorer": {"name": "diverse", "params": {"spatial": 4.0}},
             "recycling": {"grid": 2, "weighting": "importance"}}
    batch = _batch(ad, PROMPTS)
    with apply_schedule(ad.model, sched, adapter=ad):
        want = ad.last_hidden_state(batch)
        got = ad.last_hidden_state(ad.precompute_vision(batch))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_optimize_and_evaluate_commands(family, tiny_dir, tmp_path, monkeypatch, capsys):
    """`schedsearch optimize --model DIR --trials 3 --budget 0.5` then `evaluate` on the schedule it wrote."""
    import json

    from schedsearch.cli import main

    monkeypatch.chdir(tmp_path)
    lines = []
    for i, im in enumerate(tiny_images(6, seed=4)):
        im.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": f"what is in the top left of picture {i}?"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    d = str(tiny_dir(family))
    rc = main(["optimize", "--model", d, "--trials", "3", "--budget", "0.5", "--calibration", "manifest.jsonl",
               "--study", "s"])
    assert rc == 0, capsys.readouterr().err
    written = sorted((tmp_path / "schedules").glob("*.json"))
    assert len(written) == 1
    capsys.readouterr()
    rc = main(["evaluate", str(written[0]), "--model", d, "--calibration", "manifest.jsonl", "--json", "--no-timing"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["n_samples"] == 6 and 0 < rep["flops_ratio"] <= 0.5 + 1e-9 and rep["discrepancy"] >= 0.0


@torch.no_grad()
def test_scorer_matches_eager_attention_at_every_layer(family_adapter):
    """test_runtime checks layer 1; here every layer, so sliding / global layers, layers without RoPE (Aya Vision's
    Cohere2) and partial rotary (GLM-4V) are all compared with the eager weights."""
    from schedsearch.schedule import kept_counts

    ad = family_adapter
    n = ad.num_layers
    with attention_implementation(ad.model, "eager"):
        batch = _batch(ad, ["is the square above the circle? count the shapes in the top half please"])
        rows = ad.model(**batch, output_attentions=True).attentions
        vis = ad.visual_mask(batch["input_ids"])[0]
        vis_pos = vis.nonzero().squeeze(1)
        n_keep = kept_counts([0.5], len(vis_pos))[0]
        for layer in range(n):
            row = rows[layer][0, :, -1, :].mean(0)
            with apply_schedule(ad.model, _sched(n, [1.0] * layer + [0.5] * (n - layer), "last_token_attention"),
                                adapter=ad) as h:
                ad.model(**batch)
                kept = {i for i in h.kept_indices[layer][0].tolist() if vis[i]}
            top = vis_pos[torch.argsort(row[vis_pos], descending=True, stable=True)[:n_keep]]
            assert {int(i) for i in top} == kept, layer


@pytest.mark.parametrize("family,module", [("qwen3_vl", "qwen3_vl"), ("glm4v", "glm4v")])
@torch.no_grad()
def test_vision_attention_maps_of_qwen_style_towers(tiny_dir, family, module):
    """The vflow maps (Qwen adapter's vision-attention hook) on Qwen3-VL's and GLM-4V's towers equal the head-mean
    softmax(q k^T) that the block's own qkv and the family's own apply_rotary_pos_emb_vision give, merged 2x2."""
    import importlib

    from schedsearch.models import load_model

    ad = load_model(tiny_dir(family))
    rope = importlib.import_module(f"transformers.models.{module}.modeling_{module}").apply_rotary_pos_emb_vision
    batch = ad.prepare([[tiny_images(1, size=(112, 60), seed=2)[0]]], ["a"])
    seen = {}
    attn = ad.vision_tower.blocks[-1].attn
    hook = attn.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"], **k),
                                          with_kwargs=True)
    try:
        maps = ad.vision_attention(batch)
    finally:
        hook.remove()
    h, (cos, sin) = seen["h"], seen["position_embeddings"]
    q, k, _ = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rope(q, k, cos, sin)
    probs = torch.softmax(torch.einsum("qhd,khd->hqk", q.float(), k.float()) * attn.scaling, dim=-1).mean(0)
    unit = ad.merge_size ** 2
    v = h.shape[0] // unit
    want = probs.reshape(v, unit, v, unit).sum(3).mean(1)
    assert len(maps) == 1 and maps[0].shape == (v, v) == (int(ad.visual_mask(batch["input_ids"]).sum()),) * 2
    torch.testing.assert_close(maps[0], want, atol=1e-5, rtol=1e-4)
