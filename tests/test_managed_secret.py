"""Kind `secret` end to end: moto's Secrets Manager and ECS, a real rotation function, the fake
Kubernetes API and real MariaDB logins.

The secret is the rig's app credential (`govuk/<app>/mysql`). Its rotation function is AWS's
MySQL alternating-users sample, in Python, run by `tests.rig.RotationLambda`: moto's own
rotate_secret stages AWSPENDING and invokes the function's four steps, and the function does
its work against moto and MariaDB from a worker thread, as a Lambda would. Nothing fakes
rotate_secret. ECS deployments are settled by `tests.rig.EcsDeployments`.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from botocore.exceptions import ClientError

from bot.settings import Settings
from bot.wiring import build_engine
from rotation.engine import Engine
from rotation.errors import UnknownName
from tests.rig import Rig, RotationLambda, drive

CLONE = "_clone"


class AlternatingUsers:
    """AWS's sample rotation function for MySQL, alternating-users strategy.

    One method per step; each first checks whether its work is already done. The previous
    user keeps working until the next rotation, which is what makes a roll back safe.
    """

    def __init__(self, world: Rig) -> None:
        self.world = world
        self.sm = world.sm()
        self.fail_at: str | None = None
        # The sample leaves AWSPENDING on the new AWSCURRENT version, which AWS accepts; moto's
        # rotate_secret refuses the next rotation then ("Previous rotation request is still in
        # progress", its check is the wrong way round), so by default this clears it too.
        self.clear_pending = True

    def __call__(self, event: dict[str, Any]) -> None:
        arn, token, step = event["SecretId"], event["ClientRequestToken"], event["Step"]
        stages = self.sm.describe_secret(SecretId=arn)["VersionIdsToStages"]
        if token not in stages:
            raise ValueError(f"secret version {token} has no stage for rotation")
        if "AWSCURRENT" in stages[token]:
            return
        if "AWSPENDING" not in stages[token]:
            raise ValueError(f"secret version {token} is not AWSPENDING")
        if step == self.fail_at:
            raise RuntimeError(f"{step}: the database refused the change")
        getattr(self, step)(arn, token)

    def _get(self, arn: str, stage: str, version: str | None = None) -> dict[str, Any]:
        extra = {"VersionId": version} if version else {}
        return dict(
            json.loads(
                self.sm.get_secret_value(SecretId=arn, VersionStage=stage, **extra)["SecretString"]
            )
        )

    def _connect(self, secret: dict[str, Any], **kwargs: Any) -> pymysql.Connection:
        return pymysql.connect(
            host=secret["host"],
            port=int(secret["port"]),
            user=secret["username"],
            password=secret["password"],
            ssl_disabled=True,
            connect_timeout=5,
            autocommit=True,
            **kwargs,
        )

    # One method per step, named as Secrets Manager names them.
    def createSecret(self, arn: str, token: str) -> None:
        current = self._get(arn, "AWSCURRENT")
        try:
            self._get(arn, "AWSPENDING", token)
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
        user = current["username"]
        pending = {
            **current,
            "username": user[: -len(CLONE)] if user.endswith(CLONE) else user + CLONE,
            "password": self.sm.get_random_password(PasswordLength=32, ExcludePunctuation=True)[
                "RandomPassword"
            ],
        }
        self.sm.put_secret_value(
            SecretId=arn,
            ClientRequestToken=token,
            SecretString=json.dumps(pending),
            VersionStages=["AWSPENDING"],
        )

    def setSecret(self, arn: str, token: str) -> None:
        pending = self._get(arn, "AWSPENDING", token)
        try:
            self._connect(pending).close()
            return
        except pymysql.err.OperationalError:
            pass
        box = self.world.box
        admin = json.loads(
            self.sm.get_secret_value(SecretId=self.world.admin_secret_id("staging"))["SecretString"]
        )[self.world.app]
        conn = pymysql.connect(
            host=box.host,
            port=box.port,
            user=box.admin_user,
            password=admin,
            ssl_disabled=True,
            autocommit=True,
        )
        with conn.cursor() as cur:
            user = pending["username"]
            cur.execute(
                "CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s", (user, pending["password"])
            )
            cur.execute(f"GRANT ALL PRIVILEGES ON `{pending['dbname']}`.* TO %s@'%%'", (user,))
            cur.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (user, pending["password"]))
        conn.close()

    def testSecret(self, arn: str, token: str) -> None:
        pending = self._get(arn, "AWSPENDING", token)
        conn = self._connect(pending, database=pending["dbname"])
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.close()

    def finishSecret(self, arn: str, token: str) -> None:
        stages = self.sm.describe_secret(SecretId=arn)["VersionIdsToStages"]
        current = next(v for v, s in stages.items() if "AWSCURRENT" in s)
        if current != token:
            self.sm.update_secret_version_stage(
                SecretId=arn,
                VersionStage="AWSCURRENT",
                MoveToVersionId=token,
                RemoveFromVersionId=current,
            )
        if self.clear_pending:
            self.sm.update_secret_version_stage(
                SecretId=arn, VersionStage="AWSPENDING", RemoveFromVersionId=token
            )



def turn_on_rotation(world: Rig, monkeypatch: pytest.MonkeyPatch) -> RotationLambda:
    """The rotation function, turned on for the secret (which rotates it once, as AWS does)."""
    handler = AlternatingUsers(world)
    fn = RotationLambda(world.moto, f"{world.app}-rotate", handler).install(monkeypatch)
    world.sm().rotate_secret(
        SecretId=world.secret_id(),
        RotationLambdaARN=fn.arn,
        RotationRules={"AutomaticallyAfterDays": 30},
    )
    fn.idle()
    assert not fn.errors, fn.errors
    return fn


@pytest.fixture
def function(world, monkeypatch) -> Iterator[RotationLambda]:
    fn = turn_on_rotation(world, monkeypatch)
    yield fn
    fn.stop()


@pytest.fixture
def service(world) -> dict[str, str]:
    return world.ecs_service()


@pytest.fixture
def configured(world, service) -> Rig:
    return configure(world, service)


def configure(world: Rig, service: dict[str, str]) -> Rig:
    """The rig's app secret in the catalogue, with its consumers in staging."""
    config = json.loads(world.config_path.read_text())
    config["secrets"] = {
        world.secret_id(): {
            "rollback_minutes": 30,
            "environments": {
                "staging": {
                    "external_secrets": [world.external_secret],
                    "deployments": [world.app],
                    "ecs_services": [service],
                }
            },
        }
    }
    world.config_path.write_text(json.dumps(config, indent=2))
    return world


