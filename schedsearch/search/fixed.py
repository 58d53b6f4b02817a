"""Fixed baselines in the schedule format, budget-matched by solving their one free ratio.

* ``fastv`` (Chen et al., arXiv 2403.06764, Sec. 4): after layer K keep fraction 1 - R of the visual
  tokens: r_l = 1 for l < K, 1 - R for l >= K. Budget matched by solving R (K fixed, default 2). Ranked by the
  ``fastv`` scorer: the last token's attention returned by layer K-1, as FastV's code does.
* ``pdrop`` (Xing et al., PyramidDrop, arXiv 2410.17247, Sec. 3): stages at fixed depths (8/16/24 of
  32 layers -> L/4, L/2, 3L/4); stage i keeps lambda^i of the original tokens. Budget matched by
  solving lambda (paper default 0.5). Ranked by ``last_token_attention``: the last instruction token's attention
  from the drop layer's OWN q/k on its input, as Cooperx521/PyramidDrop ``modeling_llama_pdrop.py::pdrop_rank_drop``
  does (``self.layers[rank_layer]``, the first layer of the next stage). Differences from that code: survivors keep
  their original position ids (the reference renumbers them 0..n-1 after each drop, which changes the RoPE phases
  of every later layer and so the later stages' rankings), and kept counts round half up (the reference floors:
  ``int(V * lambda^i)``).
* ``divprune`` (Alvar et al., arXiv 2503.02175): one keep ratio from layer 0 on (the reference prunes the
  embeddings entering the LLM), ranked by the ``divprune`` scorer. Budget matched by solving the ratio.
* ``feather`` (Endo et al., arXiv 2412.13180; markendo/FEATHER ``eval_feather.sh``: K = [8, 16] of 32, reduction
  0.7, stride 3): stage 1 at L/4 keeps the union of int(k V) attention tokens and the stride-3 grid, stage 2 at L/2
  keeps k^2 of the stage-1 survivors (k = 0.3 there). The union's expected size is k + (1 - k) g of V with g the
  grid's share of the visual tokens: ceil(rows/3) ceil(cols/3) / (rows cols) -- 1/9 for LLaVA's 24 x 24, but 36/256
  for the toy's 16 x 16 (`schedsearch baseline feather` measures g on the calibration images, ``feather_grid_share``;
  1/9 assumed without them); budget matched by solving k.
* ``uniform``: the same keep ratio at every layer from layer 0 (prune before the decoder).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from schedsearch.search.budget import BudgetFn, InfeasibleBudget, clamp_non_increasing, solve_increasing


def fastv_ratios(num_layers: int, k: int, r: float) -> list[float]:
    return [1.0 if i < k else 1.0 - r for i in range(num_layers)]


def pdrop_stage_layers(num_layers: int) -> list[int]:
    """PyramidDrop's [8, 16, 24] of 32 scaled to this depth."""
    return sorted({max(1, min(num_layers - 1, round(num_layers * q))) for q in (0.25, 0.5, 0.75)})


def pdrop_ratios(num_layers: int, stages: Sequence[int], lam: float) -> list[float]:
    out = []
    for i in range(num_layers):
        passed = sum(1 for s in stages if i >= s)
        out.append(lam**passed)
    return out


def uniform_ratios(num_layers: int, r: float) -> list[float]:
    return [r] * num_layers


def fastv(num_layers: int, budget_fn: BudgetFn, target: float, k: int = 2) -> tuple[list[float], dict]:
    """Budget-matched FastV: solve the kept fraction 1 - R; if even R = 1 at layer K is over budget,
    K is lowered (recorded in the params) until the budget is met."""
    last: InfeasibleBudget | None = None
    for kk in range(k, -1, -1):
        try:
            keep = solve_increasing(lambda x, kk=kk: budget_fn(fastv_ratios(num_layers, kk, 1.0 - x)), target, 0.0, 1.0)
        except InfeasibleBudget as err:
            last = err
            continue
        return fastv_ratios(num_layers, kk, 1.0 - keep), {"K": kk, "R": 1.0 - keep}
    raise InfeasibleBudget(f"fastv cannot meet budget {target}: {last}")


