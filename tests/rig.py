"""A whole world for end-to-end runs: a real database, moto's server, a fake Kubernetes.

One rig is one app (named after the sandbox prefix, so every user a rotation creates is
cleaned up with the sandbox) in `staging` and `production`, with its app and admin secrets
in Secrets Manager, an ExternalSecret and a Deployment that reloads on its Secret.
The same rig drives in-process engines, `rotor` subprocesses and the benchmarks.

`rig("postgres", path, restored=True)` makes staging a world of its own, restored from
production overnight as GOV.UK's is: a second PostgreSQL server (roles belong to a server,
so a second database on the same one could not lack production's users), its own AWS region
(the same secret names, apart) and its own Kubernetes API. `Rig.restore()` plays the restore.
Every part reads the rig's `clock`, so a test moves time instead of sleeping.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import psycopg
import pymysql
from moto.server import ThreadedMotoServer
from psycopg import sql
from psycopg.conninfo import make_conninfo

from demo import moto_server
from demo.kube_api import FakeKube
from rotation.store import RotationRow
from tests import servers
from tests.waiting import DEADLINE, wait_for

ENVIRONMENTS = ("staging", "production")
REPO = Path(__file__).resolve().parent.parent
REGION = "eu-west-1"
# With restored=True: staging is restored from production every night at 03:00 London time.
RESTORED, SOURCE, RESTORED_REGION = "staging", "production", "eu-west-2"
RESTORE_TIME, RESTORE_TZ = "03:00", "Europe/London"

_moto: ThreadedMotoServer | None = None
_moto_lock = threading.Lock()


def moto_url() -> str:
    """One moto server per test process (secrets are named per rig, so rigs never collide)."""
    global _moto
    with _moto_lock:
        if _moto is None:
            _moto = moto_server.start()
        host, port = _moto.get_host_and_port()
        return f"http://{host}:{port}"


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
}


ACCOUNT = "123456789012"  # moto's
# People at the command line, as rotor.yml's `operators:` maps their role sessions.
OPERATORS = {f"arn:aws:sts::{ACCOUNT}:assumed-role/*/{name}": user
             for name, user in (("alice", "U0ALICE"), ("bob", "U0BOB"), ("carol", "U0CAROL"))}


def operator_env(session: str, role: str = "govuk-admin") -> dict[str, str]:
    """AWS credentials of a role session in moto's server, as `gds aws … --shell` gives:
    sts:GetCallerIdentity names `arn:aws:sts::…:assumed-role/{role}/{session}`."""
    url = moto_url()
    credentials = moto_client("sts", url).assume_role(
        RoleArn=f"arn:aws:iam::{ACCOUNT}:role/{role}", RoleSessionName=session)["Credentials"]
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": credentials["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": credentials["SecretAccessKey"],
            "AWS_SESSION_TOKEN": credentials["SessionToken"], "AWS_DEFAULT_REGION": REGION}


def moto_client(service: str, url: str | None = None, region: str = "eu-west-1") -> Any:
    """A boto3 client for moto's server (the one this process runs, unless `url` says)."""
    return boto3.client(service, endpoint_url=url or moto_url(), region_name=region,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


class Clock:
    """The time every part of a rig agrees on: real time, moved on by `advance`/`set`."""

    def __init__(self, start: float | None = None) -> None:
        self._start = time.time() if start is None else start
        self._t0 = time.monotonic()
        self._offset = 0.0

    def __call__(self) -> float:
        return self._start + (time.monotonic() - self._t0) + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    def set(self, when: float) -> None:
        self._offset += when - self()


# -- a second PostgreSQL server, for the restored staging --------------------------------

_second_pg: tuple[str, int, str] | None = None
_second_pg_lock = threading.Lock()


def second_postgres() -> tuple[str, int, str]:
    """(host, port, superuser) of a PostgreSQL server apart from servers.POSTGRES_URL's.

    ROTOR_TEST_POSTGRES_STAGING_URL names one; otherwise a private server is started for this
    test process (about a second) with the first server's binaries, and stopped at exit. It
    checks passwords (SCRAM) for everyone but its superuser, so a wrong staging password fails.
    """
    global _second_pg
    with _second_pg_lock:
        if _second_pg is None:
            url = os.environ.get("ROTOR_TEST_POSTGRES_STAGING_URL")
            if url:
                parts = urlsplit(url)
                _second_pg = (
                    parts.hostname or "127.0.0.1",
                    parts.port or 5432,
                    parts.username or "postgres",
                )
            else:
                _second_pg = _start_private_postgres()
        return _second_pg


def _postgres_bin() -> Path:
    parts = urlsplit(servers.POSTGRES_URL)
    try:
        with psycopg.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=parts.username or "postgres",
            dbname="postgres",
            connect_timeout=5,
        ) as conn:
            major = int(str(conn.execute("SHOW server_version_num").fetchone()[0])) // 10000
    except psycopg.OperationalError as exc:
        raise servers.ServerUnavailable(f"PostgreSQL is unreachable ({exc})") from exc
    candidates = [Path(f"/usr/lib/postgresql/{major}/bin")]
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).parent)
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise servers.ServerUnavailable(
        f"no initdb/pg_ctl for PostgreSQL {major}; set ROTOR_TEST_POSTGRES_STAGING_URL"
    )


