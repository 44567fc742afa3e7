"""A real PostgreSQL server for the archive's tests: Debian's binaries, a throw-away data
directory, trust authentication on 127.0.0.1 only, a free port.

PostgreSQL refuses to run as root: run as root (as in CI containers), the server and initdb
run as the ``postgres`` user that Debian's package creates, on a data directory it owns."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from jobstream.devredis import free_port

INSTALL_HINT = (
    "PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/initdb): "
    "run `make test-deps` (apt-get install postgresql)"
)
OS_USER = "postgres"


def bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    assert found, INSTALL_HINT
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self) -> None:
        self.bin = bin_dir()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="jobstream-pg-"))
        self.data = self.dir / "data"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_server_user(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        shutil.chown(self.dir, OS_USER, OS_USER)
        return {"user": OS_USER, "group": OS_USER, "extra_groups": []}

    def start(self) -> PostgresServer:
        user = self._as_server_user()
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **user,
        )
        log = open(self.dir / "server.log", "wb")  # the server writes to it; closed here once inherited
        self.process = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                *("-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.dir)),
                *("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            **user,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"postgres exited: {(self.dir / 'server.log').read_text()}"
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
            )
            if ready.returncode == 0:
                return self
            time.sleep(0.1)
        raise AssertionError(f"postgres did not start: {(self.dir / 'server.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
