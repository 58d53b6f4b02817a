"""The toy testbed: a synthetic visual-QA task and the small trained Qwen2.5-VL shipped with the package.

Lifecycle::

    img, q, scene = sample(seed, index)            # deterministic for (seed, index)
    write_dataset(out_dir, n=200, seed=7)           # PNGs + manifest.jsonl, byte-identical for a seed
    python -m schedsearch.toy generate --n 200 --seed 7 --out DIR

Seeds: :data:`TRAIN_SEED` feeds training, :data:`HELDOUT_SEED` the held-out evaluation and
:data:`CALIB_SEED` the shipped calibration set (``calibration_data/toy``); the three never share a
(seed, index) stream. The model lives in ``schedsearch/toy/model`` (``load_model("toy")``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CALIB_SEED", "HELDOUT_SEED", "MODEL_DIR", "TRAIN_SEED", "default_calibration_dir", "sample",
           "write_dataset"]

TRAIN_SEED = 1
HELDOUT_SEED = 2
CALIB_SEED = 3
MODEL_DIR = Path(__file__).resolve().parent / "model"


def sample(seed: int, index: int, *, min_objects: int = 1, max_objects: int = 6, qtype: str | None = None,
           ) -> tuple[Any, dict, Any]:
    """(PIL image, question dict, Scene) number ``index`` of the stream ``seed``; deterministic."""
    from schedsearch.toy.questions import make_question
    from schedsearch.toy.scenes import make_scene, render

    rng = np.random.default_rng([int(seed), int(index)])
    while True:
        scene = make_scene(rng, min_objects, max_objects)
        q = make_question(scene, rng, qtype)
        if q is not None:
            return render(scene, rng), q, scene


def write_dataset(out: str | Path, n: int, seed: int, *, max_objects: int = 6) -> Path:
    """Write ``n`` samples of stream ``seed`` as ``images/NNNNN.png`` + ``manifest.jsonl``; returns the manifest."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img, q, _ = sample(seed, i, max_objects=max_objects)
        rel = f"images/{i:05d}.png"
        img.save(out / rel, format="PNG", optimize=False)
        lines.append(manifest_line({"image": rel}, q, seed, i))
    return write_manifest(out, lines)


def manifest_line(media: dict, q: dict, seed: int, index: int) -> str:
    """One manifest record: the media keys, the question and answer, their type (and region), the stream."""
    rec = {**media, "prompt": q["prompt"], "answer": q["answer"], "qtype": q["qtype"], "seed": seed, "index": index}
    if "region" in q:
        rec["region"] = q["region"]
    return json.dumps(rec, sort_keys=True)


def write_manifest(out: Path, lines: list[str]) -> Path:
    path = out / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def default_calibration_dir() -> Path:
    """The shipped toy calibration set (``calibration_data/toy`` of the source tree)."""
    from schedsearch.errors import CalibrationError

    p = Path(__file__).resolve().parents[2] / "calibration_data" / "toy"
    if not (p / "manifest.jsonl").is_file():
        raise CalibrationError(f"the default toy calibration set {p} is missing; regenerate it with "
                               f"`python -m schedsearch.toy generate --n 64 --seed {CALIB_SEED} --out {p}`")
    return p
