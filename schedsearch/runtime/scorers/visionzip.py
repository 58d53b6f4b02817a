"""``visionzip``: dominant tokens by vision attention + contextual tokens merged by similarity.

VisionZip (Yang et al., arXiv 2412.04467, Sec. 3.2-3.3); reference dvlab-research/VisionZip
``visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward`` (and LightCompress
``token_reduction/visionzip.py`` for Qwen2.5-VL). With n = n_keep, c = contextual tokens, d = n - c dominant:

1. dominant: the d tokens with the largest [CLS] attention of vision layer ``layer`` (default -2; Qwen: attention
   received in the nearest full-attention block, as LightCompress does);
2. contextual: among the remaining R tokens in token order, every ``max(1, R // c)``-th is a target (the first c);
   each other remaining token joins the target whose normalised key (vision layer ``layer``, head-mean; Qwen:
   after RoPE, 2x2-mean) has the largest dot product with its own;
3. each target becomes ``h_target + mean(h of its members)`` (the reference adds the mean to the target, it does
   not average them; a target without members stays as it is).

``contextual`` is c / n (default 10 / 64: VisionZip's 54 + 10 profile); c = max(1, round(contextual * n)), 0 when
``contextual`` is 0 (prune only). The merge acts on the states entering the drop layer (the LLM-side features),
not on the vision layer's hidden states; ``similarity="states"`` uses those states instead of the vision keys.

Deliberate differences: the reference keeps the [CLS] token as one of its d dominant tokens (here all d are
patches), renumbers positions (here a contextual token keeps its target's original position), and on LLaVA-NeXT
selects per crop (here per sample); LLaVA-NeXT newline tokens count as dominant first (their map is the sample's
largest value).
"""

from __future__ import annotations

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext, resolve_vision_layer, tiered, vision_map, visual_states


class VisionZip:
    name = "visionzip"

    def __init__(self, layer: int = -2, contextual: float = 10 / 64, similarity: str = "vision_keys"):
        self.layer = int(layer)
        self.contextual = float(contextual)
        if not 0.0 <= self.contextual <= 1.0:
            raise ScheduleError(f"scorer visionzip: params.contextual={contextual!r} must be in [0, 1]")
        self.similarity = similarity
        self._resolved: int | None = None

    def vision_layers(self, depth: int, global_layers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        self._resolved = resolve_vision_layer(self.layer, depth, global_layers)
        return {self._resolved: ("cls", "keys") if self.similarity == "vision_keys" else ("cls",)}

    def _plan(self, ctx: ScoreContext) -> dict:
        if "visionzip" in ctx.scratch:
            return ctx.scratch["visionzip"]
        if self._resolved is None:
            raise ScheduleError(f"scorer {self.name} was not installed by apply_schedule (no vision layer resolved)")
        attn = vision_map(ctx, self._resolved, "cls", self.name)  # (B, V)
        bsz, v = attn.shape
        n = min(ctx.n_keep, v)
        n_ctx = 0 if self.contextual == 0 or n == 0 else min(n, max(1, round(self.contextual * n)))
        n_dom = n - n_ctx
        order = torch.argsort(attn, dim=1, descending=True, stable=True)
        dominant = order[:, :n_dom]
        is_dom = torch.zeros_like(attn, dtype=torch.bool).scatter_(1, dominant, True)
        plan = {"attn": attn, "dominant": dominant, "targets": None}
        if n_ctx:
            rest = (~is_dom).nonzero()[:, 1].view(bsz, -1)  # remaining tokens in token order, (B, R)
            r = rest.shape[1]
            step = max(1, r // n_ctx)
            pick = torch.arange(0, r, step, device=rest.device)[:n_ctx]
            is_target = torch.zeros(r, dtype=torch.bool, device=rest.device)
            is_target[pick] = True
            metric = vision_map(ctx, self._resolved, "keys", self.name) if self.similarity == "vision_keys" \
                else visual_states(ctx)
            metric = torch.nn.functional.normalize(metric, dim=-1)
            m_rest = metric.gather(1, rest[..., None].expand(-1, -1, metric.shape[-1]))
            sim = m_rest[:, ~is_target] @ m_rest[:, is_target].transpose(1, 2)  # (B, R - c, c)
            plan.update(targets=rest[:, is_target], members=rest[:, ~is_target], assign=sim.argmax(dim=2))
        ctx.scratch["visionzip"] = plan
        return plan

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        plan = self._plan(ctx)
        return tiered(plan["attn"], plan["dominant"], plan["targets"])

    def merge(self, ctx: ScoreContext, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        plan = self._plan(ctx)
        if plan["targets"] is None:
            return None
        h = visual_states(ctx)
        bsz, c = plan["targets"].shape
        members = h.gather(1, plan["members"][..., None].expand(-1, -1, h.shape[-1]))  # (B, R - c, D)
        one_hot = torch.zeros(bsz, members.shape[1], c, device=h.device).scatter_(2, plan["assign"][..., None], 1.0)
        counts = one_hot.sum(dim=1).clamp_min(1.0)[..., None]  # (B, c, 1)
        mean = one_hot.transpose(1, 2) @ members / counts  # (B, c, D): members' mean per target (0 if none)
        idx = plan["targets"][..., None].expand(-1, -1, h.shape[-1])
        return h.scatter(1, idx, h.gather(1, idx) + mean)