def _as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL's server refuses to run as root: run it as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_private_postgres() -> tuple[str, int, str]:
    bindir = _postgres_bin()
    home = Path(tempfile.mkdtemp(prefix="rotor-pg-"))
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    data, port = home / "data", _free_port()
    quiet: dict[str, Any] = {"check": True, "capture_output": True}
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ]
        ),
        **quiet,
    )
    hba = data / "pg_hba.conf"
    # The superuser (the rig itself) logs in without a password; everyone else needs theirs.
    hba.write_text("host all postgres 127.0.0.1/32 trust\n" + hba.read_text())
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(home / "log"),
                "-w",
                "start",
                "-o",
                f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off",
            ]
        ),
        **quiet,
    )

    def stop() -> None:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(home, ignore_errors=True)

    atexit.register(stop)
    return "127.0.0.1", port, "postgres"


@dataclass
class RestoredCopy:
    """Staging as a world of its own, restored from production overnight."""

    env: str
    source: str
    box: servers.PostgresSandbox
    kube: FakeKube
    region: str


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
    # Extra settings per environment, e.g. {"production": {"four_eyes": False}}.
    environments: dict[str, dict[str, Any]] = field(default_factory=dict)
    clock: Clock = field(default_factory=Clock)
    copy: RestoredCopy | None = None
    # rotor.yml's `slack:` section, e.g. {"approval_reminder_minutes": 0.05}.
    slack: dict[str, Any] = field(default_factory=dict)

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

    def _copy_for(self, env: str | None) -> RestoredCopy | None:
        return self.copy if self.copy is not None and env == self.copy.env else None

    def region(self, env: str | None = None) -> str:
        copy = self._copy_for(env)
        return copy.region if copy else REGION

    def box_for(self, env: str | None = None) -> Any:
        copy = self._copy_for(env)
        return copy.box if copy else self.box

    def kube_for(self, env: str | None = None) -> FakeKube:
        copy = self._copy_for(env)
        return copy.kube if copy else self.kube

    def sm(self, env: str | None = None) -> Any:
        return self.client("secretsmanager", env)

    def client(self, service: str, env: str | None = None) -> Any:
        return moto_client(service, self.moto, self.region(env))

    def ecs_service(self) -> dict[str, str]:
        """An ECS cluster `{app}-cluster` running the app as service `web` (2 tasks), as
        the catalogue's `ecs_services` names it."""
        ecs = self.client("ecs")
        cluster = f"{self.app}-cluster"
        ecs.create_cluster(clusterName=cluster)
        ecs.register_task_definition(family=self.app, containerDefinitions=[
            {"name": "app", "image": "app:1", "memory": 128}])
        ecs.create_service(cluster=cluster, serviceName="web", taskDefinition=self.app,
                           desiredCount=2)
        return {"cluster": cluster, "service": "web"}

    def env(self) -> dict[str, str]:
        """Environment for a `rotor` subprocess pointed at this rig, run by Alice's role
        session (OPERATORS maps it to U0ALICE)."""
        return {
            **os.environ,
            **AWS_ENV,
            **operator_env("alice"),
            "AWS_ENDPOINT_URL": self.moto,
            "ROTOR_CONFIG": str(self.config_path),
            "ROTOR_STATE": str(self.state_path),
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": str(REPO),
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
        environments: dict[str, dict[str, Any]] = {
            env: {"aws_region": REGION, "kube_context": env, "db_tls": "disabled"}
            for env in ENVIRONMENTS
        }
        if self.copy is not None:
            environments[self.copy.env].update(
                aws_region=self.copy.region,
                kubeconfig=str(self.workdir / f"kubeconfig-{self.copy.env}"),
                restored_from=self.copy.source,
                restore_time=RESTORE_TIME,
                timezone=RESTORE_TZ,
            )
        for env, extra in self.environments.items():
            environments[env].update(extra)
        config = {
            "environments": environments,
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
            "operators": OPERATORS,
        }
        if self.slack:
            config["slack"] = self.slack
        text = json.dumps(config, indent=2)
        self.config_path.write_text(text + ("\n" + self.extra_config if self.extra_config else ""))

    def seed(self) -> None:
        sm = self.sm()
        sm.create_secret(Name=self.secret_id(), SecretString=json.dumps(self.app_secret()))
        for env in ENVIRONMENTS:
            sm.create_secret(
                Name=self.admin_secret_id(env),
                SecretString=json.dumps({self.app: self.box_for(env).admin_password}),
            )
        if self.copy is not None:
            self._seed_copy(self.copy)
        self.kube.add_external_secret(
            "apps",
            self.external_secret,
            secret_id=self.secret_id(),
            url_scheme="mysql2" if self.engine_name == "mysql" else "postgresql",
        )
        self.kube.add_deployment("apps", self.app, replicas=2, reloads_on=[self.external_secret])
        self.kube.write_kubeconfig(self.kubeconfig, context="staging", contexts=["production"])
        self.write_config()

    def _seed_copy(self, copy: RestoredCopy) -> None:
        """Staging's own secrets (same names, its region), ExternalSecret and Deployment."""
        sm = self.sm(copy.env)
        sm.create_secret(Name=self.secret_id(), SecretString=json.dumps(self.app_secret(copy.env)))
        sm.create_secret(
            Name=self.admin_secret_id(copy.env),
            SecretString=json.dumps({self.app: copy.box.admin_password}),
        )
        copy.kube.add_external_secret(
            "apps", self.external_secret, secret_id=self.secret_id(), url_scheme="postgresql"
        )
        copy.kube.add_deployment("apps", self.app, replicas=2, reloads_on=[self.external_secret])
        copy.kube.write_kubeconfig(self.workdir / f"kubeconfig-{copy.env}", context=copy.env)

    def app_secret(self, env: str | None = None) -> dict[str, Any]:
        box = self.box_for(env)
        return {
            "engine": self.engine_name,
            "host": box.host,
            "port": box.port,
            "dbname": box.database,
            "username": box.app_user,
            "password": box.app_password,
        }

    # -- looking at the world -----------------------------------------------------------------

    def current(self, env: str | None = None) -> dict[str, Any]:
        """AWSCURRENT, asked for by stage (moto answers the old version otherwise)."""
        text = self.sm(env).get_secret_value(SecretId=self.secret_id(), VersionStage="AWSCURRENT")[
            "SecretString"
        ]
        return dict(json.loads(text))

    def stages(self, env: str | None = None) -> dict[str, list[str]]:
        return dict(self.sm(env).describe_secret(SecretId=self.secret_id())["VersionIdsToStages"])

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

    def users(self, env: str | None = None) -> set[str]:
        """Every user/role on the (environment's) server that belongs to this rig."""
        if self.engine_name == "mysql":
            with self.box.root().cursor() as cur:
                cur.execute(
                    "SELECT DISTINCT User FROM mysql.user WHERE User LIKE %s",
                    (self.box.prefix + "%",),
                )
                return {r[0] for r in cur.fetchall()}
        with self.box_for(env).root() as conn:
            return {
                r[0]
                for r in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (self.box.prefix + "%",)
                )
            }

    # -- the overnight restore ---------------------------------------------------------------

    def restore(self) -> None:
        """Play the overnight restore: staging's server gets production's roles of this rig
        (passwords, memberships; staging keeps its own admin password) and a copy of the app's
        database with its owners and grants, as pg_dump makes it."""
        assert self.copy is not None, "rig(..., restored=True) has a restored copy"
        src, dst = self.box, self.copy.box
        like = self.box.prefix + "%"
        with src.root() as s:
            roles = s.execute(
                "SELECT rolname, rolcanlogin, rolpassword FROM pg_authid "
                "WHERE rolname LIKE %s AND rolname <> %s",
                (like, src.admin_user),
            ).fetchall()
            members = set(s.execute(_MEMBERSHIPS, (like, like)).fetchall())
            owner = s.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                (src.database,),
            ).fetchone()[0]
        ident = sql.Identifier
        with dst.root() as d:
            # FORCE: the restore does not wait for staging's sessions, it ends them.
            d.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident(dst.database))
            )
            there = {
                r[0]
                for r in d.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE %s AND rolname <> %s",
                    (like, dst.admin_user),
                )
            }
            wanted = {name for name, _login, _pw in roles}
            for gone in sorted(there - wanted):
                d.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (gone,),
                )
                d.execute(sql.SQL("DROP OWNED BY {}").format(ident(gone)))
                d.execute(sql.SQL("DROP ROLE {}").format(ident(gone)))
            for name, login, password in roles:
                verb = "ALTER" if name in there else "CREATE"
                d.execute(
                    sql.SQL(verb + " ROLE {} WITH {} PASSWORD {}").format(
                        ident(name), sql.SQL("LOGIN" if login else "NOLOGIN"), sql.Literal(password)
                    )
                )
            for role, member in members - set(d.execute(_MEMBERSHIPS, (like, like)).fetchall()):
                d.execute(sql.SQL("GRANT {} TO {}").format(ident(role), ident(member)))
            for role, member in set(d.execute(_MEMBERSHIPS, (like, like)).fetchall()) - members:
                if member != dst.admin_user:  # staging's admin keeps what it needed there
                    d.execute(sql.SQL("REVOKE {} FROM {}").format(ident(role), ident(member)))
            d.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(ident(dst.database), ident(owner))
            )
        bindir = _postgres_bin()
        dump = subprocess.run(
            [str(bindir / "pg_dump"), "--dbname", _conninfo(src, src.database)],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                str(bindir / "psql"),
                "--quiet",
                "--no-psqlrc",
                "-v",
                "ON_ERROR_STOP=1",
                "--dbname",
                _conninfo(dst, dst.database),
            ],
            input=dump.stdout,
            check=True,
            capture_output=True,
        )


