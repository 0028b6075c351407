"""MySQL / MariaDB operations of the RDS application-credentials runbook.

Pure functions over a pymysql connection: no engine, no AWS, no Slack. They work on MySQL 8
(what RDS runs) and MariaDB 10.11 (what the tests run against), and every function that changes
something first checks whether its work is already done, so a retry after a crash converges.

Safety rules kept throughout:
- account names, hosts and passwords go to the server only as pymysql `%s` parameters;
- schema names are validated strictly and backtick-quoted by `quote_identifier`;
- SQL text the server itself printed (SHOW GRANTS, SHOW CREATE ...) is re-executed only after
  re-rendering it (grants) or replacing its DEFINER clause (objects);
- passwords are registered with `rotation.redact` and never appear in a message: database
  errors are re-raised as `DatabaseError` with redacted text and without the pymysql cause,
  whose message may quote the statement.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import re
import secrets
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, cast

import pymysql
from pymysql.charset import charset_by_name
from pymysql.connections import Connection

from rotation import fence, timeouts
from rotation.errors import (
    ConfigError,
    DatabaseError,
    DatabaseUnreachable,
    InvalidIdentifier,
    UnknownName,
)
from rotation.facts import body_digest
from rotation.mysql_grants import (  # noqa: F401 - names callers reach through this module
    GRANTEE,
    Grant,
    mask_identified,
    normalize_grants,
    parse_grants,
    quote_identifier,
    quote_server_name,
    render_account,
    validate_account_name,
    validate_host,
)
from rotation.redact import redact, register

log = logging.getLogger(__name__)

TlsMode = Literal["disabled", "required", "verify"]
Flavor = Literal["mysql", "mariadb"]
ObjectKind = Literal["FUNCTION", "PROCEDURE", "TRIGGER", "VIEW", "EVENT"]


_ACCESS_DENIED = {1044, 1045, 1227, 1698}
_UNKNOWN_THREAD = 1094
_MYSQL_PLUGINS = {"mysql_native_password", "caching_sha2_password", "sha256_password"}


# --- errors -----------------------------------------------------------------------------------


class LoginRefused(DatabaseError):
    """The server refused the login (wrong password, unknown user, no access to the database)."""


def _code(exc: pymysql.err.MySQLError) -> int | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else None


def _message(exc: pymysql.err.MySQLError) -> str:
    return str(exc.args[-1]) if exc.args else type(exc).__name__


def _fail(what: str, exc: pymysql.err.MySQLError) -> NoReturn:
    # `from None`: the pymysql error may quote the statement, and with it a password.
    code = _code(exc)
    detail = f"({code}) {_message(exc)}" if code is not None else _message(exc)
    raise DatabaseError(redact(f"{what}: {detail}")) from None


def _run(conn: Connection, sql: str, args: Sequence[Any] | None = None, *, what: str) -> Any:
    """Execute one statement and return all rows; a failure becomes a redacted DatabaseError."""
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    except pymysql.err.MySQLError as exc:
        _fail(what, exc)


def _text(value: object) -> str:
    """A mysql.user BLOB column (ssl_cipher, x509_*) arrives as bytes on MySQL 8."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


