"""rotation.kube through the real `kubernetes` client against FakeKube, with the AWS side in moto.

The fake's clock is injected and starts a quarter-second past a whole second, so tests move
time instead of sleeping and catch anything that forgets Kubernetes times are whole seconds.
"""

from __future__ import annotations

import json
import re
import secrets
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import kubernetes
import pytest
from moto import mock_aws

from demo.kube_api import FakeKube, Recorded
from rotation import redact
from rotation.errors import KubeError
from rotation.kube import Kube, parse_url_username

SECRET_ID = "govuk/signon/mysql"
ES_PATH = "/apis/external-secrets.io/v1/namespaces/apps/externalsecrets/signon-mysql"
START = datetime(2026, 11, 22, 10, 0, 3, 250000, tzinfo=UTC).timestamp()
RFC3339_WHOLE_SECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def at(t: float) -> datetime:
    """What Kubernetes would record for time t: whole seconds, UTC."""
    return datetime.fromtimestamp(int(t), UTC)


def new_password() -> str:
    # URL-special characters prove the URL is quoted on the way in and parsed on the way out.
    return f"p@ss:w/rd%{secrets.token_hex(8)}"


def db_secret(username: str, password: str) -> str:
    return json.dumps(
        {
            "engine": "mysql",
            "host": "signon.abc123.eu-west-1.rds.amazonaws.com",
            "port": 3306,
            "dbname": "signon_production",
            "username": username,
            "password": password,
        }
    )


@pytest.fixture
def secrets_manager() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="eu-west-1")
        client.create_secret(Name=SECRET_ID, SecretString=db_secret("signon", new_password()))
        yield client


@pytest.fixture
def rotate_in_aws(secrets_manager: Any) -> Callable[[str], str]:
    """Put a new AWSCURRENT version with `username`; returns its password."""

    def rotate(username: str) -> str:
        password = new_password()
        secrets_manager.put_secret_value(
            SecretId=SECRET_ID, SecretString=db_secret(username, password)
        )
        return password

    return rotate


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(secrets_manager: Any, clock: Clock) -> Iterator[FakeKube]:
    def read_current(secret_id: str) -> str:
        return secrets_manager.get_secret_value(SecretId=secret_id)["SecretString"]

    with FakeKube(read_current, clock=clock) as server:
        server.add_external_secret("apps", "signon-mysql", secret_id=SECRET_ID)
        server.add_deployment("apps", "signon", replicas=2, reloads_on=["signon-mysql"])
        yield server


@pytest.fixture
def kubeconfig(fake: FakeKube, tmp_path: Path) -> str:
    return fake.write_kubeconfig(tmp_path / "kubeconfig", context="test", contexts=["integration"])


