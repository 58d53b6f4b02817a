"""Study pictures as matplotlib Figures (Agg canvas, no pyplot, no display needed).

Each function returns a :class:`matplotlib.figure.Figure`; save it with ``fig.savefig("x.png")`` or log it
with :meth:`schedsearch.tracking.Tracker.log_figure`. matplotlib is imported on first call; without it a
:class:`~schedsearch.tracking.TrackingUnavailableError` says which extra to install.

- :func:`keep_ratio_plot` — cumulative keep ratio of visual tokens per decoder layer, one line per schedule.
- :func:`history_plot` — objective per trial and the best so far (an Optuna study: Optuna's own plot, infeasible
  trials greyed).
- :func:`importance_plot` — Optuna's hyperparameter importances of a study.
- :func:`pareto_plot` — discrepancy vs achieved FLOPs ratio for every trial, the non-dominated front marked (an Optuna
  study: Optuna's own Pareto-front plot).
- :func:`overlay_plot` — the calibration image beside the same image with each visual token's survival as a heat map
  and a colour bar.
- :func:`curves_plot` — one line per series through its (x, y[, y error]) points, e.g. accuracy vs achieved FLOPs per
  method with its standard error; distinct line styles so overlapping curves stay apart.

Every figure is drawn at :data:`DPI` (150) with labelled axes (units and the objective's name) and a title that
carries the budget where there is one. Optuna's plots (``optuna.visualization.matplotlib``) are used where they
draw the picture; they are made on pyplot figures, which :meth:`Tracker.log_figure` closes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DPI", "OBJECTIVE_LABEL", "curves_plot", "history_plot", "importance_plot", "keep_ratio_plot",
           "overlay_plot", "pareto_front", "pareto_plot"]

_SIZE = (6.4, 4.0)
#: resolution of every figure (and of the PNGs logged to MLflow)
DPI = 150
#: the search objective as an axis label
OBJECTIVE_LABEL = "1 - cos(h, h_pruned), last token (search split)"
_KIND_LABELS = {"flops": "FLOPs", "kv": "KV cache", "tokens": "tokens"}
#: line styles cycled with the colours, so curves that overlap stay distinguishable (also in grey print)
_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def _figure(size: tuple[float, float] = _SIZE) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - only without the extra
        from schedsearch.tracking import TrackingUnavailableError

        raise TrackingUnavailableError(f"plots need matplotlib ({exc}): pip install \"schedsearch[search]\"") from None
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def keep_ratio_plot(schedules: Mapping[str, Sequence[float]], title: str | None = None,
                    budget: str | None = None) -> Any:
    """Keep ratio per decoder layer (a step line: the ratio holds for the whole layer), one line per schedule.

    ``schedules`` maps a label ("searched", "fastv", ...) to its per-layer keep ratios; the legend shows each
    schedule's mean keep ratio (the token average over layers). ``budget`` (e.g. ``"FLOPs <= 0.2"``) goes in the
    title.
    """
    fig = _figure()
    ax = fig.add_subplot()
    n_max = 1
    for i, (label, ratios) in enumerate(schedules.items()):
        r = [float(x) for x in ratios]
        if not r:
            continue
        n_max = max(n_max, len(r))
        xs = list(range(len(r) + 1))
        ax.step(xs, r + r[-1:], where="post", label=f"{label} (mean {sum(r) / len(r):.3f})", linewidth=1.8,
                linestyle=_STYLES[i % len(_STYLES)])
    ax.set_xlim(0, n_max)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("decoder layer (index)")
    ax.set_ylabel("visual tokens kept (fraction of the image's tokens)")
    ax.set_title(title or ("Keep ratio per layer" + (f" at {budget}" if budget else "")))
    ax.grid(True, alpha=0.3)
    if schedules:
        ax.legend(loc="upper right", fontsize="small")
    return fig


def _optuna_figure(draw: Any, study: Any, title: str | None, **kw: Any) -> Any:
    """Run an ``optuna.visualization.matplotlib`` function quietly (it is experimental) and return its Figure."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = draw(study, **kw)
    ax = ax[0] if isinstance(ax, list | tuple) or getattr(ax, "ndim", 0) else ax
    fig = ax.figure
    fig.set_dpi(DPI)
    fig.set_size_inches(7.2, 4.5)
    if title:
        for loc in ("left", "right"):  # Optuna titles some plots on the left: one title only
            ax.set_title("", loc=loc)
        ax.set_title(title)
    if ax.get_legend() is not None:  # Optuna puts it outside the axes, which squeezes them: inside instead
        ax.legend(loc="best", fontsize="small")
    from schedsearch.tracking import PARAM_LABELS

    ticks = ax.get_yticklabels()  # parameter names as the README writes them (importances: one per bar)
    if any(tk.get_text() in PARAM_LABELS for tk in ticks):
        ax.set_yticks(ax.get_yticks(), [PARAM_LABELS.get(tk.get_text(), tk.get_text()) for tk in ticks])
    fig.tight_layout()
    return fig


