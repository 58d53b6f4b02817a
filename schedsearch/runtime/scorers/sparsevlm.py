"""``sparsevlm``: text raters chosen by relevance rank the visual tokens; pruned ones are recycled by clustering.

SparseVLM (Zhang et al., arXiv 2410.04417 v1, Sec. 3); reference Gumpest/SparseVLMs
``llava/model/language_model/modelling_sparse_llama.py`` + ``score.py`` and LightCompress
``token_reduction/sparsevlm.py``:

1. raters (once per prefill, on the text model's input embeddings): for the text tokens after the image,
   r_t = mean over visual tokens v of softmax_t(x_v . x_t) (unscaled, over those text tokens); raters are the text
   tokens with r_t above the mean of r;
2. at a drop, relation(v) = the raters' attention to v, mean over heads and raters, in the layer whose output is
   pruned (layer l - 1 for a drop before layer l; layer 0 itself for a drop before layer 0);
3. recycling (``recycle``, the reference's merge_flag): of the pruned tokens, the int(0.3 * pruned) + 1 with the
   largest relation are clustered by density peaks (DPC-KNN, k = number of clusters = int(recycled / 10) + 1) on
   their states, and each cluster becomes its mean, placed at the cluster's centre token.

To keep the schedule's count n_keep exactly, the top (n_keep - c) tokens by relation are kept and the c cluster
centres fill the rest (the reference keeps its table's count and *adds* the c merged tokens). Deliberate
differences: the per-stage counts come from the schedule (the reference reads them from a table per budget and
v1 has no adaptive count); the reference breaks density ties with random noise (here: token order); merged tokens
keep their centre's original position; raters are computed on the input embeddings of all text after the image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from schedsearch.runtime.scorers.base import (
    PrefillView,
    ScoreContext,
    batch_rows,
    mask_indices,
    mean_attention,
    text_after_visual,
    tiered,
    visual_states,
)
from schedsearch.runtime.scorers.observers import PreviousLayer


def rater_mask(h: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, n) bool raters among ``text`` (B, n): SparseVLM's m_v_t = softmax_t(v . t).mean(v) > its mean."""
    d = h.shape[-1]
    v_idx, v_ok = mask_indices(visual)
    t_idx, t_ok = mask_indices(text)
    hv = h.gather(1, v_idx[..., None].expand(-1, -1, d)).float()
    ht = h.gather(1, t_idx[..., None].expand(-1, -1, d)).float()
    logits = (hv @ ht.transpose(1, 2)).masked_fill(~t_ok[:, None, :], float("-inf"))  # (B, V, T)
    probs = torch.softmax(logits, dim=2).nan_to_num(0.0)
    w = v_ok.float()
    rel = (probs * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, T)
    mean = (rel * t_ok).sum(dim=1, keepdim=True) / t_ok.sum(dim=1, keepdim=True).clamp_min(1)
    chosen = t_ok & (rel > mean)
    return torch.zeros_like(text).scatter(1, t_idx, chosen) & text


