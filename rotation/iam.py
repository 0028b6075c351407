"""Kind `iam-key`: `iam-access-key-rotation.md`, one function a step; and the key-age report.

The rotation, target = the IAM user's name, in the environment's own AWS account:

 1. preflight       the user's keys with age, status and last use (read-only; what `plan` shows)
 2. make-room       an inactive second key is deleted, on approval, to free the slot
 3. where-used      the catalogue's places, plus every Secrets Manager secret holding the old ID
 4. create-key      the new key, staged as AWSPENDING in every catalogued secret
 5. promote         AWSPENDING -> AWSCURRENT in every catalogued secret
    sync, rollout,  (rotation.consumers) ExternalSecrets force-synced, Deployments rolled out
    ecs             or restarted, ECS services redeployed and followed to COMPLETED
    manual-*        one guided step per manual place (Fastly, Logit...): a person clicks "Done"
 6. wait-for-switch the new key used and the old one quiet, re-checked every half hour
 7. deactivate      the old key made inactive, on approval (2nd line told first)
 8. grace           `grace_days` with a "Reactivate" button (request `reactivate`)
 9. delete-old-key  the old key deleted, on approval (2nd line told first)

The secret access key exists only in memory in `create-key` and in the catalogued secrets: it is
registered with the redactor the moment AWS returns it, and the state DB holds key IDs only.
The new key's ID is saved before anything else happens, so a retry finds it instead of making
a second one; an IAM user never gets a third key.

The key-age report reads the account's credential report (one CSV for every user, not calls
per user); `assess_keys` turns it and a clock into overdue and due-soon keys.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from rotation import consumers, readcache, redact
from rotation import secrets as sm_secrets
from rotation.catalogue import Catalogue, KeyPlaces, ManualPlace, SecretField
from rotation.engine import Context, Done, Outcome, Skipped, Step, Wait
from rotation.errors import AwsError, ConfigError, StepFailed
from rotation.facts import Facts

ACTIVE, INACTIVE = "Active", "Inactive"
DAY = 86400.0
# AWS shows a key's last use with a delay, so "unused" means unused for this long.
QUIET_SECONDS = 4 * 3600.0
CHECK_EVERY = 30 * 60.0  # how often the switch-over and the grace period are re-checked
SWITCH_TIMEOUT = 7 * DAY  # give up when consumers have not moved to the new key in a week
REACTIVATE = "reactivate"  # the request the "Reactivate" button makes (Engine.request)
_MISSING = ("ReportInProgress", "ReportNotPresent", "ReportExpired")


# -- IAM reads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessKey:
    """One access key of a user: never its secret."""

    id: str
    status: str
    created: float
    last_used: float | None

    @property
    def active(self) -> bool:
        return self.status == ACTIVE


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or "error"


def _epoch(value: Any) -> float | None:
    if not isinstance(value, datetime):
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else "never"


def days(seconds: float) -> str:
    whole = max(0, int(seconds // DAY))
    return f"{whole} day{'s' if whole != 1 else ''}"


def list_keys(iam: Any, user: str, env: str) -> list[AccessKey]:
    """The user's keys, oldest first, each with its last use."""
    try:
        listed = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
        keys = []
        for meta in listed:
            used = iam.get_access_key_last_used(AccessKeyId=meta["AccessKeyId"])
            keys.append(
                AccessKey(
                    meta["AccessKeyId"],
                    meta["Status"],
                    _epoch(meta["CreateDate"]) or 0.0,
                    _epoch(used["AccessKeyLastUsed"].get("LastUsedDate")),
                )
            )
    except ClientError as exc:
        if _code(exc) == "NoSuchEntity":
            raise StepFailed(f"IAM user {user} does not exist in {env}'s account") from None
        raise AwsError(f"could not list the access keys of {user} in {env}: {_code(exc)}") from None
    return sorted(keys, key=lambda k: k.created)


def _find(keys: list[AccessKey], key_id: str | None) -> AccessKey | None:
    return next((k for k in keys if k.id == key_id), None)


def _describe(key: AccessKey, now: float) -> str:
    return (
        f"{key.id} {key.status.lower()}, {days(now - key.created)} old, last used "
        f"{when(key.last_used)}"
    )


def _set_status(iam: Any, user: str, key_id: str, status: str) -> None:
    try:
        iam.update_access_key(UserName=user, AccessKeyId=key_id, Status=status)
    except ClientError as exc:
        raise AwsError(
            f"could not make {key_id} of {user} {status.lower()}: {_code(exc)}"
        ) from None


def _delete_inactive(iam: Any, user: str, env: str, key_id: str) -> bool:
    """Delete `key_id` if it is still there and inactive; never an active key."""
    key = _find(list_keys(iam, user, env), key_id)
    if key is None:
        return False
    if key.active:
        raise StepFailed(f"{key_id} of {user} is active again: Rotor never deletes an active key")
    try:
        iam.delete_access_key(UserName=user, AccessKeyId=key_id)
    except ClientError as exc:
        raise AwsError(f"could not delete {key_id} of {user}: {_code(exc)}") from None
    return True