def engine_for(world: Rig) -> Engine:
    return build_engine(Settings.load(), clock=world.clock)




def test_a_rotation_redeploys_every_consumer_and_ends_after_the_grace_period(
    configured, function, deployments, caplog
):
    world = configured
    caplog.set_level(logging.DEBUG, logger="rotor")
    before = world.current()
    engine = engine_for(world)
    rotation = engine.start("secret", world.secret_id(), "staging", "alice")
    row = drive(engine, rotation.id, until="grace")
    assert "Roll back" in row.current.wait_reason

    after = world.current()
    assert after["username"] != before["username"] and after["password"] != before["password"]
    world.login(after)  # the function really changed the database
    token = engine.store.rotation(rotation.id).data["token"]
    assert [e["Step"] for e in function.events if e["ClientRequestToken"] == token] == [
        "createSecret",
        "setSecret",
        "testSecret",
        "finishSecret",
    ]
    assert world.stages()[token] == ["AWSCURRENT"]
    url = world.kube.secret_data("apps", world.external_secret)["DATABASE_URL"]
    assert f"//{after['username']}:{after['password']}@" in url
    assert [d[2] for d in deployments.forced] and row.step("ecs").status == "done"

    world.clock.advance(30 * 60)
    final = drive(engine, rotation.id)
    assert final.status == "done", [(s.name, s.status, s.error) for s in final.steps]
    assert "no roll back asked for within 30 min" in final.step("grace").result
    assert {s.status for s in final.steps if s.name.startswith("rollback-")} == {"skipped"}

    preflight = final.step("preflight").result
    assert "rotation on" in preflight and function.arn in preflight and "every 30 days" in preflight
    dump = "\n".join(engine.store.db.iterdump())
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for password in (before["password"], after["password"]):
        assert password not in dump and password not in logs and password not in preflight


def test_roll_back_restores_the_previous_version_and_redeploys_again(
    configured, function, deployments
):
    world = configured
    function.handler.clear_pending = False  # as AWS's sample leaves it
    before = world.current()
    engine = engine_for(world)
    rotation = engine.start("secret", world.secret_id(), "staging", "alice")
    drive(engine, rotation.id, until="grace")
    data = engine.store.rotation(rotation.id).data
    new, old = data["token"], data["before_version"]
    assert "AWSPENDING" in world.stages()[new]

    engine.request(rotation.id, "rollback", "bob")
    final = drive(engine, rotation.id)
    assert final.status == "done", [(s.name, s.status, s.error) for s in final.steps]
    assert final.step("grace").result.startswith("rolled back by bob")
    assert world.stages()[old] == ["AWSCURRENT"] and world.stages()[new] == ["AWSPREVIOUS"]
    assert world.current() == before
    world.login(world.current())  # alternating users: the previous user still works
    url = world.kube.secret_data("apps", world.external_secret)["DATABASE_URL"]
    assert f"//{before['username']}:{before['password']}@" in url
    assert all(final.step(f"rollback-{s}").status == "done" for s in ("sync", "rollout", "ecs"))
    assert len(deployments.forced) == 2  # once after the rotation, once after the roll back


