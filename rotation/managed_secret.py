"""Kind `secret`: a Secrets Manager secret rotated by its own rotation function, then every
consumer redeployed (`secretsmanager-rotate-ecs.md`), with a Roll back button for a while.

Rotor never sees the rotation function's work, only its effect: it calls `rotate_secret` with
a ClientRequestToken of its own (so the new version's id is known before the call, and a
resumed step never starts a second rotation), then polls `describe_secret` until that version
carries AWSCURRENT; there is no waiter for it. The consumers listed under the secret in
rotor.yml are then redeployed (`rotation.consumers`). Until the grace period ends, "Roll back"
(`Engine.request(id, "rollback", who)`) moves AWSCURRENT back to the version before and
redeploys again.

Only version ids and stage names are kept or shown; values are read solely to check that the
Kubernetes Secrets hold them, and are registered with the redactor when read.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from rotation import consumers, mysql_db, postgres_db, readcache, redact
from rotation import secrets as sm_secrets
from rotation.catalogue import Catalogue, Consumers
from rotation.engine import Context, Done, Outcome, Step, Wait
from rotation.errors import DatabaseError, SecretError, StepFailed
from rotation.facts import Facts

ROLLBACK = "rollback"  # the request name the Roll back button sends
_NAMES = ("host", "port", "dbname", "username", "engine")  # keys that hold no secret


def _sm(ctx: Context) -> Any:
    return ctx.clients.aws(ctx.env, "secretsmanager")


def _consumers(ctx: Context) -> Consumers:
    return ctx.catalogue.managed_secret(ctx.target, ctx.env)


def _describe(sm: Any, secret_id: str) -> dict[str, Any]:
    try:
        return dict(sm.describe_secret(SecretId=secret_id))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "ResourceNotFoundException":
            raise SecretError(f"secret {secret_id} not found") from None
        raise SecretError(f"secret {secret_id}: {code or 'cannot describe'}") from None


def _stage_holder(stages: Mapping[str, list[str]], stage: str) -> str | None:
    return next((v for v, labels in stages.items() if stage in labels), None)


def _stuck_pending(stages: Mapping[str, list[str]]) -> str | None:
    """A version with AWSPENDING but not AWSCURRENT: a rotation that has not finished.

    A finished rotation leaves AWSPENDING either nowhere or on the AWSCURRENT version."""
    return next(
        (
            v
            for v, labels in stages.items()
            if "AWSPENDING" in labels and "AWSCURRENT" not in labels
        ),
        None,
    )


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")
    return "never"


def _schedule(info: Mapping[str, Any]) -> str:
    rules = info.get("RotationRules") or {}
    parts = []
    if rules.get("AutomaticallyAfterDays"):
        parts.append(f"every {rules['AutomaticallyAfterDays']} days")
    if rules.get("ScheduleExpression"):
        parts.append(f"schedule {rules['ScheduleExpression']}")
    if rules.get("Duration"):
        parts.append(f"window {rules['Duration']}")
    return ", ".join(parts) or "no schedule"


def _function(info: Mapping[str, Any]) -> str:
    arn = info.get("RotationLambdaARN")
    if arn:
        return f"function {arn}"
    return f"managed rotation by {info.get('OwningService') or 'the owning service'}"


def _values(sm: Any, secret_id: str, version_id: str) -> dict[str, str]:
    """The version's value, key by key (a plain string is one value); all registered."""
    try:
        text = sm.get_secret_value(SecretId=secret_id, VersionId=version_id).get("SecretString")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise SecretError(
            f"secret {secret_id} version {version_id}: {code or 'unreadable'}"
        ) from None
    redact.register(text)
    try:
        parsed = json.loads(text or "")
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        return {"": text or ""}
    values = {key: str(value) for key, value in parsed.items() if value is not None}
    redact.register(*(v for k, v in values.items() if k not in _NAMES))
    return values


