"""The schedule file's structural check against ``schedule.schema.json`` (jsonschema, Draft 2020-12).

:func:`schedsearch.schedule.Schedule.from_dict` calls :func:`check_structure` after its own semantic checks (which
keep their specific messages: non-increasing ratios, layer counts, ...), so the published schema and the loader
can never disagree about a file that loads. Files of a newer minor version are not checked here: their schema may
have grown, and the loader already warns about what it does not know. jsonschema is imported on first use (it is a
core dependency); schedule.py itself stays standard-library only.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from schedsearch.errors import ScheduleError

SCHEMA_PATH = Path(__file__).with_name("schedule.schema.json")


@lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _is_json(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def check_structure(data: Any, file_minor: int, our_minor: int, schedule: Any = None) -> None:
    """Raise one ScheduleError line naming the first schema violation (path and reason) of ``data``.

    ``data`` is checked as given when it is a JSON document (a file); built in code from objects (e.g. a
    ``Provenance``), its serialised form ``schedule.to_dict()`` is checked instead.
    """
    if file_minor > our_minor:
        return
    from jsonschema.exceptions import best_match

    if not _is_json(data) and schedule is not None:
        data = schedule.to_dict()
    error = best_match(_validator().iter_errors(data))
    if error is None:
        return
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    raise ScheduleError(f"{where} does not match schedule.schema.json: {error.message}")
