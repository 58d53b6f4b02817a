"""The registry of importance scorers (rankings), as data: name -> implementation + typed parameters.

Standard library only: :mod:`schedsearch.schedule` validates a file's ``scorer`` section against this table
(``schedsearch validate``), and the runtime builds the scorer from the same row, so nothing that ``validate``
accepts can reach a scorer with a parameter of the wrong type or out of range.

Adding a ranking is one module under ``schedsearch/runtime/scorers/`` plus one row here::

    "my_rank": ScorerSpec("schedsearch.runtime.scorers.my_rank:MyRank", since="1.2",
                          params={"alpha": Float(0.5, low=0.0, high=1.0)}),

``since`` is the schedule schema version that introduced the name (a reader of an older minor refuses it).
Parameter values may be ``null`` in a file: that means the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Bool", "Choice", "Float", "Int", "ParamError", "Parts", "ScorerSpec", "SCORERS", "scorer_names",
           "resolve_params"]


class ParamError(ValueError):
    """A scorer parameter of the wrong type or out of range; the message names the field and the fix."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Bool:
    default: bool

    def check(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise ParamError(f"{where}={_show(value)} is not a boolean: write true or false")
        return value

    def describe(self) -> str:
        return f"boolean, default {str(self.default).lower()}"


@dataclass(frozen=True)
class Int:
    default: int
    low: int
    high: int

    def check(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{where}={_show(value)} is not an integer: write a whole number in "
                             f"[{self.low}, {self.high}]")
        if not self.low <= value <= self.high:
            raise ParamError(f"{where}={value} is outside [{self.low}, {self.high}]")
        return int(value)

    def describe(self) -> str:
        return f"integer in [{self.low}, {self.high}], default {self.default}"


@dataclass(frozen=True)
class Float:
    default: float
    low: float = -math.inf
    high: float = math.inf

    def check(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{where}={_show(value)} is not a number: write a number in [{self.low:g}, {self.high:g}]")
        value = float(value)
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise ParamError(f"{where}={value} is outside [{self.low:g}, {self.high:g}]")
        return value

    def describe(self) -> str:
        return f"number in [{self.low:g}, {self.high:g}], default {self.default:g}"


@dataclass(frozen=True)
class Choice:
    default: str
    values: tuple[str, ...]

    def check(self, value: Any, where: str) -> str:
        if value not in self.values:
            raise ParamError(f"{where}={_show(value)} is not known: use one of {', '.join(self.values)}")
        return value

    def describe(self) -> str:
        return f"one of {', '.join(self.values)}, default {self.default}"


@dataclass(frozen=True)
class Parts:
    """A list of 2..``high`` rankings, each ``{"name": ..., "params": {...}, "weight": w}`` (a composite's parts).

    Every part is checked like a top-level scorer section (its name against this registry, its params against
    that row); ``exclude`` names that cannot be parts (the composite itself, ``external``); weight in (0, 1e3].
    The checked value is a list of plain dicts with defaults filled in."""

    default: tuple
    high: int = 3
    exclude: tuple[str, ...] = ()

    def check(self, value: Any, where: str) -> list[dict[str, Any]]:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or \
                not 2 <= len(value) <= self.high:
            raise ParamError(f"{where}={_show(value)} is not a list of 2 to {self.high} rankings, e.g. "
                             '[{"name": "diverse"}, {"name": "fastervlm", "weight": 0.5}]')
        out = []
        for i, part in enumerate(value):
            at = f"{where}[{i}]"
            if not isinstance(part, Mapping):
                raise ParamError(f"{at}={_show(part)} is not an object with a ranking name")
            unknown = sorted(set(part) - {"name", "params", "weight"})
            if unknown:
                raise ParamError(f"{at}.{unknown[0]} is not known: a part has name, params and weight")
            name = part.get("name")
            if name in self.exclude:
                raise ParamError(f"{at}.name={_show(name)} cannot be a part: use one of the other rankings")
            params = resolve_params(name, part.get("params"), f"{at}.params") if name in SCORERS else None
            if params is None:
                raise ParamError(f"{at}.name={_show(name)} is not known: use one of "
                                 f"{', '.join(n for n in SCORERS if n not in self.exclude)}")
            weight = Float(1.0, low=1e-6, high=1e3).check(1.0 if part.get("weight") is None else part["weight"],
                                                         f"{at}.weight")
            out.append({"name": name, "params": params, "weight": weight})
        return out

    def describe(self) -> str:
        return f"list of 2 to {self.high} rankings {{name, params, weight}}"


@dataclass(frozen=True)
class ScorerSpec:
    """One ranking: ``target`` is ``"module:Class"`` (imported only when a runtime builds it)."""

    target: str
    params: Mapping[str, Any] = field(default_factory=dict)
    since: str = "1.0"
    summary: str = ""


def _VLAYER(default: int) -> Int:  # noqa: N802 - a vision-encoder layer index parameter
    return Int(default, -64, 63)


#: name -> spec. Order is the order shown to users.
SCORERS: dict[str, ScorerSpec] = {
    "last_token_attention": ScorerSpec(
        "schedsearch.runtime.scorers.attention:LastTokenAttention", {"rope": Bool(True)},
        summary="attention the last token pays to each visual token, from the drop layer's own q/k"),
    "text_attention": ScorerSpec(
        "schedsearch.runtime.scorers.attention:TextAttention", {"rope": Bool(True)},
        summary="mean attention all non-padding text tokens pay to each visual token"),
    "uniform": ScorerSpec(
        "schedsearch.runtime.scorers.uniform:UniformSpatial",
        summary="evenly spaced survivors in token (raster) order"),
    "diverse": ScorerSpec(
        "schedsearch.runtime.scorers.diverse:Diverse", {"spatial": Float(1.0, low=0.0, high=1e6)}, since="1.1",
        summary="greedy max-min diversity of the tokens' states plus a spatial grid-distance term"),
    "random": ScorerSpec(
        "schedsearch.runtime.scorers.seeded_random:SeededRandom", {"seed": Int(0, 0, 2**31 - 1)},
        summary="seeded random subset, identical across a batch"),
    "external": ScorerSpec(
        "schedsearch.runtime.scorers.external:External",
        {"source": Choice("caller", ("caller", "vision_attention")),
         "t": Float(1.0, low=0.0, high=1e3), "alpha": Float(0.0, low=-1e3, high=1e3)},
        summary="importance supplied by the caller, or the vision tower's attention map (VFlowOpt)"),
    # --- schema 1.2: the field's training-free rankings (issue 13); vision layers are Python indices into the
    # vision encoder (negative = from the end), clamped into it and moved to the nearest global-attention layer
    "fastervlm": ScorerSpec(
        "schedsearch.runtime.scorers.vision_attention:FasterVLM", {"layer": _VLAYER(-2)}, since="1.2",
        summary="FasterVLM/VisPruner: [CLS] attention of a vision layer (no [CLS]: attention received)"),
    "vtc_cls": ScorerSpec(
        "schedsearch.runtime.scorers.vision_attention:VTCCLS", {"start": _VLAYER(-8), "end": _VLAYER(-2)},
        since="1.2", summary="VTC-CLS: [CLS] attention summed over vision layers start..end"),
    "visionzip": ScorerSpec(
        "schedsearch.runtime.scorers.visionzip:VisionZip",
        {"layer": _VLAYER(-2), "contextual": Float(10 / 64, low=0.0, high=1.0),
         "similarity": Choice("vision_keys", ("vision_keys", "states"))}, since="1.2",
        summary="VisionZip: dominant tokens by vision attention + contextual tokens merged by key similarity"),
    "hiprune": ScorerSpec(
        "schedsearch.runtime.scorers.hiprune:HiPrune",
        {"object_layer": _VLAYER(8), "deep_layer": _VLAYER(-2), "alpha": Float(0.1, low=0.0, high=1.0)},
        since="1.2", summary="HiPrune: mid-layer anchors + their grid neighbours + deep-layer registers"),
    "dart": ScorerSpec(
        "schedsearch.runtime.scorers.dart:DART", {"image_pivots": Int(4, 1, 256), "text_pivots": Int(4, 0, 256)},
        since="1.2", summary="DART: pivot tokens by key norm, then per pivot the least similar tokens"),
    "transprune": ScorerSpec(
        "schedsearch.runtime.scorers.transprune:TransPrune", {"start": Int(-1, -1, 1023), "iga": Bool(True)},
        since="1.2", summary="TransPrune: token transition variation from layer start on + instruction attention"),
    "flowcut": ScorerSpec(
        "schedsearch.runtime.scorers.flowcut:FlowCut", {"layer": _VLAYER(-2)}, since="1.2",
        summary="FlowCut: [CLS]-relay information-flow score accumulated over the vision layers"),
    "mmtok": ScorerSpec(
        "schedsearch.runtime.scorers.mmtok:MMTok",
        {"alpha": Float(0.5, low=0.0, high=1e3), "text_temperature": Float(0.02, low=1e-4, high=1e3),
         "vision_temperature": Float(0.2, low=1e-4, high=1e3)}, since="1.2",
        summary="MMTok: greedy maximum coverage of the instruction and of the visual tokens"),
    "todre": ScorerSpec(
        "schedsearch.runtime.scorers.todre:ToDRE", since="1.2",
        summary="ToDRE: greedy k-center diversity at the first drop, instruction relevance at later drops"),
    "sparsevlm": ScorerSpec(
        "schedsearch.runtime.scorers.sparsevlm:SparseVLM", {"recycle": Bool(True)}, since="1.2",
        summary="SparseVLM: relevant text raters' attention ranks; pruned tokens recycled by density-peak clusters"),
    "hired": ScorerSpec(
        "schedsearch.runtime.scorers.hired:HiRED",
        {"alpha": Float(0.5, low=0.0, high=1.0), "early_layer": _VLAYER(0), "late_layer": _VLAYER(-2)},
        since="1.2", summary="HiRED: budget split over the base view and tiles by early [CLS] attention, top late"),
    # --- schema 1.3: combinations of the rankings above (what `--scorer auto` searches over, besides them)
    "composite": ScorerSpec(
        "schedsearch.runtime.scorers.composite:Composite",
        {"parts": Parts(({"name": "last_token_attention", "params": {"rope": False}}, {"name": "uniform"}),
                        exclude=("composite", "external")),
         "mode": Choice("rank", ("rank", "union"))}, since="1.3",
        summary="weighted combination of 2-3 rankings: rank fusion, or a union of their top picks by weight"),
}


def scorer_names() -> tuple[str, ...]:
    return tuple(SCORERS)


def resolve_params(name: str, params: Mapping[str, Any] | None, where: str = "scorer.params") -> dict[str, Any]:
    """Checked parameters with defaults filled in; ``null`` means the default. Raises :class:`ParamError`.

    Unknown parameter names are refused: a scorer must never run with a setting it silently ignores.
    """
    spec = SCORERS.get(name)
    if spec is None:
        raise ParamError(f"scorer.name={_show(name)} is not known: use one of {', '.join(SCORERS)}")
    given = dict(params or {})
    unknown = sorted(set(given) - set(spec.params))
    if unknown:
        known = ", ".join(spec.params) or "none"
        raise ParamError(f"{where}.{unknown[0]} is not a parameter of scorer {name!r} (known: {known})")
    out: dict[str, Any] = {}
    for key, kind in spec.params.items():
        value = given.get(key)
        if value is None and isinstance(kind, Parts):  # the default parts get their own defaults filled in
            value = kind.default
        out[key] = kind.default if value is None else kind.check(value, f"{where}.{key}")
    return out
