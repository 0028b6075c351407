"""The PostgreSQL steps of the RDS application-credential runbook, as plain functions.

Every function takes a psycopg connection made by `connect` (as the admin, to the app's
database unless it says otherwise) and does one runbook step. Mutating steps look first and
act only when needed, so a rotation that stopped half-way can run the step again.

Two PostgreSQL 15 facts shape this module:

- CREATEROLE lets the admin create, alter, drop and grant roles, but not act *as* them.
  ALTER DATABASE ... OWNER, REASSIGN OWNED, DROP OWNED and pg_terminate_backend all need the
  privileges of the roles involved, so the steps grant those roles to the admin when it lacks
  them (RDS's aws_db_admin is in the same position).
- REASSIGN OWNED and DROP OWNED act on the current database and on shared objects only.
  REASSIGN OWNED also moves databases the role owns *anywhere* in the cluster, and objects the
  role owns in other databases stop DROP ROLE, so `retire_user` refuses in both cases.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal, TypeAlias

import psycopg
from psycopg import errors, sql
from psycopg.rows import TupleRow, tuple_row

from rotation import fence, timeouts
from rotation.errors import (
    ConfigError,
    DatabaseError,
    DatabaseUnreachable,
    InvalidIdentifier,
    StepFailed,
)
from rotation.redact import redact, register

log = logging.getLogger(__name__)

TlsMode = Literal["disabled", "required", "verify"]
Connection: TypeAlias = "psycopg.Connection[Any]"

_SSLMODE: dict[str, str] = {"disabled": "disable", "required": "require", "verify": "verify-full"}
_ROLE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_MAX_NAME_BYTES = 63  # NAMEDATALEN - 1; PostgreSQL silently truncates longer identifiers


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to log in. The password never appears in repr."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    tls: TlsMode = "required"
    ca_file: str | None = None

    def __post_init__(self) -> None:
        register(self.password)
        if self.tls not in _SSLMODE:
            raise ConfigError(f"endpoint {self.host}: tls must be one of {sorted(_SSLMODE)}")
        if self.tls == "verify" and not self.ca_file:
            raise ConfigError(f"endpoint {self.host}: tls=verify needs ca_file (the RDS CA bundle)")

    def describe(self, database: str | None = None) -> str:
        return f"{self.user}@{self.host}:{self.port}/{database or self.database}"


@dataclass(frozen=True)
class Ownership:
    """One object and the role that owns it."""

    kind: str  # database, schema, table, sequence, view, materialized view, function, ...
    name: str
    owner: str


@dataclass(frozen=True)
class Report:
    """What the preflight found in the app's database."""

    database_owner: str
    objects: list[Ownership]
    roles: dict[str, list[str]]  # role -> roles it is a direct member of (existing roles only)
    owners: dict[str, int]  # owner -> number of objects (the database included)
    direct_grants: list[str] = field(default_factory=list)
    # Privileges granted to the app user itself; a new user inherits only the owner role's.


# -- connections and small helpers ------------------------------------------------------


