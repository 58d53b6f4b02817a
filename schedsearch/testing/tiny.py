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
with a newline token per row). The families of :data:`NEW_FAMILIES` keep the same text shape and add
what makes each family different (each builder's docstring says what): Qwen3-VL's DeepStack and MoE
experts, Gemma 3's and Cohere2's sliding-window layers (a window shorter than the prompts), InternVL's and Aya
Vision's tiles + thumbnail, LLaVA-OneVision's shrunk anyres grid, Idefics3 / SmolVLM's tagged tiles, Pixtral's
variable sizes, PaliGemma's prefix-LM, GLM-4V's partial interleaved rotary. Processors without torchvision are
the image-only stand-ins of :mod:`schedsearch.models.imageproc` where the stock one cannot be built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["ALL_FAMILIES", "FAMILIES", "NEW_FAMILIES", "TINY_IMAGE_SIZE", "make_tiny", "tiny_images"]

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava", "llava_next")
#: Families added in 2026-12 (issue 16); ALL_FAMILIES is what the runtime invariants run on.
NEW_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "gemma3", "internvl", "llava_onevision", "idefics3", "smolvlm",
                "mistral3", "llava_pixtral", "paligemma", "glm4v", "aya_vision")
ALL_FAMILIES = FAMILIES + NEW_FAMILIES
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
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
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

    if family not in ALL_FAMILIES:
        raise ValueError(f"make_tiny: family={family!r} is not one of {list(ALL_FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"):
        _make_qwen(family, out)
    elif family == "gemma3":
        _make_gemma3(out)
    elif family == "internvl":
        _make_internvl(out)
    elif family == "llava_onevision":
        _make_llava_onevision(out)
    elif family in ("idefics3", "smolvlm"):
        _make_idefics3(family, out)
    elif family in ("mistral3", "llava_pixtral"):
        _make_pixtral(family, out)
    elif family == "paligemma":
        _make_paligemma(out)
    elif family == "glm4v":
        _make_glm4v(out)
    elif family == "aya_vision":
        _make_aya_vision(out)
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
    patch = 14
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Cfg
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_TEXT["hidden_size"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
    elif family in ("qwen3_vl", "qwen3_vl_moe"):
        # Qwen3-VL: learned position grid (interpolated), DeepStack features from vision blocks 0 and 1 added
        # after decoder layers 0 and 1; interleaved 3-D mRoPE; per-head q/k norms. MoE: 4 experts, top 2, the
        # last layer dense (mlp_only_layers), so both MLP kinds are exercised.
        patch = 8  # real: 16; 8 gives 112 px images 49 tokens, so budgets like 0.5 are feasible in tests
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        text["rope_parameters"]["mrope_section"] = [2, 3, 3]
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_TEXT["hidden_size"],
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        if family == "qwen3_vl":
            from transformers import Qwen3VLConfig as Cfg
            from transformers import Qwen3VLForConditionalGeneration as Model
        else:
            from transformers import Qwen3VLMoeConfig as Cfg
            from transformers import Qwen3VLMoeForConditionalGeneration as Model
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                        mlp_only_layers=[_TEXT["num_hidden_layers"] - 1])
    else:
        from transformers import Qwen2VLConfig as Cfg
        from transformers import Qwen2VLForConditionalGeneration as Model
        vision = dict(depth=2, embed_dim=32, hidden_size=_TEXT["hidden_size"], mlp_ratio=2, num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Cfg(text_config=text, vision_config=vision, **common)
    model = Model(cfg).eval()
    model.save_pretrained(out)
    improc = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64})
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    # Like the released Qwen checkpoints: preprocessor_config.json names the processor class, the chat
    # template sits next to the tokenizer (the stock processor needs torchvision to be built; see PLATFORM.md).
    pre = out / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    data["processor_class"] = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(
        family, "Qwen3VLProcessor")
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


GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]
# Gemma 3's template for user turns of images and text; the processor expands <start_of_image>.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _make_gemma3(out: Path) -> None:
    """Gemma 3: SigLIP 96 px / patch 6 (16x16) average-pooled to 8x8 = 64 tokens per image; layers 0-2 slide over
    a window of 12 (shorter than every test prompt), layer 3 is global; query_pre_attn_scalar 24 != head_dim 16."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=GEMMA3_SPECIALS, chat_template=GEMMA3_TEMPLATE,
                               pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                               extra_attributes={"extra_special_tokens": {
                                   "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                   "image_token": "<image_soft_token>"}})
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    text = dict(_TEXT, head_dim=16, vocab_size=len(tok), bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
                pad_token_id=ids["<pad>"], query_pre_attn_scalar=24, sliding_window=12,
                layer_types=["sliding_attention"] * (_TEXT["num_hidden_layers"] - 1) + ["full_attention"],
                rope_parameters={"sliding_attention": dict(rope), "full_attention": dict(rope, rope_theta=20000.0)})
    text.pop("rms_norm_eps")
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=96, patch_size=6)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=64,
                       boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                       image_token_index=ids["<image_soft_token>"])
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers initialises the projection to zeros: every image would look the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    model.save_pretrained(out)
    improc = Gemma3ImageProcessorPil(size={"height": 96, "width": 96})
    Gemma3Processor(image_processor=improc, tokenizer=tok, chat_template=GEMMA3_TEMPLATE,
                    image_seq_length=64).save_pretrained(out)


INTERNVL_SPECIALS = QWEN_SPECIALS + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# InternVL3-hf: Qwen's chat format, one <IMG_CONTEXT> per image (the processor expands it)
INTERNVL_TEMPLATE = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")


def _make_internvl(out: Path) -> None:
    """InternVL3: InternViT 64 px tiles / patch 8, pixel shuffle 0.5 -> 4x4 = 16 tokens per tile; the processor cuts
    images into up to 6 tiles plus a thumbnail (a 112 px image: 2x2 tiles + thumbnail = 80 tokens); Qwen2 text."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=INTERNVL_SPECIALS, chat_template=INTERNVL_TEMPLATE,
                               pad_token="<|endoftext|>", eos_token="<|im_end|>",
                               extra_attributes={"extra_special_tokens": {
                                   "start_image_token": "<img>", "end_image_token": "</img>",
                                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}})
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIALS}
    text = dict(_TEXT, model_type="qwen2", vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[64, 64], patch_size=[8, 8])
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"],
                         image_seq_length=16, downsample_ratio=0.5)
    InternVLForConditionalGeneration(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=True, min_patches=1,
                             max_patches=6).save_pretrained(out)
    # like the released -hf checkpoints: the processor settings and the chat template next to the tokenizer
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": 16,
                                                           "processor_class": "InternVLProcessor"}, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(INTERNVL_TEMPLATE)


ONEVISION_SPECIALS = QWEN_SPECIALS + ["<image>", "<video>"]
# llava-onevision-qwen2 -hf: Qwen's chat format, one <image> per image (the processor expands it)
ONEVISION_TEMPLATE = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")


