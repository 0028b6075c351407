"""Kind `postgres`: the PostgreSQL half of `rds-application-credentials.md`, one function a step.

The database work is `rotation.postgres_db`'s; the secret, sync and rollout steps are the
ones every kind shares (`rotation.appcreds`). What is particular to PostgreSQL here:

- Owner roles. The app's objects belong to a NOLOGIN `{app}-owner-role` that each dated
  login user `{app}-user-YYYYMMDD` is a member of, so a new user needs one GRANT, not a copy
  of every privilege. A database still owned by the app user is converted first (on approval).
- Environments restored from another overnight (`restored_from` in `rotor.yml`). Roles live in
  the database server, so the restore carries production's users into staging. A production
  rotation therefore parks after its rollout until the next restore has run, checks that the
  new user arrived, gives staging's app secret the same username and password, rolls staging
  out, and only then asks to retire the old user in production (the next restore carries that
  to staging too). Rotating a restored environment on its own is refused: the restore would
  undo it.
- Compromised mode (`params["compromised"]`): no overnight wait. The new user, with the same
  password, is made in every restored environment's database as well, every environment moves
  to it at once, and the old user is retired in each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

from rotation import appcreds, postgres_db, postgres_grants, postgres_rights, readcache
from rotation import secrets as sm_secrets
from rotation.catalogue import Catalogue, Environment
from rotation.engine import Context, Done, Outcome, Skipped, Step, Wait
from rotation.errors import InvalidIdentifier, NotAllowed, StepFailed, UnknownName
from rotation.facts import Facts

# How long after a restore was due Rotor keeps looking for the new user in the restored
# environment before it gives up: a restore that starts at 03:00 has until 09:00.


# -- where things are ------------------------------------------------------------------


def _compromised(params: Mapping[str, Any]) -> bool:
    return bool(params.get("compromised"))


def _copies(ctx: Context) -> list[str]:
    """Environments restored from this one overnight."""
    return ctx.catalogue.restored_into(ctx.env)


def _env(ctx: Context, env: str | None) -> str:
    return env or ctx.env


def _state(ctx: Context, env: str) -> dict[str, Any]:
    """What preflight found about one environment: its old user and database."""
    found = ctx.data.get("envs", {}).get(env)
    if found is None:
        raise StepFailed(f"preflight has not looked at {env} yet; retry from preflight")
    return dict(found)


def _endpoint(ctx: Context, user: str, password: str, env: str) -> postgres_db.Endpoint:
    secret = appcreds.app_secret(ctx, env=env)
    t = appcreds.target(ctx, env)
    return postgres_db.Endpoint(
        host=secret["host"],
        port=int(secret["port"]),
        user=user,
        password=password,
        database=secret["dbname"],
        tls=t.db_tls,
        ca_file=t.db_ca_file,
    )


@contextmanager
def admin(ctx: Context, env: str | None = None) -> Iterator[postgres_db.Connection]:
    """A connection as the environment's RDS admin user (`aws_db_admin`) to the app's database,
    one for the whole advance (as for MySQL)."""
    env = _env(ctx, env)
    t = appcreds.target(ctx, env)
    endpoint = _endpoint(ctx, t.admin_user, appcreds.admin_password(ctx, env), env)
    key = ("postgres-admin", endpoint.host, endpoint.port, endpoint.database, endpoint.user,
           endpoint.password)
    with readcache.connection(key, lambda: postgres_db.connect(endpoint)) as conn:
        yield conn


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _kinds(objects: list[postgres_db.Ownership]) -> str:
    counts = Counter(o.kind for o in objects)
    return ", ".join(_plural(n, kind) for kind, n in sorted(counts.items()))


def _verify_membership(conn: postgres_db.Connection, user: str, owner_role: str, env: str) -> None:
    """Runbook "Verify role inheritance", through pg_auth_members."""
    if owner_role not in postgres_db.memberships(conn, user):
        raise StepFailed(f"{user} is not a member of {owner_role} in {env} after the GRANT")


# -- the overnight restore ---------------------------------------------------------------


def next_restore(environment: Environment, after: float) -> float:
    """The first `restore_time` in the environment's timezone strictly after `after` (epoch)."""
    if environment.restore_time is None:
        raise StepFailed("the environment has no restore_time")
    tz = ZoneInfo(environment.timezone)
    day = datetime.fromtimestamp(after, tz).date()
    for offset in range(3):  # today's, tomorrow's, or (across a DST change) the day after's
        due = datetime.combine(day + timedelta(days=offset), environment.restore_time, tzinfo=tz)
        if due.timestamp() > after:
            return due.timestamp()
    raise AssertionError("unreachable: a restore time recurs daily")


