"""Optuna study storage from a URL, for one user (sqlite) or many workers (PostgreSQL or another RDB).

- ``sqlite:///...`` stays a plain URL string (one machine, no heartbeat): Optuna builds its storage.
- Any other RDB URL (``postgresql://user:pw@host:port/db``) becomes an
  ``optuna.storages.RDBStorage`` with a heartbeat: each running trial records a heartbeat every
  ``SCHEDSEARCH_HEARTBEAT`` seconds (default 10); a trial whose heartbeat is older than
  ``SCHEDSEARCH_GRACE`` seconds (default 30) belongs to a dead worker and is marked FAIL by the next
  worker that starts a trial, and Optuna's retry callback (``RetryHeartbeatStaleTrialCallback``, formerly
  ``RetryFailedTrialCallback``) re-enqueues it (at most
  ``SCHEDSEARCH_MAX_RETRY`` times, default 2) so another worker re-runs the same parameters.
- ``postgresql://`` picks the installed driver: psycopg2 if present, else psycopg 3.
- A storage that cannot be reached is one line (``SchedsearchError``) naming the URL with the password hidden.

``study_lock(url, study)`` is a cross-process lock used for the few read-modify-write steps on a shared
study (claiming the MLflow parent run): ``pg_advisory_lock`` on PostgreSQL, a ``filelock`` lock file next
to a sqlite file.

Faults of the store itself (a read-only file or file system, a full disk, a user without write permission):
``probe_writable(url)`` runs a rolled-back write before any heavy work, and ``storage_error(err, url)`` turns
whatever Optuna/SQLAlchemy raise later into one StorageError line naming the database's own reason
(``attempt to write a readonly database``, ``database or disk is full``) instead of Optuna's generic
"exception during the commit ... e.g. exceeding max length". Finished trials stay in the store either way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from schedsearch.errors import SchedsearchError


class StorageError(SchedsearchError):
    """The study storage cannot be opened or reached."""


@dataclass(frozen=True)
class HeartbeatSettings:
    heartbeat_s: int = 10
    grace_s: int = 30
    max_retry: int = 2

    @classmethod
    def from_env(cls) -> HeartbeatSettings:
        def get(name: str, default: int, lo: int) -> int:
            raw = os.environ.get(name)
            if raw in (None, ""):
                return default
            try:
                v = int(raw)
            except ValueError:
                raise StorageError(f"{name}={raw!r} is not a whole number of seconds/retries") from None
            if v < lo:
                raise StorageError(f"{name}={v} must be >= {lo}")
            return v

        hb = get("SCHEDSEARCH_HEARTBEAT", cls.heartbeat_s, 1)
        grace = get("SCHEDSEARCH_GRACE", max(cls.grace_s, 2 * hb), 1)
        if grace <= hb:
            raise StorageError(f"SCHEDSEARCH_GRACE={grace} must be larger than SCHEDSEARCH_HEARTBEAT={hb}")
        return cls(hb, grace, get("SCHEDSEARCH_MAX_RETRY", cls.max_retry, 0))


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: hide everything between ':' and '@' of the netloc
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            cred, host = rest.rsplit("@", 1)
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
        return url


def is_shared(url: str | None) -> bool:
    """True for a storage that several machines can share (any RDB except sqlite)."""
    return bool(url) and not str(url).startswith("sqlite") and "://" in str(url)


def driver_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed (SQLAlchemy's default is psycopg2)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                try:
                    import psycopg  # noqa: F401
                except ImportError:
                    raise StorageError(
                        f"{redact(url)} needs a PostgreSQL driver: pip install \"psycopg[binary]\" "
                        "(or psycopg2-binary)") from None
                return "postgresql+psycopg://" + url[len(plain):]
            return "postgresql://" + url[len(plain):]
    return url


def _one_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_storage_fault(err: BaseException) -> bool:
    names = {f"{type(e).__module__}.{type(e).__name__}" for e in _chain(err)}
    return any(n.startswith(("sqlalchemy.", "sqlite3.", "psycopg")) or n.endswith("StorageInternalError")
               for n in names)


def storage_error(err: BaseException, url: str | None) -> StorageError | None:
    """One line for a fault of the study store (None when ``err`` did not come from the store).

    The message is the database's own reason (the deepest DB-API error in the chain), then what to do.
    """
    if not url or not _is_storage_fault(err):
        return None
    reason = None
    for e in _chain(err):
        orig = getattr(e, "orig", None)
        if orig is not None:
            reason = _one_line(orig)
        elif type(e).__module__.startswith(("sqlite3", "psycopg")) or isinstance(e, OSError):
            reason = _one_line(e)
    reason = reason or _one_line(err)
    low = reason.lower()
    if "readonly" in low or "read-only" in low or "permission denied" in low:
        fix = "make it writable or pass --storage with a writable database"
    elif "full" in low or "no space" in low:
        fix = "free space on its disk"
    else:
        fix = "check the database"
    return StorageError(f"study storage {redact(url)} failed: {reason}: {fix}; finished trials are kept there, "
                        "continue with the same command plus --resume")


def probe_writable(url: str) -> None:
    """A write the store must accept (Optuna's ``version_info`` row set to itself), rolled back at once.

    Run before any heavy work: a read-only file or file system, or a role without write permission, is one
    StorageError line with the database's reason. (A full disk can only show when real data is written.)
    """
    import sqlalchemy

    make_storage(url)  # creates the schema of a new database (and is where an unreachable server is reported)
    try:
        engine = sqlalchemy.create_engine(driver_url(url), poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                trans = conn.begin()
                try:
                    conn.execute(sqlalchemy.text("UPDATE version_info SET schema_version = schema_version"))
                finally:
                    trans.rollback()
        finally:
            engine.dispose()
    except Exception as err:  # noqa: BLE001 - any failure of the store becomes one line
        raise StorageError(f"study storage {redact(url)} cannot be written: {_one_line(err)}: make it writable "
                           "or pass --storage with a writable database") from None


_CACHE: dict[tuple, Any] = {}
_SCHEMA_READY: set[str] = set()  # absolute sqlite URLs whose Optuna tables this process has made sure of


def absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel/path.db`` -> ``sqlite:////abs/path.db``, resolved against the working directory now.

    Per-process caches keyed by a relative URL would keep pointing at the directory they were first filled in
    (a library user or a test that changes directory); keys and stores are therefore made absolute."""
    if not str(uri).startswith("sqlite:///"):
        return uri
    from pathlib import Path

    path = uri[len("sqlite:///"):]
    if path in ("", ":memory:") or path.startswith("/"):
        return uri
    return f"sqlite:///{Path(path).resolve()}"


def make_storage(url: str, hb: HeartbeatSettings | None = None) -> Any:
    """The storage ``optuna.create_study`` / ``load_study`` get for ``url`` (see the module docstring)."""
    if not is_shared(url):
        if url and str(url).startswith("sqlite:///") and absolute_sqlite(url) not in _SCHEMA_READY:
            # Optuna gets the URL itself (no heartbeats on a one-machine file), but its tables are created here,
            # under the file lock and with the retry below, so processes starting together do not race on them
            import optuna

            _open_retrying(url, lambda: _open_rdb(optuna, url, None, None)).engine.dispose()
            _SCHEMA_READY.add(absolute_sqlite(url))
        return url
    import optuna

    hb = hb or HeartbeatSettings.from_env()
    key = (url, hb)
    if key not in _CACHE:
        # Optuna 4.9+ names the retry callback RetryHeartbeatStaleTrialCallback (the old RetryFailedTrialCallback
        # is a deprecated alias); both mark a retry with system attrs "failed_trial" / "retry_history".
        retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        _CACHE[key] = _open_retrying(url, lambda: _open_rdb(optuna, url, hb, retry_cls))
    return _CACHE[key]


def _open_retrying(url: str, open_fn: Any) -> Any:
    """``open_fn()``, retried when the schema was being created by a process outside our lock at that moment
    (optuna-dashboard, a script calling ``optuna.load_study``): its rows are there on the next try. Any other
    failure, or a third race, is one StorageError line."""
    for attempt in range(3):
        try:
            return open_fn()
        except SchedsearchError:
            raise
        except Exception as err:  # noqa: BLE001 - connection refused, bad credentials, unknown database...
            if attempt < 2 and _is_schema_race(err):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StorageError(f"cannot open study storage {redact(url)}: {_one_line(err)}") from None
    raise AssertionError("unreachable")


def _is_schema_race(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return any(s in text for s in ("IntegrityError", "UniqueViolation", "already exists", "UNIQUE constraint"))


def _open_rdb(optuna: Any, url: str, hb: HeartbeatSettings | None, retry_cls: Any) -> Any:
    """Optuna's RDBStorage for ``url`` (with heartbeats unless ``hb`` is None)."""
    import warnings

    # RDBStorage creates Optuna's tables on first use; workers starting together on a fresh database
    # would race on CREATE TABLE (duplicate pg_type rows), so schema creation is serialised by a lock
    with study_lock(url, "<optuna schema>"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if hb is None:
            return optuna.storages.RDBStorage(url)
        if retry_cls is not None:
            return optuna.storages.RDBStorage(
                driver_url(url), engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=hb.heartbeat_s, grace_period=hb.grace_s,
                heartbeat_stale_trial_callback=retry_cls(max_retry=hb.max_retry))
        return optuna.storages.RDBStorage(  # Optuna < 4.9
            driver_url(url), engine_kwargs={"pool_pre_ping": True},
            heartbeat_interval=hb.heartbeat_s, grace_period=hb.grace_s,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=hb.max_retry))


@contextlib.contextmanager
def study_lock(url: str, study: str) -> Iterator[None]:
    """Hold a cross-process lock named after ``study`` for a read-modify-write on the shared study."""
    if url.startswith("sqlite:///"):
        from filelock import FileLock  # portable OS file lock (flock / LockFileEx), released if the process dies

        path = url[len("sqlite:///"):]
        if not path or path == ":memory:":
            yield
            return
        lock = FileLock(f"{path}.{hashlib.sha1(study.encode()).hexdigest()[:12]}.lock")
        try:
            lock.acquire()
        except OSError as err:
            if err.errno != errno.EROFS:
                raise StorageError(f"cannot create the study lock {lock.lock_file}: {err.strerror}") from None
            yield  # a read-only file system: nobody can write the database, the write itself says why
            return
        try:
            yield
        finally:
            lock.release()
        return
    if not url.startswith(("postgresql", "postgres://")):
        yield  # other RDBs: the caller's set-then-re-read still resolves the race
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha1(f"schedsearch:{study}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(driver_url(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()