def pdrop(num_layers: int, budget_fn: BudgetFn, target: float, stages: Sequence[int] | None = None
          ) -> tuple[list[float], dict]:
    """Budget-matched PyramidDrop. With the default stages a small budget can be out of reach (the
    first quarter of the layers runs on every token); then the stages are moved proportionally
    earlier (scale recorded in the params) until the budget is met."""
    if stages is not None:
        scales = [1.0]
    else:
        scales = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    last: InfeasibleBudget | None = None
    for scale in scales:
        st = list(stages) if stages is not None else sorted({round(s * scale) for s in pdrop_stage_layers(num_layers)})
        try:
            lam = solve_increasing(lambda x, st=st: budget_fn(pdrop_ratios(num_layers, st, x)), target, 0.0, 1.0)
        except InfeasibleBudget as err:
            last = err
            continue
        return pdrop_ratios(num_layers, st, lam), {"stages": st, "lambda": lam, "stage_scale": scale}
    raise InfeasibleBudget(f"pdrop cannot meet budget {target}: {last}")


def uniform(num_layers: int, budget_fn: BudgetFn, target: float) -> tuple[list[float], dict]:
    r = solve_increasing(lambda x: budget_fn(uniform_ratios(num_layers, x)), target, 0.0, 1.0)
    return uniform_ratios(num_layers, r), {"r": r}


# --- published default profiles of the issue-13 rankings (schema 1.2 scorers), one solved parameter each ------
# The methods that prune before the LLM (FasterVLM, VTC-CLS, VisionZip, HiPrune, FlowCut, MMTok, HiRED) are
# ``uniform``: one keep ratio from layer 0 on, solved for the budget; DART drops once before layer K = 2 (``fastv``'s
# shape with K = 2). The staged ones follow below; their stage depths are the references' layers on a 32-layer
# LLM scaled to this depth.

def staged_ratios(num_layers: int, stages: Sequence[tuple[float, float]], scale: float) -> list[float]:
    """Keep ``min(1, scale * keep)`` from layer ``round(frac * L)`` on, for each (frac, keep) stage; a later stage
    never keeps more than an earlier one."""
    out = [1.0] * num_layers
    for frac, keep in stages:
        start = max(0, min(num_layers - 1, round(frac * num_layers)))
        for i in range(start, num_layers):
            out[i] = min(out[i], min(1.0, scale * keep))
    return clamp_non_increasing(out)


#: SparseVLM (arXiv 2410.04417, Gumpest/SparseVLMs score.py): prune after LLaVA layers 2, 6, 15 (of 32) to
#: 300 / 200 / 110 of 576 tokens (its 192-token profile); the three counts are scaled together
SPARSEVLM_STAGES = ((3 / 32, 300 / 576), (7 / 32, 200 / 576), (16 / 32, 110 / 576))
#: TransPrune (arXiv 2507.20630, liaolea/TransPrune scripts): prune after layers 7, 9, 12 (1-indexed, of 32) to
#: 0.875 / 0.625 / 0.125 of the tokens; scaled together
TRANSPRUNE_STAGES = ((7 / 32, 0.875), (9 / 32, 0.625), (12 / 32, 0.125))
#: ToDRE (arXiv 2505.18757): keep r after the vision encoder, then drop every visual token inside the decoder; the
#: paper's layer for the second stage is not public: half the depth (our assumption)
TODRE_STAGES = ((0.0, 1.0), (0.5, 0.0))


def _staged(stages: Sequence[tuple[float, float]], hi: float) -> Callable[..., tuple[list[float], dict]]:
    """Budget-matched staged profile: the keep fractions scaled together; where even keeping nothing at the
    stages is over budget, the stage depths move proportionally earlier (``stage_scale``, as ``pdrop`` does)."""

    def solve(num_layers: int, budget_fn: BudgetFn, target: float) -> tuple[list[float], dict]:
        last: InfeasibleBudget | None = None
        for depth in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0):
            st = [(frac * depth, keep) for frac, keep in stages]
            try:
                scale = solve_increasing(lambda x, st=st: budget_fn(staged_ratios(num_layers, st, x)), target,
                                         0.0, hi)
            except InfeasibleBudget as err:
                last = err
                continue
            return staged_ratios(num_layers, st, scale), {"scale": scale, "stage_scale": depth,
                                                          "stages": [list(x) for x in st]}
        raise InfeasibleBudget(f"staged profile cannot meet budget {target}: {last}")

    return solve


sparsevlm = _staged(SPARSEVLM_STAGES, 576 / 300)
transprune = _staged(TRANSPRUNE_STAGES, 1 / 0.125)
todre = _staged(TODRE_STAGES, 1.0)