# -- the secrets that hold a key -----------------------------------------------------------


def read_key_secret(
    sm: Any, field: SecretField, stage: str = "AWSCURRENT"
) -> tuple[dict[str, Any], str] | None:
    """A catalogued key secret at `stage` and its version id; None when no version has it.

    Only the secret access key is registered as a secret: the key ID is not one (the state
    DB and the thread name it)."""
    value = sm_secrets.read_json(sm, field.id, stage=stage, secret_fields=(field.secret_field,))
    if value is None:
        return None
    version = str(value.pop("_version"))
    return value, version


@dataclass(frozen=True)
class Scan:
    """Which secrets in the account hold a key ID (names only, never a value)."""

    scanned: int
    holding: tuple[tuple[str, str], ...]  # (name, ARN)
    unreadable: tuple[str, ...]


def scan_secrets(sm: Any, key_id: str, prefix: str | None = None) -> Scan:
    """Every secret's AWSCURRENT (or every one whose name starts with `prefix`), searched for
    `key_id`. Values are dropped at once."""
    holding, unreadable, scanned = [], [], 0
    filters = [{"Key": "name", "Values": [prefix]}] if prefix else []
    try:
        pages = sm.get_paginator("list_secrets").paginate(Filters=filters)
        for page in pages:
            for entry in page.get("SecretList", []):
                scanned += 1
                try:
                    text = sm.get_secret_value(
                        SecretId=entry["ARN"], VersionStage="AWSCURRENT"
                    ).get("SecretString")
                except ClientError:
                    unreadable.append(entry["Name"])
                    continue
                if text and key_id in text:
                    holding.append((entry["Name"], entry["ARN"]))
    except ClientError as exc:
        raise AwsError(f"could not list the account's secrets: {_code(exc)}") from None
    return Scan(scanned, tuple(holding), tuple(unreadable))


# -- the steps -----------------------------------------------------------------------------


def _iam(ctx: Context) -> Any:
    return ctx.clients.aws(ctx.env, "iam")


def _sm(ctx: Context) -> Any:
    return ctx.clients.aws(ctx.env, "secretsmanager")


def _places(ctx: Context) -> KeyPlaces:
    return ctx.catalogue.iam_user(ctx.target, ctx.env)


def _grace_seconds(ctx: Context) -> float:
    return ctx.catalogue.iam_users[ctx.target].grace_days * DAY


def _keys(ctx: Context) -> list[AccessKey]:
    return list_keys(_iam(ctx), ctx.target, ctx.env)


def _old(ctx: Context, keys: list[AccessKey]) -> AccessKey | None:
    return _find(keys, ctx.data["old_key_id"])


@readcache.from_the_world
def _key_facts(ctx: Context, key_id: str, action: str) -> Facts:
    """The preconditions of deactivating or deleting `key_id`, read now: no catalogued or
    scanned secret's AWSCURRENT holds it, and (once there is a new key) every catalogued
    secret's AWSCURRENT holds the new one. The approval is bound to the key, its status and
    last use, and where the keys are."""
    sm, new = _sm(ctx), ctx.data.get("new_key_id")
    key = _find(_keys(ctx), key_id)
    holding, lacking = [], []
    for field in _places(ctx).secrets:
        current = read_key_secret(sm, field)
        held = current[0].get(field.key_id_field) if current else None
        if held == key_id:
            holding.append(field.id)
        elif new and key_id != new and held != new:
            lacking.append(f"{field.id} (holds {held})")
    prefix = ctx.catalogue.environment(ctx.env).where_used_prefix
    holding += [name for name, _arn in scan_secrets(sm, key_id, prefix).holding
                if name not in holding]
    seen = {
        "key": key_id,
        "status": key.status if key else None,
        "last_used": key.last_used if key else None,
        "new_key": new,
        "holding": sorted(holding),
        "lacking": sorted(lacking),
    }
    if holding:
        return Facts(seen, f"refusing to {action} {key_id}: AWSCURRENT of "
                           f"{', '.join(sorted(holding))} holds it; whatever reads it would break")
    if lacking:
        return Facts(seen, f"refusing to {action} {key_id}: AWSCURRENT of "
                           f"{', '.join(sorted(lacking))} does not hold the new key {new}")
    return Facts(seen)


def _left_by_cancels(ctx: Context) -> set[str]:
    """The new keys of this user's cancelled rotations in this environment."""
    return {str(r.data.get("new_key_id")) for r in ctx.engine.store.recent(50)
            if (r.kind, r.target, r.env, r.status) == (ctx.rotation.kind, ctx.target, ctx.env,
                                                       "cancelled")}


