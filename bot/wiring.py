"""Puts Rotor together: store, engine, kinds, clients, logging. Nothing runs at import."""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from bot.settings import Settings
from rotation.clients import Clients
from rotation.engine import Engine, Kind, SecondLine
from rotation.redact import RedactingFilter
from rotation.store import Store


def kinds(extra: str | None = None) -> dict[str, Kind]:
    """The rotation kinds this process runs, plus any named by ROTOR_EXTRA_KINDS."""
    from rotation import iam, managed_secret, mysql, postgres, rds_admin  # only when needed

    found: dict[str, Kind] = {mysql.KIND.name: mysql.KIND, postgres.KIND.name: postgres.KIND}
    found[iam.KIND.name] = iam.KIND
    found[managed_secret.KIND.name] = managed_secret.KIND
    found[rds_admin.KIND.name] = rds_admin.KIND
    if extra:
        module_name, _, attribute = extra.partition(":")
        found.update(getattr(importlib.import_module(module_name), attribute or "KINDS"))
    return found


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def log_formatter(fmt: str = "text") -> logging.Formatter:
    """Plain lines, or (`json`) one JSON object a line; a step's lines carry `rotation_id`
    and `step` as fields."""
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(LOG_FORMAT, rename_fields={"asctime": "time", "levelname": "level",
                                                        "name": "logger"})
    return logging.Formatter(LOG_FORMAT)


def setup_logging(level: str = "INFO", stream: Any = None, fmt: str = "text") -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(log_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries log request bodies at DEBUG; keep them out of Rotor's log.
    for noisy in ("botocore", "boto3", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Bolt logs whole request bodies, response_url included, at INFO and WARNING (rejected
    # signatures, unhandled requests); Rotor logs its own one line for each instead.
    logging.getLogger("slack_bolt").setLevel(max(logging.ERROR, root.level))
    # waitress warns of every request that waits for a thread: a burst of commands is normal.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # APScheduler logs every run of every job at INFO: only its warnings, unless debugging.
    logging.getLogger("apscheduler").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)


def build_engine(settings: Settings, *, clients: Any = None,
                 second_line: SecondLine | None = None,
                 clock: Callable[[], float] = time.time) -> Engine:
    store = Store(settings.state_path, clock=clock)
    engine = Engine(store, settings.catalogue, kinds(settings.extra_kinds),
                    clients or Clients(settings.catalogue, kubeconfig=settings.kubeconfig),
                    second_line=second_line, clock=clock)
    engine.per_host = settings.per_host
    engine.per_account = settings.per_account
    return engine
