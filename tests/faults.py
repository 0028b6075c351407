"""The machinery of the fault-injection suite: worlds, workers, faults and the referee.

A `Referee` watches every side effect at the moment it passes the lease check (it wraps
`fence.Lease.check`, through which every SQL write, AWS write, Kubernetes patch and 2nd line
post goes) and judges it there: the worker holds the current lease, the rotation was not
cancelled, and a destructive effect has a matching approval that is still valid. After each
action it judges the world: AWSCURRENT logs in (or is an active key), at most one new user
or key per rotation, no secret in the state DB, the logs or a Slack call.

Faults are injected where the real thing happens: botocore answers (throttling, 5xx) through
its `before-send` event, a database connection dropped by the server from another session,
a worker "SIGKILLed" (its thread stops at a side effect and never releases its lease), a
worker paused past its lease (its thread blocks at a side effect, its heartbeat stopped).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.awsrequest import AWSResponse

from bot.settings import Settings
from bot.wiring import kinds
from rotation import fence
from rotation.clients import Clients
from rotation.engine import Engine
from rotation.store import RotationRow, Store
from tests import servers
from tests.rig import AWS_ENV, Clock, Rig, moto_client, moto_url, rig

STATES = ("sqlite", "postgres")  # where a world keeps Rotor's state

DESTRUCTIVE = re.compile(r"DROP USER|DROP ROLE|DROP OWNED|REASSIGN OWNED|^run KILL|rds_kill|"
                         r"pg_terminate_backend|DeleteAccessKey|UpdateAccessKey Inactive")


class Killed(BaseException):
    """The worker's process was SIGKILLed here: nothing after this line ran."""


@dataclass
class Notices:
    """The 2nd line notifier: records what would be posted to Slack."""

    posted: list[str] = field(default_factory=list)

    def notify(self, rotation: Any, step: Any, summary: str, approved_by: str) -> str:
        self.posted.append(f"{rotation.id} {step.name}: {summary} ({approved_by})")
        return "https://slack.example/archives/C2/p1"


class Worker:
    """One Rotor process: its own state DB connection, engine and clients."""

    def __init__(self, world: FaultWorld, name: str) -> None:
        settings = Settings.load()
        self.name = name
        self.store = Store(settings.state_path, clock=world.clock)
        self.clients = Clients(settings.catalogue, kubeconfig=settings.kubeconfig)
        self.engine = Engine(self.store, settings.catalogue, kinds(), self.clients,
                             second_line=world.notices, clock=world.clock)
        self.engine.heartbeat = 0.05
        self.dead = False
        world.referee.faulty_aws(self.clients, world.aws_services)

    def kill(self) -> None:
        """As SIGKILL: the lease stays held (nothing releases it), the process is gone."""
        self.dead = True
        self.store.release = lambda *a, **k: None  # type: ignore[method-assign]