def history_plot(values: Any, direction: str = "minimize", title: str | None = None,
                 target_name: str = OBJECTIVE_LABEL) -> Any:
    """Objective value per trial (dots) and the best so far (line).

    ``values``: an Optuna study (drawn by ``optuna.visualization.matplotlib.plot_optimization_history``: infeasible
    trials greyed, the best-so-far line over feasible ones) or a plain sequence of values (``None``/NaN = failed
    trials, skipped).
    """
    if hasattr(values, "trials"):
        from optuna.visualization.matplotlib import plot_optimization_history

        return _optuna_figure(plot_optimization_history, values, title, target_name=target_name)
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
    ax.set_xlabel("trial (number)")
    ax.set_ylabel(target_name)
    ax.set_title(title or "Optimization history")
    if ys and min(ys) > 0 and max(ys) / min(ys) > 100:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    return fig


def importance_plot(study: Any, title: str | None = None, target_name: str = OBJECTIVE_LABEL) -> Any:
    """Optuna's hyperparameter importances (fANOVA) of the study's searched parameters; needs >= 2 completed
    trials and >= 1 parameter."""
    from optuna.visualization.matplotlib import plot_param_importances

    return _optuna_figure(plot_param_importances, study, title, target_name=target_name)


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


def pareto_plot(points: Any, front: Sequence[tuple[float, float]] | None = None,
                budgets: Sequence[float] = (), title: str | None = None, kind: str = "FLOPs") -> Any:
    """Discrepancy (y) vs achieved budget ratio (x) of every trial, with the Pareto front.

    ``points``: a two-objective Optuna study (drawn by ``optuna.visualization.matplotlib.plot_pareto_front``, the
    budget on x) or ``(discrepancy, ratio)`` pairs — the order of such a study's ``trial.values``. ``front``
    defaults to the non-dominated subset of the pairs (:func:`pareto_front`). ``budgets`` draws the requested
    budgets as vertical dashed lines.
    """
    kind = _KIND_LABELS.get(kind, kind)
    names = [OBJECTIVE_LABEL, f"achieved {kind} ratio (pruned / unpruned prefill)"]
    if hasattr(points, "trials"):
        from optuna.visualization.matplotlib import plot_pareto_front

        head = title or f"Pareto front, requested budgets {', '.join(map(str, budgets))}"
        fig = _optuna_figure(plot_pareto_front, points, head, target_names=names[::-1],
                             targets=lambda t: (t.values[1], t.values[0]))
        ax = fig.axes[0]
        for i, b in enumerate(budgets):
            ax.axvline(float(b), color="0.4", linestyle="--", linewidth=1, label="requested budget" if i == 0 else None)
        if budgets:
            ax.legend(fontsize="small")
        return fig
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
    ax.set_xlabel(names[1])
    ax.set_ylabel(names[0])
    ax.set_title(title or f"Discrepancy vs {kind}")
    ax.grid(True, alpha=0.3)
    if pts or fr:
        ax.legend(loc="upper right", fontsize="small")
    return fig


def curves_plot(series: Mapping[str, Sequence[Sequence[float]]], *, xlabel: str, ylabel: str,
                title: str | None = None, reference: Mapping[str, float] | None = None, logy: bool = False) -> Any:
    """One line with markers per series through its ``(x, y)`` or ``(x, y, y_error)`` points, sorted by x.

    For sweeps, e.g. accuracy (y, with its standard error as error bars) vs achieved FLOPs ratio (x) with one series
    per method. Each series has its own marker and line style, so curves that overlap stay distinguishable.
    Non-finite points are skipped. ``reference`` draws labelled horizontal dashed lines (e.g. ``{"unpruned":
    0.71}``); ``logy`` uses a log y axis.
    """
    fig = _figure((7.2, 4.5))
    ax = fig.add_subplot()
    markers = "osD^vP*Xh<>"
    for i, (label, pts) in enumerate(series.items()):
        rows = sorted(tuple(float(v) for v in p) for p in pts if all(math.isfinite(float(v)) for v in p[:2]))
        if not rows:
            continue
        xs, ys = [r[0] for r in rows], [r[1] for r in rows]
        err = [r[2] if len(r) > 2 and math.isfinite(r[2]) else 0.0 for r in rows]
        style = dict(marker=markers[i % len(markers)], markersize=4.5, linewidth=1.5,
                     linestyle=_STYLES[i % len(_STYLES)], label=label)
        if any(err):
            ax.errorbar(xs, ys, yerr=err, capsize=2.5, elinewidth=0.9, **style)
        else:
            ax.plot(xs, ys, **style)
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


