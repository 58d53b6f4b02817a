"""Image-layout helpers shared by adapters: token grids, tiles and thumbnails -> (row, col) in [0, 1).

Every adapter's ``visual_coords`` says, for each visual token, where on its image it sits. Families differ in
how an image becomes tokens: one grid (LLaVA-1.5, Gemma 3), a grid per tile plus a global thumbnail (InternVL,
Idefics3 / SmolVLM), variable sizes (Qwen, Pixtral). These helpers build the per-image (n, 2) tables that
``qwen_vl._assign_images`` stacks into the (B, V, 3) result.
"""

from __future__ import annotations

from typing import Any

__all__ = ["grid_rc", "tiled_rc"]


def grid_rc(h: int, w: int) -> Any:
    """(h*w, 2) float: the centres (row, col) of an h x w token grid over the whole image, raster order."""
    import torch

    r = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    c = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)


def tiled_rc(rows: int, cols: int, side: int, tile_order: list[tuple[int, int]] | None = None) -> Any:
    """(rows*cols*side*side, 2): the tokens of a rows x cols grid of tiles, each tile a side x side grid read in
    raster order, tiles in ``tile_order`` (default: raster order of tiles); coordinates over the whole image."""
    import torch

    local = grid_rc(side, side)
    order = tile_order if tile_order is not None else [(i, j) for i in range(rows) for j in range(cols)]
    parts = [torch.stack([(i + local[:, 0]) / rows, (j + local[:, 1]) / cols], dim=1) for i, j in order]
    return torch.cat(parts) if parts else torch.zeros(0, 2)
