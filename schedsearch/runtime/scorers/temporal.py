"""Shared helpers of the video rankings (``evs``, ``holitom``, ``vidcom2``): frames, cells and predecessors.

A video ranking sees, per alive visual token, ``ctx.time`` (clip, frame) -- clip -1 for image tokens -- and
``ctx.coords`` (item, row, col): every temporal patch of a clip is its own item with the same cell grid, so the
token "at the same position in the previous frame" is the one with the same clip, row and col and the next
lower frame. After an earlier drop that token may be gone: the helpers then use the latest ALIVE token of that
cell in an earlier frame (at the first drop, before which nothing was pruned, this is exactly the previous frame).
"""

from __future__ import annotations

import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext


def check(ctx: ScoreContext, name: str) -> None:
    if ctx.time is None or ctx.coords is None:
        raise ScheduleError(f"scorer {name} needs the visual tokens' frames (ScoreContext.time and coords): the "
                            "adapter provides them for video families (qwen2_vl, qwen2_5_vl, qwen3_vl)")


def cell_ids(ctx: ScoreContext, b: int) -> torch.Tensor:
    """(V,) long id of (clip, row, col) for sample ``b``'s alive visual tokens; image tokens get their own ids."""
    key = torch.stack([ctx.time[b, :, 0].float(), ctx.coords[b, :, 1].float(), ctx.coords[b, :, 2].float(),
                       torch.where(ctx.time[b, :, 0] < 0, ctx.coords[b, :, 0].float(), torch.zeros_like(
                           ctx.coords[b, :, 0].float()))], dim=1)
    return torch.unique(key, dim=0, return_inverse=True)[1]


def frame_ids(ctx: ScoreContext, b: int) -> torch.Tensor:
    """(V,) long id of the picture a token belongs to: (clip, frame) for video tokens, the item for image tokens."""
    key = torch.stack([ctx.time[b, :, 0].float(), ctx.time[b, :, 1].float(),
                       torch.where(ctx.time[b, :, 0] < 0, ctx.coords[b, :, 0].float(),
                                   torch.full_like(ctx.coords[b, :, 0].float(), -1.0))], dim=1)
    return torch.unique(key, dim=0, return_inverse=True)[1]


def predecessors(ctx: ScoreContext, b: int) -> torch.Tensor:
    """(V,) long: index (into the alive visual tokens) of the latest alive token of the same clip and cell in an
    earlier frame, or -1 (first alive frame of that cell, or an image token)."""
    cells = cell_ids(ctx, b)
    frame = ctx.time[b, :, 1]
    v = cells.shape[0]
    order = torch.argsort(cells * (int(frame.max()) + 1 if v else 1) + frame, stable=True)
    prev = torch.full((v,), -1, dtype=torch.long, device=cells.device)
    same = cells[order[1:]] == cells[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    prev[ctx.time[b, :, 0] < 0] = -1
    return prev
