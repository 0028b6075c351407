"""The clients a step reaches the world through: AWS per environment, Kubernetes per context."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from rotation.catalogue import Catalogue
from rotation.explain import check_kube_context

if TYPE_CHECKING:  # boto3 and kubernetes load when a step first needs them
    from rotation.kube import Kube


class Clients:
    """Made once per process; every client is built on first use and then reused."""

    def __init__(self, catalogue: Catalogue, *, kubeconfig: str | None = None) -> None:
        self._catalogue = catalogue
        self._aws: Any = None
        self._kubeconfig = kubeconfig
        self._kubes: dict[str, Kube] = {}
        self._lock = threading.Lock()

    def aws(self, env: str, service: str) -> Any:
        if self._aws is None:
            from rotation.aws import AwsClients

            with self._lock:
                self._aws = self._aws or AwsClients(self._catalogue.environments)
        return self._aws.client(env, service)

    def kube(self, env: str) -> Kube:
        with self._lock:
            if env not in self._kubes:
                environment = self._catalogue.environment(env)
                config_file = environment.kubeconfig or self._kubeconfig
                check_kube_context(env, environment.kube_context, config_file)
                from rotation.kube import Kube

                self._kubes[env] = Kube.from_config(
                    environment.kube_context,
                    config_file=config_file)
            return self._kubes[env]