def _held_by_the_secrets(ctx: Context) -> set[str]:
    """The key IDs the catalogued secrets' AWSCURRENT holds, read now."""
    sm, held = _sm(ctx), set()
    for field in _places(ctx).secrets:
        current = read_key_secret(sm, field)
        if current:
            held.add(str(current[0].get(field.key_id_field)))
    return held


def preflight(ctx: Context) -> Outcome:
    """Runbook 1, "Find users access key": every key with its age, status and last use.

    Read-only (it is what a plan shows). Two active keys stop the rotation: the runbook wants
    one removed first, and only a person can tell which.
    """
    keys, now, user = _keys(ctx), ctx.now(), ctx.target
    listing = "; ".join(_describe(k, now) for k in keys)
    old = _find(keys, ctx.data.get("old_key_id"))
    if old is None:
        active = [k for k in keys if k.active]
        if not keys:
            raise StepFailed(f"{user} has no access key in {ctx.env}: nothing to rotate")
        if len(active) > 1:
            held, left = _held_by_the_secrets(ctx), _left_by_cancels(ctx)
            in_use = [k for k in active if k.id in held]
            spare = [k for k in active
                     if k.id not in held and k.id in left and k.last_used is None]
            if len(in_use) == 1 and len(spare) == len(active) - 1:
                # A cancelled rotation's never-used new key (the state DB says which: a hint;
                # IAM and the secrets say it is unused): make-room deletes it on approval.
                ctx.data["old_key_id"] = in_use[0].id
                return Done(f"{user} in {ctx.env}: {listing}; rotating {in_use[0].id}, the "
                            "key the secrets hold; the other was never used")
            raise StepFailed(
                f"{user} has two active keys ({listing}): find where each is used "
                "and remove one first; Rotor rotates one key at a time"
            )
        if not active:
            raise StepFailed(
                f"{user} has no active key in {ctx.env} ({listing}): nothing "
                "uses it, so there is nothing to rotate"
            )
        old = active[0]
    ctx.data["old_key_id"] = old.id
    return Done(f"{user} in {ctx.env}: {listing}; rotating {old.id}")


def make_room(ctx: Context) -> Outcome:
    """Runbook 3, "a maximum of 2 access keys": delete an inactive second key, on approval.

    A second key that is active but was never used (a cancelled rotation's new key: a
    cancel deactivates nothing, as that needs an approval) is deactivated, then deleted,
    on one approval bound to it."""
    keys, old = _keys(ctx), ctx.data["old_key_id"]
    inactive = [k for k in keys if k.id != old and not k.active]
    unused = [k for k in keys if k.id != old and k.active and k.last_used is None]
    if not inactive and not unused:
        return Skipped(f"{ctx.target} has no second key: there is room for the new one")
    key = (inactive or unused)[0]
    if key.active:
        def read() -> Facts:
            facts = _key_facts(ctx, key.id, "delete")
            if facts.refused is None and facts.seen["last_used"] is not None:
                return Facts(facts.seen, f"refusing to delete {key.id}: it was used "
                                         f"{facts.seen['last_used']}; someone holds it")
            return facts

        ctx.act("delete-unused", read,
                lambda f: f"Deactivate, then delete, the never-used active key "
                f"{_describe(key, ctx.now())} of {ctx.target} in {ctx.env} (left by a "
                "cancelled rotation): a user has at most two keys and the new key needs the "
                "slot; no secret's AWSCURRENT holds it",
                destructive=True)
        if _find(_keys(ctx), key.id) is not None:
            _set_status(_iam(ctx), ctx.target, key.id, INACTIVE)
    else:
        ctx.act(
            "delete-inactive",
            lambda: _key_facts(ctx, key.id, "delete"),
            lambda f: f"Delete the inactive key {_describe(key, ctx.now())} of {ctx.target} in "
            f"{ctx.env}: a user has at most two keys and the new key needs the slot; no "
            "secret's AWSCURRENT holds it",
            destructive=True,
        )
    if not _delete_inactive(_iam(ctx), ctx.target, ctx.env, key.id):
        return Done(f"key {key.id} was already gone")
    return Done(f"deleted the {'unused' if key.active else 'inactive'} key {key.id}")


def _catalogued(field: SecretField, name: str, arn: str) -> bool:
    return field.id in (name, arn)


