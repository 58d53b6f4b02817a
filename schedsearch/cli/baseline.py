"""``schedsearch baseline NAME --budget B``: write a budget-matched fixed schedule (any name of ``BASELINES``)."""

from __future__ import annotations

from pathlib import Path

import typer

from schedsearch.cli import app, choice, ranged
from schedsearch.devices import DEVICE_HELP, DTYPE_HELP, DTYPES
from schedsearch.schedule import BUDGET_KINDS
from schedsearch.search.fixed import BASELINES


@app.command()
def baseline(
    name: choice(BASELINES) = typer.Argument(..., help="Fixed schedule family."),
    budget: float = typer.Option(..., "--budget", "-b", help="Kept fraction, e.g. 0.2.", **ranged("budget")),
    budget_kind: choice(BUDGET_KINDS) = typer.Option("flops", "--budget-kind", help="What the budget counts."),
    model: str = typer.Option("toy", "--model", "-m", help="Alias, directory or hub id."),
    calibration: Path | None = typer.Option(None, "--calibration", "-c",
                                               help="Manifest whose token counts the budget is matched on."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Schedule JSON to write.",
                                 show_default="schedules/<model>-<name>-<kind><budget>.json"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: choice(DTYPES) = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """A budget-matched fixed schedule of a published method (FastV, PyramidDrop, DivPrune, FEATHER, ... ; README
    "Budget-matched baselines") in the schedule file format."""
    from schedsearch.calibration import calibration_hash, load_manifest
    from schedsearch.devices import load_kwargs
    from schedsearch.evaluation import make_batches, token_counts
    from schedsearch.flops import DecoderShape, budget_report
    from schedsearch.models import load_model
    from schedsearch.search.budget import InfeasibleBudget
    from schedsearch.search.driver import _default_calibration, build_schedule
    from schedsearch.search.methods import SearchContext, baseline_candidate
    from schedsearch.search.optimize import SearchError, StudySettings

    StudySettings(budget=budget, kind=budget_kind).validate()
    adapter = load_model(model, **load_kwargs(device, dtype))
    samples = load_manifest(calibration or _default_calibration(model))
    batches = make_batches(adapter, samples)
    counts = token_counts(adapter, batches)
    shape = DecoderShape.from_config(adapter.text_config)

    def bfn(ratios):
        return budget_report(shape, counts, list(ratios)).value(budget_kind)

    grid_share = None
    if name == "feather":  # the union's size depends on the grid's share of the tokens (search/fixed.py)
        from schedsearch.search.fixed import feather_grid_share, image_grids

        grid_share = feather_grid_share(image_grids(adapter, batches))
    ctx = SearchContext(num_layers=adapter.num_layers, budget_fn=bfn, target=budget, kind=budget_kind,
                        grid_share=grid_share)
    try:
        cand = baseline_candidate(name, ctx)
    except InfeasibleBudget as err:
        lo = bfn([0.0] * adapter.num_layers)
        raise SearchError(f"{name} cannot meet --budget {budget} ({budget_kind}): the feasible range for this "
                          f"model and calibration set is [{lo:.4f}, 1.0]") from err
    rep = budget_report(shape, counts, cand.ratios)
    b = {"kind": budget_kind, "requested": budget, "achieved": rep.value(budget_kind),
         "flops_ratio": rep.flops_ratio, "kv_ratio": rep.kv_ratio, "token_ratio": rep.token_ratio}
    settings = {"method": name}
    sched = build_schedule(adapter, cand, settings, objective=None, method_params=cand.params, budget=b,
                           provenance=dict(calibration_hash=calibration_hash(samples),
                                           command=f"schedsearch baseline {name}"))
    path = out or Path("schedules") / f"{Path(model).name}-{name}-{budget_kind}{budget}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    sched.save(path)
    typer.echo(f"wrote {path}: {name} {cand.params} achieved {budget_kind} {b['achieved']:.4f} "
               f"(FLOPs {rep.flops_ratio:.3f}, KV {rep.kv_ratio:.3f}, tokens {rep.token_ratio:.3f})")
