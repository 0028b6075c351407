"""A whole world for end-to-end runs: a real database, moto's server, a fake Kubernetes.

One rig is one app (named after the sandbox prefix, so every user a rotation creates is
cleaned up with the sandbox) in `staging` and `production`, with its app and admin secrets
in Secrets Manager, an ExternalSecret and a Deployment that reloads on its Secret.
The same rig drives in-process engines, `rotor` subprocesses and the benchmarks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pymysql
from moto.server import ThreadedMotoServer

from tests import servers
from tests.fakes.kube_api import FakeKube

ENVIRONMENTS = ("staging", "production")
REPO = Path(__file__).resolve().parent.parent

_moto: ThreadedMotoServer | None = None
_moto_lock = threading.Lock()


def moto_url() -> str:
    """One moto server per test process (secrets are named per rig, so rigs never collide)."""
    global _moto
    with _moto_lock:
        if _moto is None:
            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
            _moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            _moto.start()
        host, port = _moto.get_host_and_port()
        return f"http://{host}:{port}"


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
}


@dataclass
class Rig:
    engine_name: str
    box: Any
    workdir: Path
    moto: str
    kube: FakeKube
    app: str
    extra_config: str = ""
    waits: dict[str, float] = field(default_factory=dict)

    # -- where things are ------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "rotor.yml"

    @property
    def state_path(self) -> Path:
        return self.workdir / "rotor.db"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def secret_id(self) -> str:
        return f"govuk/{self.app}/{self.engine_name}"

    def admin_secret_id(self, env: str) -> str:
        return f"{self.app}-{env}-rds-admin-passwords"

    @property
    def external_secret(self) -> str:
        return f"{self.app}-{self.engine_name}"

    def sm(self) -> Any:
        return boto3.client(
            "secretsmanager",
            endpoint_url=self.moto,
            region_name="eu-west-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def env(self) -> dict[str, str]:
        """Environment for a `rotor` subprocess pointed at this rig."""
        return {
            **os.environ,
            **AWS_ENV,
            "AWS_ENDPOINT_URL": self.moto,
            "ROTOR_CONFIG": str(self.config_path),
            "ROTOR_STATE": str(self.state_path),
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": str(REPO),
            "ROTOR_ACTOR": "alice",
            "PYTHONUNBUFFERED": "1",
        }

    def rotor(self) -> list[str]:
        return [sys.executable, "-m", "bot.cli"]

    # -- setting up ------------------------------------------------------------------------

    def write_config(self) -> None:
        waits = {
            "first_check": 0.02,
            "max_check": 0.25,
            "rollout_start": 2,
            "sync": 20,
            "rollout": 30,
            "drain": 1,
            "sync_error_grace": 0.1,
            **self.waits,
        }
        config = {
            "environments": {
                env: {"aws_region": "eu-west-1", "kube_context": env, "db_tls": "disabled"}
                for env in ENVIRONMENTS
            },
            "apps": {
                self.app: {
                    "engine": self.engine_name,
                    "admin_user": self.box.admin_user,
                    "environments": {
                        env: {"admin_secret": self.admin_secret_id(env)} for env in ENVIRONMENTS
                    },
                }
            },
            "waits": waits,
        }
        text = json.dumps(config, indent=2)
        self.config_path.write_text(text + ("\n" + self.extra_config if self.extra_config else ""))

    def seed(self) -> None:
        sm = self.sm()
        sm.create_secret(Name=self.secret_id(), SecretString=json.dumps(self.app_secret()))
        for env in ENVIRONMENTS:
            sm.create_secret(
                Name=self.admin_secret_id(env),
                SecretString=json.dumps({self.app: self.box.admin_password}),
            )
        self.kube.add_external_secret(
            "apps",
            self.external_secret,
            secret_id=self.secret_id(),
            url_scheme="mysql2" if self.engine_name == "mysql" else "postgresql",
        )
        self.kube.add_deployment("apps", self.app, replicas=2, reloads_on=[self.external_secret])
        self.kube.write_kubeconfig(self.kubeconfig, context="staging", contexts=["production"])
        self.write_config()

    def app_secret(self) -> dict[str, Any]:
        box = self.box
        return {
            "engine": self.engine_name,
            "host": box.host,
            "port": box.port,
            "dbname": box.database,
            "username": box.app_user,
            "password": box.app_password,
        }

    # -- looking at the world -----------------------------------------------------------------

    def current(self) -> dict[str, Any]:
        """AWSCURRENT, asked for by stage (moto answers the old version otherwise)."""
        text = self.sm().get_secret_value(SecretId=self.secret_id(), VersionStage="AWSCURRENT")[
            "SecretString"
        ]
        return dict(json.loads(text))

    def stages(self) -> dict[str, list[str]]:
        return dict(self.sm().describe_secret(SecretId=self.secret_id())["VersionIdsToStages"])

    def login(self, secret: dict[str, Any]) -> None:
        """Log in with a secret's credentials and query the app's database."""
        if self.engine_name == "mysql":
            conn = pymysql.connect(
                host=secret["host"],
                port=int(secret["port"]),
                user=secret["username"],
                password=secret["password"],
                database=secret["dbname"],
                ssl_disabled=True,
                connect_timeout=5,
            )
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.close()
        else:
            with psycopg.connect(
                host=secret["host"],
                port=int(secret["port"]),
                user=secret["username"],
                password=secret["password"],
                dbname=secret["dbname"],
                connect_timeout=5,
            ) as conn:
                conn.execute("SELECT 1")

    def users(self) -> set[str]:
        """Every user/role on the server that belongs to this rig."""
        if self.engine_name == "mysql":
            with self.box.root().cursor() as cur:
                cur.execute(
                    "SELECT DISTINCT User FROM mysql.user WHERE User LIKE %s",
                    (self.box.prefix + "%",),
                )
                return {r[0] for r in cur.fetchall()}
        with self.box.root() as conn:
            return {
                r[0]
                for r in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (self.box.prefix + "%",)
                )
            }


class ContinuityProbe:
    """Logs in with whatever AWSCURRENT holds, every few milliseconds, and counts failures."""

    def __init__(self, rig: Rig, interval: float = 0.005) -> None:
        self.rig = rig
        self.interval = interval
        self.logins = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="continuity-probe")

    def _run(self) -> None:
        while not self._stop.is_set():
            secret = self.rig.current()
            try:
                self.rig.login(secret)
                self.logins += 1
            except (
                Exception
            ) as exc:  # every failure is the finding; keep the user, not the password
                self.failures.append(f"{secret['username']}: {type(exc).__name__}")
            self._stop.wait(self.interval)

    def __enter__(self) -> ContinuityProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@contextmanager
def rig(engine_name: str, workdir: Path, **kwargs: Any) -> Iterator[Rig]:
    box = servers.mysql_sandbox() if engine_name == "mysql" else servers.postgres_sandbox()
    url = moto_url()
    sm = boto3.client(
        "secretsmanager",
        endpoint_url=url,
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )

    def read(secret_id: str) -> str:
        return str(
            sm.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"]
        )

    kube = FakeKube(read).start()
    try:
        world = Rig(engine_name, box, workdir, url, kube, app=box.prefix, **kwargs)
        world.seed()
        yield world
    finally:
        kube.stop()
        if engine_name == "mysql":
            servers.drop_mysql_sandbox(box)
        else:
            servers.drop_postgres_sandbox(box)
