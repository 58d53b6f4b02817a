"""``python -m schedsearch.toy generate --n N --seed S --out DIR``: write a toy visual-QA dataset."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m schedsearch.toy", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write PNGs + manifest.jsonl (byte-identical for a seed)")
    g.add_argument("--n", type=int, required=True, help="number of samples")
    g.add_argument("--seed", type=int, required=True, help="stream seed (training uses 1, held-out 2, calibration 3)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--max-objects", type=int, default=6)
    args = ap.parse_args(argv)
    if args.n <= 0:
        print(f"error: --n must be positive, got {args.n}", file=sys.stderr)
        return 2
    from schedsearch.toy import write_dataset

    path = write_dataset(args.out, args.n, args.seed, max_objects=args.max_objects)
    print(f"wrote {args.n} samples to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
