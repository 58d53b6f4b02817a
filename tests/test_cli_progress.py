"""optimize's progress display and the CLI conventions every command shares (--version, choices, defaults)."""

from __future__ import annotations

import datetime
import io
from types import SimpleNamespace

import pytest

from schedsearch.cli import main
from schedsearch.cli.progress import StudyProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _study(best):
    return SimpleNamespace(directions=[0], best_value=best)


def _trial(value):
    now = datetime.datetime.now()
    return SimpleNamespace(values=[value], state=SimpleNamespace(name="COMPLETE"),
                           datetime_start=now - datetime.timedelta(seconds=0.5), datetime_complete=now)


def test_log_file_gets_one_complete_line_per_trial_and_no_carriage_returns():
    out = io.StringIO()
    with StudyProgress(5, metric="1-cos", stream=out) as progress:
        for i, v in enumerate([0.3, 0.1, 0.2]):  # stopped after 3 of 5, e.g. by --timeout
            progress(_study(min([0.3, 0.1, 0.2][: i + 1])), _trial(v))
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 3 and lines[1].startswith("trial 2/5 1-cos 0.10000 best 0.10000")
    assert "trials/s" in lines[2] and "ETA" in lines[2]


def test_terminal_bar_shows_rate_eta_best_and_ends_its_line_when_stopped_early():
    out = _Tty()
    with StudyProgress(10, metric="1-cos", stream=out) as progress:
        progress(_study(0.25), _trial(0.25))
        progress(_study(0.125), _trial(0.125))
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # without colours and cursor codes
    assert "2/10" in text and "best 1-cos 0.12500" in text and "ETA" in text and "trials/s" in text
    assert text.endswith("\n")  # the bar's line is closed although only 2 of 10 trials ran


def test_version_and_choices(capsys, monkeypatch):
    from schedsearch import __version__

    monkeypatch.setenv("COLUMNS", "300")  # one help line per option, so the choice lists are not wrapped
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"schedsearch {__version__}"
    assert main(["optimize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    from schedsearch.schedule import BUDGET_KINDS
    from schedsearch.search.methods import METHODS
    from schedsearch.search.optimize import SAMPLERS

    for names in (SAMPLERS, (*METHODS, "gsearch"), BUDGET_KINDS, ("auto", "bfloat16", "float16", "float32")):
        assert "|".join(names) in text.replace(" ", ""), names  # listed from the package's own registries
    assert "--device" in text and "[default: (40;" in text and "[x>=1]" in text


@pytest.mark.parametrize("command", ["optimize", "evaluate", "baseline"])
def test_device_and_dtype_on_every_model_command(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--device" in text and "--dtype" in text and "[default: auto]" in text
