"""``schedsearch ui [--tracking-uri URI] [--port 5000] [--host 127.0.0.1]``: the MLflow UI over the study store.

Runs ``python -m mlflow server --backend-store-uri URI --host HOST --port P --workers 1`` as a child process
(MLflow 3's server serves both the UI and the REST API), prints the URL and waits; Ctrl-C stops the server.
Binds to loopback unless told otherwise. An http(s) URI is already a server: its URL is printed, nothing runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import typer

from schedsearch.cli import app
from schedsearch.errors import SchedsearchError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class UIError(SchedsearchError):
    """The UI cannot be started (port in use, bad store URI, mlflow missing)."""


def server_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` argv for a backend store ``uri`` (artifacts of new experiments next to a sqlite file)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        cmd += ["--default-artifact-root", str(db.parent / "mlruns")]
    return cmd


def _check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UIError(f"--port {port} is out of range: use 1-65535, e.g. --port 5000")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UIError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
                          f"pick a free one, e.g. --port {port + 1}") from None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def ui(
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow store to browse (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."
    ),
    port: int = typer.Option(5000, "--port", "-p", help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
) -> None:
    """Open the MLflow UI over the study runs (one parent run per study, one child run per trial)."""
    import importlib.util

    from schedsearch.tracking import DEFAULT_TRACKING_URI

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(("http://", "https://")):
        typer.echo(f"{uri} is a tracking server: open {uri} in a browser (nothing to start)")
        return
    if importlib.util.find_spec("mlflow") is None:
        raise UIError('schedsearch ui needs mlflow: pip install "schedsearch[search]"')
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            typer.echo(f"warning: {db} does not exist yet: the UI starts empty "
                       "(run schedsearch optimize in this directory first)", err=True)
    if host not in _LOOPBACK:
        typer.echo(f"warning: binding to {host} exposes the UI (and the run store) to the network", err=True)
    _check_port(host, port)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"MLflow UI for {uri} at http://{shown}:{port}  (Ctrl-C to stop)")
    proc = subprocess.Popen(server_command(uri, host, port))
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the server too, like Ctrl-C
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if rc != 0:
        raise UIError(f"mlflow server exited with status {rc} (its message is above)")
