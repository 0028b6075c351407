"""Kind `mysql`: the MySQL half of `rds-application-credentials.md`, one function a step.

Works on MySQL 8 (what RDS runs) and MariaDB 10.11; `rotation.mysql_db` hides where their
`SHOW GRANTS` and `mysql.user` differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pymysql

from rotation import appcreds, mysql_db, readcache
from rotation.catalogue import Catalogue
from rotation.engine import Context, Done, Outcome, Skipped, Step, Wait
from rotation.errors import StepFailed, UnknownName
from rotation.facts import Facts


def _endpoint(ctx: Context, user: str, password: str, database: str | None = None,
              env: str | None = None) -> mysql_db.Endpoint:
    secret = appcreds.app_secret(ctx, env=env)
    t = appcreds.target(ctx, env)
    return mysql_db.Endpoint(host=secret["host"], port=int(secret["port"]), user=user,
                             password=password, database=database, tls=t.db_tls,
                             ca_file=t.db_ca_file)


@contextmanager
def admin(ctx: Context) -> Iterator[pymysql.Connection]:
    """A connection as the RDS admin user (`aws_db_admin`), one for the whole advance."""
    t = appcreds.target(ctx)
    endpoint = _endpoint(ctx, t.admin_user, appcreds.admin_password(ctx))
    key = ("mysql-admin", endpoint.host, endpoint.port, endpoint.user, endpoint.password)
    with readcache.connection(key, lambda: mysql_db.connect(endpoint)) as conn:
        yield conn


def preflight(ctx: Context) -> Outcome:
    """Runbook: "Identifying existing users", "Get existing permissions", "Check for other
    MySQL objects". Read-only: also what `rotor plan` shows."""
    secret = appcreds.app_secret(ctx)
    old = ctx.data.get("old_username") or mysql_db.validate_account_name(secret["username"])
    schema = secret["dbname"]
    with admin(ctx) as conn:
        info = mysql_db.server_info(conn)
        hosts = mysql_db.user_hosts(conn, old)
        if not hosts:
            raise StepFailed(f"user {old} (from {appcreds.target(ctx).secret}) does not exist "
                             "on the server")
        lines = []
        for host in hosts:
            account = mysql_db.account(conn, old, host)
            grants = mysql_db.show_grants(conn, old, host)
            lines.append(f"{old}@{host}: {len(grants)} grant lines, plugin {account.plugin}, "
                         f"TLS {account.tls or 'none'}")
        objects = mysql_db.definer_objects(conn, schema, old)
    ctx.data.update(old_username=old, hosts=hosts, schema=schema, server=info.flavor,
                    definer_objects=[f"{o.kind} {o.name}" for o in objects])
    found = "; ".join(lines)
    defined = (f"{len(objects)} objects defined by {old}: "
               + ", ".join(f"{o.kind} {o.name}" for o in objects)) if objects else \
        f"no objects defined by {old}"
    return Done(f"{info.flavor} {info.version}; {found}; {defined}")


_BODY_SHOWN = 2400  # characters of a body posted with its approval (Slack shows 3,000)


def _shown(detail: mysql_db.ObjectDetail, admin_user: str) -> str:
    rights = f"runs with {admin_user}'s rights" if detail.runs_as_definer else \
        "runs with the caller's rights"
    return (f"{detail.key} (SQL SECURITY {detail.security}, body sha256 {detail.digest}: "
            f"{rights})")


def _body(detail: mysql_db.ObjectDetail) -> str:
    body = detail.body
    if len(body) > _BODY_SHOWN:
        body = body[:_BODY_SHOWN] + f" [... {len(detail.body) - _BODY_SHOWN} more characters]"
    return body