class FencedCursor(psycopg.Cursor[Any]):
    """A cursor that checks the worker's lease before a statement that changes something
    (`Connection.execute` and `Connection.cursor` both make their cursors from this)."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        fence.guard_sql(_text(query, self.connection))
        return super().execute(query, params, **kwargs)

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        fence.guard_sql(_text(query, self.connection))
        super().executemany(query, params_seq, **kwargs)


def _text(query: Any, conn: Connection) -> str | bytes:
    if isinstance(query, str | bytes):
        return query
    return str(query.as_string(conn))


def connect(
    ep: Endpoint, *, database: str | None = None, timeout: float | None = None,
    lock_timeout: float | None = None,
) -> Connection:
    """Log in as ep.user (autocommit). `lock_timeout` keeps ownership changes from queueing
    behind an app's long transaction and blocking everyone else while they wait.

    Every call is bounded (`rotation.timeouts`): connect_timeout covers the whole login,
    statement_timeout every statement, and TCP keepalives a server that went away."""
    bounds = timeouts.BOUNDS
    timeout = timeout or bounds.db_connect
    lock_timeout = lock_timeout or bounds.db_lock
    idle, interval, count = bounds.keepalives()
    dbname = database or ep.database
    params: dict[str, Any] = {"sslmode": _SSLMODE[ep.tls], "keepalives": 1,
                              "keepalives_idle": idle, "keepalives_interval": interval,
                              "keepalives_count": count,
                              "tcp_user_timeout": int(bounds.keepalive_dead() * 1000)}
    if ep.ca_file:
        params["sslrootcert"] = ep.ca_file
    try:
        conn = psycopg.connect(
            host=ep.host,
            port=ep.port,
            user=ep.user,
            password=ep.password,
            dbname=dbname,
            autocommit=True,
            connect_timeout=max(2, round(timeout)),
            application_name="rotor",
            cursor_factory=FencedCursor,
            **params,
        )
    except psycopg.Error as exc:
        # `from None`: the driver's text is summarised below; nothing else of it is needed.
        if _UNREACHABLE.search(str(exc)):
            raise DatabaseUnreachable(
                f"{ep.host}:{ep.port} does not answer: {_login_reason(exc)}") from None
        raise DatabaseError(
            f"could not log in as {ep.describe(dbname)}: {_login_reason(exc)}"
        ) from None
    try:
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false),"
            " set_config('statement_timeout', %s, false)",
            (f"{int(lock_timeout * 1000)}ms", f"{int(bounds.db_read * 1000)}ms"),
        )
    except psycopg.Error as exc:
        conn.close()
        raise DatabaseError(f"connect: {_reason(exc)} ({ep.describe(dbname)})") from exc
    return conn


_UNREACHABLE = re.compile(r"Connection refused|could not translate host name|timeout expired|"
                          r"No route to host|Network is unreachable|Name or service not known")


def _login_reason(exc: psycopg.Error) -> str:
    text = str(exc).strip()
    if "FATAL:" in text:
        text = text.rsplit("FATAL:", 1)[1]
    elif "failed: " in text:  # drop libpq's 'connection to server at "h", port p failed: '
        text = text.rsplit("failed: ", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return redact(lines[0] if lines else type(exc).__name__)


def _reason(exc: psycopg.Error) -> str:
    primary = exc.diag.message_primary if isinstance(exc, psycopg.DatabaseError) else None
    text = " ".join((primary or str(exc).strip() or type(exc).__name__).split())
    if isinstance(exc, errors.LockNotAvailable):
        text += " (a long-running transaction holds a lock on it; retry when it has ended)"
    return redact(text)


@contextmanager
def _errors(step: str, *, secret: bool = False) -> Iterator[None]:
    """Turn driver errors into one-line DatabaseErrors that start with the step name."""
    try:
        yield
    except psycopg.Error as exc:
        error = DatabaseError(f"{step}: {_reason(exc)}")
        if secret:  # the statement held a password (verifier): keep no trace of it
            raise error from None
        raise error from exc


def _rows(
    conn: Connection, query: Any, params: Sequence[Any] | Mapping[str, Any] | None = None
) -> list[TupleRow]:
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def _value(conn: Connection, query: Any, params: Sequence[Any] | None = None) -> Any:
    rows = _rows(conn, query, params)
    return rows[0][0] if rows else None


def _role(name: str) -> sql.Identifier:
    return sql.Identifier(validate_role_name(name))


def _current_user(conn: Connection) -> str:
    return str(_value(conn, "SELECT current_user"))


def _acts_for(conn: Connection, role: str) -> bool:
    return bool(_value(conn, "SELECT pg_has_role(current_user, %s::name, 'USAGE')", (role,)))


def _make_admin_act_for(conn: Connection, role: str) -> list[str]:
    """PG15's CREATEROLE does not include a role's privileges; grant the role to the admin."""
    if _acts_for(conn, role):
        return []
    admin = _current_user(conn)
    conn.execute(sql.SQL("GRANT {} TO {}").format(_role(role), _role(admin)))
    return [f"granted {role} to {admin}"]


# -- names ------------------------------------------------------------------------------


def validate_role_name(name: str) -> str:
    """Letters, digits, `_` and `-` only, at most 63 bytes, not a reserved `pg_` name."""
    if not isinstance(name, str) or not _ROLE_NAME.fullmatch(name):
        raise InvalidIdentifier(f"role name {name!r} may only contain letters, digits, '_' and '-'")
    if len(name.encode()) > _MAX_NAME_BYTES:
        raise InvalidIdentifier(
            f"role name {name!r} is longer than {_MAX_NAME_BYTES} bytes; PostgreSQL would truncate it"
        )
    if name.startswith("pg_"):
        raise InvalidIdentifier(f"role name {name!r} starts with pg_, which PostgreSQL reserves")
    return name


def owner_role_name(app: str) -> str:
    """The runbook's owner role, e.g. `account-api-owner-role`."""
    return validate_role_name(f"{validate_role_name(app)}-owner-role")