def _make_llava_onevision(out: Path) -> None:
    """LLaVA-OneVision: SigLIP 64 px / patch 8 (8x8 = 64 base tokens, no CLS), anyres tiles on pinpoints up to
    128 px, vision_aspect_ratio anyres_max_2 so a 112 px image's 16x16 high-res grid is shrunk (the bilinear path
    of pack_image_features): 64 + 11x(11+1) = 196 tokens; Qwen2 text."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=ONEVISION_SPECIALS, chat_template=ONEVISION_TEMPLATE,
                               pad_token="<|endoftext|>", eos_token="<|im_end|>",
                               extra_attributes={"extra_special_tokens": {"image_token": "<image>",
                                                                          "video_token": "<video>"}})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ONEVISION_SPECIALS}
    text = dict(_TEXT, model_type="qwen2", vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=8, vision_use_head=False)
    pinpoints = [[64, 64], [64, 128], [128, 64], [128, 128]]  # (height, width)
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                               video_token_index=ids["<video>"], image_grid_pinpoints=pinpoints,
                               vision_aspect_ratio="anyres_max_2", vision_feature_select_strategy="full",
                               vision_feature_layer=-1)
    LlavaOnevisionForConditionalGeneration(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    LlavaOnevisionImageProcessorPil(size={"height": 64, "width": 64}, image_grid_pinpoints=pinpoints,
                                    do_pad=True).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({
        "num_image_tokens": 64, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_2",
        "processor_class": "LlavaOnevisionProcessor"}, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(ONEVISION_TEMPLATE)


IDEFICS3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<fake_token_around_image>", "<image>",
                      "<global-img>", "<end_of_utterance>", "<|im_start|>"]
                     + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
# Idefics3 / SmolVLM: "User:<image>text<end_of_utterance>\nAssistant:" (SmolVLM's starts with <|im_start|>)
IDEFICS3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _make_idefics3(family: str, out: Path) -> None:
    """Idefics3 / SmolVLM: SigLIP-style tower on 64 px tiles / patch 8, pixel shuffle 2 -> 4x4 = 16 tokens per tile;
    images resized to 128 px longest edge and cut into 64 px tiles (a 112 px image: 2x2 tiles + the global image =
    80 tokens); Llama text at model.text_model."""
    import transformers

    from schedsearch.textvocab import build_word_tokenizer

    name = "Idefics3" if family == "idefics3" else "SmolVLM"
    bos = "<|begin_of_text|>" if family == "idefics3" else "<|im_start|>"
    tok = build_word_tokenizer(WORDS, special_tokens=IDEFICS3_SPECIALS, chat_template=IDEFICS3_TEMPLATE,
                               pad_token="<pad>", eos_token="<end_of_utterance>", bos_token=bos,
                               extra_attributes={"extra_special_tokens": {
                                   "fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                                   "global_image_token": "<global-img>",
                                   "end_of_utterance_token": "<end_of_utterance>"}})
    ids = {t: tok.convert_tokens_to_ids(t) for t in IDEFICS3_SPECIALS}
    text = dict(_TEXT, model_type="llama", vocab_size=len(tok), bos_token_id=ids[bos],
                eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<pad>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=8)
    cfg = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision, scale_factor=2,
                                                 image_token_id=ids["<image>"], pad_token_id=ids["<pad>"])
    getattr(transformers, f"{name}ForConditionalGeneration")(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    getattr(transformers, f"{name}ImageProcessorPil")(
        size={"longest_edge": 128}, max_image_size={"longest_edge": 64}, do_image_splitting=True).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_len": 16, "processor_class": f"{name}Processor"},
                                                          indent=2) + "\n")
    (out / "chat_template.jinja").write_text(IDEFICS3_TEMPLATE)


PIXTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral-Small-3.1 / Pixtral: "<s>[INST][IMG]text[/INST]" (the processor expands [IMG] into rows of tokens)
PIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}[IMG]"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% else %}{{ message['content'] }}</s>{% endif %}{% endfor %}"
)


def _make_pixtral(family: str, out: Path) -> None:
    """Mistral 3 (``mistral3``: Pixtral tower, 2x2 patch merger, Mistral text) or LLaVA with a Pixtral tower
    (``llava_pixtral``: model_type llava, no merging): 8 px patches, images resized to fit 128 px in multiples of
    patch x merge (a 112 px image: 7x7 = 49 tokens for Mistral 3, 14x14 = 196 for LLaVA-Pixtral) plus a break
    token per row."""
    import transformers

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=PIXTRAL_SPECIALS, chat_template=PIXTRAL_TEMPLATE,
                               pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in PIXTRAL_SPECIALS}
    text = dict(_TEXT, model_type="mistral", vocab_size=len(tok), bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                pad_token_id=ids["<pad>"], head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, image_size=128, patch_size=8,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    merge = 2 if family == "mistral3" else 1
    if family == "mistral3":
        cfg = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=ids["[IMG]"],
                                          spatial_merge_size=2, vision_feature_layer=-1)
        model = transformers.Mistral3ForConditionalGeneration(cfg)
    else:
        cfg = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=ids["[IMG]"],
                                       vision_feature_layer=-1, vision_feature_select_strategy="full",
                                       pad_token_id=ids["<pad>"])
        model = transformers.LlavaForConditionalGeneration(cfg)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    transformers.PixtralImageProcessorPil(size={"longest_edge": 128}, patch_size=8 * merge).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({
        "patch_size": 8, "spatial_merge_size": merge, "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]", "processor_class": "PixtralProcessor"}, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(PIXTRAL_TEMPLATE)


def _make_paligemma(out: Path) -> None:
    """PaliGemma 2: SigLIP 64 px / patch 8 = 64 tokens per image, prefix-LM mask from token_type_ids; Gemma 2 text
    with sliding layers (window 12, shorter than the prompts) alternating with global ones, logit soft-capping 50
    and query_pre_attn_scalar 24 != head_dim 16. No chat template (the processor writes images + <bos> + prompt)."""
    import transformers

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=["<pad>", "<eos>", "<bos>", "<image>"], pad_token="<pad>",
                               eos_token="<eos>", bos_token="<bos>",
                               extra_attributes={"extra_special_tokens": {"image_token": "<image>"}})
    improc = transformers.SiglipImageProcessorPil(size={"height": 64, "width": 64})
    improc.image_seq_length = 64
    proc = transformers.PaliGemmaProcessor(image_processor=improc, tokenizer=tok)  # adds 1024 <loc> + 128 <seg>
    tok = proc.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<image>")}
    text = dict(_TEXT, model_type="gemma2", head_dim=16, vocab_size=len(tok), bos_token_id=ids["<bos>"],
                eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"], query_pre_attn_scalar=24, sliding_window=12,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                layer_types=["sliding_attention", "full_attention"] * (_TEXT["num_hidden_layers"] // 2))
    text.pop("rms_norm_eps")
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=8, projection_dim=_TEXT["hidden_size"])
    width = _TEXT["hidden_size"]
    cfg = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                                       projection_dim=width, hidden_size=width, pad_token_id=ids["<pad>"])
    transformers.PaliGemmaForConditionalGeneration(cfg).eval().save_pretrained(out)
    proc.save_pretrained(out)


GLM4V_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
                  "<|video|>"]
# GLM-4.1V: "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>text<|assistant|>\n"
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _make_glm4v(out: Path) -> None:
    """GLM-4.1V: Qwen-style 14 px patches merged 2x2 (112 px: 16 tokens), 3-D positions; text layers rotate only
    half of each head with interleaved pairs (partial_rotary_factor 0.5, mrope_section [1, 1, 2])."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessorPil

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=GLM4V_SPECIALS, chat_template=GLM4V_TEMPLATE,
                               pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                               extra_attributes={"extra_special_tokens": {"image_token": "<|image|>",
                                                                          "video_token": "<|video|>"}})
    ids = {t: tok.convert_tokens_to_ids(t) for t in GLM4V_SPECIALS}
    text = dict(_TEXT, vocab_size=len(tok), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [1, 1, 2]})
    text.pop("rms_norm_eps")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=_TEXT["hidden_size"], image_size=112)
    cfg = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
                      video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                      image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                      video_end_token_id=ids["<|end_of_video|>"])
    Glm4vForConditionalGeneration(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    Glm4vImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                           size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}).save_pretrained(out)
    (out / "chat_template.jinja").write_text(GLM4V_TEMPLATE)