def where_used(ctx: Context) -> Outcome:
    """Runbook 2, "Find where the key is used": the catalogue's places, plus every secret in
    the account that holds the old key ID. Secrets the catalogue misses need a decision."""
    places, old = _places(ctx), ctx.data["old_key_id"]
    new = ctx.data.get("new_key_id")
    sm = _sm(ctx)
    for field in places.secrets:
        current = read_key_secret(sm, field)
        assert current is not None  # AWSCURRENT always exists, or read_key_secret raised
        held = current[0].get(field.key_id_field)
        if held not in (old, new):
            raise StepFailed(
                f"secret {field.id} field {field.key_id_field!r} holds {held!r}, "
                f"not {ctx.target}'s key {old}: fix rotor.yml or the secret"
            )
    scan = scan_secrets(sm, old, ctx.catalogue.environment(ctx.env).where_used_prefix)
    missed = sorted(
        name
        for name, arn in scan.holding
        if not any(_catalogued(f, name, arn) for f in places.secrets)
    )
    found = [f"secrets {', '.join(f.id for f in places.secrets)}"]
    if places.external_secrets:
        found.append(f"ExternalSecrets {', '.join(places.external_secrets)}")
    if places.deployments:
        found.append(f"Deployments {', '.join(places.deployments)}")
    if places.ecs_services:
        found.append("ECS " + ", ".join(f"{s.cluster}/{s.service}" for s in places.ecs_services))
    if places.manual:
        found.append(f"by hand: {', '.join(m.place for m in places.manual)}")
    scanned = f"{scan.scanned} secrets scanned"
    if scan.unreadable:
        scanned += f" ({len(scan.unreadable)} unreadable: {', '.join(scan.unreadable[:10])})"
    if missed:
        ctx.data["missed_secrets"] = missed
        ctx.approve(
            f"The old key {old} is also in {len(missed)} secret(s) rotor.yml does not "
            f"list for {ctx.target} in {ctx.env}: {', '.join(missed)}. Rotor will not "
            "update them, so whatever reads them breaks when the old key is "
            "deactivated. Add them to rotor.yml and start again, or approve and update "
            "them yourself",
            gate="missed-places",
        )
        return Done(
            f"catalogue: {'; '.join(found)}; {scanned}; NOT in the catalogue: {', '.join(missed)}"
        )
    return Done(f"catalogue: {'; '.join(found)}; {scanned}; no other secret holds {old}")


def _staged_secret(ctx: Context, key_id: str) -> str | None:
    """The new key's secret, from whichever catalogued secret already holds it."""
    sm = _sm(ctx)
    for field in _places(ctx).secrets:
        for stage in ("AWSPENDING", "AWSCURRENT"):
            found = read_key_secret(sm, field, stage)
            if found and found[0].get(field.key_id_field) == key_id:
                secret = found[0].get(field.secret_field)
                if isinstance(secret, str) and secret:
                    return secret
    return None


def _stage(ctx: Context, field: SecretField, key_id: str, secret: str) -> str:
    """Make sure AWSPENDING (or already AWSCURRENT) of `field` holds the new key; its version."""
    sm = _sm(ctx)
    for stage in ("AWSPENDING", "AWSCURRENT"):
        found = read_key_secret(sm, field, stage)
        if found and found[0].get(field.key_id_field) == key_id:
            return found[1]
    current = read_key_secret(sm, field)
    assert current is not None
    value = {**current[0], field.key_id_field: key_id, field.secret_field: secret}
    return sm_secrets.put_pending(sm, field.id, value)


def _create(ctx: Context) -> tuple[str, str]:
    """create_access_key; the ID is saved and the secret registered before anything else."""
    try:
        created = _iam(ctx).create_access_key(UserName=ctx.target)["AccessKey"]
    except ClientError as exc:
        if _code(exc) == "LimitExceeded":
            raise StepFailed(
                f"{ctx.target} already has two access keys (LimitExceeded): "
                "Rotor never makes a third; retry once one is gone"
            ) from None
        raise AwsError(f"could not create an access key for {ctx.target}: {_code(exc)}") from None
    key_id, secret = str(created["AccessKeyId"]), str(created["SecretAccessKey"])
    redact.register(secret)
    ctx.data["new_key_id"] = key_id
    ctx.save()  # before anything else: a retry must find this key, not make another
    ctx.log.info("created %s for %s", key_id, ctx.target)
    return key_id, secret


def _recover(ctx: Context, keys: list[AccessKey], new_id: str) -> str | None:
    """The secret of the key an earlier attempt created, or None once that key is discarded.

    A key whose secret reached no catalogued secret (the process stopped in between) can
    never be used: it is deleted, on approval, so that a fresh one can take its slot.
    """
    new = _find(keys, new_id)
    if new is None:
        if ctx.data.get("discarded_key_id") == new_id:
            return None  # deleted below by an attempt that stopped before saving that
        raise StepFailed(
            f"the new key {new_id} Rotor created is gone (deleted outside Rotor); cancel "
            "this rotation and start again"
        )
    secret = _staged_secret(ctx, new_id)
    if secret is not None:
        return secret
    if new.last_used is not None:
        raise StepFailed(
            f"the new key {new_id} was used, yet no catalogued secret holds it: find where "
            "it went before going on"
        )
    ctx.approve(
        f"The new key {new_id} was created, but Rotor stopped before storing its secret, so "
        "nothing can ever use it. Delete it (never used) and create another",
        gate="replace-lost-key",
        destructive=True,
    )
    ctx.data["discarded_key_id"] = new_id
    ctx.save()
    if new.active:
        _set_status(_iam(ctx), ctx.target, new_id, INACTIVE)
    _delete_inactive(_iam(ctx), ctx.target, ctx.env, new_id)
    return None