def redefine_objects(ctx: Context) -> Outcome:
    """Runbook: "Check for other MySQL objects": re-create them under the admin user.

    The approval lists each object with its kind, SQL SECURITY and a digest of its body, and
    names those that will run with the admin's rights. With --compromised, anyone holding the
    app's credentials could have planted a SQL SECURITY DEFINER object: each needs its own
    decision, by someone other than the starter, with its body posted in the request. What
    re-creates an object is saved before it is dropped (MySQL 8), and whatever a crash left
    missing is re-created first on resume."""
    old, schema = ctx.data["old_username"], ctx.data["schema"]
    admin_user = appcreds.target(ctx).admin_user
    state = ctx.data.setdefault("redefine", {})
    saved: dict[str, Any] = state.setdefault("saved", {})
    with admin(ctx) as conn:
        restored = [key for key, plan in saved.items() if mysql_db.restore_missing(conn, plan)]
        objects = mysql_db.definer_objects(conn, schema, old)
        if not objects:
            if restored:
                return Done(f"re-created {', '.join(restored)} (lost between DROP and CREATE) "
                            f"under the admin user; nothing else is defined by {old}")
            return Skipped(f"no functions, procedures, triggers, views or events defined by {old}")
        details = mysql_db.object_details(conn, objects)
        approved: dict[str, str] = state.setdefault("approved", {})
        if ctx.params.get("compromised"):
            for detail in details:
                if detail.runs_as_definer and approved.get(detail.key) != detail.digest:
                    ctx.approve(
                        f"{detail.key} runs with its definer's rights (SQL SECURITY "
                        f"{detail.security}). Re-defined under {admin_user}, it would run with "
                        f"{admin_user}'s rights, and {old}'s credentials are compromised: anyone "
                        "holding them could have planted it. Read its body before approving; "
                        "someone other than the starter must approve. Body (sha256 "
                        f"{detail.digest}): {_body(detail)}",
                        gate=f"redefine {detail.key}",
                        binds=detail.seen,
                        four_eyes=True,
                    )
                    approved[detail.key] = detail.digest
        rest = [d for d in details if approved.get(d.key) != d.digest]
        definers = [d.key for d in details if d.runs_as_definer]
        if rest:
            ctx.approve(
                f"Re-define {len(details)} objects under {admin_user}, bodies unchanged: "
                + "; ".join(_shown(d, admin_user) for d in details)
                + (f". Will run with {admin_user}'s rights: {', '.join(definers)}" if definers
                   else ". None will run with the admin's rights"),
                gate="redefine",
                binds=[d.seen for d in details],
            )

        def keep(plan: dict[str, Any]) -> None:
            saved[f"{plan['kind']} {plan['schema']}.{plan['name']}"] = plan
            ctx.save()  # before the DROP: a crash between DROP and CREATE loses nothing

        for obj in objects:
            mysql_db.redefine_object(conn, obj, save=keep)
    names = ", ".join(d.key for d in details)
    again = f"; re-created {', '.join(restored)} (lost between DROP and CREATE)" if restored \
        else ""
    return Done(f"re-defined under the admin user: {names}{again}")


def _prefix(ctx: Context) -> str:
    """How the users a rotation makes are named: `signon_user_` + YYYYMMDD."""
    return f"{ctx.target.replace('-', '_')}_user_"


def create_user(ctx: Context) -> Outcome:
    """Runbook: "Create new user", with the password from AWSPENDING."""
    old, hosts = ctx.data["old_username"], ctx.data["hosts"]
    with admin(ctx) as conn:
        new = ctx.data.get("new_username")
        if new is None:
            info = mysql_db.server_info(conn)
            base = f"{_prefix(ctx)}{ctx.today():%Y%m%d}"
            new = mysql_db.new_user_name(conn, base, info.max_user_length)
            ctx.data["new_username"] = new
            ctx.save()  # before anything exists under the name, so a resume finds it again
        pending = appcreds.stage_pending(ctx, new)
        like = mysql_db.account(conn, old, hosts[0])
        mysql_db.create_user(conn, new, hosts, pending["password"], like=like)
    return Done(f"created {new} on {', '.join(hosts)} (TLS {like.tls or 'none'}, "
                f"plugin {like.plugin}); password staged as AWSPENDING")


def copy_grants(ctx: Context) -> Outcome:
    """Runbook: "Get existing permissions" and the GRANT to the new user, then verify."""
    old, new, hosts = ctx.data["old_username"], ctx.data["new_username"], ctx.data["hosts"]
    copied: list[str] = []
    with admin(ctx) as conn:
        for host in hosts:
            copied += mysql_db.copy_grants(conn, old, new, host)
            equal, missing, extra = mysql_db.grants_match(conn, old, new, host)
            if not equal:
                raise StepFailed(f"grants of {new}@{host} differ from {old}@{host}: "
                                 f"missing {sorted(missing)}, extra {sorted(extra)}")
    return Done(f"{new} has the same grants as {old} on {', '.join(hosts)} "
                f"({len(copied)} copied)")


def test_login(ctx: Context) -> Outcome:
    """Log in as the new user with the AWSPENDING password and query the app's schema."""
    pending = appcreds.pending_secret(ctx)
    endpoint = _endpoint(ctx, pending["username"], pending["password"], ctx.data["schema"])
    summary = mysql_db.test_login(endpoint, ctx.data["schema"])
    return Done(f"logged in as {pending['username']}: {summary}")


def drain(ctx: Context) -> Outcome:
    """Runbook: "Verify rotation": the old user has no connections left."""
    old = ctx.data["old_username"]
    with admin(ctx) as conn:
        counts = mysql_db.connections_by_user(conn)
        ids = mysql_db.connection_ids(conn, old)
        per_user = ", ".join(f"{u or '(none)'}: {n}" for u, n in sorted(counts.items()))
        if not ids:
            return Done(f"no connections from {old}; connections per user: {per_user}")
        if ctx.waited < ctx.catalogue.waits.drain:
            return Wait(f"{len(ids)} connections of {old} to close",
                        timeout=ctx.catalogue.waits.drain * 2)
        info = mysql_db.server_info(conn)
        how = "CALL mysql.rds_kill(id)" if info.has_rds_kill else "KILL id"

        def read() -> Facts:
            # Each round of kills is its own decision, bound to these connection IDs.
            return Facts({"user": old, "ids": mysql_db.connection_ids(conn, old)})

        facts = ctx.act(
            "kill", read,
            lambda f: f"Kill {len(f.seen['ids'])} connections of {old} (IDs "
                      f"{', '.join(map(str, f.seen['ids']))}) still open after "
                      f"{int(ctx.catalogue.waits.drain)}s ({how}); connections per user: "
                      f"{per_user}",
            destructive=True)
        if not facts.seen["ids"]:
            return Done(f"the connections of {old} ended before they were killed")
        # Only IDs that still belong to the old user, checked one by one just before KILL.
        killed = mysql_db.kill_connections(conn, facts.seen["ids"], rds_kill=info.has_rds_kill,
                                           user=old)
    ctx.log.info("killed %s connections of %s", killed, old)
    return Wait(f"killed connections of {old} to go", timeout=ctx.catalogue.waits.drain * 2)


