"""rotation.postgres_db against the real PostgreSQL, through the RDS-like admin of `postgres_box`."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator
from datetime import date
from functools import partial

import psycopg
import pytest
from psycopg import sql

from rotation import postgres_db as pg
from rotation import postgres_grants as grants
from rotation import postgres_rights as rights
from rotation.errors import DatabaseError, InvalidIdentifier, StepFailed
from rotation.redact import MASK, redact
from tests.servers import PostgresSandbox, password

DAY = date(2026, 1, 21)

# What a Rails-ish app user leaves behind: every kind of object the runbook cares about,
# plus an identity column, a generated column and a trusted extension.
APP_SCHEMA = """
    CREATE SCHEMA billing;
    CREATE TABLE public.users (id bigserial PRIMARY KEY, email text NOT NULL);
    CREATE TABLE billing.invoices (
        id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id bigint REFERENCES public.users (id),
        amount numeric,
        doubled numeric GENERATED ALWAYS AS (amount * 2) STORED);
    CREATE SEQUENCE billing.invoice_numbers;
    CREATE VIEW public.user_emails AS SELECT email FROM public.users;
    CREATE MATERIALIZED VIEW billing.totals AS
        SELECT user_id, sum(amount) AS total FROM billing.invoices GROUP BY user_id;
    CREATE FUNCTION public.normalise(text) RETURNS text LANGUAGE sql IMMUTABLE
        AS $$ SELECT lower($1) $$;
    CREATE PROCEDURE billing.touch() LANGUAGE sql AS $$ SELECT 1 $$;
    CREATE TYPE public.mood AS ENUM ('ok', 'sad');
    CREATE TYPE billing.amounts AS (net numeric, gross numeric);
    CREATE EXTENSION pgcrypto;
    INSERT INTO public.users (email) VALUES ('a@example.com');
"""

APP_OBJECTS = {
    ("schema", "billing"),
    ("table", "public.users"),
    ("table", "billing.invoices"),
    ("sequence", "public.users_id_seq"),
    ("sequence", "billing.invoices_id_seq"),
    ("sequence", "billing.invoice_numbers"),
    ("view", "public.user_emails"),
    ("materialized view", "billing.totals"),
    ("function", "public.normalise(text)"),
    ("procedure", "billing.touch()"),
    ("type", "public.mood"),
    ("type", "billing.amounts"),
    ("extension", "pgcrypto"),
}


def scram_matches(verifier: str, secret: str) -> bool:
    """Whether a PostgreSQL SCRAM-SHA-256 verifier was made from `secret` (RFC 5802/7677)."""
    method, _, rest = verifier.partition("$")
    iterations, _, rest = rest.partition(":")
    salt, _, rest = rest.partition("$")
    stored_key, _, _server_key = rest.partition(":")
    assert method == "SCRAM-SHA-256" and iterations == "4096"
    salted = hashlib.pbkdf2_hmac("sha256", secret.encode(), base64.b64decode(salt), 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


def endpoint(
    box: PostgresSandbox,
    user: str | None = None,
    secret: str | None = None,
    database: str | None = None,
) -> pg.Endpoint:
    return pg.Endpoint(
        host=box.host,
        port=box.port,
        user=user or box.admin_user,
        password=secret or box.admin_password,
        database=database or box.database,
        tls="disabled",
    )


def owner_role(box: PostgresSandbox) -> str:
    return pg.owner_role_name(box.app_user)


def as_user(box: PostgresSandbox, user: str, secret: str, statements: str) -> None:
    with box.connect(user, secret) as conn:
        conn.execute(statements)  # fixed test SQL; several statements in one simple query


def owner_of(conn: psycopg.Connection, table: str) -> str:
    return conn.execute(
        "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass", (table,)
    ).fetchone()[0]  # type: ignore[index]


@pytest.fixture
def box(postgres_box: PostgresSandbox) -> PostgresSandbox:
    as_user(postgres_box, postgres_box.app_user, postgres_box.app_password, APP_SCHEMA)
    return postgres_box


@pytest.fixture
def admin(box: PostgresSandbox) -> Iterator[psycopg.Connection]:
    with pg.connect(endpoint(box)) as conn:
        yield conn


def rotate(box: PostgresSandbox, admin: psycopg.Connection, current_user: str) -> tuple[str, str]:
    """One rotation's database steps: convert for the current user, create and probe a new one."""
    owner = owner_role(box)
    before = rights.rights(admin, current_user)
    if pg.needs_conversion(pg.preflight(admin, current_user, owner), current_user):
        pg.convert_to_owner_role(admin, current_user, owner)
    name, secret = pg.new_user_name(admin, box.app_user, DAY), password()
    pg.create_login_user(admin, name, secret, owner)
    assert rights.probe(endpoint(box, name, secret), before, current_user).startswith(
        "read/write OK"
    )
    return name, secret


