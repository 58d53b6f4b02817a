"""Rankings by the vision encoder's global attention: ``fastervlm`` (one layer) and ``vtc_cls`` (several layers).

* ``fastervlm`` -- FasterVLM / VisPruner's important tokens (Zhang et al., arXiv 2412.01818, Sec. 3; reference
  Theia-4869/FasterVLM ``llava/model/multimodal_encoder/clip_encoder.py`` + ``llava_arch.py::encode_images``):
  score_j = mean over heads of the [CLS] query's attention to patch j in vision layer ``layer`` (default -2, the
  penultimate layer LLaVA takes its features from), top-k kept.
* ``vtc_cls`` -- VTC-CLS (Wang et al., arXiv 2412.05819; reference THU-MIG/VTC-CLS
  ``llava/model/multimodal_encoder/clip_encoder.py::cls_token_only``): score_j = sum over layers
  ``start..end`` (default -8..-2: attentions[16:-1] of CLIP-L's 24 layers) of that [CLS] attention.

Encoders without [CLS] (Qwen) give the mean attention each merged token receives instead (VisPruner for Qwen and
LightCompress ``token_reduction/vispruner.py`` / ``visionzip.py`` do this: column sums of the last full-attention
block, averaged over the 2x2 patches of a merged token); layers are moved to the nearest full-attention block
(:func:`resolve_vision_layer`), and ``vtc_cls`` sums each distinct block once.

Deliberate differences: the references prune before the LLM (a schedule dropping at layer 0 does the same), rank
each LLaVA-NeXT crop separately with a per-crop budget (here one ranking over all of a sample's visual tokens),
and keep every LLaVA-NeXT newline token (here newline tokens get the sample's largest score, so they are kept
first while the budget lasts).
"""

from __future__ import annotations

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext, resolve_vision_layer, vision_map


class FasterVLM:
    name = "fastervlm"

    def __init__(self, layer: int = -2):
        self.layer = int(layer)
        self._resolved: int | None = None

    def vision_layers(self, depth: int, global_layers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        self._resolved = resolve_vision_layer(self.layer, depth, global_layers)
        return {self._resolved: ("cls",)}

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        if self._resolved is None:
            raise ScheduleError(f"scorer {self.name} was not installed by apply_schedule (no vision layer resolved)")
        return vision_map(ctx, self._resolved, "cls", self.name).clamp_min(0)


class VTCCLS:
    name = "vtc_cls"

    def __init__(self, start: int = -8, end: int = -2):
        self.start, self.end = int(start), int(end)
        self._layers: tuple[int, ...] = ()

    def vision_layers(self, depth: int, global_layers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        lo = self.start + depth if self.start < 0 else self.start
        hi = self.end + depth if self.end < 0 else self.end
        if lo > hi:
            raise ScheduleError(f"scorer vtc_cls: params.start={self.start} comes after params.end={self.end} in a "
                                f"{depth}-layer vision encoder")
        self._layers = tuple(sorted({resolve_vision_layer(i, depth, global_layers) for i in range(lo, hi + 1)}))
        return {layer: ("cls",) for layer in self._layers}

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        if not self._layers:
            raise ScheduleError(f"scorer {self.name} was not installed by apply_schedule (no vision layer resolved)")
        # VTC-CLS: sum over layers of the head-mean [CLS] attention (the reference sums attentions[start:-1])
        return sum(vision_map(ctx, layer, "cls", self.name) for layer in self._layers).clamp_min(0)