def role_exists(conn: Connection, role: str) -> bool:
    return bool(_value(conn, "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)))


def new_user_name(conn: Connection, app: str, day: date) -> str:
    """Runbook "Create a new user": `{app}-user-YYYYMMDD`, then `-2`, `-3`... if taken."""
    base = validate_role_name(f"{validate_role_name(app)}-user-{day:%Y%m%d}")
    name, n = base, 1
    while role_exists(conn, name):
        n += 1
        name = validate_role_name(f"{base}-{n}")
    return name


def users_made(conn: Connection, app: str) -> list[str]:
    """The login roles `new_user_name` made for `app` (`{app}-user-YYYYMMDD`, then `-2`...)
    that exist now."""
    prefix = f"{validate_role_name(app)}-user-"
    pattern = re.compile(re.escape(prefix) + r"[0-9]{8}(-[0-9]+)?")
    like = prefix.replace("_", "\\_") + "%"  # validated: no other LIKE wildcard in it
    query = "SELECT rolname FROM pg_roles WHERE rolcanlogin AND rolname LIKE %s"
    with _errors("users_made"):
        return sorted(str(r[0]) for r in _rows(conn, query, (like,)) if pattern.fullmatch(r[0]))


def memberships(conn: Connection, role: str) -> set[str]:
    """Roles `role` is a direct member of (pg_auth_members), as the runbook verifies."""
    query = """
        SELECT g.rolname FROM pg_auth_members m
        JOIN pg_roles r ON r.oid = m.member JOIN pg_roles g ON g.oid = m.roleid
        WHERE r.rolname = %s
    """
    return {row[0] for row in _rows(conn, query, (role,))}


def _members(conn: Connection, role: str) -> set[str]:
    query = """
        SELECT r.rolname FROM pg_auth_members m
        JOIN pg_roles r ON r.oid = m.member JOIN pg_roles g ON g.oid = m.roleid
        WHERE g.rolname = %s
    """
    return {row[0] for row in _rows(conn, query, (role,))}


# -- preflight --------------------------------------------------------------------------

# Objects in user schemas, leaving out what extensions own (their owner follows the
# extension), table row types, array types and multiranges (their owner follows the base).
_OWNERSHIP_QUERY = """
    SELECT 'database', d.datname::text, pg_get_userbyid(d.datdba)::text
    FROM pg_database d WHERE d.datname = current_database()
  UNION ALL
    SELECT 'schema', n.nspname::text, pg_get_userbyid(n.nspowner)::text
    FROM pg_namespace n
    WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
      AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_namespace'::regclass
                      AND e.objid = n.oid AND e.deptype = 'e')
  UNION ALL
    SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'S' THEN 'sequence'
                          WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                          ELSE 'foreign table' END,
           n.nspname || '.' || c.relname, pg_get_userbyid(c.relowner)::text
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'S', 'v', 'm', 'f')
      AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
      AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_class'::regclass
                      AND e.objid = c.oid AND e.deptype = 'e')
  UNION ALL
    SELECT CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate'
                          ELSE 'function' END,
           n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
           pg_get_userbyid(p.proowner)::text
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
      AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass
                      AND e.objid = p.oid AND e.deptype = 'e')
  UNION ALL
    SELECT 'type', n.nspname || '.' || t.typname, pg_get_userbyid(t.typowner)::text
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
      AND t.typtype <> 'm'
      AND (t.typrelid = 0 OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')
      AND NOT EXISTS (SELECT 1 FROM pg_type a WHERE a.typarray = t.oid)
      AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_type'::regclass
                      AND e.objid = t.oid AND e.deptype = 'e')
  UNION ALL
    -- Anything else a (non-built-in) role owns here: extensions, large objects, collations...
    SELECT o.type, o.identity, r.rolname::text
    FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid,
         LATERAL pg_identify_object(s.classid, s.objid, s.objsubid) o
    WHERE s.deptype = 'o'
      AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND s.classid NOT IN ('pg_namespace'::regclass, 'pg_class'::regclass, 'pg_proc'::regclass,
                            'pg_type'::regclass, 'pg_default_acl'::regclass)
      AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = s.classid
                      AND e.objid = s.objid AND e.deptype = 'e')
"""

_DIRECT_GRANTS_QUERY = """
    SELECT o.type || ' ' || o.identity
    FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid,
         LATERAL pg_identify_object(s.classid, s.objid, s.objsubid) o
    WHERE r.rolname = %s AND s.deptype = 'a'
      AND (s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           OR (s.classid = 'pg_database'::regclass
               AND s.objid = (SELECT oid FROM pg_database WHERE datname = current_database())))
    ORDER BY 1
"""


def preflight(conn: Connection, app_user: str, owner_role: str) -> Report:
    """Runbook "Identifying existing roles (users) and ownerships" (\\du and \\dt)."""
    with _errors("preflight"):
        rows = _rows(conn, _OWNERSHIP_QUERY)
        admin = _current_user(conn)
        roles = {
            role: sorted(memberships(conn, role))
            for role in dict.fromkeys(
                (validate_role_name(app_user), validate_role_name(owner_role), admin)
            )
            if role_exists(conn, role)
        }
        grants = [row[0] for row in _rows(conn, _DIRECT_GRANTS_QUERY, (app_user,))]
    objects = sorted(
        (Ownership(kind, name, owner) for kind, name, owner in rows),
        key=lambda o: (o.kind != "database", o.kind, o.name),
    )
    database_owner = next(o.owner for o in objects if o.kind == "database")
    owners = dict(Counter(o.owner for o in objects).most_common())
    return Report(database_owner, objects, roles, owners, grants)


def needs_conversion(report: Report, app_user: str) -> bool:
    """The app user still owns the database or something in it."""
    return report.database_owner == app_user or any(o.owner == app_user for o in report.objects)


def check_admin(conn: Connection) -> None:
    """The admin can create/drop roles (CREATEROLE) and change database owners (CREATEDB)."""
    with _errors("check_admin"):
        row = _rows(
            conn,
            "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
            "WHERE rolname = current_user",
        )[0]
    admin, superuser, createrole, createdb = row
    if superuser:
        return
    if not createrole:
        raise DatabaseError(
            f"{admin} lacks CREATEROLE; Rotor needs it to create, grant and drop login users "
            "(use the RDS master user, or ALTER ROLE ... CREATEROLE)"
        )
    if not createdb:
        raise DatabaseError(
            f"{admin} lacks CREATEDB; PostgreSQL requires it to change a database's owner "
            "(use the RDS master user, or ALTER ROLE ... CREATEDB)"
        )


# -- conversion to an owner role --------------------------------------------------------


def _owned_here(conn: Connection, role: str) -> list[tuple[str, int]]:
    """(database name or '', count) of what `role` owns in this database and of shared
    objects it owns; default ACLs are left out because REASSIGN OWNED ignores them."""
    query = """
        SELECT CASE WHEN s.classid = 'pg_database'::regclass
                    THEN (SELECT datname FROM pg_database WHERE oid = s.objid)::text
                    ELSE '' END AS db,
               count(*)
        FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid
        WHERE r.rolname = %s AND s.deptype = 'o'
          AND s.dbid IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
          AND s.classid <> 'pg_default_acl'::regclass
        GROUP BY 1 ORDER BY 1
    """
    return [(str(db), int(n)) for db, n in _rows(conn, query, (role,))]


def _owner_role_problem(conn: Connection, owner_role: str, app_user: str) -> str | None:
    """Why an existing `owner_role` is not one Rotor may take over, or None.

    Rotor's members are the app's original user (named like the app), its dated users
    `{app}-user-*`, the current app user and the admin.
    """
    can_login, superuser = _rows(
        conn, "SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = %s", (owner_role,)
    )[0]
    if can_login or superuser:
        what = "can log in" if can_login else "is a superuser"
        return (
            f"owner role {owner_role} already exists and {what}, so it is not an owner role; "
            "check who uses it, then rename it or make it NOLOGIN"
        )
    app = owner_role.removesuffix("-owner-role") if owner_role.endswith("-owner-role") else None
    admin = _current_user(conn)
    foreign = sorted(
        m
        for m in _members(conn, owner_role)
        if m not in (app_user, admin, app) and not (app and m.startswith(f"{app}-user-"))
    )
    if foreign:
        return (
            f"owner role {owner_role} already has members Rotor does not manage "
            f"({', '.join(foreign)}); revoke them or choose another owner role"
        )
    if _value(conn, "SELECT pg_has_role(%s::name, %s::name, 'MEMBER')", (owner_role, app_user)):
        return (
            f"owner role {owner_role} is a member of {app_user}; granting it to {app_user} "
            "would make a membership loop"
        )
    return None


def convert_to_owner_role(conn: Connection, app_user: str, owner_role: str) -> list[str]:
    """Runbook "Make sure Database and Object owners are set to an owner role".

    Creates the NOLOGIN owner role, gives it the database (when the app user owns it) and
    everything the app user owns here, and grants it to the app user. All in one
    transaction: on any error nothing has changed. Returns what changed ([] if nothing).
    """
    step = "convert_to_owner_role"
    app_ident, owner_ident = _role(app_user), _role(owner_role)
    if app_user == owner_role:
        raise StepFailed(f"{step}: the owner role must differ from the app user {app_user}")
    if not role_exists(conn, app_user):
        raise StepFailed(f"{step}: app user {app_user} does not exist on this server")
    with _errors(step):
        if app_user == _current_user(conn):
            raise StepFailed(f"{step}: {app_user} is the admin itself, not an app user")
        if role_exists(conn, owner_role):
            problem = _owner_role_problem(conn, owner_role, app_user)
            if problem:
                raise StepFailed(f"{step}: {problem}")
        changes: list[str] = []
        with conn.transaction():
            if not role_exists(conn, owner_role):
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(owner_ident))
                changes.append(f"created role {owner_role} (NOLOGIN)")
            changes += _make_admin_act_for(conn, app_user)
            changes += _make_admin_act_for(conn, owner_role)
            database, db_owner = _rows(
                conn,
                "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                "WHERE datname = current_database()",
            )[0]
            if db_owner == app_user:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                        sql.Identifier(database), owner_ident
                    )
                )
                changes.append(f"database {database} now owned by {owner_role}")
            elif db_owner != owner_role:
                log.info(
                    "%s: database %s is owned by %s, not %s; leaving it",
                    step,
                    database,
                    db_owner,
                    app_user,
                )
            owned = _owned_here(conn, app_user)
            if owned:
                conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(app_ident, owner_ident))
                count = sum(n for db, n in owned if not db)
                others = [db for db, _ in owned if db and db != database]
                if count:
                    changes.append(f"reassigned {count} objects from {app_user} to {owner_role}")
                if others:
                    changes.append(
                        f"other databases now owned by {owner_role}: {', '.join(others)}"
                    )
            if owner_role not in memberships(conn, app_user):
                conn.execute(sql.SQL("GRANT {} TO {}").format(owner_ident, app_ident))
                changes.append(f"granted {owner_role} to {app_user}")
    for change in changes:
        log.info("%s: %s", step, change)
    return changes


