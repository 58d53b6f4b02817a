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

__all__ = ["Bool", "Choice", "Float", "Int", "Members", "ParamError", "ScorerSpec", "SCORERS", "scorer_names",
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


#: rankings that cannot be a composite's criteria: composites nest no composite; external's and vflow's map is
#: wired by the runtime to the top-level scorer only
NOT_MEMBERS = ("composite", "external", "vflow")


@dataclass(frozen=True)
class Members:
    """A composite's criteria: a list of ``{"name": scorer, "params": {...}, "weight": w > 0}`` (params and weight
    optional; weight default 1). Each member's params are checked against its own row; a composite cannot contain
    another composite, nor ``external`` or ``vflow`` (whose map the runtime wires to the top-level scorer only)."""

    default: tuple = ()
    max_members: int = 8

    def check(self, value: Any, where: str) -> list[dict]:
        if not isinstance(value, (list, tuple)) or not value:
            raise ParamError(f"{where}={_show(value)} is not a list of criteria: write a non-empty list of "
                             '{"name": ..., "params": {...}, "weight": ...} objects')
        if len(value) > self.max_members:
            raise ParamError(f"{where} has {len(value)} criteria: at most {self.max_members}")
        out = []
        for i, m in enumerate(value):
            at = f"{where}[{i}]"
            if not isinstance(m, Mapping):
                raise ParamError(f"{at}={_show(m)} is not an object: write {{\"name\": ..., \"params\": {{...}}}}")
            extra = sorted(set(m) - {"name", "params", "weight"})
            if extra:
                raise ParamError(f"{at}.{extra[0]} is not a criterion field (known: name, params, weight)")
            name = m.get("name")
            if name in NOT_MEMBERS:
                raise ParamError(f"{at}.name={name!r} cannot be a criterion of a composite: use one of the rankings")
            if not isinstance(name, str) or name not in SCORERS:
                known = ", ".join(n for n in SCORERS if n not in NOT_MEMBERS)
                raise ParamError(f"{at}.name={_show(name)} is not known: use one of {known}")
            params = m.get("params")
            if params is not None and not isinstance(params, Mapping):
                raise ParamError(f"{at}.params={_show(params)} is not an object")
            weight = m.get("weight", 1.0)
            weight = 1.0 if weight is None else Float(1.0, low=0.0, high=1e6).check(weight, f"{at}.weight")
            if weight <= 0:
                raise ParamError(f"{at}.weight={weight} must be > 0")
            out.append({"name": name, "params": resolve_params(name, params, f"{at}.params"), "weight": weight})
        return out

    def describe(self) -> str:
        return 'list of {"name", "params", "weight"} criteria (1-8, no composite/external/vflow)'


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
    # --- schema 1.3: composites of criteria and the references' own rules (issue 13, "make the names true")
    "composite": ScorerSpec(
        "schedsearch.runtime.scorers.composite:Composite",
        {"members": Members(({"name": "last_token_attention", "params": {"rope": False}, "weight": 1.0},
                             {"name": "uniform", "params": {}, "weight": 1.0})),
         "mode": Choice("union", ("union", "rank"))}, since="1.3",
        summary="several criteria at once: union of per-criterion top-k shares, or a weighted rank ensemble"),
    "fastv": ScorerSpec(
        "schedsearch.runtime.scorers.fastv:FastV", {"rope": Bool(True)}, since="1.3",
        summary="FastV's rule: the last token's attention returned by the layer before the drop"),
    "divprune": ScorerSpec(
        "schedsearch.runtime.scorers.divprune:DivPrune", since="1.3",
        summary="DivPrune's rule: greedy max-min cosine diversity from the token whose nearest neighbour is farthest"),
    "feather": ScorerSpec(
        "schedsearch.runtime.scorers.feather:Feather", {"stride": Int(3, 0, 64), "rope": Bool(False)}, since="1.3",
        summary="FEATHER's rule: a stride grid united with RoPE-free last-token attention of the layer before"),
    "vflow": ScorerSpec(
        "schedsearch.runtime.scorers.vflow:VFlow",
        {"t": Float(1.0, low=0.0, high=1e3), "alpha": Float(0.0, low=-1e3, high=1e3), "cell": Int(3, 0, 64)},
        since="1.3", summary="VFlowOpt: vision-attention importance; at the first drop each cell's pruned tokens "
        "merge into their most important one, which is kept"),
    # --- schema 1.4: video rankings (issue 17); they read each token's clip and frame (video families only)
    "evs": ScorerSpec(
        "schedsearch.runtime.scorers.evs:EVS", since="1.4",
        summary="EVS (vLLM's Efficient Video Sampling): dissimilarity to the same cell of the previous frame"),
    "holitom": ScorerSpec(
        "schedsearch.runtime.scorers.holitom:HoliTom",
        {"tau": Float(0.8, low=-1.0, high=1.0), "max_window": Int(8, 2, 1024), "beta": Float(0.6, low=0.0, high=1.0)},
        since="1.4", summary="HoliTom: static cells of DP-segmented frame windows merged over time, the rest in space"),
    "vidcom2": ScorerSpec(
        "schedsearch.runtime.scorers.vidcom2:VidCom2",
        {"temperature": Float(0.01, low=1e-4, high=1e3), "channel_ratio": Float(0.5, low=0.01, high=1.0)},
        since="1.4", summary="VidCom2: per-frame budgets by frame distinctiveness, then the most distinct tokens"),
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
        if value is None:
            value = kind.check(list(kind.default), f"{where}.{key}") if isinstance(kind, Members) else kind.default
            out[key] = value
        else:
            out[key] = kind.check(value, f"{where}.{key}")
    return out
