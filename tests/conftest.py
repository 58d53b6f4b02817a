"""Shared fixtures: tiny random-init checkpoints of the supported VLM families.

- ``tiny_dir(family)``: a factory fixture (session scope) returning the directory of a tiny checkpoint of
  ``family`` ("qwen2_5_vl", "qwen2_vl", "llava", "llava_next"), built once per session with
  :func:`schedsearch.testing.tiny.make_tiny` (real transformers classes, saved with save_pretrained).
- ``tiny_adapter``: parametrised over the first four families; the adapter from ``load_model(tiny_dir(family))``,
  i.e. the same loading path as a real checkpoint. Session-scoped and shared: do not modify its weights.
- ``family_adapter``: the same over every family of ``ALL_FAMILIES`` (tests/test_runtime.py, test_families.py).
"""

from __future__ import annotations

import pytest
import torch

from schedsearch.testing.tiny import ALL_FAMILIES, FAMILIES, make_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            built[family] = make_tiny(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return get


_ADAPTERS: dict[str, object] = {}


def _adapter(family: str, tiny_dir):
    from schedsearch.models import load_model

    if family not in _ADAPTERS:
        _ADAPTERS[family] = load_model(tiny_dir(family))
    return _ADAPTERS[family]


@pytest.fixture(scope="session", params=list(FAMILIES))
def tiny_adapter(request, tiny_dir):
    return _adapter(request.param, tiny_dir)


@pytest.fixture(scope="session", params=list(ALL_FAMILIES))
def family_adapter(request, tiny_dir):
    """Like ``tiny_adapter``, over every supported family (the runtime invariants run on all of them)."""
    return _adapter(request.param, tiny_dir)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server on 127.0.0.1 (see tests/pg.py), stopped by pg_ctl at the end of the session."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("schedsearch_tests_pg", Path(__file__).with_name("pg.py"))
    pg = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pg)
    find_pg_bin, start_postgres = pg.find_pg_bin, pg.start_postgres
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    srv = start_postgres(tmp_path_factory.mktemp("pg"))
    yield srv
    srv.stop()


@pytest.fixture
def tmpfs(tmp_path):
    """``make(name, size_kb)``: a real tmpfs of that size mounted under tmp_path (skips where mounting is denied);
    ``fill_disk(folder)`` then writes into it until ENOSPC. For faults of real file systems (full, read-only)."""
    import subprocess

    mounted = []

    def make(name: str, size_kb: int):
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(d)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True, check=False)


@pytest.fixture
def fill_disk():
    return _fill


def _fill(folder) -> None:
    """Write into ``folder`` until its file system is full (ENOSPC)."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.fixture
def manifest(tmp_path):
    """A calibration manifest of 4 tiny images (seed 2) in ``tmp_path/calib``; returns the manifest path."""
    import json

    from schedsearch.testing.tiny import tiny_images

    d = tmp_path / "calib"
    d.mkdir()
    lines = []
    for i, im in enumerate(tiny_images(4, seed=2)):
        im.save(d / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": f"what is {i}?"}))
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return d / "manifest.jsonl"