# --- connecting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to log in. The password is registered for redaction on creation."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str | None = None
    tls: TlsMode = "required"
    ca_file: str | None = None

    def __post_init__(self) -> None:
        register(self.password)
        if self.tls not in ("disabled", "required", "verify"):
            raise ConfigError(f"TLS mode {self.tls!r} is not one of disabled, required, verify")

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@functools.lru_cache(maxsize=16)
def _tls_context(mode: TlsMode, ca_file: str | None) -> ssl.SSLContext:
    """One TLS context per (mode, CA file): building one loads CA certificates, tens of ms.

    "required" encrypts without checking the certificate (MySQL's REQUIRED; with a CA file,
    the chain is checked but not the host name, like VERIFY_CA); "verify" checks both.
    """
    if mode == "verify":
        context = ssl.create_default_context(cafile=ca_file)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        if ca_file:
            context.load_verify_locations(cafile=ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        else:
            context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class FencedConnection(Connection):
    """A pymysql connection that checks the worker's lease before a statement that changes
    something (every statement, however it is sent, goes through `query`)."""

    def query(self, sql: str | bytes, unbuffered: bool = False) -> int:
        fence.guard_sql(sql)
        return int(super().query(sql, unbuffered))

    def connect(self, sock: Any = None) -> None:
        """The whole login (TCP, the server's greeting, authentication, the session's
        settings) within connect_timeout: pymysql reads the greeting on read_timeout, so a
        host that accepts and never greets held a worker for the statement bound."""
        read, write = self._read_timeout, self._write_timeout  # type: ignore[has-type]
        self._read_timeout = self._write_timeout = self.connect_timeout
        try:
            super().connect(sock)
        finally:
            self._read_timeout, self._write_timeout = read, write


def connect(ep: Endpoint, *, timeout: float | None = None) -> Connection:
    """Log in to `ep` with autocommit on and TLS settled explicitly (never "preferred").

    Every socket operation is bounded: connect_timeout the whole login (FencedConnection),
    the read and write timeouts every statement after it."""
    bounds = timeouts.BOUNDS
    tls: dict[str, Any]
    if ep.tls == "disabled":
        tls = {"ssl_disabled": True}
    else:
        tls = {"ssl": _tls_context(ep.tls, ep.ca_file)}
    try:
        return FencedConnection(
            host=ep.host,
            port=ep.port,
            user=ep.user,
            password=ep.password,
            database=ep.database,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=timeout or bounds.db_connect,
            read_timeout=bounds.db_read,
            write_timeout=bounds.db_write,
            **tls,
        )
    except pymysql.err.MySQLError as exc:
        if _code(exc) in _ACCESS_DENIED:
            raise LoginRefused(redact(f"login as {ep} refused: {_message(exc)}")) from None
        if _code(exc) in (2003, 2005):  # no answer from the host, or no such host
            raise DatabaseUnreachable(redact(f"{ep.host}:{ep.port} does not answer: "
                                             f"({_code(exc)}) {_message(exc)}")) from None
        _fail(f"cannot connect to {ep.host}:{ep.port} as {ep.user}", exc)
    except (OSError, ValueError) as exc:  # TLS handshake or certificate failure
        raise DatabaseError(
            redact(f"cannot connect to {ep.host}:{ep.port} as {ep.user}: {exc}")
        ) from None


def can_login(ep: Endpoint) -> bool:
    """True if `ep` can log in, False if the server refuses it; other failures raise."""
    try:
        conn = connect(ep)
    except LoginRefused:
        return False
    conn.close()
    return True


def test_login(ep: Endpoint, schema: str) -> str:
    """Runbook "test the new user": log in to `schema` and read from it; returns a summary."""
    quote_identifier(schema)
    conn = connect(dataclasses.replace(ep, database=schema))
    try:
        rows = _run(
            conn,
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s"
            " AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
            (schema,),
            what=f"listing tables of `{schema}` as {ep}",
        )
        summary = f"{ep} logged in to `{schema}`: {len(rows)} tables"
        if rows:
            table = rows[0][0]
            _run(
                conn,
                f"SELECT 1 FROM {quote_identifier(schema)}.{quote_server_name(table)} LIMIT 1",  # noqa: S608
                what=f"reading `{schema}`.`{table}` as {ep}",
            )
            summary += f", read `{table}`"
        return summary
    finally:
        conn.close()


# --- the server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerInfo:
    """What Rotor needs to know about the server it talks to."""

    flavor: Flavor
    version: str
    max_user_length: int
    has_rds_kill: bool


def _flavor(conn: Connection) -> Flavor:
    # From the handshake (MariaDB reports "5.5.5-10.11.x-MariaDB"): no round trip.
    return "mariadb" if "mariadb" in str(conn.get_server_info()).lower() else "mysql"


def server_info(conn: Connection) -> ServerInfo:
    """Flavor, version, the longest user name it accepts, and whether mysql.rds_kill exists."""
    version = _run(conn, "SELECT VERSION()", what="reading the server version")[0][0]
    length = _run(
        conn,
        "SELECT CHARACTER_MAXIMUM_LENGTH FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = 'mysql' AND TABLE_NAME = 'user' AND COLUMN_NAME = 'User'",
        what="reading the user-name length limit",
    )
    rds_kill = _run(
        conn,
        "SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = 'mysql'"
        " AND ROUTINE_NAME = 'rds_kill' AND ROUTINE_TYPE = 'PROCEDURE'",
        what="looking for mysql.rds_kill",
    )
    return ServerInfo(
        flavor=_flavor(conn),
        version=str(version),
        max_user_length=int(length[0][0]) if length and length[0][0] else 32,
        has_rds_kill=bool(rds_kill[0][0]),
    )


def _current_user(conn: Connection) -> str:
    """The connected account as information_schema writes definers: `admin@%`."""
    return str(_run(conn, "SELECT CURRENT_USER()", what="reading CURRENT_USER()")[0][0])


# --- accounts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """An account's authentication settings (never its password or hash).

    `tls` is mysql.user.ssl_type: "" (none), "ANY" (REQUIRE SSL), "X509" or "SPECIFIED" (then
    the cipher / issuer / subject fields say what). `locked` and `password_expired` are None
    when the server does not say.
    """

    user: str
    host: str
    plugin: str
    tls: str = ""
    tls_cipher: str = ""
    tls_issuer: str = ""
    tls_subject: str = ""
    locked: bool | None = None
    password_expired: bool | None = None
    max_queries_per_hour: int = 0
    max_updates_per_hour: int = 0
    max_connections_per_hour: int = 0
    max_user_connections: int = 0


def user_hosts(conn: Connection, user: str) -> list[str]:
    """Every host `user` is defined on (MariaDB roles excluded)."""
    validate_account_name(user)
    sql = "SELECT Host FROM mysql.user WHERE User = %s"
    if _flavor(conn) == "mariadb":
        sql += " AND is_role = 'N'"
    rows = _run(conn, sql + " ORDER BY Host", (user,), what=f"listing hosts of {user}")
    return [str(row[0]) for row in rows]


def _exists(conn: Connection, user: str, host: str | None = None) -> bool:
    if host is None:
        rows = _run(conn, "SELECT 1 FROM mysql.user WHERE User = %s", (user,), what="mysql.user")
    else:
        rows = _run(
            conn,
            "SELECT 1 FROM mysql.user WHERE User = %s AND Host = %s",
            (user, host),
            what="mysql.user",
        )
    return bool(rows)


def account(conn: Connection, user: str, host: str) -> Account:
    """The account's plugin, TLS requirement, lock/expiry state and resource limits."""
    validate_account_name(user)
    validate_host(host)
    mariadb = _flavor(conn) == "mariadb"
    locked_column = "NULL" if mariadb else "account_locked"
    rows = _run(
        conn,
        f"SELECT plugin, ssl_type, ssl_cipher, x509_issuer, x509_subject, {locked_column},"  # noqa: S608
        " password_expired, max_questions, max_updates, max_connections, max_user_connections"
        " FROM mysql.user WHERE User = %s AND Host = %s",
        (user, host),
        what=f"reading account {user}@{host}",
    )
    if not rows:
        raise UnknownName(f"there is no MySQL account {user}@{host}")
    plugin, ssl_type, cipher, issuer, subject, locked, expired, mq, mu, mc, muc = rows[0]
    locked_flag: bool | None = None if locked is None else _text(locked) == "Y"
    if mariadb:
        locked_flag = _mariadb_locked(conn, user, host)
    return Account(
        user=user,
        host=host,
        plugin=_text(plugin),
        tls=_text(ssl_type),
        tls_cipher=_text(cipher),
        tls_issuer=_text(issuer),
        tls_subject=_text(subject),
        locked=locked_flag,
        password_expired=None if expired is None else _text(expired) == "Y",
        max_queries_per_hour=int(mq or 0),
        max_updates_per_hour=int(mu or 0),
        max_connections_per_hour=int(mc or 0),
        max_user_connections=int(muc or 0),
    )


def _mariadb_locked(conn: Connection, user: str, host: str) -> bool | None:
    # MariaDB keeps ACCOUNT LOCK in mysql.global_priv's JSON, not in the mysql.user view.
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT JSON_VALUE(Priv, '$.account_locked') FROM mysql.global_priv"
                " WHERE User = %s AND Host = %s",
                (user, host),
            )
            row = cur.fetchone()
    except pymysql.err.MySQLError:
        return None
    return row is not None and _text(row[0]).lower() in ("1", "true")


