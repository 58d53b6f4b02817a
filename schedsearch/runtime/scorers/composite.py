"""``composite``: several rankings at once -- a union of per-criterion shares, or a weighted rank ensemble.

Params (checked by ``scorer_specs.Members``)::

    {"mode": "union",                       # or "rank"
     "members": [{"name": "last_token_attention", "params": {"rope": false}, "weight": 1},
                 {"name": "uniform", "weight": 1}]}

* ``mode="union"``: member i gets a share q_i of the ``n_keep`` slots proportional to its weight (largest
  remainder; earlier members win ties); in member order, each member takes its q_i best tokens among those not
  taken yet. The kept set is thus the union of per-criterion top-k sets, with exactly ``n_keep`` tokens. This is the
  shape of FEATHER's rule (Endo et al., arXiv 2412.13180, Sec. 5: attention top-k united with a uniform grid).
* ``mode="rank"``: each member's scores become ranks normalised to [0, 1] (1 = best; ties by token order, as the
  runtime breaks them) and the composite score is their weighted mean (a Borda count).

Every member sees the same :class:`ScoreContext` (each with its own ``scratch``); the composite forwards
``needs_coords``, ``vision_layers``, ``attach`` and ``begin`` to its members. Members' ``merge`` steps (VisionZip's
contextual tokens, SparseVLM's recycling) are not applied: a composite only chooses the kept set (use
``recycling`` in the schedule to merge pruned tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from schedsearch.runtime.scorers.base import ScoreContext


def shares(n: int, weights: list[float]) -> list[int]:
    """``n`` slots split in proportion to ``weights`` by largest remainder (ties: earlier member)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    out = [math.floor(x) for x in exact]
    rest = n - sum(out)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:rest]:
        out[i] += 1
    return out


def normalised_ranks(scores: torch.Tensor) -> torch.Tensor:
    """(B, V) scores -> (B, V) in [0, 1]: 1 for the best token, 0 for the worst (stable: earlier token first)."""
    bsz, v = scores.shape
    order = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(v, device=scores.device).expand(bsz, v))
    return 1.0 - pos.float() / max(v - 1, 1)


class Composite:
    name = "composite"

    def __init__(self, members: list[dict] | tuple = (), mode: str = "union"):
        from schedsearch.runtime.scorers import build_scorer

        self.mode = mode
        self.weights = [float(m.get("weight", 1.0)) for m in members]
        self.members = [build_scorer(m["name"], dict(m.get("params") or {})) for m in members]
        self.needs_coords = any(getattr(m, "needs_coords", False) for m in self.members)
        self.needs_time = any(getattr(m, "needs_time", False) for m in self.members)
        if any(hasattr(m, "vision_layers") for m in self.members):
            self.vision_layers = self._vision_layers

    def _vision_layers(self, depth: int, global_layers: Any) -> dict:
        out: dict = {}
        for m in self.members:
            if hasattr(m, "vision_layers"):
                for layer, kinds in m.vision_layers(depth, global_layers).items():
                    out[layer] = tuple(dict.fromkeys((*out.get(layer, ()), *kinds)))
        return out

    def attach(self, text_model: Any, view: Any) -> list:
        handles: list = []
        for m in self.members:
            if hasattr(m, "attach"):
                handles.extend(m.attach(text_model, view))
        return handles

    def begin(self, batch_info: dict) -> None:
        for m in self.members:
            if hasattr(m, "begin"):
                m.begin(batch_info)

    def _scores(self, ctx: ScoreContext) -> list[torch.Tensor]:
        return [m(dataclasses.replace(ctx, scratch={})).float() for m in self.members]

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        bsz, v = ctx.visual_local.shape
        per = self._scores(ctx)
        if self.mode == "rank":
            total = sum(self.weights)
            return sum(w * normalised_ranks(s) for w, s in zip(self.weights, per, strict=True)) / total
        n_keep = min(ctx.n_keep, v)
        out = torch.zeros(bsz, v, device=ctx.visual_local.device)
        if n_keep <= 0:
            return out
        taken = torch.zeros(bsz, v, dtype=torch.bool, device=out.device)
        rows = torch.arange(bsz, device=out.device)[:, None]
        rank = 0
        for q, s in zip(shares(n_keep, self.weights), per, strict=True):
            if q == 0:
                continue
            s = s.to(out.device).masked_fill(taken, float("-inf"))
            pick = torch.argsort(s, dim=1, descending=True, stable=True)[:, :q]
            taken[rows, pick] = True
            out[rows, pick] = torch.arange(n_keep - rank, n_keep - rank - q, -1, device=out.device).float()
            rank += q
        return out
