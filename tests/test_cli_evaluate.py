"""`schedsearch evaluate` end to end on a tiny checkpoint, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from schedsearch.cli import main
from schedsearch.testing.tiny import schedule_for, tiny_images


def _manifest(tmp_path, n=6):
    lines = []
    for i, img in enumerate(tiny_images(n, seed=5)):
        name = f"img{i}.png"
        img.save(tmp_path / name)
        lines.append(json.dumps({"images": [name], "prompt": f"what is shape number {i}?"}))
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _schedule(tmp_path, adapter, ratios):
    path = tmp_path / "s.json"
    schedule_for(adapter, ratios).save(path)
    return path


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_evaluate_json(tiny_dir, tmp_path, capsys, family):
    from schedsearch.models import load_model

    d = tiny_dir(family)
    ad = load_model(str(d))
    n = ad.num_layers
    sched = _schedule(tmp_path, ad, [1.0] + [0.5] * (n - 2) + [0.25])
    rc = main(["evaluate", str(sched), "--model", str(d), "--calibration", str(_manifest(tmp_path)),
               "--json", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["n_samples"] == 6
    assert 0.0 < rep["flops_ratio"] < 1.0 and 0.0 < rep["kv_ratio"] < 1.0
    assert 0.0 < rep["token_ratio"] < 1.0
    assert rep["discrepancy"] > 0.0  # pruning changed the last-token state
    assert rep["prefill_ms_pruned"] > 0 and rep["prefill_ms_unpruned"] > 0

    ones = _schedule(tmp_path, ad, [1.0] * n)
    rc = main(["evaluate", str(ones), "--model", str(d), "--calibration", str(_manifest(tmp_path)),
               "--json", "--no-timing"])
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and rep["flops_ratio"] == 1.0 and rep["discrepancy"] == pytest.approx(0.0, abs=1e-6)


def _one_line_error(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "schedsearch", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    err = proc.stderr.strip().splitlines()
    return proc.returncode, err


def test_evaluate_bad_model_inputs(tiny_dir, tmp_path):
    from schedsearch.models import load_model

    ad = load_model(str(tiny_dir("qwen2_5_vl")))
    sched = _schedule(tmp_path, ad, [1.0] * ad.num_layers)
    manifest = _manifest(tmp_path, 2)
    bad_type = tmp_path / "bert"
    bad_type.mkdir()
    (bad_type / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases = {
        "missing model directory": ["--model", str(tmp_path / "nope")],
        "unsupported model_type": ["--model", str(bad_type)],
    }
    for what, extra in cases.items():
        rc, err = _one_line_error(["evaluate", str(sched), *extra, "--calibration", str(manifest)], tmp_path)
        assert rc != 0, what
        assert len(err) == 1 and err[0].startswith("error:"), (what, err)


def test_evaluate_accuracy_with_answers(tiny_dir, tmp_path, capsys):
    """A manifest with answers (`--data`) adds exact-match accuracy, unpruned next to pruned, per qtype/region."""
    from schedsearch.calibration import load_manifest
    from schedsearch.models import load_model
    from schedsearch.toy.eval import predict

    d = tiny_dir("qwen2_5_vl")
    ad = load_model(str(d))

    def write(answers):
        lines = []
        for i, img in enumerate(tiny_images(4, seed=5)):
            img.save(tmp_path / f"a{i}.png")
            lines.append(json.dumps({"image": f"a{i}.png", "prompt": f"what is {i}?", "answer": answers[i],
                                     "qtype": "counting" if i % 2 else "presence", "region": "top left"}))
        (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")

    write(["?"] * 4)
    preds = predict(ad, load_manifest(tmp_path))  # the unpruned model's greedy answers
    write([p if i % 2 == 0 else p + " not" for i, p in enumerate(preds)])  # presence right, counting wrong
    n = ad.num_layers
    sched = _schedule(tmp_path, ad, [1.0] + [0.25] * (n - 1))
    rc = main(["evaluate", str(sched), "--model", str(d), "--data", str(tmp_path), "--json", "--no-timing"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    assert set(rep) == {"unpruned", "pruned"}
    un = rep["unpruned"]
    assert un["n"] == 4 and un["overall"] == 0.5
    assert un["by_qtype"] == {"counting": 0.0, "presence": 1.0} and un["counts"]["region"] == {"top left": 4}
    assert 0.0 <= rep["pruned"]["overall"] <= 1.0 and set(rep["pruned"]["by_qtype"]) == {"counting", "presence"}

    rc = main(["evaluate", str(sched), "--model", str(d), "--data", str(tmp_path), "--no-timing"])
    out = capsys.readouterr().out
    assert rc == 0 and "exact-match accuracy" in out and "qtype counting" in out and "region top left" in out
