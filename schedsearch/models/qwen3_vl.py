"""Qwen3-VL and Qwen3-VL-MoE adapters.

Lifecycle::

    adapter = Qwen3VLAdapter.load(dir)      # from_pretrained(dir) + processor (image-only stand-in without torchvision)
    batch = adapter.prepare([[img]], ["q"])  # chat template, left padding, mm_token_type_ids
    adapter.visual_coords(batch)             # (B, V, 3) from image_grid_thw and the merge size

Qwen3-VL lays out images like Qwen2.5-VL (``<|image_pad|>`` expanded to ``t*h*w / merge**2`` tokens in
raster order of merged 2x2 patches, 3-D mRoPE, ``mm_token_type_ids``), with 16 px patches. What is new is
DeepStack (Meng et al., arXiv 2406.04334): the vision tower also returns features of a few intermediate blocks,
and ``Qwen3VLTextModel.forward`` adds feature list entry ``i`` to the hidden states at the visual positions
right after decoder layer ``i``. ``FamilySpec.deepstack_kwargs`` names the two text-model kwargs so the runtime
can take them over and add each feature only at the visual tokens that are still alive
(:mod:`schedsearch.runtime.deepstack`). The processor is the stock one where torchvision works, otherwise the
image-only :class:`~schedsearch.models.qwen_vl.QwenImageProcessor` (its video processor needs torchvision).
"""

from __future__ import annotations

from schedsearch.models.base import FamilySpec
from schedsearch.models.qwen_vl import _QwenAdapter

__all__ = ["QWEN3_SPECS", "Qwen3VLAdapter", "Qwen3VLMoeAdapter"]

_DEEPSTACK = ("visual_pos_masks", "deepstack_visual_embeds")
QWEN3_SPECS: dict[str, FamilySpec] = {
    "qwen3_vl": FamilySpec(family="qwen3_vl", model_types=("qwen3_vl",), model_class="Qwen3VLForConditionalGeneration",
                           text_model_path="model.language_model", vision_path="model.visual",
                           deepstack_kwargs=_DEEPSTACK, token_types=(("mm_token_type_ids", 0),), video="qwen3"),
    "qwen3_vl_moe": FamilySpec(family="qwen3_vl_moe", model_types=("qwen3_vl_moe",),
                               model_class="Qwen3VLMoeForConditionalGeneration",
                               text_model_path="model.language_model", vision_path="model.visual",
                               deepstack_kwargs=_DEEPSTACK, token_types=(("mm_token_type_ids", 0),), video="qwen3"),
}


class Qwen3VLAdapter(_QwenAdapter):
    spec = QWEN3_SPECS["qwen3_vl"]


class Qwen3VLMoeAdapter(_QwenAdapter):
    spec = QWEN3_SPECS["qwen3_vl_moe"]