def _change(ctx: Context, to_version: str, from_version: str) -> consumers.Expected:
    """What consumers must now show: the secret values (not names) that `to_version` changed,
    and none of the ones it replaced."""
    sm = _sm(ctx)
    new, old = _values(sm, ctx.target, to_version), _values(sm, ctx.target, from_version)
    changed = [
        key for key, value in new.items() if key not in _NAMES and value and old.get(key) != value
    ]
    return consumers.Expected(
        new=[new[k] for k in changed], old=[old[k] for k in changed if old.get(k)]
    )


# -- steps -------------------------------------------------------------------------------


def preflight(ctx: Context) -> Outcome:
    """Runbook: `aws secretsmanager get-secret-value` to see the secret before rotating it;
    here its current version and rotation settings, never its value. Read-only."""
    info = _describe(_sm(ctx), ctx.target)
    stages = info.get("VersionIdsToStages") or {}
    current = _stage_holder(stages, "AWSCURRENT")
    if not info.get("RotationEnabled"):
        raise StepFailed(
            f"secret {ctx.target} has no rotation configured (RotationEnabled is "
            "false): turn rotation on for it first, or rotate it another way"
        )
    if current is None:
        raise StepFailed(f"secret {ctx.target} has no AWSCURRENT version")
    pending = _stuck_pending(stages)
    if pending is not None and pending != ctx.data.get("token"):
        raise StepFailed(
            f"secret {ctx.target}: AWSPENDING is on version {pending}, not on "
            f"AWSCURRENT ({current}): an earlier rotation has not finished; check "
            "its rotation function's logs, and clear the label before starting "
            "again"
        )
    ctx.data.setdefault("before_version", current)
    return Done(
        f"{ctx.target}: AWSCURRENT is version {current}; rotation on, "
        f"{_function(info)}, {_schedule(info)}; last rotated "
        f"{_when(info.get('LastRotatedDate'))}, next {_when(info.get('NextRotationDate'))}"
    )


def rotate(ctx: Context) -> Outcome:
    """Runbook: `aws secretsmanager rotate-secret`, then "query Secrets Manager again" until
    the version it made is AWSCURRENT."""
    sm, secret_id = _sm(ctx), ctx.target
    before = ctx.data["before_version"]
    token = ctx.data.get("token")
    if token is None:
        # Chosen before the call, so a resumed step knows which version to look for.
        ctx.data["token"] = token = str(uuid.uuid4())
        ctx.save()
    info = _describe(sm, secret_id)
    stages = info.get("VersionIdsToStages") or {}
    current = _stage_holder(stages, "AWSCURRENT")
    if token in stages and "AWSCURRENT" in stages[token]:
        ctx.data["new_version"] = token
        return Done(
            f"version {token} of {secret_id} is AWSCURRENT; AWSPREVIOUS is "
            f"{_stage_holder(stages, 'AWSPREVIOUS') or 'none'}"
        )
    if current not in (before, token):
        raise StepFailed(
            f"AWSCURRENT of {secret_id} moved to version {current}, which this "
            "rotation did not make: someone else rotated or changed it"
        )
    if token not in stages and "requested_at" not in ctx.data:
        pending = _stuck_pending(stages)
        if pending is not None:
            raise StepFailed(
                f"secret {secret_id}: AWSPENDING is on version {pending}: another "
                "rotation is in progress"
            )
        if not info.get("RotationEnabled"):
            raise StepFailed(f"rotation of {secret_id} was turned off since the preflight")
        # The configured function, named explicitly: Rotor asks for the rotation it showed
        # (and moto, unlike AWS, forgets the function when a call leaves it out).
        arn = info.get("RotationLambdaARN")
        extra = {"RotationLambdaARN": arn} if arn else {}
        try:
            response = sm.rotate_secret(SecretId=secret_id, ClientRequestToken=token, **extra)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise SecretError(
                f"secret {secret_id}: rotate_secret refused: "
                " ".join(f"{error.get('Code', '')} {error.get('Message', '')}".split())
            ) from None
        if response.get("VersionId") != token:
            raise StepFailed(
                f"rotate_secret answered version {response.get('VersionId')}, "
                f"not the ClientRequestToken {token}"
            )
        ctx.data["requested_at"] = ctx.now()
        ctx.save()
        ctx.log.info("rotate_secret %s started version %s", secret_id, token)
    limit = ctx.catalogue.waits.sync
    if ctx.waited >= limit:
        where = f"version {token} of {secret_id}"
        if token in stages:
            raise StepFailed(
                f"AWSPENDING is stuck on {where} after {int(limit)}s: "
                f"{_function(info)} did not finish (see its logs); AWSCURRENT is "
                f"still {current}. Retry waits again; cancel leaves it as it is"
            )
        raise StepFailed(
            f"{_function(info)} did not create {where} within {int(limit)}s "
            f"(createSecret failed?); AWSCURRENT is still {current}"
        )
    # The engine's own timeout is a backstop: the check above fails first, with the reason.
    return Wait(f"the rotation function to make version {token} AWSCURRENT", timeout=limit * 2)


