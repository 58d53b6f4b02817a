"""Ctrl-C during a study, stopped at a point where no trial is half-written.

A ``KeyboardInterrupt`` raised while Optuna stores a trial's result (the SQLAlchemy commit in
``study.tell``) or while a callback logs it leaves that trial RUNNING forever, and in optuna 5.0
``_run_trial`` then fails with ``UnboundLocalError`` (its ``finally`` reads ``updated_state``, which
the interrupted ``tell`` never set) -- a traceback instead of the "N trials kept, use --resume" line.

So while a study runs, SIGINT is handled here:

* inside ``guard.computing()`` (the model forward passes of a trial, where nearly all the time goes)
  it raises ``KeyboardInterrupt`` at once; Optuna records the trial as FAIL and re-raises, and an
  ask/tell loop does the same through ``fail_running``;
* anywhere else it is deferred: ``study.stop()`` ends ``study.optimize`` once the current trial is
  stored and logged, and the ``KeyboardInterrupt`` is raised at the next ``checkpoint()`` or when
  the guard exits. A second Ctrl-C while one is pending raises at once.

Outside the main thread (signal handlers can only be set there) the guard does nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class SigintGuard:
    def __init__(self, study: Any = None) -> None:
        self.study = study
        self.pending = False
        self._computing = 0
        self._old: Any = None
        self._active = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self._computing or self.pending:
            raise KeyboardInterrupt
        self.pending = True
        if self.study is not None:
            try:
                self.study.stop()  # only valid inside study.optimize; ask/tell loops use checkpoint()
            except RuntimeError:
                pass

    def __enter__(self) -> SigintGuard:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
            self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._old if self._old is not None else signal.default_int_handler)
            self._active = False
        if exc_type is None and self.pending:
            raise KeyboardInterrupt

    @contextmanager
    def computing(self) -> Iterator[None]:
        """The interruptible part of a trial; a deferred Ctrl-C is raised on entry."""
        self.checkpoint()
        self._computing += 1
        try:
            yield
        finally:
            self._computing -= 1

    def checkpoint(self) -> None:
        if self.pending:
            raise KeyboardInterrupt


def fail_running(study: Any, trial: Any) -> None:
    """Ask/tell loops: mark a trial that was asked but will never be told as FAIL (not left RUNNING)."""
    import optuna

    try:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except Exception:  # noqa: BLE001 - already finished, or the storage is gone: nothing more to save
        pass
