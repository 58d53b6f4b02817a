"""PaliGemma / PaliGemma 2 adapter.

Lifecycle::

    adapter = PaliGemmaAdapter.load(dir)     # from_pretrained(dir) + PaliGemmaProcessor
    batch = adapter.prepare([[img]], ["q"])  # "<image>" x n + <bos> + prompt + "\\n", token_type_ids, no labels
    adapter.visual_coords(batch)             # (B, V, 3): each image's SigLIP grid, raster order

PaliGemma is a prefix-LM (Beyer et al., arXiv 2407.07726): the image tokens and the prompt form a
prefix that attends bidirectionally, generated tokens attend causally. The model builds that mask from
``token_type_ids`` (0 = prefix; a generated token is 1), so ``prepare`` keeps them and drops the training
``labels`` the processor derives from them. There is no chat template: the processor writes the images first.
PaliGemma 2's Gemma 2 text model alternates sliding-window and global layers and soft-caps attention logits;
the runtime and scorers follow each layer's own mask and the module's ``attn_logit_softcapping``.
"""

from __future__ import annotations

from typing import Any

from schedsearch.models.base import IMAGE_MARKER, FamilySpec, VLMAdapter
from schedsearch.models.qwen_vl import _assign_images
from schedsearch.models.tiles import grid_rc

__all__ = ["PALIGEMMA_SPECS", "PaliGemmaAdapter"]

PALIGEMMA_SPECS: dict[str, FamilySpec] = {
    "paligemma": FamilySpec(family="paligemma", model_types=("paligemma",),
                            model_class="PaliGemmaForConditionalGeneration",
                            text_model_path="model.language_model", vision_path="model.vision_tower",
                            token_types=(("token_type_ids", 1),)),
}


class PaliGemmaAdapter(VLMAdapter):
    spec = PALIGEMMA_SPECS["paligemma"]

    def prepare(self, images: list[list[Any]], prompts: list[str], videos: list[list[Any]] | None = None) -> Any:
        self.refuse_video(videos)
        if len(images) != len(prompts):
            raise ValueError(f"prepare: {len(images)} image lists but {len(prompts)} prompts; pass one list per prompt")
        texts = []
        for imgs, prompt in zip(images, prompts, strict=True):
            marks = prompt.count(IMAGE_MARKER)
            if marks and marks != len(imgs):
                raise ValueError(f"the prompt has {marks} {IMAGE_MARKER} marker(s) but {len(imgs)} image(s)")
            # PaliGemma always reads its images first: markers only say how many
            texts.append(IMAGE_MARKER * len(imgs) + " ".join(prompt.replace(IMAGE_MARKER, " ").split()))
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(images=[list(i) for i in images], text=texts, padding=True, return_tensors="pt")
        batch.pop("labels", None)  # training targets derived from token_type_ids; they would make forward a loss
        return batch.to(self.model.device)

    def visual_coords(self, batch: Any) -> Any:
        vc = self.model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        vis = self.visual_mask(batch["input_ids"])
        n = int(vis.sum())
        if n % (side * side):
            raise ValueError(f"visual_coords: {n} image tokens are not a multiple of the {side}x{side} grid")
        per = side * side
        return _assign_images([grid_rc(side, side)] * (n // per), vis)
