"""LLaVA-OneVision adapter (VFlowOpt's own model).

Lifecycle::

    adapter = LlavaOnevisionAdapter.load(dir)   # from_pretrained(dir) + processor (an image-only stand-in if needed)
    batch = adapter.prepare([[img]], ["q"])     # chat template, left padding, image_sizes, batch_num_images
    adapter.visual_coords(batch)                # (B, V, 3) in the order the model packs the features

Layouts, as ``LlavaOnevisionModel.pack_image_features`` (transformers 5.24) packs them:

* a sample with ONE image (``batch_num_images`` 1): the base grid (the whole image at the tower's resolution,
  raster order), then the anyres tiles stitched into one grid, unpadded to the image's aspect ratio
  (``unpad_image``) and, when it has more than ``anyres_max_N`` times the base grid's tokens (ratio > 1.1),
  bilinearly shrunk by that ratio; read row by row with one newline token after each row;
* a sample with several images: each image is its base grid plus one newline token.

Newline tokens get the row of their line and col = 1 - eps. The image sizes are in the processor's batch
(``image_sizes``) but ``generate()`` hands them only to the image encoder, so inside ``generate()`` schedules that
need token positions are refused with one line, as for LLaVA-NeXT. The stock processor needs a video processor
(torchvision); :class:`LlavaOnevisionImageProcessor` stands in and counts each image's tokens from the same
layout the coordinates come from (so processor, coordinates and model agree by construction; the model checks).
"""

from __future__ import annotations

import math
from typing import Any

from schedsearch.models import load_hf_model
from schedsearch.models.base import FamilySpec, VLMAdapter, chat_batch
from schedsearch.models.imageproc import ImageOnlyProcessor, load_processor
from schedsearch.models.llava import NEWLINE_COL
from schedsearch.models.qwen_vl import _assign_images
from schedsearch.models.tiles import grid_rc

__all__ = ["ONEVISION_SPECS", "LlavaOnevisionAdapter", "LlavaOnevisionImageProcessor", "onevision_layout"]

ONEVISION_SPECS: dict[str, FamilySpec] = {
    "llava_onevision": FamilySpec(family="llava_onevision", model_types=("llava_onevision",),
                                  model_class="LlavaOnevisionForConditionalGeneration",
                                  text_model_path="model.language_model", vision_path="model.vision_tower",
                                  positions_in_generate=False),
}


def onevision_layout(size: tuple[int, int], multi: bool, *, side: int, tile: int, pinpoints: list,
                     aspect: str) -> Any:
    """(n, 2) row/col of one image's tokens, newline tokens included (see the module docstring).

    ``size``: the image's (height, width); ``multi``: the sample has several images; ``side``: base grid side
    (tower image size / patch size); ``tile``: the tower's image size; ``pinpoints``: image_grid_pinpoints;
    ``aspect``: vision_aspect_ratio ("anyres_max_9").
    """
    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    base = grid_rc(side, side)
    if multi:
        return torch.cat([base, torch.tensor([[(side - 0.5) / side, NEWLINE_COL]])])
    nph, npw = get_anyres_image_grid_shape(list(size), pinpoints, tile)
    h, w = unpad_image(torch.zeros(1, nph * side, npw * side), list(size)).shape[1:]
    ratio = math.sqrt(h * w / (int(aspect.removeprefix("anyres_max_")) * side**2))
    if ratio > 1.1:  # pack_image_features shrinks the grid (bilinear) to int(h // ratio) x int(w // ratio)
        h, w = int(h // ratio), int(w // ratio)
    rc = grid_rc(h, w).reshape(h, w, 2)
    newline = torch.stack([rc[:, 0, 0], torch.full((h,), NEWLINE_COL)], dim=1)[:, None]
    return torch.cat([base, torch.cat([rc, newline], dim=1).reshape(-1, 2)])


class LlavaOnevisionImageProcessor(ImageOnlyProcessor):
    """Stand-in for ``LlavaOnevisionProcessor`` on images (``replace_image_token``): each ``<image>`` becomes as many
    image tokens as :func:`onevision_layout` gives it."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None, **settings: Any):
        super().__init__(tokenizer, image_processor, chat_template, **settings)
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"

    def process_images(self, images: list[Any], texts: list[str]) -> dict:
        per_text = [t.count(self.image_token) for t in texts]
        nested, k = [], 0
        for n in per_text:  # the image processor decides anyres vs base-only from the images per sample
            nested.append(images[k:k + n])
            k += n
        return dict(self.image_processor(images=nested, return_tensors="pt"))

    def expand(self, image_inputs: dict, index: int) -> str:
        counts = list(image_inputs["batch_num_images"])
        owner = next(i for i, c in enumerate(counts) if index < sum(counts[: i + 1]))
        size = tuple(int(x) for x in image_inputs["image_sizes"][index])
        layout = self.settings["layout"](size, int(counts[owner]) != 1)
        return self.image_token * len(layout)


class LlavaOnevisionAdapter(VLMAdapter):
    spec = ONEVISION_SPECS["llava_onevision"]

    @classmethod
    def load(cls, path: str, *, dtype: Any = None, attn_implementation: str | None = None,
             device: str | None = None) -> VLMAdapter:
        model = load_hf_model(cls.spec.model_class, path, dtype=dtype, attn_implementation=attn_implementation,
                              device=device)
        adapter = cls(model, None, path)
        adapter.processor = load_processor(path, "LlavaOnevisionImageProcessorPil", lambda tok, improc, template, s:
                                           LlavaOnevisionImageProcessor(tok, improc, template,
                                                                        layout=adapter.image_tokens_layout))
        return adapter

    def image_tokens_layout(self, size: tuple[int, int], multi: bool) -> Any:
        cfg = self.model.config
        vc = cfg.vision_config
        if cfg.vision_feature_select_strategy != "full":
            raise ValueError(f"visual_coords: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}"
                             f" is not supported (OneVision's SigLIP tower has no CLS token: 'full')")
        return onevision_layout(size, multi, side=int(vc.image_size) // int(vc.patch_size), tile=int(vc.image_size),
                                pinpoints=cfg.image_grid_pinpoints, aspect=str(cfg.vision_aspect_ratio))

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
        return chat_batch(self.processor, images, prompts, nested=True).to(self.model.device)

    def visual_coords(self, batch: Any) -> Any:
        sizes = batch.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes (the processor's output) to place the high-resolution "
                             "tokens, and generate() hands it only to the image encoder: prefill with "
                             "model(**batch), or use a schedule without positions (no recycling, a scorer other "
                             "than diverse)")
        vis = self.visual_mask(batch["input_ids"])
        counts = batch.get("batch_num_images")
        counts = [1] * len(sizes) if counts is None else [int(c) for c in counts]
        multi = [c != 1 for c in counts for _ in range(c)]
        per_image = [self.image_tokens_layout(tuple(int(x) for x in s), m) for s, m in zip(sizes, multi, strict=True)]
        return _assign_images(per_image, vis)
