"""`rotor rbac [ENV]`: the Kubernetes Roles Rotor needs, derived from the catalogue.

Rotor touches four kinds of object, always in the namespace of the consumer it acts for
(rotation/kube.py): it reads and annotates ExternalSecrets, reads the Secrets they write,
reads and restarts Deployments, and lists pods. `USES` is that list, and a test records every
call the test suite makes to the fake API server and checks it against what this module
generates, both ways: every call is allowed, and nothing is allowed that no call used.

Names come from the catalogue: each app's ExternalSecret and Deployment (defaults applied),
the consumers of IAM users' keys and managed secrets, and the backup ExternalSecret of RDS
admin rotations. A Secret is assumed to have its ExternalSecret's name, ESO's default when
`spec.target.name` is not set. Listing pods cannot be limited by name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from rotation.catalogue import Catalogue, Consumers
from rotation.rds_admin import BACKUP_NAMESPACE

ROLE_NAME = "rotor"


@dataclass(frozen=True)
class Use:
    """One kind of call Rotor makes: `verbs` on `resource` in `group`, limited to the names
    of `names` (a field of `Names`), or unlimited when `names` is None and `when` is set."""

    group: str
    resource: str
    verbs: tuple[str, ...]
    names: str | None = None
    when: str | None = None  # names=None: granted when this field of Names is not empty


# What rotation/kube.py calls: Kube.external_secret and force_sync; secret_value and
# secret_contains; deployment and restart_deployment; deployment_pods.
USES: tuple[Use, ...] = (
    Use("external-secrets.io", "externalsecrets", ("get", "patch"), names="external_secrets"),
    Use("", "secrets", ("get",), names="secrets"),
    Use("apps", "deployments", ("get", "patch"), names="deployments"),
    Use("", "pods", ("list",), when="deployments"),
)


@dataclass
class Names:
    """The objects Rotor touches in one namespace."""

    external_secrets: set[str] = field(default_factory=set)
    secrets: set[str] = field(default_factory=set)
    deployments: set[str] = field(default_factory=set)

    def add(self, external_secrets: Iterable[str] = (), deployments: Iterable[str] = ()) -> None:
        for name in external_secrets:
            self.external_secrets.add(name)
            self.secrets.add(name)  # ESO writes a Secret of the ExternalSecret's name
        self.deployments.update(deployments)


def names_by_namespace(catalogue: Catalogue, env: str | None = None) -> dict[str, Names]:
    """Namespace -> the objects Rotor touches there, in `env` or in every environment."""
    envs = [env] if env else list(catalogue.environments)
    if env:
        catalogue.environment(env)
    found: dict[str, Names] = {}

    def at(namespace: str) -> Names:
        return found.setdefault(namespace, Names())

    for env_name in envs:
        for app_name in catalogue.apps:
            target = catalogue.target(app_name, env_name)
            at(target.namespace).add([target.external_secret], [target.deployment])
        places: list[Consumers] = [
            user.environments[env_name] for user in catalogue.iam_users.values()
            if env_name in user.environments
        ] + [
            secret.environments[env_name] for secret in catalogue.secrets.values()
            if env_name in secret.environments
        ]
        for consumers in places:
            at(consumers.namespace).add(consumers.external_secrets, consumers.deployments)
        for database in catalogue.databases.values():
            at(BACKUP_NAMESPACE).add([database.backup_external_secret])
    return {ns: names for ns, names in sorted(found.items())
            if names.external_secrets or names.deployments}


def rules(names: Names, uses: Iterable[Use] = USES) -> list[dict[str, Any]]:
    """The Role's rules for one namespace: each use, limited to the names known."""
    made = []
    for use in uses:
        rule: dict[str, Any] = {"apiGroups": [use.group], "resources": [use.resource],
                                "verbs": list(use.verbs)}
        if use.names is not None:
            listed = sorted(getattr(names, use.names))
            if not listed:
                continue
            rule["resourceNames"] = listed
        elif use.when is not None and not getattr(names, use.when):
            continue
        made.append(rule)
    return made


def manifests(catalogue: Catalogue, env: str | None = None, *,
              service_account: str = "rotor", service_account_namespace: str = "rotor",
              uses: Iterable[Use] = USES) -> list[dict[str, Any]]:
    """A Role and a RoleBinding (to Rotor's service account) per namespace."""
    uses = tuple(uses)
    objects: list[dict[str, Any]] = []
    labels = {"app.kubernetes.io/name": "rotor"}
    for namespace, names in names_by_namespace(catalogue, env).items():
        metadata = {"name": ROLE_NAME, "namespace": namespace, "labels": labels}
        objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                        "metadata": copy.deepcopy(metadata), "rules": rules(names, uses)})
        objects.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": copy.deepcopy(metadata),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": ROLE_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": service_account,
                          "namespace": service_account_namespace}],
        })
    return objects


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


@dataclass(frozen=True)
class Call:
    """One Kubernetes API call, as RBAC sees it (name is None for a list)."""

    verb: str
    group: str
    resource: str
    namespace: str
    name: str | None


def allows(objects: Iterable[dict[str, Any]], call: Call) -> bool:
    """Whether the Roles among `objects` let the call through."""
    for role in objects:
        if role["kind"] != "Role" or role["metadata"]["namespace"] != call.namespace:
            continue
        for rule in role["rules"]:
            if (call.group in rule["apiGroups"] and call.resource in rule["resources"]
                    and call.verb in rule["verbs"]):
                listed = rule.get("resourceNames")
                if listed is None or (call.name is not None and call.name in listed):
                    return True
    return False


def grants(objects: Iterable[dict[str, Any]]) -> set[Call]:
    """Every (verb, object) the Roles allow; a rule without names grants the name None."""
    found = set()
    for role in objects:
        if role["kind"] != "Role":
            continue
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            found.add(Call(verb, group, resource, role["metadata"]["namespace"],
                                           name))
    return found
