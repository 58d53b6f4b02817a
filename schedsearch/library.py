"""The schedule library: frozen schedules on disk, keyed by model fingerprint and budget, versioned.

Layout (the file system is the index; nothing else to keep consistent)::

    $SCHEDSEARCH_HOME/library/<family>-<fingerprint>/<kind>-<requested budget>/v0001.json, v0002.json ...

Default home: ``$SCHEDSEARCH_HOME``, else ``$XDG_DATA_HOME/schedsearch``, else ``~/.local/share/schedsearch``.

Concurrency: a schedule is written to a temporary file in the target folder, then linked to the next
free ``vNNNN.json`` name with ``os.link``, which fails atomically if another writer took that name
first (then the next number is tried). Readers never see a partial file and two exports at once
never overwrite each other. Entries are immutable; ``remove`` unlinks one version.

Resolution (``resolve(fingerprint, budget)``): among entries for the model whose achieved budget (of
the requested kind) is <= the budget, the one with the largest achieved value wins (the most compute
the budget allows, hence the least pruning); ties go to the lower objective value, then the newest.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from schedsearch.errors import SchedsearchError
from schedsearch.schedule import Schedule, load_schedule


class LibraryError(SchedsearchError):
    """A library operation that cannot be done (no such entry, no schedule under a budget, ...)."""


def library_home() -> Path:
    if os.environ.get("SCHEDSEARCH_HOME"):
        return Path(os.environ["SCHEDSEARCH_HOME"]).expanduser() / "library"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "schedsearch" / "library"


@dataclass(frozen=True)
class Entry:
    id: str  # "<family>-<fingerprint>/<kind>-<budget>/vNNNN"
    path: Path
    schedule: Schedule

    @property
    def version(self) -> int:
        return int(self.path.stem[1:])


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _model_key(s: Schedule) -> str:
    fp = s.model.fingerprint or "nofingerprint"
    return _SAFE.sub("_", f"{s.model.family}-{fp}")


def _budget_key(s: Schedule) -> str:
    return f"{s.budget.kind}-{float(s.budget.requested):.4f}"


class Library:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else library_home()

    def add(self, schedule: Schedule | str | Path) -> Entry:
        """Store a schedule as a new version; returns its entry."""
        s = schedule if isinstance(schedule, Schedule) else load_schedule(schedule)
        folder = self.root / _model_key(s) / _budget_key(s)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(s.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            for _ in range(10_000):
                n = self._next_version(folder)
                target = folder / f"v{n:04d}.json"
                try:
                    os.link(tmp, target)  # atomic, fails if the name exists
                except FileExistsError:
                    continue
                return Entry(self._id(target), target, s)
            raise LibraryError(f"could not allocate a version in {folder}")
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _next_version(self, folder: Path) -> int:
        nums = [int(p.stem[1:]) for p in folder.glob("v[0-9][0-9][0-9][0-9].json")]
        return max(nums, default=0) + 1

    def _id(self, path: Path) -> str:
        rel = path.relative_to(self.root)
        return str(rel.with_suffix(""))

    def entries(self, fingerprint: str | None = None) -> list[Entry]:
        out = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.glob("*/*/v[0-9][0-9][0-9][0-9].json")):
            if fingerprint is not None and not p.parent.parent.name.endswith(f"-{fingerprint}"):
                continue
            try:
                out.append(Entry(self._id(p), p, load_schedule(p)))
            except SchedsearchError:
                continue  # a foreign or damaged file is skipped, never fatal for the whole library
        return out

    def get(self, entry_id: str) -> Entry:
        p = self.root / f"{entry_id}.json"
        if not p.is_file():
            raise LibraryError(f"no library entry {entry_id!r} under {self.root}: see `schedsearch library list`")
        return Entry(entry_id, p, load_schedule(p))

    def remove(self, entry_id: str) -> Path:
        e = self.get(entry_id)
        e.path.unlink()
        return e.path

    def resolve(self, fingerprint: str, budget: float, kind: str = "flops") -> Entry:
        if not (0.0 < float(budget) <= 1.0):
            raise LibraryError(f"budget {budget} is outside (0, 1]")
        cands = []
        for e in self.entries(fingerprint):
            b = e.schedule.budget
            achieved = {"flops": b.flops_ratio, "kv": b.kv_ratio, "tokens": b.token_ratio}.get(kind)
            if achieved is None and b.kind == kind:
                achieved = b.achieved if b.achieved is not None else b.requested
            if achieved is None or achieved > budget + 1e-12:
                continue
            obj = e.schedule.objective.value if e.schedule.objective is not None else float("inf")
            cands.append((achieved, -(obj if obj is not None else float("inf")), e.version, e))
        if not cands:
            have = sorted({_budget_key(e.schedule) for e in self.entries(fingerprint)})
            raise LibraryError(
                f"no stored schedule for this model (fingerprint {fingerprint}) at or under {kind} budget {budget}"
                + (f"; stored: {', '.join(have)}" if have else "; the library has none for it")
                + ": run `schedsearch optimize` and `schedsearch export SCHEDULE --to library`"
            )
        return max(cands, key=lambda c: c[:3])[3]
