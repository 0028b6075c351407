"""`rotor rbac`: the Roles allow exactly the Kubernetes calls Rotor makes.

A full MySQL rotation (Reloader off, so Rotor restarts the Deployment itself) is checked call
by call against the Roles generated from its catalogue, in both directions. The whole suite's
calls are checked too, at the end of the session (tests/conftest.py, tests/kube_calls.py).
"""

from __future__ import annotations

import dataclasses
import json

import kubernetes_validate
import yaml
from click.testing import CliRunner

from bot.cli import main
from bot.settings import Settings
from bot.wiring import build_engine
from demo.kube_api import rbac_call
from rotation import catalogue as catalogue_module
from rotation import rbac
from tests import kube_calls
from tests.rig import Rig, drive

CATALOGUE = """
environments:
  staging: {aws_region: eu-west-1}
  production: {aws_region: eu-west-1}
apps:
  signon: {engine: mysql}
  publisher: {engine: postgres, namespace: publishing, environments: {production: {deployment: publisher-web}}}
iam_users:
  ci-bot:
    environments:
      production: {namespace: ci, external_secrets: [ci-aws], deployments: [runner], secrets: [{id: ci/aws}]}
secrets:
  govuk/api-token:
    environments:
      staging: {namespace: apps, external_secrets: [api-token]}
databases:
  shared-mysql: {engine: mysql, apps: [signon]}
"""


def test_roles_per_namespace_name_exactly_what_the_catalogue_lists() -> None:
    catalogue = catalogue_module.parse(CATALOGUE)
    by_ns = rbac.names_by_namespace(catalogue, "production")
    assert sorted(by_ns) == ["apps", "ci", "publishing"]
    assert by_ns["apps"].external_secrets == {"signon-mysql", "db-backup-passwd"}
    assert by_ns["apps"].deployments == {"signon"}
    assert by_ns["publishing"].deployments == {"publisher-web"}
    assert by_ns["ci"].secrets == {"ci-aws"}
    # Staging has no ci-bot key, and its managed secret lists no Deployment.
    staging = rbac.names_by_namespace(catalogue, "staging")
    assert sorted(staging) == ["apps", "publishing"]
    assert staging["apps"].external_secrets == {"signon-mysql", "db-backup-passwd", "api-token"}
    assert staging["publishing"].deployments == {"publisher"}


def test_rotor_rbac_prints_valid_roles_and_bindings(tmp_path) -> None:
    path = tmp_path / "rotor.yml"
    path.write_text(CATALOGUE)
    result = CliRunner().invoke(main, ["--config", str(path), "rbac", "production",
                                       "--service-account-namespace", "ops"])
    assert result.exit_code == 0, result.output
    objects = [o for o in yaml.safe_load_all(result.output) if o]
    assert [(o["kind"], o["metadata"]["namespace"]) for o in objects] == [
        ("Role", "apps"), ("RoleBinding", "apps"), ("Role", "ci"), ("RoleBinding", "ci"),
        ("Role", "publishing"), ("RoleBinding", "publishing")]
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)
    assert objects[1]["subjects"] == [{"kind": "ServiceAccount", "name": "rotor",
                                       "namespace": "ops"}]
    ci = objects[2]["rules"]
    assert {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"],
            "resourceNames": ["runner"]} in ci
    # Nothing beyond get, patch and list; listing pods is the one rule without names.
    assert {v for o in objects if o["kind"] == "Role" for r in o["rules"] for v in r["verbs"]} \
        == {"get", "patch", "list"}
    assert [r["resources"] for r in ci if "resourceNames" not in r] == [["pods"]]

    bad = CliRunner().invoke(main, ["--config", str(path), "rbac", "prod"])
    assert bad.exit_code == 1 and "unknown environment 'prod'" in bad.output


def rotation_calls(world: Rig) -> tuple[list[dict], list[dict]]:
    """A full MySQL rotation's Kubernetes calls, and the Roles for its catalogue."""
    world.kube.reloader_enabled = False  # no Reloader: Rotor restarts the Deployment
    world.kube.clear_requests()
    engine = build_engine(Settings.load())
    rotation = engine.start("mysql", world.app, "staging", "alice")
    final = drive(engine, rotation.id)
    assert final.status == "done", [(s.name, s.status, s.error) for s in final.steps]
    steps = {s.name: s for s in final.steps}
    assert "restart" in (steps["rollout"].result or ""), steps["rollout"].result
    entries = [{**call, "catalogue": str(world.config_path)}
               for r in world.kube.requests if (call := rbac_call(r.method, r.path))]
    assert len(entries) == len(world.kube.requests)
    roles = rbac.manifests(catalogue_module.load(world.config_path), "staging")
    return entries, roles


def test_a_rotation_uses_exactly_what_the_roles_allow(world: Rig) -> None:
    entries, roles = rotation_calls(world)
    assert kube_calls.refused(entries) == []
    made = {kube_calls.as_call(e) for e in entries}
    assert rbac.grants(roles) - made == set(), "granted but never used"
    assert made - rbac.grants(roles) == set()
    assert {(c.verb, c.resource) for c in made if c is not None} == {
        ("get", "externalsecrets"), ("patch", "externalsecrets"), ("get", "secrets"),
        ("get", "deployments"), ("patch", "deployments"), ("list", "pods")}

    # Removing any one permission from the generator makes the same calls fail the check.
    for verb, group, resource in sorted(kube_calls.kinds()):
        fewer = []
        for use in rbac.USES:
            if (use.group, use.resource) == (group, resource):
                use = dataclasses.replace(use, verbs=tuple(v for v in use.verbs if v != verb))
            fewer.append(use)
        assert kube_calls.refused(entries, fewer) != [], (verb, resource)
    # A permission no call uses is reported.
    more = [*rbac.USES, rbac.Use("", "secrets", ("list",), when="deployments")]
    assert kube_calls.unused(entries, more) == ["list secrets"]
    assert kube_calls.unused(entries) == []
    # A call on another object, or in another namespace, is refused.
    stray = {**entries[0], "name": "someone-elses"}
    assert "someone-elses" in " ".join(kube_calls.refused([*entries, stray]))
    other_ns = {**entries[0], "namespace": "kube-system"}
    assert "kube-system" in " ".join(kube_calls.refused([other_ns]))
    assert json.dumps(entries)  # the log format is plain JSON