@pytest.fixture
def connect(kubeconfig: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Kube]]:
    """Kube.from_config on the fake's kubeconfig, outside any cluster; closes what it made."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    made: list[Kube] = []

    def connect(context: str | None = "test") -> Kube:
        made.append(Kube.from_config(context, config_file=kubeconfig))
        return made[-1]

    yield connect
    for client in made:
        client.close()


@pytest.fixture
def kube(connect: Callable[..., Kube]) -> Kube:
    return connect("test")


# -- ExternalSecrets: "Force sync of Kubernetes secrets" ------------------------------------


def test_force_sync_sends_a_merge_patch_and_the_secret_resyncs(
    kube: Kube, fake: FakeKube, rotate_in_aws: Callable[[str], str]
) -> None:
    before = kube.external_secret("apps", "signon-mysql")
    assert (before.ready, before.reason, before.target_secret) == (
        True,
        "SecretSynced",
        "signon-mysql",
    )
    rotate_in_aws("signon_user_20261122")
    fake.clear_requests()

    kube.force_sync("apps", "signon-mysql", 1795341603)

    assert fake.requests == [
        Recorded(
            "PATCH",
            ES_PATH,
            "application/merge-patch+json",
            {"metadata": {"annotations": {"force-sync": "1795341603"}}},
        )
    ]
    after = kube.external_secret("apps", "signon-mysql")
    assert after.synced_resource_version != before.synced_resource_version
    assert (after.ready, after.reason, after.message) == (True, "SecretSynced", "secret synced")
    assert after.annotations == {"force-sync": "1795341603"}
    assert after.refresh_time == at(START)
    assert kube.url_username("apps", "signon-mysql") == "signon_user_20261122"
    # An annotation is metadata: the generation stays, only the annotation hash moves.
    assert fake.external_secret("apps", "signon-mysql")["metadata"]["generation"] == 1
    assert (after.synced_resource_version or "").startswith("1-")


def test_force_sync_again_with_the_same_epoch_writes_nothing(kube: Kube, fake: FakeKube) -> None:
    kube.force_sync("apps", "signon-mysql", 1795341603)
    version = fake.external_secret("apps", "signon-mysql")["metadata"]["resourceVersion"]

    kube.force_sync("apps", "signon-mysql", 1795341603)

    assert fake.external_secret("apps", "signon-mysql")["metadata"]["resourceVersion"] == version


def test_status_changes_only_once_the_sync_delay_has_passed(
    kube: Kube, fake: FakeKube, clock: Clock, rotate_in_aws: Callable[[str], str]
) -> None:
    fake.sync_delay = 30
    before = kube.external_secret("apps", "signon-mysql")
    rotate_in_aws("signon_user_20261122")

    kube.force_sync("apps", "signon-mysql", 1795341603)
    clock.advance(29)
    pending = kube.external_secret("apps", "signon-mysql")
    clock.advance(1)
    synced = kube.external_secret("apps", "signon-mysql")

    assert pending.synced_resource_version == before.synced_resource_version
    assert kube.url_username("apps", "signon-mysql") == "signon_user_20261122"
    assert synced.synced_resource_version != before.synced_resource_version
    assert synced.refresh_time == at(START + 30)


def test_a_failed_sync_is_reported_and_leaves_the_secret_alone(
    kube: Kube, fake: FakeKube, rotate_in_aws: Callable[[str], str]
) -> None:
    before = kube.external_secret("apps", "signon-mysql")
    rotate_in_aws("signon_user_20261122")
    fake.sync_error = "could not get secret data from provider"

    kube.force_sync("apps", "signon-mysql", 1795341603)

    failed = kube.external_secret("apps", "signon-mysql")
    assert (failed.ready, failed.reason, failed.message) == (
        False,
        "SecretSyncedError",
        "could not get secret data from provider",
    )
    # ESO only moves syncedResourceVersion and refreshTime on success.
    assert failed.synced_resource_version == before.synced_resource_version
    assert failed.refresh_time == before.refresh_time
    assert kube.url_username("apps", "signon-mysql") == "signon"


def raw_patch(fake: FakeKube, path: str, content_type: str, body: object) -> tuple[int, Any]:
    """A PATCH without the kubernetes client, to see exactly what the server does."""
    request = urllib.request.Request(
        fake.url + path,
        data=json.dumps(body).encode(),
        method="PATCH",
        headers={"Authorization": f"Bearer {fake.token}", "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_the_api_server_refuses_strategic_merge_patches_on_external_secrets(
    fake: FakeKube,
) -> None:
    patch = {"metadata": {"annotations": {"force-sync": "1"}}}

    code, status = raw_patch(fake, ES_PATH, "application/strategic-merge-patch+json", patch)

    assert code == 415
    assert (status["kind"], status["reason"], status["code"]) == (
        "Status",
        "UnsupportedMediaType",
        415,
    )
    assert "force-sync" not in fake.external_secret("apps", "signon-mysql")["metadata"].get(
        "annotations", {}
    )


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        (ES_PATH, "application/merge-patch+json", {"metadata": {"labels": {"team": "a"}}}),
        (
            ES_PATH,
            "application/json-patch+json",
            [{"op": "add", "path": "/metadata/labels", "value": {"team": "a"}}],
        ),
        (
            "/apis/apps/v1/namespaces/apps/deployments/signon",
            "application/strategic-merge-patch+json",
            {"metadata": {"labels": {"team": "a"}}},
        ),
    ],
)
def test_the_patch_types_the_api_server_accepts(
    fake: FakeKube, path: str, content_type: str, body: object
) -> None:
    code, obj = raw_patch(fake, path, content_type, body)

    assert code == 200
    assert obj["metadata"]["labels"]["team"] == "a"


def test_older_clusters_serve_external_secrets_as_v1beta1(kube: Kube, fake: FakeKube) -> None:
    beta = Kube(kube.api_client, eso_api_version="v1beta1")

    beta.force_sync("apps", "signon-mysql", 1795341603)

    assert beta.external_secret("apps", "signon-mysql").annotations == {"force-sync": "1795341603"}
    assert {r.path for r in fake.requests if r.method == "PATCH"} == {
        ES_PATH.replace("/v1/", "/v1beta1/")
    }


def test_an_external_secret_version_the_cluster_does_not_serve_is_named(kube: Kube) -> None:
    alpha = Kube(kube.api_client, eso_api_version="v1alpha1")

    with pytest.raises(KubeError) as error:
        alpha.external_secret("apps", "signon-mysql")

    assert str(error.value) == (
        "ExternalSecret apps/signon-mysql not found: "
        "the API server does not serve external-secrets.io/v1alpha1 externalsecrets"
    )


def test_target_secret_comes_from_spec_target_name(kube: Kube, fake: FakeKube) -> None:
    fake.add_external_secret("apps", "signon-db", secret_id=SECRET_ID, target="signon-database")

    assert kube.external_secret("apps", "signon-db").target_secret == "signon-database"
    assert kube.url_username("apps", "signon-database") == "signon"


# -- Secrets: reading values without showing them --------------------------------------------


def test_secret_values_are_registered_for_redaction(
    kube: Kube, rotate_in_aws: Callable[[str], str]
) -> None:
    password = rotate_in_aws("signon_user_20261122")
    kube.force_sync("apps", "signon-mysql", 1795341603)

    value = kube.secret_value("apps", "signon-mysql", "password")

    assert value == password  # the one place a secret is returned: it is what was asked for
    assert redact.redact(f"login with {password}") == "login with [redacted]"


def test_url_username_registers_the_url_and_password_and_returns_only_the_user(
    kube: Kube, rotate_in_aws: Callable[[str], str]
) -> None:
    password = rotate_in_aws("signon_user_20261122")
    kube.force_sync("apps", "signon-mysql", 1795341603)

    username = kube.url_username("apps", "signon-mysql")

    assert username == "signon_user_20261122"
    assert redact.contains_secret(password)
    assert redact.redact(f"DATABASE_URL uses {password}") == "DATABASE_URL uses [redacted]"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql2://signon.abc123.rds.amazonaws.com:3306/signon_production", "has no user name"),
        ("mysql2://:{pw}@signon.abc123.rds.amazonaws.com/signon_production", "has no user name"),
        ("mysql2://signon:{pw}@[signon.abc123/signon_production", "is not a valid URL"),
        ("signon:{pw}", "has no scheme or host"),
    ],
)
def test_a_bad_url_is_reported_without_the_password(
    kube: Kube, fake: FakeKube, url: str, problem: str
) -> None:
    password = "Zq" + secrets.token_hex(12)
    fake.add_secret("apps", "broken", {"DATABASE_URL": url.format(pw=password)})

    with pytest.raises(KubeError) as error:
        kube.url_username("apps", "broken")

    assert str(error.value) == f"Secret apps/broken DATABASE_URL: connection URL {problem}"
    shown = "".join(traceback.format_exception(error.value)) + repr(error.value)
    assert password not in shown
    assert url.format(pw=password) not in shown


@pytest.mark.parametrize(
    ("url", "username"),
    [
        ("mysql2://signon:secret@db:3306/signon_production", "signon"),
        (
            "postgresql://account-api-user-20260121:secret@db/account-api_production",
            "account-api-user-20260121",
        ),
        ("mysql2://sign%40on:p%40ss%3Aword@db/signon", "sign@on"),
        ("mysql2://signon@db/signon", "signon"),
        ("mysql2://signon:p@ss@db/signon", "signon"),
    ],
)
def test_parse_url_username(url: str, username: str) -> None:
    assert parse_url_username(url) == username


# -- Deployments: "Check application variables" ----------------------------------------------


def test_reloader_rolls_the_deployment_when_the_secret_changes(
    kube: Kube, fake: FakeKube, clock: Clock, rotate_in_aws: Callable[[str], str]
) -> None:
    old_pods = kube.deployment_pods("apps", "signon")
    rotate_in_aws("signon_user_20261122")
    clock.advance(60)

    kube.force_sync("apps", "signon-mysql", 1795341663)

    status = kube.deployment("apps", "signon")
    assert (status.generation, status.observed_generation, status.complete) == (2, 2, True)
    assert status.restarted_at is None  # Reloader stamps its own annotation
    pods = kube.deployment_pods("apps", "signon")
    assert len(pods) == 2
    assert {p.uid for p in pods}.isdisjoint({p.uid for p in old_pods})
    assert all(p.ready and p.start_time == at(START + 60) for p in pods)
    # The replaced pods are still terminating; deployment_pods leaves them out.
    terminating = [p for p in fake.pods("apps", "signon") if "deletionTimestamp" in p["metadata"]]
    assert {p["metadata"]["uid"] for p in terminating} == {p.uid for p in old_pods}


def test_pod_start_times_are_whole_seconds(kube: Kube, fake: FakeKube) -> None:
    pods = kube.deployment_pods("apps", "signon")

    assert [p.start_time for p in pods] == [at(START), at(START)]
    assert all(p.start_time is not None and p.start_time.microsecond == 0 for p in pods)
    raw = [p["status"]["startTime"] for p in fake.pods("apps", "signon")]
    assert all(RFC3339_WHOLE_SECONDS.fullmatch(t) for t in raw), raw


def test_no_rollout_when_reloader_is_off(
    kube: Kube, fake: FakeKube, rotate_in_aws: Callable[[str], str]
) -> None:
    fake.reloader_enabled = False
    old_pods = kube.deployment_pods("apps", "signon")
    rotate_in_aws("signon_user_20261122")

    kube.force_sync("apps", "signon-mysql", 1795341603)

    assert kube.url_username("apps", "signon-mysql") == "signon_user_20261122"
    assert kube.deployment("apps", "signon").generation == 1
    assert kube.deployment_pods("apps", "signon") == old_pods


def test_restart_deployment_rolls_once_the_rollout_delay_has_passed(
    kube: Kube, fake: FakeKube, clock: Clock
) -> None:
    fake.configure_deployment("apps", "signon", rollout_delay=45)
    old_pods = kube.deployment_pods("apps", "signon")
    restarted = datetime.fromtimestamp(clock.now, UTC)
    fake.clear_requests()

    kube.restart_deployment("apps", "signon", restarted)

    annotations = {"kubectl.kubernetes.io/restartedAt": restarted.isoformat()}
    assert fake.requests == [
        Recorded(
            "PATCH",
            "/apis/apps/v1/namespaces/apps/deployments/signon",
            "application/merge-patch+json",
            {"spec": {"template": {"metadata": {"annotations": annotations}}}},
        )
    ]
    rolling = kube.deployment("apps", "signon")
    assert (rolling.generation, rolling.observed_generation) == (2, 2)
    assert (rolling.updated_replicas, rolling.ready_replicas, rolling.complete) == (0, 2, False)
    assert rolling.restarted_at == restarted.isoformat()
    assert kube.deployment_pods("apps", "signon") == old_pods

    clock.advance(45)

    done = kube.deployment("apps", "signon")
    assert (done.updated_replicas, done.ready_replicas, done.available_replicas) == (2, 2, 2)
    assert done.complete and not done.progress_deadline_exceeded
    assert [p.start_time for p in kube.deployment_pods("apps", "signon")] == [at(START + 45)] * 2


def test_restarting_again_at_the_same_time_does_not_roll_again(kube: Kube) -> None:
    restarted = datetime.fromtimestamp(START, UTC)
    kube.restart_deployment("apps", "signon", restarted)
    pods = kube.deployment_pods("apps", "signon")

    kube.restart_deployment("apps", "signon", restarted)

    assert kube.deployment("apps", "signon").generation == 2
    assert kube.deployment_pods("apps", "signon") == pods


def test_a_stuck_rollout_reports_progress_deadline_exceeded(kube: Kube, fake: FakeKube) -> None:
    fake.configure_deployment("apps", "signon", rollout_fails=True)

    kube.restart_deployment("apps", "signon", datetime.fromtimestamp(START, UTC))

    status = kube.deployment("apps", "signon")
    assert status.progress_deadline_exceeded and not status.complete
    assert (status.updated_replicas, status.ready_replicas) == (1, 2)
    pods = kube.deployment_pods("apps", "signon")
    assert sorted(p.ready for p in pods) == [False, True, True]


def test_pods_selected_by_expressions_are_refused_rather_than_guessed(
    kube: Kube, fake: FakeKube
) -> None:
    selector = {
        "matchLabels": None,
        "matchExpressions": [
            {"key": "app", "operator": "In", "values": ["signon", "signon-worker"]}
        ],
    }
    code, _ = raw_patch(
        fake,
        "/apis/apps/v1/namespaces/apps/deployments/signon",
        "application/merge-patch+json",
        {"spec": {"selector": selector}},
    )
    assert code == 200

    with pytest.raises(KubeError) as error:
        kube.deployment_pods("apps", "signon")

    assert str(error.value) == "Deployment apps/signon does not select its pods by matchLabels"


# -- Errors: one line, naming the object ------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda k: k.external_secret("apps", "nope"), "ExternalSecret apps/nope not found"),
        (lambda k: k.force_sync("apps", "nope", 1), "ExternalSecret apps/nope not found"),
        (lambda k: k.secret_value("apps", "nope", "password"), "Secret apps/nope not found"),
        (lambda k: k.url_username("apps", "nope"), "Secret apps/nope not found"),
        (
            lambda k: k.secret_value("apps", "signon-mysql", "API_KEY"),
            "Secret apps/signon-mysql has no API_KEY",
        ),
        (
            lambda k: k.url_username("apps", "signon-mysql", "REPLICA_URL"),
            "Secret apps/signon-mysql has no REPLICA_URL",
        ),
        (lambda k: k.deployment("apps", "nope"), "Deployment apps/nope not found"),
        (lambda k: k.deployment_pods("apps", "nope"), "Deployment apps/nope not found"),
        (
            lambda k: k.restart_deployment("apps", "nope", datetime.now(UTC)),
            "Deployment apps/nope not found",
        ),
        (lambda k: k.deployment("other", "signon"), "Deployment other/signon not found"),
    ],
)
def test_missing_objects_are_named_in_one_line(
    kube: Kube, call: Callable[[Kube], object], message: str
) -> None:
    with pytest.raises(KubeError) as error:
        call(kube)

    assert str(error.value) == message
    assert "ApiException" not in "".join(traceback.format_exception(error.value))


def test_a_refused_token_is_one_line(fake: FakeKube, connect: Callable[..., Kube]) -> None:
    fake.token = "rotated-" + secrets.token_hex(4)
    kube = connect()

    with pytest.raises(KubeError) as error:
        kube.deployment("apps", "signon")

    assert str(error.value) == "cannot read Deployment apps/signon: 401 Unauthorized: Unauthorized"


def test_an_unreachable_api_server_is_one_line(
    fake: FakeKube, connect: Callable[..., Kube]
) -> None:
    kube = connect()
    fake.stop()

    with pytest.raises(KubeError) as error:
        kube.external_secret("apps", "signon-mysql")

    assert str(error.value).startswith(
        "cannot read ExternalSecret apps/signon-mysql: Kubernetes API unreachable ("
    )


# -- Configuration: one client per environment ------------------------------------------------


def test_each_context_gets_its_own_client_and_the_global_default_is_untouched(
    connect: Callable[..., Kube],
) -> None:
    default_before = kubernetes.client.Configuration._default

    clients = [connect("test"), connect("integration"), connect(None)]  # None: current context

    assert kubernetes.client.Configuration._default is default_before
    assert len({id(k.api_client.configuration) for k in clients}) == 3
    assert all(k.deployment("apps", "signon").complete for k in clients)


def test_an_unknown_context_is_a_kube_error(connect: Callable[..., Kube]) -> None:
    with pytest.raises(KubeError) as error:
        connect("production")

    assert str(error.value).startswith("cannot load Kubernetes config for context production: ")


def test_without_a_context_inside_a_pod_the_service_account_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(
        kubernetes.config.incluster_config, "SERVICE_TOKEN_FILENAME", "/nonexistent/token"
    )

    with pytest.raises(KubeError) as error:
        Kube.from_config(None)

    assert str(error.value) == (
        "cannot load Kubernetes config for the in-cluster service account: "
        "Service token file does not exist."
    )
