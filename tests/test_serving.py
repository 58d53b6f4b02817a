"""Registry + serving: export --to mlflow, `mlflow models serve`, a real HTTP request == in-process generate."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from schedsearch.testing.tiny import schedule_for, tiny_images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_export_serve_and_request(tiny_dir, tmp_path):
    pytest.importorskip("mlflow")
    from schedsearch.models import load_model
    from schedsearch.serving import encode_image, generate

    d = tiny_dir("qwen2_5_vl")
    ad = load_model(str(d))
    n = ad.num_layers
    sched_path = tmp_path / "s.json"
    schedule_for(ad, [1.0] + [0.5] * (n - 1), scorer="uniform", params={}).save(sched_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # the scoring server runs `uvicorn` by name: the interpreter's bin dir must be on PATH (as in an active venv)
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1", PATH=path)
    reg = subprocess.run([sys.executable, "-m", "schedsearch", "export", str(sched_path), "--to", "mlflow",
                          "--name", "tiny-sched", "--model", str(d), "--tracking-uri", uri],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180, check=False)
    assert reg.returncode == 0, reg.stderr[-2000:]
    assert "models:/tiny-sched/1" in reg.stdout

    img = tiny_images(1, seed=7)[0]
    records = [{"prompt": "what is in the image?", "image": encode_image(img)}]
    from schedsearch.schedule import load_schedule

    want = generate(ad, load_schedule(sched_path), records, max_new_tokens=5)

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny-sched/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        while time.time() < deadline:
            if server.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        body = json.dumps({"dataframe_records": records, "params": {"max_new_tokens": 5}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            got = json.loads(r.read())["predictions"]
        assert got == want
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # stop the server (and its workers) by PID
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_export_to_unreachable_server_is_one_line_within_seconds(tiny_dir, tmp_path):
    """`export --to mlflow` against a server that is not there: one error line in seconds (MLflow's own HTTP
    retries were silent for ~4 minutes, then a traceback), nothing registered."""
    pytest.importorskip("mlflow")
    from schedsearch.models import load_model

    ad = load_model(str(tiny_dir("qwen2_5_vl")))
    sched_path = tmp_path / "s.json"
    schedule_for(ad, [1.0] * ad.num_layers, scorer="uniform", params={}).save(sched_path)
    port = _free_port()  # closed: nothing listens there
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "export", str(sched_path), "--to", "mlflow",
                           "--name", "x", "--tracking-uri", f"http://127.0.0.1:{port}"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, check=False)
    took = time.perf_counter() - t0
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: cannot register 'x'") and f"127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in proc.stderr and took < 60, took


def test_request_images_and_prompts_go_through_the_shared_checks():
    """A 16-bit grayscale request image is decoded as the viewer shows it (not solid white); broken base64, a
    non-image payload and a lone-surrogate prompt are one ServingError line each."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from schedsearch.serving import ServingError, _check_prompt, _decode_image

    ramp = (np.arange(64, dtype=np.uint16)[None, :].repeat(8, 0) * 1024).astype(np.uint16)
    buf = io.BytesIO()
    Image.frombytes("I;16", (64, 8), ramp.astype("<u2").tobytes()).save(buf, format="PNG")
    rgb = np.asarray(_decode_image(base64.b64encode(buf.getvalue()).decode()))
    assert rgb.shape == (8, 64, 3) and 100 < rgb.mean() < 155 and rgb[0, 0, 0] < rgb[0, -1, 0]
    for bad in ("not base64 !!", base64.b64encode(b"hello, not an image").decode()):
        with pytest.raises(ServingError) as ei:
            _decode_image(bad)
        assert "\n" not in str(ei.value)
    with pytest.raises(ServingError, match="lone surrogate"):
        _check_prompt("what is \ud800 here?")
    assert _check_prompt("fine ?") == "fine ?"
