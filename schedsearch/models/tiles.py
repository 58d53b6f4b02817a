"""Image-layout helpers shared by adapters: token grids, tiles and thumbnails -> (row, col) in [0, 1).

Every adapter's ``visual_coords`` says, for each visual token, where on its image it sits. Families differ in
how an image becomes tokens: one grid (LLaVA-1.5, Gemma 3), a grid per tile plus a global thumbnail (InternVL,
Idefics3 / SmolVLM), variable sizes (Qwen, Pixtral). These helpers build the per-image (n, 2) tables that
``qwen_vl._assign_images`` stacks into the (B, V, 3) result.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LAYOUT_ATTR", "attached_layout", "best_tile_grid", "grid_rc", "grids_from_tiles", "thumbnail_layouts",
           "tile_grids", "tiled_rc", "visual_runs"]


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


def visual_runs(vis: Any) -> list[list[int]]:
    """Per sample, the lengths of its runs of consecutive visual tokens (one run per image block)."""
    out: list[list[int]] = []
    for row in vis.tolist():
        runs, run = [], 0
        for v in row + [False]:
            if v:
                run += 1
            elif run:
                runs.append(run)
                run = 0
        out.append(runs)
    return out


def best_tile_grid(tiles: Any, thumbnail: Any, candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The (rows, cols) arrangement of ``tiles`` (k, C, S, S), read in raster order, whose stitched picture,
    shrunk to S x S by area averaging, is closest (mean squared error) to ``thumbnail`` (C, S, S) -- the whole
    image resized to one tile. Used where a processor cuts an image into a grid of tiles plus a thumbnail and the
    grid is not in the batch (InternVL's GotOcr2 crops). Ties (e.g. a flat image) go to the first candidate."""
    import torch

    best, best_err = candidates[0], float("inf")
    k, c, s, _ = tiles.shape
    for rows, cols in candidates:
        canvas = tiles.float().reshape(rows, cols, c, s, s).permute(2, 0, 3, 1, 4).reshape(c, rows * s, cols * s)
        small = torch.nn.functional.adaptive_avg_pool2d(canvas[None], (s, s))[0]
        err = float(((small - thumbnail.float()) ** 2).mean())
        if err < best_err - 1e-12:
            best, best_err = (rows, cols), err
    return best


#: attribute under which an adapter's ``precompute_vision`` keeps a batch's image layout on the encoder output it
#: passes as ``mm_encoder_outputs`` (the pixels are dropped then, and some layouts are only in the pixels)
LAYOUT_ATTR = "schedsearch_layout"


def attached_layout(batch: Any) -> Any:
    """The layout ``precompute_vision`` attached to ``batch``'s image encoder output, or None."""
    enc = batch.get("mm_encoder_outputs") if hasattr(batch, "get") else None
    image = enc.get("image") if isinstance(enc, dict) else None
    return getattr(image, LAYOUT_ATTR, None)


def grids_from_tiles(pixels: Any, tiles: list[int]) -> list[tuple[int, int]]:
    """(rows, cols) of each image's tile grid. ``pixels`` (total tiles, C, S, S): each image's tiles in raster order,
    then its thumbnail (a one-tile image has none); ``tiles``: tiles per image, thumbnail included."""
    out, k = [], 0
    for n in tiles:
        if n == 1:
            out.append((1, 1))
        else:
            cand = [(r, (n - 1) // r) for r in range(1, n) if (n - 1) % r == 0]
            out.append(best_tile_grid(pixels[k:k + n - 1], pixels[k + n - 1], cand))
        k += n
    if k != pixels.shape[0]:
        raise ValueError(f"visual_coords: the image tokens imply {k} tiles but there are {pixels.shape[0]}")
    return out


def tile_grids(batch: Any, tiles: list[int]) -> list[tuple[int, int]]:
    """The tile grids of a batch: kept by ``precompute_vision``, else found from its pixels (the batch's
    ``pixel_values`` or the recorded vision-tower call's)."""
    grids = attached_layout(batch)
    if grids is not None:
        return grids
    pixels = batch.get("pixel_values")
    if pixels is None and batch.get("_vision_call") is not None:
        args, kwargs = batch["_vision_call"]
        pixels = kwargs.get("pixel_values", args[0] if args else None)
    if pixels is None:
        raise ValueError("visual_coords: the tile grid is only in the pixels, and the batch has no pixel_values (nor "
                         "a recorded vision call or a precompute_vision layout)")
    return grids_from_tiles(pixels, tiles)


def thumbnail_layouts(tiles: list[int], grids: list[tuple[int, int]], side: int) -> list[Any]:
    """Per image, (n, 2) row/col: its rows x cols tiles (side x side tokens each, raster order) over the image,
    then the thumbnail's own side x side grid; a one-tile image is just that grid."""
    import torch

    out = []
    for n, (rows, cols) in zip(tiles, grids, strict=True):
        parts = [tiled_rc(rows, cols, side)] if n > 1 else []
        out.append(torch.cat([*parts, grid_rc(side, side)]))
    return out
