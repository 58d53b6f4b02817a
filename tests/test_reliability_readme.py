"""The README's Reliability list names only tests that exist (so every promise there is checked by something)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_named_in_the_reliability_section_exists():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Reliability\n", 1)[1].split("\n## ", 1)[0]
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", section)
    assert len(refs) >= 15
    for path, name in refs:
        f = ROOT / path
        assert f.is_file(), path
        if name:
            defs = {n.name for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
                    if isinstance(n, ast.FunctionDef)}
            assert name in defs, f"{path}::{name}"