def _identified_by(flavor: Flavor, plugin: str) -> str:
    if flavor == "mysql":
        if plugin not in _MYSQL_PLUGINS:
            raise DatabaseError(
                f"cannot give a new account the {plugin!r} login plugin; Rotor copies only "
                "password plugins (mysql_native_password, caching_sha2_password)"
            )
        return f"IDENTIFIED WITH {plugin} BY %s"
    if plugin in ("", "mysql_native_password"):
        return "IDENTIFIED BY %s"
    if plugin == "ed25519":
        return "IDENTIFIED VIA ed25519 USING PASSWORD(%s)"
    raise DatabaseError(
        f"cannot give a new account the {plugin!r} login plugin; Rotor copies only "
        "mysql_native_password and ed25519"
    )


def _require(like: Account) -> tuple[str, list[str]]:
    if like.tls == "ANY":
        return "REQUIRE SSL", []
    if like.tls == "X509":
        return "REQUIRE X509", []
    if like.tls == "SPECIFIED":
        parts = [
            (keyword, value)
            for keyword, value in (
                ("CIPHER", like.tls_cipher),
                ("ISSUER", like.tls_issuer),
                ("SUBJECT", like.tls_subject),
            )
            if value
        ]
        if parts:
            return "REQUIRE " + " AND ".join(f"{k} %s" for k, _ in parts), [v for _, v in parts]
        return "REQUIRE SSL", []
    return "REQUIRE NONE", []


def _limits(like: Account) -> str:
    # All four, zeros included (no limit), so an ALTER USER on a retry converges too.
    limits = [
        ("MAX_QUERIES_PER_HOUR", like.max_queries_per_hour),
        ("MAX_UPDATES_PER_HOUR", like.max_updates_per_hour),
        ("MAX_CONNECTIONS_PER_HOUR", like.max_connections_per_hour),
        ("MAX_USER_CONNECTIONS", like.max_user_connections),
    ]
    return " ".join(f"{name} {int(value)}" for name, value in limits)


def create_user(
    conn: Connection, user: str, hosts: Sequence[str], password: str, *, like: Account
) -> None:
    """Runbook "Create new user": `user` on every host, with `like`'s plugin, TLS and limits.

    An account that already exists (a retry after a crash) gets ALTER USER with the same
    password and TLS requirement instead, so the result is the same either way.
    """
    register(password)
    validate_account_name(user)
    for host in hosts:
        validate_host(host)
    flavor = _flavor(conn)
    identified = _identified_by(flavor, like.plugin)
    require, require_args = _require(like)
    tail = f"{identified} {require} WITH {_limits(like)}"
    for host in hosts:
        verb = "ALTER" if _exists(conn, user, host) else "CREATE"
        _run(
            conn,
            f"{verb} USER %s@%s {tail}",
            (user, host, password, *require_args),
            what=f"{verb} USER {user}@{host}",
        )
        log.info("create_user: %s USER %s@%s (%s)", verb, user, host, require)


def new_user_name(conn: Connection, base: str, max_len: int) -> str:
    """The first free name of `base`, `base_2`, `base_3`... (base like `signon_user_20260121`).

    The caller should record the name before creating the user: after a crash, the same base
    would otherwise come back with the next suffix.
    """
    validate_account_name(base)
    for n in itertools.count(1):
        name = base if n == 1 else f"{base}_{n}"
        if len(name) > max_len:
            raise InvalidIdentifier(
                f"user name {name!r} is {len(name)} characters but this server allows at most "
                f"{max_len}; use a shorter app name"
            )
        if not _exists(conn, name):
            return name
    raise AssertionError("unreachable")


def users_made(conn: Connection, prefix: str) -> list[str]:
    """The users named as a rotation names them (`prefix` + YYYYMMDD, then `_2`, `_3`...;
    `prefix` like `signon_user_`) that exist now."""
    validate_account_name(prefix)
    pattern = re.compile(re.escape(prefix) + r"[0-9]{8}(_[0-9]+)?")
    sql = "SELECT DISTINCT User FROM mysql.user WHERE User LIKE %s"
    if _flavor(conn) == "mariadb":
        sql += " AND is_role = 'N'"
    like = prefix.replace("_", "\\_") + "%"  # validated: no other LIKE wildcard in it
    rows = _run(conn, sql, (like,), what=f"listing users named {prefix}…")
    return sorted(str(row[0]) for row in rows if pattern.fullmatch(str(row[0])))


def drop_user(conn: Connection, user: str, hosts: Sequence[str]) -> None:
    """Runbook "Delete the old users": DROP USER IF EXISTS on every host.

    Refuses while `user` still defines objects in any schema: MariaDB would drop it anyway
    and leave them failing ("the user specified as a definer does not exist").
    """
    validate_account_name(user)
    for host in hosts:
        validate_host(host)
    if _current_user(conn).split("@", 1)[0] == user:
        raise DatabaseError(f"refusing to drop {user}: it is the account Rotor is logged in as")
    defined = _definer_objects(conn, user, schema=None)
    if defined:
        names = ", ".join(f"{o.kind} {o.schema}.{o.name}" for o in defined[:5])
        more = f" and {len(defined) - 5} more" if len(defined) > 5 else ""
        raise DatabaseError(
            f"refusing to drop {user}: it still defines {names}{more}; re-define them first"
        )
    for host in hosts:
        if _exists(conn, user, host):
            _run(conn, "DROP USER IF EXISTS %s@%s", (user, host), what=f"DROP USER {user}@{host}")
            log.info("drop_user: dropped %s@%s", user, host)


