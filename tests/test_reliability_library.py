"""The schedule library never reads or deletes outside its root, and lists damaged entries instead of hiding them.

Real files and the real CLI (``python -m schedsearch`` in a subprocess); no model is loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from schedsearch.library import Library, LibraryError
from schedsearch.testing.tiny import schedule_for

ROOT = Path(__file__).resolve().parents[1]


def _schedule(requested: float = 0.5):
    fake = SimpleNamespace(family="qwen2_5_vl", name_or_path="tiny", num_layers=4, fingerprint=lambda: "0123abcd")
    return schedule_for(fake, [1.0, 0.5, 0.5, 0.5], scorer="uniform", params={}, requested=requested)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCHEDSEARCH_HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "schedsearch", *args], capture_output=True, text=True,
                          timeout=120, check=False, env=env)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    return lines[0]


@pytest.fixture
def victim_setup(tmp_path):
    """A library with one entry and, outside it, files an attacker-chosen id could reach."""
    home = tmp_path / "home"
    lib = Library(home / "library")
    entry = lib.add(_schedule())
    victim = tmp_path / "victim.json"
    _schedule().save(victim)
    return home, lib, entry, victim


def test_traversal_and_absolute_ids_are_refused_and_nothing_outside_is_touched(victim_setup, tmp_path):
    home, lib, entry, victim = victim_setup
    before = victim.read_bytes()
    lib_depth = len(entry.path.relative_to(tmp_path).parts) - 1  # folders between tmp_path and the entry
    traversal = "/".join([".."] * lib_depth) + "/victim"
    bad_ids = [traversal, "../../victim", str(victim.with_suffix("")), "/" + traversal,
               f"{entry.id}/../../../../../victim", entry.id.replace("v0001", "../v0001"),
               "./" + entry.id, entry.id + "\n", "qwen2_5_vl-0123abcd/flops-0.5000/v1", "..\\..\\victim", ""]
    for bad in bad_ids:
        for cmd in ("remove", "show"):
            err = _one_line_error(_cli(home, "library", cmd, bad))
            assert "is not a library entry id" in err, (bad, err)
        with pytest.raises(LibraryError):
            lib.remove(bad)
    assert victim.read_bytes() == before
    assert entry.path.is_file()  # and the real entry is still there
    ok = _cli(home, "library", "remove", entry.id)
    assert ok.returncode == 0 and not entry.path.exists(), ok.stderr


def test_symlinks_out_of_the_library_are_not_followed(victim_setup, tmp_path):
    home, lib, entry, victim = victim_setup
    before = victim.read_bytes()
    # a symlinked entry file and a symlinked model folder, both pointing outside
    link_file = entry.path.with_name("v0002.json")
    link_file.symlink_to(victim)
    outside = tmp_path / "outside" / "flops-0.5000"
    outside.mkdir(parents=True)
    _schedule().save(outside / "v0001.json")
    (lib.root / "llava-feedbeef").symlink_to(outside.parent)
    for entry_id in (lib._id(link_file), "llava-feedbeef/flops-0.5000/v0001"):
        for cmd in ("remove", "show"):
            assert "points outside the library" in _one_line_error(_cli(home, "library", cmd, entry_id))
    assert victim.read_bytes() == before and (outside / "v0001.json").is_file()
    listed = _cli(home, "library", "list")
    assert listed.returncode == 0
    assert f"{lib._id(link_file)}  DAMAGED: " in listed.stdout and "points outside the library" in listed.stdout
    assert lib.resolve("0123abcd", 0.5).id == entry.id  # resolution ignores the links


def test_list_reports_damaged_entries_and_keeps_going(victim_setup):
    home, lib, entry, _ = victim_setup
    folder = entry.path.parent
    (folder / "v0002.json").write_text('{"schema_version": "1.0", "keep_ratios": [1.0, 0.5')  # truncated
    (folder / "v0003.json").write_text("[]")
    (folder / "v0004.json").mkdir()  # a folder named like an entry
    good = lib.add(_schedule(0.25))
    listed = _cli(home, "library", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert any(ln.startswith(entry.id + "  ") and "DAMAGED" not in ln for ln in lines)
    assert any(ln.startswith(good.id + "  ") and "DAMAGED" not in ln for ln in lines)
    damaged = {ln.split()[0]: ln for ln in lines if "  DAMAGED: " in ln}
    assert set(damaged) == {f"{folder.relative_to(lib.root).as_posix()}/v000{i}" for i in (2, 3, 4)}
    assert all(len(ln.split("\n")) == 1 for ln in damaged.values())
    # a damaged entry can be removed by its listed id
    victim_id = next(i for i in damaged if i.endswith("v0003"))
    assert _cli(home, "library", "remove", victim_id).returncode == 0
    assert not (folder / "v0003.json").exists()


def test_unwritable_or_file_home_is_one_line(tmp_path):
    src = tmp_path / "s.json"
    _schedule().save(src)
    home_file = tmp_path / "home-is-a-file"
    home_file.write_text("x")
    err = _one_line_error(_cli(home_file, "export", str(src), "--to", "library"))
    assert "cannot write to the schedule library" in err and "SCHEDSEARCH_HOME" in err
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            err = _one_line_error(_cli(ro, "export", str(src), "--to", "library"))
            assert "Permission denied" in err
        finally:
            ro.chmod(0o700)
    listed = _cli(home_file, "library", "list")  # reading a library that cannot exist is simply empty
    assert listed.returncode == 0 and "the library is empty" in listed.stdout
