"""`rotor iam-policy ENV` for every kind that uses AWS: a whole `mysql`, `postgres`, `secret`
and `rds-admin` rotation runs with moto enforcing IAM under a principal holding only the
policy generated for the rig's catalogue, and every call it makes is allowed by that policy,
resources included. Without one action it needs, the rotation stops at the step that needs
it with AccessDenied on one line, and nothing destructive has happened.

The worlds are the kinds' own (tests/rig.py and the kinds' test modules); tests/aws_calls.py
plays the principals (`Enforced`) and records the calls (`Recorder`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bot.settings import Settings
from bot.wiring import build_engine
from rotation import catalogue, iam_policy
from rotation.engine import Engine
from rotation.store import RotationRow
from tests.aws_calls import DEFAULT_ACCOUNT, Enforced, Recorder, without
from tests.rig import Rig, drive
from tests.test_managed_secret import configure as configure_secret
from tests.test_managed_secret import turn_on_rotation
from tests.test_rds_admin import add_backup, backup, plain_extract, terraform_apply

__all__ = ["plain_extract"]  # ESO's plain `extract` for db-backup-passwd (test_rds_admin.py)

ENV = "staging"
# Granted to every environment for the scheduled key-age check, which no rotation runs.
KEY_AGE_CHECK = {f"CredentialReport:{action}" for action in iam_policy.REPORT}


class Run:
    """One rotation under enforcement: the policy, the engine, what Rotor called."""

    def __init__(self, world: Rig, monkeypatch: pytest.MonkeyPatch,
                 policy: dict[str, Any] | None = None) -> None:
        self.world = world
        self.generated = iam_policy.document(
            iam_policy.grants(catalogue.load(world.config_path), ENV))
        self.policy = policy or self.generated
        self.enforced = Enforced(world.client("iam"), f"rotor-{world.app}", self.policy,
                                 monkeypatch)
        self.recorder = Recorder(DEFAULT_ACCOUNT).install(monkeypatch)
        self.engine: Engine = build_engine(Settings.load(), clock=world.clock)

    def start(self, kind: str, target: str) -> int:
        return self.engine.start(kind, target, ENV, "alice").id


@pytest.fixture
def enforce(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(world: Rig, policy: dict[str, Any] | None = None) -> Run:
        runs.append(Run(world, monkeypatch, policy))
        return runs[-1]

    yield start
    for run in runs:
        run.enforced.close()


def fewer(world: Rig, dropped: str) -> dict[str, Any]:
    policy = without(iam_policy.grants(catalogue.load(world.config_path), ENV), dropped)
    assert dropped not in {a for s in policy["Statement"] for a in s["Action"]}
    return policy


def assert_done_within_the_policy(run: Run, row: RotationRow, unused: set[str]) -> None:
    """Done; every call allowed, resources included; and every action of every statement was
    used on that statement's resources, but the key-age check's and `unused` (Sid:action:
    what the catalogue's other uses of the same secrets need)."""
    assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
    assert run.recorder.refused(run.generated) == [], run.recorder.refused(run.generated)
    left = {f"{sid}:{action}" for sid, action in run.recorder.unused(run.generated)}
    assert left == KEY_AGE_CHECK | unused, sorted(left)


def assert_denied(row: RotationRow, step: str, action: str) -> None:
    """The rotation stopped at `step`, saying on one line that AWS refused `action`."""
    assert row.status != "done"
    failed = [s for s in row.steps if s.status == "failed"]
    assert [s.name for s in failed] == [step], [(s.name, s.status, s.error) for s in row.steps]
    error = failed[0].error or ""
    assert re.search(r"AccessDenied|not authorized", error), error
    assert action.split(":")[1] in error and "\n" not in error, error


def app_still_on(world: Rig, before: dict[str, Any]) -> None:
    """AWSCURRENT is what it was and logs in; the old user is still there."""
    assert world.current() == before
    world.login(before)
    assert before["username"] in world.users()


# -- mysql and postgres: the app's credentials ------------------------------------------

# The rig's app is catalogued for kind mysql whichever kind a test rotates: the app's own
# rotation reads the admin secret, stages a version of the app secret and moves AWSCURRENT.
APP_ROTATION = {"SecretsRotorWrites:secretsmanager:DescribeSecret",
                "SecretsRotorWrites:secretsmanager:PutSecretValue",
                "SecretsRotorWrites:secretsmanager:UpdateSecretVersionStage",
                "AdminSecretsRotorReads:secretsmanager:GetSecretValue"}


@pytest.mark.parametrize("engine_name", ["mysql", "postgres"])
def test_a_database_rotation_runs_under_only_the_generated_policy(request, enforce,
                                                                  engine_name) -> None:
    world = request.getfixturevalue("world" if engine_name == "mysql" else "postgres_world")
    run = enforce(world)
    row = drive(run.engine, run.start(engine_name, world.app))
    assert_done_within_the_policy(run, row, set())
    world.login(world.current())
    assert world.box.app_user not in world.users()


@pytest.mark.parametrize(("engine_name", "dropped", "step"), [
    ("mysql", "secretsmanager:UpdateSecretVersionStage", "promote"),
    ("postgres", "secretsmanager:PutSecretValue", "create-user"),
])
def test_a_database_rotation_without_one_needed_action_stops_before_any_harm(
        request, enforce, engine_name, dropped, step) -> None:
    world = request.getfixturevalue("world" if engine_name == "mysql" else "postgres_world")
    before = world.current()
    run = enforce(world, fewer(world, dropped))
    row = drive(run.engine, run.start(engine_name, world.app))
    assert_denied(row, step, dropped)
    app_still_on(world, before)


# -- secret: Secrets Manager rotation, then ECS ------------------------------------------


@pytest.fixture
def rotating(world, monkeypatch, deployments) -> Iterator[Rig]:
    """The rig's app secret with its rotation function on, consumed by an ECS service."""
    configure_secret(world, world.ecs_service())
    function = turn_on_rotation(world, monkeypatch)
    yield world
    function.stop()


def test_a_secret_rotation_runs_under_only_the_generated_policy(rotating, enforce,
                                                                deployments) -> None:
    world = rotating
    before = world.current()
    run = enforce(world)
    rotation = run.start("secret", world.secret_id())
    drive(run.engine, rotation, until="grace")
    world.clock.advance(30 * 60)
    row = drive(run.engine, rotation)
    # Roll back (not asked for here) moves AWSCURRENT back with UpdateSecretVersionStage.
    assert_done_within_the_policy(run, row, APP_ROTATION - {
        "SecretsRotorWrites:secretsmanager:DescribeSecret"} | {
        "SecretsWithRotationFunctions:secretsmanager:UpdateSecretVersionStage"})
    assert world.current()["password"] != before["password"] and deployments.forced


def test_a_secret_rotation_without_rotate_secret_stops_before_any_harm(rotating, enforce,
                                                                       deployments) -> None:
    world = rotating
    before, stages = world.current(), world.stages()
    run = enforce(world, fewer(world, "secretsmanager:RotateSecret"))
    row = drive(run.engine, run.start("secret", world.secret_id()))
    assert_denied(row, "rotate", "secretsmanager:RotateSecret")
    assert world.current() == before and world.stages() == stages
    assert deployments.forced == []


# -- rds-admin: Terraform rotates, Rotor fixes the backup secret -------------------------


def test_an_admin_rotation_runs_under_only_the_generated_policy(world, enforce) -> None:
    add_backup(world)
    run = enforce(world)
    rotation = run.start("rds-admin", world.app)
    drive(run.engine, rotation, approver=None)
    new = terraform_apply(world)
    run.engine.approve(rotation, "terraform", "carol")
    row = drive(run.engine, rotation, approver=None)
    assert_done_within_the_policy(run, row, APP_ROTATION - {
        "AdminSecretsRotorReads:secretsmanager:GetSecretValue"})
    assert backup(world)[world.app] == new


def test_an_admin_rotation_without_put_secret_value_leaves_the_backup_alone(world,
                                                                           enforce) -> None:
    add_backup(world)
    before = backup(world)
    run = enforce(world, fewer(world, "secretsmanager:PutSecretValue"))
    rotation = run.start("rds-admin", world.app)
    drive(run.engine, rotation, approver=None)
    terraform_apply(world)
    run.engine.approve(rotation, "terraform", "carol")
    row = drive(run.engine, rotation, approver=None)
    assert_denied(row, "backup-secret", "secretsmanager:PutSecretValue")
    assert backup(world) == before
