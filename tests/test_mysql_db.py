"""rotation.mysql_db against the real MariaDB, as an RDS-like admin (no SUPER)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from rotation import mysql_db
from rotation.errors import DatabaseError, InvalidIdentifier, UnknownName
from rotation.mysql_db import Account, DefinedObject, Endpoint
from tests import servers
from tests.servers import MySQLSandbox
from tests.waiting import wait_for


def endpoint(box: MySQLSandbox, user: str, password: str, database: str | None = None) -> Endpoint:
    return Endpoint(box.host, box.port, user, password, database, tls="disabled")


@pytest.fixture
def admin(mysql_box: MySQLSandbox) -> Iterator[pymysql.Connection]:
    conn = mysql_db.connect(endpoint(mysql_box, mysql_box.admin_user, mysql_box.admin_password))
    yield conn
    conn.close()


def rows(conn: pymysql.Connection, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def run(conn: pymysql.Connection, *statements: str) -> None:
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)


def add_roles(box: MySQLSandbox, *names: str) -> list[str]:
    """Role names carrying the box prefix, registered for the sandbox's cleanup."""
    roles = [f"{box.prefix}_{name}" for name in names]
    known = [r for r in box.extra.get("roles", "").split(",") if r]
    box.extra["roles"] = ",".join(known + roles)
    return roles


def accounts(conn: pymysql.Connection, prefix: str, odd: str) -> list[tuple[Any, ...]]:
    """The sandbox's accounts, those named `odd`, and root: what a bad name could touch."""
    return rows(
        conn,
        "SELECT User, Host FROM mysql.user WHERE User LIKE %s OR User = %s OR Host = %s"
        " OR User = 'root' ORDER BY User, Host",
        (prefix + "%", odd, odd),
    )


HOSTS = ["%", "10.0.%"]
DEFINER = re.compile(r'DEFINER=(`[^`]*`|"[^"]*")@(`[^`]*`|"[^"]*") ')


# --- connecting ------------------------------------------------------------------------------


def test_login_refused_names_the_account_but_not_the_password(mysql_box: MySQLSandbox) -> None:
    wrong = servers.password()
    ep = endpoint(mysql_box, mysql_box.admin_user, wrong)
    with pytest.raises(DatabaseError) as failure:
        mysql_db.connect(ep)
    message = str(failure.value)
    assert message.startswith(
        f"login as {mysql_box.admin_user}@{mysql_box.host}:{mysql_box.port} refused: "
        "Access denied for user"
    )
    assert wrong not in message and wrong not in repr(ep)
    assert failure.value.__cause__ is None and failure.value.__suppress_context__
    assert mysql_db.can_login(ep) is False
    assert mysql_db.can_login(endpoint(mysql_box, mysql_box.app_user, mysql_box.app_password))