def dart(num_layers: int, budget_fn: BudgetFn, target: float) -> tuple[list[float], dict]:
    """DART (arXiv 2502.11494): one drop before layer K = 2, the kept fraction solved (FastV's shape)."""
    return fastv(num_layers, budget_fn, target, k=2)


def feather_grid_share(grids: Sequence[tuple[int, int]], stride: int = 3) -> float:
    """Share of the visual tokens on FEATHER's grid (every ``stride``-th row and column, ``grid[::s, ::s]``) for
    images of (rows, cols) tokens: sum ceil(rows/s) ceil(cols/s) / sum rows cols. The grid is the whole image's
    token grid (markendo/FEATHER ``llama2_models.py``: ``grid_indices[::stride, ::stride]``)."""
    on = sum(-(-r // stride) * -(-c // stride) for r, c in grids)
    total = sum(r * c for r, c in grids)
    return on / total if total else 1.0 / stride**2


def image_grids(adapter: Any, batches: Any) -> list[tuple[int, int]]:
    """(rows, cols) of every image's visual-token grid in ``batches`` (from the adapter's token coordinates)."""
    from schedsearch.runtime.scorers.feather import grid_cells

    out: list[tuple[int, int]] = []
    for batch in batches:
        coords = adapter.visual_coords(batch)
        cells = grid_cells(coords)
        for b in range(coords.shape[0]):
            for img in coords[b, :, 0].unique().tolist():
                sel = coords[b, :, 0] == img
                if sel.any():
                    out.append((int(cells[b, sel, 0].max()) + 1, int(cells[b, sel, 1].max()) + 1))
    return out


def feather_ratios(num_layers: int, k: float, depth: float = 1.0, stride: int = 3,
                   grid_share: float | None = None) -> list[float]:
    """FEATHER's two stages at L/4 and L/2 (times ``depth``): r1 = k + (1 - k) g (attention top-k united with the
    grid, g its share of the tokens, 1/stride^2 when unknown), r2 = k^2 r1 (the reference keeps int(k^2 |S1|) of the
    stage-1 survivors S1)."""
    g = 1.0 / stride**2 if grid_share is None else float(grid_share)
    r1 = k + (1.0 - k) * g
    return staged_ratios(num_layers, ((0.25 * depth, r1), (0.5 * depth, k * k * r1)), 1.0)


def feather(num_layers: int, budget_fn: BudgetFn, target: float, grid_share: float | None = None
            ) -> tuple[list[float], dict]:
    """Budget-matched FEATHER (k solved; where even k = 0 is over budget, the stages move earlier). ``grid_share``:
    the stride-3 grid's share of the visual tokens on the calibration images (``feather_grid_share``)."""
    last: InfeasibleBudget | None = None
    g = 1.0 / 9 if grid_share is None else float(grid_share)
    for depth in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0):
        try:
            k = solve_increasing(lambda x, d=depth: budget_fn(feather_ratios(num_layers, x, d, grid_share=g)),
                                 target, 0.0, 1.0)
        except InfeasibleBudget as err:
            last = err
            continue
        return feather_ratios(num_layers, k, depth, grid_share=g), {"k": k, "reduction": 1.0 - k,
                                                                     "stage_scale": depth, "stride": 3,
                                                                     "grid_share": g}
    raise InfeasibleBudget(f"feather cannot meet budget {target}: {last}")


BASELINES = {"fastv": fastv, "pdrop": pdrop, "uniform": uniform, "divprune": uniform, "feather": feather,
             "fastervlm": uniform, "vtc_cls": uniform, "visionzip": uniform, "hiprune": uniform,
             "flowcut": uniform, "mmtok": uniform, "hired": uniform, "dart": dart,
             "sparsevlm": sparsevlm, "transprune": transprune, "todre": todre}

#: the scorer each baseline ranks with (the ones not listed here: fastv/pdrop by last-token attention, uniform by
#: spacing; see ``search.methods.baseline_candidate``); every method's published default parameters
BASELINE_SCORERS: dict[str, dict] = {
    name: {"name": name, "params": {}}
    for name in ("fastv", "divprune", "fastervlm", "vtc_cls", "visionzip", "hiprune", "flowcut", "mmtok", "hired",
                 "dart", "sparsevlm", "transprune", "todre")
}
BASELINE_SCORERS["pdrop"] = {"name": "last_token_attention", "params": {"rope": True}}  # PyramidDrop's own rule
BASELINE_SCORERS["feather"] = {"name": "feather", "params": {"stride": 3, "rope": False}}