def create_key(ctx: Context) -> Outcome:
    """Runbook 3, "Create and deploy new key": create it, stage it as AWSPENDING everywhere."""
    keys, old, user = _keys(ctx), ctx.data["old_key_id"], ctx.target
    if _old(ctx, keys) is None:
        raise StepFailed(
            f"the old key {old} of {user} is gone: something changed the user's keys during "
            "the rotation; cancel and start again"
        )
    new_id: str | None = ctx.data.get("new_key_id")
    secret = _recover(ctx, keys, new_id) if new_id else None
    if secret is None:
        others = [k for k in _keys(ctx) if k.id != old]
        if others:
            raise StepFailed(
                f"{user} already has a second key {others[0].id}, not made by this rotation: "
                "Rotor never makes a third key"
            )
        new_id, secret = _create(ctx)
    assert new_id is not None
    staged = ctx.data.setdefault("staged", {})
    for field in _places(ctx).secrets:
        staged[field.id] = _stage(ctx, field, new_id, secret)
        ctx.save()
    return Done(f"created {new_id}; staged as AWSPENDING in {', '.join(staged)}")


def promote(ctx: Context) -> Outcome:
    """Runbook 3, "Replace the old Access Key ID and Secret access key": AWSPENDING becomes
    AWSCURRENT in every catalogued secret (AWSPREVIOUS keeps the old key)."""
    sm, staged = _sm(ctx), ctx.data["staged"]
    for field in _places(ctx).secrets:
        version = staged[field.id]
        stages = sm_secrets.versions(sm, field.id).get(version, [])
        if "AWSCURRENT" not in stages and "AWSPENDING" not in stages:
            raise StepFailed(
                f"version {version} of {field.id} is neither pending nor current: "
                "someone changed the secret"
            )
        sm_secrets.promote(sm, field.id, version)
    return Done(
        f"AWSCURRENT of {', '.join(staged)} holds {ctx.data['new_key_id']}; "
        f"AWSPREVIOUS keeps {ctx.data['old_key_id']}"
    )


def _forget_previous(ctx: Context, key_id: str) -> str:
    """Take AWSPREVIOUS off each catalogued secret's version that holds `key_id`, the key about
    to be made inactive: a person rolling a secret back by hand to AWSPREVIOUS would otherwise
    give the app a key that no longer works. "Reactivate" needs no label: it turns the key
    itself back on while AWSCURRENT keeps the new one. Idempotent; "" when nothing changed."""
    sm, cleared = _sm(ctx), []
    for field in _places(ctx).secrets:
        found = read_key_secret(sm, field, "AWSPREVIOUS")
        if found and found[0].get(field.key_id_field) == key_id and sm_secrets.unstage(
                sm, field.id, "AWSPREVIOUS", found[1]):
            cleared.append(field.id)
    return f"; AWSPREVIOUS of {', '.join(cleared)} no longer holds it" if cleared else ""


def _manual_step(place: ManualPlace, gate: str) -> Callable[[Context], Outcome]:
    def update_by_hand(ctx: Context) -> Outcome:
        """Runbook 2-3, "the control panel of one of the 3rd party services": guided."""
        holder = _places(ctx).secrets[0]
        who = ctx.guide(
            f"{place.place}: {place.instruction}\nUse the new key {ctx.data['new_key_id']}. Its "
            f"secret is in Secrets Manager in {ctx.env}, secret `{holder.id}` (AWSCURRENT, field "
            f"`{holder.secret_field}`): `aws secretsmanager get-secret-value --secret-id "
            f"{holder.id}`. Rotor never shows it here. Click Done once {place.place} uses the "
            "new key.",
            gate=gate,
        )
        return Done(f"{place.place} updated by {who}")

    return update_by_hand


def wait_for_switch(ctx: Context) -> Outcome:
    """Runbook 4, "Ensure new key is being used": the new key has been used and the old key's
    last use stopped advancing (nothing for QUIET_SECONDS, all after the switch)."""
    now = ctx.now()
    switched = ctx.data.setdefault("switched_at", now)
    keys = _keys(ctx)
    old, new = _old(ctx, keys), _find(keys, ctx.data["new_key_id"])
    if old is None or new is None:
        raise StepFailed(
            f"{ctx.data['old_key_id'] if old is None else ctx.data['new_key_id']} "
            "is gone: something changed the user's keys during the rotation"
        )
    quiet_since = max(switched, old.last_used or 0.0)
    quiet = now - quiet_since >= QUIET_SECONDS
    if new.last_used is not None and quiet:
        return Done(
            f"new key {new.id} last used {when(new.last_used)}; old key {old.id} last "
            f"used {when(old.last_used)}, nothing since"
        )
    if new.last_used is None and quiet:
        reason = f"the new key {new.id} to be used"
    elif old.last_used is not None and old.last_used > switched:
        reason = (
            f"the old key {old.id} to stop being used (it was used after the switch: "
            "look for places the catalogue misses)"
        )
    else:
        reason = (
            f"the new key {new.id} to be used and the old key {old.id} to stay unused "
            f"for {QUIET_SECONDS / 3600:g}h"
        )
    next_check = now + CHECK_EVERY
    if new.last_used is not None:
        next_check = min(next_check, quiet_since + QUIET_SECONDS)
    return Wait(reason, timeout=SWITCH_TIMEOUT, check_at=next_check)