def _local(epoch: float, timezone: str) -> str:
    return datetime.fromtimestamp(epoch, ZoneInfo(timezone)).strftime(
        f"%H:%M {timezone} on %a %d %b"
    )


# -- steps -----------------------------------------------------------------------------


def preflight(ctx: Context) -> Outcome:
    """Runbook: "Identifying existing roles (users) and ownerships" (\\du and \\dt).

    Read-only: also what `rotor plan` shows. Logs in as the admin in every environment the
    rotation will touch, so a wrong admin secret in staging fails now rather than next morning.
    """
    ctx.data.setdefault("owner_role", postgres_db.owner_role_name(ctx.target))
    lines = [_preflight_env(ctx, ctx.env)]
    for copy in _copies(ctx):
        if _compromised(ctx.params):
            lines.append(_preflight_env(ctx, copy))
        else:
            lines.append(_preflight_copy(ctx, copy))
    source = ctx.catalogue.environment(ctx.env).restored_from
    if source:
        lines.append(
            f"warning: {ctx.env} is restored from {source} every night, which brings back "
            f"{source}'s users; rotate {source} with --compromised to cover both"
        )
    return Done("; ".join(lines))


def _preflight_env(ctx: Context, env: str) -> str:
    t = appcreds.target(ctx, env)
    secret = appcreds.app_secret(ctx, env=env)
    known = ctx.data.get("envs", {}).get(env, {})
    old = known.get("old_username") or postgres_db.validate_role_name(secret["username"])
    owner_role = ctx.data["owner_role"]
    with admin(ctx, env) as conn:
        postgres_db.check_admin(conn)
        if not postgres_db.role_exists(conn, old):
            raise StepFailed(f"user {old} (from {t.secret} in {env}) does not exist on the server")
        report = postgres_db.preflight(conn, old, owner_role)
        rights = postgres_rights.rights(conn, old)
        defaults = postgres_grants.default_privileges(conn, old)
    ctx.data.setdefault("envs", {})[env] = {
        "old_username": old,
        "database": secret["dbname"],
        "rights": rights,  # what the app may do now; the new user must be able to do the same
    }
    if env == ctx.env:
        ctx.data["old_username"] = old
    for obj in report.objects:
        ctx.log.info("%s: %s %s is owned by %s", env, obj.kind, obj.name, obj.owner)
    owners = "; ".join(
        f"{owner} owns {_kinds([o for o in report.objects if o.owner == owner])}"
        for owner in report.owners
    )
    roles = "; ".join(
        f"{role} is a member of {', '.join(members) or 'nothing'}"
        for role, members in report.roles.items()
    )
    if postgres_db.needs_conversion(report, old):
        todo = f"{old} owns the database or objects in it: conversion to {owner_role} needed"
    elif owner_role in report.roles:
        todo = f"already converted to {owner_role}"
    else:
        todo = f"{old} owns nothing here and there is no {owner_role}"
    found = f"{env}: database {secret['dbname']} ({owners}); {roles}; {todo}"
    if report.direct_grants:
        shown = ", ".join(report.direct_grants[:3])
        more = f" and {len(report.direct_grants) - 3} more" if len(report.direct_grants) > 3 else ""
        found += (
            f"; {old} holds {_plural(len(report.direct_grants), 'privilege')} directly "
            f"({shown}{more}), which a new user does not inherit: Rotor copies them to "
            f"{owner_role}"
        )
    if defaults:
        found += (
            f"; default privileges for what {old} creates ({postgres_rights.shorten(defaults, 3)})"
            f", which DROP OWNED would lose: Rotor re-creates them for {owner_role} and the new "
            "user"
        )
    read_only = [
        o
        for o, r in rights.items()
        if o.startswith("table ") and "r" in r and not {*"awdiu"} & {*r}
    ]
    if read_only:
        found += f"; {old} may only read {_plural(len(read_only), 'table')}, and keeps only that"
    return found


