"""A small Kubernetes API server for tests, spoken to by the real `kubernetes` client.

It serves the real REST paths over HTTP on 127.0.0.1 for the few kinds Rotor touches
(ExternalSecrets, Secrets, Deployments, Pods) and plays the controllers around them:

- External Secrets Operator: when an ExternalSecret is added or its annotations/labels/spec
  change, it reads the AWS secret through `secret_reader` (secret id -> SecretString JSON),
  writes the target Secret (`DATABASE_URL`, `username`, `password`) and sets the status.
- Reloader: when a Secret's data changes, Deployments listing it in `reloads_on` roll.
- The Deployment controller: a pod-template change (Reloader, or `kubectl rollout restart`'s
  `restartedAt` annotation) replaces the pods and updates the status.

Delays (`sync_delay`, per-Deployment `rollout_delay`) are evaluated lazily against `clock` on
the next request or helper call, so tests move time instead of sleeping. Like the real server,
timestamps are RFC 3339 with whole seconds, `resourceVersion` changes on every write,
`metadata.generation` only when the spec changes, errors are `Status` objects, and custom
resources refuse strategic-merge patches with 415.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

ESO_GROUP = "external-secrets.io"
RELOADER_WATCH = "secret.reloader.stakater.com/reload"
RELOADER_STAMP = "reloader.stakater.com/last-reloaded-from"

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
# What the real API server accepts, in the order its 415 message lists them.
CR_PATCHES = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH)
BUILTIN_PATCHES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH)

_POD_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for generated names

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Recorded:
    """One request the server received. `body` is the parsed JSON when there was any."""

    method: str
    path: str
    content_type: str | None
    body: Any


CALL_LOG_ENV = "ROTOR_TEST_KUBE_LOG"
_API_PATH = re.compile(
    r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/[^/]+)/namespaces/(?P<namespace>[^/]+)"
    r"/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?"
)
_VERBS = {"PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}
_log_lock = threading.Lock()


def rbac_call(method: str, target: str) -> dict[str, Any] | None:
    """The request as RBAC sees it: verb, API group, resource (with subresource), namespace
    and name; None for a path outside a namespace."""
    parts = urlsplit(target)
    m = _API_PATH.fullmatch(parts.path)
    if m is None:
        return None
    name = unquote(m.group("name")) if m.group("name") else None
    if method == "GET":
        verb = "get" if name else ("watch" if "watch" in parse_qs(parts.query) else "list")
    else:
        verb = _VERBS.get(method, method.lower())
    resource = m.group("resource") + (f"/{m.group('sub')}" if m.group("sub") else "")
    return {"verb": verb, "group": m.group("group") or "", "resource": resource,
            "namespace": unquote(m.group("namespace")), "name": name}


def log_call(method: str, target: str, catalogue: str | None) -> None:
    """Append the call to the file named by $ROTOR_TEST_KUBE_LOG (one JSON object a line), so
    the RBAC check sees every call the whole test suite made."""
    path = os.environ.get(CALL_LOG_ENV)
    if not path:
        return
    call = rbac_call(method, target) or {"verb": method.lower(), "path": target}
    line = json.dumps({**call, "catalogue": catalogue}) + "\n"
    with _log_lock, open(path, "a") as f:
        f.write(line)


def rfc3339(t: float) -> str:
    """Whole seconds, UTC, like every timestamp the real API server writes."""
    return datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status_body(code, reason, message, details)
        self.code = code


def _not_found(resource: str, group: str, name: str) -> _ApiError:
    qualified = f"{resource}.{group}" if group else resource
    details = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return _ApiError(404, "NotFound", f'{qualified} "{name}" not found', details)


_NO_SUCH_PATH = (404, "NotFound", "the server could not find the requested resource")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace and test. Laxer than the real server: missing
    parents are created instead of refused."""
    if not isinstance(operations, list):
        raise _ApiError(400, "BadRequest", "json patch must be a list of operations")
    try:
        return _apply_json_patch(copy.deepcopy(doc), operations)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise _ApiError(422, "Invalid", f"json patch failed: {type(exc).__name__}") from None


