"""The Kubernetes reads and writes Rotor's steps need, over the official `kubernetes` client.

They automate two parts of the RDS application-credentials runbook:

- "Force sync of Kubernetes secrets": annotate the ExternalSecret with `force-sync=<epoch>`,
  then read the Secret it writes to check the user in `DATABASE_URL`.
- "Check application variables": wait for the Deployment to roll out pods that started after
  the Secret changed (Reloader restarts them, or Rotor does it like `kubectl rollout restart`).

Every failure is a one-line `KubeError` naming the object; secret values read here are
registered with `rotation.redact` before anything else can see them.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from rotation import fence, redact, timeouts
from rotation.errors import KubeError

ESO_GROUP = "external-secrets.io"
FORCE_SYNC_ANNOTATION = "force-sync"
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
# The API server refuses strategic-merge patches on custom resources (415), so every patch
# Rotor sends says explicitly that it is a JSON merge patch (RFC 7386).
MERGE_PATCH = "application/merge-patch+json"
# Stakater Reloader rolls a Deployment carrying one of these when its Secret changes.
RELOADER_AUTO = ("reloader.stakater.com/auto", "secret.reloader.stakater.com/auto",
                 "reloader.stakater.com/search")
RELOADER_NAMED = "secret.reloader.stakater.com/reload"


def reloader_watches(annotations: Mapping[str, str]) -> bool:
    """True when the Deployment asks Reloader to roll it on a Secret change."""
    return (any(annotations.get(key, "").lower() == "true" for key in RELOADER_AUTO)
            or bool(annotations.get(RELOADER_NAMED, "").strip()))


@dataclass(frozen=True)
class ExternalSecretStatus:
    name: str
    target_secret: str
    synced_resource_version: str | None
    ready: bool | None
    reason: str | None
    message: str | None
    refresh_time: datetime | None
    annotations: dict[str, str]


@dataclass(frozen=True)
class DeploymentStatus:
    name: str
    generation: int
    observed_generation: int
    replicas: int
    updated_replicas: int
    ready_replicas: int
    available_replicas: int
    progress_deadline_exceeded: bool
    restarted_at: str | None
    reloader: bool = True  # a Reloader annotation is present: a Secret change rolls it

    @property
    def complete(self) -> bool:
        """The controller has seen the latest spec and every wanted pod runs it and is ready."""
        return (
            self.observed_generation >= self.generation
            and self.updated_replicas == self.replicas
            and self.ready_replicas == self.replicas
            and self.available_replicas == self.replicas
        )


@dataclass(frozen=True)
class PodInfo:
    name: str
    uid: str
    start_time: datetime | None
    ready: bool


def parse_url_username(url: str) -> str:
    """The user part of a connection URL, percent-decoded.

    Errors never echo the URL: it holds the password.
    """
    try:
        parts = urlsplit(url)
        username = parts.username
    except ValueError:
        raise KubeError("connection URL is not a valid URL") from None
    if not parts.scheme or not parts.netloc:
        raise KubeError("connection URL has no scheme or host")
    if not username:
        raise KubeError("connection URL has no user name")
    return unquote(username)


class Kube:
    """One cluster (one environment). Pass in an `ApiClient`; nothing global is touched."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        eso_api_version: str = "v1",
        timeout: float | tuple[float, float] | None = None,
    ) -> None:
        self.api_client = api_client
        self.eso_api_version = eso_api_version
        # (connect, read) on every call: see rotation.timeouts.
        self.timeout = timeout or (timeouts.BOUNDS.kube_connect, timeouts.BOUNDS.kube_read)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._apps = kubernetes.client.AppsV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._eso_api = f"{ESO_GROUP}/{eso_api_version} externalsecrets"

    @classmethod
    def from_config(
        cls,
        context: str | None,
        *,
        config_file: str | None = None,
        eso_api_version: str = "v1",
    ) -> Kube:
        """A client for a kubeconfig context, or for the pod's service account.

        With no context, Rotor running inside a cluster (KUBERNETES_SERVICE_HOST set, as the
        kubelet does for every pod) uses its service account; elsewhere the kubeconfig's current
        context. `config_file` None means $KUBECONFIG or ~/.kube/config. The client's global
        default Configuration is never set, so several environments can live in one process.
        """
        where = f"context {context}" if context else "the current context"
        try:
            if context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                where = "the in-cluster service account"
                configuration = kubernetes.client.Configuration()
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            else:
                configuration = kubernetes.client.Configuration()
                # persist_config=False: a bot must not rewrite a person's kubeconfig file.
                kubernetes.config.load_kube_config(
                    config_file=config_file, context=context,
                    client_configuration=configuration, persist_config=False,
                )
            # urllib3 would retry a timed-out GET three times: bound the attempts too.
            configuration.retries = timeouts.BOUNDS.kube_attempts - 1
            api_client = kubernetes.client.ApiClient(configuration)
        except (kubernetes.config.ConfigException, OSError, ValueError) as exc:
            detail = _one_line(str(exc)) or type(exc).__name__
            raise KubeError(f"cannot load Kubernetes config for {where}: {detail}") from None
        return cls(api_client, eso_api_version=eso_api_version)

    def close(self) -> None:
        self.api_client.close()

    def external_secret(self, namespace: str, name: str) -> ExternalSecretStatus:
        """The ExternalSecret's sync status, as `kubectl get externalsecrets` shows it."""
        with _api_errors(f"ExternalSecret {namespace}/{name}", "read", self._eso_api):
            obj = self._custom.get_namespaced_custom_object(
                ESO_GROUP,
                self.eso_api_version,
                namespace,
                "externalsecrets",
                name,
                _request_timeout=self.timeout,
            )
        if not isinstance(obj, dict):
            raise KubeError(f"ExternalSecret {namespace}/{name}: unexpected response from the API")
        metadata = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ready = _condition(status.get("conditions"), "Ready")
        return ExternalSecretStatus(
            name=name,
            target_secret=(spec.get("target") or {}).get("name") or name,
            synced_resource_version=status.get("syncedResourceVersion"),
            ready=_condition_status(ready),
            reason=ready.get("reason") if ready else None,
            message=ready.get("message") if ready else None,
            refresh_time=_parse_time(status.get("refreshTime")),
            annotations=dict(metadata.get("annotations") or {}),
        )

    def force_sync(self, namespace: str, name: str, epoch: int) -> None:
        """Runbook "Force sync of Kubernetes secrets":
        `kubectl annotate externalsecrets NAME force-sync=EPOCH --overwrite`."""
        body = {"metadata": {"annotations": {FORCE_SYNC_ANNOTATION: str(epoch)}}}
        fence.guard(f"annotate ExternalSecret {namespace}/{name}")
        with _api_errors(f"ExternalSecret {namespace}/{name}", "annotate", self._eso_api):
            self._custom.patch_namespaced_custom_object(
                ESO_GROUP,
                self.eso_api_version,
                namespace,
                "externalsecrets",
                name,
                body,
                _content_type=MERGE_PATCH,
                _request_timeout=self.timeout,
            )

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded. The value is registered with redact before returning."""
        with _api_errors(f"Secret {namespace}/{name}", "read"):
            secret = self._core.read_namespaced_secret(
                name, namespace, _request_timeout=self.timeout
            )
        encoded = (secret.data or {}).get(key)
        if encoded is None:
            raise KubeError(f"Secret {namespace}/{name} has no {key}")
        try:
            value = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise KubeError(
                f"Secret {namespace}/{name} {key} is not base64-encoded UTF-8"
            ) from None
        redact.register(value)
        return value

    def secret_contains(self, namespace: str, name: str, values: Iterable[str]) -> bool:
        """Whether any of the Secret's values holds any of `values`, plainly or URL-quoted.

        The comparison happens here and the Secret's values go nowhere: nothing is returned
        or registered (registering, say, an access key id would make the store refuse every
        row that names it)."""
        with _api_errors(f"Secret {namespace}/{name}", "read"):
            secret = self._core.read_namespaced_secret(
                name, namespace, _request_timeout=self.timeout
            )
        held = []
        for encoded in (secret.data or {}).values():
            try:
                held.append(base64.b64decode(encoded, validate=True).decode("utf-8"))
            except (binascii.Error, UnicodeDecodeError):
                continue  # binary data cannot hold a text value
        return any(v in item or quote(v, safe="") in item for v in values if v for item in held)

    def url_username(self, namespace: str, name: str, key: str = "DATABASE_URL") -> str:
        """The user in the Secret's connection URL (runbook: "check that the username:password
        bit matches what you expect"). The URL and its password are registered, never returned."""
        url = self.secret_value(namespace, name, key)
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            redact.register(password, unquote(password))
        try:
            return parse_url_username(url)
        except KubeError as exc:
            raise KubeError(f"Secret {namespace}/{name} {key}: {exc}") from None

    def deployment(self, namespace: str, name: str) -> DeploymentStatus:
        """The Deployment's rollout status, as `kubectl rollout status` reads it."""
        with _api_errors(f"Deployment {namespace}/{name}", "read"):
            dep = self._apps.read_namespaced_deployment(
                name, namespace, _request_timeout=self.timeout
            )
        status = dep.status
        template_annotations = {}
        if dep.spec is not None and dep.spec.template.metadata is not None:
            template_annotations = dep.spec.template.metadata.annotations or {}
        conditions = (status.conditions if status else None) or []
        return DeploymentStatus(
            name=name,
            generation=(dep.metadata.generation if dep.metadata else None) or 0,
            observed_generation=(status.observed_generation if status else None) or 0,
            # The API defaults spec.replicas to 1 when it is left out.
            replicas=1 if dep.spec is None or dep.spec.replicas is None else dep.spec.replicas,
            updated_replicas=(status.updated_replicas if status else None) or 0,
            ready_replicas=(status.ready_replicas if status else None) or 0,
            available_replicas=(status.available_replicas if status else None) or 0,
            progress_deadline_exceeded=any(
                c.type == "Progressing" and c.reason == "ProgressDeadlineExceeded"
                for c in conditions
            ),
            restarted_at=template_annotations.get(RESTARTED_AT_ANNOTATION),
            reloader=reloader_watches((dep.metadata.annotations if dep.metadata else None) or {}),
        )

    def deployment_pods(self, namespace: str, name: str) -> list[PodInfo]:
        """The Deployment's live pods (runbook: "Check application variables").

        Pods being deleted and pods that have finished (evicted ones linger as Failed) are left
        out: they no longer serve, and they would hold a check on old pods back forever.
        """
        with _api_errors(f"Deployment {namespace}/{name}", "read"):
            dep = self._apps.read_namespaced_deployment(
                name, namespace, _request_timeout=self.timeout
            )
        selector = dep.spec.selector if dep.spec else None
        if selector is None or not selector.match_labels or selector.match_expressions:
            # matchLabels alone can be turned into an exact label query; anything else could
            # select the wrong pods, so refuse rather than guess.
            raise KubeError(
                f"Deployment {namespace}/{name} does not select its pods by matchLabels"
            )
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.match_labels.items()))
        with _api_errors(f"pods of Deployment {namespace}/{name}", "list"):
            pods = self._core.list_namespaced_pod(
                namespace, label_selector=label_selector, _request_timeout=self.timeout
            )
        found = []
        for pod in pods.items:
            if pod.metadata is None or pod.metadata.deletion_timestamp is not None:
                continue
            if pod.status is not None and pod.status.phase in ("Succeeded", "Failed"):
                continue
            conditions = (pod.status.conditions if pod.status else None) or []
            found.append(
                PodInfo(
                    name=pod.metadata.name or "",
                    uid=pod.metadata.uid or "",
                    start_time=_utc(pod.status.start_time) if pod.status else None,
                    ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
                )
            )
        return sorted(found, key=lambda p: p.name)

    def restart_deployment(self, namespace: str, name: str, at: datetime) -> None:
        """`kubectl rollout restart`: stamp the pod template so every pod is replaced."""
        body = {
            "spec": {
                "template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: at.isoformat()}}}
            }
        }
        fence.guard(f"restart Deployment {namespace}/{name}")
        with _api_errors(f"Deployment {namespace}/{name}", "restart"):
            self._apps.patch_namespaced_deployment(
                name,
                namespace,
                body,
                _content_type=MERGE_PATCH,
                _request_timeout=self.timeout,
            )


