"""Questions with one short exact-match answer about a :class:`~schedsearch.toy.scenes.Scene`.

Types (``qtype``) and their chance rates (uniform guessing over the answers the template allows):

* ``presence``  "is there a red triangle ?" -> yes / no (balanced), chance 1/2
* ``counting``  "how many red shapes are there ?", "how many circles are there ?",
  "how many shapes are there ?" -> "0" ... "6", chance about 1/7
* ``attribute`` of a unique object: "what colour is the circle ?" (the only circle),
  "what shape is the blue object ?" (the only blue one), "what size is the red square ?"
  -> colour (1/4) / shape (1/3) / small|large (1/2)
* ``spatial``   "is the red circle in the top or bottom half ?" -> top / bottom; "... left or right
  half ?" -> left / right; "which quadrant is the red circle in ?" -> "top left" ...;
  "is the red circle left of the blue square ?" / "... above ..." -> yes / no. ``region`` records
  the quadrant of the (first) object the question is about, e.g. "top left".
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from schedsearch.toy.scenes import COLOURS, SHAPES, SIZES, Obj, Scene

QTYPES = ("presence", "counting", "attribute", "spatial")
PLURAL = {s: s + "s" for s in SHAPES}

#: Every word a prompt or an answer can contain (the toy tokenizer's vocabulary).
WORDS = sorted(set(
    "is there a are how many shapes what colour shape size the object in top bottom or left right half which "
    "quadrant of above yes no ?".split()
    + list(COLOURS) + list(SHAPES) + list(PLURAL.values()) + list(SIZES) + [str(i) for i in range(17)]
))


def _unique(scene: Scene) -> list[Obj]:
    names = Counter(o.name for o in scene.objects)
    return [o for o in scene.objects if names[o.name] == 1]


def _pick(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(0, len(items)))]


def presence(scene: Scene, rng: np.random.Generator) -> dict:
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    yes = bool(rng.integers(0, 2)) or not absent
    c, s = _pick(rng, present) if yes else _pick(rng, absent)
    return {"prompt": f"is there a {c} {s} ?", "answer": "yes" if yes else "no"}


def counting(scene: Scene, rng: np.random.Generator) -> dict:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        c = _pick(rng, list(COLOURS))
        n = sum(o.colour == c for o in scene.objects)
        prompt = f"how many {c} shapes are there ?"
    elif kind == 1:
        s = _pick(rng, list(SHAPES))
        n = sum(o.shape == s for o in scene.objects)
        prompt = f"how many {PLURAL[s]} are there ?"
    else:
        n = len(scene.objects)
        prompt = "how many shapes are there ?"
    return {"prompt": prompt, "answer": str(n)}


def attribute(scene: Scene, rng: np.random.Generator) -> dict | None:
    options = []
    shapes = Counter(o.shape for o in scene.objects)
    colours = Counter(o.colour for o in scene.objects)
    for o in scene.objects:
        if shapes[o.shape] == 1:
            options.append({"prompt": f"what colour is the {o.shape} ?", "answer": o.colour})
        if colours[o.colour] == 1:
            options.append({"prompt": f"what shape is the {o.colour} object ?", "answer": o.shape})
    for o in _unique(scene):
        options.append({"prompt": f"what size is the {o.name} ?", "answer": o.size})
    return _pick(rng, options) if options else None


def spatial(scene: Scene, rng: np.random.Generator) -> dict | None:
    uniq = _unique(scene)
    if not uniq:
        return None
    kind = int(rng.integers(0, 5))
    if kind >= 3:
        axis = "col" if kind == 3 else "row"
        pairs = [(a, b) for a in uniq for b in uniq if getattr(a, axis) != getattr(b, axis)]
        if pairs:
            a, b = _pick(rng, pairs)
            rel = "left of" if axis == "col" else "above"
            yes = getattr(a, axis) < getattr(b, axis)
            return {"prompt": f"is the {a.name} {rel} the {b.name} ?", "answer": "yes" if yes else "no",
                    "region": a.quadrant}
        kind = int(rng.integers(0, 3))
    o = _pick(rng, uniq)
    if kind == 0:
        return {"prompt": f"is the {o.name} in the top or bottom half ?", "answer": o.vertical, "region": o.quadrant}
    if kind == 1:
        return {"prompt": f"is the {o.name} in the left or right half ?", "answer": o.horizontal,
                "region": o.quadrant}
    return {"prompt": f"which quadrant is the {o.name} in ?", "answer": o.quadrant, "region": o.quadrant}


MAKERS = {"presence": presence, "counting": counting, "attribute": attribute, "spatial": spatial}


def make_question(scene: Scene, rng: np.random.Generator, qtype: str | None = None) -> dict | None:
    """A question dict (prompt, answer, qtype[, region]) or None when the scene cannot support ``qtype``."""
    qtype = qtype or QTYPES[int(rng.integers(0, len(QTYPES)))]
    q = MAKERS[qtype](scene, rng)
    if q is None:
        return None
    q["qtype"] = qtype
    return q