def grace(ctx: Context) -> Outcome:
    """After the runbook: keep a Roll back button until the grace period ends; Roll back
    moves AWSCURRENT back to the version before (the consumers are redeployed next)."""
    secret_id, before, new = ctx.target, ctx.data["before_version"], ctx.data["new_version"]
    minutes = ctx.catalogue.secrets[secret_id].rollback_minutes
    until = ctx.data.setdefault("grace_until", ctx.now() + minutes * 60)
    who = ctx.data.get("rolled_back_by") or ctx.requested(ROLLBACK)
    if who:
        _roll_back(ctx, before, new)
        ctx.data["rolled_back_by"] = who
        return Done(
            f"rolled back by {who}: AWSCURRENT of {secret_id} is version {before} "
            f"again (AWSPREVIOUS: {new}); its rotation schedule still applies"
        )
    if ctx.now() >= until:
        return Done(
            f"no roll back asked for within {minutes:g} min; version {new} stays AWSCURRENT"
        )
    ends = datetime.fromtimestamp(until, UTC).strftime("%H:%MZ")
    return Wait(
        f"the grace period to end at {ends} (Roll back moves AWSCURRENT back to version {before})",
        timeout=minutes * 60 + 3600,
        check_at=until,
    )


def _login_problem(ctx: Context, values: Mapping[str, str]) -> str | None:
    """Why a database credential (RDS's JSON: engine, host, port, username, password) does
    not log in, or None when it does or is not one Rotor can try."""
    engine = values.get("engine", "")
    if not all(values.get(k) for k in ("host", "username", "password")):
        return None
    environment = ctx.catalogue.environment(ctx.env)
    try:
        if engine in ("mysql", "mariadb", "aurora-mysql"):
            ok = mysql_db.can_login(mysql_db.Endpoint(
                host=values["host"], port=int(values.get("port") or 3306),
                user=values["username"], password=values["password"],
                tls=environment.db_tls, ca_file=environment.db_ca_file))
        elif engine in ("postgres", "postgresql", "aurora-postgresql"):
            postgres_db.connect(postgres_db.Endpoint(
                host=values["host"], port=int(values.get("port") or 5432),
                user=values["username"], password=values["password"],
                database=values.get("dbname") or "postgres", tls=environment.db_tls,
                ca_file=environment.db_ca_file)).close()
            ok = True
        else:
            return None
    except DatabaseError as exc:
        return str(exc)
    return None if ok else f"login as {values['username']} refused"


@readcache.from_the_world
def _rollback_facts(ctx: Context, before: str, new: str) -> Facts:
    """The preconditions of a roll back, read now: AWSCURRENT is still the version this
    rotation made, the version it returns to still exists, and its credentials work."""
    sm, secret_id = _sm(ctx), ctx.target
    stages = sm_secrets.versions(sm, secret_id)
    current = _stage_holder(stages, "AWSCURRENT")
    seen = {"current": current, "to": before, "from": new}
    if current == before:
        return Facts(seen)
    if current != new:
        return Facts(seen, f"AWSCURRENT of {secret_id} is version {current}, not {new} that "
                           "this rotation made: someone changed it since; not rolling back")
    if before not in stages:
        return Facts(seen, f"version {before} of {secret_id} no longer exists; cannot roll "
                           "back to it")
    problem = _login_problem(ctx, _values(sm, secret_id, before))
    if problem:
        return Facts(seen, f"version {before} of {secret_id} does not log in ({problem}); "
                           "not rolling back to it")
    return Facts(seen)