# -- names and endpoints ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["account-api", "account-api-user-20260121-2", "a_b", "X1"])
def test_role_names_with_hyphens_are_valid(name: str) -> None:
    assert pg.validate_role_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        'evil"; DROP ROLE x; --',
        "a b",
        "x;y",
        "it's",
        "",
        "é" * 32,
        "a" * 64,
        "pg_signal_backend",
        "tab\tname",
    ],
)
def test_unsafe_role_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidIdentifier):
        pg.validate_role_name(name)
    with pytest.raises(InvalidIdentifier):
        pg.owner_role_name(name)


def test_owner_role_name_follows_the_runbook() -> None:
    assert pg.owner_role_name("account-api") == "account-api-owner-role"


def test_endpoint_hides_and_registers_the_password() -> None:
    secret = password()
    ep = pg.Endpoint("db.example", 5432, "account-api", secret, "account-api_production")
    assert secret not in repr(ep)
    assert redact(f"postgresql://u:{secret}@h") == f"postgresql://u:{MASK}@h"


def test_refused_login_names_user_and_database_but_not_the_password(
    postgres_box: PostgresSandbox,
) -> None:
    # The test server trusts every local login, so a user that does not exist stands in
    # for a wrong password.
    nobody, secret = f"{postgres_box.prefix}-nobody", password()
    with pytest.raises(DatabaseError) as info:
        pg.connect(endpoint(postgres_box, nobody, secret))
    message = str(info.value)
    assert message.startswith(
        f"could not log in as {nobody}@{postgres_box.host}:"
        f"{postgres_box.port}/{postgres_box.database}: "
    )
    assert f'role "{nobody}" does not exist' in message
    assert secret not in message and "\n" not in message
    assert info.value.__cause__ is None


def test_tls_required_fails_clearly_on_a_server_without_tls(postgres_box: PostgresSandbox) -> None:
    ep = pg.Endpoint(
        postgres_box.host,
        postgres_box.port,
        postgres_box.admin_user,
        postgres_box.admin_password,
        postgres_box.database,
        tls="required",
    )
    with pytest.raises(
        DatabaseError,
        match="could not log in as .*: server does not support SSL, but SSL was required$",
    ):
        pg.connect(ep)


def test_new_user_name_skips_names_taken(box: PostgresSandbox, admin: psycopg.Connection) -> None:
    first = f"{box.app_user}-user-20260121"
    assert pg.new_user_name(admin, box.app_user, DAY) == first
    for taken in (first, f"{first}-2"):
        admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(taken)))
    assert pg.new_user_name(admin, box.app_user, DAY) == f"{first}-3"


# -- preflight and conversion -----------------------------------------------------------


