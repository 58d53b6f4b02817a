"""``schedsearch ui [--tracking-uri URI] [--port 5000] [--host 127.0.0.1]``: the MLflow UI on the study's runs.

Lifecycle: check the address can be bound and the store can be read (one line each when not), start
``python -m mlflow server --backend-store-uri URI --host HOST --port P --workers 1`` as a child process (MLflow 3's
server serves both the UI and the REST API) with its log in a temporary file, wait until it answers
``/health``, then print the URL of the study experiment's runs table
(``#/experiments/<id>/runs?workflowType=machine_learning``; MLflow 3 otherwise opens its GenAI overview) and open
it in a browser when there is a desktop. Ctrl-C (or SIGTERM) stops the server. A server that exits before it
answers is one line with the last line of its log. An http(s) URI is already a server: its URL is printed, nothing
runs. Binds to loopback unless told otherwise.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import typer

from schedsearch.cli import app, ranged
from schedsearch.errors import SchedsearchError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: seconds to wait for the server's first answer (imports and schema migrations take a while on a busy machine)
START_TIMEOUT_S = 120.0


class UIError(SchedsearchError):
    """The UI cannot be started (port in use, address not on this machine, bad store URI, mlflow missing)."""


def server_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` argv for a backend store ``uri`` (artifacts of new experiments next to a sqlite file)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        cmd += ["--default-artifact-root", str(db.parent / "mlruns")]
    return cmd


def check_bind(host: str, port: int) -> None:
    """Bind ``host:port`` once: a busy port suggests another port; an address this machine does not have does not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UIError(f"--host {host} is not an address or a name this machine can resolve ({exc.strerror}): "
                      "use 127.0.0.1, or an address of one of this machine's network interfaces") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UIError(f"cannot listen on {host}:{port}: the port is in use; pick a free one, "
                              f"e.g. --port {port + 1}") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UIError(f"cannot listen on {host}:{port}: {host} is not an address of this machine; "
                              "use 127.0.0.1, or an address of one of its network interfaces") from None
            if exc.errno == errno.EACCES:
                raise UIError(f"cannot listen on {host}:{port}: ports below 1024 need administrator rights; "
                              "use e.g. --port 5000") from None
            raise UIError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UIError(f"mlflow server exited with status {proc.returncode} before answering: {_last_line(log)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise UIError(f"mlflow server did not answer on {base} within {timeout:.0f} s: {_last_line(log)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (uvicorn and its workers), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _has_desktop() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


@app.command()
def ui(
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow store to browse.",
                                            show_default="$MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
    port: int = typer.Option(5000, "--port", "-p", help="Port to serve on.", **ranged("port")),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    experiment: str = typer.Option("schedsearch", "--experiment", help="Experiment whose runs the URL opens."),
    open_browser: bool = typer.Option(True, "--open/--no-open", help="Open the URL in a browser (with a desktop)."),
) -> None:
    """Open the MLflow UI on the study runs (one parent run per study, one child run per trial)."""
    import importlib.util

    from schedsearch.tracking import DEFAULT_TRACKING_URI, find_experiment, runs_view_path

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(("http://", "https://")):
        typer.echo(f"{uri} is a tracking server: open {uri} in a browser (nothing to start)")
        return
    if importlib.util.find_spec("mlflow") is None:
        raise UIError('schedsearch ui needs mlflow: pip install "schedsearch[search]"')
    if host not in _LOOPBACK:
        typer.echo(f"warning: binding to {host} exposes the UI (and the run store) to the network", err=True)
    check_bind(host, port)
    exp_id = find_experiment(uri, experiment)  # a store that cannot be read: one line, before anything starts
    if exp_id is None:
        typer.echo(f"warning: {uri} has no experiment {experiment!r} yet: the UI starts on its home page "
                   "(run schedsearch optimize in this directory first)", err=True)
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    url = base + runs_view_path(exp_id)
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the server too, like Ctrl-C
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    with tempfile.TemporaryDirectory(prefix="schedsearch-ui-") as tmp:
        log = Path(tmp) / "mlflow-server.log"
        with log.open("w") as out:
            # its own process group, so stopping it stops its workers; no GenAI job runner (not needed for runs)
            env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
            proc = subprocess.Popen(server_command(uri, host, port), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        try:
            _wait_ready(proc, base, log, START_TIMEOUT_S)
            typer.echo(f"MLflow UI for {uri}: {url}  (Ctrl-C to stop)")
            if open_browser and _has_desktop():
                import webbrowser

                webbrowser.open(url)
            rc = proc.wait()
        except KeyboardInterrupt:
            return
        finally:
            _stop(proc)
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        if rc != 0:
            raise UIError(f"mlflow server exited with status {rc}: {_last_line(log)}")
