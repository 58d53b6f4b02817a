"""The toy video task: short clips of toy scenes where an object appears, vanishes, or nothing changes.

    clip, q, (before, after) = sample_clip(seed, index)     # deterministic for (seed, index)
    write_video_dataset(out_dir, n=64, seed=3)               # clips/NNNNN/ frame PNGs + manifest.jsonl
    python -m schedsearch.toy video --n 64 --seed 3 --out DIR

A clip is ``FRAMES`` frames: the first half shows scene A, the second half scene B (each scene held for
``temporal_patch_size`` = 2 frames, so each Qwen temporal patch holds one scene: 2 x 256 = 512 video tokens
for the toy model). Question types (``qtype``), all in the shipped toy model's vocabulary:

* ``appear``  B = A plus one object whose (colour, shape) A lacks; "is there a red triangle ?" -> yes about
  the new object, no about one in neither frame (balanced): the answer needs the LAST frame;
* ``vanish``  B = A minus one object; yes about the removed object, no about an absent one: needs the FIRST frame;
* ``count``   B = A (a static clip); "how many ... are there ?" (the image task's counting question): the
  second frame is pure temporal redundancy;
* ``spatial`` B = A; the image task's spatial questions (region recorded as for images).

Questions about motion ("which way does it move ?") need words the shipped toy tokenizer does not have: they
are left out until the toy model is trained on video (see README "Video").
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FRAMES", "VIDEO_QTYPES", "sample_clip", "write_video_dataset"]

FRAMES = 4
VIDEO_QTYPES = ("appear", "vanish", "count", "spatial")


def _absent(rng: np.random.Generator, *scenes: Any) -> tuple[str, str] | None:
    from schedsearch.toy.scenes import COLOURS, SHAPES

    seen = {(o.colour, o.shape) for s in scenes for o in s.objects}
    options = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in seen]
    return options[int(rng.integers(0, len(options)))] if options else None


def _event(scene: Any, rng: np.random.Generator, qtype: str) -> tuple[Any, dict] | None:
    """(scene B, question) for ``qtype`` given scene A, or None when A cannot support it."""
    from schedsearch.toy.questions import counting, spatial
    from schedsearch.toy.scenes import CELL, COLOURS, GRID, SHAPES, SIZES, Obj, Scene

    if qtype in ("count", "spatial"):
        q = counting(scene, rng) if qtype == "count" else spatial(scene, rng)
        return (scene, q) if q is not None else None
    yes = bool(rng.integers(0, 2))
    if qtype == "appear":
        free = sorted(set(range(GRID * GRID)) - {o.row * GRID + o.col for o in scene.objects})
        kinds = [(c, s) for c in COLOURS for s in SHAPES if all((o.colour, o.shape) != (c, s) for o in scene.objects)]
        if not free or not kinds:
            return None
        cell = free[int(rng.integers(0, len(free)))]
        colour, shape = kinds[int(rng.integers(0, len(kinds)))]
        size = str(rng.choice(list(SIZES)))
        r, c = divmod(cell, GRID)
        new = Obj(shape=shape, colour=colour, size=size, row=r, col=c, cx=c * CELL + CELL / 2, cy=r * CELL + CELL / 2)
        after = replace(scene, objects=tuple(sorted(scene.objects + (new,), key=lambda o: (o.row, o.col))))
        asked = (colour, shape)
    else:  # vanish: an object whose (colour, shape) is unique in A leaves
        from collections import Counter

        names = Counter((o.colour, o.shape) for o in scene.objects)
        gone = [o for o in scene.objects if names[(o.colour, o.shape)] == 1]
        if len(scene.objects) < 2 or not gone:
            return None
        o = gone[int(rng.integers(0, len(gone)))]
        after = Scene(objects=tuple(x for x in scene.objects if x is not o), background=scene.background,
                      noise=scene.noise)
        asked = (o.colour, o.shape)
    if not yes:
        asked = _absent(rng, scene, after)
        if asked is None:
            return None
    return after, {"prompt": f"is there a {asked[0]} {asked[1]} ?", "answer": "yes" if yes else "no"}


def sample_clip(seed: int, index: int, *, qtype: str | None = None, max_objects: int = 4,
                ) -> tuple[list[Any], dict, tuple[Any, Any]]:
    """(frames, question, (scene A, scene B)) number ``index`` of the stream ``seed``; deterministic."""
    from schedsearch.toy.scenes import make_scene, render

    rng = np.random.default_rng([int(seed), int(index), 17])  # 17: never the image task's stream
    while True:
        kind = qtype or VIDEO_QTYPES[int(rng.integers(0, len(VIDEO_QTYPES)))]
        scene = make_scene(rng, 1, max_objects)
        got = _event(scene, rng, kind)
        if got is None:
            continue
        after, q = got
        q["qtype"] = kind
        noise_seed = int(rng.integers(0, 2**31 - 1))
        first = render(scene, np.random.default_rng(noise_seed))  # same noise both halves: only the event changes
        second = render(after, np.random.default_rng(noise_seed)) if after is not scene else first
        half = FRAMES // 2
        return [first] * half + [second] * (FRAMES - half), q, (scene, after)


def write_video_dataset(out: str | Path, n: int, seed: int, *, max_objects: int = 4) -> Path:
    """Write ``n`` clips of stream ``seed`` as ``clips/NNNNN/fK.png`` + ``manifest.jsonl``; returns the manifest."""
    from schedsearch.toy import manifest_line, write_manifest

    out = Path(out)
    lines = []
    for i in range(n):
        frames, q, _ = sample_clip(seed, i, max_objects=max_objects)
        rel = f"clips/{i:05d}"
        (out / rel).mkdir(parents=True, exist_ok=True)
        for k, fr in enumerate(frames):
            fr.save(out / rel / f"f{k}.png", format="PNG", optimize=False)
        lines.append(manifest_line({"video": rel, "frames": FRAMES}, q, seed, i))
    return write_manifest(out, lines)
