"""``composite``: a weighted combination of 2-3 registered rankings (what ``--scorer auto`` searches besides them).

Two ways to combine the parts' scores, both scale-free (the parts' scores live on unrelated scales: attention
probabilities, distances, 0/1 picks):

* ``rank`` (default): each part's scores become rank percentiles over the alive visual tokens of a sample (1 = its
  best token, 0 = its worst; ties broken as the runtime breaks them, earlier token first), and the composite score
  is their weighted mean. This is reciprocal-rank-style fusion on percentiles, our design choice (no paper).
* ``union``: the kept set is filled part by part: part i contributes its best ``round(w_i / sum(w) * n_keep)``
  tokens not already taken, the last part fills the remainder. With ``[last_token_attention (rope false),
  uniform]`` this is FEATHER's rule (Endo et al., arXiv 2412.13180, Sec. 5: attention top-k without RoPE plus
  uniformly sampled tokens); its released code keeps the union of both sets, here the two shares are sized so the
  kept count is exactly the schedule's.

Every part is a full scorer built from the registry with its own parameters: the composite forwards the runtime's
optional hooks (``needs_coords``, ``vision_layers``, ``attach``, ``begin``) to the parts that have them and gives
each part its own ``ctx.scratch``. A part's ``merge`` (VisionZip's contextual tokens, SparseVLM's recycling) is not
used: a composite only chooses tokens (a schedule's ``recycling`` section still merges).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from schedsearch.runtime.scorers.base import ScoreContext


def rank_percentile(scores: torch.Tensor) -> torch.Tensor:
    """(B, V) scores -> (B, V) in [0, 1]: 1 for each row's best token, 0 for its worst (stable: earlier first)."""
    bsz, v = scores.shape
    if v <= 1:
        return torch.ones_like(scores, dtype=torch.float32)
    order = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(v, device=scores.device).expand(bsz, v))
    return 1.0 - pos.float() / (v - 1)


class Composite:
    name = "composite"

    def __init__(self, parts: list[dict[str, Any]], mode: str = "rank"):
        from schedsearch.runtime.scorers import build_scorer

        self.mode = mode
        self.parts = [build_scorer(p["name"], p["params"]) for p in parts]
        self.weights = [float(p["weight"]) for p in parts]
        self.needs_coords = any(getattr(s, "needs_coords", False) for s in self.parts)
        # the runtime looks for these hooks with hasattr: offer each only when a part has it (a composite of
        # rankings that do not read the vision encoder must keep working on families without vision maps)
        if any(hasattr(s, "vision_layers") for s in self.parts):
            self.vision_layers = self._vision_layers
        if any(hasattr(s, "attach") for s in self.parts):
            self.attach = self._attach
        if any(hasattr(s, "begin") for s in self.parts):
            self.begin = self._begin

    def _vision_layers(self, depth: int, global_layers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        out: dict[int, set[str]] = {}
        for s in self.parts:
            if hasattr(s, "vision_layers"):
                for layer, kinds in s.vision_layers(depth, global_layers).items():
                    out.setdefault(layer, set()).update(kinds)
        return {layer: tuple(sorted(kinds)) for layer, kinds in out.items()}

    def _attach(self, text_model: Any, view: Any) -> list:
        handles: list = []
        for s in self.parts:
            if hasattr(s, "attach"):
                handles.extend(s.attach(text_model, view))
        return handles

    def _begin(self, batch_info: dict) -> None:
        for s in self.parts:
            if hasattr(s, "begin"):
                s.begin(batch_info)

    def _part(self, i: int, ctx: ScoreContext, n_keep: int) -> torch.Tensor:
        sub = dataclasses.replace(ctx, n_keep=n_keep, scratch=ctx.scratch.setdefault(("part", i), {}))
        return self.parts[i](sub).float()

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        total = sum(self.weights)
        if self.mode == "rank":  # every part ranks for the full kept count; weighted mean of rank percentiles
            return sum(w * rank_percentile(self._part(i, ctx, ctx.n_keep))
                       for i, w in enumerate(self.weights)) / total
        bsz, v = ctx.visual_local.shape
        n_keep = min(ctx.n_keep, v)
        taken = torch.zeros(bsz, v, dtype=torch.bool, device=ctx.visual_local.device)
        fused = torch.zeros(bsz, v, device=ctx.visual_local.device)
        out = torch.zeros(bsz, v, device=ctx.visual_local.device)
        left = n_keep
        for i, w in enumerate(self.weights):
            share = left if i == len(self.weights) - 1 else min(left, int(round(w / total * n_keep)))
            # each part ranks for its own share (uniform spaces exactly that many tokens, greedy picks stop there)
            x = self._part(i, ctx, max(share, 1))
            fused += w / total * rank_percentile(x)
            if share <= 0:
                continue
            order = torch.argsort(x.masked_fill(taken, float("-inf")), dim=1, descending=True, stable=True)
            pick = order[:, :share]
            # earlier parts' picks rank above later parts' (each part's picks in its own order)
            level = (len(self.weights) - i) + 1.0 - torch.arange(share, device=out.device).float() / share
            out = out.scatter(1, pick, level.expand(bsz, share))
            taken = taken.scatter(1, pick, True)
            left -= share
        return torch.where(taken, out, 0.5 * fused)  # tokens nobody took: below every taken one, in fused order
