"""Kind `iam-key` and the key-age report, against moto in-process (IAM, STS, Secrets Manager).

Production is its own AWS account (111111111111), reached by assuming its `aws_role_arn` as
Rotor does; staging is moto's default account. Time comes from an injected clock.

moto records a key's last use when a request is signed with it (at the real time), and
nothing else ever uses a key in a test: `use()` sets the key's `last_used` in moto's IAM
backend at a time of the test clock's choosing, as AWS would after a consumer's call.
Key ages are set the same way, through the backend key's `create_date`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.ecs.models import ecs_backends
from moto.iam.models import AccessKeyLastUsed, iam_backends

from demo.kube_api import FakeKube
from rotation import catalogue, iam, redact
from rotation import secrets as sm_secrets
from rotation.clients import Clients
from rotation.engine import Engine
from rotation.errors import AwsError, ConfigError, UnknownName
from rotation.store import RotationRow, Store

STAGING_ACCOUNT, PRODUCTION_ACCOUNT = "123456789012", "111111111111"
ACCOUNTS = {"staging": STAGING_ACCOUNT, "production": PRODUCTION_ACCOUNT}
USER = "govuk-fastly-logs"
SECRET = "govuk/fastly-logs/aws"
CONFIG = f"""
environments:
  staging: {{aws_region: eu-west-1}}
  production:
    aws_region: eu-west-1
    aws_role_arn: "arn:aws:iam::{PRODUCTION_ACCOUNT}:role/rotor"
iam_users:
  {USER}:
    grace_days: 7
    environments:
      staging:
        secrets: [{{id: {SECRET}}}]
        manual:
          - {{place: Fastly CDN logging, instruction: "Fastly > Logging > S3 endpoint: paste \
the key ID and the secret."}}
      production:
        secrets:
          - {{id: {SECRET}}}
          - {{id: govuk/logit/aws, key_id_field: AWS_ACCESS_KEY_ID,
              secret_field: AWS_SECRET_ACCESS_KEY}}
  no-secrets:
    environments: {{staging: {{manual: [{{place: Logit, instruction: paste it}}]}}}}