_MEMBERSHIPS = """
    SELECT g.rolname, r.rolname FROM pg_auth_members m
    JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member
    WHERE g.rolname LIKE %s AND r.rolname LIKE %s
"""


def _conninfo(box: servers.PostgresSandbox, database: str) -> str:
    return make_conninfo(host=box.host, port=box.port, user=box.root_user, dbname=database)


class ContinuityProbe:
    """Logs in with whatever AWSCURRENT holds, every few milliseconds, and counts failures."""

    def __init__(self, rig: Rig, interval: float = 0.005, env: str | None = None) -> None:
        self.rig = rig
        self.interval = interval
        self.env = env
        self.logins = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="continuity-probe")

    def _run(self) -> None:
        while not self._stop.is_set():
            secret = self.rig.current(self.env)
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


def _secret_reader(url: str, region: str) -> Any:
    sm = moto_client("secretsmanager", url, region)

    def read(secret_id: str) -> str:
        return str(
            sm.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"]
        )

    return read


def _copy_sandbox(box: servers.PostgresSandbox) -> servers.PostgresSandbox:
    """Staging's server: the same names as production's sandbox, its own admin password."""
    host, port, root = second_postgres()
    copy = servers.PostgresSandbox(
        host=host,
        port=port,
        root_user=root,
        prefix=box.prefix,
        database=box.database,
        admin_user=box.admin_user,
        admin_password=servers.password(),
        app_user=box.app_user,
        app_password=box.app_password,
    )
    with copy.root() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEROLE CREATEDB PASSWORD {}").format(
                sql.Identifier(copy.admin_user), sql.Literal(copy.admin_password)
            )
        )
    return copy


