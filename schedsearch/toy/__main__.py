"""``python -m schedsearch.toy generate --n N --seed S --out DIR``: write a toy visual-QA dataset.

``python -m schedsearch.toy video --n N --seed S --out DIR`` writes the toy video task (schedsearch/toy/video.py).

Every argument is checked before anything is written (one ``error:`` line, exit 2): ``--n`` >= 1, ``--seed`` >= 0
(numpy's seed sequences take non-negative integers), ``--max-objects`` within what the scene grid holds, and
``--out`` a folder that can be written (schedsearch.output.prepare_output).
"""

from __future__ import annotations

import argparse
import sys


def _problem(args: argparse.Namespace) -> str | None:
    from schedsearch.errors import SchedsearchError
    from schedsearch.output import prepare_output
    from schedsearch.toy.scenes import MAX_OBJECTS

    if args.n <= 0:
        return f"--n must be positive, got {args.n}"
    if args.seed < 0:
        return f"--seed must be a non-negative integer, got {args.seed}"
    if not 1 <= args.max_objects <= MAX_OBJECTS:
        return f"--max-objects must be between 1 and {MAX_OBJECTS} (one object per grid cell), got {args.max_objects}"
    try:
        prepare_output(args.out, folder=True)
    except SchedsearchError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m schedsearch.toy", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write PNGs + manifest.jsonl (byte-identical for a seed)")
    g.add_argument("--n", type=int, required=True, help="number of samples")
    g.add_argument("--seed", type=int, required=True, help="stream seed (training uses 1, held-out 2, calibration 3)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--max-objects", type=int, default=6)
    v = sub.add_parser("video", help="write clips (folders of frame PNGs) + manifest.jsonl (byte-identical for a seed)")
    v.add_argument("--n", type=int, required=True, help="number of clips")
    v.add_argument("--seed", type=int, required=True, help="stream seed (held-out 2, calibration 3)")
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--max-objects", type=int, default=4)
    args = ap.parse_args(argv)
    problem = _problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from schedsearch.toy import write_dataset
    from schedsearch.toy.video import write_video_dataset

    write = write_video_dataset if args.cmd == "video" else write_dataset
    try:
        path = write(args.out, args.n, args.seed, max_objects=args.max_objects)
    except OSError as err:  # e.g. the disk filled up while writing
        print(f"error: cannot write the dataset to {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} samples to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