key_age: {{max_key_age_days: 90, warn_days: 80}}
"""
HOUR = 3600.0
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # moto stamps creation with the real time

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Notices:
    def __init__(self) -> None:
        self.posted: list[str] = []

    def notify(self, rotation: Any, step: Any, summary: str, approved_by: str) -> str:
        self.posted.append(f"{step.name}: {summary}")
        return "https://slack.example/archives/C2/p1"


class World:
    """Catalogue, moto accounts, engine and clock for one test."""

    def __init__(self, tmp_path: Path, config: str = CONFIG, kubeconfig: str | None = None) -> None:
        self.clock = Clock()
        self.catalogue = catalogue.parse(config)
        self.clients = Clients(self.catalogue, kubeconfig=kubeconfig)
        self.notices = Notices()
        self.store = Store(tmp_path / "state.db", clock=self.clock)
        self.engine = Engine(
            self.store,
            self.catalogue,
            {iam.KIND.name: iam.KIND},
            self.clients,
            second_line=self.notices,
            clock=self.clock,
        )

    def iam(self, env: str) -> Any:
        return self.clients.aws(env, "iam")

    def sm(self, env: str) -> Any:
        return self.clients.aws(env, "secretsmanager")

    def seed(self, env: str, user: str = USER) -> dict[str, str]:
        """The user with one key, held by every catalogued secret (plus a field of its own)."""
        self.iam(env).create_user(UserName=user)
        key = self.iam(env).create_access_key(UserName=user)["AccessKey"]
        redact.register(key["SecretAccessKey"])
        for field in self.catalogue.iam_user(user, env).secrets:
            self.sm(env).create_secret(
                Name=field.id,
                SecretString=json.dumps(
                    {
                        field.key_id_field: key["AccessKeyId"],
                        field.secret_field: key["SecretAccessKey"],
                        "bucket": "govuk-logs",
                    }
                ),
            )
        return dict(key)

    def backend_key(self, env: str, key_id: str) -> Any:
        return iam_backends[ACCOUNTS[env]]["aws"].access_keys[key_id]

    def use(self, env: str, key_id: str, at: float) -> None:
        """A consumer used the key at `at` (what AWS would record; moto cannot know)."""
        self.backend_key(env, key_id).last_used = AccessKeyLastUsed(
            timestamp=datetime.fromtimestamp(at, UTC), service="s3", region="eu-west-1"
        )

    def keys(self, env: str, user: str = USER) -> dict[str, str]:
        listed = self.iam(env).list_access_keys(UserName=user)["AccessKeyMetadata"]
        return {k["AccessKeyId"]: k["Status"] for k in listed}

    def current(self, env: str, secret_id: str = SECRET) -> dict[str, Any]:
        text = self.sm(env).get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")[
            "SecretString"
        ]
        return dict(json.loads(text))

    def start(self, env: str, user: str = USER) -> int:
        return self.engine.start("iam-key", user, env, "U0ALICE").id

    def advance(self, rotation_id: int, seconds: float = 0) -> RotationRow:
        self.clock.advance(seconds)
        return self.engine.advance(rotation_id)

    def approve(self, rotation_id: int, who: str = "U0BOB") -> RotationRow:
        rotation = self.store.rotation(rotation_id)
        assert rotation.current is not None
        self.engine.approve(rotation_id, rotation.current.name, who)
        return self.engine.advance(rotation_id)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with mock_aws():
        yield World(tmp_path)


def at(rotation: RotationRow) -> tuple[str, str]:
    step = rotation.current
    return (step.name, step.status) if step else ("-", rotation.status)


# -- the whole rotation ----------------------------------------------------------------------


def test_production_rotation_from_preflight_to_deleting_the_old_key(world, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="rotor")
    old = world.seed("production")
    assert PRODUCTION_ACCOUNT in world.iam("production").get_user(UserName=USER)["User"]["Arn"]
    rid = world.start("production")

    row = world.advance(rid)
    assert [s.status for s in row.steps[:8]] == [
        "done",
        "skipped",
        "done",
        "done",
        "done",
        "skipped",
        "skipped",
        "skipped",
    ]
    assert f"rotating {old['AccessKeyId']}" in row.step("preflight").result
    assert row.step("where-used").result.endswith(
        f"2 secrets scanned; no other secret holds {old['AccessKeyId']}"
    )
    new_id = row.data["new_key_id"]
    assert set(world.keys("production")) == {old["AccessKeyId"], new_id}
    for secret_id, id_field in (
        (SECRET, "access_key_id"),
        ("govuk/logit/aws", "AWS_ACCESS_KEY_ID"),
    ):
        current = world.current("production", secret_id)
        assert current[id_field] == new_id and current["bucket"] == "govuk-logs"
        stages = sm_secrets.versions(world.sm("production"), secret_id)
        assert sorted(s for v in stages.values() for s in v) == ["AWSCURRENT", "AWSPREVIOUS"]

    # What a consumer reads from AWSCURRENT signs requests as the user: the secret is right.
    current = world.current("production")
    sts = boto3.client(
        "sts",
        region_name="eu-west-1",
        aws_access_key_id=current["access_key_id"],
        aws_secret_access_key=current["secret_access_key"],
    )
    assert sts.get_caller_identity()["Arn"].endswith(f":user/{USER}")

    assert at(row) == ("wait-for-switch", "waiting")
    switched = world.clock()
    world.use("production", new_id, switched + 60)
    world.use("production", old["AccessKeyId"], switched + 120)  # a straggler, then quiet
    row = world.advance(rid, 31 * 60)
    assert at(row) == ("wait-for-switch", "waiting")
    assert "to stop being used" in row.current.wait_reason
    row = world.advance(rid, 4 * HOUR)
    assert at(row) == ("deactivate", "needs-approval")
    assert "Reactivate" in row.current.gate_summary

    row = world.approve(rid)  # four-eyes: Bob, not Alice who started it
    assert world.notices.posted and world.notices.posted[0].startswith("deactivate: ")
    assert world.keys("production")[old["AccessKeyId"]] == "Inactive"
    assert at(row) == ("grace", "waiting")
    # No hand rollback to the inactive key: AWSPREVIOUS came off the versions holding it.
    for secret_id in (SECRET, "govuk/logit/aws"):
        stages = sm_secrets.versions(world.sm("production"), secret_id)
        assert sorted(s for v in stages.values() for s in v) == ["AWSCURRENT"], secret_id
    assert "AWSPREVIOUS of " in row.step("deactivate").result
    row = world.advance(rid, 6 * DAY)
    assert at(row) == ("grace", "waiting")
    row = world.advance(rid, 1 * DAY + 60)
    assert at(row) == ("delete-old-key", "needs-approval")
    row = world.approve(rid)
    assert row.status == "done", row.current
    assert set(world.keys("production")) == {new_id}
    assert len(world.notices.posted) == 2

    # Key IDs are in the thread; secret access keys nowhere Rotor writes.
    everything = (tmp_path / "state.db").read_bytes().decode("utf-8", "replace") + caplog.text
    assert new_id in everything
    for secret in (old["SecretAccessKey"], current["secret_access_key"]):
        assert secret not in everything
        assert redact.redact(secret) == redact.MASK


def test_staging_guides_each_manual_place_and_plan_changes_nothing(world):
    old = world.seed("staging")
    steps, found = world.engine.plan("iam-key", USER, "staging")
    assert [s.name for s in steps] == [
        "preflight",
        "make-room",
        "where-used",
        "create-key",
        "promote",
        "sync",
        "rollout",
        "ecs",
        "manual-fastly-cdn-logging",
        "wait-for-switch",
        "deactivate",
        "grace",
        "delete-old-key",
    ]
    assert f"rotating {old['AccessKeyId']}" in found and "0 days old" in found
    assert set(world.keys("staging")) == {old["AccessKeyId"]}

    rid = world.start("staging")
    row = world.advance(rid)
    assert at(row) == ("manual-fastly-cdn-logging", "needs-approval") and row.current.guided
    summary = row.current.gate_summary
    assert "Fastly > Logging > S3 endpoint" in summary and row.data["new_key_id"] in summary
    assert (
        f"secret `{SECRET}`" in summary
        and world.current("staging")["secret_access_key"] not in summary
    )
    world.engine.approve(rid, row.current.name, "U0ALICE")  # "Done": whoever did the work
    row = world.advance(rid)
    assert row.step("manual-fastly-cdn-logging").result == "Fastly CDN logging updated by U0ALICE"
    assert at(row) == ("wait-for-switch", "waiting")


def test_consumers_are_redeployed_through_rotation_consumers(tmp_path):
    config = CONFIG.replace(
        "  staging: {aws_region: eu-west-1}",
        "  staging: {aws_region: eu-west-1, kube_context: staging}",
    )
    config = config.replace(
        """        secrets: [{id: govuk/fastly-logs/aws}]
        manual:""",
        """        secrets: [{id: govuk/fastly-logs/aws}]
        deployments: [logs-shipper]
        ecs_services: [{cluster: govuk, service: logs}]
        manual:""",
    )
    with mock_aws(), FakeKube(lambda secret_id: "{}") as kube:
        kube.add_deployment("apps", "logs-shipper", replicas=2)
        world = World(
            tmp_path,
            config,
            kubeconfig=kube.write_kubeconfig(tmp_path / "kubeconfig", context="staging"),
        )
        kube.clock = world.clock
        ecs = world.clients.aws("staging", "ecs")
        ecs.create_cluster(clusterName="govuk")
        ecs.register_task_definition(
            family="logs", containerDefinitions=[{"name": "app", "image": "logs", "memory": 128}]
        )
        ecs.create_service(
            cluster="govuk", serviceName="logs", taskDefinition="logs", desiredCount=1
        )
        world.seed("staging")
        rid = world.start("staging")
        row = world.advance(rid)
        row = world.advance(rid, 1)
        assert row.step("sync").status == "skipped"
        assert row.step("rollout").result == (
            "deployment apps/logs-shipper: all 2 ready pods started after the sync after a restart"
        )
        assert at(row) == ("ecs", "waiting")
        # moto never finishes an ECS deployment on its own: finish it as ECS would.
        for service in ecs_backends[STAGING_ACCOUNT]["eu-west-1"].services.values():
            for deployment in service.deployments:
                deployment["rolloutState"] = "COMPLETED"
        row = world.advance(rid, 60)
        assert str(row.step("ecs").result).startswith("ECS deployments completed: govuk/logs")
        assert at(row) == ("manual-fastly-cdn-logging", "needs-approval")


# -- preflight -------------------------------------------------------------------------------


def test_two_active_keys_stop_the_rotation_with_the_reason(world):
    world.seed("staging")
    second = world.iam("staging").create_access_key(UserName=USER)["AccessKey"]
    redact.register(second["SecretAccessKey"])
    row = world.advance(world.start("staging"))
    assert at(row) == ("preflight", "failed")
    assert "two active keys" in row.current.error and second["AccessKeyId"] in row.current.error
    assert len(world.keys("staging")) == 2


def test_an_inactive_second_key_is_deleted_on_approval_to_make_room(world):
    old = world.seed("staging")
    spare = world.iam("staging").create_access_key(UserName=USER)["AccessKey"]["AccessKeyId"]
    world.iam("staging").update_access_key(UserName=USER, AccessKeyId=spare, Status="Inactive")
    rid = world.start("staging")
    row = world.advance(rid)
    assert at(row) == ("make-room", "needs-approval") and row.current.gate_destructive
    assert spare in row.current.gate_summary
    row = world.approve(rid)
    assert row.step("make-room").result == f"deleted the inactive key {spare}"
    assert set(world.keys("staging")) == {old["AccessKeyId"], row.data["new_key_id"]}


def test_the_key_a_cancel_left_is_deactivated_then_deleted_by_the_next_rotation(world, monkeypatch):
    """What a cancel leaves: the next rotation deactivates and deletes it, on one approval."""
    test_cancel_before_promote_leaves_the_old_key_in_use(world, monkeypatch)
    monkeypatch.undo()
    old = world.current("staging")["access_key_id"]
    spare = next(k for k in world.keys("staging") if k != old)
    rid = world.start("staging")
    row = world.advance(rid)
    assert f"rotating {old}, the key the secrets hold" in row.step("preflight").result
    assert at(row) == ("make-room", "needs-approval") and row.current.gate_destructive
    assert f"Deactivate, then delete, the never-used active key {spare}" in \
        row.current.gate_summary
    assert world.keys("staging")[spare] == "Active"  # nothing before the approval
    row = world.approve(rid)
    assert row.step("make-room").result == f"deleted the unused key {spare}"
    assert set(world.keys("staging")) == {old, row.data["new_key_id"]}


# -- where is the key used ---------------------------------------------------------------------


def test_secrets_the_catalogue_misses_are_named_and_need_a_decision(world):
    old = world.seed("staging")
    legacy = {"AWS_KEY": old["AccessKeyId"], "AWS_SECRET": old["SecretAccessKey"]}
    world.sm("staging").create_secret(Name="legacy/uploader", SecretString=json.dumps(legacy))
    world.sm("staging").create_secret(Name="unrelated", SecretString='{"password": "x1y2z3w4"}')
    rid = world.start("staging")
    row = world.advance(rid)
    assert at(row) == ("where-used", "needs-approval")
    assert "legacy/uploader" in row.current.gate_summary
    assert "unrelated" not in row.current.gate_summary
    assert old["SecretAccessKey"] not in row.current.gate_summary
    row = world.approve(rid)
    result = row.step("where-used").result
    assert "3 secrets scanned" in result and "NOT in the catalogue: legacy/uploader" in result
    assert "x1y2z3w4" not in json.dumps(row.data) + result


def test_a_catalogued_secret_holding_another_key_stops_before_anything_changes(world):
    world.seed("staging")
    world.sm("staging").put_secret_value(
        SecretId=SECRET,
        SecretString=json.dumps(
            {"access_key_id": "AKIAOTHERKEY00000000", "secret_access_key": "s" * 40}
        ),
    )
    row = world.advance(world.start("staging"))
    assert at(row) == ("where-used", "failed")
    assert "holds 'AKIAOTHERKEY00000000'" in row.current.error
    assert len(world.keys("staging")) == 1


# -- create: never a second new key, never a third key ---------------------------------------------


def test_a_retry_after_a_create_that_succeeded_finds_the_key_instead_of_making_another(
    world, monkeypatch
):
    old = world.seed("production")
    rid = world.start("production")
    real_put = sm_secrets.put_pending
    calls = []

    def flaky(sm: Any, secret_id: str, value: dict[str, Any]) -> str:
        calls.append(secret_id)
        if secret_id == "govuk/logit/aws" and calls.count(secret_id) == 1:
            raise ConnectionError("connection reset")  # after the first secret was staged
        return real_put(sm, secret_id, value)

    monkeypatch.setattr(sm_secrets, "put_pending", flaky)
    row = world.advance(rid)
    assert at(row) == ("create-key", "failed")
    assert "ConnectionError" in row.current.error
    new_id = row.data["new_key_id"]
    assert set(world.keys("production")) == {old["AccessKeyId"], new_id}

    world.engine.retry(rid, "U0ALICE")
    row = world.advance(rid)
    assert row.step("create-key").status == "done"
    assert set(world.keys("production")) == {old["AccessKeyId"], new_id}  # no second new key
    assert world.current("production", "govuk/logit/aws")["AWS_ACCESS_KEY_ID"] == new_id
    assert calls == [SECRET, "govuk/logit/aws", "govuk/logit/aws"]
    same = {
        world.current("production", s)[f]
        for s, f in ((SECRET, "secret_access_key"), ("govuk/logit/aws", "AWS_SECRET_ACCESS_KEY"))
    }
    assert len(same) == 1  # both secrets hold the one new key's secret


def test_a_key_whose_secret_was_lost_is_replaced_only_on_approval(world, monkeypatch):
    old = world.seed("staging")
    rid = world.start("staging")
    real_put = sm_secrets.put_pending
    monkeypatch.setattr(
        sm_secrets,
        "put_pending",
        lambda *a: (_ for _ in ()).throw(ConnectionError("process killed")),
    )
    row = world.advance(rid)
    lost = row.data["new_key_id"]
    assert at(row) == ("create-key", "failed")
    monkeypatch.setattr(sm_secrets, "put_pending", real_put)

    world.engine.retry(rid, "U0ALICE")
    row = world.advance(rid)
    assert at(row) == ("create-key", "needs-approval")
    assert lost in row.current.gate_summary and "never used" in row.current.gate_summary
    assert set(world.keys("staging")) == {old["AccessKeyId"], lost}

    real_create = iam._create
    monkeypatch.setattr(
        iam,
        "_create",
        lambda ctx: (_ for _ in ()).throw(ConnectionError("killed again, after the delete")),
    )
    row = world.approve(rid)
    assert at(row) == ("create-key", "failed")
    assert set(world.keys("staging")) == {old["AccessKeyId"]}
    monkeypatch.setattr(iam, "_create", real_create)
    world.engine.retry(rid, "U0ALICE")
    row = world.advance(rid)  # the lost key is known to be discarded: no second approval
    fresh = row.data["new_key_id"]
    assert fresh != lost and set(world.keys("staging")) == {old["AccessKeyId"], fresh}
    assert world.current("staging")["access_key_id"] == fresh


def test_a_key_made_outside_rotor_is_never_joined_by_a_third(world, monkeypatch):
    world.seed("staging")
    rid = world.start("staging")
    real = iam.where_used

    def someone_makes_a_key(ctx: Any) -> Any:
        outcome = real(ctx)
        world.iam("staging").create_access_key(UserName=USER)
        return outcome

    monkeypatch.setattr(iam, "where_used", someone_makes_a_key)
    monkeypatch.setattr(
        iam.KIND,
        "steps",
        lambda *a: [
            s if s.name != "where-used" else iam.Step(s.name, s.title, someone_makes_a_key)
            for s in iam.IamKeyKind.steps(iam.KIND, *a)
        ],
    )
    row = world.advance(rid)
    assert at(row) == ("create-key", "failed")
    assert "never makes a third key" in row.current.error
    assert len(world.keys("staging")) == 2


def test_limit_exceeded_is_one_clear_line():
    class Full:
        def create_access_key(self, UserName: str) -> Any:
            raise ClientError(
                {"Error": {"Code": "LimitExceeded", "Message": "quota"}}, "CreateAccessKey"
            )

    class Ctx:
        target, data = USER, {}
        clients = type("C", (), {"aws": staticmethod(lambda env, service: Full())})()
        env = "staging"

    with pytest.raises(iam.StepFailed, match="LimitExceeded.*never makes a third"):
        iam._create(Ctx())  # type: ignore[arg-type]
    assert Ctx.data == {}


# -- deactivate, reactivate, delete -----------------------------------------------------------------


def _to_grace(world: World, env: str = "staging") -> tuple[int, dict[str, str], str]:
    old = world.seed(env)
    rid = world.start(env)
    row = world.advance(rid)
    if at(row) == ("manual-fastly-cdn-logging", "needs-approval"):
        world.engine.approve(rid, "manual-fastly-cdn-logging", "U0ALICE")
        row = world.advance(rid)
    new_id = row.data["new_key_id"]
    world.use(env, new_id, world.clock())
    row = world.advance(rid, 4 * HOUR + 1)
    assert at(row) == ("deactivate", "needs-approval")
    row = world.approve(rid)
    assert at(row) == ("grace", "waiting")
    return rid, old, new_id


def test_reactivate_works_through_the_grace_period_and_again_after(world):
    rid, old, _ = _to_grace(world)
    old_id = old["AccessKeyId"]
    world.clock.advance(2 * DAY)
    world.engine.request(rid, "reactivate", "U0CAROL")
    world.engine.tick()
    row = world.store.rotation(rid)
    assert world.keys("staging")[old_id] == "Active"
    assert (
        at(row) == ("grace", "needs-approval")
        and "reactivated by U0CAROL" in row.current.gate_summary
    )

    row = world.approve(rid)
    assert world.keys("staging")[old_id] == "Inactive"
    assert at(row) == ("grace", "waiting")
    row = world.advance(rid, 6 * DAY)
    assert at(row) == ("grace", "waiting")  # the grace period started over

    world.engine.request(rid, "reactivate", "U0DAVE")  # the button works a second time
    world.engine.tick()
    row = world.store.rotation(rid)
    assert world.keys("staging")[old_id] == "Active"
    assert "reactivated by U0DAVE" in row.current.gate_summary
    assert world.engine.cancel(rid, "U0DAVE").status == "cancelled"
    assert world.keys("staging")[old_id] == "Active"  # both keys work after the cancel


def test_an_old_key_active_again_is_never_deleted(world):
    rid, old, _ = _to_grace(world)
    row = world.advance(rid, 7 * DAY + 1)
    assert at(row) == ("delete-old-key", "needs-approval")
    world.iam("staging").update_access_key(
        UserName=USER, AccessKeyId=old["AccessKeyId"], Status="Active"
    )
    row = world.approve(rid)
    assert at(row) == ("delete-old-key", "failed")
    assert "never deletes an active key" in row.current.error
    assert old["AccessKeyId"] in world.keys("staging")


def test_the_old_key_used_again_before_deactivation_stops_it(world):
    old = world.seed("staging")
    rid = world.start("staging")
    row = world.advance(rid)
    world.engine.approve(rid, row.current.name, "U0ALICE")
    row = world.advance(rid)
    world.use("staging", row.data["new_key_id"], world.clock())
    row = world.advance(rid, 4 * HOUR + 1)
    assert at(row) == ("deactivate", "needs-approval")
    world.use("staging", old["AccessKeyId"], world.clock())  # while the approval waited
    row = world.approve(rid)
    assert at(row) == ("deactivate", "failed") and "still uses it" in row.current.error
    assert world.keys("staging")[old["AccessKeyId"]] == "Active"


# -- bad input and cancel ---------------------------------------------------------------------------


def test_unknown_user_env_or_a_user_without_a_secret_change_nothing(world):
    world.seed("staging")
    with pytest.raises(UnknownName, match="unknown IAM user 'govuk-fastly-log'.*did you mean"):
        world.start("staging", "govuk-fastly-log")
    with pytest.raises(UnknownName, match="unknown environment 'prod'"):
        world.start("prod")
    with pytest.raises(ConfigError, match="no-secrets.environments.staging: no secrets"):
        world.start("staging", "no-secrets")
    assert world.store.recent() == []
    assert len(world.keys("staging")) == 1


def test_cancel_before_promote_leaves_the_old_key_in_use(world, monkeypatch):
    old = world.seed("staging")
    rid = world.start("staging")
    monkeypatch.setattr(
        iam, "promote", lambda ctx: (_ for _ in ()).throw(iam.StepFailed("stopped here"))
    )
    monkeypatch.setattr(
        iam.KIND,
        "steps",
        lambda *a: [
            s if s.name != "promote" else iam.Step(s.name, s.title, iam.promote)
            for s in iam.IamKeyKind.steps(iam.KIND, *a)
        ],
    )
    row = world.advance(rid)
    assert at(row) == ("promote", "failed")
    new_id = row.data["new_key_id"]
    row = world.engine.cancel(rid, "U0ALICE")
    assert row.status == "cancelled"
    # Nothing deactivated without an approval: the unused key waits for the next rotation.
    assert world.keys("staging") == {old["AccessKeyId"]: "Active", new_id: "Active"}
    assert "left active: the next rotation deactivates and deletes it" in [
        a.detail for a in world.store.audit_rows(rid) if a.event == "cancelled"][0]
    assert world.current("staging")["access_key_id"] == old["AccessKeyId"]
    stages = sm_secrets.versions(world.sm("staging"), SECRET)
    assert all("AWSPENDING" not in s for s in stages.values())


# -- the key-age report -------------------------------------------------------------------------------


def _row(user: str, *keys: tuple[str, str, str]) -> str:
    slots = [(active, rotated, used) for active, rotated, used in keys]
    slots += [("false", "N/A", "N/A")] * (2 - len(slots))
    cells = [
        user,
        f"arn:aws:iam::1:user/{user}",
        "2020-01-01T00:00:00+00:00",
        "false",
        "not_supported",
        "N/A",
        "not_supported",
        "false",
    ]
    for active, rotated, used in slots:
        cells += [active, rotated, used, "N/A", "N/A"]
    return ",".join(cells + ["false", "N/A", "false", "N/A"])


HEADER = (
    "user,arn,user_creation_time,password_enabled,password_last_used,password_last_changed,"
    "password_next_rotation,mfa_active,access_key_1_active,access_key_1_last_rotated,"
    "access_key_1_last_used_date,access_key_1_last_used_region,"
    "access_key_1_last_used_service,access_key_2_active,access_key_2_last_rotated,"
    "access_key_2_last_used_date,access_key_2_last_used_region,"
    "access_key_2_last_used_service,cert_1_active,cert_1_last_rotated,cert_2_active,"
    "cert_2_last_rotated"
)
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC).timestamp()


def _ago(days_ago: float) -> str:
    return datetime.fromtimestamp(NOW - days_ago * DAY, UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


@pytest.mark.parametrize(
    ("age", "active", "expected"),
    [
        (79.9, "true", None),
        (80.0, "true", "due soon"),
        (90.0, "true", "due soon"),
        (90.01, "true", "overdue"),
        (400, "false", None),  # an inactive key is not in use: not a rotation reminder
    ],
)
def test_key_age_thresholds(age, active, expected):
    text = "\n".join([HEADER, _row("u", (active, _ago(age), "N/A"))])
    report = iam.assess_keys(text, NOW, env="staging", max_age_days=90, warn_days=80)
    found = [("overdue" if f.overdue else "due soon") for f in report.findings]
    assert found == ([expected] if expected else [])


def test_key_age_report_reads_both_slots_and_skips_the_root_account():
    text = "\n".join(
        [
            HEADER,
            _row("<root_account>", ("true", _ago(900), "N/A")),
            _row("a", ("true", _ago(120), _ago(1)), ("true", _ago(85), "N/A")),
            _row("b", ("true", _ago(3), "no_information")),
        ]
    )
    report = iam.assess_keys(
        text, NOW, env="production", max_age_days=90, warn_days=80, known_users=["a"]
    )
    assert (report.users, report.active_keys) == (2, 3)
    assert [(f.user, f.slot, f.age_days, f.overdue, f.rotatable) for f in report.findings] == [
        ("a", 1, 120, True, True),
        ("a", 2, 85, False, True),
    ]
    assert report.findings[0].last_used == NOW - DAY and report.findings[1].last_used is None
    assert list(report.by_user()) == ["a"]


def test_a_credential_report_of_1200_users_is_one_report_not_calls_per_user(world):
    """1,200 users in moto's backend (ages set there); read through the API in two calls."""
    backend = iam_backends[STAGING_ACCOUNT]["aws"]
    now = world.clock()
    for i in range(1200):
        name = f"app-{i:04d}"
        backend.create_user("eu-west-1", name)
        key = backend.create_access_key(name)
        key.create_date = datetime.fromtimestamp(now - (i % 120) * DAY - 60, UTC).replace(
            tzinfo=None
        )
        if i % 7 == 0:
            key.status = "Inactive"
    backend.create_user("eu-west-1", USER)
    backend.create_access_key(USER).create_date = datetime.fromtimestamp(
        now - 100 * DAY, UTC
    ).replace(tzinfo=None)

    calls: list[str] = []
    client = world.iam("staging")
    client.meta.events.register("before-call.iam.*", lambda model, **_: calls.append(model.name))
    report = iam.key_age_report(
        world.clients,
        world.catalogue,
        "staging",
        now,
        wait=lambda s: pytest.fail("moto's report is ready at once"),
    )
    assert calls == ["GenerateCredentialReport", "GetCredentialReport"]
    ages = [i % 120 for i in range(1200) if i % 7]
    assert report.users == 1201 and report.active_keys == len(ages) + 1
    assert len(report.overdue) == sum(a >= 90 for a in ages) + 1  # >= 90 days and 60s
    assert len(report.due_soon) == sum(80 <= a < 90 for a in ages)
    assert [f.user for f in report.findings if f.rotatable] == [USER]
    assert report.findings[0].age_days == 119


def test_a_report_in_progress_is_waited_for_through_the_injected_wait():
    class Slow:
        def __init__(self) -> None:
            self.gets = 0

        def generate_credential_report(self) -> dict[str, str]:
            return {"State": "STARTED"}

        def get_credential_report(self) -> dict[str, bytes]:
            self.gets += 1
            if self.gets < 3:
                raise ClientError({"Error": {"Code": "ReportInProgress"}}, "GetCredentialReport")
            return {"Content": HEADER.encode()}

    waits: list[float] = []
    assert iam.credential_report(Slow(), "staging", wait=waits.append) == HEADER
    assert waits == [1.0, 2.0]
    with pytest.raises(AwsError, match="not ready after 2 tries"):
        iam.credential_report(Slow(), "staging", wait=waits.append, attempts=2)