def _preflight_copy(ctx: Context, copy: str) -> str:
    """A restored copy: its admin logs in and its app user is known (checked after the restore)."""
    environment = ctx.catalogue.environment(copy)
    secret = appcreds.app_secret(ctx, env=copy)
    old = postgres_db.validate_role_name(secret["username"])
    with admin(ctx, copy) as conn:
        present = postgres_db.role_exists(conn, old)
    ctx.data.setdefault("envs", {})[copy] = {"old_username": old, "database": secret["dbname"]}
    return (
        f"{copy} (app user {old}{'' if present else ', missing there'}) is restored from "
        f"{ctx.env} at {environment.restore_time:%H:%M} {environment.timezone}: after the "
        f"rollout Rotor waits for that restore, moves {copy} to the new user, and only then "
        f"retires {ctx.data['old_username']}"
    )


def _rights_before(ctx: Context, env: str, old: str) -> dict[str, str]:
    """What the app user could do at preflight (read now if preflight ran before Rotor kept
    it: a rotation started by an older Rotor)."""
    kept = _state(ctx, env).get("rights")
    if kept is not None:
        return dict(kept)
    with admin(ctx, env) as conn:
        return postgres_rights.rights(conn, old)


def convert(ctx: Context, env: str | None = None) -> Outcome:
    """Runbook: "Make sure Database and Object owners are set to an owner role" ("Convert
    Postgres to use Owner Roles"), then check the app may still do what it could before.

    What the app user holds directly (a grant on a lookup table) is copied to the owner role,
    and its default privileges are re-created for the owner role, so every later user has
    them too."""
    env = _env(ctx, env)
    old, database = _state(ctx, env)["old_username"], _state(ctx, env)["database"]
    owner_role = ctx.data["owner_role"]
    before = _rights_before(ctx, env, old)
    with admin(ctx, env) as conn:
        report = postgres_db.preflight(conn, old, owner_role)
        carry = postgres_grants.carry_over_plan(conn, old, owner_role, [owner_role])
        has_role = owner_role in report.roles
        if not postgres_db.needs_conversion(report, old):
            if has_role and owner_role in report.roles.get(old, []) and not carry:
                return Skipped(
                    f"{env}: already converted; {owner_role} owns the objects and {old} is a member"
                )
            if not has_role:
                raise StepFailed(
                    f"{old} owns nothing in {database} ({env}) and there is no {owner_role}: its "
                    "privileges come from elsewhere, so a new user would not get them; give the "
                    f"database and its objects to {owner_role} by hand, then retry"
                )
        owned = [o for o in report.objects if o.owner == old]
        what = _kinds(owned) or "no objects"
        also = ""
        if carry:
            also = (
                f"; give {owner_role} what {old} holds directly and re-create the default "
                f"privileges {old} defined, so the new user keeps them: "
                f"{postgres_rights.shorten(carry, 10)}"
            )
        ctx.approve(
            f"Convert {database} in {env} to an owner role: create {owner_role} NOLOGIN if it is "
            f"missing, give it what {old} owns ({what}), and grant it to {old} so the app keeps "
            f"working{also}",
            gate="convert",
        )
        changes = postgres_db.convert_to_owner_role(conn, old, owner_role)
        changes += postgres_grants.carry_over(conn, old, owner_role, [owner_role])
        checked = "; " + postgres_rights.check_same(
            before, postgres_rights.rights(conn, old), old, f"{old} before the conversion"
        )
    secret = appcreds.app_secret(ctx, env=env)
    if secret["username"] == old:
        summary = postgres_rights.probe(
            _endpoint(ctx, old, secret["password"], env), before, f"{old} before the conversion"
        )
        checked = f"; {old} still works: {summary}"
    return Done(f"{env}: {'; '.join(changes) or 'nothing left to change'}{checked}")


