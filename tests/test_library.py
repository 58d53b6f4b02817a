"""Schedule library: export -> list -> resolve by budget -> apply; concurrent exports; one-line errors."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from schedsearch.library import Library, LibraryError
from schedsearch.runtime import apply_schedule
from schedsearch.schedule import SCHEMA_VERSION
from schedsearch.testing.tiny import schedule_for, tiny_images


def _sched(ad, keep: float, requested: float, achieved: float, objective: float | None = None):
    n = ad.num_layers
    s = schedule_for(ad, [1.0] + [keep] * (n - 1), scorer="uniform", params={}, requested=requested)
    budget = {"kind": "flops", "requested": requested, "achieved": achieved, "flops_ratio": achieved}
    obj = None if objective is None else {"name": "1-cos", "value": objective}
    return s.replace(budget=budget, objective=obj)


@pytest.fixture
def qwen(tiny_dir):
    from schedsearch.models import load_model

    return load_model(str(tiny_dir("qwen2_5_vl")))


def test_roundtrip_resolve_apply(qwen, tmp_path):
    lib = Library(tmp_path / "lib")
    e1 = lib.add(_sched(qwen, 0.5, 0.6, 0.58, 0.02))
    e2 = lib.add(_sched(qwen, 0.25, 0.4, 0.39, 0.05))
    e3 = lib.add(_sched(qwen, 0.5, 0.6, 0.58, 0.01))  # same key: a new version
    assert e3.id.endswith("v0002") and e1.id.endswith("v0001")
    assert {e.id for e in lib.entries(qwen.fingerprint())} == {e1.id, e2.id, e3.id}
    assert lib.resolve(qwen.fingerprint(), 0.5).id == e2.id  # only 0.39 fits under 0.5
    assert lib.resolve(qwen.fingerprint(), 0.6).id == e3.id  # largest achieved, then lower objective
    with pytest.raises(LibraryError, match="no stored schedule.*stored: flops-0.4000, flops-0.6000"):
        lib.resolve(qwen.fingerprint(), 0.3)
    with pytest.raises(LibraryError, match="the library has none"):
        lib.resolve("0000000000000000", 0.9)

    batch = qwen.prepare([[tiny_images(1)[0]]], ["what is it?"])
    with torch.no_grad():
        with apply_schedule(qwen.model, e3.schedule, adapter=qwen):
            want = qwen.model(**batch).logits
        with apply_schedule(qwen.model, budget=0.6, library=lib, adapter=qwen):
            got = qwen.model(**batch).logits
    assert torch.equal(want, got)
    lib.remove(e3.id)
    assert lib.resolve(qwen.fingerprint(), 0.6).id == e1.id
    with pytest.raises(LibraryError, match="no library entry"):
        lib.remove(e3.id)


def _export(args):
    root, path = args
    return Library(root).add(path).id


def test_concurrent_exports_keep_library_valid(qwen, tmp_path):
    src = tmp_path / "s.json"
    _sched(qwen, 0.5, 0.6, 0.58, 0.02).save(src)
    root = tmp_path / "lib"
    with ProcessPoolExecutor(4) as ex:
        ids = list(ex.map(_export, [(root, src)] * 24))
    assert len(set(ids)) == 24  # no version written twice
    lib = Library(root)
    assert len(lib.entries()) == 24  # every file parses
    assert not list(root.rglob(".tmp-*"))


def test_cli_export_list_show_and_errors(qwen, tmp_path):
    src = tmp_path / "s.json"
    _sched(qwen, 0.5, 0.6, 0.58, 0.02).save(src)
    env_home = str(tmp_path / "home")

    def run(*args):
        import os

        env = dict(os.environ, SCHEDSEARCH_HOME=env_home)
        return subprocess.run([sys.executable, "-m", "schedsearch", *args], capture_output=True, text=True,
                              timeout=120, check=False, env=env)

    out = run("export", str(src), "--to", "library")
    assert out.returncode == 0 and "stored qwen2_5_vl-" in out.stdout, out.stderr
    entry_id = out.stdout.split()[1]
    listed = run("library", "list")
    assert entry_id in listed.stdout and "flops 0.6 (achieved 0.5800)" in listed.stdout
    shown = run("library", "show", entry_id)
    assert shown.returncode == 0 and f'"schema_version": "{SCHEMA_VERSION}"' in shown.stdout
    for args in (("export", str(tmp_path / "missing.json")), ("library", "show", "nope/v0001"),
                 ("export", str(src), "--to", "s3")):
        bad = run(*args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), (args, bad.stderr)
