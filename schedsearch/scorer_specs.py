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

__all__ = ["Bool", "Choice", "Float", "Int", "ParamError", "ScorerSpec", "SCORERS", "scorer_names",
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
class ScorerSpec:
    """One ranking: ``target`` is ``"module:Class"`` (imported only when a runtime builds it)."""

    target: str
    params: Mapping[str, Any] = field(default_factory=dict)
    since: str = "1.0"
    summary: str = ""


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
        out[key] = kind.default if value is None else kind.check(value, f"{where}.{key}")
    return out