@contextmanager
def rig(
    engine_name: str,
    workdir: Path,
    *,
    restored: bool = False,
    clock: Clock | None = None,
    **kwargs: Any,
) -> Iterator[Rig]:
    box = servers.mysql_sandbox() if engine_name == "mysql" else servers.postgres_sandbox()
    assert not restored or engine_name == "postgres", "only PostgreSQL is restored overnight"
    url = moto_url()
    clock = clock or Clock()
    kube = FakeKube(_secret_reader(url, REGION), clock=clock).start()
    copy: RestoredCopy | None = None
    try:
        if restored:
            copy_box = _copy_sandbox(box)
            copy_kube = FakeKube(_secret_reader(url, RESTORED_REGION), clock=clock)
            copy = RestoredCopy(RESTORED, SOURCE, copy_box, copy_kube.start(), RESTORED_REGION)
        world = Rig(
            engine_name, box, workdir, url, kube, app=box.prefix, clock=clock, copy=copy, **kwargs
        )
        kube.catalogue_path = str(world.config_path)
        if copy is not None:
            copy.kube.catalogue_path = str(world.config_path)
        if copy is not None:
            world.restore()  # staging starts as last night's copy of production
        world.seed()
        yield world
    finally:
        kube.stop()
        if copy is not None:
            copy.kube.stop()
            servers.drop_postgres_sandbox(copy.box)
        if engine_name == "mysql":
            servers.drop_mysql_sandbox(box)
        else:
            servers.drop_postgres_sandbox(box)


