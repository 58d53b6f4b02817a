"""A throw-away PostgreSQL server on loopback for tests: initdb in a temp dir, pg_ctl start, createdb.

``start_postgres(tmpdir)`` returns a :class:`PgServer` (``url``, ``stop()``). The server binaries come from
Debian's ``postgresql`` package (``/usr/lib/postgresql/<ver>/bin``, or on ``PATH``); ``find_pg_bin()`` is None
when they are absent (the fixture then skips with that reason; ``.ci/run`` installs them). initdb refuses to
run as root, so as root the server runs as the ``postgres`` user (``runuser``), which is given the data dir.
Unix sockets go into the temp dir (``-k``) and TCP listens on 127.0.0.1 only, on a free port.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


def find_pg_bin() -> Path | None:
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]), reverse=True)
    if cands:
        return Path(cands[0]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bin: Path
    data: Path
    port: int
    user: str | None  # OS user running the server (None = this user)
    db: str = "schedsearch"

    @property
    def url(self) -> str:
        return f"postgresql://schedsearch:pw@127.0.0.1:{self.port}/{self.db}"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self._cmd(*args), capture_output=True, text=True, check=check, timeout=120,
                              cwd=self.data.parent)

    def createdb(self, name: str) -> str:
        self.run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "schedsearch",
                 "-O", "schedsearch", name)
        return f"postgresql://schedsearch:pw@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)


def start_postgres(tmp: Path) -> PgServer:
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", user], check=True)
            pw = pwd.getpwnam(user)
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "data"
    (tmp / "pw").write_text("pw\n")
    if user:
        for p in (tmp, tmp / "pw"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        # the server user must be able to reach the temp dir
        p = tmp.parent
        while p != p.parent:
            os.chmod(p, os.stat(p).st_mode | 0o011)
            p = p.parent
    srv = PgServer(pg_bin, data, _free_port(), user)
    srv.run(str(pg_bin / "initdb"), "-D", str(data), "-U", "schedsearch", "--pwfile", str(tmp / "pw"),
            "-A", "scram-sha-256", "-E", "UTF8", "--no-sync")
    opts = f"-c listen_addresses=127.0.0.1 -p {srv.port} -k {tmp} -c fsync=off -c max_connections=100"
    res = srv.run(str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(tmp / "server.log"), "-o", opts, "-w",
                  "-t", "60", "start", check=False)
    if res.returncode != 0:
        log = (tmp / "server.log").read_text() if (tmp / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {res.stderr.strip()} {log[-2000:]}")
    env_pw = tmp / ".pgpass"
    env_pw.write_text(f"127.0.0.1:{srv.port}:*:schedsearch:pw\n")
    if user:
        os.chown(env_pw, pw.pw_uid, pw.pw_gid)
    os.chmod(env_pw, 0o600)
    os.environ.setdefault("PGPASSFILE", str(env_pw))  # for createdb as the server user (runuser keeps env)
    srv.createdb(srv.db)
    return srv