def show_grants(conn: Connection, user: str, host: str) -> list[str]:
    """SHOW GRANTS FOR user@host, with MariaDB's password hash masked."""
    validate_account_name(user)
    validate_host(host)
    rows = _run(conn, "SHOW GRANTS FOR %s@%s", (user, host), what=f"SHOW GRANTS FOR {user}@{host}")
    return [mask_identified(str(row[0])) for row in rows]


def _grant_lines(conn: Connection, user: str, host: str) -> list[str]:
    """SHOW GRANTS, plus on MySQL 8 the default roles it leaves out (MariaDB prints them)."""
    lines = show_grants(conn, user, host)
    if _flavor(conn) == "mysql":
        rows = _run(
            conn,
            "SELECT DEFAULT_ROLE_USER, DEFAULT_ROLE_HOST FROM mysql.default_roles"
            " WHERE USER = %s AND HOST = %s",
            (user, host),
            what=f"reading default roles of {user}@{host}",
        )
        if rows:
            roles = ", ".join(render_account(_text(u), _text(h)) for u, h in rows)
            lines.append(f"SET DEFAULT ROLE {roles} TO {render_account(user, host)}")
    return lines


def _grants(conn: Connection, user: str, host: str) -> list[Grant]:
    return parse_grants(_grant_lines(conn, user, host), user, host)


def grants_match(
    conn: Connection, old_user: str, new_user: str, host: str
) -> tuple[bool, set[str], set[str]]:
    """(equal, missing in new, extra in new), comparing normalized grants."""
    old = {g.canonical for g in _grants(conn, old_user, host)}
    new = {g.canonical for g in _grants(conn, new_user, host)}
    return old == new, old - new, new - old


def _role_admin_error(role: tuple[str, str | None], new: str, admin: str) -> DatabaseError:
    name = render_account(*role)
    admin_user, _, admin_host = admin.partition("@")
    grantee = render_account(admin_user, admin_host)
    return DatabaseError(
        f"cannot grant role {name} to {new}: {admin} does not hold it WITH ADMIN OPTION"
        " (MariaDB demands that even of root; MySQL 8 also accepts ROLE_ADMIN); have an"
        f" account that holds it with admin option run GRANT {name} TO {grantee} WITH ADMIN"
        " OPTION, then retry"
    )


def copy_grants(conn: Connection, old_user: str, new_user: str, host: str) -> list[str]:
    """Runbook "Grant the new user the same rights as the old user", for one host.

    Applies every grant old@host has that new@host lacks: global, database, table, column and
    routine privileges, WITH GRANT OPTION, role memberships and then the default role. Returns
    what it granted, e.g. "GRANT SELECT ON `app`.* TO `app_user_20260121`@`%`".
    """
    validate_account_name(new_user)
    have = {g.canonical for g in _grants(conn, new_user, host)}
    todo = [g for g in _grants(conn, old_user, host) if g.canonical not in have]
    order = {"privilege": 0, "revoke": 0, "role": 1, "default_role": 2}
    todo.sort(key=lambda g: order[g.kind])  # stable: keeps SHOW GRANTS order within a kind
    new = f"{new_user}@{host}"
    roles = [g.role for g in todo if g.role is not None]
    admin = _current_user(conn) if roles else ""
    if roles and _flavor(conn) == "mariadb":
        # Check before changing anything: only a holder WITH ADMIN OPTION may grant a role.
        rows = _run(
            conn,
            "SELECT ROLE_NAME FROM information_schema.APPLICABLE_ROLES WHERE IS_GRANTABLE = 'YES'",
            what="reading roles the admin can grant",
        )
        grantable = {str(row[0]) for row in rows}
        for role in roles:
            if role[0] not in grantable:
                raise _role_admin_error(role, new, admin)
    done = []
    for grant in todo:
        description = grant.describe(new_user, host)
        try:
            with conn.cursor() as cur:
                cur.execute(grant.statement(), (new_user, host))
        except pymysql.err.MySQLError as exc:
            if grant.role is not None and _code(exc) in _ACCESS_DENIED:
                raise _role_admin_error(grant.role, new, admin) from None
            _fail(f"{description} failed", exc)
        log.info("copy_grants: %s", description)
        done.append(description)
    return done


# --- objects with a definer -------------------------------------------------------------------


@dataclass(frozen=True)
class DefinedObject:
    """A stored routine, trigger, view or event and the account it runs as (`user@host`)."""

    kind: ObjectKind
    schema: str
    name: str
    definer: str


_DEFINER_SOURCES: list[tuple[str, str, str, str, str]] = [
    # (kind or column holding it, schema column, name column, table, extra condition)
    ("ROUTINE_TYPE", "ROUTINE_SCHEMA", "ROUTINE_NAME", "ROUTINES",
     " AND ROUTINE_TYPE IN ('FUNCTION', 'PROCEDURE')"),
    ("'TRIGGER'", "TRIGGER_SCHEMA", "TRIGGER_NAME", "TRIGGERS", ""),
    ("'VIEW'", "TABLE_SCHEMA", "TABLE_NAME", "VIEWS", ""),
    ("'EVENT'", "EVENT_SCHEMA", "EVENT_NAME", "EVENTS", ""),
]  # fmt: skip


def definer_objects(conn: Connection, schema: str, user: str) -> list[DefinedObject]:
    """Runbook "Check for other MySQL objects": what in `schema` runs as `user` on any host."""
    quote_identifier(schema)
    validate_account_name(user)
    return _definer_objects(conn, user, schema)


