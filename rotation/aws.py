"""AWS sessions per environment, through boto3's standard configuration.

`AWS_ENDPOINT_URL`, `AWS_PROFILE` and the region variables all work as boto3 documents;
an environment's `aws_role_arn` is assumed with credentials that refresh themselves.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
import botocore.session
from botocore.credentials import DeferredRefreshableCredentials, create_assume_role_refresher

from rotation.catalogue import Environment


def session_for(env_name: str, env: Environment) -> boto3.Session:
    """A session in the environment's region, as its role when one is configured."""
    base = boto3.Session(region_name=env.aws_region)
    if not env.aws_role_arn:
        return base
    refresh = create_assume_role_refresher(
        base.client("sts"), {"RoleArn": env.aws_role_arn, "RoleSessionName": f"rotor-{env_name}"})
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
                self._clients[key] = session.client(service)
            return self._clients[key]