def _still_quiet(ctx: Context, old: AccessKey) -> None:
    if old.last_used is not None and ctx.now() - old.last_used < QUIET_SECONDS:
        raise StepFailed(
            f"the old key {old.id} was used at {when(old.last_used)}: something "
            "still uses it; find it, then retry"
        )


def deactivate(ctx: Context) -> Outcome:
    """Runbook 5, "Remove the old key": make it inactive (approval; 2nd line told first)."""
    keys, now = _keys(ctx), ctx.now()
    old = _old(ctx, keys)
    if old is None:
        raise StepFailed(f"the old key {ctx.data['old_key_id']} is gone (deleted outside Rotor)")
    grace = _grace_seconds(ctx)
    if old.active:
        _still_quiet(ctx, old)

        def read() -> Facts:
            facts = _key_facts(ctx, old.id, "deactivate")
            used = facts.seen["last_used"]
            if facts.refused is None and used is not None and ctx.now() - used < QUIET_SECONDS:
                return Facts(facts.seen, f"the old key {old.id} was used at {when(used)}: "
                                         "something still uses it; find it, then retry")
            return facts

        facts = ctx.act(
            "deactivate",
            read,
            lambda f: f"Deactivate the old key {old.id} of {ctx.target} in {ctx.env} (last "
            f"used {when(f.seen['last_used'])}; the new key {ctx.data['new_key_id']} is in use "
            f"and every catalogued secret's AWSCURRENT holds it). "
            f'"Reactivate" works for {days(grace)}; then the key is deleted after '
            "another approval",
            destructive=True,
        )
        forgotten = _forget_previous(ctx, old.id)
        if facts.seen["status"] == ACTIVE:
            _set_status(_iam(ctx), ctx.target, old.id, INACTIVE)
    else:
        forgotten = _forget_previous(ctx, old.id)
    ctx.data.setdefault("deactivated_at", now)
    return Done(
        f'the old key {old.id} is inactive{forgotten}; "Reactivate" works until '
        f"{when(ctx.data['deactivated_at'] + grace)}"
    )


def grace(ctx: Context) -> Outcome:
    """Runbook 5: an inactive key "can quickly be made active again": the grace period.

    "Reactivate" makes the old key active at once; it is deactivated again only on a new
    approval, and the grace period starts over.
    """
    iam, old_id, now = _iam(ctx), ctx.data["old_key_id"], ctx.now()
    old = _old(ctx, _keys(ctx))
    if old is None:
        return Done(f"the old key {old_id} is already deleted")
    who = ctx.requested(REACTIVATE)
    if who:
        if not old.active:
            _set_status(iam, ctx.target, old_id, ACTIVE)
        ctx.data["reactivated_by"] = who
        ctx.data["reactivations"] = ctx.data.get("reactivations", 0) + 1
        ctx.consume(REACTIVATE)
        ctx.save()
        ctx.log.info("reactivated %s for %s", old_id, who)
        old = _find(_keys(ctx), old_id) or old
    span = _grace_seconds(ctx)
    if old.active:
        by = ctx.data.get("reactivated_by") or "someone outside Rotor"
        ctx.act(
            f"deactivate-again-{ctx.data.get('reactivations', 0)}",
            lambda: _key_facts(ctx, old_id, "deactivate"),
            lambda f: f"The old key {old_id} was reactivated by {by} (last used "
            f"{when(f.seen['last_used'])}). Once whatever needed it has the new key "
            f"{ctx.data['new_key_id']}, approve to deactivate it again and restart the "
            f"grace period ({days(span)}); or cancel the rotation (both keys stay active)",
            destructive=True,
        )
        _set_status(iam, ctx.target, old_id, INACTIVE)
        ctx.data["deactivated_at"] = now
        ctx.data.pop("reactivated_by", None)
        ctx.save()
    until = ctx.data["deactivated_at"] + span
    if now >= until:
        return Done(
            f"the grace period ({days(span)}) is over; {old_id} stayed inactive (last "
            f"used {when(old.last_used)})"
        )
    return Wait(
        f'the grace period of {old_id} ("Reactivate" works until {when(until)})',
        timeout=span + DAY,
        check_at=min(until, now + CHECK_EVERY),
    )