def _definer_objects(conn: Connection, user: str, schema: str | None) -> list[DefinedObject]:
    found = []
    for kind, schema_col, name_col, table, extra in _DEFINER_SOURCES:
        where = f"SUBSTRING_INDEX(DEFINER, '@', 1) = %s{extra}"
        args: tuple[str, ...] = (user,)
        if schema is not None:
            where, args = f"{schema_col} = %s AND {where}", (schema, user)
        rows = _run(
            conn,
            f"SELECT {kind}, {schema_col}, {name_col}, DEFINER FROM information_schema.{table}"  # noqa: S608
            f" WHERE {where}",
            args,
            what=f"listing {table.lower()} defined by {user}",
        )
        for kind_value, obj_schema, name, definer in rows:
            # information_schema may compare case-insensitively; user names are not.
            if str(definer).split("@", 1)[0] == user:
                kind_name = cast(ObjectKind, str(kind_value))
                found.append(DefinedObject(kind_name, str(obj_schema), str(name), str(definer)))
    return sorted(found, key=lambda o: (o.kind, o.schema, o.name))


@dataclass(frozen=True)
class ObjectDetail:
    """What an approval to re-define an object must show: whose rights it runs with, and
    what its body is (SHOW CREATE without the DEFINER clause) with a digest of it."""

    obj: DefinedObject
    security: str  # "DEFINER" or "INVOKER"; triggers and events always run as their definer
    body: str
    digest: str

    @property
    def key(self) -> str:
        return f"{self.obj.kind} {self.obj.schema}.{self.obj.name}"

    @property
    def runs_as_definer(self) -> bool:
        return self.security == "DEFINER"

    @property
    def seen(self) -> dict[str, str]:
        return {"object": self.key, "security": self.security, "body": self.digest}


def object_details(conn: Connection, objects: Sequence[DefinedObject]) -> list[ObjectDetail]:
    """Each object's SQL SECURITY and body digest, read now."""
    details = []
    for obj in objects:
        security = "DEFINER"
        if obj.kind in ("FUNCTION", "PROCEDURE", "VIEW"):
            table, schema_col, name_col = (
                ("VIEWS", "TABLE_SCHEMA", "TABLE_NAME") if obj.kind == "VIEW"
                else ("ROUTINES", "ROUTINE_SCHEMA", "ROUTINE_NAME"))
            rows = _run(
                conn,
                f"SELECT SECURITY_TYPE FROM information_schema.{table}"  # noqa: S608
                f" WHERE {schema_col} = %s AND {name_col} = %s",
                (obj.schema, obj.name),
                what=f"reading the SQL SECURITY of {_describe(obj)}",
            )
            security = _text(rows[0][0]).upper() if rows else "DEFINER"
        body = _show_create(conn, obj).rest
        details.append(ObjectDetail(obj, security, body, body_digest(body)))
    return details


# Names as SHOW CREATE prints them: backticks, or double quotes under ANSI_QUOTES.
_ID = r'(?:`(?:[^`]|``)*`|"(?:[^"]|"")*"|[A-Za-z0-9_$]+)'
_ACCOUNT_PART = rf"(?:{_ID}|'(?:[^'\\]|\\.|'')*'|[A-Za-z0-9_$.%\-]+)"
_DEFINER_CLAUSE = re.compile(
    rf"^CREATE\s+(?P<algorithm>ALGORITHM\s*=\s*\w+\s+)?DEFINER\s*=\s*"
    rf"{_ACCOUNT_PART}(?:@{_ACCOUNT_PART})?\s+",
    re.I,
)
_ROUTINE_HEAD = re.compile(
    rf"^(?P<kind>(?:AGGREGATE\s+)?(?:PROCEDURE|FUNCTION))\s+(?:(?P<db>{_ID})\s*\.\s*)?(?P<name>{_ID})",
    re.I,
)
_TRIGGER_HEAD = re.compile(
    rf"^TRIGGER\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:(?P<db>{_ID})\s*\.\s*)?(?P<name>{_ID})"
    rf"\s+(?P<timing>BEFORE|AFTER)\s+(?P<event>INSERT|UPDATE|DELETE)"
    rf"\s+ON\s+(?P<table>(?:{_ID}\s*\.\s*)?{_ID})\s+FOR\s+EACH\s+ROW"
    rf"(?:\s+(?:FOLLOWS|PRECEDES)\s+{_ID})?",
    re.I,
)


@dataclass(frozen=True)
class _Definition:
    """SHOW CREATE output of an object: the statement and the session it was created in."""

    rest: str  # the statement after "CREATE [ALGORITHM=x] DEFINER=... "
    algorithm: str
    sql_mode: str | None
    charset_client: str
    collation_connection: str
    time_zone: str | None = None


def _object_state(conn: Connection, obj: DefinedObject) -> dict[str, Any] | None:
    """The object's current definer (and what redefining it needs), None if it is gone."""
    routine = (
        "SELECT DEFINER FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = %s"
        " AND ROUTINE_NAME = %s AND ROUTINE_TYPE = %s"
    )
    queries = {
        "FUNCTION": routine,
        "PROCEDURE": routine,
        "TRIGGER": (
            "SELECT DEFINER, EVENT_OBJECT_TABLE, ACTION_TIMING, EVENT_MANIPULATION"
            " FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s AND TRIGGER_NAME = %s"
        ),
        "VIEW": (
            "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s"
            " AND TABLE_NAME = %s"
        ),
        "EVENT": (
            "SELECT DEFINER, STATUS FROM information_schema.EVENTS WHERE EVENT_SCHEMA = %s"
            " AND EVENT_NAME = %s"
        ),
    }
    args = (
        (obj.schema, obj.name, obj.kind) if queries[obj.kind] is routine else (obj.schema, obj.name)
    )
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        try:
            cur.execute(queries[obj.kind], args)
            row = cur.fetchone()
        except pymysql.err.MySQLError as exc:
            _fail(f"looking up {_describe(obj)}", exc)
    return dict(row) if row else None


