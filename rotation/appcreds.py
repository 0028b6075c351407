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

from rotation import consumers, readcache, redact
from rotation import secrets as sm_secrets
from rotation.catalogue import AppTarget
from rotation.engine import Context, Done, Outcome, Step, Wait
from rotation.errors import SecretError, StepFailed
from rotation.facts import Facts

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


def db_host(catalogue: Any, clients: Any, app: str, env: str) -> str:
    """The app's database instance, "host:port", from its secret (plain fields only): the
    resource the engine's per-host limit counts."""
    t = catalogue.target(app, env)
    value = sm_secrets.read_json(clients.aws(env, "secretsmanager"), t.secret,
                                 required=sm_secrets.APP_KEYS)
    if value is None:
        raise SecretError(f"secret {t.secret} has no AWSCURRENT version")
    return f"{value['host']}:{value['port']}"


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


# -- what the world says, for destructive steps and cancel ----------------------------------


@readcache.from_the_world
def secret_users(ctx: Context, env: str | None = None) -> dict[str, str | None]:
    """Who the app's secret names, read now: "AWSCURRENT in staging" -> username, for this
    environment and every environment restored from it (whose database gets its users)."""
    env = env or ctx.env
    found: dict[str, str | None] = {}
    for where in (env, *ctx.catalogue.restored_into(env)):
        t = target(ctx, where)
        for stage in ("AWSCURRENT", "AWSPENDING"):
            value = sm_secrets.read_json(secretsmanager(ctx, where), t.secret, stage=stage)
            found[f"{stage} in {where}"] = None if value is None else value.get("username")
    return found


@readcache.from_the_world
def retire_facts(ctx: Context, old: str, accounts: list[str], sessions: int,
                 env: str | None = None) -> Facts:
    """The preconditions of dropping or retiring the app's old database user, read now: it is
    not the user in AWSCURRENT or AWSPENDING of the app's secret in this environment, nor in
    any environment restored from it, and it has no sessions."""
    users = secret_users(ctx, env)
    seen = {"accounts": accounts, "secret": users, "sessions": sessions}
    using = [where for where, user in users.items() if user == old]
    if using:
        return Facts(seen, f"refusing to drop {old}: it is the user in {', '.join(using)} of "
                           f"{target(ctx, env).secret}; dropping it would lock the app out")
    if sessions:
        return Facts(seen, f"refusing to drop {old}: it has {sessions} sessions; it is still "
                           "in use somewhere")
    return Facts(seen)


def forget_previous(ctx: Context, old: str, env: str | None = None) -> str:
    """Take AWSPREVIOUS off the version that names `old`, the user about to be dropped.

    After the drop that version's password logs in nowhere, and AWSPREVIOUS is what a person
    rolls back to by hand (the console's "previous version", `update-secret-version-stage`):
    left on it, a hand rollback would lock the app out. Without the label there is nothing
    to roll back to, which is the truth once the old user is gone. Done before the drop, so
    no moment has AWSPREVIOUS naming a dropped user; a label, not a credential, so not
    destructive. Idempotent: "" when there is nothing to take off."""
    t = target(ctx, env)
    sm = secretsmanager(ctx, env)
    previous = sm_secrets.version_with(sm, t.secret, "AWSPREVIOUS")
    if previous is None:
        return ""
    value = sm_secrets.read_json(sm, t.secret, version=previous) or {}
    if value.get("username") != old or not sm_secrets.unstage(sm, t.secret, "AWSPREVIOUS",
                                                              previous):
        return ""
    return f"; AWSPREVIOUS of {t.secret} no longer names {old}"


def holders(facts: Facts) -> str:
    """"AWSCURRENT in staging holds app_user_20260101, ..." from `retire_facts`."""
    return ", ".join(f"{where} holds {user}" for where, user in facts.seen["secret"].items()
                     if user)


# -- cleaning up after a cancel ---------------------------------------------------------------
#
# A cancel never drops anything: it leaves the new user it made when nothing names it. A
# cleanup (`rotor cleanup APP ENV`, `/rotate APP ENV --cleanup`) is a rotation of its own whose
# one destructive step drops such users, after an approval bound to exactly those users and,
# in production, the 2nd line notice and a second person.


def named_users(ctx: Context, env: str | None = None) -> dict[str, list[str]]:
    """username -> where a labelled version of the app's secret names it ("AWSPREVIOUS in
    staging"), read now, for this environment and every environment restored from it."""
    env = env or ctx.env
    found: dict[str, list[str]] = {}
    for where in (env, *ctx.catalogue.restored_into(env)):
        t = target(ctx, where)
        sm = secretsmanager(ctx, where)
        for version, stages in sm_secrets.versions(sm, t.secret).items():
            if not stages:
                continue
            user = (sm_secrets.read_json(sm, t.secret, version=version) or {}).get("username")
            if user:
                found.setdefault(str(user), []).extend(f"{s} in {where}" for s in stages)
    return found


