"""`rotor iam-policy ENV`: the least-privilege IAM policy for one environment's catalogue.

Each statement names the resources the catalogue lists: the secrets Rotor reads and writes
(by ARN pattern: Secrets Manager appends six random characters to a secret's name; admin
secrets are only read, backup secrets read and overwritten, app secrets and the secrets holding
keys staged and promoted), the IAM
users whose keys it rotates, the ECS services it redeploys. The credential report and
ListSecrets cannot be limited to resources. The where-used scan of an IAM key reads every
secret's value unless the environment sets `where_used_prefix`. A role to assume
(`aws_role_arn`) is granted to the identity Rotor starts as; the rest belongs to that role.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any

from rotation.catalogue import Catalogue

READ = ("secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret")
WRITE = ("secretsmanager:PutSecretValue", "secretsmanager:UpdateSecretVersionStage")
ROTATE = ("secretsmanager:RotateSecret",)
KEYS = ("iam:ListAccessKeys", "iam:GetAccessKeyLastUsed", "iam:CreateAccessKey",
        "iam:UpdateAccessKey", "iam:DeleteAccessKey")
REPORT = ("iam:GenerateCredentialReport", "iam:GetCredentialReport")
ECS = ("ecs:DescribeServices", "ecs:UpdateService")
SCAN_NOTE = ("The where-used scan of an IAM key reads the value of every secret in the account "
             "(ListSecrets, then GetSecretValue on each); set where_used_prefix on the "
             "environment in rotor.yml to limit it to secrets whose name starts with it.")


@dataclass(frozen=True)
class Grant:
    """What one statement allows; `sid` says why."""

    sid: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]


def _account(catalogue: Catalogue, env: str) -> str:
    role = catalogue.environment(env).aws_role_arn
    parts = role.split(":") if role else []
    return parts[4] if len(parts) > 4 and parts[4] else "*"


def secret_arn(region: str, account: str, name: str) -> str:
    return f"arn:aws:secretsmanager:{region}:{account}:secret:{name}-??????"


def grants(catalogue: Catalogue, env: str) -> list[Grant]:
    environment = catalogue.environment(env)
    region, account = environment.aws_region, _account(catalogue, env)

    def arns(names: set[str]) -> tuple[str, ...]:
        return tuple(secret_arn(region, account, n) for n in sorted(names))

    written: set[str] = set()  # app secrets, secrets holding keys: staged, then promoted
    rewritten: set[str] = set()  # backup secrets: read, then a new AWSCURRENT written
    read_only: set[str] = set()  # admin secrets
    rotated: set[str] = set()  # secrets with a rotation function
    for app_name in catalogue.apps:
        target = catalogue.target(app_name, env)
        written.add(target.secret)
        read_only.add(target.admin_secret)
    for database in catalogue.databases.values():
        rewritten.add(database.backup_secret)
    users: list[str] = []
    services: set[tuple[str, str]] = set()
    for user_name, user in catalogue.iam_users.items():
        if env in user.environments:
            users.append(user_name)
            places = user.environments[env]
            written.update(field.id for field in places.secrets)
            services.update((s.cluster, s.service) for s in places.ecs_services)
    for secret_id, managed in catalogue.secrets.items():
        if env in managed.environments:
            rotated.add(secret_id)
            services.update((s.cluster, s.service) for s in managed.environments[env].ecs_services)
    rewritten -= written
    read_only -= written | rewritten
    found = []
    if written:
        found.append(Grant("SecretsRotorWrites", READ + WRITE, arns(written)))
    if rewritten:
        found.append(Grant("BackupSecretsRotorRewrites", (READ[0], WRITE[0]), arns(rewritten)))
    if read_only:
        found.append(Grant("AdminSecretsRotorReads", READ[:1], arns(read_only)))
    if rotated:
        found.append(Grant("SecretsWithRotationFunctions", READ + ROTATE + WRITE[1:],
                           arns(rotated)))
    if users:
        prefix = environment.where_used_prefix
        found.append(Grant("AccessKeysOfCataloguedUsers", KEYS, tuple(
            f"arn:aws:iam::{account}:user/{name}" for name in sorted(users))))
        found.append(Grant("WhereUsedScanLists", ("secretsmanager:ListSecrets",), ("*",)))
        found.append(Grant("WhereUsedScanReads" if prefix else "WhereUsedScanReadsEverySecret",
                           ("secretsmanager:GetSecretValue",),
                           (secret_arn(region, account, f"{prefix}*").replace("*-??????", "*")
                            if prefix else "*",)))
    found.append(Grant("CredentialReport", REPORT, ("*",)))
    if services:
        found.append(Grant("EcsServicesRedeployed", ECS, tuple(
            f"arn:aws:ecs:{region}:{account}:service/{cluster}/{service}"
            for cluster, service in sorted(services))))
    if environment.kms_keys:
        found.append(Grant("SecretsUnderCustomerManagedKeys",
                           ("kms:Decrypt", "kms:GenerateDataKey"), environment.kms_keys))
    if environment.aws_role_arn:
        found.append(Grant("AssumeTheEnvironmentsRole", ("sts:AssumeRole",),
                           (environment.aws_role_arn,)))
    return found


def document(found: list[Grant]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": g.sid, "Effect": "Allow", "Action": list(g.actions),
         "Resource": list(g.resources) if len(g.resources) > 1 else g.resources[0]}
        for g in found]}


def render(catalogue: Catalogue, env: str) -> str:
    return json.dumps(document(grants(catalogue, env)), indent=2)


def allowed(policy: dict[str, Any], action: str, resource: str) -> bool:
    """Whether an Allow statement covers the action on the resource (IAM's wildcards: `*`
    any run of characters, `?` one)."""
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) \
            else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) \
            else [statement["Resource"]]
        if statement["Effect"] == "Allow" and any(
                fnmatch.fnmatchcase(action, a) for a in actions) and any(
                fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False