class Referee:
    """Checks every side effect as it happens, and the world after every action.

    It reads the state through a `Store` of its own (its own connections), so it judges a
    SQLite file and a PostgreSQL database alike."""

    def __init__(self, state: str | Path, clock: Clock) -> None:
        self.state = str(state)
        self.clock = clock
        self._store: Store | None = None
        self.violations: list[str] = []
        self.faults: Counter[str] = Counter()
        self.effects: list[tuple[str, int, str]] = []
        self.aws_faults: list[str] = []  # "throttle" / "5xx", one per call to fail
        self.kill_at: dict[str, int] = {}  # worker owner -> side effects left before the kill
        self.pause_at: dict[str, int] = {}
        self.paused, self.resume = threading.Event(), threading.Event()
        self.workers: dict[str, Worker] = {}
        self.drop_connection: Callable[[], None] | None = None
        self.drop_next = False
        self._kill_rounds: dict[tuple[int, str, float], set[int]] = {}
        self._lock = threading.Lock()

    def violation(self, name: str, detail: str) -> None:
        self.violations.append(f"{name}: {detail}")

    # -- at each side effect -------------------------------------------------------------

    @property
    def store(self) -> Store:
        """Opened on first use: the state DB exists once a worker made it."""
        if self._store is None:
            self._store = Store(self.state, clock=self.clock)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def before(self, lease: fence.Lease, what: str) -> None:
        owner = lease.owner
        with self._lock:
            if owner in self.kill_at:
                self.kill_at[owner] -= 1
                if self.kill_at[owner] <= 0:
                    del self.kill_at[owner]
                    self.faults["sigkill"] += 1
                    self.workers[owner].kill()
                    raise Killed(what)
            pause = False
            if owner in self.pause_at:
                self.pause_at[owner] -= 1
                if self.pause_at[owner] <= 0:
                    del self.pause_at[owner]
                    pause = True
            drop = self.drop_next and what.startswith("run ") and self.drop_connection
            if drop:
                self.drop_next = False
        if pause:
            self.faults["pause-past-lease"] += 1
            self.paused.set()
            self.resume.wait(120)
        if drop and self.drop_connection is not None:
            self.faults["db-connection-dropped"] += 1
            self.drop_connection()

    def after(self, lease: fence.Lease, what: str) -> None:
        """The side effect is about to happen: judge it now."""
        rid = lease.rotation_id
        rotation = self.store.rotation(rid)
        owner, token, status = rotation.lease_owner, rotation.lease_token, rotation.status
        self.effects.append((lease.owner, rid, what))
        if (owner, token) != (lease.owner, lease.token):
            self.violation("lease", f"#{rid} {what} by {lease.owner} (token {lease.token}) "
                                    f"while {owner} holds token {token}")
        if status == "cancelled":
            self.violation("after-cancel", f"#{rid} {what} after the cancel completed")
        if DESTRUCTIVE.search(what):
            self._judge_destructive(rotation, what)

    def _judge_destructive(self, rotation: RotationRow, what: str) -> None:
        rid, initiator, env = rotation.id, rotation.initiator, rotation.env
        step = next((s for s in rotation.steps if s.status not in ("done", "skipped")), None)
        if step is None:
            self.violation("approval", f"#{rid} {what} with no step running")
            return
        name, decision, decided_by, decided_at = (step.name, step.decision, step.decided_by,
                                                  step.decided_at)
        notice_at, hold_until, checks = step.notice_at, step.hold_until, step.checks
        if decision != "approved":
            self.violation("approval", f"#{rid} {name}: {what} without an approval")
            return
        if env == "production":
            if decided_by == initiator:
                self.violation("four-eyes", f"#{rid} {name}: {what} approved by the starter")
            if notice_at is None or notice_at < decided_at or (hold_until or 0) > self.clock():
                self.violation("second-line", f"#{rid} {name}: {what} before 2nd line was told "
                                              "and the hold passed")
        retried = max((r.at for r in self.store.audit_rows(rid, limit=1_000_000)
                       if r.step == name and r.event in ("retried", "held")), default=None)
        if retried is not None and decided_at is not None and decided_at < retried:
            self.violation("approval-reused", f"#{rid} {name}: {what} on an approval given "
                                              "before the step was retried")
        rounds = self._kill_rounds.setdefault((rid, name, decided_at), set())
        rounds.add(checks)
        if len(rounds) > 1:
            self.violation("approval-reused", f"#{rid} {name}: {what}: one approval used for "
                                              f"{len(rounds)} rounds")

    # -- faults in AWS answers ------------------------------------------------------------

    def faulty_aws(self, clients: Clients, services: tuple[str, ...]) -> None:
        for service in services:
            for env in ("staging", "production"):
                clients.aws(env, service).meta.events.register("before-send", self._aws_answer)

    def _aws_answer(self, request: Any, **_: Any) -> AWSResponse | None:
        with self._lock:
            if not self.aws_faults:
                return None
            fault = self.aws_faults.pop(0)
        self.faults[f"aws-{fault}"] += 1
        xml = "xml" in request.headers.get("Content-Type", b"").decode() or \
            b"Action=" in (request.body or b"")
        code, status = ("Throttling", 400) if fault == "throttle" else ("InternalFailure", 500)
        if xml:
            body = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
                    f"<Message>injected</Message></Error></ErrorResponse>").encode()
            headers = {"Content-Type": "text/xml"}
        else:
            body = json.dumps({"__type": code, "message": "injected"}).encode()
            headers = {"Content-Type": "application/x-amz-json-1.1"}
        return AWSResponse(request.url, status, headers, _Raw(body))

    # -- after each action -----------------------------------------------------------------

    def no_secrets(self, secrets: list[str], log_lines: list[str], notices: list[str]) -> None:
        # Every value of every row, as stored (no quoting that could hide one).
        dump = "\n".join(str(value) for table in Store.TABLES
                         for row in self.store.table_rows(table)[1] for value in row)
        for value in secrets:
            if len(value) < 8:
                continue
            for where, text in (("state DB", dump), ("log", "\n".join(log_lines)),
                                ("Slack", "\n".join(notices))):
                if value in text:
                    self.violation("secret", f"a secret value is in the {where}")


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