def _describe(obj: DefinedObject) -> str:
    return f"{obj.kind} {quote_server_name(obj.schema)}.{quote_server_name(obj.name)}"


def _show_create(conn: Connection, obj: DefinedObject) -> _Definition:
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        try:
            cur.execute(
                f"SHOW CREATE {obj.kind} {quote_server_name(obj.schema)}.{quote_server_name(obj.name)}"
            )
            row = cur.fetchone()
        except pymysql.err.MySQLError as exc:
            _fail(f"SHOW CREATE {_describe(obj)}", exc)
    if not row:
        raise DatabaseError(f"SHOW CREATE {_describe(obj)} returned nothing")
    column = {
        "VIEW": "Create View",
        "FUNCTION": "Create Function",
        "PROCEDURE": "Create Procedure",
        "TRIGGER": "SQL Original Statement",
        "EVENT": "Create Event",
    }[obj.kind]
    statement = _text(row.get(column))
    match = _DEFINER_CLAUSE.match(statement)
    if not match:
        raise DatabaseError(f"cannot find the DEFINER clause in SHOW CREATE {_describe(obj)}")
    return _Definition(
        rest=statement[match.end() :],
        algorithm=match.group("algorithm") or "",
        sql_mode=_text(row["sql_mode"]) if "sql_mode" in row else None,
        charset_client=_text(row["character_set_client"]),
        collation_connection=_text(row["collation_connection"]),
        time_zone=_text(row["time_zone"]) if "time_zone" in row else None,
    )


@contextmanager
def _creation_session(conn: Connection, definition: _Definition) -> Iterator[None]:
    """Run the re-create with the sql_mode, character set and time zone the object had."""
    names = ["character_set_client", "collation_connection"]
    values = [definition.charset_client, definition.collation_connection]
    if definition.sql_mode is not None:
        names.append("sql_mode")
        values.append(definition.sql_mode)
    if definition.time_zone is not None:
        names.append("time_zone")
        values.append(definition.time_zone)
    selects = ", ".join(f"@@SESSION.{name}" for name in names)
    assignments = ", ".join(f"{name} = %s" for name in names)
    saved = _run(conn, f"SELECT {selects}", what="reading session settings")[0]
    _run(conn, f"SET SESSION {assignments}", values, what="applying the object's session")
    try:
        yield
    finally:
        _run(conn, f"SET SESSION {assignments}", saved, what="restoring session settings")


def _execute_as_client(conn: Connection, statement: str, charset: str, *, what: str) -> None:
    """Send `statement` encoded in the object's character_set_client, as the server expects."""
    try:
        encoding = charset_by_name(charset).encoding
        data = statement.encode(encoding)
    except (KeyError, LookupError, UnicodeEncodeError, AttributeError):
        raise DatabaseError(f"{what}: cannot encode it in character set {charset!r}") from None
    try:
        conn.query(data)
    except pymysql.err.MySQLError as exc:
        _fail(what, exc)


def _trigger_order(conn: Connection, obj: DefinedObject, state: dict[str, Any]) -> str:
    """FOLLOWS/PRECEDES keeping the trigger's place: re-creating one otherwise puts it last."""
    rows = _run(
        conn,
        "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s"
        " AND EVENT_OBJECT_TABLE = %s AND ACTION_TIMING = %s AND EVENT_MANIPULATION = %s"
        " ORDER BY ACTION_ORDER",
        (
            obj.schema,
            state["EVENT_OBJECT_TABLE"],
            state["ACTION_TIMING"],
            state["EVENT_MANIPULATION"],
        ),
        what=f"reading the trigger order on `{obj.schema}`.`{state['EVENT_OBJECT_TABLE']}`",
    )
    names = [str(row[0]) for row in rows]
    if obj.name not in names:
        return ""
    index = names.index(obj.name)
    if index + 1 < len(names):
        return f" PRECEDES {quote_server_name(names[index + 1])}"
    return f" FOLLOWS {quote_server_name(names[index - 1])}" if index > 0 else ""


def _routine_grants(conn: Connection, obj: DefinedObject) -> list[tuple[str, str, str]]:
    """Routine-level grants (user, host, privileges): DROP PROCEDURE/FUNCTION deletes them."""
    rows = _run(
        conn,
        "SELECT User, Host, Proc_priv FROM mysql.procs_priv WHERE Db = %s"
        " AND Routine_name = %s AND Routine_type = %s",
        (obj.schema, obj.name, obj.kind),
        what=f"reading grants on {_describe(obj)}",
    )
    grants = []
    for user, host, privs in rows:
        names = privs.split(",") if isinstance(privs, str) else list(privs or ())
        grants.append((_text(user), _text(host), ",".join(sorted(n.strip() for n in names if n))))
    return grants


def _regrant_routine(
    conn: Connection, obj: DefinedObject, grants: list[tuple[str, str, str]]
) -> None:
    for user, host, privs in grants:
        names = privs.split(",")
        privileges = [p.upper() for p in names if p in ("Execute", "Alter Routine")]
        if not privileges:
            continue
        statement = f"GRANT {', '.join(privileges)} ON {obj.kind} {quote_server_name(obj.schema)}.{quote_server_name(obj.name)} TO "
        statement += "%s@%s" if host else "%s"  # a MariaDB role has no host
        statement += " WITH GRANT OPTION" if "Grant" in names else ""
        _run(
            conn, statement, (user, host) if host else (user,), what=f"re-granting {_describe(obj)}"
        )


Saver = Callable[[dict[str, Any]], None]


