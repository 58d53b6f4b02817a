"""How well does a search on the calibration set carry over to held-out data, and does a bigger set help?

    python studies/search_set_size.py            # ~4 min on 2 cores; writes studies/results/search_set_size.md

On the shipped toy model, for each search set (the default 64-sample ``calibration_data/toy``, and 256 samples of
toy stream ``SEARCH_SEED``, disjoint from the training, held-out and calibration streams) and each FLOPs budget
(0.2, 0.1): the uniform baseline (budget-matched on the search set) and a VFlowOpt search (the sweep's full
preset: 40 ``gp`` trials, seed 0) are scored on the search set and on the sweep's 512 held-out samples
(``HELDOUT_SEED``). Besides the mean ``1 - cos`` (the search objective), the table gives the share of the
held-out mean that comes from the worst 5 % of samples, which says how heavy-tailed the per-sample discrepancy
is, and so how noisy a 64-sample estimate of it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEARCH_SEED = 4  # toy stream of the larger search set (TRAIN_SEED 1, HELDOUT_SEED 2, calibration_data/toy 3)
BUDGETS = (0.2, 0.1)
METHODS = ("uniform", "vflow")


def tail_share(per_sample, frac: float = 0.05) -> float:
    """Share of the sum contributed by the largest ``frac`` of the values."""
    import torch

    v = torch.sort(per_sample.flatten(), descending=True).values
    k = max(1, int(round(frac * len(v))))
    return float(v[:k].sum() / v.sum().clamp(min=1e-12))


def main(argv=None) -> int:
    from schedsearch.devices import add_arguments, load_kwargs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "search_set_size.md"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--large", type=int, default=256, help="size of the larger search set")
    add_arguments(ap)  # --device / --dtype, as on the CLI
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="optuna")
    import sweep

    from schedsearch.calibration import load_manifest
    from schedsearch.models import load_model
    from schedsearch.search.driver import _default_calibration
    from schedsearch.search.objective import Objective
    from schedsearch.toy import HELDOUT_SEED, write_dataset

    t0 = time.perf_counter()
    preset = sweep.PRESETS["full"]
    adapter = load_model("toy", **load_kwargs(args.device, args.dtype))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        heldout = load_manifest(write_dataset(Path(tmp) / "heldout", preset.n_heldout, seed=HELDOUT_SEED))
        large = load_manifest(write_dataset(Path(tmp) / "large", args.large, seed=SEARCH_SEED))
        held = Objective(adapter, heldout, heldout_fraction=0.0, seed=0, batch_size=preset.batch_size,
                         vision_maps=True)
        sets = (("calibration_data/toy", load_manifest(_default_calibration("toy"))),
                (f"toy stream {SEARCH_SEED}", large))
        for name, samples in sets:
            obj = Objective(adapter, samples, heldout_fraction=0.0, seed=0, batch_size=preset.batch_size,
                            vision_maps=True)
            for budget in BUDGETS:
                for method in METHODS:
                    t = time.perf_counter()
                    cand, info = sweep.find_schedule(method, budget, obj, dataclasses.replace(preset))
                    sched = cand.as_schedule_dict()
                    per = held.per_sample(sched)
                    rows.append({"set": name, "n": len(samples), "budget": budget, "method": method,
                                 "search": obj.score(sched), "held": float(per.mean()), "tail": tail_share(per),
                                 "trials": info["trials"], "s": time.perf_counter() - t})
                    r = rows[-1]
                    print(f"{name} ({r['n']}) {budget} {method}: search {r['search']:.4f} held-out {r['held']:.4f} "
                          f"worst-5% share {r['tail']:.2f} ({r['s']:.0f} s)", flush=True)
    lines = [
        "# Search set size vs held-out discrepancy on the shipped toy model", "",
        f"- command: `python studies/search_set_size.py`; wall time {time.perf_counter() - t0:.0f} s, "
        f"torch threads {args.threads}",
        f"- held-out: {preset.n_heldout} toy samples of stream `HELDOUT_SEED`; vflow: {preset.trials} "
        f"`{preset.sampler}` trials, seed {preset.seed}; uniform: budget-matched on the search set", "",
        "| search set | samples | budget | method | 1-cos on search set | 1-cos held-out | worst 5 % share of "
        "held-out | vflow / uniform held-out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = ""
        if r["method"] == "vflow":
            uni = next(x for x in rows if x["set"] == r["set"] and x["budget"] == r["budget"]
                       and x["method"] == "uniform")
            ratio = f"{r['held'] / uni['held']:.2f}"
        lines.append(f"| {r['set']} | {r['n']} | {r['budget']} | {r['method']} | {r['search']:.4f} | "
                     f"{r['held']:.4f} | {r['tail']:.2f} | {ratio} |")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