def overlay_plot(image: Any, kept_cells: Any, title: str | None = None, budget: str | None = None) -> Any:
    """The calibration image (left) beside the same image with the kept visual tokens drawn over it (right).

    ``kept_cells`` is either
    - a 2-D grid (numpy array, tensor or nested lists) of shape (H, W) over the image's token grid: booleans
      (True = kept) or floats in [0, 1] (e.g. the fraction of decoder layers a token survived), drawn as a heat map
      over a faded grey copy of the image, with a colour bar (readable on dark and light images alike);
    - or a list of ``(x0, y0, x1, y1)`` tuples, the kept cells' boxes, in pixels, or as fractions of the width
      and height when every coordinate is <= 1 (drawn as yellow boxes, the rest dimmed).

    ``budget`` (e.g. ``"FLOPs <= 0.2"``) goes in the title.
    """
    import numpy as np

    img = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    h_px, w_px = img.shape[:2]
    aspect = h_px / max(w_px, 1)
    fig = _figure((10.0, max(2.8, min(8.0, 4.4 * aspect)) + 0.9))
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    left.imshow(img, extent=(0, w_px, h_px, 0))
    left.set_title("calibration image", fontsize="medium")
    grid = _as_grid(kept_cells)
    if grid is not None:
        keep = np.clip(grid.astype(float), 0.0, 1.0)
        grey = img.astype(float).mean(axis=2) if img.ndim == 3 else img.astype(float)
        right.imshow(grey, cmap="gray", extent=(0, w_px, h_px, 0), alpha=0.55, vmin=0, vmax=255)
        heat = right.imshow(keep, cmap="viridis", vmin=0.0, vmax=1.0, alpha=0.65, extent=(0, w_px, h_px, 0),
                            interpolation="nearest")
        bar = fig.colorbar(heat, ax=right, fraction=0.046, pad=0.03)
        bar.set_label("fraction of decoder layers the token is kept")
        detail = f"{keep.size} visual tokens, kept in {keep.mean():.0%} of the decoder layers on average"
    else:
        from matplotlib.patches import Rectangle

        boxes = [tuple(float(v) for v in b) for b in kept_cells]
        frac = bool(boxes) and all(0.0 <= v <= 1.0 for b in boxes for v in b)
        sx, sy = (w_px, h_px) if frac else (1.0, 1.0)
        right.imshow(img, extent=(0, w_px, h_px, 0))
        shade = np.zeros((h_px, w_px, 4))
        shade[..., 3] = 0.7
        for x0, y0, x1, y1 in boxes:
            c0, c1 = int(round(x0 * sx)), int(round(x1 * sx))
            r0, r1 = int(round(y0 * sy)), int(round(y1 * sy))
            shade[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0), 3] = 0.0
            right.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False,
                                      edgecolor="yellow", linewidth=0.8))
        right.imshow(shade, extent=(0, w_px, h_px, 0), interpolation="nearest")
        detail = f"{float((shade[..., 3] == 0).mean()):.0%} of the image area kept"
    right.set_xlim(0, w_px)
    right.set_ylim(h_px, 0)
    right.set_title(detail, fontsize="small")
    head = title or "Kept visual tokens"
    fig.suptitle(head + (f" at {budget}" if budget else ""), fontsize="medium")
    return fig


def study_figures(result: Any, schedule: Any = None, adapter: Any = None, sample: Any = None) -> dict[str, Any]:
    """The figures ``optimize`` logs to the study's MLflow run, by artifact name.

    ``result`` is a search result (``study``, ``best.ratios``, ``baselines``, ``budget``); with ``schedule``,
    ``adapter`` and a calibration ``sample`` the kept-token overlay is drawn too (when the image's tokens form a
    grid). Figures Optuna cannot draw for this study (e.g. importances of a study without searched parameters) are
    left out.
    """
    b = result.budget
    kind = _KIND_LABELS.get(b.get("kind", "flops"), b.get("kind"))
    budget = f"{kind} <= {b['requested']:g}" if b.get("requested") is not None else None
    shapes = {"searched": result.best.ratios, **{k: v["ratios"] for k, v in result.baselines.items()}}
    figs = {"keep_ratio_per_layer.png": keep_ratio_plot(shapes, budget=budget)}
    study = result.study
    if any(t.value is not None for t in study.trials if t.values and len(t.values) == 1):
        figs["optimization_history.png"] = history_plot(study, title=f"Optimization history at {budget}")
        try:
            figs["param_importances.png"] = importance_plot(study, title=f"Parameter importances at {budget}")
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials / no searched parameter
            pass
    if schedule is not None and adapter is not None and sample is not None and getattr(sample, "image_paths", (1,)):
        # (a video-only sample has no image to draw the overlay on)
        from schedsearch.evaluation import survival_grid

        grid = survival_grid(adapter, schedule, sample.images, sample.prompt)
        if grid is not None:
            figs["kept_tokens_overlay.png"] = overlay_plot(sample.images[0], grid, budget=budget,
                                                           title="Kept visual tokens of the searched schedule")
    return figs
