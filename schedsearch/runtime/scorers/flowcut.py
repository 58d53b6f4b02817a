"""``flowcut``: FlowCut's information-flow score, accumulated over the vision encoder's layers, ranking at any drop.

FlowCut (Tong et al., arXiv 2505.19536, Sec. 3.3); reference PyPI ``flowcut`` 1.0.2 (official)
``flowcut/modeling_clip_flowcut.py::CLIPEncoderLayer_forward`` and ``utils_flowcut.py::compute_score``. In every
vision layer l up to ``layer`` (default -2, the layer LLaVA reads its features after), per patch j:

    s_l(j) = ( a_l(j) / sum_i a_l(i)  +  m_l(j) / sum_i m_l(i) )  *  || v_l(j) ||_1

with a_l the [CLS] query's attention (the "relay" of the information flow), m_l = softmax_j(v_cls . v_j) the
[CLS] value's similarity and v_l the head-mean value; the score is the running mean
c_l = 0.5 c_{l-1} + 0.5 s_l (c_0 = s_0). Sums run over one encoded crop's patches.

Deliberate differences: the reference prunes *inside* the encoder, every other layer, a number chosen from the
entropy of the [CLS] attention, so later layers score only the survivors; schedsearch drops only between LLM
layers, so this is FlowCut's decoder-side use: the score is computed on all patches of every layer and ranks the
tokens at the schedule's drops (the encoder-internal variant does not fit the runtime). Encoders without [CLS]
(Qwen) use the attention received and the crop's mean value in its place, and only full-attention blocks.
LLaVA-NeXT newline tokens rank first.
"""

from __future__ import annotations

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext, resolve_vision_layer


def group_normalise(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """x / (sum of x over its group), per sample; x (B, V) without NaN, group (B, V) long >= 0."""
    sums = torch.zeros(x.shape[0], int(group.max()) + 1, device=x.device).scatter_add_(1, group, x)
    return x / sums.gather(1, group).clamp_min(1e-12)


class FlowCut:
    name = "flowcut"

    def __init__(self, layer: int = -2):
        self.layer = int(layer)
        self._layers: tuple[int, ...] = ()
        self._score: dict = {}  # per original visual token, computed once per prefill (and sub-batch)

    def vision_layers(self, depth: int, global_layers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        last = resolve_vision_layer(self.layer, depth, global_layers)
        self._layers = tuple(sorted({resolve_vision_layer(i, depth, global_layers) for i in range(last + 1)}))
        return {layer: ("cls", "value_sim", "value_l1") for layer in self._layers}

    def begin(self, batch_info: dict) -> None:
        self._score = {}

    def _full_score(self, ctx: ScoreContext) -> torch.Tensor:
        vis = ctx.vision
        if vis is None or not self._layers or (self._layers[0], "cls") not in vis:
            raise ScheduleError(f"scorer {self.name} needs the vision encoder's maps, which this run did not record")
        layout = vis["layout"]
        crop = (vis["image"] * 4096 + layout.clamp_min(0)).clamp_min(0)  # one group per encoded crop / image
        crop = torch.unique(crop, return_inverse=True)[1].view(crop.shape)
        spatial = layout >= 0
        score = None
        for layer in self._layers:
            a, m, v = (vis[(layer, kind)].float().nan_to_num(0.0) for kind in ("cls", "value_sim", "value_l1"))
            s = (group_normalise(a, crop) + group_normalise(m, crop)) * v  # FlowCut compute_score
            score = s if score is None else 0.5 * score + 0.5 * s  # cumulative_scores
        big = score.masked_fill(~spatial, float("-inf")).max(dim=1, keepdim=True).values
        return torch.where(spatial, score, big.expand_as(score))  # newline tokens rank first

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        key = None if ctx.rows is None else tuple(ctx.rows.tolist())  # a ragged batch's sub-batch: its own rows
        if key not in self._score:
            self._score[key] = self._full_score(ctx)
        return self._score[key].to(ctx.visual_orig.device).gather(1, ctx.visual_orig).clamp_min(0)
