"""Idefics3 and SmolVLM adapters.

Lifecycle::

    adapter = SmolVLMAdapter.load(dir)       # from_pretrained(dir) + processor (an image-only stand-in if needed)
    batch = adapter.prepare([[img]], ["q"])  # chat template, left padding, pixel_values (B, frames, C, H, W)
    adapter.visual_coords(batch)             # (B, V, 3) read from the <row_i_col_j> / <global-img> tokens

The text model sits at ``model.text_model`` (not ``model.language_model``). An image larger than the vision
encoder's size is resized to a multiple of it and cut into rows x cols tiles, each written as
``<fake_token_around_image><row_i_col_j>`` + ``image_seq_len`` ``<image>`` tokens (a newline after each row of
tiles), followed by the whole image squeezed to one tile: ``<fake_token_around_image><global-img>`` + tokens +
``<fake_token_around_image>``; a small image is only the global part (``Idefics3Processor.replace_image_token``).
Each tile's tokens are the encoder's patch grid pixel-shuffled by ``scale_factor``, raster order. So the layout
is in the token ids themselves: ``visual_coords`` reads the tag before each run of image tokens (tile (i, j) of
an image whose tiles end at its ``<global-img>`` run). The stock ``SmolVLMProcessor`` needs a video processor
(torchvision) and ``num2words``; :class:`Idefics3ImageProcessor` stands in (the same text for images).
"""

from __future__ import annotations

import math
import re
from typing import Any

from schedsearch.models import load_hf_model
from schedsearch.models.base import FamilySpec, VLMAdapter, chat_batch
from schedsearch.models.imageproc import ImageOnlyProcessor, load_processor
from schedsearch.models.qwen_vl import _assign_images
from schedsearch.models.tiles import grid_rc, tiled_rc

__all__ = ["IDEFICS3_SPECS", "Idefics3Adapter", "Idefics3ImageProcessor", "SmolVLMAdapter"]

IDEFICS3_SPECS: dict[str, FamilySpec] = {
    "idefics3": FamilySpec(family="idefics3", model_types=("idefics3",), model_class="Idefics3ForConditionalGeneration",
                           text_model_path="model.text_model", vision_path="model.vision_model"),
    "smolvlm": FamilySpec(family="smolvlm", model_types=("smolvlm",), model_class="SmolVLMForConditionalGeneration",
                          text_model_path="model.text_model", vision_path="model.vision_model"),
}
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"
_ROW_COL = re.compile(r"<row_(\d+)_col_(\d+)>")


class Idefics3ImageProcessor(ImageOnlyProcessor):
    """Stand-in for ``Idefics3Processor`` / ``SmolVLMProcessor`` on images (``replace_image_token`` /
    ``get_image_prompt_string``): tiles with their ``<row_i_col_j>`` tags, then the global image."""

    drop = ("rows", "cols")

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None, **settings: Any):
        super().__init__(tokenizer, image_processor, chat_template, **settings)
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"
        self.image_seq_len = int(settings["image_seq_len"])

    def process_images(self, images: list[Any], texts: list[str]) -> dict:
        nested, k = [], 0
        for t in texts:
            n = t.count(self.image_token)
            nested.append(images[k:k + n])
            k += n
        out = dict(self.image_processor(images=nested, return_row_col_info=True, return_tensors="pt"))
        out["rows"] = [r for rows in out["rows"] for r in rows]
        out["cols"] = [c for cols in out["cols"] for c in cols]
        return out

    def expand(self, image_inputs: dict, index: int) -> str:
        rows, cols = int(image_inputs["rows"][index]), int(image_inputs["cols"][index])
        tokens = self.image_token * self.image_seq_len
        glob = f"{FAKE}{GLOBAL}{tokens}{FAKE}"
        if rows == 0 and cols == 0:
            return glob
        tiles = "".join("".join(f"{FAKE}<row_{i + 1}_col_{j + 1}>{tokens}" for j in range(cols)) + "\n"
                        for i in range(rows))
        return f"{tiles}\n{glob}"


