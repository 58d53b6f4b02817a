"""LLaVA-1.5 and LLaVA-NeXT adapters.

Lifecycle::

    adapter = LlavaNextAdapter.load(dir)     # from_pretrained(dir) + AutoProcessor (no torchvision needed)
    batch = adapter.prepare([[img]], ["q"])  # chat template, left padding
    adapter.visual_coords(batch)             # (B, V, 3) in the order transformers packs the features

LLaVA-1.5: one CLIP grid per image, ``image_size / patch_size`` squared tokens in raster order. A ``llava``
checkpoint with a Pixtral tower (Pixtral-12B) gets the Pixtral processor stand-in and variable-size grids from
:mod:`schedsearch.models.mistral3`.
LLaVA-NeXT: per image the base grid (raster order) followed by the high-resolution tiles stitched
into one grid, unpadded to the image's aspect ratio (transformers' ``unpad_image``) and read row
by row with one newline token after each row (row of its line, col = 1 - eps).
"""

from __future__ import annotations

from typing import Any

from schedsearch.models import load_hf_model
from schedsearch.models.base import FamilySpec, VLMAdapter, chat_content
from schedsearch.models.imageproc import stock_processor
from schedsearch.models.qwen_vl import _assign_images

__all__ = ["LLAVA_SPECS", "LlavaAdapter", "LlavaNextAdapter"]

LLAVA_SPECS: dict[str, FamilySpec] = {
    "llava": FamilySpec(family="llava", model_types=("llava",), model_class="LlavaForConditionalGeneration",
                        text_model_path="model.language_model", image_token_attr="image_token_id",
                        vision_path="model.vision_tower"),
    "llava_next": FamilySpec(family="llava_next", model_types=("llava_next",),
                             model_class="LlavaNextForConditionalGeneration",
                             text_model_path="model.language_model", image_token_attr="image_token_id",
                             vision_path="model.vision_tower", positions_in_generate=False),
}
NEWLINE_COL = 1.0 - 1e-6


class _LlavaBase(VLMAdapter):
    @classmethod
    def load(cls, path: str, *, dtype: Any = None, attn_implementation: str | None = None,
             device: str | None = None) -> VLMAdapter:
        model = load_hf_model(cls.spec.model_class, path, dtype=dtype, attn_implementation=attn_implementation,
                              device=device)
        if _is_pixtral(model):  # Pixtral-12B style: PixtralProcessor needs torchvision; an image-only stand-in
            from schedsearch.models.mistral3 import load_pixtral_processor

            return cls(model, load_pixtral_processor(path, int(model.config.vision_config.patch_size), 1), path)
        return cls(model, stock_processor(path), path)

    def _grid_side(self) -> int:
        vc = self.model.config.vision_config
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(f"visual_coords: vision_feature_select_strategy={strategy!r} is not supported "
                             f"(only 'default', where the CLS token is dropped and the patches form a grid)")
        return int(vc.image_size) // int(vc.patch_size)

    def prepare(self, images: list[list[Any]], prompts: list[str]) -> Any:
        if len(images) != len(prompts):
            raise ValueError(f"prepare: {len(images)} image lists but {len(prompts)} prompts; pass one list per prompt")
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.processor.tokenizer
        texts = []
        for imgs, prompt in zip(images, prompts, strict=False):
            content = chat_content(prompt, len(imgs))
            texts.append(template_owner.apply_chat_template([{"role": "user", "content": content}],
                                                            tokenize=False, add_generation_prompt=True))
        flat = [im for imgs in images for im in imgs]
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(images=flat or None, text=texts, padding=True, return_tensors="pt")
        batch.pop("token_type_ids", None)
        return batch.to(self.model.device)

    @staticmethod
    def _grid(h: int, w: int) -> Any:
        import torch

        r = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        c = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=0)  # (2, h, w)


class LlavaAdapter(_LlavaBase):
    spec = LLAVA_SPECS["llava"]

    def visual_coords(self, batch: Any) -> Any:
        if _is_pixtral(self.model):  # variable image sizes: one (H / patch) x (W / patch) grid per image
            from schedsearch.models.mistral3 import pixtral_coords

            return pixtral_coords(self, batch, int(self.model.config.vision_config.patch_size))
        side = self._grid_side()
        vis = self.visual_mask(batch["input_ids"])
        n_images = _num_images(batch, default=int(vis.sum()) // (side * side))
        rc = self._grid(side, side).reshape(2, -1).T
        return _assign_images([rc] * n_images, vis)


class LlavaNextAdapter(_LlavaBase):
    spec = LLAVA_SPECS["llava_next"]

    def visual_coords(self, batch: Any) -> Any:
        import torch
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        sizes = batch.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor's output) to place the high-resolution "
                             "tokens, and generate() hands it only to the image encoder: prefill with "
                             "model(**batch), or use a schedule without positions (no recycling, a scorer other "
                             "than diverse)")
        cfg = self.model.config
        side = self._grid_side()
        per_image = []
        for size in sizes.tolist() if hasattr(sizes, "tolist") else sizes:
            base = self._grid(side, side).reshape(2, -1).T
            nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            full = self._grid(nph * side, npw * side)  # placeholder grid, unpadded the way the features are
            kept = unpad_image(full, size)
            h, w = kept.shape[1:]
            rc = self._grid(h, w)  # renormalise to the unpadded region (the image itself)
            newline = torch.stack([rc[0, :, :1], torch.full((h, 1), NEWLINE_COL)], dim=0)
            hi = torch.cat([rc, newline], dim=2).reshape(2, -1).T
            per_image.append(torch.cat([base, hi]))
        vis = self.visual_mask(batch["input_ids"])
        want = sum(len(p) for p in per_image)
        if want != int(vis.sum()):
            raise ValueError(f"visual_coords: derived {want} LLaVA-NeXT visual positions but the batch has "
                             f"{int(vis.sum())} image tokens; the processor and model configs disagree "
                             f"(image_grid_pinpoints / vision_feature_select_strategy)")
        return _assign_images(per_image, vis)


def _is_pixtral(model: Any) -> bool:
    return getattr(model.config.vision_config, "model_type", None) == "pixtral"


def _num_images(batch: Any, default: int) -> int:
    pv = batch.get("pixel_values")
    return int(pv.shape[0]) if pv is not None else default