# -- AWS parts moto's server does not play: ECS deployments, rotation functions ------------


class EcsDeployments:
    """Plays the ECS deployment controller inside moto's server, which has none.

    moto 5 answers update_service(forceNewDeployment=True) by renaming its one deployment (a
    new id, the old rolloutState kept, no ACTIVE deployment left behind) and never moves
    rolloutState. Installed, this makes the forced deployment look as ECS's does: the new one
    PRIMARY and IN_PROGRESS, the old one ACTIVE. `delay` seconds of `clock` later (checked
    lazily, on the next describe_services) it settles as `outcomes[(cluster, service)]`:

    - "COMPLETED" (the default): the new tasks run and the old deployment drains away.
    - "FAILED": the circuit breaker stopped it (rollback off); the old tasks keep running.
    - "ROLLED_BACK": the circuit breaker rolled back: a newer PRIMARY deployment on the old task
      definition completed, ours is gone, and the service is steady again, so the
      `services_stable` waiter passes.
    """

    def __init__(self, clock: Clock, delay: float = 0.0) -> None:
        self.clock = clock
        self.delay = delay
        self.outcomes: dict[tuple[str, str], str] = {}
        self.forced: list[tuple[str, str, str]] = []  # (cluster, service, deployment id)
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def install(self, monkeypatch: Any) -> EcsDeployments:
        import copy as copying

        from moto.ecs.models import EC2ContainerServiceBackend

        original_update = EC2ContainerServiceBackend.update_service
        original_describe = EC2ContainerServiceBackend.describe_services
        controller = self

        def update_service(backend: Any, properties: dict[str, Any]) -> Any:
            force = bool(properties.get("force_new_deployment"))
            service = backend._get_service(properties.get("cluster", "default"),
                                           properties["service"].split("/")[-1])
            before = copying.deepcopy(service.deployments)
            result = original_update(backend, properties)
            if force:
                controller._start(result, before)
            return result

        def describe_services(backend: Any, *args: Any, **kwargs: Any) -> Any:
            controller._settle(backend)
            return original_describe(backend, *args, **kwargs)

        monkeypatch.setattr(EC2ContainerServiceBackend, "update_service", update_service)
        monkeypatch.setattr(EC2ContainerServiceBackend, "describe_services", describe_services)
        return self

    def _start(self, service: Any, before: list[dict[str, Any]]) -> None:
        with self._lock:
            new = service.deployments[0]  # moto gave it a new id and createdAt in place
            new.update(status="PRIMARY", rolloutState="IN_PROGRESS",
                       rolloutStateReason=f"ECS deployment {new['id']} in progress.",
                       runningCount=0, pendingCount=service.desired_count, failedTasks=0,
                       taskDefinition=service.task_definition)
            service.deployments = [new, *({**d, "status": "ACTIVE"} for d in before)]
            self._started[new["id"]] = self.clock()
            self.forced.append((service.cluster_name, service.name, new["id"]))

    def _settle(self, backend: Any) -> None:
        with self._lock:
            for service in backend.services.values():
                primary = next((d for d in service.deployments if d["status"] == "PRIMARY"), None)
                started = self._started.get(primary["id"]) if primary else None
                if (primary is None or started is None or primary["rolloutState"] != "IN_PROGRESS"
                        or self.clock() < started + self.delay):
                    continue
                outcome = self.outcomes.get((service.cluster_name, service.name), "COMPLETED")
                desired = service.desired_count
                if outcome == "COMPLETED":
                    primary.update(rolloutState="COMPLETED", runningCount=desired, pendingCount=0,
                                   rolloutStateReason=f"ECS deployment {primary['id']} completed.")
                    service.deployments = [primary]
                elif outcome == "FAILED":
                    primary.update(rolloutState="FAILED", runningCount=0, pendingCount=0,
                                   failedTasks=3, rolloutStateReason="ECS deployment circuit "
                                   "breaker: tasks failed to start.")
                    continue
                elif outcome == "ROLLED_BACK":
                    old = next((d for d in service.deployments if d["status"] == "ACTIVE"), primary)
                    rollback = f"ecs-svc/{time.time_ns()}"
                    service.deployments = [{
                        **old, "id": rollback, "status": "PRIMARY", "rolloutState": "COMPLETED",
                        "rolloutStateReason": "ECS deployment circuit breaker: rolling back to "
                                              f"deploymentId {old['id']}.",
                        "runningCount": desired, "pendingCount": 0, "failedTasks": 0,
                    }]
                else:
                    raise AssertionError(f"unknown ECS outcome {outcome!r}")
                service.running_count, service.pending_count = desired, 0