def test_connect_without_tls_builds_no_tls_context(
    mysql_box: MySQLSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unless told, pymysql builds a TLS context (loading the CA store) on every connect: with
    TLS disabled, Rotor says so and none is built."""
    built: list[Any] = []
    original = pymysql.connections.Connection._create_ssl_ctx

    def spy(self: Any, sslp: Any) -> Any:
        built.append(sslp)
        return original(self, sslp)

    monkeypatch.setattr(pymysql.connections.Connection, "_create_ssl_ctx", spy)
    ep = endpoint(mysql_box, mysql_box.admin_user, mysql_box.admin_password)
    for _ in range(2):
        conn = mysql_db.connect(ep)
        assert rows(conn, "SELECT @@autocommit, CURRENT_USER()") == [
            (1, f"{mysql_box.admin_user}@%")
        ]
        conn.close()
    assert built == []


def test_tls_is_never_silently_dropped(mysql_box: MySQLSandbox) -> None:
    ep = Endpoint(mysql_box.host, mysql_box.port, mysql_box.admin_user, mysql_box.admin_password)
    with mysql_box.root() as root:
        have_ssl = rows(root, "SELECT @@have_ssl")[0][0]
    if have_ssl == "YES":
        conn = mysql_db.connect(ep)
        assert rows(conn, "SHOW SESSION STATUS LIKE 'Ssl_cipher'")[0][1]
        conn.close()
    else:
        with pytest.raises(DatabaseError, match="SSL is required"):
            mysql_db.connect(ep)
    # Built once per (mode, CA file): pymysql would otherwise load CAs on every connect.
    assert mysql_db._tls_context("required", None) is mysql_db._tls_context("required", None)
    assert mysql_db._tls_context("verify", None) is not mysql_db._tls_context("required", None)


def test_server_info(admin: pymysql.Connection) -> None:
    info = mysql_db.server_info(admin)
    assert info.flavor == "mariadb"
    assert info.version.startswith("10.")
    assert info.max_user_length >= 80
    assert info.has_rds_kill is False


# --- names -----------------------------------------------------------------------------------

BAD_NAMES = ["a`b", "a'b", 'a"b', "a;b", "a b", "", "a@b", "x'; DROP USER root; --", "a%"]
BAD_HOSTS = ["%'; DROP USER root; --", "a b", "a`b", "", "host@x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_rejected_and_nothing_changes(
    mysql_box: MySQLSandbox, admin: pymysql.Connection, name: str
) -> None:
    with pytest.raises(InvalidIdentifier, match="may only contain letters, digits, _ - ."):
        mysql_db.validate_account_name(name)
    before = accounts(admin, mysql_box.prefix, name)
    like = mysql_db.account(admin, mysql_box.app_user, "%")
    calls = [
        lambda: mysql_db.create_user(admin, name, ["%"], servers.password(), like=like),
        lambda: mysql_db.copy_grants(admin, mysql_box.app_user, name, "%"),
        lambda: mysql_db.copy_grants(admin, name, mysql_box.app_user, "%"),
        lambda: mysql_db.drop_user(admin, name, ["%"]),
        lambda: mysql_db.user_hosts(admin, name),
        lambda: mysql_db.new_user_name(admin, name, 80),
        lambda: mysql_db.definer_objects(admin, mysql_box.database, name),
    ]
    for call in calls:
        with pytest.raises(InvalidIdentifier):
            call()
    assert accounts(admin, mysql_box.prefix, name) == before


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_bad_hosts_are_rejected_and_nothing_changes(
    mysql_box: MySQLSandbox, admin: pymysql.Connection, host: str
) -> None:
    before = accounts(admin, mysql_box.prefix, host)
    like = mysql_db.account(admin, mysql_box.app_user, "%")
    new = mysql_box.prefix + "_new"
    with pytest.raises(InvalidIdentifier, match="account host"):
        mysql_db.create_user(admin, new, ["%", host], servers.password(), like=like)
    with pytest.raises(InvalidIdentifier, match="account host"):
        mysql_db.drop_user(admin, mysql_box.app_user, [host])
    with pytest.raises(InvalidIdentifier, match="account host"):
        mysql_db.show_grants(admin, mysql_box.app_user, host)
    assert accounts(admin, mysql_box.prefix, host) == before


def test_quote_identifier() -> None:
    assert mysql_db.quote_identifier("signon_production") == "`signon_production`"
    assert mysql_db.quote_identifier("account-api") == "`account-api`"
    for bad in ["a`b", "a b", "db; DROP", "", "x" * 65]:
        with pytest.raises(InvalidIdentifier):
            mysql_db.quote_identifier(bad)
    assert mysql_db.quote_identifier("we`ird", server_emitted=True) == "`we``ird`"


# --- accounts --------------------------------------------------------------------------------


def test_user_hosts_and_account(mysql_box: MySQLSandbox, admin: pymysql.Connection) -> None:
    app = mysql_box.app_user
    with mysql_box.root() as root:
        root.cursor().execute(
            "CREATE USER %s@'10.0.%%' IDENTIFIED BY %s REQUIRE SSL WITH MAX_USER_CONNECTIONS 7",
            (app, servers.password()),
        )
    assert mysql_db.user_hosts(admin, app) == ["%", "10.0.%"]
    assert mysql_db.user_hosts(admin, mysql_box.prefix + "_nobody") == []
    plain = mysql_db.account(admin, app, "%")
    assert (plain.plugin, plain.tls, plain.locked, plain.password_expired) == (
        "mysql_native_password", "", False, False,
    )  # fmt: skip
    strict = mysql_db.account(admin, app, "10.0.%")
    assert (strict.tls, strict.max_user_connections) == ("ANY", 7)
    with pytest.raises(UnknownName):
        mysql_db.account(admin, app, "localhost")


def test_show_grants_masks_the_password_hash(
    mysql_box: MySQLSandbox, admin: pymysql.Connection
) -> None:
    lines = mysql_db.show_grants(admin, mysql_box.app_user, "%")
    assert any("IDENTIFIED BY PASSWORD '[redacted]'" in line for line in lines)
    assert not any("'*" in line for line in lines)


def test_create_user_copies_tls_and_converges(
    mysql_box: MySQLSandbox, admin: pymysql.Connection
) -> None:
    new = mysql_box.prefix + "_user_20260121"
    like = Account(
        mysql_box.app_user, "%", "mysql_native_password", tls="X509", max_user_connections=5
    )
    first, second = servers.password(), servers.password()
    mysql_db.create_user(admin, new, HOSTS, first, like=like)
    mysql_db.create_user(admin, new, HOSTS, second, like=like)  # a retry
    assert mysql_db.user_hosts(admin, new) == ["%", "10.0.%"]
    for host in HOSTS:
        got = mysql_db.account(admin, new, host)
        assert (got.plugin, got.tls, got.max_user_connections) == (
            "mysql_native_password",
            "X509",
            5,
        )

    # Logging in needs no TLS requirement on this TLS-less server; the retry's password wins.
    plain = Account(mysql_box.app_user, "%", "mysql_native_password")
    mysql_db.create_user(admin, new, ["%"], second, like=plain)
    got = mysql_db.account(admin, new, "%")
    assert (got.tls, got.max_user_connections) == ("", 0)
    assert mysql_db.can_login(endpoint(mysql_box, new, second))
    assert not mysql_db.can_login(endpoint(mysql_box, new, first))


def test_a_failing_statement_never_shows_the_password(
    mysql_box: MySQLSandbox, admin: pymysql.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A syntax error quotes the statement from where it went wrong, password included.
    monkeypatch.setattr(mysql_db, "_identified_by", lambda flavor, plugin: "IDENTIFIED BY , %s")
    secret = servers.password()
    like = Account(mysql_box.app_user, "%", "mysql_native_password")
    with pytest.raises(DatabaseError, match=r"\(1064\).*near .*\[redacted\]") as failure:
        mysql_db.create_user(admin, mysql_box.prefix + "_x", ["%"], secret, like=like)
    assert secret not in str(failure.value)
    assert failure.value.__cause__ is None and failure.value.__suppress_context__


def test_create_user_rejects_a_plugin_it_cannot_copy(
    mysql_box: MySQLSandbox, admin: pymysql.Connection
) -> None:
    like = Account(mysql_box.app_user, "%", "unix_socket")
    with pytest.raises(DatabaseError, match="unix_socket"):
        mysql_db.create_user(admin, mysql_box.prefix + "_x", ["%"], servers.password(), like=like)
    assert mysql_db.user_hosts(admin, mysql_box.prefix + "_x") == []


def test_new_user_name(mysql_box: MySQLSandbox, admin: pymysql.Connection) -> None:
    base = f"{mysql_box.prefix}_user_20260121"
    assert mysql_db.new_user_name(admin, base, 80) == base
    run(admin, f"CREATE USER `{base}`@'10.0.%'")
    assert mysql_db.new_user_name(admin, base, 80) == base + "_2"
    run(admin, f"CREATE USER `{base}_2`@'%'")
    assert mysql_db.new_user_name(admin, base, 80) == base + "_3"
    run(admin, f"DROP USER `{base}_2`@'%'")
    with pytest.raises(InvalidIdentifier, match=rf"allows at most {len(base) + 1}; use a"):
        mysql_db.new_user_name(admin, base, len(base) + 1)  # base is taken, base_2 too long
    with pytest.raises(InvalidIdentifier, match=r"is 30 characters .* at most 16"):
        mysql_db.new_user_name(admin, "account-api_user_20260121_xxxx", 16)


def test_drop_user(mysql_box: MySQLSandbox, admin: pymysql.Connection) -> None:
    app = mysql_box.app_user
    run(admin, f"CREATE USER `{app}`@'10.0.%'")
    run(admin, f"CREATE DEFINER = `{app}`@`%` VIEW `{mysql_box.database}`.v AS SELECT 1 AS one")
    with pytest.raises(DatabaseError, match=rf"still defines VIEW {mysql_box.database}\.v;"):
        mysql_db.drop_user(admin, app, ["%", "10.0.%"])
    assert mysql_db.user_hosts(admin, app) == ["%", "10.0.%"]
    (view,) = mysql_db.definer_objects(admin, mysql_box.database, app)
    mysql_db.redefine_object(admin, view)

    mysql_db.drop_user(admin, app, ["%", "10.0.%"])
    assert mysql_db.user_hosts(admin, app) == []
    mysql_db.drop_user(admin, app, ["%", "10.0.%"])  # already gone: nothing to do
    with pytest.raises(DatabaseError, match="logged in as"):
        mysql_db.drop_user(admin, mysql_box.admin_user, ["%"])
    assert mysql_db.user_hosts(admin, mysql_box.admin_user) == ["%"]


def test_test_login(mysql_box: MySQLSandbox) -> None:
    with mysql_box.root() as root:
        run(root, f"CREATE TABLE `{mysql_box.database}`.users (id int)")
    ep = endpoint(mysql_box, mysql_box.app_user, mysql_box.app_password)
    summary = mysql_db.test_login(ep, mysql_box.database)
    assert summary.endswith(f"logged in to `{mysql_box.database}`: 1 tables, read `users`")
    assert mysql_box.app_password not in summary
    with pytest.raises(DatabaseError, match="refused"):
        mysql_db.test_login(ep, "mysql")


# --- grants ----------------------------------------------------------------------------------


def give_old_user_everything(box: MySQLSandbox, admin: pymysql.Connection) -> list[str]:
    """Grants at every level, on two hosts, as the admin (who creates, so holds, the roles)."""
    app, db = box.app_user, box.database
    reader, auditor = add_roles(box, "reader", "auditor")
    with admin.cursor() as cur:
        cur.execute("CREATE USER %s@'10.0.%%' IDENTIFIED BY %s", (app, servers.password()))
    run(
        admin,
        f"CREATE TABLE `{db}`.t (a int, b int, c int)",
        f"CREATE PROCEDURE `{db}`.purge_log() SELECT 1",
        f"CREATE FUNCTION `{db}`.twice(x int) RETURNS int DETERMINISTIC RETURN x * 2",
        f"CREATE ROLE `{reader}`",
        f"CREATE ROLE `{auditor}`",
        f"GRANT SELECT ON `{db}`.* TO `{reader}`",
    )
    grants = [
        "GRANT PROCESS, RELOAD ON *.* TO {who} WITH GRANT OPTION",
        f"GRANT SELECT, UPDATE ON `{db}`.t TO {{who}} WITH GRANT OPTION",
        f"GRANT SELECT (b, a), INSERT (c, a) ON `{db}`.t TO {{who}}",
        f"GRANT EXECUTE ON PROCEDURE `{db}`.purge_log TO {{who}}",
        f"GRANT EXECUTE, ALTER ROUTINE ON FUNCTION `{db}`.twice TO {{who}}",
        f"GRANT `{reader}` TO {{who}}",
        f"GRANT `{auditor}` TO {{who}} WITH ADMIN OPTION",
        f"SET DEFAULT ROLE `{reader}` FOR {{who}}",
    ]
    for statement in grants:
        run(admin, statement.format(who=f"`{app}`@'%'"))
    run(admin, f"GRANT SELECT ON `{db}`.t TO `{app}`@'10.0.%'")
    run(admin, f"ALTER USER `{app}`@'%' WITH MAX_QUERIES_PER_HOUR 1000")
    return [reader, auditor]


def test_copy_grants_every_level_on_every_host(
    mysql_box: MySQLSandbox, admin: pymysql.Connection
) -> None:
    old, new = mysql_box.app_user, mysql_box.prefix + "_user_20260121"
    reader, auditor = give_old_user_everything(mysql_box, admin)
    hosts = mysql_db.user_hosts(admin, old)
    assert hosts == ["%", "10.0.%"]
    mysql_db.create_user(
        admin, new, hosts, servers.password(), like=mysql_db.account(admin, old, "%")
    )
    equal, missing, _ = mysql_db.grants_match(admin, old, new, "%")
    assert not equal and f"GRANT `{reader}` TO <grantee>" in missing

    copied = {host: mysql_db.copy_grants(admin, old, new, host) for host in hosts}

    assert f"GRANT `{reader}` TO `{new}`@`%`" in copied["%"]
    assert f"GRANT `{auditor}` TO `{new}`@`%` WITH ADMIN OPTION" in copied["%"]
    assert copied["%"][-1] == f"SET DEFAULT ROLE `{reader}` FOR `{new}`@`%`"
    assert copied["10.0.%"] == [f"GRANT SELECT ON `{mysql_box.database}`.`t` TO `{new}`@`10.0.%`"]
    assert not any("PASSWORD" in line for lines in copied.values() for line in lines)
    for host in hosts:
        assert mysql_db.grants_match(admin, old, new, host) == (True, set(), set())
        assert mysql_db.copy_grants(admin, old, new, host) == []  # idempotent
    granted = rows(admin, "SHOW GRANTS FOR %s@'%%'", (new,))
    assert any("SELECT (`a`, `b`), INSERT (`a`, `c`)" in line for (line,) in granted)


def test_copy_grants_fails_clearly_when_the_admin_cannot_grant_a_role(
    mysql_box: MySQLSandbox, admin: pymysql.Connection
) -> None:
    old, new = mysql_box.app_user, mysql_box.prefix + "_user_20260121"
    (role,) = add_roles(mysql_box, "legacy")
    with mysql_box.root() as root:  # root made it, so only root holds it WITH ADMIN OPTION
        run(root, f"CREATE ROLE `{role}`", f"GRANT `{role}` TO `{old}`@'%'")
    mysql_db.create_user(
        admin, new, ["%"], servers.password(), like=mysql_db.account(admin, old, "%")
    )
    before = mysql_db.show_grants(admin, new, "%")

    with pytest.raises(DatabaseError) as failure:
        mysql_db.copy_grants(admin, old, new, "%")

    message = str(failure.value)
    assert f"cannot grant role `{role}` to {new}@%" in message
    assert "WITH ADMIN OPTION" in message and "\n" not in message
    assert mysql_db.show_grants(admin, new, "%") == before  # checked before granting anything

    with mysql_box.root() as root:
        run(root, f"GRANT `{role}` TO `{mysql_box.admin_user}`@'%' WITH ADMIN OPTION")
    mysql_db.copy_grants(admin, old, new, "%")
    assert mysql_db.grants_match(admin, old, new, "%")[0]


# --- objects with a definer ------------------------------------------------------------------


def show_create(conn: pymysql.Connection, obj: DefinedObject) -> dict[str, Any]:
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(f"SHOW CREATE {obj.kind} `{obj.schema}`.`{obj.name}`")
        row = dict(cur.fetchone())
    row.pop("Created", None)  # when a trigger was made
    # Everything but the DEFINER clause must survive: statement, sql_mode, character sets.
    return {key: DEFINER.sub("", value, count=1) for key, value in row.items()}


def make_objects(box: MySQLSandbox) -> None:
    app = pymysql.connect(host=box.host, port=box.port, user=box.app_user,
                          password=box.app_password, database=box.database,
                          ssl_disabled=True, autocommit=True)  # fmt: skip
    run(
        app,
        "CREATE TABLE t (a int, b int)",
        "CREATE TABLE log (m text)",
        "CREATE VIEW big AS SELECT a, b FROM t WHERE a > 1 /* views keep no comments */",
        "CREATE PROCEDURE purge_log(IN keep INT)\nBEGIN\n  -- comments stay\n"
        "  DELETE FROM log WHERE LENGTH(m) > keep;\nEND",
        "CREATE FUNCTION twice(x INT) RETURNS INT DETERMINISTIC RETURN x * 2",
        "CREATE TRIGGER t_first BEFORE INSERT ON t FOR EACH ROW SET NEW.b = NEW.a",
        "CREATE TRIGGER t_second BEFORE INSERT ON t FOR EACH ROW SET NEW.b = NEW.b + 1",
        "CREATE EVENT tidy ON SCHEDULE EVERY 1 HOUR DISABLE COMMENT 'nightly'"
        " DO INSERT INTO log VALUES ('tidy')",
    )
    # An object made under another sql_mode, whose body means something else without it.
    run(app, "SET SESSION sql_mode = 'ANSI_QUOTES,PIPES_AS_CONCAT'")
    run(app, "CREATE FUNCTION label(x TEXT) RETURNS TEXT DETERMINISTIC RETURN 'item: ' || x")
    app.close()
    # One sent by a latin1 client: re-sent as UTF-8 bytes, its text would turn to mojibake.
    latin1 = pymysql.connect(host=box.host, port=box.port, user=box.app_user,
                             password=box.app_password, database=box.database,
                             ssl_disabled=True, autocommit=True, charset="latin1")  # fmt: skip
    run(latin1, "CREATE FUNCTION greet() RETURNS VARCHAR(20) CHARSET utf8mb4 RETURN 'café'")
    latin1.close()


@pytest.mark.parametrize("path", ["mariadb", "mysql8-drop-and-create"])
def test_redefine_objects_keeps_bodies(
    mysql_box: MySQLSandbox, admin: pymysql.Connection, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    if path != "mariadb":  # MariaDB runs MySQL 8's DROP + CREATE path just as well
        monkeypatch.setattr(mysql_db, "_flavor", lambda conn: "mysql")
    db, app = mysql_box.database, mysql_box.app_user
    make_objects(mysql_box)
    reader = mysql_box.prefix + "_reader"
    run(
        admin,
        f"CREATE USER `{reader}`@'%'",
        f"GRANT EXECUTE ON PROCEDURE `{db}`.purge_log TO `{reader}`@'%' WITH GRANT OPTION",
    )

    objects = mysql_db.definer_objects(admin, db, app)
    assert [(o.kind, o.name) for o in objects] == [
        ("EVENT", "tidy"), ("FUNCTION", "greet"), ("FUNCTION", "label"), ("FUNCTION", "twice"),
        ("PROCEDURE", "purge_log"),
        ("TRIGGER", "t_first"), ("TRIGGER", "t_second"), ("VIEW", "big"),
    ]  # fmt: skip
    assert {o.definer for o in objects} == {f"{app}@%"}
    inspect = mysql_box.root()  # SHOW CREATE VIEW output depends on the current database
    before = {o.name: show_create(inspect, o) for o in objects}
    grants_before = mysql_db.show_grants(admin, reader, "%")

    for obj in objects:
        mysql_db.redefine_object(admin, obj)

    assert mysql_db.definer_objects(admin, db, app) == []
    assert len(mysql_db.definer_objects(admin, db, mysql_box.admin_user)) == len(objects)
    after = {o.name: show_create(inspect, o) for o in objects}
    assert after == before
    assert mysql_db.show_grants(admin, reader, "%") == grants_before
    order = rows(admin, "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS"
                 " WHERE TRIGGER_SCHEMA = %s ORDER BY ACTION_ORDER", (db,))  # fmt: skip
    assert order == [("t_first",), ("t_second",)]
    assert before["greet"]["character_set_client"] == "latin1"
    assert rows(admin, f"SELECT `{db}`.label('x'), `{db}`.twice(2), `{db}`.greet()") == [
        ("item: x", 4, "café")
    ]
    run(admin, f"INSERT INTO `{db}`.t (a) VALUES (5)")
    assert rows(admin, f"SELECT a, b FROM `{db}`.big") == [(5, 6)]

    # Idempotent: already the admin's, so nothing is re-created (triggers keep their timestamp).
    created = rows(admin, "SELECT TRIGGER_NAME, CREATED FROM information_schema.TRIGGERS"
                   " WHERE TRIGGER_SCHEMA = %s ORDER BY TRIGGER_NAME", (db,))  # fmt: skip
    for obj in objects:
        mysql_db.redefine_object(admin, obj)
    assert rows(admin, "SELECT TRIGGER_NAME, CREATED FROM information_schema.TRIGGERS"
                " WHERE TRIGGER_SCHEMA = %s ORDER BY TRIGGER_NAME", (db,)) == created  # fmt: skip
    assert {o.name: show_create(inspect, o) for o in objects} == before
    inspect.close()


def test_redefine_leaves_a_routine_alone_when_the_trial_copy_fails(
    mysql_box: MySQLSandbox, admin: pymysql.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mysql_db, "_flavor", lambda conn: "mysql")
    make_objects(mysql_box)
    (purge,) = [o for o in mysql_db.definer_objects(admin, mysql_box.database, mysql_box.app_user)
                if o.name == "purge_log"]  # fmt: skip
    real = mysql_db._execute_as_client

    def refuse_trial(conn: pymysql.Connection, statement: str, charset: str, *, what: str) -> None:
        if "rotor_check_" in statement:
            raise DatabaseError(f"{what}: (1064) refused for the test")
        real(conn, statement, charset, what=what)

    monkeypatch.setattr(mysql_db, "_execute_as_client", refuse_trial)
    with pytest.raises(DatabaseError, match="original untouched"):
        mysql_db.redefine_object(admin, purge)
    assert purge in mysql_db.definer_objects(admin, mysql_box.database, mysql_box.app_user)


def test_redefine_a_missing_object_fails(
    mysql_box: MySQLSandbox, admin: pymysql.Connection
) -> None:
    gone = DefinedObject("VIEW", mysql_box.database, "nope", f"{mysql_box.app_user}@%")
    with pytest.raises(DatabaseError, match="no longer exists"):
        mysql_db.redefine_object(admin, gone)


# --- connections -----------------------------------------------------------------------------


def test_connections_and_kill(mysql_box: MySQLSandbox, admin: pymysql.Connection) -> None:
    app = mysql_box.app_user
    ep = endpoint(mysql_box, app, mysql_box.app_password)
    clients = [mysql_db.connect(ep) for _ in range(2)]
    try:
        assert mysql_db.connections_by_user(admin)[app] == 2
        ids = mysql_db.connection_ids(admin, app)
        assert sorted(ids) == sorted(c.thread_id() for c in clients)
        assert mysql_db.connection_ids(admin, mysql_box.admin_user) == []  # never itself
        assert mysql_db.kill_connections(admin, ids, rds_kill=False) == 2
        wait_for(lambda: mysql_db.connection_ids(admin, app), lambda ids: ids == [],
                 what=f"{app}'s killed connections to go")
        assert app not in mysql_db.connections_by_user(admin)
        assert mysql_db.kill_connections(admin, ids, rds_kill=False) == 0  # already gone
        assert mysql_db.kill_connections(admin, [admin.thread_id()], rds_kill=False) == 0
        assert rows(admin, "SELECT 1") == [(1,)]
    finally:
        for client in clients:
            client.close()
