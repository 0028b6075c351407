"""`rotor iam-policy ENV`: a whole IAM key rotation runs as a principal holding only the
generated policy, with moto enforcing IAM, and every AWS operation it makes is allowed by the
policy, resources included (tests/aws_calls.py records them). The other kinds are proven the
same way in tests/test_iam_policy_kinds.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from moto import mock_aws
from moto import settings as moto_settings
from moto.ecs.models import ecs_backends

from bot.cli import main
from rotation import iam, iam_policy, secrets
from rotation.catalogue import parse
from rotation.errors import SecretError
from tests import aws_calls
from tests.aws_calls import Recorder, moto_policy, without
from tests.test_iam import STAGING_ACCOUNT, USER, World, at

SECRET = "govuk/fastly-logs/aws"
CONFIG = f"""
environments:
  staging: {{aws_region: eu-west-1}}
iam_users:
  {USER}:
    environments:
      staging:
        secrets: [{{id: {SECRET}}}]
        ecs_services: [{{cluster: govuk, service: logs}}]
"""


def rotate_as(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              policy: dict[str, Any]) -> tuple[Any, Recorder]:
    """Seed as an administrator, then rotate the key with moto enforcing IAM as a principal
    holding only `policy`. Returns the final rotation row and what Rotor called."""
    admin_dir, rotor_dir = tmp_path / "admin", tmp_path / "rotor"
    admin_dir.mkdir(exist_ok=True)
    rotor_dir.mkdir(exist_ok=True)
    admin = World(admin_dir, CONFIG)
    old = admin.seed("staging")
    ecs = admin.clients.aws("staging", "ecs")
    ecs.create_cluster(clusterName="govuk")
    ecs.register_task_definition(
        family="logs", containerDefinitions=[{"name": "app", "image": "logs", "memory": 128}])
    ecs.create_service(cluster="govuk", serviceName="logs", taskDefinition="logs",
                       desiredCount=1)
    account_iam = admin.iam("staging")
    account_iam.create_user(UserName="rotor")
    account_iam.put_user_policy(UserName="rotor", PolicyName="rotor",
                                PolicyDocument=json.dumps(moto_policy(policy)))
    key = account_iam.create_access_key(UserName="rotor")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    recorder = Recorder(STAGING_ACCOUNT).install(monkeypatch)

    world = World(rotor_dir, CONFIG)
    iam.key_age_report(world.clients, world.catalogue, "staging", world.clock())
    rid = world.start("staging")
    row = world.advance(rid)
    if at(row) == ("ecs", "waiting"):
        for service in ecs_backends[STAGING_ACCOUNT]["eu-west-1"].services.values():
            for deployment in service.deployments:
                deployment["rolloutState"] = "COMPLETED"
        row = world.advance(rid, 60)
    if at(row) == ("wait-for-switch", "waiting"):
        new_id = row.data["new_key_id"]
        admin.use("staging", new_id, world.clock() + 60)
        admin.use("staging", old["AccessKeyId"], world.clock() - 86400)
        row = world.advance(rid, 5 * 3600)
    for _ in range(4):
        if row.status != "active" or row.current.status == "failed":
            break
        if row.current.status == "needs-approval":
            row = world.approve(rid)
        else:
            row = world.advance(rid, 8 * 86400)
    return row, recorder


def test_a_key_rotation_runs_under_only_the_generated_policy(tmp_path, monkeypatch) -> None:
    policy = iam_policy.document(iam_policy.grants(parse(CONFIG), "staging"))
    with mock_aws():
        row, recorder = rotate_as(tmp_path, monkeypatch, policy)
    assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
    assert recorder.refused(policy) == [], recorder.refused(policy)
    made = {action for action, _ in recorder.calls}
    assert made >= {"iam:CreateAccessKey", "iam:UpdateAccessKey", "iam:DeleteAccessKey",
                    "secretsmanager:PutSecretValue", "secretsmanager:ListSecrets",
                    "ecs:UpdateService", "iam:GenerateCredentialReport"}, made
    granted = {a for s in policy["Statement"] for a in s["Action"]}
    assert granted == made, "the policy grants actions the rotation never used"
    assert recorder.unused(policy) == set(), "a statement grants what no call used on it"


@pytest.mark.parametrize("dropped", ["iam:DeleteAccessKey", "secretsmanager:PutSecretValue",
                                     "ecs:UpdateService", "secretsmanager:ListSecrets"])
def test_without_one_needed_permission_the_rotation_fails(tmp_path, monkeypatch,
                                                          dropped) -> None:
    """Removing one action from the generator: moto refuses the call and the rotation fails
    (or stops) at the step that needs it."""
    policy = without(iam_policy.grants(parse(CONFIG), "staging"), dropped)
    with mock_aws():
        row, recorder = rotate_as(tmp_path, monkeypatch, policy)
    assert row.status != "done"
    failed = [s for s in row.steps if s.status == "failed"]
    assert failed, [(s.name, s.status) for s in row.steps]
    error = failed[0].error or ""
    assert re.search(r"AccessDenied|\b403\b|not authorized", error), error


def test_resources_outside_the_policy_are_refused() -> None:
    policy = iam_policy.document(iam_policy.grants(parse(CONFIG), "staging"))
    recorder = Recorder(STAGING_ACCOUNT)
    recorder.calls = [("secretsmanager:PutSecretValue",
                       "arn:aws:secretsmanager:eu-west-1:1:secret:govuk/other-AbCdEf"),
                      ("iam:DeleteAccessKey", "arn:aws:iam::1:user/someone-else"),
                      ("iam:CreateAccessKey", f"arn:aws:iam::1:user/{USER}")]
    assert [a for a, _ in recorder.refused(policy)] == ["iam:DeleteAccessKey",
                                                        "secretsmanager:PutSecretValue"]


def test_rotor_iam_policy_prints_the_policy_and_says_the_scan_reads_everything(tmp_path):
    path = tmp_path / "rotor.yml"
    path.write_text(CONFIG)
    result = CliRunner().invoke(main, ["--config", str(path), "iam-policy",
                                                       "staging"])
    assert result.exit_code == 0, result.output
    policy = json.loads(result.stdout)
    sids = [s["Sid"] for s in policy["Statement"]]
    assert "WhereUsedScanReadsEverySecret" in sids
    assert "reads the value of every secret" in result.stderr
    assert "where_used_prefix" in result.stderr

    path.write_text(CONFIG.replace("staging: {aws_region: eu-west-1}",
                                   "staging: {aws_region: eu-west-1, where_used_prefix: govuk/}"))
    limited = CliRunner().invoke(main, ["--config", str(path), "iam-policy",
                                                        "staging"])
    statement = {s["Sid"]: s for s in json.loads(limited.stdout)["Statement"]}
    assert statement["WhereUsedScanReads"]["Resource"] == \
        "arn:aws:secretsmanager:eu-west-1:*:secret:govuk/*"
    assert limited.stderr == ""


def test_roles_and_keys_are_granted_where_set() -> None:
    config = parse(CONFIG.replace(
        "staging: {aws_region: eu-west-1}",
        "staging: {aws_region: eu-west-1, aws_role_arn: 'arn:aws:iam::111111111111:role/rotor',"
        " kms_keys: ['arn:aws:kms:eu-west-1:111111111111:key/k1']}"))
    statement = {g.sid: g for g in iam_policy.grants(config, "staging")}
    assert statement["AssumeTheEnvironmentsRole"].resources == (
        "arn:aws:iam::111111111111:role/rotor",)
    assert statement["SecretsUnderCustomerManagedKeys"].actions == ("kms:Decrypt",
                                                                    "kms:GenerateDataKey")
    assert statement["AccessKeysOfCataloguedUsers"].resources == (
        f"arn:aws:iam::111111111111:user/{USER}",)
    assert "AssumeTheEnvironmentsRole" not in {
        g.sid for g in iam_policy.grants(parse(CONFIG), "staging")}


# -- the suite-wide record (tests/aws_calls.py, checked when the session ends) ------------


def _logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, work: Any) -> list[dict[str, Any]]:
    log = tmp_path / "calls.jsonl"  # this test's own log: its refusals are on purpose
    monkeypatch.setenv(aws_calls.LOG_ENV, str(log))
    with mock_aws():
        world = World(tmp_path, CONFIG)
        world.seed("staging")  # the test's own calls through Rotor's clients: not Rotor's
        work(world)
    return aws_calls.read(log)


def test_every_call_rotors_code_makes_is_checked_against_its_catalogues_policy(
        tmp_path, monkeypatch) -> None:
    def work(world: World) -> None:
        iam.key_age_report(world.clients, world.catalogue, "staging", world.clock(),
                           wait=lambda _: None)
        with pytest.raises(SecretError):  # recorded before it is sent
            secrets.put_current(world.sm("staging"), "govuk/not-catalogued", {"a": "b"})

    entries = _logged(tmp_path, monkeypatch, work)
    assert {(e["action"], e["caller"].split(":")[0], e["refused"]) for e in entries} == {
        ("iam:GenerateCredentialReport", "rotation/iam.py", False),
        ("iam:GetCredentialReport", "rotation/iam.py", False),
        ("secretsmanager:PutSecretValue", "rotation/secrets.py", True)}
    assert [p.split(" by ")[0] for p in aws_calls.refused(entries)] == [
        "secretsmanager:PutSecretValue on arn:aws:secretsmanager:eu-west-1:123456789012:"
        "secret:govuk/not-catalogued-AbCdEf"]


def test_the_record_refuses_a_call_once_the_generator_drops_its_action(tmp_path,
                                                                       monkeypatch) -> None:
    generate = iam_policy.grants
    monkeypatch.setattr(iam_policy, "grants", lambda catalogue, env: [
        iam_policy.Grant(g.sid, tuple(a for a in g.actions if a != "iam:GetCredentialReport"),
                         g.resources) for g in generate(catalogue, env)])
    entries = _logged(tmp_path, monkeypatch, lambda world: iam.key_age_report(
        world.clients, world.catalogue, "staging", world.clock(), wait=lambda _: None))
    assert [p.split(" by ")[0] for p in aws_calls.refused(entries)] == [
        "iam:GetCredentialReport on *"]
    assert "iam:GetCredentialReport" not in aws_calls.unused(entries)
    assert "secretsmanager:RotateSecret" in aws_calls.unused(entries)
