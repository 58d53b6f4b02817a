"""Study pictures as matplotlib Figures (Agg canvas, no pyplot, no display needed).

Each function returns a :class:`matplotlib.figure.Figure`; save it with ``fig.savefig("x.png")`` or log it
with :meth:`schedsearch.tracking.Tracker.log_figure`. matplotlib is imported on first call; without it a
:class:`~schedsearch.tracking.TrackingUnavailableError` says which extra to install.

- :func:`keep_ratio_plot` — cumulative keep ratio of visual tokens per decoder layer, one line per schedule.
- :func:`history_plot` — objective per trial and the best so far.
- :func:`pareto_plot` — discrepancy vs achieved FLOPs ratio for every trial, the non-dominated front marked.
- :func:`overlay_plot` — which visual tokens (grid cells) were kept, drawn over a calibration image.
- :func:`curves_plot` — one line per series through its (x, y) points, e.g. accuracy vs achieved FLOPs per method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["curves_plot", "history_plot", "keep_ratio_plot", "overlay_plot", "pareto_front", "pareto_plot"]

_SIZE = (6.4, 4.0)


def _figure(size: tuple[float, float] = _SIZE) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - only without the extra
        from schedsearch.tracking import TrackingUnavailableError

        raise TrackingUnavailableError(f"plots need matplotlib ({exc}): pip install \"schedsearch[search]\"") from None
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def keep_ratio_plot(schedules: Mapping[str, Sequence[float]], title: str | None = None) -> Any:
    """Keep ratio per decoder layer (a step line: the ratio holds for the whole layer), one line per schedule.

    ``schedules`` maps a label ("searched", "fastv", ...) to its per-layer keep ratios; the legend shows each
    schedule's mean keep ratio (the token average over layers).
    """
    fig = _figure()
    ax = fig.add_subplot()
    n_max = 1
    for label, ratios in schedules.items():
        r = [float(x) for x in ratios]
        if not r:
            continue
        n_max = max(n_max, len(r))
        xs = list(range(len(r) + 1))
        ax.step(xs, r + r[-1:], where="post", label=f"{label} (mean {sum(r) / len(r):.3f})", linewidth=1.8)
    ax.set_xlim(0, n_max)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens kept (fraction)")
    ax.set_title(title or "Keep ratio per layer")
    ax.grid(True, alpha=0.3)
    if schedules:
        ax.legend(loc="upper right", fontsize="small")
    return fig


def history_plot(values: Sequence[float | None], direction: str = "minimize", title: str | None = None) -> Any:
    """Objective value per trial (dots) and the best so far (line). ``None``/NaN values (failed trials) are skipped."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    fig = _figure()
    ax = fig.add_subplot()
    xs, ys, best = [], [], []
    cur = math.inf if direction == "minimize" else -math.inf
    for i, v in enumerate(values):
        if v is None or not math.isfinite(float(v)):
            continue
        v = float(v)
        cur = min(cur, v) if direction == "minimize" else max(cur, v)
        xs.append(i)
        ys.append(v)
        best.append(cur)
    ax.plot(xs, ys, "o", markersize=3.5, alpha=0.6, label="trial")
    ax.step(xs, best, where="post", color="C3", linewidth=1.8, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title(title or "Optimization history")
    if ys and min(ys) > 0 and max(ys) / min(ys) > 100:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated points when both coordinates are minimized, sorted by the second (FLOPs) coordinate."""
    pts = sorted({(float(d), float(f)) for d, f in points if math.isfinite(d) and math.isfinite(f)},
                 key=lambda p: (p[1], p[0]))
    front: list[tuple[float, float]] = []
    best_d = math.inf
    for d, f in pts:
        if d < best_d:
            front.append((d, f))
            best_d = d
    return front


def pareto_plot(points: Sequence[tuple[float, float]], front: Sequence[tuple[float, float]] | None = None,
                budgets: Sequence[float] = (), title: str | None = None) -> Any:
    """Discrepancy (y) vs achieved FLOPs ratio (x) of every trial, with the Pareto front.

    Points are ``(discrepancy, flops_ratio)`` — the order of a two-objective study's ``trial.values``. ``front``
    defaults to the non-dominated subset of ``points`` (:func:`pareto_front`). ``budgets`` draws the requested
    budgets as vertical dashed lines.
    """
    fig = _figure()
    ax = fig.add_subplot()
    pts = [(float(d), float(f)) for d, f in points]
    if pts:
        ax.plot([f for _, f in pts], [d for d, _ in pts], "o", markersize=3.5, alpha=0.45, label="trial")
    fr = sorted(((float(d), float(f)) for d, f in (front if front is not None else pareto_front(pts))),
                key=lambda p: p[1])
    if fr:
        ax.step([f for _, f in fr], [d for d, _ in fr], where="post", color="C3", linewidth=1.5)
        ax.plot([f for _, f in fr], [d for d, _ in fr], "o", color="C3", markersize=5, label="Pareto front")
    for i, b in enumerate(budgets):
        ax.axvline(float(b), color="0.4", linestyle="--", linewidth=1, label="requested budget" if i == 0 else None)
    ax.set_xlabel("achieved FLOPs ratio (pruned / unpruned prefill)")
    ax.set_ylabel("discrepancy (1 - cos)")
    ax.set_title(title or "Discrepancy vs FLOPs")
    ax.grid(True, alpha=0.3)
    if pts or fr:
        ax.legend(loc="upper right", fontsize="small")
    return fig


def curves_plot(series: Mapping[str, Sequence[tuple[float, float]]], *, xlabel: str, ylabel: str,
                title: str | None = None, reference: Mapping[str, float] | None = None, logy: bool = False) -> Any:
    """One line with markers per series through its ``(x, y)`` points, sorted by x (non-finite points skipped).

    For sweeps, e.g. accuracy (y) vs achieved FLOPs ratio (x) with one series per method. ``reference`` draws
    labelled horizontal dashed lines (e.g. ``{"unpruned": 0.71}``); ``logy`` uses a log y axis.
    """
    fig = _figure()
    ax = fig.add_subplot()
    markers = "osD^vP*Xh<>"
    for i, (label, pts) in enumerate(series.items()):
        xy = sorted((float(x), float(y)) for x, y in pts if math.isfinite(float(x)) and math.isfinite(float(y)))
        if xy:
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker=markers[i % len(markers)], markersize=4.5,
                    linewidth=1.5, label=label)
    for j, (label, y) in enumerate((reference or {}).items()):
        ax.axhline(float(y), color=str(0.3 + 0.2 * j), linestyle="--", linewidth=1, label=label)
    if reference:  # keep the reference lines in view
        lo, hi = ax.get_ylim()
        ys = [float(y) for y in reference.values()]
        pad = 0.05 * (max(hi, *ys) - min(lo, *ys))
        ax.set_ylim(min(lo, min(ys) - pad), max(hi, max(ys) + pad))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} vs {xlabel}")
    ax.grid(True, alpha=0.3)
    if series or reference:
        ax.legend(fontsize="small")
    return fig


def _as_grid(cells: Any) -> Any | None:
    """A 2-D numpy array when ``cells`` is a grid (array, tensor, nested lists); None for a list of boxes."""
    import numpy as np

    if isinstance(cells, list | tuple) and (len(cells) == 0 or isinstance(cells[0], tuple)):
        return None
    if hasattr(cells, "detach"):  # torch tensor
        cells = cells.detach().cpu().numpy()
    grid = np.asarray(cells)
    if grid.ndim != 2:
        raise ValueError(f"kept-token grid must be 2-D (H, W), got shape {grid.shape}")
    return grid


def overlay_plot(image: Any, kept_cells: Any, title: str | None = None) -> Any:
    """Kept visual tokens drawn over a calibration image; pruned areas are darkened.

    ``kept_cells`` is either
    - a 2-D grid (numpy array, tensor or nested lists) of shape (H, W) over the image's token grid: booleans
      (True = kept) or floats in [0, 1] (e.g. the fraction of layers a token survived), stretched over the image;
    - or a list of ``(x0, y0, x1, y1)`` tuples, the kept cells' boxes, in pixels, or as fractions of the width
      and height when every coordinate is <= 1.
    """
    import numpy as np

    img = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    h_px, w_px = img.shape[:2]
    aspect = h_px / max(w_px, 1)
    fig = _figure((6.0, max(2.5, min(9.0, 6.0 * aspect)) + 0.4))
    ax = fig.add_subplot()
    ax.imshow(img, extent=(0, w_px, h_px, 0))
    grid = _as_grid(kept_cells)
    if grid is not None:
        keep = grid.astype(float)
        keep = np.clip(keep, 0.0, 1.0)
        shade = np.zeros(keep.shape + (4,))
        shade[..., 3] = 0.7 * (1.0 - keep)  # black, opaque where pruned
        ax.imshow(shade, extent=(0, w_px, h_px, 0), interpolation="nearest")
        gh, gw = keep.shape
        for i in range(1, gw):
            ax.axvline(i * w_px / gw, color="white", linewidth=0.3, alpha=0.4)
        for j in range(1, gh):
            ax.axhline(j * h_px / gh, color="white", linewidth=0.3, alpha=0.4)
        kept_frac = float(keep.mean()) if keep.size else 0.0
        n_total = keep.size
    else:
        from matplotlib.patches import Rectangle

        boxes = [tuple(float(v) for v in b) for b in kept_cells]
        frac = bool(boxes) and all(0.0 <= v <= 1.0 for b in boxes for v in b)
        sx, sy = (w_px, h_px) if frac else (1.0, 1.0)
        shade = np.zeros((h_px, w_px, 4))
        shade[..., 3] = 0.7
        for x0, y0, x1, y1 in boxes:
            c0, c1 = int(round(x0 * sx)), int(round(x1 * sx))
            r0, r1 = int(round(y0 * sy)), int(round(y1 * sy))
            shade[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0), 3] = 0.0
            ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False,
                                   edgecolor="yellow", linewidth=0.6))
        ax.imshow(shade, extent=(0, w_px, h_px, 0), interpolation="nearest")
        kept_frac = float((shade[..., 3] == 0).mean())
        n_total = None
    ax.set_xlim(0, w_px)
    ax.set_ylim(h_px, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    detail = f"{kept_frac:.0%} of the image area kept" if n_total is None else \
        f"{kept_frac:.0%} of {n_total} visual tokens kept"
    ax.set_title(title or f"Kept visual tokens ({detail})", fontsize="medium")
    return fig