AYA_SPECIALS = ["<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                "<|CHATBOT_TOKEN|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>",
                "<image>", "TILE_GLOBAL"] + [f"TILE_{k}" for k in range(1, 13)]
# Aya Vision: "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>text<|END_OF_TURN_TOKEN|>..."
AYA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{{ '<|USER_TOKEN|>' if message['role'] == 'user' else '<|CHATBOT_TOKEN|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)


def _make_aya_vision(out: Path) -> None:
    """Aya Vision: SigLIP 64 px tiles / patch 8, pixel shuffle 2 -> 4x4 = 16 tokens per tile, GotOcr2 tiles + a
    global tile (112 px: 2x2 + 1 = 80 tokens); Cohere2 text: layers 0-2 slide over a window of 12 with interleaved
    RoPE, layer 3 is global without positional encoding; parallel attention + MLP after one LayerNorm."""
    import transformers

    from schedsearch.textvocab import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, special_tokens=AYA_SPECIALS, chat_template=AYA_TEMPLATE, pad_token="<PAD>",
                               eos_token="<|END_OF_TURN_TOKEN|>", bos_token="<BOS_TOKEN>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in AYA_SPECIALS}
    text = dict(_TEXT, model_type="cohere2", vocab_size=len(tok), bos_token_id=ids["<BOS_TOKEN>"],
                eos_token_id=ids["<|END_OF_TURN_TOKEN|>"], pad_token_id=ids["<PAD>"], sliding_window=12,
                layer_types=["sliding_attention"] * (_TEXT["num_hidden_layers"] - 1) + ["full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.pop("rms_norm_eps")
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=8)
    cfg = transformers.AyaVisionConfig(text_config=text, vision_config=vision, image_token_index=ids["<|IMG_PATCH|>"],
                                       downsample_factor=2, vision_feature_select_strategy="full",
                                       vision_feature_layer=-1)
    transformers.AyaVisionForConditionalGeneration(cfg).eval().save_pretrained(out)
    improc = transformers.GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=True,
                                                   min_patches=1, max_patches=6)
    transformers.AyaVisionProcessor(image_processor=improc, tokenizer=tok, patch_size=8, img_size=64,
                                    downsample_factor=2, chat_template=AYA_TEMPLATE).save_pretrained(out)


class AttentionUnavailable(Exception):
    """The model has no such attention implementation (e.g. Gemma 2 has no SDPA path)."""


def attention_implementation(model, impl: str):
    """Context manager: run ``model`` with attention ``impl`` ("sdpa" / "eager"), then restore every sub-model's
    previous choice (a checkpoint may mix them, e.g. PaliGemma 2: SDPA vision tower, eager Gemma 2 text).
    Raises :class:`AttentionUnavailable` when the model has no such implementation."""
    import contextlib

    @contextlib.contextmanager
    def manage():
        cfg = model.config
        before = {"": cfg._attn_implementation}
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                before[key] = sub._attn_implementation
        try:
            model.set_attn_implementation(impl)
        except ValueError as e:
            raise AttentionUnavailable(f"{type(model).__name__} has no {impl} attention: "
                                       f"{str(e).splitlines()[0][:100]}") from None
        try:
            yield model
        finally:
            model.set_attn_implementation(before)

    return manage()


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