def _roll_back(ctx: Context, before: str, new: str) -> None:
    """Move AWSCURRENT from `new` back to `before`, if it is not there already."""
    sm, secret_id = _sm(ctx), ctx.target
    facts = _rollback_facts(ctx, before, new)
    if facts.refused:
        raise StepFailed(facts.refused)
    if facts.seen["current"] != before:
        sm_secrets.promote(sm, secret_id, before)
        ctx.log.info("moved AWSCURRENT of %s back to version %s", secret_id, before)
    # A rotation function may leave AWSPENDING on the version it made; left on a version
    # that is no longer current it would make the next rotate_secret fail.
    sm_secrets.unstage(sm, secret_id, "AWSPENDING", new)


def _rolled_back(ctx: Context) -> str | None:
    return None if ctx.data.get("rolled_back_by") else "no roll back was asked for"


class ManagedSecretKind:
    """Rotate a secret through its rotation function, redeploy its consumers, offer a roll
    back."""

    name = "secret"

    def validate(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> None:
        catalogue.managed_secret(target, env)

    def steps(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> list[Step]:
        return [
            Step("preflight", "Show the secret's current version and rotation settings", preflight),
            Step(
                "rotate", "Rotate the secret and wait until the new version is AWSCURRENT", rotate
            ),
            *consumers.steps(
                _consumers,
                key="rotate",
                expect=lambda ctx: _change(
                    ctx, ctx.data["new_version"], ctx.data["before_version"]
                ),
            ),
            Step("grace", "Offer Roll back until the grace period ends", grace,
                 offers=("rollback",)),
            *consumers.steps(
                _consumers,
                key=ROLLBACK,
                prefix="rollback-",
                skip_unless=_rolled_back,
                why=" (after the roll back)",
                expect=lambda ctx: _change(
                    ctx, ctx.data["before_version"], ctx.data["new_version"]
                ),
            ),
        ]

    def cancel(self, ctx: Context) -> str:
        """Change nothing: say where the secret stands and what is left to do by hand."""
        secret_id, before = ctx.target, ctx.data.get("before_version")
        token = ctx.data.get("token")
        # From the secret's stages, not from notes: a roll back may have moved AWSCURRENT
        # before the step could record it.
        stages = sm_secrets.versions(_sm(ctx), secret_id)
        labels = stages.get(token or "", [])
        if "AWSPREVIOUS" in labels and "AWSCURRENT" in stages.get(before or "", []):
            return (
                f"rolled back: AWSCURRENT of {secret_id} is version {before}; consumers "
                "not yet redeployed may hold the newer value until they restart"
            )
        if "AWSCURRENT" in labels:
            redeploy = [s for s in ctx.rotation.steps if s.name in ("sync", "rollout", "ecs")]
            if all(s.finished for s in redeploy):
                return (
                    f"the rotation finished: version {token} of {secret_id} is AWSCURRENT "
                    "and its consumers were redeployed; no roll back was asked for"
                )
            return (
                f"the rotation finished: version {token} of {secret_id} is AWSCURRENT; "
                "consumers not yet redeployed hold the old value until they restart"
            )
        if "AWSPENDING" in labels:
            return (
                f"AWSCURRENT of {secret_id} is still version {before}; AWSPENDING stays on "
                f"version {token} while its rotation function may still be running. If it "
                "failed, clear it: aws secretsmanager update-secret-version-stage "
                f"--secret-id {secret_id} --version-stage AWSPENDING "
                f"--remove-from-version-id {token}"
            )
        return f"nothing changed: AWSCURRENT of {secret_id} is still version {before}"


KIND = ManagedSecretKind()
