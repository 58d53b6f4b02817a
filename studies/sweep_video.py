"""Video budget sweep: rankings and schedule families at every FLOPs budget on the toy video task.

    python studies/sweep_video.py --preset quick      # 3 budgets x 8 methods on 96 held-out clips (~10 min, 1 core)
    python studies/sweep_video.py --from-json studies/results/sweep_video.json   # re-render the table only

The same columns as the image sweep (studies/sweep.py, whose measuring code this reuses): achieved FLOPs / KV /
layer-averaged keep on the held-out token counts, held-out discrepancy (1 - cos of the last token's final-norm
state), exact-match accuracy overall and per question type (schedsearch/toy/video.py: appear, vanish, count,
spatial) and for spatial questions about the top / bottom half, measured prefill speed-up, trials, search seconds.

Methods per budget:

* ``fastv``, ``pdrop``, ``uniform``: budget-matched exactly as ``schedsearch baseline`` does;
* ``random``, ``evs``, ``holitom``, ``vidcom2``: the video rankings' published profile -- pruned before the LLM
  (one keep ratio from decoder layer 0 on, the largest that meets the budget on the calibration token counts)
  ranked by that scorer; ``random`` (seed 0) is the random-drop cost;
* ``psigmoid``: the P-Sigmoid search (the preset's trials, TPE, seed 0), scorer searched (``auto``).

The search set is ``calibration_data/toy_video`` (16 clips, stream 3); the held-out set is written fresh from
stream ``HELDOUT_SEED`` = 2 (``schedsearch.toy.video.write_video_dataset``) and never searched on. Writes
``sweep_video.md`` and ``sweep_video.json`` to ``--out`` (``studies/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep as image_sweep  # noqa: E402  (studies/sweep.py: measure, table rows, report helpers)

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION = Path(__file__).resolve().parents[1] / "calibration_data" / "toy_video"
FIXED = ("fastv", "pdrop", "uniform")
PROFILES = ("random", "evs", "holitom", "vidcom2")
SEARCHED = ("psigmoid",)


@dataclass(frozen=True)
class Preset:
    name: str
    trials: int
    n_heldout: int
    budgets: tuple[float, ...] = (0.5, 0.3, 0.1)
    methods: tuple[str, ...] = FIXED + PROFILES + SEARCHED
    sampler: str = "tpe"
    seed: int = 0
    timing_samples: int = 8
    timing_repeats: int = 3
    batch_size: int = 16
    budget_kind: str = "flops"
    gsearch_step: float = 0.1


PRESETS = {"quick": Preset("quick", trials=8, n_heldout=96),
           "full": Preset("full", trials=30, n_heldout=256, budgets=(0.5, 0.3, 0.2, 0.1, 0.05), timing_repeats=5)}


def profile_schedule(adapter: Any, obj: Any, scorer: str, budget: float) -> tuple[dict, float]:
    """The largest single keep ratio from layer 0 whose calibration FLOPs ratio is within ``budget`` (bisection)."""
    n = adapter.num_layers
    fn = obj.budget_fn("flops")
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn([mid] * n) <= budget else (lo, mid)
    params = {"seed": 0} if scorer == "random" else {}
    return {"keep_ratios": [lo] * n, "scorer": {"name": scorer, "params": params}, "recycling": None}, lo


def run_cell(method: str, budget: float, obj: Any, adapter: Any, held: Any, preset: Preset) -> dict:
    cell: dict[str, Any] = {"budget": budget, "method": method,
                            "kind": "profile" if method in PROFILES else "fixed" if method in FIXED else "searched"}
    t0 = time.perf_counter()
    if method in PROFILES:
        sched, ratio = profile_schedule(adapter, obj, method, budget)
        info = {"trials": 0, "params": {"keep": ratio}, "search_value": None}
    else:
        from schedsearch.search.budget import InfeasibleBudget
        from schedsearch.search.optimize import SearchError

        try:
            cand, info = image_sweep.find_schedule(method, budget, obj, preset)
        except (InfeasibleBudget, SearchError) as err:
            return {**cell, "status": "infeasible", "reason": " ".join(str(err).split()),
                    "search_s": time.perf_counter() - t0}
        sched = cand.as_schedule_dict()
    cell["search_s"] = time.perf_counter() - t0
    cell.update(status="ok", trials=info["trials"], params=image_sweep._jsonable(info["params"]),
                search_discrepancy=info["search_value"], keep_ratios=[float(r) for r in sched["keep_ratios"]],
                scorer=sched["scorer"], recycling=sched.get("recycling"),
                calibration_flops_ratio=obj.budget_fn("flops")(sched["keep_ratios"]))
    t1 = time.perf_counter()
    cell.update(image_sweep.measure(adapter, held, sched, preset))
    cell["eval_s"] = time.perf_counter() - t1
    return cell


def run_sweep(adapter: Any, calibration: Sequence[Any], heldout: Sequence[Any], preset: Preset, *,
              out_dir: str | Path = RESULTS, command: str = "", log: Any = print) -> dict:
    from schedsearch.calibration import calibration_hash
    from schedsearch.evaluation import make_batches
    from schedsearch.search.objective import Objective

    t_start = time.perf_counter()
    calib, heldout = list(calibration), list(heldout)
    obj = Objective(adapter, calib, heldout_fraction=0.0, seed=preset.seed, batch_size=preset.batch_size)
    held_obj = Objective(adapter, heldout, heldout_fraction=0.0, seed=preset.seed, batch_size=preset.batch_size)
    timing = make_batches(adapter, heldout[: preset.timing_samples], preset.batch_size)
    held = image_sweep.Heldout(samples=heldout, objective=held_obj, timing_batches=timing)
    held.reference = image_sweep.measure(adapter, held, None, preset)
    setup_s = time.perf_counter() - t_start
    log(f"setup {setup_s:.1f}s: {len(calib)} calibration / {len(heldout)} held-out clips, unpruned accuracy "
        f"{held.reference['accuracy']:.3f}")
    cells = []
    for budget in preset.budgets:
        for method in preset.methods:
            cell = run_cell(method, budget, obj, adapter, held, preset)
            cells.append(cell)
            log(f"{budget:>5} {method:<9} " + (
                f"FLOPs {cell['flops_ratio']:.3f} 1-cos {cell['discrepancy']:.4f} acc {cell['accuracy']:.3f} "
                f"x{cell['speedup']:.2f} search {cell['search_s']:.1f}s eval {cell['eval_s']:.1f}s"
                if cell["status"] == "ok" else cell["reason"]))
    results = {"meta": {"preset": preset.name, "command": command or f"python studies/sweep_video.py --preset "
                        f"{preset.name}", "model": str(adapter.name_or_path),
                        "model_fingerprint": adapter.fingerprint(),
                        "num_layers": adapter.num_layers, "calibration_hash": calibration_hash(calib),
                        "n_calibration": len(calib), "n_heldout": len(heldout), "preset_config": asdict(preset),
                        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "setup_s": setup_s, "wall_s": time.perf_counter() - t_start,
                        "torch_threads": image_sweep._threads()},
               "reference": held.reference, "cells": cells}
    paths = write_report(results, out_dir)
    log(f"wrote {', '.join(str(p) for p in paths)}")
    return results


def markdown(results: dict) -> str:
    m, p, ref = results["meta"], results["meta"]["preset_config"], results["reference"]
    cols = image_sweep.table_columns(results)
    lines = [
        "# Video budget sweep on the shipped toy model",
        "",
        f"- command: `{m['command']}`",
        f"- preset: `{m['preset']}` — fastv / pdrop / uniform budget-matched as `schedsearch baseline` does; "
        f"random / evs / holitom / vidcom2: one keep ratio from layer 0 (their pre-LLM profile), the largest within "
        f"the budget; psigmoid: {p['trials']} trials, sampler `{p['sampler']}`, seed {p['seed']}, scorer `auto`",
        f"- model: `{m['model']}` (fingerprint `{m['model_fingerprint']}`, {m['num_layers']} decoder layers), "
        "not trained on video: 4-frame clips = 2 temporal patches = 512 video tokens",
        f"- search set: {m['n_calibration']} clips of calibration_data/toy_video (hash "
        f"`{m['calibration_hash'].split(':')[-1][:12]}`); held-out: {m['n_heldout']} clips, stream `HELDOUT_SEED`=2 "
        f"(questions per type: {', '.join(f'{k} {v}' for k, v in ref['counts']['qtype'].items())}; spatial questions "
        f"about the top / bottom half: {ref['n_top']} / {ref['n_bottom']})",
        f"- date: {m['date']}; wall time {m['wall_s']:.0f} s (setup {m['setup_s']:.0f} s), torch threads "
        f"{m['torch_threads']}",
        "",
        "Columns as in the image sweep (studies/results/sweep.md): requested FLOPs budget; method; achieved "
        "FLOPs / KV / layer-averaged keep on the held-out token counts; held-out 1 − cos; exact-match accuracy "
        "overall, per question type (appear needs the last frame, vanish the first, count and spatial are static "
        "clips) and for spatial questions about the top / bottom half; prefill speed-up (full forward incl. the "
        f"vision encoder, median of {p['timing_repeats']}, {p['timing_samples']} clips); trials; search seconds.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in image_sweep.table_rows(results)]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep_video.md", out / "sweep_video.json"]
    paths[0].write_text(markdown(results), encoding="utf-8")
    paths[1].write_text(json.dumps(image_sweep._jsonable(results), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--calibration", default=str(CALIBRATION))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--from-json", default=None, metavar="SWEEP_JSON")
    from schedsearch.devices import add_arguments, load_kwargs

    add_arguments(ap)  # --device / --dtype, as on the CLI
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        print("wrote", ", ".join(str(p) for p in write_report(results, args.out)))
        return results
    import torch

    torch.set_num_threads(args.threads)
    from schedsearch.calibration import load_manifest
    from schedsearch.models import load_model
    from schedsearch.toy import HELDOUT_SEED
    from schedsearch.toy.video import write_video_dataset

    preset = PRESETS[args.preset]
    adapter = load_model(args.model, **load_kwargs(args.device, args.dtype))
    calibration = load_manifest(args.calibration)
    warnings.filterwarnings("ignore", module="optuna")
    command = "python studies/sweep_video.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="sweep-video-") as tmp:
        heldout = load_manifest(write_video_dataset(tmp, preset.n_heldout, seed=HELDOUT_SEED))
        return run_sweep(adapter, calibration, heldout, preset, out_dir=args.out, command=command.strip(),
                         log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    from schedsearch.errors import SchedsearchError

    try:
        main()
    except SchedsearchError as err:  # a bad --device, model or calibration set: one line, as on the CLI
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
