"""AWS sessions per environment, through boto3's standard configuration.

`AWS_ENDPOINT_URL`, `AWS_PROFILE` and the region variables all work as boto3 documents;
an environment's `aws_role_arn` is assumed with credentials that refresh themselves.
Every call is bounded (connect and read timeouts, standard retries with few attempts), and
every call that may change something first checks the worker's lease (`rotation.fence`).
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import DeferredRefreshableCredentials, create_assume_role_refresher

from rotation import fence, timeouts
from rotation.catalogue import Environment


def bounded_config() -> Config:
    """Timeouts and retries from `rotation.timeouts`: no call waits longer than aws_call()."""
    bounds = timeouts.BOUNDS
    return Config(connect_timeout=bounds.aws_connect, read_timeout=bounds.aws_read,
                  retries={"mode": "standard", "total_max_attempts": bounds.aws_attempts})


def fenced_client(session: Any, service: str) -> Any:
    """A bounded client whose writes wait for the lease check (botocore's before-call)."""
    client = session.client(service, config=bounded_config())
    client.meta.events.register("before-call", fence.guard_aws)
    return client


def session_for(env_name: str, env: Environment) -> boto3.Session:
    """A session in the environment's region, as its role when one is configured."""
    base = boto3.Session(region_name=env.aws_region)
    if not env.aws_role_arn:
        return base
    refresh = create_assume_role_refresher(
        base.client("sts", config=bounded_config()), {"RoleArn": env.aws_role_arn, "RoleSessionName": f"rotor-{env_name}"})
    core = botocore.session.get_session()
    # botocore has no public setter; this is how assumed-role sessions are built in boto3.
    core._credentials = DeferredRefreshableCredentials(  # type: ignore[attr-defined]
        refresh_using=refresh, method="assume-role")
    return boto3.Session(botocore_session=core, region_name=env.aws_region)


class AwsClients:
    """boto3 clients per environment and service, made once and reused (thread-safe)."""

    def __init__(self, environments: dict[str, Environment]) -> None:
        self._environments = environments
        self._sessions: dict[str, boto3.Session] = {}
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def client(self, env: str, service: str) -> Any:
        with self._lock:
            key = (env, service)
            if key not in self._clients:
                if env not in self._sessions:
                    self._sessions[env] = session_for(env, self._environments[env])
                session: Any = self._sessions[env]  # the service name is data, not a literal
                self._clients[key] = fenced_client(session, service)
            return self._clients[key]
