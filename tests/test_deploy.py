"""deploy/kubernetes: both overlays render with kustomize and every object they render is
valid against the Kubernetes schemas (kubernetes-validate, offline, strict: unknown fields
fail), and they hold what the README promises."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.30"  # what the clusters run; the schemas are checked against it


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render the manifests (`kubectl kustomize`)",
                    pytrace=False)
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


@pytest.mark.parametrize("overlay", ["single", "ha"])
def test_every_rendered_object_is_valid(overlay: str) -> None:
    objects = render(overlay)
    assert {o["kind"] for o in objects} >= {"ServiceAccount", "ConfigMap", "Service", "Deployment"}
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} "
                        f"at {'.'.join(str(p) for p in exc.path)}", pytrace=False)


def test_the_validator_refuses_a_bad_object() -> None:
    """The check above can fail: an unknown field in the security context is refused."""
    deployment = by_kind(render("single"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["single", "ha"])
def test_locked_down_and_probed(overlay: str) -> None:
    objects = render(overlay)
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    main = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["resources"]["requests"]["memory"]
    # rotor.yml from the ConfigMap kustomize made; Slack tokens from Secret references only.
    config = by_kind(objects, "ConfigMap")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    assert "rotor.yml" in config["data"]
    env = {e["name"]: e for e in main["env"]}
    assert env["ROTOR_CONFIG"]["value"] == "/etc/rotor/rotor.yml"
    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "rotor-slack"
    # The read-only root is writable only where volumes are mounted.
    assert {m["mountPath"] for m in main["volumeMounts"]} == {"/etc/rotor", "/var/lib/rotor",
                                                              "/tmp"}
    account = by_kind(objects, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::")
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_single_keeps_sqlite_on_a_claim_and_never_runs_two() -> None:
    objects = render("single")
    deployment = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = by_kind(objects, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "persistentVolumeClaim": {
        "claimName": claim["metadata"]["name"]}}
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["ROTOR_STATE"]["value"].startswith("/var/lib/rotor/")


def test_ha_shares_postgresql_and_spreads_out() -> None:
    objects = render("ha")
    deployment = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    labels = deployment["spec"]["selector"]["matchLabels"]
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["ROTOR_STATE"] == {"name": "ROTOR_STATE", "valueFrom": {
        "secretKeyRef": {"name": "rotor-state", "key": "url"}}}
    pdb = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    required = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required[0]["topologyKey"] == "kubernetes.io/hostname"
    assert required[0]["labelSelector"]["matchLabels"] == labels


def _norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_is_pinned_and_the_image_and_ci_use_the_pins() -> None:
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[_norm(name)] = version
    for requirement in wanted:
        name = _norm(re.split(r"[\[<>=~ ]", requirement)[0])
        assert name in pins, f"{name} is not pinned in constraints.txt"
        extras = re.search(r"\[([^\]]*)\]", requirement)
        for extra in extras.group(1).split(",") if extras and name == "psycopg" else []:
            assert f"psycopg-{extra}" in pins, f"psycopg[{extra}] is not pinned"
    assert "-c constraints.txt" in (REPO / "Dockerfile").read_text()
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
