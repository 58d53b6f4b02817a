"""Property: whatever a numeric flag is given, the CLI answers with the project's own one-line error and exit 2
(never a traceback, never a run that goes ahead with an out-of-range value).

Each example runs the real entry point in-process (``schedsearch.cli.main``) with one numeric flag set to a
generated value and a missing input file, so a value in range reaches the file check and stops there, before any
model is loaded.
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from schedsearch.cli import main  # noqa: E402
from schedsearch.config import RANGES  # noqa: E402

#: (command line before the flag, flag, its RANGES key); every numeric flag of every command
FLAGS = [
    (["optimize", "--calibration", "missing.jsonl", "--budget", "0.2"], "--trials", "trials"),
    (["optimize", "--calibration", "missing.jsonl", "--budget", "0.2"], "--timeout", "timeout"),
    (["optimize", "--calibration", "missing.jsonl", "--budget", "0.2"], "--seed", "seed"),
    (["optimize", "--calibration", "missing.jsonl", "--budget", "0.2"], "--batch-size", "batch_size"),
    (["optimize", "--calibration", "missing.jsonl", "--budget", "0.2"], "--heldout-fraction", "heldout_fraction"),
    (["optimize", "--calibration", "missing.jsonl", "--budget", "0.2"], "--tolerance", "tolerance"),
    (["optimize", "--calibration", "missing.jsonl"], "--budget", "budget"),
    (["evaluate", "missing.json", "--data", "missing.jsonl"], "--batch-size", "batch_size"),
    (["evaluate", "missing.json", "--data", "missing.jsonl"], "--limit", "limit"),
    (["evaluate", "missing.json", "--data", "missing.jsonl"], "--repeats", "repeats"),
    (["evaluate", "missing.json", "--data", "missing.jsonl"], "--max-new-tokens", "max_new_tokens"),
    (["baseline", "uniform", "--calibration", "missing.jsonl"], "--budget", "budget"),
    (["ui", "--tracking-uri", "bogus://nowhere", "--no-open"], "--port", "port"),  # in range: the store fails
]

values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "0", "-0", "1e309", "nan", "-inf", "0x10", "1_000", "１", "0.2,0.3", "--", "-1"]),
    st.text(max_size=12),
)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(FLAGS), value=values)
def test_numeric_flags_give_one_project_error_line(case, value, tmp_path_factory):
    head, flag, key = case
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.chdir(tmp_path_factory.getbasetemp()):
        rc = main([*head, f"{flag}={value}"])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert rc == 2, (flag, value, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith("error: "), (flag, value, lines)
    x = _number(value)
    if x is not None and math.isfinite(x) and "," not in value and not RANGES[key].contains(
            int(x) if RANGES[key].integer and x.is_integer() else x):
        assert flag in lines[0] or "Invalid value" in lines[0], (flag, value, lines)
