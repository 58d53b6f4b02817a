"""Synthetic scenes: coloured shapes on a plain or noisy background, placed in every region.

The image is ``IMAGE_SIZE`` px square, split into a ``GRID`` x ``GRID`` grid of cells; each object sits
in its own cell (jittered inside it), so objects never overlap and never straddle the image's halves:
"top/bottom half", "left/right half" and quadrants are always well defined. Cells are drawn uniformly,
so every region of the image holds objects equally often.

Everything is drawn from a ``numpy.random.Generator`` handed in by the caller, so a (seed, index)
pair always gives the same scene and the same PNG bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_SIZE = 128  # px; with patch 4 and 2x2 merge: 16 x 16 = 256 visual tokens
GRID = 4  # cells per side
CELL = IMAGE_SIZE // GRID
MAX_OBJECTS = GRID * GRID  # at most one object per cell
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 175, 60), "blue": (45, 80, 225), "yellow": (230, 205, 35),
}
SHAPES = ("square", "circle", "triangle")
SIZES: dict[str, int] = {"small": 12, "large": 22}  # object extent in px


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int  # cell row, 0 = top
    col: int  # cell column, 0 = left
    cx: float  # centre in px
    cy: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def vertical(self) -> str:
        return "top" if self.row < GRID // 2 else "bottom"

    @property
    def horizontal(self) -> str:
        return "left" if self.col < GRID // 2 else "right"

    @property
    def quadrant(self) -> str:
        return f"{self.vertical} {self.horizontal}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: int  # grey level
    noise: int  # amplitude of the background noise (0 = plain)


def make_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 6) -> Scene:
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"objects per scene must satisfy 1 <= min_objects ({min_objects}) <= max_objects "
                         f"({max_objects}) <= {MAX_OBJECTS} (one object per grid cell)")
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objs = []
    for cell in sorted(int(c) for c in cells):
        r, c = divmod(cell, GRID)
        size = str(rng.choice(list(SIZES)))
        slack = (CELL - SIZES[size]) / 2 - 1
        jx, jy = rng.uniform(-slack, slack, size=2)
        objs.append(Obj(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))), size=size,
                        row=r, col=c, cx=c * CELL + CELL / 2 + float(jx), cy=r * CELL + CELL / 2 + float(jy)))
    noisy = bool(rng.integers(0, 2))
    background = int(rng.integers(0, 90))
    return Scene(objects=tuple(objs), background=background, noise=int(rng.integers(8, 30)) if noisy else 0)


def _draw(draw: Any, o: Obj, fill: Any) -> None:
    h = SIZES[o.size] / 2
    x0, y0, x1, y1 = o.cx - h, o.cy - h, o.cx + h, o.cy + h
    if o.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif o.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(o.cx, y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene: Scene, rng: np.random.Generator) -> Any:
    """The RGB PIL image of ``scene`` (noise and colour jitter drawn from ``rng``)."""
    from PIL import Image, ImageDraw

    bg = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.background, dtype=np.int16)
    if scene.noise:
        bg = bg + rng.integers(-scene.noise, scene.noise + 1, size=bg.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        jitter = rng.integers(-15, 16, size=3)
        fill = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[o.colour], jitter, strict=True))
        _draw(draw, o, fill)
    return img


def label_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8: 0 = background, i + 1 = pixel of ``scene.objects[i]`` (for auxiliary training targets)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        _draw(draw, o, i + 1)
    return np.asarray(img)