@contextmanager
def watching(referee: Referee) -> Iterator[None]:
    """Route every lease check through the referee (process-wide while it lasts)."""
    original = fence.Lease.check

    def check(lease: fence.Lease, what: str) -> None:
        referee.before(lease, what)
        original(lease, what)
        referee.after(lease, what)

    fence.Lease.check = check  # type: ignore[method-assign]
    try:
        yield
    finally:
        fence.Lease.check = original  # type: ignore[method-assign]


class LogLines(logging.Handler):
    """Every log record's message, unredacted, as a leak would reach a log file."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
            if record.exc_info and record.exc_info[1] is not None:
                self.lines.append(str(record.exc_info[1]))
        except Exception:
            self.lines.append(str(record.msg))


# -- worlds --------------------------------------------------------------------------------


class FaultWorld:
    """One kind's world for one example: servers, secrets, the clock, the referee."""

    kind: str
    aws_services: tuple[str, ...] = ("secretsmanager",)

    def __init__(self, workdir: Path, state: str = "sqlite") -> None:
        if state not in STATES:
            raise ValueError(f"state {state!r}: one of {', '.join(STATES)}")
        self.workdir = workdir
        self.stack = ExitStack()
        # PostgreSQL: a uniquely named database, dropped last (after every store closed).
        self.state = (self.stack.enter_context(_postgres_state()) if state == "postgres"
                      else str(self.state_path))
        self.clock = Clock()
        self.notices = Notices()
        self.referee = Referee(self.state, self.clock)
        self.stack.callback(self.referee.close)
        self.logs = LogLines()
        self._env: dict[str, str | None] = {}

    @property
    def state_path(self) -> Path:
        """Where the SQLite state lives (when the world keeps it in SQLite)."""
        return self.workdir / "state.db"

    def set_env(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def open(self) -> None:
        for name in ("rotor", "rotation", "bot", "handlers"):  # Rotor's own loggers
            logger = logging.getLogger(name)
            self.stack.callback(logger.setLevel, logger.level)
            self.stack.callback(logger.removeHandler, self.logs)
            logger.addHandler(self.logs)
            logger.setLevel(logging.DEBUG)
        self.stack.enter_context(watching(self.referee))

    def close(self) -> None:
        self.stack.close()
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # per kind
    def target(self) -> str:
        raise NotImplementedError

    def check_current(self) -> str | None:
        """None when AWSCURRENT works; otherwise why not."""
        raise NotImplementedError

    def made(self) -> set[str]:
        """The users or keys that exist now and did not before the example."""
        raise NotImplementedError

    def left_behind(self) -> set[str]:
        raise NotImplementedError

    def secrets(self) -> list[str]:
        raise NotImplementedError

    def edit_secret(self) -> None:
        raise NotImplementedError

    def move_current_back(self) -> bool:
        raise NotImplementedError


class DatabaseWorld(FaultWorld):
    """mysql or postgres: the rig's database, moto's server, the fake Kubernetes API."""

    def __init__(self, workdir: Path, engine: str, state: str = "sqlite") -> None:
        super().__init__(workdir, state)
        self.kind = engine
        self.rig: Rig = self.stack.enter_context(rig(engine, workdir, clock=self.clock))
        self.set_env({**{k: v for k, v in self.rig.env().items()
                         if k.startswith(("AWS_", "ROTOR_", "KUBECONFIG"))},
                      "ROTOR_STATE": self.state})
        self.before = self._logins()
        self.referee.drop_connection = self._drop_admin_connections
        self.open()

    @property
    def state_path(self) -> Path:
        return self.workdir / "rotor.db"

    def target(self) -> str:
        return self.rig.app

    def _drop_admin_connections(self) -> None:
        box = self.rig.box
        if self.kind == "mysql":
            with box.root().cursor() as cur:
                cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s",
                            (box.admin_user,))
                for (conn_id,) in cur.fetchall():
                    try:
                        cur.execute("KILL CONNECTION %s", (int(conn_id),))
                    except Exception:
                        pass  # already gone
        else:
            with box.root() as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE usename = %s AND pid <> pg_backend_pid()", (box.admin_user,))

    def check_current(self) -> str | None:
        try:
            self.rig.login(self.rig.current())
        except Exception as exc:
            return f"AWSCURRENT does not log in: {type(exc).__name__}"
        return None

    def _logins(self) -> set[str]:
        """Users that can log in (PostgreSQL's owner role is a group, not a user)."""
        if self.kind == "postgres":
            with self.rig.box.root() as conn:
                return {r[0] for r in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolcanlogin AND rolname LIKE %s",
                    (self.rig.box.prefix + "%",))}
        return self.rig.users()

    def made(self) -> set[str]:
        return self._logins() - self.before

    def left_behind(self) -> set[str]:
        """Users made here that nothing uses: no labelled version of the secret names them and
        no Kubernetes Secret holds them (what a finished cleanup must have dropped)."""
        sm, secret = self.rig.sm(), self.rig.secret_id()
        named = set()
        for version in sm.list_secret_version_ids(SecretId=secret)["Versions"]:
            if version.get("VersionStages"):
                text = sm.get_secret_value(SecretId=secret, VersionId=version["VersionId"])
                named.add(json.loads(text["SecretString"]).get("username"))
        with self.rig.kube._lock:
            mounted = " ".join(base64.b64decode(value).decode()
                               for obj in self.rig.kube._secrets.values()
                               for value in (obj.get("data") or {}).values())
        return {user for user in self.made() - named if f"//{user}:" not in mounted}

    def secrets(self) -> list[str]:
        sm = self.rig.sm()
        found = [self.rig.box.admin_password, self.rig.box.app_password]
        versions = sm.list_secret_version_ids(SecretId=self.rig.secret_id(),
                                              IncludeDeprecated=True)["Versions"]
        for version in versions:
            try:
                text = sm.get_secret_value(SecretId=self.rig.secret_id(),
                                           VersionId=version["VersionId"])["SecretString"]
            except Exception:
                continue
            found.append(str(json.loads(text).get("password", "")))
        return found

    def edit_secret(self) -> None:
        """A person edits the secret: same credentials, one more field; a new AWSCURRENT."""
        current = self.rig.current()
        current["note"] = f"edited {uuid.uuid4().hex[:6]}"
        self.rig.sm().put_secret_value(SecretId=self.rig.secret_id(),
                                       SecretString=json.dumps(current))

    def move_current_back(self) -> bool:
        """A person rolls AWSCURRENT back to AWSPREVIOUS by hand."""
        stages = self.rig.stages()
        previous = next((v for v, s in stages.items() if "AWSPREVIOUS" in s), None)
        current = next((v for v, s in stages.items() if "AWSCURRENT" in s), None)
        if previous is None or current is None:
            return False
        self.rig.sm().update_secret_version_stage(
            SecretId=self.rig.secret_id(), VersionStage="AWSCURRENT",
            MoveToVersionId=previous, RemoveFromVersionId=current)
        return True