class RotationLambda:
    """A Secrets Manager rotation function in Lambda, which moto's server cannot run here.

    moto's rotate_secret does Secrets Manager's part (AWSPENDING on a new version, then the
    function invoked for createSecret, setSecret, testSecret and finishSecret with the
    ClientRequestToken), but runs Lambda functions in docker only. `install` creates the
    function in moto's Lambda, so rotate_secret finds it, and sends moto's invocations of it to
    `handler(event)` on a worker thread: asynchronously and in order, as Secrets Manager invokes
    a real function. A step that raises ends that rotation (its later steps are dropped) and
    leaves AWSPENDING where it is, as in AWS. While `hold` is set the worker waits.
    """

    def __init__(self, moto: str, name: str, handler: Any, region: str = REGION) -> None:
        self.moto, self.name, self.handler, self.region = moto, name, handler, region
        self.arn = ""
        self.events: list[dict[str, Any]] = []  # every invocation moto made, in order
        self.done: list[tuple[str, str]] = []  # (step, token) that returned
        self.errors: list[str] = []
        self.hold = threading.Event()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, daemon=True, name=f"lambda-{name}")

    def _client(self, service: str) -> Any:
        return moto_client(service, self.moto, self.region)

    def install(self, monkeypatch: Any) -> RotationLambda:
        import io
        import zipfile

        from moto.awslambda.models import LambdaBackend

        code = io.BytesIO()
        with zipfile.ZipFile(code, "w") as archive:
            archive.writestr("rotate.py", "def handler(event, context):\n    pass\n")
        role = self._client("iam").create_role(
            RoleName=f"{self.name}-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        self.arn = self._client("lambda").create_function(
            FunctionName=self.name, Runtime="python3.11", Role=role, Handler="rotate.handler",
            Code={"ZipFile": code.getvalue()})["FunctionArn"]
        original = LambdaBackend.invoke
        function = self

        def invoke(backend: Any, function_name: str, qualifier: Any, body: Any, headers: Any,
                   response_headers: Any) -> Any:
            if function_name not in (function.arn, function.name):
                return original(backend, function_name, qualifier, body, headers,
                                response_headers)
            event = json.loads(body)
            function.events.append(event)
            function._queue.put(event)
            return b""  # accepted: Secrets Manager does not wait for the function

        monkeypatch.setattr(LambdaBackend, "invoke", invoke)
        self._thread.start()
        return self

    def _work(self) -> None:
        failed: set[str] = set()
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                while self.hold.is_set():
                    time.sleep(0.01)
                token = event["ClientRequestToken"]
                if token in failed:
                    continue
                try:
                    self.handler(event)
                except Exception as exc:  # a failing function: AWS logs it and stops there
                    failed.add(token)
                    self.errors.append(f"{event['Step']}: {type(exc).__name__}: {exc}")
                else:
                    self.done.append((event["Step"], token))
            finally:
                self._queue.task_done()

    def idle(self, timeout: float | None = None) -> None:
        """Return once every invocation so far has run (or failed)."""
        wait_for(lambda: self._queue.unfinished_tasks, lambda left: left == 0,
                 what=f"the rotation function {self.name} to finish", timeout=timeout)

    def stop(self) -> None:
        self.hold.clear()
        self._queue.put(None)
        self._thread.join(timeout=5)


