"""PostgreSQL 16 from the `pgserver` wheel: a private server in a folder, on a loopback port.

pgserver's own `get_server` listens on a Unix socket only; the demo's apps find their
database by host and port, as on RDS, so the wheel's binaries are run here with TCP. Passwords
are checked (SCRAM) for everyone but the `postgres` superuser, so a wrong password fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Postgres:
    host: str
    port: int
    superuser: str
    home: Path
    _bindir: Path
    _user: str | None

    def stop(self) -> None:
        subprocess.run([str(self._bindir / "pg_ctl"), "-D", str(self.home / "data"), "-m",
                        "immediate", "stop"], capture_output=True, user=self._user, timeout=60)
        shutil.rmtree(self.home, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(home: Path) -> Postgres:
    """initdb and start a server under `home` (about a second); `stop()` removes it."""
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - the `demo` extra is not installed
        raise SystemExit("rotor demo needs the `pgserver` wheel: pip install -e '.[demo]'") \
            from exc
    bindir = Path(POSTGRES_BIN_PATH)
    user = None
    home.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: as pgserver does, use a user
        from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        user = "pgserver"
        ensure_user_exists(user)
        ensure_prefix_permissions(home)  # the user may walk down to its folder
        shutil.chown(home, user, user)
    data, port = home / "data", _free_port()
    def run(*args: str) -> None:
        done = subprocess.run(args, capture_output=True, text=True, user=user, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr.strip()[-500:]}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-sync",
        "--auth-local=trust", "--auth-host=scram-sha-256")
    hba = data / "pg_hba.conf"
    hba.write_text("host all postgres 127.0.0.1/32 trust\n" + hba.read_text())
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "start", "-o",
        # TCP only (`-k ''`: no Unix socket, whose path would be limited to 107 bytes)
        f"-p {port} -k '' -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c full_page_writes=off -c synchronous_commit=off")
    return Postgres("127.0.0.1", port, "postgres", home, bindir, user)
