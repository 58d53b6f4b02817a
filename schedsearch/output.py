"""Where results are written: checked before the work starts, rescued when the write still fails at the end.

Lifecycle (``schedsearch optimize``, the toy generator)::

    out = prepare_output(path)                # before loading a model: a probe folder created and removed
                                              # where the file will go; a bad path is one OutputError line
    ... the search (minutes to hours) ...
    written, problem = save_schedule(sched, out, rescue=rescue_dir(storage))
    if problem: ...finish logging, then raise OutputError(problem)

``prepare_output`` refuses an existing directory given as a file, a path under a regular file and a folder
that cannot be created or written, naming the cause (``Permission denied``, ``Read-only file system``, ...).
A write can still fail later (disk full, the folder removed meanwhile): ``save_schedule`` then saves the
schedule in the rescue folder next to the study storage (``<sqlite folder>/rescued/``, else
``.schedsearch/rescued/``, else the system temp folder) and returns a one-line problem saying where it is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from schedsearch.errors import SchedsearchError


class OutputError(SchedsearchError):
    """An output path that cannot be written (checked before the work), or a write that failed after it."""


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def prepare_output(path: str | os.PathLike, *, flag: str = "--out", folder: bool = False) -> Path:
    """Check that ``path`` (a file; with ``folder=True`` a folder to write files into) can be written.

    Nothing is created: the deepest existing folder on the way must be a folder we can create entries in
    (missing folders are made when the file is written). Raises :class:`OutputError` naming the path, the
    cause and the fix.
    """
    p = Path(path)
    target_dir = p if folder else p.parent
    if not folder and p.is_dir():
        raise OutputError(f"{flag} {p} is a directory: give a file name, e.g. {p / 'schedule.json'}")
    if folder and p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {p} is a file, not a folder: give a folder (it is created if missing)")
    existing = next(d for d in [target_dir.absolute(), *target_dir.absolute().parents] if d.exists())
    if not existing.is_dir():
        raise OutputError(f"{flag} {p} cannot be written: {existing} is a file, not a folder; choose another path")
    try:  # can we create entries there? (a folder, removed at once: nothing is left behind if the work fails)
        os.rmdir(tempfile.mkdtemp(prefix=".schedsearch-probe-", dir=existing))
    except OSError as err:
        raise OutputError(f"{flag} {p} cannot be written ({_reason(err)}): choose a writable path") from None
    return p


def rescue_dir(storage: str | None) -> Path:
    """The folder a result goes to when its own path fails at the end: next to the sqlite study file if any."""
    if storage and storage.startswith("sqlite:///") and storage[len("sqlite:///"):] not in ("", ":memory:"):
        return Path(storage[len("sqlite:///"):]).parent / "rescued"
    return Path(".schedsearch") / "rescued"


def save_schedule(sched: Any, out: Path, *, rescue: Path) -> tuple[Path, str | None]:
    """Write ``sched`` to ``out`` atomically; when that fails, to ``rescue`` (or the temp folder).

    Returns ``(path written, None)``, or ``(rescue path, one-line problem)``; raises OutputError only when
    no copy could be written anywhere.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sched.save(out)
        return out, None
    except OSError as err:
        first = f"could not write {out} ({_reason(err)})"
    for folder in (rescue, Path(tempfile.gettempdir()) / "schedsearch-rescued"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / out.name
            if target.exists():  # never overwrite an earlier rescue
                fd, name = tempfile.mkstemp(prefix=f"{out.stem}-", suffix=".json", dir=folder)
                os.close(fd)
                target = Path(name)
            sched.save(target)
        except OSError:
            continue
        return target, f"{first}; the schedule was saved to {target} instead: copy it from there"
    raise OutputError(f"{first}, nor in {rescue} or the temp folder; the trials are kept in the study: "
                      "free space and rerun the same command with --resume --trials 1")
