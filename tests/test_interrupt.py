"""Ctrl-C during a study: never a half-written trial, never optuna's UnboundLocalError (search/interrupt.py)."""

from __future__ import annotations

import os
import signal
from contextlib import nullcontext

import optuna
import pytest

from schedsearch.search.interrupt import SigintGuard, fail_running

State = optuna.trial.TrialState


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode of the main thread


class _InterruptOnTell(optuna.storages.InMemoryStorage):
    """Ctrl-C arrives while trial ``at`` is being stored: the instant CI hit (storage commit in study.tell)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def set_trial_state_values(self, trial_id, state, values=None):  # noqa: ANN001 - optuna's signature
        if state == State.COMPLETE and self.get_trial(trial_id).number == self.at:
            _sigint()
        return super().set_trial_state_values(trial_id, state, values)


def _study(storage=None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))


def test_ctrl_c_while_a_trial_is_stored_finishes_storing_it_then_stops():
    study = _study(_InterruptOnTell(at=2))
    guard = SigintGuard(study)
    logged = []

    def objective(trial):
        with guard.computing():
            return trial.suggest_float("x", 0, 1)

    with pytest.raises(KeyboardInterrupt):
        with guard:
            study.optimize(objective, n_trials=50, callbacks=[lambda s, t: logged.append(t.number)])
    states = [t.state for t in study.trials]
    assert states == [State.COMPLETE] * 3  # trial 2 stored, no trial 3 started, none left RUNNING
    assert logged == [0, 1, 2]  # the callback (MLflow child run) of the interrupted trial still ran
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_ctrl_c_while_computing_stops_at_once_and_marks_the_trial_failed():
    study = _study()
    guard = SigintGuard(study)
    after = []

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        with guard.computing():
            if trial.number == 1:
                _sigint()
                after.append("not interrupted")  # the handler must raise before this line
            return x

    with pytest.raises(KeyboardInterrupt):
        with guard:
            study.optimize(objective, n_trials=50)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.FAIL]
    assert after == []


def test_second_ctrl_c_while_one_is_pending_raises_at_once():
    guard = SigintGuard()
    with pytest.raises(KeyboardInterrupt):
        with guard:
            _sigint()
            assert guard.pending
            _sigint()
            pytest.fail("the second Ctrl-C did not raise")


def test_ask_tell_loop_checkpoint_and_fail_running():
    study = _study()
    guard = SigintGuard()
    with pytest.raises(KeyboardInterrupt):
        with guard:
            for i in range(10):
                guard.checkpoint()
                trial = study.ask()
                try:
                    if i == 1:
                        _sigint()  # outside computing(): deferred to the next checkpoint
                    with guard.computing() if i != 1 else nullcontext():
                        value = trial.suggest_float("x", 0, 1)
                except BaseException:
                    fail_running(study, trial)
                    raise
                study.tell(trial, value)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.COMPLETE]


def test_gsearch_interrupted_mid_trial_leaves_no_running_trial(monkeypatch):
    """run_gsearch's ask/tell loop: a Ctrl-C inside a forward pass marks that trial FAIL."""
    from types import SimpleNamespace

    from schedsearch.search import driver

    study = _study()
    calls = []

    class _Obj:
        adapter = SimpleNamespace(num_layers=4)

        def budget_fn(self, kind):
            return lambda ratios: sum(ratios) / len(ratios)

        def score(self, sched):
            calls.append(sched)
            if len(calls) == 3:
                _sigint()
            return 0.1

    monkeypatch.setattr(driver, "budget_dict", lambda obj, ratios, settings: dict(
        flops_ratio=0.5, kv_ratio=0.5, token_ratio=0.5, achieved=0.5))
    monkeypatch.setattr("schedsearch.search.optimize._context",
                        lambda obj, settings: SimpleNamespace(scorer={"name": "uniform"}))
    settings = driver.StudySettings(budget=0.5, trials=10)
    with pytest.raises(KeyboardInterrupt):
        driver.run_gsearch(settings, _Obj(), {"step": 0.25}, [], study)
    states = [t.state for t in study.trials]
    assert State.RUNNING not in states
    assert states[-1] == State.FAIL and states.count(State.COMPLETE) == 2