def test_a_stuck_awspending_fails_with_the_reason_and_changes_nothing_else(
    configured, function, deployments
):
    world = configured
    function.handler.fail_at = "setSecret"
    before = world.current()
    engine = engine_for(world)
    rotation = engine.start("secret", world.secret_id(), "staging", "alice")
    row = drive(engine, rotation.id, until="rotate")
    function.idle()
    assert function.errors == [
        "setSecret: RuntimeError: setSecret: the database refused the change"
    ]
    world.clock.advance(engine.catalogue.waits.sync)
    row = drive(engine, rotation.id)
    token = row.data["token"]
    assert row.current.name == "rotate" and row.current.status == "failed"
    assert row.current.error.startswith(
        f"AWSPENDING is stuck on version {token} of "
        f"{world.secret_id()} after 20s: function {function.arn} "
        "did not finish"
    )
    assert world.current() == before and world.stages()[token] == ["AWSPENDING"]
    assert not deployments.forced
    assert engine.cancel(rotation.id, "alice").status == "cancelled"
    said = engine.store.audit_rows(rotation.id)[-1].detail
    assert f"AWSPENDING stays on version {token}" in said and world.stages()[token] == [
        "AWSPENDING"
    ]


def test_a_resumed_rotate_step_never_rotates_twice(configured, function, deployments):
    world = configured
    function.hold.set()  # the function is slow: the step waits, and is re-run meanwhile
    engine = engine_for(world)
    rotation = engine.start("secret", world.secret_id(), "staging", "alice")
    drive(engine, rotation.id, until="rotate")
    for _ in range(3):
        world.clock.advance(1)
        row = engine_for(world).advance(rotation.id)  # another process re-checks it
        assert row.current.name == "rotate" and row.current.status == "waiting"
    function.hold.clear()
    row = drive(engine_for(world), rotation.id, until="grace")
    token = row.data["token"]
    assert [e["Step"] for e in function.events if e["ClientRequestToken"] == token] == [
        "createSecret",
        "setSecret",
        "testSecret",
        "finishSecret",
    ]
    assert row.step("rotate").result.startswith(
        f"version {token} of {world.secret_id()} is AWSCURRENT"
    )


class Crash(BaseException):
    """The process dies (nothing in the engine catches it)."""


def test_a_crash_right_after_rotate_secret_does_not_rotate_again(configured, function, deployments):
    world = configured
    engine = engine_for(world)

    def crash(**kwargs: Any) -> None:
        raise Crash

    sm = engine.clients.aws("staging", "secretsmanager")
    sm.meta.events.register("after-call.secrets-manager.RotateSecret", crash)
    rotation = engine.start("secret", world.secret_id(), "staging", "alice")
    with pytest.raises(Crash):
        drive(engine, rotation.id)
    assert "requested_at" not in engine.store.rotation(rotation.id).data
    row = drive(engine_for(world), rotation.id, until="grace")  # a new process resumes
    token = row.data["token"]
    assert [e["Step"] for e in function.events if e["ClientRequestToken"] == token] == [
        "createSecret",
        "setSecret",
        "testSecret",
        "finishSecret",
    ]
    assert world.stages()[token] == ["AWSCURRENT"]


def test_a_secret_without_rotation_fails_preflight_and_changes_nothing(configured):
    world = configured  # no rotation function turned on
    stages = world.stages()
    engine = engine_for(world)
    row = drive(engine, engine.start("secret", world.secret_id(), "staging", "alice").id)
    assert row.current.name == "preflight" and row.current.status == "failed"
    assert row.current.error == (
        f"secret {world.secret_id()} has no rotation configured "
        "(RotationEnabled is false): turn rotation on for it first, or "
        "rotate it another way"
    )
    assert world.stages() == stages


def test_unknown_secrets_and_environments_are_refused_at_start(configured):
    world = configured
    engine = engine_for(world)
    with pytest.raises(UnknownName, match="unknown secret 'govuk/nope'"):
        engine.start("secret", "govuk/nope", "staging", "alice")
    with pytest.raises(UnknownName, match="is not rotated in production"):
        engine.start("secret", world.secret_id(), "production", "alice")
    with pytest.raises(UnknownName, match="unknown environment"):
        engine.start("secret", world.secret_id(), "moon", "alice")
    assert engine.store.recent() == []


def test_plan_shows_the_settings_and_no_value(configured, function):
    world = configured
    steps, found = engine_for(world).plan("secret", world.secret_id(), "staging")
    assert [s.name for s in steps] == [
        "preflight",
        "rotate",
        "sync",
        "rollout",
        "ecs",
        "grace",
        "rollback-sync",
        "rollback-rollout",
        "rollback-ecs",
    ]
    current = next(v for v, s in world.stages().items() if "AWSCURRENT" in s)
    assert found.startswith(f"{world.secret_id()}: AWSCURRENT is version {current}; rotation on")
    assert world.current()["password"] not in found


def test_the_cli_rotates_and_redeploys_then_ends_with_the_grace_period(
    configured, function, deployments
):
    world = configured
    config = json.loads(world.config_path.read_text())
    config["secrets"][world.secret_id()]["rollback_minutes"] = 0.01  # 0.6 s
    world.config_path.write_text(json.dumps(config))
    before = world.current()
    result = subprocess.run(
        [*world.rotor(), "rotate-secret", world.secret_id(), "staging"],
        env=world.env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=world.workdir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rotation #1 done: 9/9 done" in result.stdout
    after = world.current()
    assert after["password"] != before["password"] and len(deployments.forced) == 1
    for password in (before["password"], after["password"]):
        assert password not in result.stdout + result.stderr