def point_at(world: Rig, monkeypatch: Any) -> None:
    """Point this process's Rotor (Settings.load, boto3) at the rig, as a subprocess would be."""
    for key, value in world.env().items():
        if key.startswith(("AWS_", "ROTOR_", "KUBECONFIG")):
            monkeypatch.setenv(key, value)


def drive(
    engine: Any,
    rotation_id: int,
    *,
    approver: str | None = "bob",
    until: str | Callable[[RotationRow], bool] | None = None,
    park_after: float = 5,
    limit: float = DEADLINE,
) -> RotationRow:
    """Run a rotation like the worker does, approving every gate as `approver`.

    Returns when the rotation is finished or failed; when a gate waits and `approver` is None;
    when `until` holds (a step name: that step is waiting); or when it is parked on a wait
    longer than `park_after` seconds of the engine's clock (the test moves the clock then).
    """
    stop = (lambda row: row.current.name == until and row.current.status == "waiting") \
        if isinstance(until, str) else until
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        row = engine.advance(rotation_id)
        step = row.current
        if row.status != "active" or step is None or step.status == "failed":
            return row
        if stop is not None and stop(row):
            return row
        if step.status == "needs-approval":
            if approver is None:
                return row
            engine.approve(rotation_id, step.name, approver)
        elif step.status == "waiting":
            due = (step.next_check_at or 0) - engine.clock()
            if due > park_after:
                return row
            time.sleep(max(0.0, min(0.05, due)))
    raise AssertionError(f"rotation #{rotation_id} did not settle in {limit}s: {row.phase}")


def timed_rotation(engine: Any, kind: str, target: str, env: str,
                   params: dict[str, Any] | None = None) -> tuple[float, RotationRow]:
    """Wall time of a whole rotation, approvals granted (for the benchmarks)."""
    started = time.perf_counter()
    rotation = engine.start(kind, target, env, "alice", params or {})
    row = drive(engine, rotation.id, limit=120)
    elapsed = time.perf_counter() - started
    if row.status != "done":
        raise AssertionError([(s.name, s.status, s.error) for s in row.steps])
    return elapsed, row


def timed_rotor(world: Rig, *args: str) -> float:
    """Wall time of a `rotor` subprocess, start-up included (for the benchmarks)."""
    started = time.perf_counter()
    result = subprocess.run(world.rotor() + list(args), env=world.env(), capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return time.perf_counter() - started


def read_state(path: Path) -> tuple[dict[str, str], str | None]:
    """Step statuses and the rotation's status, read as another process would.

    A read right after a SIGKILL may hit a half-written WAL and fail for a moment: it is
    tried again, so a finished rotation is never mistaken for an unfinished one."""

    def read() -> tuple[dict[str, str], str | None] | str:
        if not path.exists():
            return {}, None  # not created yet
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
                steps = dict(conn.execute("SELECT name, status FROM steps"))
                rotation = conn.execute("SELECT status FROM rotations").fetchone()
                return steps, rotation[0] if rotation else None
        except sqlite3.OperationalError as exc:
            if not path.exists() or "no such table" in str(exc):
                return {}, None  # not created yet
            return f"{type(exc).__name__}: {exc}"  # read again

    state = wait_for(read, lambda got: not isinstance(got, str), what=f"a read of {path}")
    assert not isinstance(state, str)
    return state