class IamWorld(FaultWorld):
    """iam-key: an IAM user with one key, held by a secret, in moto's server."""

    kind = "iam-key"
    aws_services = ("secretsmanager", "iam")

    def __init__(self, workdir: Path, state: str = "sqlite") -> None:
        super().__init__(workdir, state)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.user = f"rt-{uuid.uuid4().hex[:8]}"
        self.secret_id = f"fault/{self.user}/aws"
        config = self.workdir / "rotor.yml"
        environments = {"staging": {"aws_region": "eu-west-1"},
                        "production": {"aws_region": "eu-west-1"}}
        config.write_text(json.dumps({
            "environments": environments,
            "iam_users": {self.user: {"grace_days": 1, "environments": {
                env: {"secrets": [{"id": self.secret_id}]} for env in environments}}},
            "waits": {"first_check": 0.02, "max_check": 0.25, "sync": 20, "rollout": 30,
                      "drain": 1, "rollout_start": 2, "sync_error_grace": 0.1},
        }))
        self.set_env({**AWS_ENV, "AWS_ENDPOINT_URL": moto_url(), "ROTOR_CONFIG": str(config),
                      "ROTOR_STATE": self.state})
        self.iam, self.sm = moto_client("iam"), moto_client("secretsmanager")
        self.iam.create_user(UserName=self.user)
        key = self.iam.create_access_key(UserName=self.user)["AccessKey"]
        self.sm.create_secret(Name=self.secret_id, SecretString=json.dumps(
            {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
             "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}))
        self.before = {key["AccessKeyId"]}
        self.stack.callback(self._cleanup)
        self.open()

    def _cleanup(self) -> None:
        for key in self.iam.list_access_keys(UserName=self.user)["AccessKeyMetadata"]:
            self.iam.delete_access_key(UserName=self.user, AccessKeyId=key["AccessKeyId"])
        self.iam.delete_user(UserName=self.user)
        self.sm.delete_secret(SecretId=self.secret_id, ForceDeleteWithoutRecovery=True)

    def target(self) -> str:
        return self.user

    def _current(self) -> dict[str, Any]:
        return dict(json.loads(self.sm.get_secret_value(
            SecretId=self.secret_id, VersionStage="AWSCURRENT")["SecretString"]))

    def check_current(self) -> str | None:
        key_id = self._current().get("AWS_ACCESS_KEY_ID")
        keys = {k["AccessKeyId"]: k["Status"] for k in
                self.iam.list_access_keys(UserName=self.user)["AccessKeyMetadata"]}
        if keys.get(key_id) != "Active":
            return f"AWSCURRENT's key is {keys.get(key_id, 'deleted')}"
        return None

    def made(self) -> set[str]:
        keys = {k["AccessKeyId"] for k in
                self.iam.list_access_keys(UserName=self.user)["AccessKeyMetadata"]}
        return keys - self.before

    def secrets(self) -> list[str]:
        found = []
        for version in self.sm.list_secret_version_ids(SecretId=self.secret_id,
                                                       IncludeDeprecated=True)["Versions"]:
            try:
                text = self.sm.get_secret_value(SecretId=self.secret_id,
                                                VersionId=version["VersionId"])["SecretString"]
            except Exception:
                continue
            found.append(str(json.loads(text).get("AWS_SECRET_ACCESS_KEY", "")))
        return found

    def edit_secret(self) -> None:
        current = self._current()
        current["note"] = f"edited {uuid.uuid4().hex[:6]}"
        self.sm.put_secret_value(SecretId=self.secret_id, SecretString=json.dumps(current))

    def move_current_back(self) -> bool:
        stages = self.sm.describe_secret(SecretId=self.secret_id)["VersionIdsToStages"]
        previous = next((v for v, s in stages.items() if "AWSPREVIOUS" in s), None)
        current = next((v for v, s in stages.items() if "AWSCURRENT" in s), None)
        if previous is None or current is None:
            return False
        self.sm.update_secret_version_stage(SecretId=self.secret_id, VersionStage="AWSCURRENT",
                                            MoveToVersionId=previous,
                                            RemoveFromVersionId=current)
        return True


class SecretWorld(DatabaseWorld):
    """secret: the MySQL rig's app secret with AWS's alternating-users rotation function,
    an ECS service and the Kubernetes consumers (as tests/test_managed_secret.py sets up)."""

    aws_services = ("secretsmanager", "ecs")

    def __init__(self, workdir: Path, state: str = "sqlite") -> None:
        import pytest

        from tests.rig import EcsDeployments, RotationLambda
        from tests.test_managed_secret import AlternatingUsers

        super().__init__(workdir, "mysql", state)
        self.kind = "secret"
        patch = pytest.MonkeyPatch()
        self.stack.callback(patch.undo)
        world = self.rig
        function = RotationLambda(world.moto, f"{world.app}-rotate", AlternatingUsers(world))
        function.install(patch)
        self.stack.callback(function.stop)
        EcsDeployments(self.clock).install(patch)
        service = world.ecs_service()
        world.sm().rotate_secret(SecretId=world.secret_id(), RotationLambdaARN=function.arn,
                                 RotationRules={"AutomaticallyAfterDays": 30})
        function.idle()
        config = json.loads(world.config_path.read_text())
        config["secrets"] = {world.secret_id(): {"rollback_minutes": 30, "environments": {
            "staging": {"external_secrets": [world.external_secret],
                        "deployments": [world.app],
                        "ecs_services": [service]},
            "production": {"external_secrets": [world.external_secret],
                           "deployments": [world.app]}}}}
        world.config_path.write_text(json.dumps(config, indent=2))
        self.before = self._logins()

    def target(self) -> str:
        return self.rig.secret_id()

    def move_current_back(self) -> bool:
        """A person rolls back by hand, except in the one window where AWS's alternating-users
        scheme makes AWSPREVIOUS stale: between the rotation function's setSecret (which
        changes the password of the user AWSPREVIOUS names, the one the pending version
        takes over) and its finishSecret. Rolling back then restores a password the function
        has just replaced; that is the function's design, not Rotor's doing, and the
        console shows the rotation still in progress. Any other stale AWSPREVIOUS is moved
        to, and judged."""
        stages = self.rig.stages()
        if (any("AWSPENDING" in s for s in stages.values())
                and any("AWSPREVIOUS" in s for s in stages.values())):
            previous = json.loads(self.rig.sm().get_secret_value(
                SecretId=self.rig.secret_id(), VersionStage="AWSPREVIOUS")["SecretString"])
            try:
                self.rig.login(previous)
            except Exception:
                self.referee.faults["awscurrent-move-skipped-mid-function"] += 1
                return False
        return super().move_current_back()


@contextmanager
def _postgres_state() -> Iterator[str]:
    url = servers.postgres_state_db()
    try:
        yield url
    finally:
        servers.drop_postgres_state_db(url)


def make_world(kind: str, workdir: Path, state: str = "sqlite") -> FaultWorld:
    """`state`: where Rotor's state lives, "sqlite" (a file in `workdir`) or "postgres" (a
    uniquely named database on the local server, dropped when the world closes)."""
    if kind == "secret":
        return SecretWorld(workdir, state)
    if kind in ("mysql", "postgres"):
        return DatabaseWorld(workdir, kind, state)
    if kind == "iam-key":
        return IamWorld(workdir, state)
    raise ValueError(kind)
