"""InternVL (InternVL3 / InternVL3.5, the ``-hf`` checkpoints) adapter.

Lifecycle::

    adapter = InternVLAdapter.load(dir)      # from_pretrained(dir) + processor (an image-only stand-in if needed)
    batch = adapter.prepare([[img]], ["q"])  # chat template, left padding
    adapter.visual_coords(batch)             # (B, V, 3): tiles on their grid over the image, then the thumbnail

The processor (GotOcr2 image processor, ``crop_to_patches``) resizes an image to a grid of rows x cols tiles
(the grid whose aspect ratio is closest to the image's) and, when there is more than one tile, appends a
thumbnail of the whole image; each tile becomes ``image_seq_length`` tokens (the ViT patch grid pixel-shuffled
by ``downsample_ratio``, raster order), written as ``<img>`` + tokens + ``</img>``. The batch carries neither
the image sizes nor the grid, only the tiles: ``visual_coords`` finds the grid with
:func:`~schedsearch.models.tiles.best_tile_grid` (which arrangement of the tiles matches the thumbnail).
The stock ``InternVLProcessor`` needs a video processor (torchvision); :class:`InternVLImageProcessor` stands in.
"""

from __future__ import annotations

import math
from typing import Any

from schedsearch.models import load_hf_model
from schedsearch.models.base import FamilySpec, VLMAdapter, chat_batch
from schedsearch.models.imageproc import ImageOnlyProcessor, load_processor
from schedsearch.models.qwen_vl import _assign_images
from schedsearch.models.tiles import grids_from_tiles, thumbnail_layouts, tile_grids, visual_runs

__all__ = ["INTERNVL_SPECS", "InternVLAdapter", "InternVLImageProcessor"]

INTERNVL_SPECS: dict[str, FamilySpec] = {
    "internvl": FamilySpec(family="internvl", model_types=("internvl",), model_class="InternVLForConditionalGeneration",
                           text_model_path="model.language_model", vision_path="model.vision_tower"),
}


class InternVLImageProcessor(ImageOnlyProcessor):
    """Stand-in for ``InternVLProcessor`` on images: each ``<IMG_CONTEXT>`` placeholder becomes ``<img>`` +
    ``<IMG_CONTEXT>`` x image_seq_length x tiles + ``</img>`` (``InternVLProcessor.replace_image_token``)."""

    drop = ("num_patches",)

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None, **settings: Any):
        super().__init__(tokenizer, image_processor, chat_template, **settings)
        self.image_token = tokenizer.context_image_token
        self.image_seq_length = int(settings.get("image_seq_length", 256))

    def process_images(self, images: list[Any], texts: list[str]) -> dict:
        return dict(self.image_processor(images=images, crop_to_patches=True, return_tensors="pt"))

    def expand(self, image_inputs: dict, index: int) -> str:
        tiles = int(image_inputs["num_patches"][index])
        tok = self.tokenizer
        return f"{tok.start_image_token}{self.image_token * (self.image_seq_length * tiles)}{tok.end_image_token}"


class InternVLAdapter(VLMAdapter):
    spec = INTERNVL_SPECS["internvl"]

    @classmethod
    def load(cls, path: str, *, dtype: Any = None, attn_implementation: str | None = None,
             device: str | None = None) -> VLMAdapter:
        model = load_hf_model(cls.spec.model_class, path, dtype=dtype, attn_implementation=attn_implementation,
                              device=device)
        seq = int(model.config.image_seq_length)
        proc = load_processor(path, "GotOcr2ImageProcessorPil", lambda tok, improc, template, settings:
                              InternVLImageProcessor(tok, improc, template, **{"image_seq_length": seq, **settings}))
        return cls(model, proc, path)

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
        return chat_batch(self.processor, images, prompts).to(self.model.device)

    @property
    def tile_side(self) -> int:
        """Tokens per tile side: the ViT patch grid shrunk by the pixel shuffle."""
        return math.isqrt(int(self.model.config.image_seq_length))

    def _tiles_per_image(self, vis: Any) -> list[int]:
        per = int(self.model.config.image_seq_length)
        runs = [n for sample in visual_runs(vis) for n in sample]
        if any(n % per for n in runs):
            raise ValueError(f"visual_coords: image blocks of {runs} tokens are not multiples of image_seq_length "
                             f"{per}; the processor and model configs disagree")
        return [n // per for n in runs]

    def image_layout(self, batch: Any) -> Any:
        pixels = batch.get("pixel_values")
        if pixels is None:
            return None
        return grids_from_tiles(pixels, self._tiles_per_image(self.visual_mask(batch["input_ids"])))

    def visual_coords(self, batch: Any) -> Any:
        vis = self.visual_mask(batch["input_ids"])
        tiles = self._tiles_per_image(vis)
        return _assign_images(thumbnail_layouts(tiles, tile_grids(batch, tiles), self.tile_side), vis)
