"""schedsearch: find, freeze and apply visual-token pruning schedules for VLMs.

Public API (imported lazily so ``import schedsearch`` and ``schedsearch --help`` stay fast)::

    from schedsearch import Schedule, load_schedule, apply_schedule, load_model
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Schedule": "schedsearch.schedule:Schedule",
    "load_schedule": "schedsearch.schedule:load_schedule",
    "SchedsearchError": "schedsearch.errors:SchedsearchError",
    "apply_schedule": "schedsearch.runtime:apply_schedule",
    "load_model": "schedsearch.models:load_model",
}

__all__ = ["__version__", "Schedule", "load_schedule", "SchedsearchError", "apply_schedule", "load_model"]

if TYPE_CHECKING:  # pragma: no cover
    from schedsearch.errors import SchedsearchError
    from schedsearch.models import load_model
    from schedsearch.runtime import apply_schedule
    from schedsearch.schedule import Schedule, load_schedule


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'schedsearch' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