# -- new users --------------------------------------------------------------------------


def _scram_verifier(conn: Connection, user: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier libpq computes client-side (PQencryptPasswordConn, with
    SASLprep), so the plain password never reaches the server or its logs."""
    verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256")
    text = verifier.decode()
    register(text)
    return text


def create_login_user(conn: Connection, name: str, password: str, owner_role: str) -> None:
    """Runbook "Create new user for Postgres database" and its GRANT of the owner role.

    A retry after a crash finds the role and sets its password again.
    """
    step = "create_login_user"
    register(password)
    ident, owner_ident = _role(name), _role(owner_role)
    if not role_exists(conn, owner_role):
        raise StepFailed(
            f"{step}: owner role {owner_role} does not exist; convert the database first"
        )
    with _errors(step, secret=True):
        verifier = sql.Literal(_scram_verifier(conn, name, password))
        if role_exists(conn, name):
            superuser = _value(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (name,))
            foreign = memberships(conn, name) - {owner_role}
            if superuser or foreign:
                raise StepFailed(
                    f"{step}: role {name} already exists and is not one Rotor made "
                    f"(memberships: {', '.join(sorted(foreign)) or 'superuser'}); "
                    "pick another name"
                )
            conn.execute(
                sql.SQL("ALTER ROLE {} WITH LOGIN INHERIT PASSWORD {}").format(ident, verifier)
            )
            log.info("%s: %s existed; password set again", step, name)
        else:
            conn.execute(
                sql.SQL("CREATE ROLE {} WITH LOGIN INHERIT PASSWORD {}").format(ident, verifier)
            )
            log.info("%s: created login role %s", step, name)
        if owner_role not in memberships(conn, name):
            conn.execute(sql.SQL("GRANT {} TO {}").format(owner_ident, ident))
            log.info("%s: granted %s to %s", step, owner_role, name)


# -- connections ------------------------------------------------------------------------


def connections(conn: Connection) -> list[tuple[str, str, int]]:
    """Runbook "Check lingering connections": (user, application_name, count), all databases.

    Without a role's privileges the admin sees its sessions' user and application name
    but not their backend_type, so background workers are left out by their NULL user.
    """
    query = """
        SELECT usename::text, coalesce(application_name, ''), count(*)::int
        FROM pg_stat_activity
        WHERE usename IS NOT NULL AND pid <> pg_backend_pid()
          AND (leader_pid IS NULL OR leader_pid = pid)
        GROUP BY 1, 2 ORDER BY 1, 2
    """
    with _errors("connections"):
        return [(str(u), str(a), int(n)) for u, a, n in _rows(conn, query)]


_TERMINATE_QUERY = """
    SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))
    FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()
      AND (%s::int[] IS NULL OR pid = ANY(%s::int[]))
