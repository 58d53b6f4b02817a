"""Tiny random-init checkpoints of the real transformers VLM classes, for tests.

Lifecycle::

    path = make_tiny("qwen2_5_vl", tmp_dir)     # config -> random model + tokenizer + processor -> save_pretrained
    adapter = load_model(path)                  # the same loading path a real checkpoint takes
    batch = adapter.prepare([[img] for img in tiny_images(2)], ["a", "b"])

Each model is the real ``*ForConditionalGeneration`` class with a few-layer config: text decoder
hidden 64, 4 layers, 4 attention heads over 2 KV heads (GQA), SwiGLU intermediate 128; a 2-layer
vision tower. The tokenizer is a word-level one (:func:`schedsearch.textvocab.build_word_tokenizer`)
that carries the family's real special tokens and a chat template of the same shape as the real one.
Images of :data:`TINY_IMAGE_SIZE` give 16 visual tokens (Qwen: 112 px / patch 14 / merge 2 = 4x4),
64 (LLaVA-1.5: CLIP 64 px / patch 8) or 64 + 8x9 = 136 (LLaVA-NeXT: base grid + one high-res tile
with a newline token per row).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "TINY_IMAGE_SIZE", "make_tiny", "tiny_images"]

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava", "llava_next")
TINY_IMAGE_SIZE = (112, 112)  # (width, height) of tiny_images() by default

WORDS = ("what colour is it the a an of in on top left right bottom red green blue square circle there "
         "image picture describe yes no how many shapes are and to this user assistant system you helpful").split() + \
    list("?.,:!")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Same shape as Qwen's template for image-then-text user turns (the real one also adds a default system turn).
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# LLaVA-1.5 / NeXT (mistral) style: "USER: <image>\n{text} ASSISTANT:".
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


def tiny_images(n: int, size: tuple[int, int] = TINY_IMAGE_SIZE, seed: int = 0) -> list[Any]:
    """``n`` deterministic RGB PIL images of ``size`` (width, height): a noisy background and a coloured square."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        arr = rng.integers(0, 64, size=(h, w, 3), dtype=np.uint8)
        s = max(2, min(w, h) // 3)
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        arr[y:y + s, x:x + s] = rng.integers(128, 256, size=3, dtype=np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


def make_tiny(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny random-init checkpoint of ``family`` (one of :data:`FAMILIES`) into ``out_dir``.

    Writes config.json, weights, tokenizer files, chat template and the processor config with
    ``save_pretrained`` so that ``load_model(out_dir)`` takes the real-checkpoint path. Returns the path.
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"make_tiny: family={family!r} is not one of {list(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family in ("qwen2_5_vl", "qwen2_vl"):
        _make_qwen(family, out)
    else:
        _make_llava(family, out)
    return out


def _make_qwen(family: str, out: Path) -> None:
    from transformers import Qwen2VLImageProcessorPil

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=QWEN_SPECIALS, chat_template=QWEN_TEMPLATE,
                               pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]  # 16 -> mrope over 8 frequency pairs
    text = dict(_TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, head_dim // 2 - 5]})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Cfg
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
    else:
        from transformers import Qwen2VLConfig as Cfg
        from transformers import Qwen2VLForConditionalGeneration as Model
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Cfg(text_config=text, vision_config=vision, **common)
    model = Model(cfg).eval()
    model.save_pretrained(out)
    improc = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64})
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    # Like the released Qwen checkpoints: preprocessor_config.json names the processor class, the chat
    # template sits next to the tokenizer (the stock processor needs torchvision to be built; see PLATFORM.md).
    pre = out / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    data["processor_class"] = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
    pre.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(QWEN_TEMPLATE)


def _make_llava(family: str, out: Path) -> None:
    from transformers import CLIPVisionConfig

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=LLAVA_SPECIALS, chat_template=LLAVA_TEMPLATE,
                               pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    text = dict(_TEXT, model_type="llama" if family == "llava" else "mistral", vocab_size=len(tok),
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=8, projection_dim=32)
    common = dict(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                  vision_feature_select_strategy="default", vision_feature_layer=-2, pad_token_id=ids["<pad>"])
    improc_kw = dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, do_center_crop=True,
                     image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    if family == "llava":
        from transformers import CLIPImageProcessorPil as ImProc
        from transformers import LlavaConfig as Cfg
        from transformers import LlavaForConditionalGeneration as Model
        from transformers import LlavaProcessor as Proc
        cfg = Cfg(image_seq_length=64, **common)
    else:
        from transformers import LlavaNextConfig as Cfg
        from transformers import LlavaNextForConditionalGeneration as Model
        from transformers import LlavaNextImageProcessorPil as ImProc
        from transformers import LlavaNextProcessor as Proc
        pinpoints = [[64, 64], [64, 128], [128, 64]]  # (height, width)
        cfg = Cfg(image_grid_pinpoints=pinpoints, image_seq_length=64, **common)
        improc_kw["image_grid_pinpoints"] = pinpoints
    model = Model(cfg).eval()
    model.save_pretrained(out)
    proc = Proc(image_processor=ImProc(**improc_kw), tokenizer=tok, patch_size=8,
                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                chat_template=LLAVA_TEMPLATE)
    proc.save_pretrained(out)


def schedule_for(adapter, ratios, *, scorer: str = "last_token_attention", params: dict | None = None,
                 requested: float = 0.5):
    """A valid :class:`~schedsearch.schedule.Schedule` for ``adapter`` with the given keep ratios (tests, demos)."""
    from schedsearch.schedule import SCHEMA_VERSION, Schedule, make_provenance

    return Schedule.from_dict({
        "schema_version": SCHEMA_VERSION, "keep_ratios": list(ratios),
        "scorer": {"name": scorer, "params": params if params is not None else {"rope": False}},
        "recycling": None,
        "model": {"family": adapter.family, "name": str(adapter.name_or_path), "num_layers": adapter.num_layers,
                  "fingerprint": adapter.fingerprint()},
        "budget": {"kind": "flops", "requested": requested, "achieved": None},
        "objective": None, "method": {"name": "manual", "params": {}},
        "provenance": make_provenance().to_dict(),
    })


def tiny_samples(folder, n: int, *, seed: int = 0, prompt: str = "what is object {i}?") -> list:
    """``n`` calibration :class:`~schedsearch.calibration.Sample` objects with images saved under ``folder``."""
    from schedsearch.calibration import Sample

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, im in enumerate(tiny_images(n, seed=seed)):
        p = folder / f"{seed}-{i}.png"
        im.save(p)
        out.append(Sample(prompt=prompt.format(i=i), image_paths=(p,)))
    return out
