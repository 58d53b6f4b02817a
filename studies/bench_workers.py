"""Trials per minute with 1 and 2 workers on one PostgreSQL study (same tiny workload).

Starts a throw-away PostgreSQL server on 127.0.0.1 (tests/pg.py: initdb + pg_ctl, as the ``postgres`` user
when run as root), builds the tiny Qwen2.5-VL test checkpoint and a 4-image calibration manifest, then for
W in (1, 2) runs W ``python -m schedsearch optimize --storage postgresql://... --study bench-W --resume``
processes at once, each with ``--trials T``. Throughput is measured from the trials' own timestamps in the
study (first trial start -> last trial completion), so process start-up (imports, model load, reference
forward) is excluded; the end-to-end wall time is printed next to it.

    python studies/bench_workers.py [--trials 40] [--threads 1]

Measured on the 2-core development machine with both cores free (2026-11-24), 40 trials per worker:

    workers trials trial span s trials/min speed-up  wall s
          1     40          3.3      735.6    1.00x    12.6
          2     80          3.8     1268.6    1.72x    12.9

i.e. 1.72x with 2 workers (target >= 1.6x). With 10 trials per worker the same machine gave 1.14x (690 vs
784 trials/min): a tiny-model trial takes ~80 ms, so the ~1 s the second worker needs to finish starting up
is a large part of the span, and per-trial PostgreSQL round trips and MLflow sqlite writes (one file, shared
by both workers) are a fixed cost next to it. An earlier run with a training job holding one core gave 1.02x:
2 single-threaded workers need 2 free cores. With real models (seconds per trial) the workers are independent
apart from the storage round trips.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pg():
    spec = importlib.util.spec_from_file_location("schedsearch_tests_pg", ROOT / "tests" / "pg.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _throughput(url: str, study: str) -> tuple[int, float]:
    import optuna

    from schedsearch.storage import make_storage

    st = optuna.load_study(study_name=study, storage=make_storage(url))
    done = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return len(done), span.total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40, help="trials per worker")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = ap.parse_args()

    from schedsearch.testing.tiny import make_tiny, tiny_images

    tmp = Path(tempfile.mkdtemp(prefix="bench_workers_"))
    os.chmod(tmp, 0o755)
    srv = _pg().start_postgres(tmp / "pg")
    try:
        model = make_tiny("qwen2_5_vl", tmp / "model")
        calib = tmp / "calib"
        calib.mkdir()
        lines = []
        for i, im in enumerate(tiny_images(4, seed=2)):
            im.save(calib / f"{i}.png")
            lines.append(json.dumps({"image": f"{i}.png", "prompt": f"what is {i}?"}))
        (calib / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        rows = []
        for workers in (1, 2):
            study = f"bench-{workers}"
            url = srv.createdb(study.replace("-", "_"))
            cmd = [sys.executable, "-m", "schedsearch", "optimize", "--model", str(model), "--calibration",
                   str(calib / "manifest.jsonl"), "--budget", "0.8", "--sampler", "random", "--storage", url,
                   "--study", study, "--resume", "--trials", str(args.trials),
                   "--tracking-uri", f"sqlite:///{tmp}/mlflow-{workers}.db"]
            t0 = time.perf_counter()
            procs = []
            for w in range(workers):
                cwd = tmp / f"{study}-w{w}"
                cwd.mkdir()
                procs.append(subprocess.Popen([*cmd, "--out", str(cwd / "best.json")], cwd=cwd, env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for p in procs:
                _, err = p.communicate()
                if p.returncode != 0:
                    raise SystemExit(f"worker failed ({p.returncode}): {err[-2000:]}")
            wall = time.perf_counter() - t0
            n, span = _throughput(url, study)
            rows.append((workers, n, span, 60.0 * n / span, wall))
        base = rows[0][3]
        print(f"cores: {os.cpu_count()}, torch threads per worker: {args.threads}, trials per worker: {args.trials}")
        print(f"{'workers':>7} {'trials':>6} {'trial span s':>12} {'trials/min':>10} {'speed-up':>8} {'wall s':>7}")
        for workers, n, span, tpm, wall in rows:
            print(f"{workers:>7} {n:>6} {span:>12.1f} {tpm:>10.1f} {tpm / base:>7.2f}x {wall:>7.1f}")
        try:
            load = os.getloadavg()[0]
            print(f"1-min load average at the end: {load:.2f} (other jobs on this machine compete for the cores)")
        except OSError:
            pass
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