def _apply_json_patch(doc: Any, operations: list[Any]) -> Any:
    for op in operations:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        *parents, last = tokens
        node = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node.setdefault(token, {})
        kind = op["op"]
        if kind == "test":
            if node.get(last) != op["value"]:
                raise _ApiError(422, "Invalid", f"test operation failed at {op['path']}")
        elif kind in ("add", "replace"):
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            node.pop(last, None)
        else:
            raise _ApiError(400, "BadRequest", f"unsupported json patch operation {kind}")
    return doc


def _short_hash(value: Any, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _database_secret_data(secret_string: str, scheme: str, url_key: str) -> dict[str, str]:
    """What GOV.UK's ExternalSecret templates make of a govuk/<app>/<engine> secret."""
    values = json.loads(secret_string)
    user, password = str(values["username"]), str(values["password"])
    url = (
        f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}"
        f"@{values['host']}:{values['port']}/{values['dbname']}"
    )
    return {url_key: _b64(url), "username": _b64(user), "password": _b64(password)}


@dataclass
class _ExternalSecretState:
    secret_id: str
    url_scheme: str
    url_key: str
    sync_due: float | None = None


@dataclass
class _DeploymentState:
    reloads_on: tuple[str, ...]
    rollout_delay: float
    rollout_fails: bool
    rollout_started: float | None = None
    failed: bool = False
    pods: list[str] = field(default_factory=list)


