"""The schedule library: frozen schedules on disk, keyed by model fingerprint and budget, versioned.

Layout (the file system is the index; nothing else to keep consistent)::

    $SCHEDSEARCH_HOME/library/<family>-<fingerprint>/<kind>-<requested budget>/v0001.json, v0002.json ...

Default home: ``$SCHEDSEARCH_HOME``, else ``$XDG_DATA_HOME/schedsearch``, else ``~/.local/share/schedsearch``.

Concurrency: a schedule is written to a temporary file in the target folder, then linked to the next
free ``vNNNN.json`` name with ``os.link``, which fails atomically if another writer took that name
first (then the next number is tried). Readers never see a partial file and two exports at once
never overwrite each other. Entries are immutable; ``remove`` unlinks one version.

Entry ids are untrusted input (they come from the command line): :meth:`Library.path_of` is the one place
that turns an id into a path. An id must match ``<model-key>/<kind>-<budget>/vNNNN`` exactly and its file must
lie inside the library root once symlinks are resolved; anything else is a one-line :class:`LibraryError`,
so ``show``/``remove`` never read or delete outside the library. Listing goes through the same check and
reports a damaged or foreign entry (with the reason) instead of skipping it silently.

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
from schedsearch.schedule import BUDGET_KINDS, Schedule, load_schedule


class LibraryError(SchedsearchError):
    """A library operation that cannot be done (no such entry, no schedule under a budget, ...)."""


def library_home() -> Path:
    if os.environ.get("SCHEDSEARCH_HOME"):
        return Path(os.environ["SCHEDSEARCH_HOME"]).expanduser() / "library"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "schedsearch" / "library"


_MODEL_KEY = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # what _model_key writes; no leading dot, so never "." or ".."
_ENTRY_ID = re.compile(rf"({_MODEL_KEY})/((?:{'|'.join(BUDGET_KINDS)})-[0-9]\.[0-9]{{4}})/(v[0-9]{{4}})")
_ID_FORM = "<model-key>/<kind>-<budget>/vNNNN, e.g. qwen2_5_vl-0123abcd/flops-0.2000/v0001"


@dataclass(frozen=True)
class Damaged:
    """A file in the library that looks like an entry but cannot be used; ``reason`` is one line."""

    id: str
    path: Path
    reason: str


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
    return _SAFE.sub("_", f"{s.model.family}-{fp}").lstrip(".") or "_"


def _budget_key(s: Schedule) -> str:
    return f"{s.budget.kind}-{float(s.budget.requested):.4f}"


class Library:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else library_home()

    def add(self, schedule: Schedule | str | Path) -> Entry:
        """Store a schedule as a new version; returns its entry."""
        s = schedule if isinstance(schedule, Schedule) else load_schedule(schedule)
        folder = self.root / _model_key(s) / _budget_key(s)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
        except OSError as err:
            raise LibraryError(f"cannot write to the schedule library {self.root}: {err.strerror or err}; "
                               "set SCHEDSEARCH_HOME (or --home) to a writable folder") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(s.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            for _ in range(10_000):
                n = self._next_version(folder)
                if n > 9999:
                    break
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
        return rel.with_suffix("").as_posix()

    def path_of(self, entry_id: str) -> Path:
        """The file of an entry id, or a LibraryError: the only place ids become paths (ids are untrusted)."""
        if not isinstance(entry_id, str) or not _ENTRY_ID.fullmatch(entry_id):
            shown = repr(entry_id)[:120]
            raise LibraryError(f"{shown} is not a library entry id (expected {_ID_FORM}): "
                               "see `schedsearch library list`")
        path = self.root / f"{entry_id}.json"
        try:
            inside = path.resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError) as err:  # symlink loop, unreadable folder
            raise LibraryError(f"library entry {entry_id!r} cannot be resolved: {err}") from None
        if not inside:
            raise LibraryError(f"library entry {entry_id!r} points outside the library {self.root} "
                               "(a symlink); it is neither read nor removed: delete the link by hand")
        return path

    def scan(self, fingerprint: str | None = None) -> tuple[list[Entry], list[Damaged]]:
        """All entries (optionally of one model) and the damaged files among them, each with its reason."""
        good: list[Entry] = []
        bad: list[Damaged] = []
        if not self.root.is_dir():
            return good, bad
        for p in sorted(self.root.glob("*/*/v[0-9][0-9][0-9][0-9].json")):
            if fingerprint is not None and not p.parent.parent.name.endswith(f"-{fingerprint}"):
                continue
            entry_id = self._id(p)
            try:
                path = self.path_of(entry_id)
                good.append(Entry(entry_id, path, self._load(path)))
            except SchedsearchError as err:
                bad.append(Damaged(entry_id, p, str(err)))
        return good, bad

    def entries(self, fingerprint: str | None = None) -> list[Entry]:
        """The usable entries; damaged ones are left out here (see :meth:`scan`, which reports them)."""
        return self.scan(fingerprint)[0]

    @staticmethod
    def _load(path: Path) -> Schedule:
        try:
            return load_schedule(path)
        except OSError as err:  # a folder named like an entry, unreadable file
            raise LibraryError(f"cannot read {path}: {err.strerror or err}") from None

    def get(self, entry_id: str) -> Entry:
        p = self.path_of(entry_id)
        if not p.is_file():
            raise LibraryError(f"no library entry {entry_id!r} under {self.root}: see `schedsearch library list`")
        return Entry(entry_id, p, self._load(p))

    def remove(self, entry_id: str) -> Path:
        """Delete one version. The id is checked by :meth:`path_of`; a damaged entry can be removed too."""
        p = self.path_of(entry_id)
        if not p.is_file():
            raise LibraryError(f"no library entry {entry_id!r} under {self.root}: see `schedsearch library list`")
        p.unlink()
        return p

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