def delete_old_key(ctx: Context) -> Outcome:
    """Runbook 5, "Remove the old key": after the grace period, unused, delete it (approval;
    2nd line told first). Never an active key."""
    iam, old_id, user = _iam(ctx), ctx.data["old_key_id"], ctx.target
    old = _old(ctx, _keys(ctx))
    if old is None:
        return Done(f"the old key {old_id} is already deleted")
    who = ctx.requested(REACTIVATE)
    if who:  # asked for while the deletion waited for approval: reactivating is the safe side
        if not old.active:
            _set_status(iam, user, old_id, ACTIVE)
        ctx.consume(REACTIVATE)
        raise StepFailed(
            f"{old_id} reactivated for {who} instead of deleted: something still "
            "needs it; cancel this rotation (both keys stay active) and rotate "
            "again once it has the new key"
        )
    if old.active:
        raise StepFailed(
            f"the old key {old_id} is active again: Rotor never deletes an active "
            "key; cancel this rotation, or deactivate it and retry"
        )
    deactivated = ctx.data["deactivated_at"]
    if old.last_used is not None and old.last_used > deactivated:
        raise StepFailed(
            f"the old key {old_id} was used at {when(old.last_used)}, after it was "
            "deactivated: it was active again in between; find what used it"
        )

    def read() -> Facts:
        facts = _key_facts(ctx, old_id, "delete")
        if facts.refused is None and facts.seen["status"] not in (INACTIVE, None):
            return Facts(facts.seen, f"the old key {old_id} is active again: Rotor never "
                                     "deletes an active key")
        return facts

    ctx.act(
        "delete",
        read,
        lambda f: f"Delete the old key {old_id} of {user} in {ctx.env} for good: inactive "
        f"since {when(deactivated)}, last used {when(f.seen['last_used'])}; no secret's "
        "AWSCURRENT holds it",
        destructive=True,
    )
    if not _delete_inactive(iam, user, ctx.env, old_id):
        return Done(f"the old key {old_id} is already deleted")
    return Done(f"deleted the old key {old_id}; {user} has one key, {ctx.data['new_key_id']}")


# -- the kind ----------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "place"


def manual_steps(places: KeyPlaces) -> list[Step]:
    steps, seen = [], set()
    for place in places.manual:
        name = f"manual-{_slug(place.place)}"
        while name in seen:
            name += "-2"
        seen.add(name)
        steps.append(
            Step(name, f"Update the key in {place.place} (by hand)", _manual_step(place, name))
        )
    return steps