class FakeKube:
    """The fake API server. Use as a context manager, or call start() and stop()."""

    def __init__(
        self,
        secret_reader: Callable[[str], str],
        *,
        clock: Callable[[], float] = time.time,
        token: str | None = None,
        sync_delay: float = 0.0,
        sync_error: str | None = None,
        reloader_enabled: bool = True,
        termination_grace: float = 30.0,
        eso_versions: Iterable[str] = ("v1", "v1beta1"),
    ) -> None:
        self.secret_reader = secret_reader
        self.clock = clock
        self.token = token or "fake-" + secrets.token_hex(8)
        # Knobs tests may change at any time.
        self.sync_delay = sync_delay
        self.sync_error = sync_error
        self.reloader_enabled = reloader_enabled
        self.termination_grace = termination_grace
        self.eso_versions = tuple(eso_versions)

        self._lock = threading.RLock()
        self._revision = 1000
        self._external_secrets: dict[Key, dict[str, Any]] = {}
        self._es_state: dict[Key, _ExternalSecretState] = {}
        self._secrets: dict[Key, dict[str, Any]] = {}
        self._deployments: dict[Key, dict[str, Any]] = {}
        self._dep_state: dict[Key, _DeploymentState] = {}
        self._pods: dict[Key, dict[str, Any]] = {}
        self._pod_gone_at: dict[Key, float] = {}
        self._requests: list[Recorded] = []
        # The catalogue whose Rotor talks to this server, named in the call log (the RBAC test).
        self.catalogue_path: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Called (under the lock) as each pod is created: (namespace, deployment, pod name).
        # The demo's sample app reads the pod's environment from the Secret at that moment.
        self.on_pod_created: Callable[[str, str, str], None] | None = None

    # -- server lifecycle ------------------------------------------------------------------

    def start(self) -> FakeKube:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            # A short poll interval keeps stop() (and so each test's teardown) quick.
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-kube",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeKube is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(
        self,
        path: str | os.PathLike[str],
        context: str = "test",
        namespace: str = "apps",
        *,
        contexts: Iterable[str] = (),
    ) -> str:
        """A kubeconfig whose contexts (`context`, the current one, plus `contexts`) all point
        here with bearer-token auth. Returns the path as a string."""
        names = [context, *(c for c in contexts if c != context)]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "rotor", "user": {"token": self.token}}],
            "contexts": [
                {"name": n, "context": {"cluster": "fake", "user": "rotor", "namespace": namespace}}
                for n in names
            ],
            "current-context": context,
        }
        with open(path, "w") as f:
            json.dump(config, f, indent=2)  # JSON is YAML
        return str(path)

    # -- seeding and reading back ----------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def add_external_secret(
        self,
        namespace: str,
        name: str,
        *,
        secret_id: str,
        target: str | None = None,
        url_scheme: str = "mysql2",
        url_key: str = "DATABASE_URL",
    ) -> dict[str, Any]:
        """An ExternalSecret extracting `secret_id`; it syncs at once (ignoring sync_delay)."""
        with self._lock:
            now = self.clock()
            spec: dict[str, Any] = {
                "refreshInterval": "1h",
                "secretStoreRef": {"kind": "ClusterSecretStore", "name": "aws-secretsmanager"},
                "target": {"creationPolicy": "Owner", "deletionPolicy": "Retain"},
                "dataFrom": [{"extract": {"key": secret_id}}],
            }
            if target:
                spec["target"]["name"] = target
            self._external_secrets[(namespace, name)] = {
                "apiVersion": f"{ESO_GROUP}/v1",
                "kind": "ExternalSecret",
                "metadata": self._new_metadata(namespace, name, now, generation=1),
                "spec": spec,
                "status": {},
            }
            self._es_state[(namespace, name)] = _ExternalSecretState(secret_id, url_scheme, url_key)
            self._sync(namespace, name, now)
            return copy.deepcopy(self._external_secrets[(namespace, name)])

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
        """A plain Secret (values given decoded)."""
        with self._lock:
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": self._new_metadata(namespace, name, self.clock()),
                "type": "Opaque",
                "data": {k: _b64(v) for k, v in data.items()},
            }
            self._secrets[(namespace, name)] = secret
            return copy.deepcopy(secret)

    def add_deployment(
        self,
        namespace: str,
        name: str,
        *,
        replicas: int = 2,
        labels: dict[str, str] | None = None,
        reloads_on: Iterable[str] = (),
        rollout_delay: float = 0.0,
        rollout_fails: bool = False,
    ) -> dict[str, Any]:
        """A Deployment with `replicas` running, ready pods."""
        with self._lock:
            now = self.clock()
            labels = dict(labels or {"app": name})
            reloads = tuple(reloads_on)
            metadata = self._new_metadata(namespace, name, now, generation=1)
            metadata["labels"] = dict(labels)
            if reloads:
                metadata["annotations"] = {RELOADER_WATCH: ",".join(reloads)}
            self._deployments[(namespace, name)] = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": metadata,
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": dict(labels)},
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {"containers": [{"name": "app", "image": f"{name}:latest"}]},
                    },
                    "progressDeadlineSeconds": 600,
                },
                "status": {},
            }
            state = _DeploymentState(reloads, rollout_delay, rollout_fails)
            self._dep_state[(namespace, name)] = state
            for _ in range(replicas):
                self._create_pod(namespace, name, now, ready=True)
            self._update_deployment_status(namespace, name, now)
            return copy.deepcopy(self._deployments[(namespace, name)])

    def configure_deployment(
        self,
        namespace: str,
        name: str,
        *,
        rollout_delay: float | None = None,
        rollout_fails: bool | None = None,
        reloads_on: Iterable[str] | None = None,
    ) -> None:
        with self._lock:
            state = self._dep_state[(namespace, name)]
            if reloads_on is not None:  # the Reloader annotation, as `kubectl annotate` sets it
                state.reloads_on = tuple(reloads_on)
                annotations = self._deployments[(namespace, name)]["metadata"].setdefault(
                    "annotations", {})
                annotations.pop(RELOADER_WATCH, None)
                if state.reloads_on:
                    annotations[RELOADER_WATCH] = ",".join(state.reloads_on)
            if rollout_delay is not None:
                state.rollout_delay = rollout_delay
            if rollout_fails is not None:
                state.rollout_fails = rollout_fails
                if not rollout_fails:
                    state.failed = False  # a stuck rollout carries on once pods can start

    def external_secret(self, namespace: str, name: str) -> dict[str, Any]:
        with self._lock:
            self._advance()
            return copy.deepcopy(self._external_secrets[(namespace, name)])

    def secret(self, namespace: str, name: str) -> dict[str, Any]:
        with self._lock:
            self._advance()
            return copy.deepcopy(self._secrets[(namespace, name)])

    def secret_data_now(self, namespace: str, name: str) -> dict[str, str]:
        """The Secret's data this instant, decoded (no controller catches up first: safe to
        call from `on_pod_created`)."""
        with self._lock:
            data = (self._secrets.get((namespace, name)) or {}).get("data") or {}
            return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        """The Secret's data, decoded."""
        data = self.secret(namespace, name).get("data") or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def deployment(self, namespace: str, name: str) -> dict[str, Any]:
        with self._lock:
            self._advance()
            return copy.deepcopy(self._deployments[(namespace, name)])

    def pods(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        """All the Deployment's pods, terminating ones included."""
        with self._lock:
            self._advance()
            names = self._dep_state[(namespace, deployment)].pods
            return [copy.deepcopy(self._pods[(namespace, n)]) for n in names]

    # -- HTTP ------------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, content_type: str | None, auth: str | None, raw: bytes
    ) -> tuple[int, bytes]:
        """Serve one request; the JSON is made under the lock so no writer can race it."""
        media_type = content_type.split(";")[0].strip().lower() if content_type else None
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        with self._lock:
            self._requests.append(Recorded(method, target, media_type, body))
            log_call(method, target, self.catalogue_path)
            scheme, _, token = (auth or "").partition(" ")
            if scheme.lower() != "bearer" or token != self.token:
                code, reply = 401, status_body(401, "Unauthorized", "Unauthorized")
            else:
                self._advance()
                try:
                    code, reply = 200, self._route(method, target, media_type, raw)
                except _ApiError as exc:
                    code, reply = exc.code, exc.status
            return code, json.dumps(reply).encode()

    def _route(self, method: str, target: str, media_type: str | None, raw: bytes) -> Any:
        parts = urlsplit(target)
        path = parts.path
        query = parse_qs(parts.query)

        if m := re.fullmatch(
            rf"/apis/{re.escape(ESO_GROUP)}/([^/]+)/namespaces/([^/]+)/externalsecrets(?:/([^/]+))?",
            path,
        ):
            version, namespace, name = m.group(1), unquote(m.group(2)), m.group(3)
            if version not in self.eso_versions:
                raise _ApiError(*_NO_SUCH_PATH)
            if name is None and method == "GET":
                return self._list_external_secrets(namespace, version)
            if name is not None and method == "GET":
                return self._get_external_secret(namespace, unquote(name), version)
            if name is not None and method == "PATCH":
                return self._patch_external_secret(
                    namespace, unquote(name), version, media_type, raw
                )
            raise _method_not_allowed()

        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", path):
            if method != "GET":
                raise _method_not_allowed()
            key = (unquote(m.group(1)), unquote(m.group(2)))
            if key not in self._secrets:
                raise _not_found("secrets", "", key[1])
            return self._secrets[key]

        if m := re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)", path):
            key = (unquote(m.group(1)), unquote(m.group(2)))
            if key not in self._deployments:
                raise _not_found("deployments", "apps", key[1])
            if method == "GET":
                return self._deployments[key]
            if method == "PATCH":
                return self._patch_deployment(key, media_type, raw)
            raise _method_not_allowed()

        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?", path):
            if method != "GET":
                raise _method_not_allowed()
            namespace = unquote(m.group(1))
            if m.group(2) is None:
                selector = _parse_selector(query.get("labelSelector", [""])[0])
                items = [
                    _without_type(pod)
                    for (ns, _), pod in sorted(self._pods.items())
                    if ns == namespace and selector(pod["metadata"].get("labels") or {})
                ]
                return _list("v1", "PodList", items, self._revision)
            key = (namespace, unquote(m.group(2)))
            if key not in self._pods:
                raise _not_found("pods", "", key[1])
            return self._pods[key]

        raise _ApiError(*_NO_SUCH_PATH)

    # -- ExternalSecrets (and the External Secrets Operator) -------------------------------

    def _get_external_secret(self, namespace: str, name: str, version: str) -> dict[str, Any]:
        obj = self._external_secrets.get((namespace, name))
        if obj is None:
            raise _not_found("externalsecrets", ESO_GROUP, name)
        return {**obj, "apiVersion": f"{ESO_GROUP}/{version}"}

    def _list_external_secrets(self, namespace: str, version: str) -> dict[str, Any]:
        items = [
            {**obj, "apiVersion": f"{ESO_GROUP}/{version}"}
            for (ns, _), obj in sorted(self._external_secrets.items())
            if ns == namespace
        ]
        return _list(f"{ESO_GROUP}/{version}", "ExternalSecretList", items, self._revision)

    def _patch_external_secret(
        self, namespace: str, name: str, version: str, media_type: str | None, raw: bytes
    ) -> dict[str, Any]:
        key = (namespace, name)
        if key not in self._external_secrets:
            raise _not_found("externalsecrets", ESO_GROUP, name)
        # Custom resources have no strategic-merge schema; the real server answers 415.
        _, changed = self._apply_patch(self._external_secrets[key], media_type, raw, CR_PATCHES)
        if changed:
            now = self.clock()
            # ESO reconciles on any change; it notices force-sync because the annotation hash
            # in syncedResourceVersion no longer matches.
            self._es_state[key].sync_due = now + self.sync_delay
            self._advance()
        return self._get_external_secret(namespace, name, version)

    def _sync(self, namespace: str, name: str, t: float) -> None:
        """What ESO does on a reconcile: fetch, write the target Secret, report in status."""
        es = self._external_secrets[(namespace, name)]
        state = self._es_state[(namespace, name)]
        target = es["spec"]["target"].get("name") or name
        status = es["status"]
        if self.sync_error is not None:
            self._set_ready(es, False, "SecretSyncedError", self.sync_error, t)
            return
        try:
            data = _database_secret_data(
                self.secret_reader(state.secret_id), state.url_scheme, state.url_key
            )
        except Exception as exc:  # anything the provider or template step raises
            message = f"could not get secret data from provider: {type(exc).__name__}"
            self._set_ready(es, False, "SecretSyncedError", message, t)
            return
        self._write_target_secret(namespace, target, es, data, t)
        status["refreshTime"] = rfc3339(t)
        status["binding"] = {"name": target}
        status["syncedResourceVersion"] = _eso_resource_version(es["metadata"])
        self._set_ready(es, True, "SecretSynced", "secret synced", t)

    def _set_ready(self, es: dict[str, Any], ok: bool, reason: str, message: str, t: float) -> None:
        old = next((c for c in es["status"].get("conditions", []) if c["type"] == "Ready"), None)
        status = "True" if ok else "False"
        since = old["lastTransitionTime"] if old and old["status"] == status else rfc3339(t)
        es["status"]["conditions"] = [
            {
                "type": "Ready",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
            }
        ]
        self._touch(es)

    def _write_target_secret(
        self, namespace: str, name: str, owner: dict[str, Any], data: dict[str, str], t: float
    ) -> None:
        key = (namespace, name)
        existing = self._secrets.get(key)
        if existing is not None and existing.get("data") == data:
            return
        created = existing is None
        if existing is None:
            metadata = self._new_metadata(namespace, name, t)
            metadata["labels"] = {"reconcile.external-secrets.io/managed": "true"}
            metadata["ownerReferences"] = [
                {
                    "apiVersion": f"{ESO_GROUP}/v1",
                    "kind": "ExternalSecret",
                    "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
            existing = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": metadata,
                "type": "Opaque",
            }
            self._secrets[key] = existing
        else:
            self._touch(existing)
        existing["data"] = data
        existing["metadata"]["annotations"] = {
            "reconcile.external-secrets.io/data-hash": _short_hash(data, 32)
        }
        if not created:  # Reloader ignores creations (reloadOnCreate is off by default)
            self._secret_changed(namespace, name, data, t)

    # -- Deployments, pods (and Reloader) --------------------------------------------------

    def _secret_changed(self, namespace: str, name: str, data: dict[str, str], t: float) -> None:
        """Reloader: roll every Deployment that watches this Secret."""
        if not self.reloader_enabled:
            return
        for (ns, dep_name), state in self._dep_state.items():
            if ns != namespace or name not in state.reloads_on:
                continue
            dep = self._deployments[(ns, dep_name)]
            template_meta = dep["spec"]["template"].setdefault("metadata", {})
            template_meta.setdefault("annotations", {})[RELOADER_STAMP] = json.dumps(
                {
                    "type": "SECRET",
                    "name": name,
                    "namespace": namespace,
                    "hash": _short_hash(data, 40),
                    "containerRefs": ["app"],
                    "observedAt": int(t),
                }
            )
            dep["metadata"]["generation"] += 1
            self._touch(dep)
            self._start_rollout(ns, dep_name, t)

    def _patch_deployment(self, key: Key, media_type: str | None, raw: bytes) -> dict[str, Any]:
        dep = self._deployments[key]
        old_spec = copy.deepcopy(dep["spec"])
        # Built-in kinds accept strategic merge; for the fields used here it is a merge patch.
        spec_changed, _ = self._apply_patch(dep, media_type, raw, BUILTIN_PATCHES)
        if spec_changed:
            now = self.clock()
            if dep["spec"]["template"] != old_spec["template"]:
                self._start_rollout(*key, now)
            elif dep["spec"].get("replicas") != old_spec.get("replicas"):
                self._scale(*key, now)
            self._advance()
        return dep

    def _start_rollout(self, namespace: str, name: str, t: float) -> None:
        state = self._dep_state[(namespace, name)]
        state.rollout_started = t
        state.failed = False
        self._update_deployment_status(namespace, name, t)

    def _finish_rollout(self, namespace: str, name: str, t: float) -> None:
        state = self._dep_state[(namespace, name)]
        dep = self._deployments[(namespace, name)]
        if state.rollout_fails:
            # The first new pod never becomes ready, so the rollout stops there and the old
            # pods keep serving until progressDeadlineSeconds marks it failed.
            state.failed = True
            if not self._live_pods(namespace, name, current_only=True):
                self._create_pod(namespace, name, t, ready=False)
        else:
            state.rollout_started = None
            for pod_name in self._live_pods(namespace, name):
                self._terminate_pod(namespace, pod_name, t)
            for _ in range(dep["spec"].get("replicas", 1)):
                self._create_pod(namespace, name, t, ready=True)
        self._update_deployment_status(namespace, name, t)

    def _scale(self, namespace: str, name: str, t: float) -> None:
        wanted = self._deployments[(namespace, name)]["spec"].get("replicas", 1)
        live = self._live_pods(namespace, name, current_only=True)
        for pod_name in live[wanted:]:
            self._terminate_pod(namespace, pod_name, t)
        for _ in range(wanted - len(live)):
            self._create_pod(namespace, name, t, ready=True)
        self._update_deployment_status(namespace, name, t)

    def _create_pod(self, namespace: str, deployment: str, t: float, *, ready: bool) -> None:
        dep = self._deployments[(namespace, deployment)]
        template = dep["spec"]["template"]
        pod_hash = _short_hash(template)
        suffix = "".join(secrets.choice(_POD_SUFFIX_ALPHABET) for _ in range(5))
        name = f"{deployment}-{pod_hash}-{suffix}"
        metadata = self._new_metadata(namespace, name, t)
        metadata["labels"] = {
            **template["metadata"].get("labels", {}),
            "pod-template-hash": pod_hash,
        }
        if template["metadata"].get("annotations"):
            metadata["annotations"] = dict(template["metadata"]["annotations"])
        metadata["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": f"{deployment}-{pod_hash}",
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{deployment}-{pod_hash}")),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        stamp = rfc3339(t)
        readiness = {"type": "Ready", "status": "True", "lastTransitionTime": stamp}
        if not ready:
            readiness.update(
                status="False",
                reason="ContainersNotReady",
                message="containers with unready status: [app]",
            )
        self._pods[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": copy.deepcopy(template["spec"]),
            "status": {
                "phase": "Running",
                "startTime": stamp,
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
                    {**readiness, "type": "ContainersReady"},
                    readiness,
                ],
            },
        }
        if self.on_pod_created is not None:
            self.on_pod_created(namespace, deployment, name)
        self._dep_state[(namespace, deployment)].pods.append(name)

    def _terminate_pod(self, namespace: str, name: str, t: float) -> None:
        pod = self._pods[(namespace, name)]
        pod["metadata"]["deletionTimestamp"] = rfc3339(t + self.termination_grace)
        pod["metadata"]["deletionGracePeriodSeconds"] = int(self.termination_grace)
        self._pod_gone_at[(namespace, name)] = t + self.termination_grace
        self._touch(pod)

    def _live_pods(
        self, namespace: str, deployment: str, *, current_only: bool = False
    ) -> list[str]:
        pod_hash = _short_hash(self._deployments[(namespace, deployment)]["spec"]["template"])
        live = []
        for name in self._dep_state[(namespace, deployment)].pods:
            pod = self._pods[(namespace, name)]
            if "deletionTimestamp" in pod["metadata"]:
                continue
            if current_only and pod["metadata"]["labels"].get("pod-template-hash") != pod_hash:
                continue
            live.append(name)
        return live

    def _update_deployment_status(self, namespace: str, name: str, t: float) -> None:
        dep = self._deployments[(namespace, name)]
        state = self._dep_state[(namespace, name)]
        wanted = dep["spec"].get("replicas", 1)
        live = self._live_pods(namespace, name)
        updated = self._live_pods(namespace, name, current_only=True)
        ready = [n for n in live if _pod_ready(self._pods[(namespace, n)])]
        replica_set = f'ReplicaSet "{name}-{_short_hash(dep["spec"]["template"])}"'
        if state.failed:
            progressing = (
                "False",
                "ProgressDeadlineExceeded",
                f"{replica_set} has timed out progressing.",
            )
        elif state.rollout_started is not None:
            progressing = ("True", "ReplicaSetUpdated", f"{replica_set} is progressing.")
        else:
            progressing = (
                "True",
                "NewReplicaSetAvailable",
                f"{replica_set} has successfully progressed.",
            )
        available = (
            ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
            if ready or wanted == 0
            else (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        )
        old_conditions = {c["type"]: c for c in dep["status"].get("conditions", [])}
        conditions = []
        for kind, (status, reason, message) in (
            ("Available", available),
            ("Progressing", progressing),
        ):
            old = old_conditions.get(kind)
            if old and (old["status"], old["reason"], old["message"]) == (status, reason, message):
                conditions.append(old)
            else:
                stamp = rfc3339(t)
                conditions.append(
                    {
                        "type": kind,
                        "status": status,
                        "reason": reason,
                        "message": message,
                        "lastUpdateTime": stamp,
                        "lastTransitionTime": stamp,
                    }
                )
        counts = {
            "replicas": len(live),
            "updatedReplicas": len(updated),
            "readyReplicas": len(ready),
            "availableReplicas": len(ready),
            "unavailableReplicas": max(0, wanted - len(ready)),
        }
        new_status: dict[str, Any] = {"observedGeneration": dep["metadata"]["generation"]}
        # Like the real API, counts that are zero are left out (omitempty).
        new_status.update({k: v for k, v in counts.items() if v})
        new_status["conditions"] = conditions
        if new_status != dep["status"]:
            dep["status"] = new_status
            self._touch(dep)

    # -- shared machinery ------------------------------------------------------------------

    def _advance(self) -> None:
        """Let the controllers catch up with the clock: due syncs, rollouts, pod deletions."""
        now = self.clock()
        due = sorted(
            (state.sync_due, key)
            for key, state in self._es_state.items()
            if state.sync_due is not None and state.sync_due <= now
        )
        for when, key in due:
            self._es_state[key].sync_due = None
            self._sync(*key, when)
        for key, state in self._dep_state.items():
            if state.rollout_started is None or state.failed:
                continue
            when = state.rollout_started + state.rollout_delay
            if when <= now:
                self._finish_rollout(*key, when)
        for key, gone_at in list(self._pod_gone_at.items()):
            if gone_at <= now:
                del self._pod_gone_at[key]
                del self._pods[key]
                for state in self._dep_state.values():
                    if key[1] in state.pods:
                        state.pods.remove(key[1])
                self._revision += 1

    def _apply_patch(
        self, obj: dict[str, Any], media_type: str | None, raw: bytes, accepted: tuple[str, ...]
    ) -> tuple[bool, bool]:
        """Apply a patch to labels, annotations and spec (status is a subresource and the rest
        of metadata is the server's). Returns (spec changed, anything changed)."""
        if media_type not in accepted:
            raise _ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                + ", ".join(accepted),
            )
        if media_type == APPLY_PATCH:
            raise _ApiError(415, "UnsupportedMediaType", "FakeKube does not do server-side apply")
        try:
            patch = json.loads(raw)
        except ValueError:
            raise _ApiError(400, "BadRequest", "the patch body is not valid JSON") from None
        if media_type == JSON_PATCH:
            patched = json_patch(obj, patch)
        elif isinstance(patch, dict):
            patched = merge_patch(obj, patch)
        else:
            raise _ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        if not isinstance(patched.get("spec"), dict):
            raise _ApiError(422, "Invalid", "spec: Required value")
        metadata = patched.get("metadata") or {}
        changed = False
        for field_name in ("labels", "annotations"):
            value = metadata.get(field_name) or None
            if value != obj["metadata"].get(field_name):
                changed = True
                if value is None:
                    obj["metadata"].pop(field_name, None)
                else:
                    obj["metadata"][field_name] = value
        spec_changed = patched.get("spec") != obj["spec"]
        if spec_changed:
            obj["spec"] = patched["spec"]
            obj["metadata"]["generation"] += 1
        if changed or spec_changed:
            self._touch(obj)
        return spec_changed, changed or spec_changed

    def _new_metadata(
        self, namespace: str, name: str, t: float, *, generation: int | None = None
    ) -> dict[str, Any]:
        self._revision += 1
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "resourceVersion": str(self._revision),
            "creationTimestamp": rfc3339(t),
        }
        if generation is not None:
            metadata["generation"] = generation
        return metadata

    def _touch(self, obj: dict[str, Any]) -> None:
        """Every write gets a new resourceVersion (one counter, like etcd's revision)."""
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)