def redefine_object(conn: Connection, obj: DefinedObject, save: Saver | None = None) -> None:
    """Runbook "re-create them using the aws_db_admin user": make the admin the definer.

    The statement is kept exactly: only the DEFINER clause of SHOW CREATE is replaced, with
    CURRENT_USER (the RDS admin lacks SET_USER_ID, so it can only define objects as itself),
    and it runs with the object's own sql_mode, character set and time zone. Views are
    replaced in place; events get ALTER DEFINER; routines and triggers use CREATE OR REPLACE
    on MariaDB and, on MySQL 8, a trial create under a temporary name, then DROP and CREATE
    (the trigger's table locked meanwhile) and the routine's grants put back. An object the
    admin already defines is left alone. Routines and triggers are re-created with their
    schema as the connection's database (see `_using`).

    On the DROP-then-CREATE path, `save` is first given what re-creates the object
    (`restore_missing` takes it), so that a crash between the two loses nothing.
    """
    quote_identifier(obj.schema)
    state = _object_state(conn, obj)
    if state is None:
        raise DatabaseError(f"{_describe(obj)} no longer exists")
    admin = _current_user(conn)
    if str(state["DEFINER"]) == admin:
        return
    definition = _show_create(conn, obj)
    if obj.kind == "VIEW":
        # SHOW CREATE VIEW qualifies names unless the connection's database is the view's;
        # either way they mean the same on this connection.
        statement = (
            f"CREATE OR REPLACE {definition.algorithm}DEFINER=CURRENT_USER {definition.rest}"
        )
        with _creation_session(conn, definition):
            _execute_as_client(
                conn, statement, definition.charset_client, what=f"re-creating {_describe(obj)}"
            )
    elif obj.kind == "EVENT":
        status = {"ENABLED": "ENABLE", "DISABLED": "DISABLE"}.get(
            str(state["STATUS"]), "DISABLE ON SLAVE"
        )
        with _creation_session(conn, definition):
            _run(
                conn,
                f"ALTER DEFINER = CURRENT_USER EVENT {quote_server_name(obj.schema)}.{quote_server_name(obj.name)} {status}",
                what=f"changing the definer of {_describe(obj)}",
            )
    else:
        # SHOW CREATE TRIGGER/PROCEDURE/FUNCTION leaves names relative to the object's schema.
        with _using(conn, obj.schema):
            if obj.kind == "TRIGGER":
                _redefine_trigger(conn, obj, state, definition, save)
            else:
                _redefine_routine(conn, obj, definition, save)
    log.info(
        "redefine_object: %s now defined by %s (was %s)", _describe(obj), admin, state["DEFINER"]
    )


@contextmanager
def _using(conn: Connection, schema: str) -> Iterator[None]:
    """Make `schema` the connection's database, and the previous one again afterwards.

    A connection that had no database keeps `schema`: MySQL has no way back to none.
    """
    previous = _run(conn, "SELECT DATABASE()", what="reading the current database")[0][0]
    if previous != schema:
        try:
            conn.select_db(schema)
        except pymysql.err.MySQLError as exc:
            _fail(f"USE {quote_server_name(schema)}", exc)
    try:
        yield
    finally:
        if previous and previous != schema:
            try:
                conn.select_db(previous)
            except pymysql.err.MySQLError as exc:
                _fail(f"USE {quote_server_name(previous)}", exc)


def _replace_dropped(conn: Connection, obj: DefinedObject, statement: str, charset: str) -> None:
    """CREATE an object just dropped; if even that fails, log what to restore it with."""
    try:
        _execute_as_client(conn, statement, charset, what=f"re-creating {_describe(obj)}")
    except DatabaseError as exc:
        log.error(
            "redefine_object: %s was dropped and not re-created (%s); restore it with: %s",
            _describe(obj),
            exc,
            statement,
        )
        raise


def _saved(
    obj: DefinedObject, statement: str, definition: _Definition, grants: list[tuple[str, str, str]]
) -> dict[str, Any]:
    """What re-creates a dropped object: the CREATE statement and the session it ran in."""
    return {
        "kind": obj.kind,
        "schema": obj.schema,
        "name": obj.name,
        "statement": statement,
        "sql_mode": definition.sql_mode,
        "charset_client": definition.charset_client,
        "collation_connection": definition.collation_connection,
        "time_zone": definition.time_zone,
        "grants": [list(g) for g in grants],
    }


def restore_missing(conn: Connection, saved: dict[str, Any]) -> bool:
    """Re-create an object `redefine_object` saved and then dropped, if it is missing (a crash
    between DROP and CREATE). Returns True when it had to."""
    obj = DefinedObject(cast(ObjectKind, saved["kind"]), saved["schema"], saved["name"], "")
    quote_identifier(obj.schema)
    if obj.kind not in ("FUNCTION", "PROCEDURE", "TRIGGER"):
        raise DatabaseError(f"cannot restore {_describe(obj)}: only routines and triggers are "
                            "dropped and re-created")
    if _object_state(conn, obj) is not None:
        return False
    definition = _Definition(
        rest="",
        algorithm="",
        sql_mode=saved["sql_mode"],
        charset_client=saved["charset_client"],
        collation_connection=saved["collation_connection"],
        time_zone=saved["time_zone"],
    )
    with _using(conn, obj.schema), _creation_session(conn, definition):
        _execute_as_client(
            conn, saved["statement"], definition.charset_client,
            what=f"restoring {_describe(obj)} (dropped, then interrupted before its CREATE)",
        )
    if obj.kind != "TRIGGER":
        _regrant_routine(conn, obj, [(u, h, p) for u, h, p in saved["grants"]])
    log.info("restore_missing: re-created %s from the saved definition", _describe(obj))
    return True