def _condition(conditions: Any, type_: str) -> Mapping[str, Any] | None:
    for condition in conditions or []:
        if isinstance(condition, dict) and condition.get("type") == type_:
            return condition
    return None


def _condition_status(condition: Mapping[str, Any] | None) -> bool | None:
    if condition is None:
        return None
    return {"True": True, "False": False}.get(condition.get("status", ""))


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def _utc(value: datetime | None) -> datetime | None:
    """Kubernetes times are UTC; give them all the same tzinfo so they compare and print alike."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _api_reason(exc: ApiException) -> tuple[str | None, str | None, str | None]:
    """(reason, message, details.name) from the Status body the API server sends with errors."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return None, None, None
    if not isinstance(body, dict):
        return None, None, None
    details = body.get("details")
    name = details.get("name") if isinstance(details, dict) else None
    return body.get("reason"), body.get("message"), name


@contextmanager
def _api_errors(what: str, action: str, api: str | None = None) -> Iterator[None]:
    """Turn the client's exceptions into one-line KubeErrors naming the object.

    The originals are dropped (`from None`): their text is the whole HTTP exchange, headers
    and all, and nothing in it helps a person more than the Status message kept here.
    """
    try:
        yield
    except ApiException as exc:
        reason, message, details_name = _api_reason(exc)
        if exc.status == 404 and (details_name or not message):
            raise KubeError(f"{what} not found") from None
        if exc.status == 404:
            # No object name in the Status: the resource type itself is not served (for
            # example an ExternalSecret API version the cluster does not have).
            served = f"the API server does not serve {api}" if api else _one_line(message or "")
            raise KubeError(f"{what} not found: {served}") from None
        summary = " ".join(str(part) for part in (exc.status, reason or exc.reason) if part)
        detail = f": {_one_line(message)}" if message else ""
        raise KubeError(f"cannot {action} {what}: {summary}{detail}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KubeError(
            f"cannot {action} {what}: Kubernetes API unreachable ({type(exc).__name__})"
        ) from None
    except ValueError as exc:
        # pydantic's ValidationError quotes the input it rejected, which for a Secret is the
        # secret data itself: keep only the type.
        raise KubeError(
            f"cannot {action} {what}: the client could not send or read it ({type(exc).__name__})"
        ) from None