class _Idefics3Base(VLMAdapter):
    image_processor_class = "Idefics3ImageProcessorPil"

    @classmethod
    def load(cls, path: str, *, dtype: Any = None, attn_implementation: str | None = None,
             device: str | None = None) -> VLMAdapter:
        model = load_hf_model(cls.spec.model_class, path, dtype=dtype, attn_implementation=attn_implementation,
                              device=device)
        seq = cls._seq_len(model.config)
        proc = load_processor(path, cls.image_processor_class, lambda tok, improc, template, settings:
                              Idefics3ImageProcessor(tok, improc, template, **{**settings, "image_seq_len": seq}))
        return cls(model, proc, path)

    @staticmethod
    def _seq_len(cfg: Any) -> int:
        """Tokens per tile: (image_size / patch_size)^2 / scale_factor^2 (the connector's pixel shuffle)."""
        vc = cfg.vision_config
        return (int(vc.image_size) // int(vc.patch_size)) ** 2 // int(cfg.scale_factor) ** 2

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
        return chat_batch(self.processor, images, prompts, nested=True).to(self.model.device)

    def _tags(self) -> tuple[int, dict[int, tuple[int, int]]]:
        """(id of <global-img>, {id of <row_i_col_j>: (i - 1, j - 1)}) from the processor's tokenizer."""
        tok = getattr(self.processor, "tokenizer", None)
        if tok is None:
            raise ValueError("visual_coords: Idefics3 / SmolVLM layouts are read from the <row_i_col_j> tokens, which "
                             "needs the processor's tokenizer: load the model with load_model")
        tiles = {}
        for text, idx in tok.get_vocab().items():
            m = _ROW_COL.fullmatch(text)
            if m:
                tiles[idx] = (int(m.group(1)) - 1, int(m.group(2)) - 1)
        return tok.convert_tokens_to_ids(GLOBAL), tiles

    def visual_coords(self, batch: Any) -> Any:
        import torch

        ids = batch["input_ids"]
        vis = self.visual_mask(ids)
        seq = self._seq_len(self.model.config)
        side = math.isqrt(seq)
        glob_id, tile_ids = self._tags()
        per_image = []
        for row_ids, row_vis in zip(ids.tolist(), vis.tolist(), strict=True):
            pending: list[tuple[int, int]] = []  # tiles of the image being read
            k = 0
            while k < len(row_vis):
                if not row_vis[k]:
                    k += 1
                    continue
                end = k
                while end < len(row_vis) and row_vis[end]:
                    end += 1
                tag = row_ids[k - 1] if k > 0 else None
                if (end - k) % seq:
                    raise ValueError(f"visual_coords: a run of {end - k} image tokens is not a multiple of "
                                     f"image_seq_len {seq}")
                if tag in tile_ids:
                    pending.append(tile_ids[tag])
                elif tag == glob_id:
                    if pending:
                        rows = 1 + max(i for i, _ in pending)
                        cols = 1 + max(j for _, j in pending)
                        per_image.append(torch.cat([tiled_rc(rows, cols, side, pending), grid_rc(side, side)]))
                    else:
                        per_image.append(grid_rc(side, side))
                    pending = []
                else:
                    raise ValueError("visual_coords: a run of image tokens is preceded by neither <row_i_col_j> nor "
                                     "<global-img>; the prompt was not made by this family's processor")
                k = end
            if pending:
                raise ValueError("visual_coords: image tiles without their <global-img> part")
        return _assign_images(per_image, vis)


class Idefics3Adapter(_Idefics3Base):
    spec = IDEFICS3_SPECS["idefics3"]


class SmolVLMAdapter(_Idefics3Base):
    spec = IDEFICS3_SPECS["smolvlm"]
    image_processor_class = "SmolVLMImageProcessorPil"