def dpc_knn(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's ``cluster_and_merge`` clustering of (B, N, D) states into c clusters.

    Returns (centres (B, c) indices into N, assignment (B, N) in [0, c)). Density: exp(-mean of the squared
    distances to the c nearest neighbours); a centre has high density and is far from denser tokens.
    """
    bsz, n, d = x.shape
    dist = torch.cdist(x.float(), x.float()) / d**0.5
    near = dist.topk(min(c, n), dim=-1, largest=False).values
    density = torch.exp(-(near.double() ** 2).mean(dim=-1))  # float64: the tie break below must register
    density = density + torch.arange(n, device=x.device, dtype=torch.float64) * 1e-9  # reference: random noise
    higher = density[:, None, :] > density[:, :, None]  # [i, j]: j is denser than i
    dist_max = dist.flatten(1).max(dim=1).values[:, None, None]
    delta = torch.where(higher, dist, dist_max).min(dim=-1).values
    centres = (delta.double() * density).topk(c, dim=-1).indices  # (B, c)
    assign = dist.gather(1, centres[..., None].expand(-1, -1, n)).argmin(dim=1)  # (B, N): nearest centre
    assign.scatter_(1, centres, torch.arange(c, device=x.device).expand(bsz, c))  # a centre joins its own cluster
    return centres, assign


def recycled_counts(v: int, n_keep: int) -> tuple[int, int]:
    """(kept by relation, cluster centres) summing to n_keep, with the reference's rules: int(0.3 * pruned) + 1
    recycled tokens, int(recycled / 10) + 1 clusters."""
    c = 1
    for _ in range(64):
        pruned = v - (n_keep - c)
        new = int(int(0.3 * pruned + 1) / 10) + 1
        if new == c:
            break
        c = new
    c = min(c, n_keep // 2, max(v - n_keep, 0))
    return n_keep - c, c


class SparseVLM:
    name = "sparsevlm"

    def __init__(self, recycle: bool = True):
        self.recycle = bool(recycle)
        self._prev = PreviousLayer()
        self._raters: torch.Tensor | None = None  # (B, N) bool over ORIGINAL positions
        self._rated: torch.Tensor | None = None  # (B,) bool: samples whose raters are set
        self._view: Callable[[], PrefillView | None] | None = None

    def attach(self, text_model: Any, view: Callable[[], PrefillView | None]) -> list:
        self._view = view

        def first(module: Any, args: tuple, kwargs: dict) -> None:
            v = view()
            if v is None or (self._raters is not None and bool(self._rated.all())):
                return None
            h = args[0] if args else kwargs["hidden_states"]
            text = v.valid & ~v.visual
            pos = torch.arange(text.shape[1], device=text.device)
            last = torch.where(v.visual, pos, -1).max(dim=1, keepdim=True).values
            todo = None if self._raters is None else (~self._rated).nonzero()[:, 0]  # rows a layer-0 drop skipped
            mask = rater_mask(h, v.visual, text & (pos > last))
            self._set_raters(mask if todo is None else mask[todo], v.alive if todo is None else v.alive[todo], todo)
            return None

        return [*self._prev.attach(text_model, view),
                text_model.layers[0].register_forward_pre_hook(first, with_kwargs=True)]

    def begin(self, batch_info: dict) -> None:
        self._prev.begin()
        self._raters = None

    def _set_raters(self, mask: torch.Tensor, alive: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Raters (B, n) of the alive tokens ``alive`` -> ``_raters`` over original positions; ``rows``: only those
        samples of the whole batch (a ragged batch scored in sub-batches, see ScoreContext.rows)."""
        if rows is None:
            full = torch.zeros(mask.shape[0], int(alive.max()) + 1, dtype=torch.bool, device=mask.device)
            self._raters = full.scatter(1, alive, mask)
            self._rated = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
            return
        if self._raters is None:
            whole = self._view() if self._view is not None else None
            if whole is None:
                raise RuntimeError("sparsevlm: a sub-batch outside a pruning prefill")
            self._raters = torch.zeros(whole.alive.shape[0], int(whole.alive.max()) + 1, dtype=torch.bool,
                                       device=mask.device)
            self._rated = torch.zeros(whole.alive.shape[0], dtype=torch.bool, device=mask.device)
        rows = rows.to(mask.device)
        part = torch.zeros(len(rows), self._raters.shape[1], dtype=torch.bool, device=mask.device)
        self._raters = self._raters.index_copy(0, rows, part.scatter(1, alive.clamp(max=part.shape[1] - 1), mask))
        self._rated = self._rated.index_fill(0, rows, True)

    def _plan(self, ctx: ScoreContext) -> dict:
        if "sparsevlm" in ctx.scratch:
            return ctx.scratch["sparsevlm"]
        bsz, v = ctx.visual_local.shape
        alive = ctx.alive_orig if ctx.alive_orig is not None else \
            torch.arange(ctx.hidden_states.shape[1], device=ctx.visual_local.device).expand(bsz, -1)
        rows_todo = self._raters is None or (ctx.rows is not None and not bool(batch_rows(ctx, self._rated).all()))
        if rows_todo:  # a drop before layer 0: ctx holds the input embeddings
            visual = torch.zeros_like(ctx.text_mask).scatter(1, ctx.visual_local, True)
            self._set_raters(rater_mask(ctx.hidden_states, visual, text_after_visual(ctx)), alive, ctx.rows)
        raters = batch_rows(ctx, self._raters.to(alive.device))
        raters = raters.gather(1, alive.clamp(max=raters.shape[1] - 1))
        raters = raters & ctx.text_mask
        raters = torch.where(raters.any(dim=1, keepdim=True), raters, text_after_visual(ctx))
        relation = mean_attention(self._prev.context(ctx), raters)  # (B, V)
        n_top, c = recycled_counts(v, min(ctx.n_keep, v)) if self.recycle else (min(ctx.n_keep, v), 0)
        order = torch.argsort(relation, dim=1, descending=True, stable=True)
        plan = {"relation": relation, "top": order[:, :n_top], "centres": None}
        if c > 0:
            pruned = order[:, n_top:]  # by relation, descending
            n_rec = min(int(0.3 * pruned.shape[1]) + 1, pruned.shape[1])
            cand = pruned[:, :n_rec]
            x = visual_states(ctx).gather(1, cand[..., None].expand(-1, -1, ctx.hidden_states.shape[-1]))
            centres, assign = dpc_knn(x, c)
            plan.update(centres=cand.gather(1, centres), cand=cand, assign=assign, c=c)
        ctx.scratch["sparsevlm"] = plan
        return plan

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        plan = self._plan(ctx)
        return tiered(plan["relation"], plan["top"], plan["centres"])

    def merge(self, ctx: ScoreContext, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        plan = self._plan(ctx)
        if plan["centres"] is None:
            return None
        h = visual_states(ctx)
        d = h.shape[-1]
        x = h.gather(1, plan["cand"][..., None].expand(-1, -1, d))
        one_hot = torch.nn.functional.one_hot(plan["assign"], plan["c"]).float()  # (B, n_rec, c)
        means = one_hot.transpose(1, 2) @ x / one_hot.sum(dim=1)[..., None].clamp_min(1.0)  # (B, c, D)
        return h.scatter(1, plan["centres"][..., None].expand(-1, -1, d), means)
