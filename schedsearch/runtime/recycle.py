"""Recycling of pruned visual tokens (VFlowOpt, arXiv 2508.05211, Sec. 3.3 — paraphrased).

Pruned tokens are grouped by spatial cell on an m x m grid of their image. Each pruned token is
merged into the most important *kept* token of its cell by an importance-weighted average:

    h_t <- (w_t h_t + sum_p w_p h_p) / (w_t + sum_p w_p)

Design choice of ours (the paper keeps one extra merged token per group; that would change the
kept count the schedule promises): pruned tokens of a cell with no kept token are dropped, so the
count the schedule states is exact.
"""

from __future__ import annotations

import torch


def cell_ids(coords: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, V, 3) (image, row, col in [0,1)) -> (B, V) cell id on an m x m grid per image."""
    img = coords[..., 0].long()
    row = (coords[..., 1] * grid).floor().long().clamp(0, grid - 1)
    col = (coords[..., 2] * grid).floor().long().clamp(0, grid - 1)
    return img * grid * grid + row * grid + col


def merge_into_kept(
    visual_h: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor, cells: torch.Tensor
) -> torch.Tensor:
    """Return new states for the alive visual tokens with pruned ones merged into kept ones.

    visual_h: (B, V, D) states of alive visual tokens; keep: (B, V) bool; weights: (B, V) >= 0;
    cells: (B, V) long. Only rows where ``keep`` is True change.
    """
    out = visual_h.clone()
    w_all = weights.float().clamp_min(0)
    for b in range(visual_h.shape[0]):
        w = w_all[b]
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        w = w + 1e-12  # a zero-weight kept token still absorbs its cell's pruned tokens
        kept = keep[b].nonzero().squeeze(1)
        pruned = (~keep[b]).nonzero().squeeze(1)
        if kept.numel() == 0 or pruned.numel() == 0:
            continue
        n_cells = int(cells[b].max()) + 1
        # representative of each cell: the kept token with the largest weight (first on ties)
        by_w = kept[torch.argsort(w[kept], descending=True, stable=True)]
        by_cell = by_w[torch.argsort(cells[b, by_w], stable=True)]  # (cell asc, weight desc, index asc)
        c_sorted = cells[b, by_cell]
        first = torch.ones_like(c_sorted, dtype=torch.bool)
        first[1:] = c_sorted[1:] != c_sorted[:-1]
        rep = torch.full((n_cells,), -1, dtype=torch.long, device=kept.device)
        rep[c_sorted[first]] = by_cell[first]
        target = rep[cells[b, pruned]]
        has = target >= 0
        if not bool(has.any()):
            continue
        src, tgt = pruned[has], target[has]
        num = torch.zeros_like(visual_h[b], dtype=torch.float32)
        den = torch.zeros(visual_h.shape[1], dtype=torch.float32, device=visual_h.device)
        num.index_add_(0, tgt, visual_h[b, src].float() * w[src, None])
        den.index_add_(0, tgt, w[src])
        hit = den > 0
        merged = (visual_h[b].float() * w[:, None] + num) / (w[:, None] + den[:, None])
        out[b, hit] = merged[hit].to(visual_h.dtype)
    return out