def _redefine_routine(
    conn: Connection, obj: DefinedObject, definition: _Definition, save: Saver | None = None
) -> None:
    what = f"re-creating {_describe(obj)}"
    head = _ROUTINE_HEAD.match(definition.rest)
    if not head:
        raise DatabaseError(f"{what}: cannot find the routine name in SHOW CREATE")
    prefix = f"{head.group('db')}." if head.group("db") else ""  # else the current database
    rest = definition.rest[head.end() :]

    def create(verb: str, name: str) -> str:
        return f"{verb} DEFINER=CURRENT_USER {head.group('kind')} {prefix}{name}{rest}"

    charset = definition.charset_client
    if _flavor(conn) == "mariadb":  # keeps routine grants, and the original if this fails
        with _creation_session(conn, definition):
            _execute_as_client(
                conn, create("CREATE OR REPLACE", head.group("name")), charset, what=what
            )
        return
    trial = quote_server_name("rotor_check_" + secrets.token_hex(6))
    grants = _routine_grants(conn, obj)  # DROP deletes them
    if save is not None:
        save(_saved(obj, create("CREATE", head.group("name")), definition, grants))
    with _creation_session(conn, definition):
        _execute_as_client(
            conn, create("CREATE", trial), charset, what=f"{what} (trial copy; original untouched)"
        )
        _run(
            conn,
            f"DROP {obj.kind} IF EXISTS {prefix}{trial}",
            what=f"{what} (dropping the trial copy)",
        )
        _run(
            conn,
            f"DROP {obj.kind} {quote_server_name(obj.schema)}.{quote_server_name(obj.name)}",
            what=what,
        )
        _replace_dropped(conn, obj, create("CREATE", head.group("name")), charset)
    _regrant_routine(conn, obj, grants)


def _redefine_trigger(
    conn: Connection,
    obj: DefinedObject,
    state: dict[str, Any],
    definition: _Definition,
    save: Saver | None = None,
) -> None:
    what = f"re-creating {_describe(obj)}"
    head = _TRIGGER_HEAD.match(definition.rest)
    if not head:
        raise DatabaseError(f"{what}: cannot read the trigger header in SHOW CREATE")
    prefix = f"{head.group('db')}." if head.group("db") else ""  # else the current database
    order = _trigger_order(conn, obj, state)
    rest = (
        f" {head.group('timing')} {head.group('event')} ON {head.group('table')}"
        f" FOR EACH ROW{order}{definition.rest[head.end() :]}"
    )

    def create(verb: str, name: str) -> str:
        return f"{verb} DEFINER=CURRENT_USER TRIGGER {prefix}{name}{rest}"

    charset = definition.charset_client
    if _flavor(conn) == "mariadb":
        with _creation_session(conn, definition):
            _execute_as_client(
                conn, create("CREATE OR REPLACE", head.group("name")), charset, what=what
            )
        return
    # MySQL 8 has no CREATE OR REPLACE TRIGGER. With the table write-locked no row slips
    # through between DROP and CREATE, and the trial copy never fires.
    trial = quote_server_name("rotor_check_" + secrets.token_hex(6))
    if save is not None:
        save(_saved(obj, create("CREATE", head.group("name")), definition, []))
    table = f"{quote_server_name(obj.schema)}.{quote_server_name(str(state['EVENT_OBJECT_TABLE']))}"
    _run(conn, f"LOCK TABLES {table} WRITE", what=f"{what} (locking {table})")
    try:
        with _creation_session(conn, definition):
            _execute_as_client(
                conn,
                create("CREATE", trial),
                charset,
                what=f"{what} (trial copy; original untouched)",
            )
            _run(
                conn,
                f"DROP TRIGGER IF EXISTS {quote_server_name(obj.schema)}.{trial}",
                what=f"{what} (dropping the trial copy)",
            )
            _run(
                conn,
                f"DROP TRIGGER {quote_server_name(obj.schema)}.{quote_server_name(obj.name)}",
                what=what,
            )
            _replace_dropped(conn, obj, create("CREATE", head.group("name")), charset)
    finally:
        _run(conn, "UNLOCK TABLES", what="UNLOCK TABLES")


# --- connections ------------------------------------------------------------------------------


def connections_by_user(conn: Connection) -> dict[str, int]:
    """Runbook "Verify rotation": open connections per user, from the process list."""
    rows = _run(
        conn,
        "SELECT USER, COUNT(*) FROM information_schema.PROCESSLIST GROUP BY USER",
        what="reading the process list",
    )
    return {_text(user): int(count) for user, count in rows}


def connection_ids(conn: Connection, user: str) -> list[int]:
    """Ids of `user`'s connections, never the caller's own."""
    validate_account_name(user)
    rows = _run(
        conn,
        "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s AND ID <> CONNECTION_ID()"
        " ORDER BY ID",
        (user,),
        what=f"listing connections of {user}",
    )
    return [int(row[0]) for row in rows]


def _owner_of(conn: Connection, thread_id: int) -> str | None:
    rows = _run(
        conn,
        "SELECT USER FROM information_schema.PROCESSLIST WHERE ID = %s",
        (int(thread_id),),
        what=f"looking up connection {int(thread_id)}",
    )
    return _text(rows[0][0]) if rows else None


def kill_connections(
    conn: Connection, ids: Sequence[int], *, rds_kill: bool, user: str | None = None
) -> int:
    """Runbook "Force-kill connections": CALL mysql.rds_kill on RDS, KILL elsewhere.

    With `user`, each ID is checked to still belong to that user just before it is killed
    (one that ended, or now is someone else's, is left alone). A connection that is already
    gone is not an error. Returns how many were killed.
    """
    statement = "CALL mysql.rds_kill(%s)" if rds_kill else "KILL %s"
    killed = 0
    for thread_id in ids:
        if int(thread_id) == conn.thread_id():
            continue  # never the connection doing the killing
        if user is not None and _owner_of(conn, thread_id) != user:
            continue
        try:
            with conn.cursor() as cur:
                cur.execute(statement, (int(thread_id),))
        except pymysql.err.MySQLError as exc:
            if _code(exc) == _UNKNOWN_THREAD:
                continue
            _fail(f"killing connection {int(thread_id)}", exc)
        killed += 1
    return killed
