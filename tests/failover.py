"""Parts for failing over a real MySQL rotation between `rotor serve` replicas.

- `PostingSlack` is the fake Web API, noting which replica posted each message: the one
  holding the reporter's lock in the state DB when the post arrived (the reporter renews it
  right before every call).
- `HeldPut` holds moto's answer to the PutSecretValue that stages a secret's AWSPENDING,
  after moto applied it: the replica that sent it sits in the middle of `create-user`, the
  pending version written and the database user not yet created, holding the lease.
- `replicas` starts `rotor serve` processes on one PostgreSQL state store, pointed at a rig.

tests/test_ha_mysql_failover.py and benchmarks/ha.py use them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import psycopg

from demo.slack_api import FakeSlack
from tests.rig import Rig
from tests.slackbot import BotProcess

REPORTER_LOCK = "slack-reporter"  # bot.reporter.LOCK


def pid_of(holder: str | None) -> int | None:
    """The pid in a lease or lock holder ("host:pid:instance:proof[:reporter:…]")."""
    parts = (holder or "").split(":")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def state_row(url: str, query: str, *args: Any) -> tuple[Any, ...] | None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query, args).fetchone()  # type: ignore[call-overload]
        return tuple(row) if row is not None else None


def lease_pid(url: str, rotation_id: int) -> int | None:
    row = state_row(url, "SELECT lease_owner FROM rotations WHERE id = %s", rotation_id)
    return pid_of(row[0]) if row else None


def reporter_lock(url: str) -> tuple[int | None, float] | None:
    """(pid of the reporter lock's holder, until), if anyone took it yet."""
    row = state_row(url, "SELECT owner, until FROM locks WHERE name = %s", REPORTER_LOCK)
    return (pid_of(row[0]), float(row[1])) if row else None


@dataclass
class PostingSlack(FakeSlack):
    state_url: str = ""
    posted_by: dict[str, int | None] = field(default_factory=dict)  # message ts -> pid

    def handle(self, method: str, params: dict[str, Any], path: str
               ) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        poster = None
        if method == "chat.postMessage" and self.state_url:
            lock = reporter_lock(self.state_url)
            poster = lock[0] if lock else None
        status, headers, body = super().handle(method, params, path)
        if method == "chat.postMessage" and body and body.get("ok"):
            self.posted_by[str(body["ts"])] = poster
        return status, headers, body


class HeldPut:
    """Holds the answer to the next PutSecretValue staging AWSPENDING on `secret_id`."""

    def __init__(self, secret_id: str) -> None:
        self.secret_id = secret_id
        self.armed = threading.Event()
        self.reached = threading.Event()
        self.release = threading.Event()

    def install(self, monkeypatch: Any) -> HeldPut:
        from moto.secretsmanager.models import SecretsManagerBackend

        original = SecretsManagerBackend.put_secret_value
        held = self

        def put_secret_value(backend: Any, secret_id: str, *args: Any, **kwargs: Any) -> Any:
            answer = original(backend, secret_id, *args, **kwargs)
            stages = kwargs.get("version_stages") or (args[3] if len(args) > 3 else None)
            if (held.armed.is_set() and secret_id == held.secret_id
                    and "AWSPENDING" in (stages or [])):
                held.armed.clear()
                held.reached.set()
                held.release.wait(60)  # bounded: a test that forgot to release goes on
            return answer

        monkeypatch.setattr(SecretsManagerBackend, "put_secret_value", put_secret_value)
        return self

    def arm(self) -> None:
        self.reached.clear()
        self.release.clear()
        self.armed.set()


def rig_env(world: Rig) -> dict[str, str]:
    """What a `rotor serve` needs to reach the rig: moto, the fake Kubernetes, real kinds."""
    env = {k: v for k, v in world.env().items() if k.startswith(("AWS_", "KUBECONFIG"))}
    return {**env, "ROTOR_EXTRA_KINDS": ""}


def replica(world: Rig, slack: FakeSlack, url: str, log_level: str = "INFO") -> BotProcess:
    return BotProcess(world.workdir, slack, state_url=url, log_level=log_level).start(
        **rig_env(world))


def replicas(world: Rig, slack: FakeSlack, url: str, n: int,
             log_level: str = "INFO") -> list[BotProcess]:
    return [replica(world, slack, url, log_level) for _ in range(n)]
