"""Dependency rules of the package (DESIGN.md), checked on the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "schedsearch"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _files(sub: str = ""):
    return sorted((PKG / sub).rglob("*.py"))


def _top(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


def test_runtime_and_models_stay_light():
    for f in _files("runtime") + _files("models"):
        bad = _top(_imports(f)) & {"optuna", "mlflow", "typer", "optuna_integration", "botorch"}
        assert not bad, (f, bad)


def test_only_tracking_and_serving_import_mlflow():
    users = {f.relative_to(PKG).as_posix() for f in _files() if "mlflow" in _top(_imports(f))}
    assert users <= {"tracking.py", "serving.py"}, users


def test_only_cli_imports_typer():
    users = {f.relative_to(PKG).as_posix() for f in _files() if "typer" in _top(_imports(f))}
    assert all(u.startswith("cli/") for u in users), users


def test_search_never_imports_a_concrete_adapter():
    for f in _files("search"):
        mods = _imports(f)
        assert not any(m.startswith("schedsearch.models.") and m != "schedsearch.models.base" for m in mods), f


def test_schedule_contract_is_stdlib_only():
    import sys

    allowed = set(sys.stdlib_module_names) | {"schedsearch"}
    assert _top(_imports(PKG / "schedule.py")) <= allowed
