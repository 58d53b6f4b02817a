"""Adapters on tiny checkpoints of the four families, loading errors, and the Qwen image-only processor."""

from __future__ import annotations

import json

import pytest
import torch

from schedsearch.errors import ModelLoadError
from schedsearch.models import load_model
from schedsearch.testing.tiny import tiny_images

PROMPTS = ["what colour is it?", "is there a red square in the top left of the image?"]


def _expected_image_tokens(ad, batch) -> int:
    """Number of image tokens the processor's own outputs imply (not hard-coded)."""
    if ad.family in ("qwen2_5_vl", "qwen2_vl"):
        merge = ad.model.config.vision_config.spatial_merge_size
        return int(batch["image_grid_thw"].prod(-1).sum()) // merge**2
    # LLaVA-family processors expand each <image> to the model's feature count; count what the model packs
    with torch.no_grad():
        feats = ad.model.model.get_image_features(
            **{k: batch[k] for k in ("pixel_values", "image_sizes") if k in batch}).pooler_output
    if isinstance(feats, (list, tuple)):
        return sum(int(f.shape[0]) for f in feats)
    return int(feats.shape[0] * feats.shape[1])


@torch.no_grad()
def test_prepare_mask_coords_hidden(tiny_adapter):
    ad = tiny_adapter
    batch = ad.prepare([[im] for im in tiny_images(2)], PROMPTS)
    ids, am = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2
    assert (am[:, -1] == 1).all() and (am[0] == 0).any()  # left padding: shorter prompt padded on the left
    vis = ad.visual_mask(ids)
    assert vis.shape == ids.shape and vis.dtype == torch.bool
    assert int(vis.sum()) == _expected_image_tokens(ad, batch)
    assert vis.sum(1)[0] == vis.sum(1)[1] >= 16
    coords = ad.visual_coords(batch)
    assert coords.shape == (2, int(vis.sum(1)[0]), 3)
    assert (coords >= 0).all() and (coords[..., 1:] < 1).all() and (coords[..., 0] == 0).all()
    h = ad.last_hidden_state(batch)
    assert h.shape == (2, ad.text_config.hidden_size)
    out = ad.model(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1][:, -1], h)
    if ad.family.startswith("qwen"):
        assert torch.equal(batch["mm_token_type_ids"], vis.long())


def test_spec_paths(tiny_adapter):
    ad = tiny_adapter
    assert ad.num_layers == 4 and ad.text_config.num_key_value_heads < ad.text_config.num_attention_heads
    assert ad.vision_tower is not None and hasattr(ad.text_model, "norm")
    assert len(ad.fingerprint()) == 16


@torch.no_grad()
def test_llava_next_non_square_coords(tiny_dir):
    ad = load_model(tiny_dir("llava_next"))
    batch = ad.prepare([[im] for im in tiny_images(2, size=(112, 60))], PROMPTS)
    vis = ad.visual_mask(batch["input_ids"])
    assert int(vis.sum()) == _expected_image_tokens(ad, batch)
    coords = ad.visual_coords(batch)  # asserts the derived count equals the image-token count
    side = ad.model.config.vision_config.image_size // ad.model.config.vision_config.patch_size
    hi = coords[0, side * side:]
    newline = hi[:, 2] > 1 - 1e-5
    rows = int(newline.sum())
    assert rows < 2 * side  # unpadded: fewer rows than the padded 2-tile-high grid
    assert ((coords[..., 1:] >= 0) & (coords[..., 1:] < 1)).all()
    ad.model(**batch)  # the model accepts what the processor made


def test_qwen_image_only_processor_matches_stock_rules(tiny_dir):
    """The stand-in gives what the stock processor would: expanded pads, PIL pixel values, grid, mm types."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from schedsearch.models.qwen_vl import QwenImageProcessor

    d = tiny_dir("qwen2_5_vl")
    ad = load_model(d)
    imgs = tiny_images(2)
    batch = ad.prepare([[im] for im in imgs], PROMPTS)
    if not isinstance(ad.processor, QwenImageProcessor):
        pytest.skip("stock processor available (torchvision works here)")
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    ip = Qwen2VLImageProcessorPil.from_pretrained(d)
    ref_img = ip(images=imgs, return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], ref_img["pixel_values"], rtol=0, atol=0)
    assert torch.equal(batch["image_grid_thw"], ref_img["image_grid_thw"])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]  # 112 px / patch 14
    n = 16  # (8 * 8) / merge 2**2, by hand
    texts = [tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                     tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    texts = [t.replace("<|image_pad|>", "<|image_pad|>" * n) for t in texts]
    ref = tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"], (ref["input_ids"] == pad_id).long())
    assert (batch["mm_token_type_ids"].sum(1) == n).all()


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_dir(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "nope" / "model"))
    assert "nope" in _one_line(e)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path))
    msg = _one_line(e)
    assert "bert" in msg and "qwen2_5_vl" in msg


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path))
    assert "config.json" in _one_line(e)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path))


def test_alias_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ModelLoadError) as e:
        load_model("qwen2.5-vl")
    msg = _one_line(e)
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in msg and "offline" in msg and "--local-dir" in msg


def test_toy_missing_or_loads():
    from schedsearch.models import TOY_DIR

    if TOY_DIR.is_dir():
        assert load_model("toy").num_layers > 0
    else:
        with pytest.raises(ModelLoadError, match="toy"):
            load_model("toy")


def test_registry_is_lazy():
    import subprocess
    import sys

    code = ("import sys, schedsearch.models as m; m.resolve_model_dir; "
            "print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_image_markers_place_images_in_the_prompt(tiny_adapter):
    """``<image>`` markers put the images where they stand; without markers they come before the text."""
    ad = tiny_adapter
    ims = tiny_images(2)
    tok = ad.processor.tokenizer
    question = "what colour is it?"
    q_ids = tok(question, add_special_tokens=False)["input_ids"]

    def layout(prompt, n):
        ids = ad.prepare([ims[:n]], [prompt])["input_ids"][0]
        vis = ad.visual_mask(ids[None])[0].nonzero()[:, 0]
        row = ids.tolist()
        starts = [i for i in range(len(row) - len(q_ids) + 1) if row[i:i + len(q_ids)] == q_ids]
        assert len(starts) == 1, (prompt, row)
        return int(vis.min()), int(vis.max()), starts[0], len(vis)

    v0, v1, q, n_vis = layout(question, 1)
    assert v1 < q  # default: the image first
    v0, v1, q, n = layout(f"{question} <image>", 1)
    assert n == n_vis
    # the chat template decides the final layout: Qwen's follows the content order; LLaVA-1.5's (and the tiny
    # one built like it) writes every image first
    if not ad.family.startswith("llava"):
        assert q + len(q_ids) <= v0  # marker after the text: the image follows it
        v0, v1, q, n = layout(f"<image> {question} <image>", 2)
        assert n == 2 * n_vis and v0 < q < v1
    with pytest.raises(ValueError, match="marker"):
        ad.prepare([ims[:1]], [f"{question} <image> <image>"])