def drop_old_user(ctx: Context) -> Outcome:
    """Runbook: "Deleting the old user", on every host it exists on."""
    old = ctx.data["old_username"]
    with admin(ctx) as conn:
        if not mysql_db.user_hosts(conn, old):  # a resume after the drop
            return Done(f"{old} is already gone{appcreds.forget_previous(ctx, old)}")

        def read() -> Facts:
            """Read now: the old user's accounts, its sessions, who the secret names, and
            whether AWSCURRENT logs in."""
            hosts = mysql_db.user_hosts(conn, old)
            facts = appcreds.retire_facts(ctx, old, [f"{old}@{h}" for h in hosts],
                                          len(mysql_db.connection_ids(conn, old)))
            if facts.refused is None:
                current = appcreds.app_secret(ctx)
                endpoint = _endpoint(ctx, current["username"], current["password"])
                if not mysql_db.can_login(endpoint):
                    return Facts(facts.seen, f"refusing to drop {old}: AWSCURRENT's user "
                                             f"{current['username']} does not log in")
            return facts

        facts = ctx.act(
            "drop", read,
            lambda f: f"DROP USER {', '.join(f.seen['accounts'])}; no sessions; "
                      f"{appcreds.holders(f)}; AWSCURRENT logs in",
            destructive=True)
        hosts = [account.split("@", 1)[1] for account in facts.seen["accounts"]]
        forgotten = appcreds.forget_previous(ctx, old)
        if not hosts:
            return Done(f"{old} is already gone{forgotten}")
        mysql_db.drop_user(conn, old, hosts)
    return Done(f"dropped {old} on {', '.join(hosts)}{forgotten}")


def _made(ctx: Context, conn: pymysql.Connection) -> dict[str, int]:
    """The users rotations made for the app that exist now, with their sessions."""
    return {user: len(mysql_db.connection_ids(conn, user))
            for user in mysql_db.users_made(conn, _prefix(ctx))}


def find_leftovers(ctx: Context) -> Outcome:
    """After a cancel: the users rotations made for the app, and which of them nothing uses."""
    with admin(ctx) as conn:
        return appcreds.find_leftovers(ctx, _made(ctx, conn))


def drop_leftovers(ctx: Context) -> Outcome:
    """Drop, on every host, the users rotations made that nothing uses (re-read first)."""
    with admin(ctx) as conn:
        def drop(users: list[str]) -> None:
            for user in users:
                mysql_db.drop_user(conn, user, mysql_db.user_hosts(conn, user))

        return appcreds.drop_leftovers(ctx, lambda: _made(ctx, conn), drop)


CLEANUP = [
    Step("find-leftovers", "Find the users earlier rotations made that nothing uses",
         find_leftovers),
    Step("drop-leftovers", "Drop them", drop_leftovers, destructive=True),
]


class MySQLKind:
    """The ten steps of a MySQL application-credential rotation."""

    name = "mysql"

    def validate(self, catalogue: Catalogue, target: str, env: str,
                 params: Mapping[str, Any]) -> None:
        app = catalogue.app(target)
        if app.engine != "mysql":
            raise UnknownName(f"{target} uses {app.engine}, not mysql")
        mysql_db.validate_account_name(target.replace("-", "_"))

    def steps(self, catalogue: Catalogue, target: str, env: str,
              params: Mapping[str, Any]) -> list[Step]:
        if params.get("cleanup"):
            return CLEANUP
        return [
            Step("preflight", "Preflight: the app's user, hosts, grants, TLS and definer objects",
                 preflight),
            Step("redefine", "Re-define objects the old user defines under the admin user",
                 redefine_objects),
            Step("create-user", "Create the new user from the AWSPENDING password", create_user),
            Step("copy-grants", "Copy every grant to the new user and verify they match",
                 copy_grants),
            Step("test-login", "Log in as the new user and query the app's schema", test_login),
            *appcreds.shared_steps(),
            Step("drain", "Verify the old user has no connections left", drain),
            Step("drop-old-user", "Drop the old user on all of its hosts", drop_old_user,
                 destructive=True),
        ]

    def cancel(self, ctx: Context) -> str:
        return appcreds.cancel(ctx)

    def db_host(self, catalogue: Catalogue, clients: Any, target: str, env: str) -> str:
        """The instance the per-host limit counts this rotation against."""
        return appcreds.db_host(catalogue, clients, target, env)


KIND = MySQLKind()
