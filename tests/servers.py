"""Sandboxes on the real MariaDB/MySQL and PostgreSQL servers this machine runs.

Every sandbox gets a unique prefix; its databases and users all start with it, and
cleanup drops everything carrying it, so tests never collide and never leave debris.
The admin it creates is made like RDS's `aws_db_admin`: everything with grant option,
but no SUPER (MySQL), or CREATEROLE/CREATEDB without superuser (PostgreSQL).
"""

from __future__ import annotations

import os
import secrets
import string
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psycopg
import pymysql
from psycopg import sql

MYSQL_URL = os.environ.get("ROTOR_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")
POSTGRES_URL = os.environ.get("ROTOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class ServerUnavailable(Exception):
    """A test database server could not be reached."""


def password() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


def unique_prefix() -> str:
    return "rt" + secrets.token_hex(3)


@dataclass
class MySQLSandbox:
    """A database, an RDS-like admin and an app user on the real MySQL/MariaDB server."""

    host: str
    port: int
    root_user: str
    root_password: str
    prefix: str
    database: str
    admin_user: str
    admin_password: str
    app_user: str
    app_password: str
    extra: dict[str, str] = field(default_factory=dict)

    def connect(self, user: str | None = None, password: str | None = None,
                database: str | None = None) -> pymysql.Connection:
        if user is None:
            user, password = self.root_user, self.root_password
        return pymysql.connect(host=self.host, port=self.port, user=user, password=password or "",
                               database=database, ssl_disabled=True, autocommit=True,
                               connect_timeout=5)

    def root(self) -> pymysql.Connection:
        return self.connect()


def _mysql_root(url: str = MYSQL_URL) -> tuple[str, int, str, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 3306, parts.username or "root", parts.password or ""


def mysql_sandbox() -> MySQLSandbox:
    host, port, user, pw = _mysql_root()
    try:
        conn = pymysql.connect(host=host, port=port, user=user, password=pw, ssl_disabled=True,
                               autocommit=True, connect_timeout=5)
    except pymysql.err.OperationalError as exc:
        raise ServerUnavailable(
            f"MySQL/MariaDB at {host}:{port} is unreachable ({exc.args[-1]}); start it with "
            "`start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd`"
        ) from exc
    prefix = unique_prefix()
    box = MySQLSandbox(host=host, port=port, root_user=user, root_password=pw, prefix=prefix,
                       database=f"{prefix}_app", admin_user=f"{prefix}_admin",
                       admin_password=password(), app_user=f"{prefix}_app",
                       app_password=password())
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{box.database}`")
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (box.admin_user, box.admin_password))
        # RDS's master user: every privilege with grant option, except SUPER and friends.
        cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@'%%' WITH GRANT OPTION", (box.admin_user,))
        cur.execute("REVOKE SUPER ON *.* FROM %s@'%%'", (box.admin_user,))
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (box.app_user, box.app_password))
        cur.execute(f"GRANT ALL PRIVILEGES ON `{box.database}`.* TO %s@'%%'", (box.app_user,))
    conn.close()
    return box


def drop_mysql_sandbox(box: MySQLSandbox) -> None:
    conn = box.root()
    with conn.cursor() as cur:
        cur.execute("SELECT User, Host FROM mysql.user WHERE User LIKE %s", (box.prefix + "%",))
        for user, host in cur.fetchall():
            cur.execute("DROP USER IF EXISTS %s@%s", (user, host))
        cur.execute("SHOW DATABASES LIKE %s", (box.prefix + "%",))
        for (name,) in cur.fetchall():
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        if box.extra.get("roles"):
            for role in box.extra["roles"].split(","):
                cur.execute(f"DROP ROLE IF EXISTS `{role}`")
    conn.close()


@dataclass
class PostgresSandbox:
    """A database, an RDS-like admin and an app user on the real PostgreSQL server."""

    host: str
    port: int
    root_user: str
    prefix: str
    database: str
    admin_user: str
    admin_password: str
    app_user: str
    app_password: str

    def connect(self, user: str | None = None, password: str | None = None,
                database: str | None = None, autocommit: bool = True) -> psycopg.Connection:
        return psycopg.connect(host=self.host, port=self.port, user=user or self.root_user,
                               password=password, dbname=database or self.database,
                               autocommit=autocommit, connect_timeout=5)

    def root(self, database: str | None = None) -> psycopg.Connection:
        return self.connect(database=database or "postgres")


def postgres_sandbox() -> PostgresSandbox:
    parts = urlsplit(POSTGRES_URL)
    host, port, user = parts.hostname or "127.0.0.1", parts.port or 5432, parts.username or "postgres"
    try:
        conn = psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True,
                               connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise ServerUnavailable(
            f"PostgreSQL at {host}:{port} is unreachable ({exc}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        ) from exc
    prefix = unique_prefix()
    # Hyphenated names on purpose: real app roles look like `account-api`.
    box = PostgresSandbox(host=host, port=port, root_user=user, prefix=prefix,
                          database=f"{prefix}-app_test", admin_user=f"{prefix}_admin",
                          admin_password=password(), app_user=f"{prefix}-app",
                          app_password=password())
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE CREATEDB PASSWORD {}").format(
        sql.Identifier(box.admin_user), sql.Literal(box.admin_password)))
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
        sql.Identifier(box.app_user), sql.Literal(box.app_password)))
    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
        sql.Identifier(box.database), sql.Identifier(box.app_user)))
    # RDS's admin can act for the roles it manages; PG16 gives CREATEROLE users that
    # implicitly, PG15 needs the membership spelt out.
    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(box.app_user),
                                                  sql.Identifier(box.admin_user)))
    conn.close()
    return box


def drop_postgres_sandbox(box: PostgresSandbox) -> None:
    conn = box.root()
    dbs = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                      (box.prefix + "%",))]
    for db in dbs:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
    roles = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s",
                                        (box.prefix + "%",))]
    for role in roles:
        # Privileges a role holds in the maintenance database would block DROP ROLE.
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    for role in roles:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    conn.close()


def _postgres_admin() -> psycopg.Connection:
    parts = urlsplit(POSTGRES_URL)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    try:
        return psycopg.connect(host=host, port=port, user=parts.username or "postgres",
                               dbname="postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise ServerUnavailable(
            f"PostgreSQL at {host}:{port} is unreachable ({exc}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        ) from exc


def postgres_state_db() -> str:
    """A new, uniquely named empty database for a Rotor state store; its URL."""
    name = unique_prefix() + "_state"
    with _postgres_admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(POSTGRES_URL)
    return parts._replace(path="/" + name).geturl()


def drop_postgres_state_db(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with _postgres_admin() as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                     (name,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
