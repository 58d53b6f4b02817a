"""Aya Vision adapter (Cohere2 text, SigLIP tower, GotOcr2 tiles).

Lifecycle::

    adapter = AyaVisionAdapter.load(dir)     # from_pretrained(dir) + AyaVisionProcessor
    batch = adapter.prepare([[img]], ["q"])  # chat template, left padding
    adapter.visual_coords(batch)             # (B, V, 3): tiles on their grid over the image, then the global tile

Per image the processor writes ``<|START_OF_IMG|>``, then for each of the rows x cols tiles ``TILE_k`` and the
tile's ``<|IMG_PATCH|>`` tokens (the SigLIP grid pixel-shuffled by ``downsample_factor``, raster order), then
``TILE_GLOBAL`` and the tokens of the whole image squeezed to one tile, then ``<|END_OF_IMG|>``
(``AyaVisionProcessor.replace_image_token``). As for InternVL (same GotOcr2 cropping) the grid is only in the
pixels and is found by matching the tiles against the global tile (``tiles.best_tile_grid``).

Cohere2's text layers rotate q/k with interleaved pairs, and only on sliding-window layers (the global layers
use no positional encoding): :meth:`AyaVisionAdapter.rotary` gives the attention scorers exactly that.
"""

from __future__ import annotations

from typing import Any

from schedsearch.models.base import FamilySpec, VLMAdapter, chat_batch
from schedsearch.models.qwen_vl import _assign_images
from schedsearch.models.tiles import grids_from_tiles, thumbnail_layouts, tile_grids

__all__ = ["AYA_SPECS", "AyaVisionAdapter"]

AYA_SPECS: dict[str, FamilySpec] = {
    "aya_vision": FamilySpec(family="aya_vision", model_types=("aya_vision",),
                             model_class="AyaVisionForConditionalGeneration", text_model_path="model.language_model",
                             vision_path="model.vision_tower"),
}


class AyaVisionAdapter(VLMAdapter):
    spec = AYA_SPECS["aya_vision"]

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
        return chat_batch(self.processor, images, prompts).to(self.model.device)

    def rotary(self, layer_idx: int) -> Any:
        from transformers.models.cohere2.modeling_cohere2 import apply_rotary_pos_emb

        if getattr(self.decoder_layers[layer_idx].self_attn, "sliding_window", None) is None:
            return lambda x, cos, sin: x  # Cohere2's global layers: no positional encoding
        return lambda x, cos, sin: apply_rotary_pos_emb(x, x, cos, sin)[0]

    @property
    def tile_side(self) -> int:
        vc = self.model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size) // int(self.model.config.downsample_factor)

    def _tiles_per_image(self, ids: Any) -> list[int]:
        """Tiles per image (global tile included), in sequence order: the runs of image tokens that follow each
        <|START_OF_IMG|> marker."""
        start = self.processor.tokenizer.convert_tokens_to_ids("<|START_OF_IMG|>")
        out: list[int] = []
        for row in ids.tolist():
            for pos, t in enumerate(row):
                if t == start:
                    out.append(0)
                elif t == self.image_token_id and (pos == 0 or row[pos - 1] != self.image_token_id):
                    if not out:
                        raise ValueError("visual_coords: image tokens before any <|START_OF_IMG|> marker")
                    out[-1] += 1
        return out

    def image_layout(self, batch: Any) -> Any:
        pixels = batch.get("pixel_values")
        if pixels is None:
            return None
        return grids_from_tiles(pixels, self._tiles_per_image(batch["input_ids"]))

    def visual_coords(self, batch: Any) -> Any:
        tiles = self._tiles_per_image(batch["input_ids"])
        per_image = thumbnail_layouts(tiles, tile_grids(batch, tiles), self.tile_side)
        return _assign_images(per_image, self.visual_mask(batch["input_ids"]))