def create_user(ctx: Context, env: str | None = None) -> Outcome:
    """Runbook: "Create new user for Postgres database", `GRANT "{app}-owner-role"` to it, and
    "Verify role inheritance". The password is AWSPENDING's, staged here for the rotated
    environment; a restored copy (compromised mode) gets the same user and password."""
    env = _env(ctx, env)
    owner_role = ctx.data["owner_role"]
    with admin(ctx, env) as conn:
        if env == ctx.env:
            new = ctx.data.get("new_username")
            if new is None:
                new = postgres_db.new_user_name(conn, ctx.target, ctx.today().date())
                ctx.data["new_username"] = new
                ctx.save()  # before anything exists under the name, so a resume finds it again
            pending = appcreds.stage_pending(ctx, new)
        else:
            new = ctx.data["new_username"]
            pending = appcreds.pending_secret(ctx)
        postgres_db.create_login_user(conn, new, pending["password"], owner_role)
        _verify_membership(conn, new, owner_role, env)
        # Later migrations run as the new user: what it creates gets what the old user's did.
        old = _state(ctx, env)["old_username"]
        defaults = postgres_grants.copy_default_privileges(conn, old, new)
    staged = "password staged as AWSPENDING" if env == ctx.env else f"same password as {ctx.env}"
    kept = f"; {'; '.join(defaults)}" if defaults else ""
    return Done(f"{env}: created {new}, a member of {owner_role} (pg_auth_members); {staged}{kept}")


def test_login(ctx: Context, env: str | None = None) -> Outcome:
    """Log in as the new user with the AWSPENDING password, check it may do what the old user
    could at preflight (no less; more is reported), and use those rights on every table."""
    env = _env(ctx, env)
    old = _state(ctx, env)["old_username"]
    pending = appcreds.pending_secret(ctx)
    before = _rights_before(ctx, env, old)
    summary = postgres_rights.probe(
        _endpoint(ctx, pending["username"], pending["password"], env), before, old
    )
    return Done(f"{env}: logged in as {pending['username']}: {summary}")


def drain(ctx: Context, env: str | None = None) -> Outcome:
    """Runbook: "Check lingering connections"; "Force-kill connections for a user" only on
    approval (pg_terminate_backend)."""
    env = _env(ctx, env)
    old = _state(ctx, env)["old_username"]
    waits = ctx.catalogue.waits
    terminated = ctx.data.setdefault("terminated", {})
    with admin(ctx, env) as conn:
        rows = postgres_db.connections(conn)
        per_user: Counter[str] = Counter()
        for user, _app, n in rows:
            per_user[user] += n
        counts = ", ".join(f"{user}: {n}" for user, n in sorted(per_user.items())) or "none"
        lingering = per_user.get(old, 0)
        if not lingering:
            return Done(f"{env}: no connections from {old}; connections per user: {counts}")
        if env in terminated:
            apps = sorted({app or "no application_name" for user, app, _ in rows if user == old})
            raise StepFailed(
                f"{old} connected again in {env} after its sessions were terminated "
                f"({', '.join(apps)}); something still uses it: find it, then retry"
            )
        if ctx.waited < waits.drain:
            return Wait(
                f"{_plural(lingering, 'connection')} of {old} to close in {env}",
                timeout=waits.drain * 2,
            )

        def read() -> Facts:
            # Each round is its own decision, bound to these backends.
            return Facts({"user": old, "env": env, "pids": postgres_db.session_pids(conn, old)})

        facts = ctx.act(
            "kill",
            read,
            lambda f: f"Terminate {_plural(len(f.seen['pids']), 'connection')} of {old} in "
            f"{env} (pids {', '.join(map(str, f.seen['pids']))}) still open after "
            f"{int(waits.drain)}s (pg_terminate_backend); connections per user: {counts}",
            destructive=True,
        )
        ended = postgres_db.terminate_connections(conn, old, facts.seen["pids"])
    terminated[env] = ended
    ctx.log.info("terminated %s sessions of %s in %s", ended, old, env)
    return Wait(f"terminated connections of {old} to go in {env}", timeout=waits.drain * 2)


