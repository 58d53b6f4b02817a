"""Study presets and the one table of value ranges that every numeric setting is checked against.

Presets are TOML files under studies/ whose keys mirror ``schedsearch optimize`` flags; flags given on the
command line win over the file. Unknown keys are an error that names the key and the known ones (a typo must
never silently fall back to a default).

:data:`RANGES` is the single validation layer for numbers: the CLI checks every numeric flag against it while
parsing (before any model is loaded, see :func:`schedsearch.cli.ranged`), :func:`load_config` checks preset
values against it, and the ranges are printed in ``--help``. ``check_range(name, value)`` raises a
:class:`ConfigError` naming the flag, the value and the allowed range.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schedsearch.errors import SchedsearchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(SchedsearchError):
    """A study config file or a setting value that cannot be used."""


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` ends are unbounded, ``*_open`` ends exclusive."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def text(self) -> str:
        """``x>=1``, ``0<x<=1``, ... (the notation click uses for its ranges)."""
        def num(v: float) -> str:
            return str(int(v)) if self.integer else f"{v:g}"

        left = "" if self.lo is None else f"{num(self.lo)}{'<' if self.lo_open else '<='}"
        right = "" if self.hi is None else f"{'<' if self.hi_open else '<='}{num(self.hi)}"
        if self.lo is not None and self.hi is None:
            return f"x{'>' if self.lo_open else '>='}{num(self.lo)}"
        return f"{left}x{right}"


#: Every numeric setting (CLI flag ``--name-with-dashes`` or preset key ``name_with_underscores``) and its range.
RANGES: dict[str, Range] = {
    "budget": Range(0.0, 1.0, lo_open=True),  # kept fraction of the budget kind
    "trials": Range(1, None, integer=True),
    "timeout": Range(0.0, None, lo_open=True),  # seconds
    "seed": Range(0, 2**32 - 1, integer=True),  # numpy / Optuna samplers take seeds in [0, 2**32)
    "batch_size": Range(1, 4096, integer=True),
    "heldout_fraction": Range(0.0, 1.0, hi_open=True),
    "tolerance": Range(0.0, None),  # gsearch: allowed 1 - cos
    "step": Range(0.001, 0.5),  # gsearch: keep-ratio grid step
    "limit": Range(1, None, integer=True),  # evaluate: first N samples
    "repeats": Range(1, 1000, integer=True),  # timing repeats
    "max_new_tokens": Range(1, 4096, integer=True),
    "port": Range(1, 65535, integer=True),
}

#: Preset keys and their TOML types.
KNOWN: dict[str, type | tuple[type, ...]] = {
    "model": str, "calibration": str, "budget": (int, float), "budget_kind": str, "method": str,
    "sampler": str, "trials": int, "timeout": (int, float), "seed": int, "storage": str, "study": str,
    "out": str, "tracking_uri": str, "heldout_fraction": (int, float), "batch_size": int,
    "scorer": str, "rope": bool, "tolerance": (int, float), "step": (int, float), "experiment": str,
    "device": str, "dtype": str,
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_range(name: str, value: Any, where: str | None = None) -> Any:
    """Return ``value`` when it lies in ``RANGES[name]`` (or is None), else raise one ConfigError line.

    ``where`` names the source for preset values (``config file studies/x.toml: trials=0 ...``); the default
    names the CLI flag (``--trials 0 ...``).
    """
    rng = RANGES.get(name)
    if value is None or rng is None or rng.contains(value):
        return value
    shown = f"{where}: {name}={value!r}" if where else f"{flag(name)} {value}"
    kind = "a whole number " if rng.integer else ""
    raise ConfigError(f"{shown} is out of range: it must be {kind}{rng.text()}")


def load_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {p} is a directory: pass the preset's TOML file, e.g. --config studies/toy.toml")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from err
    except OSError as err:
        raise ConfigError(f"config file {p} cannot be read: {err.strerror or err}") from err
    section = data.get("study", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {p}: [study] must be a table")
    extra = [k for k in data if k != "study"] if "study" in data else []
    unknown = sorted(set(section) - set(KNOWN)) + extra
    if unknown:
        raise ConfigError(f"config file {p} has unknown key(s) {', '.join(unknown)}: known keys are "
                          f"{', '.join(sorted(KNOWN))}")
    for k, v in section.items():
        want = KNOWN[k]
        if (isinstance(v, bool) and want is not bool) or not isinstance(v, want):
            raise ConfigError(f"config file {p}: {k}={v!r} has the wrong type")
        check_range(k, v, where=f"config file {p}")
    return dict(section)
