"""The GPU path (``pytest -m gpu``; skipped where CUDA is not available): every check runs the model on ``cuda`` in
bfloat16, as ``--device cuda --dtype bfloat16`` does.

* an all-ones schedule gives exactly the unpruned logits on the GPU, and a pruned forward runs there;
* the objective (cached reference, cached vision features, every scorer, the vflow maps) works on the GPU in
  bfloat16, its disk cache is written from the GPU and read back, and it never mixes with a CPU float32 reference;
* prefill timing synchronizes CUDA (a timed pass is not just the kernel launch);
* ``--device cuda`` and ``--device cuda:N`` resolve; ``evaluate --device cuda --dtype bfloat16`` runs end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_toy():
    from schedsearch.models import load_model

    return load_model("toy", device="cuda", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def samples():
    from schedsearch.calibration import load_manifest
    from schedsearch.search.driver import _default_calibration

    return load_manifest(_default_calibration("toy"))[:16]


def test_device_resolution():
    from schedsearch.devices import DeviceError, resolve_device

    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(DeviceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_all_ones_is_exact_and_pruning_runs_on_gpu(gpu_toy, samples):
    from schedsearch.evaluation import make_batches
    from schedsearch.runtime import apply_schedule
    from schedsearch.testing.tiny import schedule_for

    batch = make_batches(gpu_toy, samples[:4], 4)[0]
    assert batch["input_ids"].device.type == "cuda"
    n = gpu_toy.num_layers
    with torch.no_grad():
        ref = gpu_toy.model(**batch, use_cache=False).logits
        with apply_schedule(gpu_toy.model, schedule_for(gpu_toy, [1.0] * n), adapter=gpu_toy):
            same = gpu_toy.model(**batch, use_cache=False).logits
        for scorer, params in (("last_token_attention", {"rope": True}), ("diverse", {"spatial": 4.0}),
                               ("uniform", {}), ("random", {"seed": 0})):
            sched = schedule_for(gpu_toy, [1.0, 0.5] + [0.2] * (n - 2), scorer=scorer, params=params)
            with apply_schedule(gpu_toy.model, sched, adapter=gpu_toy):
                pruned = gpu_toy.model(**batch, use_cache=False).logits
            assert pruned.device.type == "cuda" and pruned.dtype == torch.bfloat16 and torch.isfinite(pruned).all()
    assert ref.dtype == torch.bfloat16 and torch.equal(ref, same)


def test_objective_on_gpu_bf16_and_its_cache(gpu_toy, samples, tmp_path):
    from schedsearch.search.objective import Objective

    kw = dict(heldout_fraction=0.25, seed=0, batch_size=8, cache_dir=tmp_path, calibration_hash="h")
    obj = Objective(gpu_toy, samples, vision_maps=True, **kw)
    assert obj.reference["search"].device.type == "cuda" and obj.reference["search"].dtype == torch.float32
    n = gpu_toy.num_layers
    ones = {"keep_ratios": [1.0] * n, "scorer": {"name": "uniform", "params": {}}}
    assert obj.score(ones) == pytest.approx(0.0, abs=1e-6)
    for scorer in ({"name": "diverse", "params": {"spatial": 4.0}},
                   {"name": "external", "params": {"source": "vision_attention", "t": 1.0, "alpha": 0.5}}):
        v = obj.score({"keep_ratios": [0.3] * n, "scorer": scorer})
        assert 0.0 < v < 2.0
    again = Objective(gpu_toy, samples, **kw)  # read back from the disk cache, onto the GPU
    assert again.reference["search"].device.type == "cuda"
    assert torch.equal(again.reference["search"], obj.reference["search"])
    keys = {p.name for p in tmp_path.glob("ref-*.pt")}
    from schedsearch.models import load_model

    cpu = Objective(load_model("toy", device="cpu", dtype=torch.float32), samples, **kw)
    assert {p.name for p in tmp_path.glob("ref-*.pt")} - keys  # float32 CPU never reuses the bf16 GPU entry
    assert cpu.reference["search"].device.type == "cpu"


def test_timing_synchronizes_cuda(gpu_toy, samples):
    """A pass of 8 forwards timed with synchronization takes at least the GPU time CUDA events measure."""
    from schedsearch.evaluation import make_batches, time_prefill
    from schedsearch.testing.tiny import schedule_for

    batches = make_batches(gpu_toy, samples, 8)
    sched = schedule_for(gpu_toy, [0.2] * gpu_toy.num_layers, scorer="uniform", params={})
    full_ms, pruned_ms = time_prefill(gpu_toy, batches, sched, repeats=3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        start.record()
        for b in batches:
            gpu_toy.model(**b, use_cache=False, logits_to_keep=1)
        end.record()
    torch.cuda.synchronize()
    assert full_ms >= 0.8 * start.elapsed_time(end) and pruned_ms > 0


def test_evaluate_cli_on_cuda_bf16(tmp_path, samples):
    from schedsearch.models import load_model
    from schedsearch.search.driver import _default_calibration
    from schedsearch.testing.tiny import schedule_for

    ad = load_model("toy", device="cpu")
    path = tmp_path / "s.json"
    schedule_for(ad, [1.0, 1.0] + [0.25] * (ad.num_layers - 2), scorer="uniform", params={}).save(path)
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "evaluate", str(path), "--model", "toy", "--data",
                           str(_default_calibration("toy")), "--limit", "16", "--device", "cuda", "--dtype",
                           "bfloat16", "--json"], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["device"].startswith("cuda") and rep["dtype"] == "bfloat16"
    assert rep["prefill_ms_pruned"] > 0 and rep["accuracy"]["pruned"]["n"] == 16