class IamKeyKind:
    """The steps of an IAM access-key rotation, from preflight to deleting the old key."""

    name = "iam-key"

    def validate(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> None:
        places = catalogue.iam_user(target, env)
        if not places.secrets:
            raise ConfigError(
                f"iam_users.{target}.environments.{env}: no secrets; Rotor needs "
                "a Secrets Manager secret to hold the new key (manual places read "
                "it from there)"
            )

    def steps(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> list[Step]:
        places = catalogue.iam_user(target, env)
        return [
            Step(
                "preflight", "Preflight: the user's keys with age, status and last use", preflight
            ),
            Step(
                "make-room",
                "Delete an inactive second key to make room",
                make_room,
                destructive=True,
            ),
            Step(
                "where-used",
                "Find where the old key is used (catalogue and secrets scan)",
                where_used,
            ),
            Step("create-key", "Create the new key and stage it as AWSPENDING", create_key),
            Step("promote", "Make the new key AWSCURRENT in every catalogued secret", promote),
            # No `expect`: checking the synced Secrets reads them with consumers.lacks, which
            # registers every value as secret, the key ID too, and the store would then
            # refuse every row that names it.
            *consumers.steps(_places, key="redeploy"),
            *manual_steps(places),
            Step(
                "wait-for-switch",
                "Wait until the new key is used and the old one is not",
                wait_for_switch,
            ),
            Step("deactivate", "Deactivate the old key", deactivate, destructive=True),
            Step("grace", 'Grace period: "Reactivate" works until it ends', grace,
                 offers=("reactivate",)),
            Step("delete-old-key", "Delete the old key", delete_old_key, destructive=True),
        ]

    def cancel(self, ctx: Context) -> str:
        """Leave the user on a key that works: the new key is undone only if nothing can use it."""
        new_id, old_id = ctx.data.get("new_key_id"), ctx.data.get("old_key_id")
        if not new_id:
            return "nothing to undo: no new key was made"
        sm, promoted = _sm(ctx), False
        for field in _places(ctx).secrets:
            current = read_key_secret(sm, field)
            promoted |= bool(current and current[0].get(field.key_id_field) == new_id)
        keys = _keys(ctx)
        new, old = _find(keys, new_id), _find(keys, old_id)
        if promoted or new is None:
            state = "active" if old and old.active else "inactive" if old else "deleted"
            return f"kept the new key {new_id} in use; the old key {old_id} stays {state}"
        for field in _places(ctx).secrets:
            version = ctx.data.get("staged", {}).get(field.id)
            if version:
                sm_secrets.unstage(sm, field.id, "AWSPENDING", version)
        if new.last_used is None and new.active:
            # Deactivating needs an approval, and a cancel asks none: the key stays, unused
            # and in no stage of any secret, until the next rotation's make-room step.
            return (
                f"AWSPENDING removed; {old_id} stays the key in use; the new key {new_id} was "
                "never used and is left active: the next rotation deactivates and deletes it "
                "after an approval"
            )
        return f"AWSPENDING removed; {old_id} stays the key in use, {new_id} stays as it is"


KIND = IamKeyKind()


# -- the key-age report --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFinding:
    """An active key at or past the warning age (the report names slots, not key IDs)."""

    user: str
    slot: int
    created: float
    last_used: float | None
    age_days: int
    overdue: bool
    rotatable: bool  # rotor.yml knows where this user's key lives in this environment


@dataclass(frozen=True)
class KeyAgeReport:
    """The key-age check of one environment at one time."""

    env: str
    checked_at: float
    users: int
    active_keys: int
    max_age_days: int
    warn_days: int
    findings: tuple[KeyFinding, ...]  # oldest first

    @property
    def overdue(self) -> tuple[KeyFinding, ...]:
        return tuple(f for f in self.findings if f.overdue)

    @property
    def due_soon(self) -> tuple[KeyFinding, ...]:
        return tuple(f for f in self.findings if not f.overdue)

    def by_user(self) -> dict[str, list[KeyFinding]]:
        """Findings per user, the user with the oldest key first."""
        grouped: dict[str, list[KeyFinding]] = {}
        for finding in self.findings:
            grouped.setdefault(finding.user, []).append(finding)
        return grouped


def _report_time(value: str | None) -> float | None:
    if not value or value in ("N/A", "no_information", "not_supported"):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return _epoch(parsed)


def assess_keys(
    report_csv: str,
    now: float,
    *,
    env: str,
    max_age_days: int,
    warn_days: int,
    known_users: Collection[str] = (),
) -> KeyAgeReport:
    """Pure: the credential report's active keys at least `warn_days` old, at `now`.

    Older than `max_age_days` is overdue; from `warn_days` on, due soon. The root account's
    row is left out: its keys are not rotated by Rotor.
    """
    users = active_keys = 0
    findings = []
    known = set(known_users)
    for row in csv.DictReader(io.StringIO(report_csv)):
        user = row.get("user") or ""
        if not user or user == "<root_account>":
            continue
        users += 1
        for slot in (1, 2):
            if row.get(f"access_key_{slot}_active") != "true":
                continue
            created = _report_time(row.get(f"access_key_{slot}_last_rotated"))
            if created is None:
                continue
            active_keys += 1
            age = now - created
            if age < warn_days * DAY:
                continue
            findings.append(
                KeyFinding(
                    user,
                    slot,
                    created,
                    _report_time(row.get(f"access_key_{slot}_last_used_date")),
                    int(age // DAY),
                    age > max_age_days * DAY,
                    user in known,
                )
            )
    findings.sort(key=lambda f: (f.created, f.user, f.slot))
    return KeyAgeReport(env, now, users, active_keys, max_age_days, warn_days, tuple(findings))


def _pause(seconds: float) -> None:
    threading.Event().wait(seconds)


def credential_report(
    iam: Any, env: str, *, wait: Callable[[float], None] = _pause, attempts: int = 12
) -> str:
    """The account's credential report as CSV: one generate and one get while a report under
    four hours old exists, which is the usual case. AWS builds a new one in seconds; the
    calling thread waits for it through `wait`."""
    for attempt in range(attempts):
        try:
            iam.generate_credential_report()
            content = iam.get_credential_report()["Content"]
        except ClientError as exc:
            if _code(exc) not in (*_MISSING, "LimitExceeded"):
                raise AwsError(
                    f"could not read the IAM credential report of {env}: {_code(exc)}"
                ) from None
            wait(min(2.0**attempt, 10.0))
            continue
        return content.decode() if isinstance(content, bytes) else str(content)
    raise AwsError(f"the IAM credential report of {env} was not ready after {attempts} tries")


def key_age_report(
    clients: Any,
    catalogue: Catalogue,
    env: str,
    now: float,
    *,
    wait: Callable[[float], None] = _pause,
) -> KeyAgeReport:
    """The key-age check of `env` (what `/rotate keys` and `rotor keys` show)."""
    catalogue.environment(env)
    limits = catalogue.key_age
    known = [name for name, user in catalogue.iam_users.items() if env in user.environments]
    text = credential_report(clients.aws(env, "iam"), env, wait=wait)
    return assess_keys(
        text,
        now,
        env=env,
        max_age_days=limits.max_key_age_days,
        warn_days=limits.warn_days,
        known_users=known,
    )
