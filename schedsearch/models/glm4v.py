"""GLM-4V (GLM-4.1V / GLM-4.5V family, ``glm4v``) adapter.

Lifecycle::

    adapter = Glm4vAdapter.load(dir)         # from_pretrained(dir) + processor (an image-only stand-in if needed)
    batch = adapter.prepare([[img]], ["q"])  # chat template, left padding, mm_token_type_ids
    adapter.visual_coords(batch)             # (B, V, 3) from image_grid_thw and the merge size

Images are laid out as in Qwen2-VL (``image_grid_thw``, 2x2 merged patches in raster order, 3-D positions from
``mm_token_type_ids``; the Qwen adapter's coordinates and vision-attention maps apply), written as
``<|begin_of_image|>`` + ``<|image|>`` x tokens + ``<|end_of_image|>``. The text layers rotate only part of each
head, with interleaved pairs (``glm4v.modeling_glm4v.apply_rotary_pos_emb``: the first ``cos.shape[-1]`` dims,
``rotate_half_llm``), so :meth:`Glm4vAdapter.rotary` hands the attention scorers that very function.
``Glm4vProcessor`` owns a video processor (torchvision); :class:`Glm4vImageProcessor` stands in
(``Glm4vProcessor.replace_image_token``: grid t*h*w / merge**2 tokens per image).
"""

from __future__ import annotations

from typing import Any

from schedsearch.models import load_hf_model
from schedsearch.models.base import FamilySpec, VLMAdapter, chat_batch
from schedsearch.models.imageproc import ImageOnlyProcessor, load_processor
from schedsearch.models.qwen_vl import _QwenAdapter

__all__ = ["GLM4V_SPECS", "Glm4vAdapter", "Glm4vImageProcessor"]

GLM4V_SPECS: dict[str, FamilySpec] = {
    "glm4v": FamilySpec(family="glm4v", model_types=("glm4v",), model_class="Glm4vForConditionalGeneration",
                        text_model_path="model.language_model", vision_path="model.visual",
                        token_types=(("mm_token_type_ids", 0),)),
}


class Glm4vImageProcessor(ImageOnlyProcessor):
    """Stand-in for ``Glm4vProcessor`` on images: ``<|image|>`` x (t*h*w / merge**2) per image, mm_token_type_ids."""

    mm_token_types = True

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None, **settings: Any):
        super().__init__(tokenizer, image_processor, chat_template, **settings)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image|>"

    def expand(self, image_inputs: dict, index: int) -> str:
        merge = int(self.image_processor.merge_size) ** 2
        return self.image_token * (int(image_inputs["image_grid_thw"][index].prod()) // merge)


class Glm4vAdapter(_QwenAdapter):
    spec = GLM4V_SPECS["glm4v"]

    @classmethod
    def load(cls, path: str, *, dtype: Any = None, attn_implementation: str | None = None,
             device: str | None = None) -> VLMAdapter:
        model = load_hf_model(cls.spec.model_class, path, dtype=dtype, attn_implementation=attn_implementation,
                              device=device)
        return cls(model, load_processor(path, "Glm4vImageProcessorPil", lambda tok, improc, template, s:
                                         Glm4vImageProcessor(tok, improc, template, **s)), path)

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
        batch = chat_batch(self.processor, images, prompts)
        if "mm_token_type_ids" not in batch:  # the model needs it (3-D positions)
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return batch.to(self.model.device)

    def rotary(self, layer_idx: int) -> Any:
        from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb

        return lambda x, cos, sin: apply_rotary_pos_emb(x, x, cos, sin)[0]
