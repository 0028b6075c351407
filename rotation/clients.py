"""The clients a step reaches the world through: AWS per environment, Kubernetes per context."""

from __future__ import annotations

import threading
from typing import Any

from rotation.aws import AwsClients
from rotation.catalogue import Catalogue
from rotation.explain import check_kube_context
from rotation.kube import Kube


class Clients:
    """Made once per process; every client is built on first use and then reused."""

    def __init__(self, catalogue: Catalogue, *, kubeconfig: str | None = None) -> None:
        self._catalogue = catalogue
        self._aws = AwsClients(catalogue.environments)
        self._kubeconfig = kubeconfig
        self._kubes: dict[str, Kube] = {}
        self._lock = threading.Lock()

    def aws(self, env: str, service: str) -> Any:
        return self._aws.client(env, service)

    def kube(self, env: str) -> Kube:
        with self._lock:
            if env not in self._kubes:
                environment = self._catalogue.environment(env)
                config_file = environment.kubeconfig or self._kubeconfig
                check_kube_context(env, environment.kube_context, config_file)
                self._kubes[env] = Kube.from_config(
                    environment.kube_context,
                    config_file=config_file)
            return self._kubes[env]
