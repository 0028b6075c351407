"""A scripted rotation kind for the Slack tests, loaded by `rotor serve` via ROTOR_EXTRA_KINDS.

It stands in for `mysql` (so `/rotate APP ENV` runs it) and needs no database. Files in the
directory ROTOR_TEST_CONTROL steer it: `block-sync` makes `sync` wait, `fail` makes `login`
fail, `fail-drop-APP` makes APP's `drop-old-user` fail after its approval and 2nd line
notice, and `password` holds a secret it registers and then tries to leak everywhere (results,
approval summaries, errors, log lines), so tests can prove it never reaches Slack.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rotation import redact
from rotation.catalogue import Catalogue
from rotation.engine import Context, Done, Outcome, Step, Wait
from rotation.errors import StepFailed


def _control(name: str) -> Path:
    return Path(os.environ.get("ROTOR_TEST_CONTROL", ".")) / name


def _password() -> str:
    path = _control("password")
    password = path.read_text().strip() if path.exists() else "not-a-secret"
    redact.register(password)
    return password


def preflight(ctx: Context) -> Outcome:
    """Runbook: "Identifying existing users"."""
    return Done(f"user {ctx.target}_1 on 1 host, 3 grants")


def create_user(ctx: Context) -> Outcome:
    """Runbook: "Create the new user"."""
    password = _password()
    ctx.log.info("created %s_2 with password %s", ctx.target, password)
    return Done(f"created {ctx.target}_2 (password {password})")


def switch(ctx: Context) -> Outcome:
    """Runbook: "Rotate credentials in AWS SecretsManager"."""
    ctx.approve(f"Point {ctx.target} at {ctx.target}_2 (password {_password()})", gate="switch")
    return Done("AWSCURRENT now holds the new user")


def sync(ctx: Context) -> Outcome:
    """Runbook: "Force sync of Kubernetes secrets"."""
    if _control("block-sync").exists():
        return Wait("the ExternalSecret to sync", timeout=120)
    return Done("synced")


def login(ctx: Context) -> Outcome:
    """Runbook: "Check application variables"."""
    # `hang-login`: the step stays in the middle (its worker holding the lease) while the file
    # exists, having said in `in-login` which process runs it: a replica to kill mid-step.
    if _control("hang-login").exists():
        _control("in-login").write_text(str(os.getpid()))
        while _control("hang-login").exists():
            time.sleep(0.05)  # a test kind; product code persists its waits
    if _control("fail").exists():
        raise StepFailed(f"login as {ctx.target}_2 failed with password {_password()}")
    return Done("logged in")


def drop(ctx: Context) -> Outcome:
    """Runbook: "Deleting the old user"."""
    ctx.approve(f"DROP USER {ctx.target}_1", gate="drop")
    if _control(f"fail-drop-{ctx.target}").exists():  # after its approval and 2nd line notice
        raise StepFailed(f"DROP USER {ctx.target}_1 failed")
    return Done(f"dropped {ctx.target}_1")


class ScriptedKind:
    name = "mysql"

    def validate(self, catalogue: Catalogue, target: str, env: str,
                 params: Mapping[str, Any]) -> None:
        catalogue.app(target)

    def steps(self, catalogue: Catalogue, target: str, env: str,
              params: Mapping[str, Any]) -> list[Step]:
        return [Step("preflight", "Preflight: the app's user and grants", preflight),
                Step("create-user", "Create the new user", create_user),
                Step("switch", "Point the app at the new user", switch),
                Step("sync", "Sync the Kubernetes secret", sync),
                Step("login", "Log in as the new user", login),
                Step("drop-old-user", "Drop the old user", drop, destructive=True)]

    def cancel(self, ctx: Context) -> str:
        return "AWSCURRENT still holds the old user; nothing to undo"


KINDS = {"mysql": ScriptedKind()}
STEPS = [s.name for s in ScriptedKind().steps(None, "x", "x", {})]  # type: ignore[arg-type]
