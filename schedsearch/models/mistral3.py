"""Mistral 3 (Mistral-Small-3.x) and LLaVA-with-a-Pixtral-tower (Pixtral-12B) adapters.

Lifecycle::

    adapter = Mistral3Adapter.load(dir)      # from_pretrained(dir) + processor (an image-only stand-in if needed)
    batch = adapter.prepare([[img]], ["q"])  # chat template, left padding, pixel_values + image_sizes
    adapter.visual_coords(batch)             # (B, V, 3): each image's token grid, raster order

Both use the Pixtral vision tower on images of variable size: the processor resizes an image to fit
``longest_edge`` with sides that are multiples of patch_size x spatial_merge_size, and writes per row of tokens
``[IMG]`` x cols followed by ``[IMG_BREAK]``, the last one replaced by ``[IMG_END]``
(``PixtralProcessor.replace_image_token``). Only ``[IMG]`` positions carry image features (Mistral 3 merges
2x2 patches with ``Mistral3PatchMerger``, whose unfold reads the blocks in raster order; LLaVA-Pixtral keeps
every patch). ``image_sizes`` (the resized (height, width)) gives each grid; inside ``generate()`` it reaches
the vision tower, whose call the runtime records. ``PixtralProcessor`` requires torchvision
(``@requires(backends=("torchvision", "torch"))``); :class:`PixtralImageProcessor` stands in.
"""

from __future__ import annotations

from typing import Any

from schedsearch.models import load_hf_model
from schedsearch.models.base import FamilySpec, VLMAdapter, chat_batch
from schedsearch.models.imageproc import ImageOnlyProcessor, load_processor
from schedsearch.models.qwen_vl import _assign_images
from schedsearch.models.tiles import grid_rc

__all__ = ["MISTRAL3_SPECS", "Mistral3Adapter", "PixtralImageProcessor", "load_pixtral_processor", "pixtral_coords"]

MISTRAL3_SPECS: dict[str, FamilySpec] = {
    "mistral3": FamilySpec(family="mistral3", model_types=("mistral3",), model_class="Mistral3ForConditionalGeneration",
                           text_model_path="model.language_model", vision_path="model.vision_tower"),
}


class PixtralImageProcessor(ImageOnlyProcessor):
    """Stand-in for ``PixtralProcessor`` on images: rows of ``[IMG]`` tokens with ``[IMG_BREAK]`` / ``[IMG_END]``."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None, **settings: Any):
        super().__init__(tokenizer, image_processor, chat_template, **settings)
        self.image_token = settings.get("image_token", "[IMG]")
        self.image_break_token = settings.get("image_break_token", "[IMG_BREAK]")
        self.image_end_token = settings.get("image_end_token", "[IMG_END]")
        self.unit = int(settings["patch_size"]) * int(settings.get("spatial_merge_size", 1))

    def process_images(self, images: list[Any], texts: list[str]) -> dict:
        return dict(self.image_processor(images=images, patch_size=self.unit, return_tensors="pt"))

    def expand(self, image_inputs: dict, index: int) -> str:
        h, w = (int(x) for x in image_inputs["image_sizes"][index])
        rows = [self.image_token * (w // self.unit) + self.image_break_token] * (h // self.unit)
        text = "".join(rows)
        return text[: -len(self.image_break_token)] + self.image_end_token


def load_pixtral_processor(path: str, patch: int, merge: int) -> Any:
    """The stock PixtralProcessor where it can be built, else :class:`PixtralImageProcessor` (patch x merge units)."""
    return load_processor(path, "PixtralImageProcessorPil", lambda tok, improc, template, settings:
                          PixtralImageProcessor(tok, improc, template,
                                                **{**settings, "patch_size": patch, "spatial_merge_size": merge}))


def pixtral_coords(adapter: VLMAdapter, batch: Any, unit: int) -> Any:
    """(B, V, 3) for Pixtral-tower layouts: one (height // unit) x (width // unit) raster grid per image."""
    sizes = batch.get("image_sizes")
    if sizes is None and batch.get("_vision_call") is not None:
        sizes = batch["_vision_call"][1].get("image_sizes")
    if sizes is None:
        raise ValueError("visual_coords: the batch has no image_sizes (nor a recorded vision-tower call); pass the "
                         "processor's output")
    per_image = [grid_rc(int(h) // unit, int(w) // unit) for h, w in (sizes.tolist() if hasattr(sizes, "tolist")
                                                                       else sizes)]
    return _assign_images(per_image, adapter.visual_mask(batch["input_ids"]))


class Mistral3Adapter(VLMAdapter):
    spec = MISTRAL3_SPECS["mistral3"]

    @classmethod
    def load(cls, path: str, *, dtype: Any = None, attn_implementation: str | None = None,
             device: str | None = None) -> VLMAdapter:
        model = load_hf_model(cls.spec.model_class, path, dtype=dtype, attn_implementation=attn_implementation,
                              device=device)
        cfg = model.config
        return cls(model, load_pixtral_processor(path, int(cfg.vision_config.patch_size),
                                                  int(cfg.spatial_merge_size)), path)

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
        return chat_batch(self.processor, images, prompts).to(self.model.device)

    def visual_coords(self, batch: Any) -> Any:
        cfg = self.model.config
        return pixtral_coords(self, batch, int(cfg.vision_config.patch_size) * int(cfg.spatial_merge_size))

