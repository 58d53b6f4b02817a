"""The schedule contract (standard library only): a frozen, validated, versioned pruning schedule.

A schedule says, for every decoder layer ``l`` of one model, which fraction ``r_l`` of the
*original* visual tokens is still present when layer ``l`` runs (cumulative, non-increasing,
1.0 = all kept), how the survivors are chosen (``scorer``), whether pruned tokens are merged
back (``recycling``), which model it was made for, the budget it meets and where it came from.
The file format is documented in ``schedule.schema.json`` and ``docs/schedule.md``.

    sched = load_schedule("s.json")          # one-line ScheduleError on any bad input
    sched.kept_counts(576)                   # tokens entering each layer (the rounding rule below)
    sched.save("s2.json")                    # sorted keys, atomic write

Versioning: ``schema_version`` is ``"MAJOR.MINOR"``. A newer minor only adds keys: they are
warned about (:class:`ScheduleVersionWarning`), kept in ``extra`` and written back unchanged.
Another major is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
import tempfile
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from schedsearch.errors import IncompatibleScheduleError, ScheduleError
from schedsearch.scorer_specs import ParamError, resolve_params, scorer_names

__all__ = [
    "SCHEMA_VERSION",
    "SCORER_NAMES",
    "BUDGET_KINDS",
    "RECYCLING_WEIGHTINGS",
    "Schedule",
    "Scorer",
    "Recycling",
    "ModelInfo",
    "Budget",
    "Objective",
    "Method",
    "Provenance",
    "ScheduleVersionWarning",
    "ScheduleCompatibilityWarning",
    "kept_counts",
    "modality_kept_counts",
    "MODALITIES",
    "load_schedule",
    "check_compatible",
    "make_provenance",
]

# 1.4 (2026-12): per-modality keep ratios + temporal rankings (issue 17); 1.3: composite + the references'
# own rules (fastv, divprune, feather, vflow); 1.2 (2026-12): the field's rankings (issue 13); 1.1 (2026-11):
# "diverse"; 1.0: first
SCHEMA_VERSION = "1.4"
MODALITIES = ("image", "video")  # keys of modality_keep_ratios (since 1.4)
_MAJOR = 1
SCORER_NAMES = scorer_names()  # the registry in scorer_specs.py (one row per ranking)
BUDGET_KINDS = ("flops", "tokens", "kv")
RECYCLING_WEIGHTINGS = ("importance",)
RECYCLING_MAX_GRID = 256  # cells per image side; no image has more token rows than this
_PROVENANCE_PACKAGES = ("torch", "transformers", "optuna", "mlflow")


class ScheduleVersionWarning(UserWarning):
    """Unknown keys in a schedule file (a newer minor schema version, or a typo); they are kept."""


class ScheduleCompatibilityWarning(UserWarning):
    """A schedule whose model fingerprint or family differs from the model it is applied to."""


def kept_counts(keep_ratios: list[float] | tuple[float, ...], n_visual: int) -> list[int]:
    """Visual tokens kept *entering* each decoder layer: round-half-up of ratio x count, clamped.

    This rounding rule is part of the contract: every runtime must use it so that FLOPs,
    KV bytes and the tokens actually dropped agree. n_l = min(n_visual, floor(r_l * n_visual + 0.5)).
    """
    return [min(n_visual, max(0, math.floor(float(r) * n_visual + 0.5))) for r in keep_ratios]


def modality_kept_counts(keep_ratios: list[float] | tuple[float, ...], modality_ratios: Mapping[str, Any] | None,
                         n_by_modality: Mapping[str, int]) -> dict[str, list[int]] | list[int]:
    """Kept visual tokens entering each layer, per modality when the schedule has modality ratios (since 1.4).

    Without ``modality_ratios`` (empty or None) the rule is the one-ratio rule over all visual tokens together:
    a plain list ``kept_counts(keep_ratios, sum(n_by_modality.values()))``. With them, every modality in
    ``n_by_modality`` gets ``kept_counts(modality_ratios.get(m, keep_ratios), n_m)`` (a modality without its own
    list follows ``keep_ratios``), returned as ``{modality: counts}``; the total a layer sees is their sum.
    """
    if not modality_ratios:
        return kept_counts(keep_ratios, sum(int(n) for n in n_by_modality.values()))
    return {m: kept_counts(modality_ratios.get(m, keep_ratios), int(n)) for m, n in n_by_modality.items()}


# ---------------------------------------------------------------------------------- value checks
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any, where: str, fix: str = "write a number") -> float:
    if not _is_number(value):
        raise ScheduleError(f"{where}={_show(value)} is not a number: {fix}")
    value = float(value)
    if not math.isfinite(value):
        raise ScheduleError(f"{where}={value} is not finite: {fix}")
    return value


def _opt_number(value: Any, where: str, *, low: float = 0.0) -> float | None:
    if value is None:
        return None
    value = _number(value, where, f"write a number >= {low:g} or null")
    if value < low:
        raise ScheduleError(f"{where}={value} is negative: write a number >= {low:g} or null")
    return value


def _integer(value: Any, where: str, *, low: int, high: int | None = None) -> int:
    span = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{where}={_show(value)} is not an integer: write a whole number {span}")
    if value < low:
        raise ScheduleError(f"{where}={value} is smaller than {low}: write a whole number {span}")
    if high is not None and value > high:
        raise ScheduleError(f"{where}={value} is larger than {high}: write a whole number {span}")
    return int(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ScheduleError(f"{where}={_show(value)} must be a non-empty string")
    return value


def _opt_text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ScheduleError(f"{where}={_show(value)} must be a string or null")
    return value


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ScheduleError(f"{where}={_show(value)} is not known: use one of {', '.join(choices)}")
    return value


MAX_NESTING = 64  # JSON nesting a schedule may hold (its own data is 3 deep); deeper input is refused, not recursed


def _freeze(value: Any, where: str, depth: int = 0) -> Any:
    """JSON data -> an immutable copy (dict -> mappingproxy, list -> tuple); anything else is an error."""
    if depth > MAX_NESTING:
        head = where if len(where) <= 60 else where[:60] + "..."
        raise ScheduleError(f"{head} is nested more than {MAX_NESTING} levels deep: schedules hold shallow data")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ScheduleError(f"{where}={value} is not finite: JSON has no NaN or infinity")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ScheduleError(f"{where} has key {_show(key)}: JSON object keys must be strings")
            out[key] = _freeze(item, f"{where}[{key!r}]", depth + 1)
        return types.MappingProxyType(out)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
    raise ScheduleError(
        f"{where}={_show(value)} is not JSON data ({type(value).__name__}): use str, number, bool, null, list or object"
    )


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ScheduleError(f"{where}={_show(value)} must be a JSON object")
    return _freeze(value, where)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


# ---------------------------------------------------------------------------------- sections
class _Section:
    """Shared parsing for the nested sections: known keys -> fields, unknown keys -> ``extra``."""

    extra: Mapping[str, Any]

    _KEY: ClassVar[str] = ""
    _REQUIRED: ClassVar[tuple[str, ...]] = ()
    _OPEN: ClassVar[bool] = False  # True: unknown keys are part of the section (no warning)

    def _check_extra(self) -> None:
        where = f"{self._KEY}.extra"
        extra = _mapping(self.extra, where)
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}  # type: ignore[arg-type]
        clash = sorted(set(extra) & names)
        if clash:
            raise ScheduleError(f"{where} repeats the field {clash[0]!r}: set it directly, not through extra")
        _set(self, "extra", extra)

    @classmethod
    def _from_dict(cls, data: Any, unknown: list[str]) -> Any:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise ScheduleError(f"{cls._KEY}={_show(data)} must be a JSON object")
        for key in cls._REQUIRED:
            if key not in data:
                raise ScheduleError(f"missing required field '{cls._KEY}.{key}': see schedule.schema.json")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}  # type: ignore[arg-type]
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if extra and not cls._OPEN:
            unknown.extend(f"{cls._KEY}.{k}" for k in sorted(extra))
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}  # type: ignore[arg-type]
        out.update(_thaw(self.extra))
        return out


@dataclass(frozen=True)
class Scorer(_Section):
    """How surviving visual tokens are chosen at a drop layer.

    ``name``: one of :data:`SCORER_NAMES`; ``params``: scorer settings, type- and range-checked against the
    scorer registry (:mod:`schedsearch.scorer_specs`), e.g. ``{"rope": true}`` for ``last_token_attention``,
    ``{"seed": 0}`` for ``random``, ``{"spatial": 1.0}`` for ``diverse`` (since 1.1),
    ``{"source": "vision_attention"}`` for ``external``. An unknown parameter is an error.
    """

    name: str = "last_token_attention"
    params: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEY: ClassVar[str] = "scorer"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("name",)

    def __post_init__(self) -> None:
        _choice(self.name, "scorer.name", SCORER_NAMES)
        _set(self, "params", _mapping(self.params, "scorer.params"))
        try:  # types and ranges of every parameter, from the scorer registry (scorer_specs.py)
            resolve_params(self.name, self.params)
        except ParamError as err:
            raise ScheduleError(str(err)) from None
        self._check_extra()


@dataclass(frozen=True)
class Recycling(_Section):
    """Merge pruned tokens back into kept ones on an ``grid`` x ``grid`` spatial grid per image."""

    grid: int = 2
    weighting: str = "importance"
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEY: ClassVar[str] = "recycling"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("grid",)

    def __post_init__(self) -> None:
        _integer(self.grid, "recycling.grid", low=1, high=RECYCLING_MAX_GRID)
        _choice(self.weighting, "recycling.weighting", RECYCLING_WEIGHTINGS)
        self._check_extra()


@dataclass(frozen=True)
class ModelInfo(_Section):
    """The model a schedule was made for: family, name or path, decoder layer count, config fingerprint."""

    family: str
    name: str
    num_layers: int
    fingerprint: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEY: ClassVar[str] = "model"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("family", "name", "num_layers")

    def __post_init__(self) -> None:
        _text(self.family, "model.family")
        _text(self.name, "model.name")
        _integer(self.num_layers, "model.num_layers", low=1)
        _opt_text(self.fingerprint, "model.fingerprint")
        self._check_extra()


@dataclass(frozen=True)
class Budget(_Section):
    """The budget the schedule meets: ``kind`` (flops, tokens, kv), ``requested`` in (0, 1], ``achieved``.

    Ratios are pruned / unpruned; ``flops_ratio``, ``kv_ratio`` and ``token_ratio`` are the
    measured values of all three kinds when known.
    """

    kind: str
    requested: float
    achieved: float | None = None
    flops_ratio: float | None = None
    kv_ratio: float | None = None
    token_ratio: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEY: ClassVar[str] = "budget"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("kind", "requested")

    def __post_init__(self) -> None:
        _choice(self.kind, "budget.kind", BUDGET_KINDS)
        req = _number(self.requested, "budget.requested", "write a fraction in (0, 1], e.g. 0.5")
        if not 0.0 < req <= 1.0:
            raise ScheduleError(
                f"budget.requested={req} is outside (0, 1]: write the kept fraction of the unpruned cost, e.g. 0.5"
            )
        _set(self, "requested", req)
        for name in ("achieved", "flops_ratio", "kv_ratio", "token_ratio"):
            _set(self, name, _opt_number(getattr(self, name), f"budget.{name}"))
        self._check_extra()


@dataclass(frozen=True)
class Objective(_Section):
    """The objective the schedule reached: ``name``, ``value``, ``split``; any further keys live in ``extra``."""

    name: str
    value: float
    split: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEY: ClassVar[str] = "objective"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("name", "value")
    _OPEN: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _text(self.name, "objective.name")
        _set(self, "value", _number(self.value, "objective.value"))
        _opt_text(self.split, "objective.split")
        self._check_extra()


@dataclass(frozen=True)
class Method(_Section):
    """How the ratios were produced: e.g. ``psigmoid``, ``fastv``, ``manual``, and its parameters."""

    name: str = "manual"
    params: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEY: ClassVar[str] = "method"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("name",)

    def __post_init__(self) -> None:
        _text(self.name, "method.name")
        _set(self, "params", _mapping(self.params, "method.params"))
        self._check_extra()


_ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]00:00)$")


@dataclass(frozen=True)
class Provenance(_Section):
    """Where a schedule came from. ``created`` is ISO 8601 UTC (``2025-01-31T12:00:00Z``)."""

    created: str
    schedsearch_version: str
    packages: Mapping[str, str] = field(default_factory=dict)
    calibration_hash: str | None = None
    study: str | None = None
    trial: int | str | None = None
    mlflow_run_id: str | None = None
    command: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEY: ClassVar[str] = "provenance"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("created", "schedsearch_version")

    def __post_init__(self) -> None:
        if not isinstance(self.created, str) or not _ISO_UTC.match(self.created):
            raise ScheduleError(
                f"provenance.created={_show(self.created)} is not an ISO 8601 UTC time: write e.g. 2025-01-31T12:00:00Z"
            )
        try:
            _dt.datetime.fromisoformat(self.created.replace("Z", "+00:00"))
        except ValueError:
            raise ScheduleError(
                f"provenance.created={self.created!r} is not a real date/time: write e.g. 2025-01-31T12:00:00Z"
            ) from None
        _text(self.schedsearch_version, "provenance.schedsearch_version")
        packages = _mapping(self.packages, "provenance.packages")
        for name, version in packages.items():
            if not isinstance(version, str):
                raise ScheduleError(
                    f"provenance.packages[{name!r}]={_show(version)} must be a version string, e.g. \"2.5.1\""
                )
        _set(self, "packages", packages)
        for name in ("calibration_hash", "study", "mlflow_run_id", "command"):
            _opt_text(getattr(self, name), f"provenance.{name}")
        if self.trial is not None and (isinstance(self.trial, bool) or not isinstance(self.trial, (int, str))):
            raise ScheduleError(f"provenance.trial={_show(self.trial)} must be a trial number, a string or null")
        self._check_extra()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_provenance(**kw: Any) -> Provenance:
    """Provenance for a schedule made now: UTC time, schedsearch version, installed package versions.

    Versions of torch, transformers, optuna and mlflow are read from package metadata (nothing is
    imported); packages that are not installed are left out. Keyword arguments override any field;
    ``packages=`` is merged over the detected versions.
    """
    from importlib import metadata

    from schedsearch import __version__

    packages: dict[str, str] = {}
    for name in _PROVENANCE_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    packages.update(kw.pop("packages", None) or {})
    values: dict[str, Any] = {"created": _utc_now(), "schedsearch_version": __version__, "packages": packages}
    values.update(kw)
    return Provenance(**values)


# ---------------------------------------------------------------------------------- schedule
def _parse_version(value: Any) -> tuple[int, int]:
    if not isinstance(value, str) or not re.fullmatch(r"\d+\.\d+", value):
        raise ScheduleError(
            f"schema_version={_show(value)} is not a \"MAJOR.MINOR\" string: "
            f"this schedsearch writes \"{SCHEMA_VERSION}\""
        )
    major, minor = value.split(".")
    if int(major) != _MAJOR:
        raise ScheduleError(
            f"schema_version={value!r} is not readable: this schedsearch reads schema {_MAJOR}.x only; "
            + ("upgrade schedsearch (pip install -U schedsearch)" if int(major) > _MAJOR
               else "re-create the schedule with this schedsearch")
        )
    return int(major), int(minor)


_SECTIONS: dict[str, type[_Section]] = {
    "scorer": Scorer,
    "recycling": Recycling,
    "model": ModelInfo,
    "budget": Budget,
    "objective": Objective,
    "method": Method,
    "provenance": Provenance,
}
_NULLABLE = ("recycling", "objective")
_OPTIONAL_TOP = ("modality_keep_ratios",)  # since 1.4; written only when set, so older files round-trip unchanged
_REQUIRED_TOP = ("schema_version", "keep_ratios", "scorer", "model", "budget", "method", "provenance")


@dataclass(frozen=True)
class Schedule:
    """A frozen visual-token pruning schedule; validated on construction (one-line :class:`ScheduleError`).

    ``keep_ratios[l]`` is the cumulative fraction of the original visual tokens kept entering
    decoder layer ``l``: one per decoder layer, each in [0, 1], non-increasing with depth.
    Nested sections accept dicts (``model={"family": ..., ...}``) and are converted.
    ``extra`` holds top-level keys this version does not know (kept for round trips).

    ``modality_keep_ratios`` (since 1.4, optional): ``{"image": [...], "video": [...]}`` gives a modality its own
    cumulative ratios per layer (same rules as ``keep_ratios``); then every modality is counted and pruned on its
    own (:func:`modality_kept_counts`) and a modality without a list follows ``keep_ratios``. Empty (the default,
    and every older file): one ratio for all visual tokens together.
    """

    keep_ratios: tuple[float, ...]
    model: ModelInfo
    budget: Budget
    scorer: Scorer = field(default_factory=lambda: Scorer("last_token_attention", {"rope": True}))
    recycling: Recycling | None = None
    objective: Objective | None = None
    method: Method = field(default_factory=Method)
    provenance: Provenance = field(default_factory=make_provenance)
    schema_version: str = SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)
    modality_keep_ratios: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _parse_version(self.schema_version)
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if value is None and name in _NULLABLE:
                continue
            if isinstance(value, Mapping):
                value = cls._from_dict(value, [])
            if not isinstance(value, cls):
                raise ScheduleError(f"{name}={_show(value)} must be a JSON object ({cls.__name__})")
            _set(self, name, value)
        fixed = _ratio_list(self.keep_ratios, "keep_ratios")
        _set(self, "keep_ratios", tuple(fixed))
        if len(fixed) != self.model.num_layers:
            raise ScheduleError(
                f"keep_ratios has {len(fixed)} entries but model.num_layers={self.model.num_layers}: "
                "give exactly one ratio per decoder layer"
            )
        mods = self.modality_keep_ratios
        if mods is None:
            mods = {}
        if not isinstance(mods, Mapping):
            raise ScheduleError(f"modality_keep_ratios={_show(mods)} must be a JSON object like "
                                "{\"video\": [ratios per layer]}")
        checked: dict[str, tuple[float, ...]] = {}
        for name, lst in mods.items():
            _choice(name, "modality_keep_ratios key", MODALITIES)
            got = _ratio_list(lst, f"modality_keep_ratios.{name}")
            if len(got) != len(fixed):
                raise ScheduleError(f"modality_keep_ratios.{name} has {len(got)} entries but keep_ratios has "
                                    f"{len(fixed)}: give one ratio per decoder layer")
            checked[name] = tuple(got)
        _set(self, "modality_keep_ratios", types.MappingProxyType(checked))
        extra = _mapping(self.extra, "extra")
        clash = sorted(set(extra) & set(_REQUIRED_TOP + _NULLABLE + _OPTIONAL_TOP + ("extra",)))
        if clash:
            raise ScheduleError(f"extra repeats the field {clash[0]!r}: set it directly, not through extra")
        _set(self, "extra", extra)

    def __hash__(self) -> int:
        return hash(self.to_json())

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (dicts, lists, numbers); unknown keys from ``extra`` included."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "keep_ratios": list(self.keep_ratios),
        }
        for name in _SECTIONS:
            value = getattr(self, name)
            out[name] = None if value is None else value.to_dict()
        if self.modality_keep_ratios:
            out["modality_keep_ratios"] = {k: list(v) for k, v in self.modality_keep_ratios.items()}
        out.update(_thaw(self.extra))
        return out

    def to_json(self) -> str:
        """Sorted keys, 2-space indent, trailing newline; byte-identical after a round trip."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Schedule:
        """Build from parsed JSON; unknown keys warn (:class:`ScheduleVersionWarning`) and are kept."""
        if not isinstance(data, Mapping):
            raise ScheduleError(f"a schedule must be a JSON object, found {type(data).__name__}")
        if "schema_version" not in data:
            raise ScheduleError(
                f"missing required field 'schema_version': add \"schema_version\": \"{SCHEMA_VERSION}\""
            )
        _major, minor = _parse_version(data["schema_version"])
        for key in _REQUIRED_TOP:
            if key not in data:
                raise ScheduleError(f"missing required field '{key}': see schedule.schema.json")
        unknown: list[str] = []
        kwargs: dict[str, Any] = {"schema_version": data["schema_version"], "keep_ratios": data["keep_ratios"]}
        if not isinstance(data["keep_ratios"], (list, tuple)):
            raise ScheduleError(
                f"keep_ratios={_show(data['keep_ratios'])} must be a list with one ratio per decoder layer"
            )
        for name, section in _SECTIONS.items():
            value = data.get(name)
            if value is None and name in _NULLABLE:
                kwargs[name] = None
                continue
            kwargs[name] = section._from_dict(value, unknown)
        if data.get("modality_keep_ratios") is not None:
            kwargs["modality_keep_ratios"] = data["modality_keep_ratios"]
        extra = {k: v for k, v in data.items() if k not in kwargs and k not in _OPTIONAL_TOP}
        unknown[:0] = sorted(extra)
        if unknown:
            _, our_minor = _parse_version(SCHEMA_VERSION)
            why = (
                f"schema_version {data['schema_version']} is newer than this schedsearch ({SCHEMA_VERSION})"
                if minor > our_minor
                else "typo or hand-added key?"
            )
            warnings.warn(
                f"schedule has keys this schedsearch does not know ({', '.join(unknown)}; {why}): "
                "they are kept and written back unchanged",
                ScheduleVersionWarning,
                stacklevel=3,
            )
        schedule = cls(**kwargs, extra=extra)
        from schedsearch.schedule_structure import check_structure  # jsonschema, imported on first load

        check_structure(data, minor, _parse_version(SCHEMA_VERSION)[1], schedule)
        return schedule

    @classmethod
    def from_json(cls, text: str | bytes) -> Schedule:
        """Parse schedule JSON text; bad JSON gives a one-line error with line and column."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ScheduleError(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        except UnicodeDecodeError:
            raise ScheduleError("not UTF-8 text: save the schedule as UTF-8 JSON") from None
        except (RecursionError, ValueError) as err:  # nesting deeper than the parser's stack, 4300+ digit ints
            raise ScheduleError(f"not usable JSON: {_unreadable(err)}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` atomically: a temp file in the same directory, then ``os.replace``."""
        text = self.to_json()  # serialize first: a failure leaves any existing file untouched
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".schedule-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> Schedule:
        """A copy with some fields changed (validated again). Sections are replaced whole."""
        return dataclasses.replace(self, **changes)

    def kept_counts(self, n_visual: int) -> list[int]:
        """Visual tokens entering each layer for ``n_visual`` original tokens (the contract's rounding rule)."""
        n = _integer(n_visual, "n_visual", low=0)
        return kept_counts(self.keep_ratios, n)

    def modality_kept_counts(self, n_image: int = 0, n_video: int = 0) -> dict[str, list[int]] | list[int]:
        """:func:`modality_kept_counts` for this schedule (a list when it has one ratio for all visual tokens)."""
        return modality_kept_counts(self.keep_ratios, self.modality_keep_ratios,
                                    {"image": _integer(n_image, "n_image", low=0),
                                     "video": _integer(n_video, "n_video", low=0)})

    def drop_layers(self) -> tuple[int, ...]:
        """Layers where the kept count may fall: ratio below the previous layer's (layer 0: below 1.0)."""
        out, prev = [], 1.0
        for i, r in enumerate(self.keep_ratios):
            if r < prev:
                out.append(i)
            prev = r
        return tuple(out)

    @property
    def num_layers(self) -> int:
        return len(self.keep_ratios)

    def summary(self) -> str:
        """One paragraph for people: layers, ratios (runs collapsed), budget, scorer, method, model."""
        runs: list[str] = []
        start = 0
        for i in range(1, len(self.keep_ratios) + 1):
            if i == len(self.keep_ratios) or self.keep_ratios[i] != self.keep_ratios[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                runs.append(f"{span}: {self.keep_ratios[start]:.4g}")
                start = i
        b = self.budget
        budget = f"{b.kind} budget {b.requested:.4g}"
        if b.achieved is not None:
            budget += f" (achieved {b.achieved:.4g})"
        params = ", ".join(f"{k}={json.dumps(_thaw(v), sort_keys=True)}" for k, v in sorted(self.scorer.params.items()))
        scorer = self.scorer.name + (f" ({params})" if params else "")
        if self.recycling is not None:
            scorer += f", recycling on a {self.recycling.grid}x{self.recycling.grid} grid"
        text = (
            f"{self.num_layers} decoder layers, kept ratio by layer [{'; '.join(runs)}]; {budget}; "
            f"scorer {scorer}; method {self.method.name}; model {self.model.name} "
            f"({self.model.family}, fingerprint {self.model.fingerprint or '-'})"
        )
        for name, lst in self.modality_keep_ratios.items():
            text += f"; {name} tokens pruned on their own (ratio {lst[0]:.4g} at layer 0 to {lst[-1]:.4g})"
        if self.objective is not None:
            split = f" on {self.objective.split}" if self.objective.split else ""
            text += f"; objective {self.objective.name}={self.objective.value:.4g}{split}"
        return text + f"; schema {self.schema_version}."


def _ratio_list(ratios: Any, where: str) -> list[float]:
    """A list of ratios in [0, 1], non-increasing with depth (one-line ScheduleError naming ``where``)."""
    if isinstance(ratios, (str, bytes, Mapping)) or not hasattr(ratios, "__iter__"):
        raise ScheduleError(f"{where}={_show(ratios)} must be a list with one ratio per decoder layer")
    ratios = tuple(ratios)
    if not ratios:
        raise ScheduleError(f"{where} is empty: give one ratio per decoder layer")
    fixed: list[float] = []
    for i, r in enumerate(ratios):
        r = _number(r, f"{where}[{i}]", "write a fraction in [0, 1]")
        if not 0.0 <= r <= 1.0:
            raise ScheduleError(
                f"{where}[{i}]={r} is outside [0, 1]: a ratio is the kept fraction of the original visual tokens"
            )
        if fixed and r > fixed[-1]:
            raise ScheduleError(
                f"{where}[{i}]={r} is larger than {where}[{i - 1}]={fixed[-1]}: "
                "ratios must be non-increasing with depth (dropped tokens do not come back)"
            )
        fixed.append(r)
    return fixed


def _unreadable(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply to read (a schedule is a shallow object: see schedule.schema.json)"
    return " ".join(str(err).split())


def load_schedule(path: str | os.PathLike[str]) -> Schedule:
    """Read and validate a schedule file; every bad input is a one-line :class:`ScheduleError` naming the file."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ScheduleError(f"schedule file {name!r} does not exist: check the path")
    if os.path.isdir(name):
        raise ScheduleError(f"schedule file {name!r} is a directory: give the path of a .json file")
    try:
        with open(name, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ScheduleError(f"schedule file {name!r} cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ScheduleError(f"schedule file {name!r} is not UTF-8 text: save it as UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ScheduleError(
            f"schedule file {name!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except (RecursionError, ValueError) as err:
        raise ScheduleError(f"schedule file {name!r} is not usable JSON: {_unreadable(err)}") from None
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(data), "a number")
        raise ScheduleError(f"schedule file {name!r} must hold a JSON object, found {kind}")
    try:
        return Schedule.from_dict(data)
    except ScheduleError as err:
        raise ScheduleError(f"schedule file {name!r}: {err}") from None


def check_compatible(
    schedule: Schedule,
    *,
    num_layers: int,
    fingerprint: str | None = None,
    family: str | None = None,
    strict: bool = False,
) -> tuple[str, ...]:
    """Check that ``schedule`` fits a model; returns the (warned) soft mismatches.

    A different decoder layer count raises :class:`IncompatibleScheduleError`. A different
    config fingerprint or family is a :class:`ScheduleCompatibilityWarning` (the ratios still
    apply, but were searched on another model) unless ``strict=True``, where it raises too.
    """
    if schedule.model.num_layers != num_layers or len(schedule.keep_ratios) != num_layers:
        raise IncompatibleScheduleError(
            f"schedule is for {schedule.model.num_layers} decoder layers but the model has {num_layers}: "
            "use a schedule made for this model"
        )
    soft: list[str] = []
    if fingerprint is not None and schedule.model.fingerprint is not None and fingerprint != schedule.model.fingerprint:
        soft.append(
            f"schedule was made for model fingerprint {schedule.model.fingerprint} ({schedule.model.name}) "
            f"but this model's is {fingerprint}: ratios may not be tuned for it"
        )
    if family is not None and family != schedule.model.family:
        soft.append(f"schedule was made for model family {schedule.model.family!r} but this model is {family!r}")
    if soft and strict:
        raise IncompatibleScheduleError(soft[0] + " (strict check)")
    for message in soft:
        warnings.warn(message, ScheduleCompatibilityWarning, stacklevel=2)
    return tuple(soft)