def test_preflight_reports_every_kind_the_app_user_owns(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    report = pg.preflight(admin, box.app_user, owner_role(box))

    assert report.database_owner == box.app_user
    owned = {(o.kind, o.name) for o in report.objects if o.owner == box.app_user}
    assert owned == APP_OBJECTS | {("database", box.database)}
    # Nothing else: not pgcrypto's functions, nor row types, array types or indexes.
    others = {(o.kind, o.name, o.owner) for o in report.objects if o.owner != box.app_user}
    assert others == {("schema", "public", "pg_database_owner")}
    assert report.roles == {box.app_user: [], box.admin_user: [box.app_user]}
    assert report.owners[box.app_user] == len(APP_OBJECTS) + 1
    assert pg.needs_conversion(report, box.app_user)


def test_preflight_lists_privileges_the_app_user_holds_directly(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    with box.root(database=box.database) as root:
        root.execute("CREATE TABLE public.countries (code text)")
        root.execute(
            sql.SQL("GRANT SELECT ON public.countries TO {}").format(sql.Identifier(box.app_user))
        )
    report = pg.preflight(admin, box.app_user, owner_role(box))
    assert report.direct_grants == ["table public.countries"]
    assert report.owners[box.root_user] == 1


def test_conversion_gives_everything_to_the_owner_role_once(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    owner = owner_role(box)
    before = rights.rights(admin, box.app_user)
    changes = pg.convert_to_owner_role(admin, box.app_user, owner)

    assert changes == [
        f"created role {owner} (NOLOGIN)",
        f"granted {owner} to {box.admin_user}",
        f"database {box.database} now owned by {owner}",
        f"reassigned {len(APP_OBJECTS)} objects from {box.app_user} to {owner}",
        f"granted {owner} to {box.app_user}",
    ]
    report = pg.preflight(admin, box.app_user, owner)
    assert report.database_owner == owner
    assert {(o.kind, o.name) for o in report.objects if o.owner == owner} == APP_OBJECTS | {
        ("database", box.database)
    }
    assert set(report.owners) == {owner, "pg_database_owner"}
    assert report.roles[box.app_user] == [owner]
    assert report.roles[owner] == []
    assert not pg.needs_conversion(report, box.app_user)
    assert pg.convert_to_owner_role(admin, box.app_user, owner) == []

    # The app carries on: reads, writes, creates tables in public (PG15: via pg_database_owner).
    app = endpoint(box, box.app_user, box.app_password)
    assert rights.probe(app, before, "before") == (
        f"read/write OK on 2 tables; same rights as before on {len(before)} objects"
    )
    as_user(
        box,
        box.app_user,
        box.app_password,
        """
        INSERT INTO public.users (email) VALUES ('b@example.com');
        INSERT INTO billing.invoices (user_id, amount) VALUES (1, 10);
        REFRESH MATERIALIZED VIEW billing.totals;
        CREATE TABLE public.after_conversion (id int);
    """,
    )


def test_login_owner_role_is_refused_and_nothing_changes(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    owner = owner_role(box)
    with box.root() as root:
        root.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
    before = pg.preflight(admin, box.app_user, owner)

    with pytest.raises(StepFailed, match=f"{owner} already exists and can log in"):
        pg.convert_to_owner_role(admin, box.app_user, owner)
    assert pg.preflight(admin, box.app_user, owner) == before


def test_owner_role_with_foreign_members_is_refused_and_nothing_changes(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    owner, intruder = owner_role(box), f"{box.prefix}-reporting"
    with box.root() as root:
        for role in (owner, intruder):
            root.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        root.execute(
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(owner), sql.Identifier(intruder))
        )
    before = pg.preflight(admin, box.app_user, owner)

    with pytest.raises(StepFailed, match=f"members Rotor does not manage \\({intruder}\\)"):
        pg.convert_to_owner_role(admin, box.app_user, owner)
    assert pg.preflight(admin, box.app_user, owner) == before


def test_conversion_behind_a_long_transaction_times_out_and_changes_nothing(
    box: PostgresSandbox,
) -> None:
    owner = owner_role(box)
    with box.connect(box.app_user, box.app_password, autocommit=False) as app:
        app.execute("SELECT 1 FROM public.users")  # holds ACCESS SHARE until rollback
        with pg.connect(endpoint(box), lock_timeout=0.2) as admin:
            before = pg.preflight(admin, box.app_user, owner)
            with pytest.raises(DatabaseError, match="lock timeout .*retry when it has ended"):
                pg.convert_to_owner_role(admin, box.app_user, owner)
            assert pg.preflight(admin, box.app_user, owner) == before
            assert not pg.role_exists(admin, owner)
        app.rollback()


def test_admin_without_createrole_is_told_so(postgres_box: PostgresSandbox) -> None:
    with pg.connect(endpoint(postgres_box)) as conn:
        pg.check_admin(conn)
    with postgres_box.root() as root:
        root.execute(
            sql.SQL("ALTER ROLE {} NOCREATEROLE").format(sql.Identifier(postgres_box.admin_user))
        )
    with (
        pg.connect(endpoint(postgres_box)) as conn,
        pytest.raises(DatabaseError, match=f"^{postgres_box.admin_user} lacks CREATEROLE"),
    ):
        pg.check_admin(conn)


# -- new users --------------------------------------------------------------------------


def test_new_user_inherits_the_owner_role_and_reads_and_writes(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    owner = owner_role(box)
    before = rights.rights(admin, box.app_user)
    pg.convert_to_owner_role(admin, box.app_user, owner)
    name, first, second = pg.new_user_name(admin, box.app_user, DAY), password(), password()

    pg.create_login_user(admin, name, first, owner)
    pg.create_login_user(admin, name, second, owner)  # a retry after a crash: new password wins

    assert pg.memberships(admin, name) == {owner}
    assert rights.probe(endpoint(box, name, second), before, box.app_user).startswith(
        "read/write OK on 2 tables; same rights as"
    )
    as_user(
        box,
        name,
        second,
        """
        INSERT INTO billing.invoices (user_id, amount) VALUES (1, 5);
        SELECT nextval('billing.invoice_numbers');
        REFRESH MATERIALIZED VIEW billing.totals;
    """,
    )
    with box.root() as root:
        stored = root.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,)
        ).fetchone()[0]  # type: ignore[index]
    # The server only ever saw a verifier, and it is the second password's (the test server
    # trusts local logins, so check the verifier the way the server would, RFC 5802).
    assert scram_matches(stored, second) and not scram_matches(stored, first)
    assert pg.new_user_name(admin, box.app_user, DAY) == f"{name}-2"


def _reporting(box: PostgresSandbox) -> tuple[str, str]:
    """A reporting role that logs in, as analytics teams have."""
    name, secret = f"{box.prefix}-reporting", password()
    with box.root() as root:
        root.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(secret)
            )
        )
    return name, secret


def _lookup_tables(box: PostgresSandbox) -> None:
    """What a real database holds beside the app's tables: a lookup table the admin owns and
    the app may only read (granted to it directly), and PostGIS's spatial_ref_sys, readable by
    PUBLIC."""
    with pg.connect(endpoint(box)) as conn:
        conn.execute("CREATE TABLE public.countries (code text PRIMARY KEY)")
        conn.execute("INSERT INTO public.countries VALUES ('GB')")
        conn.execute(
            sql.SQL("GRANT SELECT ON public.countries TO {}").format(sql.Identifier(box.app_user))
        )
        conn.execute("CREATE TABLE public.spatial_ref_sys (srid int PRIMARY KEY, srtext text)")
        conn.execute("GRANT SELECT ON public.spatial_ref_sys TO PUBLIC")


def test_a_table_the_app_may_only_read_stays_read_only_and_passes_the_probe(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    _lookup_tables(box)
    owner = owner_role(box)
    before = rights.rights(admin, box.app_user)
    assert before["table public.countries"] == "r"
    assert before["table public.spatial_ref_sys"] == "r"

    pg.convert_to_owner_role(admin, box.app_user, owner)
    assert grants.carry_over_plan(admin, box.app_user, owner, [owner]) == [
        f"GRANT SELECT ON TABLE public.countries TO {owner}"
    ]
    assert grants.carry_over(admin, box.app_user, owner, [owner]) == [
        f"granted SELECT ON TABLE public.countries to {owner} (held by {box.app_user} directly)"
    ]
    assert grants.carry_over(admin, box.app_user, owner, [owner]) == []  # idempotent
    name, secret = pg.new_user_name(admin, box.app_user, DAY), password()
    pg.create_login_user(admin, name, secret, owner)

    summary = rights.probe(endpoint(box, name, secret), before, box.app_user)
    assert summary == (
        f"read/write OK on 2 tables, read-only on 2; same rights as {box.app_user} "
        f"on {len(before)} objects"
    )
    with box.connect(name, secret) as conn:
        assert conn.execute("SELECT code FROM public.countries").fetchall() == [("GB",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO public.countries VALUES ('FR')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM public.spatial_ref_sys")


def test_the_probe_names_what_the_new_user_may_not_do_and_a_grant_the_admin_cannot_copy(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    with box.root(database=box.database) as root:  # the superuser's: the admin cannot grant it
        root.execute("CREATE TABLE public.audit_log (id int)")
        root.execute(
            sql.SQL("GRANT SELECT ON public.audit_log TO {}").format(sql.Identifier(box.app_user))
        )
    owner = owner_role(box)
    before = rights.rights(admin, box.app_user)
    pg.convert_to_owner_role(admin, box.app_user, owner)
    with pytest.raises(
        StepFailed,
        match=f"could not grant SELECT ON TABLE public.audit_log to {owner}: the admin may not",
    ):
        grants.copy_grants(admin, box.app_user, owner)
    name, secret = pg.new_user_name(admin, box.app_user, DAY), password()
    pg.create_login_user(admin, name, secret, owner)
    with pytest.raises(
        StepFailed,
        match=rf"{name} has fewer rights than {box.app_user} had on 1 of {len(before)} objects: "
        r"table public\.audit_log \(no SELECT\)$",
    ):
        rights.probe(endpoint(box, name, secret), before, box.app_user)


def test_default_privileges_of_the_old_user_are_kept_for_the_owner_role_and_the_new_user(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    reporting, reporting_secret = _reporting(box)
    app = sql.Identifier(box.app_user)
    with box.root(database=box.database) as root:
        root.execute(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public GRANT SELECT ON TABLES TO {}"
            ).format(app, sql.Identifier(reporting))
        )
        root.execute(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC"
            ).format(app)
        )
    assert grants.default_privileges(admin, box.app_user) == [
        f"FOR ROLE {box.app_user} REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC",
        f"FOR ROLE {box.app_user} IN SCHEMA public GRANT SELECT ON TABLES TO {reporting}",
    ]
    owner = owner_role(box)
    user1, secret1 = rotate(box, admin, box.app_user)

    # Without the carry-over, the retirement refuses before DROP OWNED and changes nothing.
    keep = partial(grants.check_kept, old=box.app_user, new=user1, heirs=[owner, user1])
    with pytest.raises(StepFailed, match=f"DROP OWNED BY {box.app_user} would drop default"):
        pg.retire_user(admin, box.app_user, owner, database=box.database, before_drop=keep)
    assert pg.role_exists(admin, box.app_user)
    assert len(grants.default_privileges(admin, box.app_user)) == 2

    changes = grants.carry_over(admin, box.app_user, owner, [owner, user1])
    assert (
        f"default privileges: FOR ROLE {user1} IN SCHEMA public GRANT SELECT ON TABLES TO "
        f"{reporting} (as {box.app_user} had)" in changes
    )
    assert grants.carry_over(admin, box.app_user, owner, [owner, user1]) == []
    pg.retire_user(admin, box.app_user, owner, database=box.database, before_drop=keep)
    assert not pg.role_exists(admin, box.app_user)

    # Later migrations, as the new user and as the owner role: reporting reads both tables,
    # and PUBLIC still may not run new functions.
    as_user(
        box,
        user1,
        secret1,
        f"""CREATE TABLE public.made_later (id int);
        CREATE FUNCTION public.later_fn() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;
        SET ROLE "{owner}";
        CREATE TABLE public.made_later_by_owner (id int)""",
    )
    with box.connect(reporting, reporting_secret) as conn:
        conn.execute("SELECT * FROM public.made_later")
        conn.execute("SELECT * FROM public.made_later_by_owner")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT public.later_fn()")


def test_default_privileges_other_roles_give_the_old_user_are_given_to_the_owner_role(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    app, owner = sql.Identifier(box.app_user), owner_role(box)
    # The admin's lookup tables: each new one readable by the app.
    admin.execute(
        sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {}").format(
            app
        )
    )
    user1, secret1 = rotate(box, admin, box.app_user)
    assert [c.describe() for c in grants.default_grants_to_copy(admin, box.app_user, owner)] == [
        f"FOR ROLE {box.admin_user} IN SCHEMA public GRANT SELECT ON TABLES TO {owner}"
    ]
    grants.carry_over(admin, box.app_user, owner, [owner, user1])
    assert grants.default_grants_to_copy(admin, box.app_user, owner) == []
    keep = partial(grants.check_kept, old=box.app_user, new=user1, heirs=[owner, user1])
    pg.retire_user(admin, box.app_user, owner, database=box.database, before_drop=keep)

    admin.execute("CREATE TABLE public.currencies (code text)")
    with box.connect(user1, secret1) as conn:
        conn.execute("SELECT * FROM public.currencies")

    # The superuser's default privileges: the admin may not change them, and says what to run.
    with box.root(database=box.database) as root:
        root.execute(
            sql.SQL("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {}").format(
                sql.Identifier(user1)
            )
        )
    with pytest.raises(
        StepFailed,
        match=f"the admin is not {box.root_user}, so it cannot run ALTER DEFAULT PRIVILEGES "
        f"FOR ROLE {box.root_user} GRANT SELECT ON TABLES TO {owner}; run that as "
        f"{box.root_user}, then retry",
    ):
        grants.carry_over(admin, user1, owner, [owner])


# -- connections and retiring -----------------------------------------------------------


def test_terminate_connections_ends_a_held_session(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    user, secret = f"{box.prefix}-user-held", password()
    admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(user), sql.Literal(secret)
        )
    )
    held = psycopg.connect(
        host=box.host,
        port=box.port,
        user=user,
        password=secret,
        dbname=box.database,
        application_name="held-app",
    )
    try:
        assert (user, "held-app", 1) in pg.connections(admin)
        assert pg.terminate_connections(admin, user) == 1  # PG15: admin is granted the role first
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
        assert all(u != user for u, _, _ in pg.connections(admin))
        assert pg.terminate_connections(admin, user) == 0
    finally:
        held.close()


def test_two_rotations_back_to_back_and_retiring_each_old_user(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    owner = owner_role(box)
    user1, secret1 = rotate(box, admin, box.app_user)
    # Still running on the old user after conversion, and already on the new one.
    as_user(box, box.app_user, box.app_password, "CREATE TABLE public.late_old (id int)")
    as_user(box, user1, secret1, "CREATE TABLE public.made_by_user1 (id int)")

    changes = pg.retire_user(admin, box.app_user, owner, database=box.database)

    assert changes == [
        f"reassigned 1 objects from {box.app_user} to {owner}",
        f"dropped role {box.app_user}",
    ]
    assert not pg.role_exists(admin, box.app_user)
    assert owner_of(admin, "public.late_old") == owner
    assert owner_of(admin, "public.made_by_user1") == user1
    assert pg.retire_user(admin, box.app_user, owner, database=box.database) == []

    # Second rotation straight away: user1 is now the current user and owns a table.
    user2, secret2 = rotate(box, admin, user1)
    assert user2 == f"{user1}-2"
    assert owner_of(admin, "public.made_by_user1") == owner
    as_user(box, user1, secret1, "CREATE TABLE public.late_user1 (id int)")
    before = rights.rights(admin, user1)

    assert pg.retire_user(admin, user1, owner, database=box.database) == [
        f"reassigned 1 objects from {user1} to {owner}",
        f"dropped role {user1}",
    ]
    assert not pg.role_exists(admin, user1)
    assert owner_of(admin, "public.late_user1") == owner
    assert rights.probe(endpoint(box, user2, secret2), before, user1).startswith(
        "read/write OK on 5 tables; same rights as"
    )


def test_retire_refuses_while_the_old_user_is_connected(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    owner = owner_role(box)
    rotate(box, admin, box.app_user)
    held = box.connect(box.app_user, box.app_password)
    try:
        with pytest.raises(StepFailed, match=f"{box.app_user} still has 1 connections"):
            pg.retire_user(admin, box.app_user, owner, database=box.database)
        assert pg.role_exists(admin, box.app_user)
        assert pg.terminate_connections(admin, box.app_user) == 1
        assert pg.retire_user(admin, box.app_user, owner, database=box.database)[-1] == (
            f"dropped role {box.app_user}"
        )
    finally:
        held.close()


@pytest.mark.parametrize("holding", ["table", "privilege", "database"])
def test_retire_refuses_when_the_old_user_holds_something_in_another_database(
    box: PostgresSandbox, admin: psycopg.Connection, holding: str
) -> None:
    owner, other = owner_role(box), f"{box.prefix}-other_test"
    rotate(box, admin, box.app_user)
    app = sql.Identifier(box.app_user)
    with box.root() as root:
        root.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
        if holding == "database":
            root.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(other), app)
            )
    if holding != "database":
        with box.root(database=other) as root:
            root.execute("CREATE TABLE public.legacy (id int)")
            root.execute(
                sql.SQL("ALTER TABLE public.legacy OWNER TO {}").format(app)
                if holding == "table"
                else sql.SQL("GRANT SELECT ON public.legacy TO {}").format(app)
            )
    before = pg.preflight(admin, box.app_user, owner)

    with pytest.raises(StepFailed, match=f"{box.app_user} .*database {other}; REASSIGN/DROP OWNED"):
        pg.retire_user(admin, box.app_user, owner, database=box.database)
    assert pg.role_exists(admin, box.app_user)
    assert pg.preflight(admin, box.app_user, owner) == before
    with box.root() as root:
        assert root.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (other,)
        ).fetchone() == (box.app_user if holding == "database" else box.root_user,)


def test_retire_refuses_to_remove_the_last_login_user_of_the_owner_role(
    box: PostgresSandbox, admin: psycopg.Connection
) -> None:
    owner = owner_role(box)
    pg.convert_to_owner_role(admin, box.app_user, owner)
    with pytest.raises(StepFailed, match="last login role"):
        pg.retire_user(admin, box.app_user, owner, database=box.database)
    assert pg.role_exists(admin, box.app_user)


def test_retire_refuses_the_wrong_database(box: PostgresSandbox, admin: psycopg.Connection) -> None:
    with pytest.raises(StepFailed, match="connect to other"):
        pg.retire_user(admin, box.app_user, owner_role(box), database="other")
