"""The AWS operations Rotor's clients make, checked against what `rotor iam-policy` generates.

Two uses, one record (botocore's before-parameter-build, which carries the API parameters
where before-call has the serialised request):

- `Recorder`: one test's calls, for the tests that run a whole rotation with moto enforcing
  IAM (`Enforced`) under a principal holding only the generated policy.
- `install()`: every call the whole test suite makes through `rotation.aws.fenced_client`,
  each tagged with the catalogue and environment of the `rotation.clients.Clients` that made
  it and checked against that catalogue's policy for that environment, resources included.
  The entries go to the file named by $ROTOR_TEST_AWS_LOG; tests/conftest.py reports the
  refused ones when the session ends, as it does for Kubernetes (tests/kube_calls.py).

moto checks a request's action against the principal's policies but compares resources with
"*" only, so moto gets the policy's actions (`moto_policy`) and `resource()` here names the
resource IAM would authorise, which `rotation.iam_policy.allowed` matches to the ARN patterns.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from rotation import aws, iam_policy
from rotation.catalogue import Catalogue

LOG_ENV = "ROTOR_TEST_AWS_LOG"
DEFAULT_ACCOUNT = "123456789012"  # moto's
# Actions a grant names that Rotor's own clients never call: AWS makes these on Rotor's
# behalf (Secrets Manager asks KMS; botocore's credential refresher assumes the role).
CALLED_FOR_ROTOR = {"kms:Decrypt", "kms:GenerateDataKey", "sts:AssumeRole"}


def _key_owner(account: str, key_id: str) -> str | None:
    from moto.iam.models import iam_backends

    for where in (account, *list(iam_backends)):
        key = iam_backends[where]["aws"].access_keys.get(key_id)
        if key is not None:
            return str(key.user_name)
    return None


def resource(region: str, account: str, prefix: str, params: dict[str, Any]) -> str:
    """The resource IAM authorises the call on ("," between several, "*" for none)."""
    if prefix == "secretsmanager" and "SecretId" in params:
        secret = params["SecretId"]
        return secret if secret.startswith("arn:") else \
            f"arn:aws:secretsmanager:{region}:{account}:secret:{secret}-AbCdEf"
    if prefix == "iam" and "UserName" in params:
        return f"arn:aws:iam::{account}:user/{params['UserName']}"
    if prefix == "iam" and "AccessKeyId" in params:  # IAM authorises it on the key's user
        return f"arn:aws:iam::{account}:user/{_key_owner(account, params['AccessKeyId'])}"
    if prefix == "ecs" and ("service" in params or "services" in params):
        cluster = str(params.get("cluster", "default")).split("/")[-1]
        services = params.get("services") or [params["service"]]
        return ",".join(f"arn:aws:ecs:{region}:{account}:service/{cluster}/{s.split('/')[-1]}"
                        for s in services)
    return "*"


def refused_by(policy: dict[str, Any], resources: str, action: str) -> bool:
    return not all(iam_policy.allowed(policy, action, r) for r in resources.split(","))


class Recorder:
    """(action, resource) of every call Rotor's AWS clients make while installed."""

    def __init__(self, account: str) -> None:
        self.account = account
        self.calls: list[tuple[str, str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Recorder:
        original = aws.fenced_client

        def fenced_client(session: Any, service: str) -> Any:
            client = original(session, service)
            region = client.meta.region_name
            client.meta.events.register(
                "before-parameter-build",
                lambda model, params, **_: self.record(region, model, params))
            return client

        monkeypatch.setattr(aws, "fenced_client", fenced_client)
        return self

    def record(self, region: str, model: Any, params: dict[str, Any]) -> None:
        prefix = model.service_model.signing_name
        self.calls.append((f"{prefix}:{model.name}",
                           resource(region, self.account, prefix, params)))

    def refused(self, policy: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted({(action, where) for action, where in self.calls
                       if refused_by(policy, where, action)})

    def unused(self, policy: dict[str, Any]) -> set[tuple[str, str]]:
        """(Sid, action) of every grant no call used on any of that statement's resources."""
        found = set()
        for statement in policy["Statement"]:
            alone = {**policy, "Statement": [statement]}
            for action in statement["Action"]:
                if not any(a == action and iam_policy.allowed(alone, a, r)
                           for a, where in self.calls for r in where.split(",")):
                    found.add((statement["Sid"], action))
        return found


def moto_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """The generated policy's actions, every resource "*" (moto matches resources to "*")."""
    return {**policy, "Statement": [{**s, "Resource": "*"} for s in policy["Statement"]]}


def without(found: Iterable[iam_policy.Grant], dropped: str) -> dict[str, Any]:
    """The policy of `found` with one action taken out of every statement."""
    fewer = [iam_policy.Grant(g.sid, tuple(a for a in g.actions if a != dropped), g.resources)
             for g in found]
    return iam_policy.document([g for g in fewer if g.actions])


class Enforced:
    """moto's server enforcing IAM (INITIAL_NO_AUTH_ACTION_COUNT=0) on every request, with
    this process's Rotor signing as an IAM user `rotor-…` that holds only `policy`.

    The rig's own helpers (the fake ExternalSecrets operator, the rotation function, the test
    playing a person) sign with the access key `testing`, which is given here to an IAM user
    allowed everything: they are the world, not Rotor. `close()` removes both users.
    """

    def __init__(self, iam: Any, name: str, policy: dict[str, Any],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        from moto import settings as moto_settings
        from moto.iam.models import iam_backends

        self.iam, self.name = iam, name
        self.users = (f"{name}-world", name)
        backend = iam_backends[DEFAULT_ACCOUNT]["aws"]
        iam.create_user(UserName=self.users[0])
        iam.put_user_policy(UserName=self.users[0], PolicyName="everything", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        made = iam.create_access_key(UserName=self.users[0])["AccessKey"]["AccessKeyId"]
        key = backend.access_keys.pop(made)
        key.access_key_id = key.secret_access_key = "testing"
        backend.access_keys["testing"] = key
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="rotor",
                            PolicyDocument=json.dumps(moto_policy(policy)))
        rotor = iam.create_access_key(UserName=name)["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", rotor["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rotor["SecretAccessKey"])
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        self._monkeypatch = monkeypatch

    def close(self) -> None:
        from moto import settings as moto_settings
        from moto.iam.models import iam_backends

        self._monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
        backend = iam_backends[DEFAULT_ACCOUNT]["aws"]  # "testing" is too short for the API
        for name in self.users:
            user = backend.get_user(name)
            for key in list(user.access_keys):
                backend.delete_access_key_by_name(key.access_key_id)
            for policy in list(user.policies):
                backend.delete_user_policy(name, policy)
            backend.delete_user(name)


# -- every call the suite makes ----------------------------------------------------------


def install() -> None:
    """Record every call of every client `rotation.aws.fenced_client` makes, for the rest of
    the process, to the file $ROTOR_TEST_AWS_LOG names (tests/conftest.py sets it)."""
    from rotation.clients import Clients

    if getattr(aws.fenced_client, "recorded", False):
        return
    made, tagged = aws.fenced_client, Clients.aws

    def fenced_client(session: Any, service: str) -> Any:
        client = made(session, service)
        client.meta.events.register("before-parameter-build",
                                    lambda model, params, **_: _log(client, model, params))
        return client

    def clients_aws(self: Clients, env: str, service: str) -> Any:
        client = tagged(self, env, service)
        if not hasattr(client, "_rotor_policy"):
            catalogue: Catalogue = self._catalogue
            client._rotor_policy = (env, iam_policy.document(iam_policy.grants(catalogue, env)),
                                    _account(catalogue, env))
        return client

    fenced_client.recorded = True  # type: ignore[attr-defined]
    aws.fenced_client = fenced_client
    Clients.aws = clients_aws  # type: ignore[method-assign]


def _account(catalogue: Catalogue, env: str) -> str:
    role = catalogue.environment(env).aws_role_arn
    return role.split(":")[4] if role else DEFAULT_ACCOUNT


ROTOR_CODE = tuple(str(Path(__file__).resolve().parent.parent / part) + os.sep
                   for part in ("rotation", "bot"))


def _rotor_caller() -> str | None:
    """Where in Rotor's code the call was made (path:line), or None when the first caller
    outside boto3 is a test seeding or inspecting its world through Rotor's clients."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{os.sep}site-packages{os.sep}" not in path and path != __file__:
            if path.startswith(ROTOR_CODE):
                return f"{os.path.relpath(path, ROTOR_CODE[0] + '..')}:{frame.f_lineno}"
            return None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _log(client: Any, model: Any, params: dict[str, Any]) -> None:
    path = os.environ.get(LOG_ENV)
    caller = _rotor_caller() if path else None
    if not path or caller is None:
        return
    prefix = model.service_model.signing_name
    action = f"{prefix}:{model.name}"
    env, policy, account = getattr(client, "_rotor_policy", (None, None, DEFAULT_ACCOUNT))
    where = resource(client.meta.region_name, account, prefix, params)
    entry = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
             "caller": caller, "action": action, "resource": where, "env": env,
             "refused": None if policy is None else refused_by(policy, where, action)}
    with open(path, "a") as log:
        log.write(json.dumps(entry) + "\n")


def read(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grantable() -> set[str]:
    """Every action the generator can grant."""
    return {*iam_policy.READ, *iam_policy.WRITE, *iam_policy.ROTATE, *iam_policy.KEYS,
            *iam_policy.REPORT, *iam_policy.ECS, "secretsmanager:ListSecrets",
            *CALLED_FOR_ROTOR}


def refused(entries: list[dict[str, Any]]) -> list[str]:
    """Calls the generated policy would refuse. A call made by a `Clients` is checked against
    its catalogue's policy for its environment, resources included; any other call (tests of
    rotation/aws.py on its own) against the actions the generator can grant."""
    kinds = grantable()
    problems = set()
    for entry in entries:
        if entry["refused"] or (entry["refused"] is None and entry["action"] not in kinds):
            problems.add(f"{entry['action']} on {entry['resource']} by {entry['caller']} "
                         f"(env {entry['env']}, {entry['test']})")
    return sorted(problems)


def unused(entries: list[dict[str, Any]]) -> list[str]:
    """Actions the generator can grant that no call made (AWS's own calls for Rotor aside)."""
    return sorted(grantable() - CALLED_FOR_ROTOR - {e["action"] for e in entries})