@readcache.from_the_world
def leftover_facts(ctx: Context, made: dict[str, int], mounted: dict[str, str],
                   env: str | None = None) -> Facts:
    """Which of the users Rotor made for the app (`made`: name -> sessions) nothing uses, read
    now: no labelled version of the secret names it here or in a restored environment, no
    Kubernetes Secret of the app's consumers holds it (`mounted`: where -> user) and it has
    no sessions. Those are `seen["drop"]`; the others are kept, each with why."""
    named = named_users(ctx, env)
    drop, kept = [], {}
    for user, sessions in sorted(made.items()):
        held = named.get(user, []) + [where for where, u in mounted.items() if u == user]
        if held:
            kept[user] = ", ".join(held)
        elif sessions:
            kept[user] = f"{sessions} sessions"
        else:
            drop.append(user)
    return Facts({"drop": drop, "kept": kept})


def describe_leftovers(facts: Facts) -> str:
    kept = "; ".join(f"{user} kept ({why})" for user, why in facts.seen["kept"].items())
    if not facts.seen["drop"]:
        return f"nothing to drop{'; ' + kept if kept else ''}"
    return f"drop {', '.join(facts.seen['drop'])}: no version of the secret names it, no " \
        f"Secret holds it, no sessions{'; ' + kept if kept else ''}"


def mounted_users(ctx: Context, env: str | None = None) -> dict[str, str]:
    """The user in the DATABASE_URL of the app's Kubernetes Secret, read now: pods restarted
    before the next sync would log in with it."""
    t = target(ctx, env)
    kube = ctx.clients.kube(env or ctx.env)
    status = kube.external_secret(t.namespace, t.external_secret)
    user = kube.url_username(t.namespace, status.target_secret, t.secret_key)
    return {f"Secret {t.namespace}/{status.target_secret}": user}


def find_leftovers(ctx: Context, made: dict[str, int]) -> Outcome:
    """Name what a cleanup would drop (read-only; the plan shows it)."""
    facts = leftover_facts(ctx, made, mounted_users(ctx))
    if not made:
        return Done("Rotor made no user for this app that is still there; nothing to clean up")
    return Done(describe_leftovers(facts))


def drop_leftovers(ctx: Context, made: Callable[[], dict[str, int]],
                   drop: Callable[[list[str]], None]) -> Outcome:
    """Drop the users Rotor made that nothing uses, on an approval bound to exactly them."""
    facts = leftover_facts(ctx, made(), mounted_users(ctx))
    if not facts.seen["drop"]:
        return Done(describe_leftovers(facts))
    facts = ctx.act("drop-leftovers", lambda: leftover_facts(ctx, made(), mounted_users(ctx)),
                    describe_leftovers, destructive=True)
    if not facts.seen["drop"]:
        return Done("nothing to drop")
    drop(facts.seen["drop"])
    return Done(f"dropped {', '.join(facts.seen['drop'])}")


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
    """Leave the app on credentials that work: AWSCURRENT is never touched by a cancel.

    Decided from the secret's real stages, not from notes: a promotion cut short (the second
    stage call throttled, a crash before the state write) may have moved AWSCURRENT already."""
    t = target(ctx)
    sm = secretsmanager(ctx)
    new, old = ctx.data.get("new_username"), ctx.data.get("old_username")
    users = secret_users(ctx)
    current = users.get(f"AWSCURRENT in {ctx.env}")
    in_use = [where for where, user in users.items()
              if user == new and new and where.startswith("AWSCURRENT")]
    if in_use:
        version = ctx.data.get("pending_version")
        finished = ""
        if version and "AWSCURRENT" in sm_secrets.versions(sm, t.secret).get(version, []) \
                and sm_secrets.unstage(sm, t.secret, "AWSPENDING", version):
            finished = f" (AWSPENDING removed from version {version}, which is AWSCURRENT)"
        return (f"{', '.join(in_use)} of {t.secret} already holds {new}, which the app uses; "
                f"keep it{finished}. The old user {old} is left in place for a later rotation "
                "to retire")
    version = ctx.data.get("pending_version")
    parts = [f"AWSCURRENT of {t.secret} holds {current or 'no user'}"]
    if version and sm_secrets.unstage(sm, t.secret, "AWSPENDING", version):
        parts.append(f"AWSPENDING removed from version {version}")
    if new:
        users = secret_users(ctx)
        still = [where for where, user in users.items() if user == new]
        if still:
            parts.append(f"the new user {new} is left in place: {', '.join(still)} still "
                         "names it, so do not drop it")
        else:
            parts.append(f"the unused new user {new} is left in place (no stage of the "
                         f"secret names it); `rotor cleanup {ctx.target} {ctx.env}` or `/rotate "
                         f"{ctx.target} {ctx.env} --cleanup` drops it after an approval")
    return "; ".join(parts)