def await_restore(ctx: Context, env: str) -> Outcome:
    """Runbook: "Wait for Production-to-Staging sync overnight" and "Validate the previous
    changes have synchronised into Staging": park until the next restore, then look for the
    new user in the restored environment until `waits.restore_grace` has passed."""
    environment = ctx.catalogue.environment(env)
    new = ctx.data["new_username"]
    state = ctx.data.setdefault("restore", {}).setdefault(env, {})
    now = ctx.now()
    if "due" not in state or (ctx.waited == 0 and now > state["deadline"]):
        # First run: the first restore after the promotion. A retry after a missed deadline
        # waits for the next restore instead.
        promoted = ctx.rotation.step("promote").finished_at or now
        due = next_restore(environment, promoted if "due" not in state else now)
        state.update(due=due, deadline=due + ctx.catalogue.waits.restore_grace)
        ctx.save()
    due, deadline = state["due"], state["deadline"]
    started = now - ctx.waited
    timeout = deadline - started + 3600  # our own deadline below says why; this is a backstop
    when = _local(due, environment.timezone)
    if now < due:
        return Wait(f"the restore of {env} from {ctx.env} due at {when}", timeout, check_at=due)
    old = _state(ctx, env)["old_username"]
    with admin(ctx, env) as conn:
        present = postgres_db.role_exists(conn, new)
        if present:
            _verify_membership(conn, new, ctx.data["owner_role"], env)
        # The restore brought the old user too: the new one must be able to do what it can.
        exists = postgres_db.role_exists(conn, old)
        before = postgres_rights.rights(conn, old) if present and exists else {}
    if not present:
        if now > deadline:
            raise StepFailed(
                f"{env} still has no user {new} at {_local(now, environment.timezone)}: the "
                f"restore from {ctx.env} due at {when} did not bring it; check the restore job, "
                f"then retry (which waits for the next restore). {ctx.env} runs on {new}; "
                f"nothing was retired"
            )
        return Wait(
            f"{new} to appear in {env}: the restore due at {when} has not brought it yet", timeout
        )
    source = appcreds.app_secret(ctx)
    summary = postgres_rights.probe(_endpoint(ctx, new, source["password"], env), before, old)
    return Done(f"{env} has {new} since the restore due at {when}; {summary}")


def copy_secret(ctx: Context, env: str) -> Outcome:
    """Runbook: "Update the credentials used by the application in Staging": the restored
    environment's app secret gets the rotated environment's username and password."""
    t = appcreds.target(ctx, env)
    new = ctx.data["new_username"]
    source = appcreds.app_secret(ctx)
    if source["username"] != new:
        raise StepFailed(
            f"AWSCURRENT of {appcreds.target(ctx).secret} in {ctx.env} holds "
            f"{source['username']}, not {new}; someone changed the secret"
        )
    current = appcreds.app_secret(ctx, env=env)
    if current["username"] == new and current["password"] == source["password"]:
        return Done(f"AWSCURRENT of {t.secret} in {env} already holds {new}")
    value = {**current, "username": new, "password": source["password"]}
    sm_secrets.put_current(appcreds.secretsmanager(ctx, env), t.secret, value)
    return Done(
        f"AWSCURRENT of {t.secret} in {env} now holds {new} with {ctx.env}'s password; "
        f"AWSPREVIOUS keeps {current['username']}"
    )


