"""Gemma 3 adapter.

Lifecycle::

    adapter = Gemma3Adapter.load(dir)        # from_pretrained(dir) + Gemma3Processor (PIL image processor)
    batch = adapter.prepare([[img]], ["q"])  # chat template, left padding, token_type_ids (1 = image token)
    adapter.visual_coords(batch)             # (B, V, 3): each image's pooled SigLIP grid in raster order

Per image the processor writes ``<start_of_image>``, ``mm_tokens_per_image`` image tokens and
``<end_of_image>``; the projector average-pools the SigLIP patch grid to a square of that many tokens in raster
order. Gemma 3 attends bidirectionally among the tokens of one image (``token_type_ids`` must reach the model,
so ``prepare`` keeps them) and builds one 4-D mask per layer type (``full_attention`` / ``sliding_attention``),
which its base model hands to the text model as a dict; the runtime takes the padding mask from the base model
and slices each layer's own mask (runtime/masks.py). With pan-and-scan (``do_pan_and_scan``) the processor adds
crops after the image, each with its own image-token block; each block is then counted as an image of its own
(its coordinates are within the crop).
"""

from __future__ import annotations

from typing import Any

from schedsearch.models.base import FamilySpec, VLMAdapter, chat_batch
from schedsearch.models.qwen_vl import _assign_images
from schedsearch.models.tiles import grid_rc, visual_runs

__all__ = ["GEMMA3_SPECS", "Gemma3Adapter"]

GEMMA3_SPECS: dict[str, FamilySpec] = {
    "gemma3": FamilySpec(family="gemma3", model_types=("gemma3",), model_class="Gemma3ForConditionalGeneration",
                         text_model_path="model.language_model", vision_path="model.vision_tower",
                         token_types=(("token_type_ids", 0),)),
}


class Gemma3Adapter(VLMAdapter):
    spec = GEMMA3_SPECS["gemma3"]

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
        batch = chat_batch(self.processor, images, prompts, nested=True, drop=())
        batch.pop("num_crops", None)
        return batch.to(self.model.device)

    def visual_coords(self, batch: Any) -> Any:
        import math

        vis = self.visual_mask(batch["input_ids"])
        per = int(self.model.config.mm_tokens_per_image)
        side = math.isqrt(per)
        rc = grid_rc(side, side)
        blocks = [n for runs in visual_runs(vis) for n in runs]
        if any(n != per for n in blocks):
            raise ValueError(f"visual_coords: image-token blocks of {sorted(set(blocks))} tokens, expected "
                             f"mm_tokens_per_image={per}")
        return _assign_images([rc] * len(blocks), vis)