def _eso_resource_version(metadata: dict[str, Any]) -> str:
    """ESO's syncedResourceVersion: generation plus a hash of labels and annotations."""
    meta = {
        "annotations": metadata.get("annotations") or {},
        "labels": metadata.get("labels") or {},
    }
    return f"{metadata['generation']}-{_short_hash(meta, 32)}"


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def _without_type(obj: dict[str, Any]) -> dict[str, Any]:
    """List items carry no apiVersion/kind, as on the real server."""
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}


def _list(api_version: str, kind: str, items: list[Any], revision: int) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": str(revision)},
        "items": items,
    }


def _method_not_allowed() -> _ApiError:
    return _ApiError(
        405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
    )


def _parse_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """Equality-based label selectors: `k=v`, `k==v`, `k!=v`, comma-separated."""
    wanted: list[tuple[str, str, bool]] = []  # (key, value, must equal)
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term)
        if m is None:
            raise _ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
        wanted.append((m.group(1), m.group(3), m.group(2) != "!="))

    def matches(labels: dict[str, str]) -> bool:
        return all((labels.get(k) == v) == equal for k, v, equal in wanted)

    return matches


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as urllib3 pools connections
    # Headers and body go out in two writes; without this, Nagle plus delayed ACKs add
    # 40 ms to every request on a kept-alive connection.
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fake: FakeKube = self.server.fake  # type: ignore[attr-defined]
        code, data = fake.handle(
            self.command,
            self.path,
            self.headers.get("Content-Type"),
            self.headers.get("Authorization"),
            raw,
        )
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass
