"""``schedsearch validate``: summaries, one-line errors (never a traceback), model compatibility."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from schedsearch.cli import main
from schedsearch.schedule import Schedule

PROV = {"created": "2025-01-31T12:00:00Z", "schedsearch_version": "0.1.0", "packages": {}}


def good() -> Schedule:
    return Schedule(
        keep_ratios=[1.0, 1.0, 0.5, 0.5],
        model={"family": "toyfam", "name": "toy", "num_layers": 4, "fingerprint": "f00d"},
        budget={"kind": "flops", "requested": 0.6, "achieved": 0.59},
        method={"name": "fastv", "params": {"k": 2}},
        provenance=PROV,
    )


def bad_texts() -> dict[str, str]:
    base = json.loads(good().to_json())

    def variant(**over) -> str:
        d = json.loads(json.dumps(base))
        for key, value in over.items():
            section, _, field = key.partition("__")
            if field:
                d[section][field] = value
            else:
                d[section] = value
        return json.dumps(d)

    return {
        "malformed": '{"keep_ratios": [1.0, 0.5,,]}',
        "major": variant(schema_version="2.0"),
        "increasing": variant(keep_ratios=[1.0, 0.5, 0.6, 0.5]),
        "above_one": variant(keep_ratios=[1.2, 1.0, 0.5, 0.5]),
        "budget_zero": variant(budget__requested=0),
        "budget_negative": variant(budget__requested=-0.5),
        "budget_above_one": variant(budget__requested=1.5),
        "not_object": "[1.0, 0.5]",
    }


EXPECTED = {
    "malformed": "is not valid JSON",
    "major": "reads schema 1.x",
    "increasing": "keep_ratios[2]=0.6 is larger than keep_ratios[1]=0.5",
    "above_one": "keep_ratios[0]=1.2 is outside [0, 1]",
    "budget_zero": "budget.requested=0.0 is outside (0, 1]",
    "budget_negative": "budget.requested=-0.5 is outside (0, 1]",
    "budget_above_one": "budget.requested=1.5 is outside (0, 1]",
    "not_object": "must hold a JSON object",
}


def assert_one_error_line(err: str, expected: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err


def test_valid_file_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.json"
    good().save(path)
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "4 decoder layers" in out and "0-1: 1; 2-3: 0.5" in out
    assert "flops budget 0.6 (achieved 0.59)" in out and "last_token_attention" in out
    assert "method fastv" in out and "model toy" in out


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_file_in_process(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{case}.json"
    path.write_text(bad_texts()[case], encoding="utf-8")
    assert main(["validate", str(path)]) != 0
    out, err = capsys.readouterr()
    assert_one_error_line(err, EXPECTED[case])
    assert out == ""


def test_missing_file_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.json")]) != 0
    assert_one_error_line(capsys.readouterr().err, "does not exist")


def test_newer_minor_warns_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = json.loads(good().to_json())
    d["schema_version"] = "1.4"
    d["tiling"] = {"tiles": 4}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(d))
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith("warning: ") and "tiling" in err
    assert "schema 1.4" in out


def test_bad_files_as_subprocess(tmp_path: Path) -> None:
    """The real entry point: every bad input is one ``error:`` line on stderr and no traceback."""
    cases = {**bad_texts(), "missing": None}
    for case, text in cases.items():
        path = tmp_path / f"{case}.json"
        if text is not None:
            path.write_text(text, encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "schedsearch", "validate", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0, case
        assert_one_error_line(proc.stderr, EXPECTED.get(case, "does not exist"))


# ------------------------------------------------------------------ --model
class FakeAdapter:
    family = "toyfam"

    def __init__(self, num_layers: int, fingerprint: str):
        self.num_layers = num_layers
        self._fp = fingerprint

    def fingerprint(self) -> str:
        return self._fp


@pytest.fixture
def fake_models(monkeypatch: pytest.MonkeyPatch):
    made: dict[str, FakeAdapter] = {}
    module = types.ModuleType("schedsearch.models")
    module.load_model = lambda name, **kw: made[name]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "schedsearch.models", module)
    return made


def test_model_compatible(tmp_path: Path, fake_models, capsys: pytest.CaptureFixture[str]) -> None:
    fake_models["m"] = FakeAdapter(4, "f00d")
    path = tmp_path / "s.json"
    good().save(path)
    assert main(["validate", str(path), "--model", "m"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "compatible with m" in out


def test_model_layer_mismatch(tmp_path: Path, fake_models, capsys: pytest.CaptureFixture[str]) -> None:
    fake_models["m"] = FakeAdapter(36, "f00d")
    path = tmp_path / "s.json"
    good().save(path)
    assert main(["validate", str(path), "--model", "m"]) != 0
    assert_one_error_line(capsys.readouterr().err, "schedule is for 4 decoder layers but the model has 36")


def test_model_fingerprint_mismatch(tmp_path: Path, fake_models, capsys: pytest.CaptureFixture[str]) -> None:
    fake_models["m"] = FakeAdapter(4, "beef")
    path = tmp_path / "s.json"
    good().save(path)
    assert main(["validate", str(path), "--model", "m"]) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("warning: ") and "fingerprint" in err
    assert main(["validate", str(path), "--model", "m", "--strict"]) != 0
    assert_one_error_line(capsys.readouterr().err, "fingerprint")


# ------------------------------------------------------------------ the contract module stays light
def test_schedule_module_imports_only_the_standard_library() -> None:
    source = Path(__file__).resolve().parents[1] / "schedsearch" / "schedule.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    # errors.py and scorer_specs.py are themselves standard-library only (checked below)
    allowed_own = {"schedsearch", "schedsearch.errors", "schedsearch.scorer_specs"}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "use absolute imports"
            found.add(node.module or "")
    assert found, "parsed no imports"
    for name in found:
        top = name.split(".")[0]
        assert top in sys.stdlib_module_names or name in allowed_own, f"schedule.py imports {name}"
    for own in ("errors.py", "scorer_specs.py"):
        tree = ast.parse((source.parent / own).read_text(encoding="utf-8"))
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert all(m.split(".")[0] in sys.stdlib_module_names for m in mods), (own, mods)