def retire(ctx: Context, env: str | None = None) -> Outcome:
    """Runbook: "Final check for temporary or recent objects" and "Delete the old user":
    `REASSIGN OWNED BY old TO owner-role`, `DROP OWNED BY old`, `DROP USER old`."""
    env = _env(ctx, env)
    old, database = _state(ctx, env)["old_username"], _state(ctx, env)["database"]
    new, owner_role = ctx.data["new_username"], ctx.data["owner_role"]
    with admin(ctx, env) as conn:
        if not postgres_db.role_exists(conn, old):  # a resume after the drop
            return Done(f"{env}: {old} is already gone"
                        f"{appcreds.forget_previous(ctx, old, env)}")
        carried = ""
        if env == ctx.env and _copies(ctx) and not _compromised(ctx.params):
            carried = f"; the next restore carries this to {', '.join(_copies(ctx))}"
        heirs = [owner_role, new]

        def read() -> Facts:
            """Read now: the role, its sessions, who the secret names in this environment
            and every environment restored from it (all must be on the new user), and what
            of the old user's rights is carried over before DROP OWNED."""
            present = [old] if postgres_db.role_exists(conn, old) else []
            facts = appcreds.retire_facts(
                ctx, old, present, len(postgres_db.session_pids(conn, old)), env=env
            )
            behind = [
                where
                for where, user in facts.seen["secret"].items()
                if where.startswith("AWSCURRENT") and user != new
            ]
            if facts.refused is None and behind:
                return Facts(
                    facts.seen, f"refusing to retire {old}: {', '.join(behind)} does not hold {new}"
                )
            if present:
                kept = postgres_grants.retire_preview(conn, old, owner_role, heirs)
                return Facts({**facts.seen, "kept": kept}, facts.refused)
            return facts

        facts = ctx.act(
            "retire",
            read,
            lambda f: f'Retire {old} in {env} ({database}): REASSIGN OWNED BY "{old}" TO '
            f'"{owner_role}", DROP OWNED BY "{old}", DROP USER "{old}". '
            f"{appcreds.holders(f)}; no sessions{carried}{f.seen.get('kept', '')}",
            destructive=True,
        )
        forgotten = appcreds.forget_previous(ctx, old, env)
        if not facts.seen["accounts"]:
            return Done(f"{env}: {old} is already gone{forgotten}")
        changes = postgres_grants.carry_over(conn, old, owner_role, heirs)
        changes += postgres_db.retire_user(
            conn,
            old,
            owner_role,
            database=database,
            before_drop=partial(postgres_grants.check_kept, old=old, new=new, heirs=heirs),
        )
    return Done(f"{env}: {'; '.join(changes) or f'{old} is already gone'}{forgotten}")


# -- cleaning up after a cancel --------------------------------------------------------


def _made(ctx: Context, conn: postgres_db.Connection) -> dict[str, int]:
    """The login roles rotations made for the app that exist now, with their sessions."""
    return {user: len(postgres_db.session_pids(conn, user))
            for user in postgres_db.users_made(conn, ctx.target)}


def find_leftovers(ctx: Context) -> Outcome:
    """After a cancel: the users rotations made for the app, and which of them nothing uses."""
    with admin(ctx) as conn:
        return appcreds.find_leftovers(ctx, _made(ctx, conn))


def drop_leftovers(ctx: Context) -> Outcome:
    """Retire the users rotations made that nothing uses: what they own goes to the owner
    role (REASSIGN OWNED), then DROP OWNED and DROP USER, as `retire` does."""
    owner_role = postgres_db.owner_role_name(ctx.target)
    database = appcreds.app_secret(ctx)["dbname"]
    with admin(ctx) as conn:
        def drop(users: list[str]) -> None:
            for user in users:
                postgres_db.retire_user(conn, user, owner_role, database=database)

        return appcreds.drop_leftovers(ctx, lambda: _made(ctx, conn), drop)


