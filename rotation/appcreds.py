"""Steps every application-credential rotation shares, whatever the database engine.

From `rds-application-credentials.md`: "Rotate credentials in AWS SecretsManager", "Force
sync of Kubernetes secrets" and "Check application variables". The engine-specific kinds
(`mysql`, `postgres`) put their own database steps around these.

The new password exists first as an AWSPENDING version, is read back from there whenever a
step needs it, and becomes AWSCURRENT only after a login with it succeeded.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from typing import Any

from rotation import consumers, redact
from rotation import secrets as sm_secrets
from rotation.catalogue import AppTarget
from rotation.engine import Context, Done, Outcome, Step, Wait
from rotation.errors import SecretError, StepFailed

PASSWORD_ALPHABET = string.ascii_letters + string.digits


def new_password(length: int = 32) -> str:
    """32 letters and digits: nothing a URL or a shell would need escaped."""
    password = "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(length))
    redact.register(password)
    return password


def target(ctx: Context, env: str | None = None) -> AppTarget:
    return ctx.catalogue.target(ctx.target, env or ctx.env)


def secretsmanager(ctx: Context, env: str | None = None) -> Any:
    return ctx.clients.aws(env or ctx.env, "secretsmanager")


def app_secret(ctx: Context, stage: str = "AWSCURRENT", env: str | None = None) -> dict[str, Any]:
    t = target(ctx, env)
    value = sm_secrets.read_json(secretsmanager(ctx, env), t.secret, stage=stage,
                                 required=sm_secrets.APP_KEYS)
    if value is None:
        raise SecretError(f"secret {t.secret} has no {stage} version")
    return value


def admin_password(ctx: Context, env: str | None = None) -> str:
    t = target(ctx, env)
    admin = sm_secrets.read_json(secretsmanager(ctx, env), t.admin_secret) or {}
    password = admin.get(t.admin_key)
    if not isinstance(password, str) or not password:
        raise SecretError(f"secret {t.admin_secret} has no key {t.admin_key!r}")
    return password


def stage_pending(ctx: Context, new_username: str) -> dict[str, Any]:
    """Make sure AWSPENDING holds `new_username` and a fresh password; return that version.

    Checks first: after a crash, the pending version written before is found and reused,
    so the password the database user was created with never changes under it.
    """
    t = target(ctx)
    sm = secretsmanager(ctx)
    pending = sm_secrets.read_json(sm, t.secret, stage="AWSPENDING")
    if pending is not None and pending.get("username") == new_username:
        ctx.data["pending_version"] = pending["_version"]
        return pending
    current = app_secret(ctx)
    value = {**current, "username": new_username, "password": new_password()}
    ctx.data["pending_version"] = sm_secrets.put_pending(sm, t.secret, value)
    ctx.save()
    ctx.log.info("staged AWSPENDING version %s for %s", ctx.data["pending_version"], new_username)
    return app_secret(ctx, stage="AWSPENDING")


def pending_secret(ctx: Context) -> dict[str, Any]:
    """The AWSPENDING version this rotation staged (it must still be there)."""
    pending = app_secret(ctx, stage="AWSPENDING")
    if pending.get("username") != ctx.data.get("new_username"):
        raise StepFailed(f"AWSPENDING of {target(ctx).secret} no longer holds "
                         f"{ctx.data.get('new_username')}; someone changed the secret")
    return pending


# -- steps ---------------------------------------------------------------------------------


def promote(ctx: Context) -> Outcome:
    """Runbook: "Rotate credentials in AWS SecretsManager" (AWSPENDING -> AWSCURRENT)."""
    t = target(ctx)
    sm = secretsmanager(ctx)
    version = ctx.data["pending_version"]
    stages = sm_secrets.versions(sm, t.secret).get(version, [])
    if "AWSCURRENT" not in stages and "AWSPENDING" not in stages:
        raise StepFailed(f"version {version} of {t.secret} is neither pending nor current; "
                         "someone changed the secret")
    sm_secrets.promote(sm, t.secret, version)
    ctx.data["promoted"] = True
    return Done(f"AWSCURRENT of {t.secret} now holds {ctx.data['new_username']}; "
                f"AWSPREVIOUS keeps {ctx.data['old_username']}")


def sync_external_secret(ctx: Context, env: str | None = None) -> Outcome:
    """Runbook: "Force sync of Kubernetes secrets", then check DATABASE_URL's user."""
    env = env or ctx.env
    t = target(ctx, env)
    kube = ctx.clients.kube(env)
    state = ctx.data.setdefault("sync", {}).setdefault(env, {})
    if "epoch" not in state:  # a first sync, or a retry: note the pods it must replace
        state["pods_before"] = consumers.pod_uids(kube, t.namespace, t.deployment)
    status = consumers.force_sync(ctx, kube, t.namespace, t.external_secret, state)
    if status is None:
        return Wait(f"ExternalSecret {t.namespace}/{t.external_secret} to sync",
                    timeout=ctx.catalogue.waits.sync)
    user = kube.url_username(t.namespace, status.target_secret, t.secret_key)
    expected = ctx.data["new_username"]
    if user != expected:
        raise StepFailed(f"Secret {t.namespace}/{status.target_secret} {t.secret_key} uses "
                         f"{user}, expected {expected}")
    return Done(f"ExternalSecret {t.namespace}/{t.external_secret} synced; "
                f"{t.secret_key} now uses {user}")


def rollout(ctx: Context, env: str | None = None) -> Outcome:
    """Runbook: "Check application variables": every ready pod started after the sync."""
    env = env or ctx.env
    t = target(ctx, env)
    sync = ctx.data["sync"][env]
    return consumers.roll_out(
        ctx, ctx.clients.kube(env), t.namespace, t.deployment, since=sync["synced_at"],
        pods_before=sync["pods_before"],
        state=ctx.data.setdefault("rollout", {}).setdefault(env, {}),
        restart_after=ctx.catalogue.waits.rollout_start)


def shared_steps(env: str | None = None, suffix: str = "") -> list[Step]:
    """Promote, sync and roll out: the same for every engine."""
    where = f" ({env})" if env else ""

    def bind(fn: Callable[..., Outcome]) -> Callable[[Context], Outcome]:
        return (lambda ctx: fn(ctx, env)) if env else fn

    steps = [
        Step("sync" + suffix, f"Force-sync the ExternalSecret and check the Secret's user{where}",
             bind(sync_external_secret)),
        Step("rollout" + suffix, f"Wait for the Deployment to roll out with the new secret{where}",
             bind(rollout)),
    ]
    if env is None:
        steps.insert(0, Step("promote", "Promote the secret: AWSPENDING becomes AWSCURRENT",
                             promote))
    return steps


def cancel(ctx: Context) -> str:
    """Leave the app on credentials that work: AWSCURRENT is never touched by a cancel."""
    t = target(ctx)
    new, old = ctx.data.get("new_username"), ctx.data.get("old_username")
    if ctx.data.get("promoted"):
        return (f"AWSCURRENT already holds {new}, which logs in; the old user {old} is left "
                "in place for a later rotation to retire")
    version = ctx.data.get("pending_version")
    parts = [f"AWSCURRENT of {t.secret} still holds {old or 'the current user'}"]
    if version and sm_secrets.unstage(secretsmanager(ctx), t.secret, "AWSPENDING", version):
        parts.append(f"AWSPENDING removed from version {version}")
    if new:
        parts.append(f"the unused new user {new} is left in place (never in AWSCURRENT); "
                     "drop it by hand; a later rotation picks a new name")
    return "; ".join(parts)
