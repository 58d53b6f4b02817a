"""Search cost: per-trial overhead and how many trials model-based samplers need.

    python studies/bench_search.py                          # toy model, default toy calibration set
    python studies/bench_search.py --model DIR --calibration DATA --random-trials 300 --trials 60

Prints two tables:
1. median trial wall time / wall time of one pruned forward pass over the search split (the same
   schedule, measured directly). Target <= 1.2: the objective adds almost nothing to the forward.
2. for each sampler (gp, botorch, tpe): the first trial whose best-so-far value reaches the best value
   of a ``--random-trials`` random search on the same objective (psigmoid, same budget), or "not
   reached" within ``--trials``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from schedsearch.devices import add_arguments, load_kwargs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--method", default="psigmoid")
    ap.add_argument("--random-trials", type=int, default=300)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--samplers", default="gp,botorch,tpe")
    ap.add_argument("--seed", type=int, default=0)
    add_arguments(ap)  # --device / --dtype, as on the CLI
    args = ap.parse_args()

    import optuna
    import torch

    from schedsearch.calibration import load_manifest
    from schedsearch.models import load_model
    from schedsearch.search.driver import _default_calibration
    from schedsearch.search.objective import Objective
    from schedsearch.search.optimize import StudySettings, run_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    adapter = load_model(args.model, **load_kwargs(args.device, args.dtype))
    samples = load_manifest(args.calibration or _default_calibration(args.model))
    obj = Objective(adapter, samples, heldout_fraction=0.25, seed=args.seed,
                    vision_maps=args.method == "vflow")

    def study(sampler: str, n: int):
        s = StudySettings(budget=args.budget, method=args.method, sampler=sampler, trials=n, seed=args.seed)
        return run_study(s, obj, baselines=())

    t0 = time.perf_counter()
    rand = study("random", args.random_trials)
    rand_s = time.perf_counter() - t0
    trial_s = [t.user_attrs["trial_seconds"] for t in rand.study.trials if "trial_seconds" in t.user_attrs]
    sched = rand.best.as_schedule_dict()
    fwd = []
    for _ in range(5):
        t1 = time.perf_counter()
        with torch.no_grad():
            obj._outputs("search", sched)
        fwd.append(time.perf_counter() - t1)
    med_trial, med_fwd = statistics.median(trial_s), statistics.median(fwd)
    print(f"model {args.model}, {len(obj.samples['search'])} search samples, method {args.method}, "
          f"budget {args.budget}, torch threads {torch.get_num_threads()}")
    print("| median trial s | pruned forward over search split s | ratio |")
    print("|---|---|---|")
    print(f"| {med_trial:.4f} | {med_fwd:.4f} | {med_trial / med_fwd:.2f} |")
    target = rand.study.best_value
    print(f"\nrandom search: {args.random_trials} trials in {rand_s:.0f}s, best {target:.6f}")
    print("| sampler | trials to reach random's best | best after all trials | wall s |")
    print("|---|---|---|---|")
    for name in [s for s in args.samplers.split(",") if s]:
        t1 = time.perf_counter()
        res = study(name, args.trials)
        best, reached = float("inf"), None
        for i, t in enumerate(res.study.trials):
            if t.value is not None:
                best = min(best, t.value)
                if reached is None and best <= target + 1e-12:
                    reached = i + 1
        print(f"| {name} | {reached if reached else f'not reached in {args.trials}'} | {best:.6f} | "
              f"{time.perf_counter() - t1:.0f} |")


if __name__ == "__main__":
    main()