CLEANUP = [
    Step("find-leftovers", "Find the users earlier rotations made that nothing uses",
         find_leftovers),
    Step("drop-leftovers", "Retire them: REASSIGN OWNED, DROP OWNED, DROP USER", drop_leftovers,
         destructive=True),
]


# -- the kind --------------------------------------------------------------------------


def _for(fn: Callable[..., Outcome], env: str) -> Callable[[Context], Outcome]:
    return partial(fn, env=env)


class PostgresKind:
    """A PostgreSQL application-credential rotation, with restored environments."""

    name = "postgres"

    def validate(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> None:
        app = catalogue.app(target)
        if app.engine != "postgres":
            raise UnknownName(f"{target} uses {app.engine}, not postgres")
        postgres_db.owner_role_name(target)
        try:
            postgres_db.validate_role_name(f"{target}-user-20260101-99")
        except InvalidIdentifier:
            raise InvalidIdentifier(
                f"app name {target!r} is too long for its users ({target}-user-YYYYMMDD): "
                "PostgreSQL role names have at most 63 bytes"
            ) from None
        environment = catalogue.environment(env)
        if environment.restored_from and not _compromised(params):
            source = environment.restored_from
            raise NotAllowed(
                f"{env} is restored from {source} every night at "
                f"{environment.restore_time:%H:%M} {environment.timezone}, which would undo a "
                f"rotation here: rotate {source} instead ({env} follows after the next "
                f"restore), or use --compromised if {env}'s credentials are compromised"
            )

    def steps(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> list[Step]:
        if params.get("cleanup"):
            return CLEANUP
        copies = catalogue.restored_into(env)
        compromised = _compromised(params)
        steps = [
            Step(
                "preflight",
                "Preflight: roles, memberships and the owner of every object",
                preflight,
            ),
            Step("convert", "Convert to an owner role if the app user owns objects", convert),
            Step(
                "create-user",
                "Create the new user from AWSPENDING and grant it the owner role",
                create_user,
            ),
            Step("test-login", "Log in as the new user and read and write every table", test_login),
        ]
        if compromised:
            for copy in copies:
                steps += [
                    Step(
                        f"convert-{copy}",
                        f"Convert {copy} to the owner role if needed",
                        _for(convert, copy),
                    ),
                    Step(
                        f"create-user-{copy}",
                        f"Create the same user and password in {copy}",
                        _for(create_user, copy),
                    ),
                    Step(
                        f"test-login-{copy}",
                        f"Log in as the new user in {copy}",
                        _for(test_login, copy),
                    ),
                ]
        steps += appcreds.shared_steps()
        steps.append(Step("drain", "Verify the old user has no connections left", drain))
        for copy in copies:
            if not compromised:
                steps.append(
                    Step(
                        f"await-restore-{copy}",
                        f"Wait for the overnight restore of {copy}, then find the new user there",
                        _for(await_restore, copy),
                    )
                )
            steps.append(
                Step(
                    f"secret-{copy}",
                    f"Give {copy}'s app secret the same username and password",
                    _for(copy_secret, copy),
                )
            )
            steps += appcreds.shared_steps(env=copy, suffix=f"-{copy}")
            if compromised:
                steps.append(
                    Step(
                        f"drain-{copy}",
                        f"Verify the old user has no connections left in {copy}",
                        _for(drain, copy),
                    )
                )
        steps.append(
            Step(
                "retire",
                "Retire the old user: REASSIGN OWNED, DROP OWNED, DROP USER",
                retire,
                destructive=True,
            )
        )
        if compromised:
            steps += [
                Step(
                    f"retire-{copy}",
                    f"Retire the old user in {copy}",
                    _for(retire, copy),
                    destructive=True,
                )
                for copy in copies
            ]
        return steps

    def cancel(self, ctx: Context) -> str:
        return appcreds.cancel(ctx)

    def db_host(self, catalogue: Catalogue, clients: Any, target: str, env: str) -> str:
        """The instance the per-host limit counts this rotation against."""
        return appcreds.db_host(catalogue, clients, target, env)


KIND = PostgresKind()
