"""One frozen settings object, built once from the environment and `rotor.yml`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rotation.errors import ConfigError

if TYPE_CHECKING:
    from rotation.catalogue import Catalogue


def state_path(environ: Mapping[str, str] | None = None) -> str:
    """Where the state DB is (`ROTOR_STATE`, default ./rotor.db)."""
    return (os.environ if environ is None else environ).get("ROTOR_STATE") or "rotor.db"


@dataclass(frozen=True)
class Settings:
    config_path: str
    state_path: str
    catalogue: Catalogue
    kubeconfig: str | None = None
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_app_token: str | None = field(default=None, repr=False)
    slack_signing_secret: str | None = field(default=None, repr=False)
    slack_api_url: str | None = None
    port: int = 3000
    host: str = "0.0.0.0"  # ROTOR_BIND: the address `rotor serve` listens on
    http_timeout: float = 10.0  # ROTOR_HTTP_TIMEOUT: idle or half-sent connections close
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one JSON object a line
    # "module:attribute" naming a dict of extra rotation kinds (tests and plug-ins).
    extra_kinds: str | None = None
    workers: int = 4  # ROTOR_WORKERS: engine threads in `rotor serve`, each with its own engine
    per_host: int = 2  # ROTOR_PER_HOST: rotations at once per database host
    per_account: int = 10  # ROTOR_PER_ACCOUNT: rotations at once per AWS account

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None,
             config_path: str | None = None) -> Settings:
        from rotation import catalogue as catalogue_module

        env = os.environ if environ is None else environ
        path = config_path or env.get("ROTOR_CONFIG") or "rotor.yml"
        return cls(
            config_path=path,
            state_path=state_path(env),
            catalogue=catalogue_module.load(path),
            kubeconfig=env.get("KUBECONFIG") or None,
            slack_bot_token=env.get("SLACK_BOT_TOKEN") or None,
            slack_app_token=env.get("SLACK_APP_TOKEN") or None,
            slack_signing_secret=env.get("SLACK_SIGNING_SECRET") or None,
            slack_api_url=env.get("SLACK_API_URL") or None,
            port=int(env.get("PORT") or 3000),
            host=env.get("ROTOR_BIND") or "0.0.0.0",
            http_timeout=float(env.get("ROTOR_HTTP_TIMEOUT") or 10),
            log_level=_log_level(env.get("ROTOR_LOG_LEVEL") or "INFO"),
            log_format=_log_format(env.get("ROTOR_LOG_FORMAT") or "text"),
            extra_kinds=env.get("ROTOR_EXTRA_KINDS") or None,
            workers=_count(env, "ROTOR_WORKERS", 4),
            per_host=_count(env, "ROTOR_PER_HOST", 2),
            per_account=_count(env, "ROTOR_PER_ACCOUNT", 10),
        )


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name) or str(default)
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name}: {value!r} is not a whole number of at least 1")
    return int(value)


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"ROTOR_LOG_LEVEL: {value!r} is not DEBUG, INFO, WARNING or ERROR")
    return level


def _log_format(value: str) -> str:
    if value not in ("text", "json"):
        raise ConfigError(f"ROTOR_LOG_FORMAT: {value!r} is not text or json")
    return value
