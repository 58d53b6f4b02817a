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
from schedsearch.models.base import FamilySpec, HandleGroup, VLMAdapter, chat_content
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

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
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

    # ------------------------------------------------------------ vision maps (ranking by vision attention)
    def vision_encoder_layers(self) -> tuple[int, tuple[int, ...]]:
        """(depth, global layers) of the CLIP tower: every layer attends globally."""
        if _is_pixtral(self.model):
            raise ValueError("the Pixtral vision tower (variable image sizes, 2-D rotary) has no vision-map hook "
                             "yet; only CLIP/SigLIP-style LLaVA towers have")
        depth = len(self.vision_tower.encoder.layers)
        return depth, tuple(range(depth))

    def vision_maps_hook(self, request: dict[int, frozenset], store: list) -> Any:
        """See :meth:`VLMAdapter.vision_maps_hook`. Each run appends ``{(layer, kind): (crops, P[, d])}`` for the
        P patch tokens of every encoded crop ([CLS] dropped after use), from a pre-hook on the layer's
        ``self_attn`` (its input is already ``layer_norm1``-ed; CLIP has no rotary embedding)."""
        import torch

        from schedsearch.models.vision_maps import check_kinds, head_maps

        tower = self.vision_tower
        request = {int(layer): check_kinds(kinds) for layer, kinds in request.items()}

        def tower_pre(module: Any, args: tuple, kwargs: dict) -> None:
            store.clear()
            store.append({})

        def attn_pre(layer: int, module: Any, args: tuple, kwargs: dict) -> None:
            if not store:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            kinds = request[layer]
            with torch.no_grad():
                shape = (*h.shape[:-1], module.num_heads, module.head_dim)
                q, k = (proj(h).view(shape).transpose(1, 2) for proj in (module.q_proj, module.k_proj))
                v = module.v_proj(h).view(shape).transpose(1, 2) if kinds & {"value_l1", "value_sim"} else None
                maps = head_maps(q, k, v, kinds, module.scale, has_cls=True)  # (crops, 1 + P[, d])
                for kind, val in maps.items():
                    store[-1][(layer, kind)] = val[:, 1:]
            return None

        handles = [tower.register_forward_pre_hook(tower_pre, with_kwargs=True)]
        for layer in request:
            handles.append(tower.encoder.layers[layer].self_attn.register_forward_pre_hook(
                lambda m, a, kw, _l=layer: attn_pre(_l, m, a, kw), with_kwargs=True))
        return HandleGroup(handles)

    def vision_token_maps(self, store: list, batch: Any) -> dict:
        """See :meth:`VLMAdapter.vision_token_maps`. Per crop the channels layout, image, row, col (the patch's cell
        in its view's grid; LLaVA-NeXT tiles in the stitched grid) are packed with the maps, so every map lands on
        the LLM token its patch feature lands on."""
        import torch

        from schedsearch.models.vision_maps import stack_per_sample

        side = self._grid_side()  # only the 'default' feature strategy (patches without [CLS]) maps 1:1 to tokens
        if not store or not store[-1]:
            raise ValueError("no vision-encoder run was recorded for this batch")
        rec = store[-1]
        keys = sorted(rec, key=str)
        crops = next(iter(rec.values())).shape[0]
        cell = torch.arange(side * side)
        geo = torch.stack([torch.zeros(side * side), torch.zeros(side * side), (cell // side).float(),
                           (cell % side).float()], dim=-1).expand(crops, -1, -1)  # layout, image, row, col
        feats = torch.cat([geo] + [rec[key].reshape(crops, side * side, -1).float().cpu() for key in keys], dim=-1)
        per_image = self._pack_maps(feats, batch)
        counts = self.visual_mask(batch["input_ids"]).sum(1).tolist()
        packed = stack_per_sample(per_image, counts)  # (B, V, 4 + channels)
        out: dict = {"layout": packed[..., 0].nan_to_num(-1.0).long(), "image": packed[..., 1].nan_to_num(-1).long(),
                     "cell": packed[..., 2:4]}
        at = 4
        for key in keys:
            width = 1 if rec[key].dim() == 2 else rec[key].shape[-1]
            val = packed[..., at : at + width]
            out[key] = val[..., 0] if rec[key].dim() == 2 else val
            at += width
        return out

    def _pack_maps(self, feats: Any, batch: Any) -> list[Any]:
        """(crops, P, C) per-crop channels -> per image (n_i, C) in the LLM's token order (one crop per image)."""
        import torch

        feats = feats.clone()
        feats[..., 1] = torch.arange(feats.shape[0], dtype=feats.dtype)[:, None]
        return list(feats)

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

    def _pack_maps(self, feats: Any, batch: Any) -> list[Any]:
        return _pack_next_maps(self.model, feats, batch)

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


def _pack_next_maps(model: Any, feats: Any, batch: Any) -> list[Any]:
    """LLaVA-NeXT: per-crop maps packed exactly like the image features, by the model's own public
    ``pack_image_features`` (base view, then the tiles stitched, unpadded, one newline per row). Channel 0 carries
    the crop index (0 = base view, k = tile k), 1 the image, 2-3 the cell; newline tokens get NaN in every channel."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = batch.get("image_sizes")
    if sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes (the processor's output) to place the high-resolution "
                         "tokens, and generate() hands it only to the image encoder: prefill with model(**batch), "
                         "or use a scorer that does not read the vision encoder's maps")
    cfg = model.config
    sizes = sizes.tolist() if hasattr(sizes, "tolist") else list(sizes)
    n_crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                         patch_size=cfg.vision_config.image_size) for s in sizes]
    if sum(n_crops) != feats.shape[0]:
        raise ValueError(f"the vision encoder ran on {feats.shape[0]} crops but image_sizes imply {sum(n_crops)}")
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    feats = feats.clone()
    side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
    at = 0
    for img, (size, n) in enumerate(zip(sizes, n_crops, strict=True)):
        feats[at : at + n, :, 1] = img
        feats[at : at + n, :, 0] = torch.arange(n, dtype=feats.dtype)[:, None]  # 0 = base view, k = tile k
        if n > 1:  # tiles are stitched row-major into one (nph * side) x (npw * side) grid
            _, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            tile = torch.arange(n - 1, dtype=feats.dtype)
            feats[at + 1 : at + n, :, 2] += (tile // npw)[:, None] * side
            feats[at + 1 : at + n, :, 3] += (tile % npw)[:, None] * side
        at += n
    newline = torch.full((feats.shape[-1],), float("nan"), dtype=feats.dtype)
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    packed, _ = model.model.pack_image_features(list(torch.split(feats, n_crops)), torch.tensor(sizes), strategy,
                                               image_newline=newline)
    return list(packed)


def _num_images(batch: Any, default: int) -> int:
    pv = batch.get("pixel_values")
    return int(pv.shape[0]) if pv is not None else default
