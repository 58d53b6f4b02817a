"""`schedsearch optimize`: bad inputs are one line and a non-zero exit, before any heavy work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from schedsearch.testing.tiny import tiny_images


@pytest.fixture
def manifest(tmp_path):
    lines = []
    for i, im in enumerate(tiny_images(4, seed=2)):
        im.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": f"what is {i}?"}))
    p = tmp_path / "manifest.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _run(args, cwd):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "optimize", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=180, check=False, env=env)
    return proc.returncode, [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")], proc.stderr


@pytest.mark.parametrize("args,expect", [
    (["--budget", "0"], "outside (0, 1]"),
    (["--budget", "1.5"], "outside (0, 1]"),
    (["--budget", "0.2", "--method", "nope"], "--method 'nope' is not known"),
    (["--budget", "0.2", "--sampler", "nope"], "--sampler 'nope' is not known"),
    (["--budget", "0.2", "--budget-kind", "watts"], "--budget-kind 'watts' is not known"),
    ([], "--budget is required"),
])
def test_bad_settings(tmp_path, manifest, args, expect):
    rc, errs, raw = _run([*args, "--calibration", str(manifest)], tmp_path)
    assert rc != 0 and len(errs) == 1 and expect in errs[0], raw
    assert "Traceback" not in raw


def test_unknown_config_key(tmp_path, manifest):
    cfg = tmp_path / "study.toml"
    cfg.write_text('[study]\nbudget = 0.2\nbugdet_kind = "flops"\n')
    rc, errs, raw = _run(["--config", str(cfg), "--calibration", str(manifest)], tmp_path)
    assert rc != 0 and len(errs) == 1 and "unknown key(s) bugdet_kind" in errs[0], raw


def test_real_model_without_weights(tmp_path, manifest):
    rc, errs, raw = _run(["--model", "qwen2.5-vl", "--budget", "0.2", "--calibration", str(manifest)], tmp_path)
    assert rc != 0 and len(errs) == 1, raw
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in errs[0] and "download" in errs[0], errs