"""


def session_pids(conn: Connection, user: str) -> list[int]:
    """Backend pids of `user`'s sessions (all databases), never the caller's own."""
    query = """
        SELECT pid FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()
          AND (leader_pid IS NULL OR leader_pid = pid) ORDER BY pid
    """
    with _errors("session_pids"):
        return [int(row[0]) for row in _rows(conn, query, (user,))]


def terminate_connections(conn: Connection, user: str, pids: Sequence[int] | None = None) -> int:
    """Runbook "Force-kill connections for a user": returns how many backends ended.

    With `pids`, only those, and only while they still belong to `user` (one statement
    checks and terminates)."""
    step = "terminate_connections"
    validate_role_name(user)
    if not role_exists(conn, user):
        return 0
    with _errors(step):
        if user == _current_user(conn):
            raise StepFailed(
                f"{step}: refusing to terminate the sessions of {user}, the admin itself"
            )
        # pg_terminate_backend needs the user's privileges or pg_signal_backend.
        if not _value(conn, "SELECT pg_has_role(current_user, 'pg_signal_backend', 'USAGE')"):
            for change in _make_admin_act_for(conn, user):
                log.info("%s: %s", step, change)
        only = None if pids is None else [int(p) for p in pids]
        ended = int(_value(conn, _TERMINATE_QUERY, (user, only, only)))
    if ended:
        log.info("%s: ended %s sessions of %s", step, ended, user)
    return ended


# -- retiring the old user --------------------------------------------------------------


def _elsewhere(conn: Connection, role: str) -> list[str]:
    """What `role` owns or holds in other databases, which REASSIGN/DROP OWNED here cannot
    reach (or, for databases it owns, would move without being asked)."""
    query = """
        WITH here AS (SELECT oid FROM pg_database WHERE datname = current_database())
        SELECT CASE
                 WHEN s.dbid <> 0 THEN 'has objects or privileges in database '
                      || coalesce((SELECT datname FROM pg_database WHERE oid = s.dbid)::text, '?')
                 WHEN s.classid = 'pg_database'::regclass THEN
                      CASE s.deptype WHEN 'o' THEN 'owns database ' ELSE 'has privileges on database ' END
                      || coalesce((SELECT datname FROM pg_database WHERE oid = s.objid)::text, '?')
                 ELSE 'owns or has privileges on '
                      || pg_describe_object(s.classid, s.objid, s.objsubid) END
        FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid
        WHERE r.rolname = %s
          AND ((s.dbid <> 0 AND s.dbid <> (SELECT oid FROM here))
               OR (s.dbid = 0 AND s.classid = 'pg_database'::regclass
                   AND s.objid <> (SELECT oid FROM here))
               OR (s.dbid = 0 AND s.classid = 'pg_tablespace'::regclass))
        GROUP BY 1 ORDER BY 1
    """
    return [row[0] for row in _rows(conn, query, (role,))]


def _user_connections(conn: Connection, user: str) -> list[tuple[str, int]]:
    return [(app, n) for u, app, n in connections(conn) if u == user]


def retire_user(
    conn: Connection,
    old_user: str,
    owner_role: str,
    *,
    database: str,
    before_drop: Callable[[Connection], None] | None = None,
) -> list[str]:
    """Runbook "Retiring old credentials": REASSIGN OWNED, DROP OWNED, DROP USER.

    `conn` must be the admin's connection to `database`. Refuses, changing nothing, when the
    old user has connections, owns or holds anything in another database, or is the last
    login role of the owner role. `before_drop` runs after REASSIGN OWNED, right before DROP
    OWNED, in the same transaction: it raises to refuse (nothing changes then). Returns what
    changed ([] when the user is already gone).
    """
    step = "retire_user"
    old_ident, owner_ident = _role(old_user), _role(owner_role)
    with _errors(step):
        current = str(_value(conn, "SELECT current_database()"))
        if current != database:
            raise StepFailed(
                f"{step}: connected to database {current}, asked to retire {old_user} "
                f"in {database}; connect to {database}"
            )
        if not role_exists(conn, old_user):
            return []
        admin = _current_user(conn)
        if old_user in (owner_role, admin):
            raise StepFailed(
                f"{step}: refusing to retire {old_user}: it is the owner role or the admin"
            )
        if not role_exists(conn, owner_role):
            raise StepFailed(
                f"{step}: owner role {owner_role} does not exist; convert the database first"
            )
        elsewhere = _elsewhere(conn, old_user)
        if elsewhere:
            raise StepFailed(
                f"{step}: {old_user} {'; '.join(elsewhere)}; REASSIGN/DROP OWNED act only on the "
                "current database, so run them in those databases by hand first, then retry"
            )
        others = [
            m
            for m in _members(conn, owner_role)
            if m not in (old_user, admin)
            and _value(conn, "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (m,))
        ]
        if not others:
            raise StepFailed(
                f"{step}: {old_user} is the last login role in {owner_role}; "
                "create and roll out a new user first"
            )
        _refuse_if_connected(conn, step, old_user)
        owned_here = _owned_here(conn, old_user)
        owned = sum(n for db, n in owned_here if not db)
        owned_db = any(db == database for db, _ in owned_here)
        changes: list[str] = []
        with conn.transaction():
            _make_admin_act_for(conn, old_user)  # gone again with the role below
            changes += _make_admin_act_for(conn, owner_role)
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(old_ident, owner_ident))
            if owned_db:
                changes.append(f"database {database} now owned by {owner_role}")
            if owned:
                changes.append(f"reassigned {owned} objects from {old_user} to {owner_role}")
            if before_drop is not None:
                before_drop(conn)
            conn.execute(sql.SQL("DROP OWNED BY {}").format(old_ident))
            # A session may have started since the check; dropping under it would leave a
            # user-less session behind, so check again at the last moment.
            _refuse_if_connected(conn, step, old_user)
            conn.execute(sql.SQL("DROP ROLE {}").format(old_ident))
            changes.append(f"dropped role {old_user}")
    for change in changes:
        log.info("%s: %s", step, change)
    return changes


def _refuse_if_connected(conn: Connection, step: str, user: str) -> None:
    sessions = _user_connections(conn, user)
    if sessions:
        total = sum(n for _, n in sessions)
        apps = ", ".join(sorted({app or "no application_name" for app, _ in sessions}))
        raise StepFailed(
            f"{step}: {user} still has {total} connections ({apps}); wait for them "
            "to end or terminate them, then retry"
        )
