"""Study presets: TOML files under studies/ whose keys mirror ``schedsearch optimize`` flags.

Flags given on the command line win over the file. Unknown keys are an error that names the key
and the known ones (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from schedsearch.errors import SchedsearchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(SchedsearchError):
    """A study config file that cannot be used."""


KNOWN: dict[str, type | tuple[type, ...]] = {
    "model": str, "calibration": str, "budget": (int, float), "budget_kind": str, "method": str,
    "sampler": str, "trials": int, "timeout": (int, float), "seed": int, "storage": str, "study": str,
    "out": str, "tracking_uri": str, "heldout_fraction": (int, float), "batch_size": int,
    "scorer": str, "rope": bool, "tolerance": (int, float), "step": (int, float), "experiment": str,
}


def load_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from err
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
        if isinstance(v, bool) and want is not bool:
            raise ConfigError(f"config file {p}: {k}={v!r} has the wrong type")
        if not isinstance(v, want):
            raise ConfigError(f"config file {p}: {k}={v!r} has the wrong type")
    return dict(section)
