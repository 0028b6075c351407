"""Kind `postgres` on a realistic database: the app keeps exactly the rights it had.

End to end against the real PostgreSQL, moto's server and the fake Kubernetes API, like
tests/test_postgres_rotation.py: tables the app may only read, privileges granted to the app
user itself, and default privileges (`ALTER DEFAULT PRIVILEGES FOR ROLE <app user>`) that
another role relies on for the tables later migrations create.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from rotation import postgres_grants, postgres_rights
from rotation.errors import StepFailed
from tests.rig import ContinuityProbe, Rig, drive, point_at, rig
from tests.servers import password
from tests.test_postgres_rotation import APP_SCHEMA, MIGRATION, at, engine_for, execute, statuses


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    with rig("postgres", tmp_path) as r:
        point_at(r, monkeypatch)
        execute(r, r.box.app_user, r.box.app_password, APP_SCHEMA)
        yield r


def as_admin(world: Rig) -> psycopg.Connection:
    box = world.box
    return box.connect(box.admin_user, box.admin_password)


def reporting_role(world: Rig) -> tuple[str, str]:
    """Another team's login role (named after the rig, so the rig drops it)."""
    name, secret = f"{world.box.prefix}-reporting", password()
    with world.box.root() as root:
        root.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(secret)
            )
        )
    return name, secret


def test_a_table_the_app_may_only_read_rotates_and_stays_read_only(world):
    box, app = world.box, sql.Identifier(world.box.app_user)
    with as_admin(world) as conn:  # the admin's lookup tables, as on a real RDS database
        conn.execute("CREATE TABLE public.countries (code text PRIMARY KEY)")
        conn.execute("INSERT INTO public.countries VALUES ('GB')")
        conn.execute(sql.SQL("GRANT SELECT ON public.countries TO {}").format(app))
        conn.execute("CREATE TABLE public.spatial_ref_sys (srid int PRIMARY KEY, srtext text)")
        conn.execute("GRANT SELECT ON public.spatial_ref_sys TO PUBLIC")
    engine = engine_for(world)
    rotation = engine.start("postgres", world.app, "staging", "alice")
    with ContinuityProbe(world) as probe:
        final = drive(engine, rotation.id)
    assert final.status == "done", statuses(final)
    assert probe.failures == [] and probe.logins > 0

    assert f"{box.app_user} may only read 2 tables, and keeps only that" in (
        final.step("preflight").result
    )
    owner_role = f"{world.app}-owner-role"
    assert f"GRANT SELECT ON TABLE public.countries TO {owner_role}" in (
        final.step("convert").gate_summary
    )
    assert "read/write OK on 2 tables, read-only on 2; same rights as" in (
        final.step("test-login").result
    )
    new = world.current()
    with box.connect(new["username"], new["password"]) as conn:
        assert conn.execute("SELECT code FROM public.countries").fetchall() == [("GB",)]
        conn.execute("SELECT count(*) FROM public.spatial_ref_sys")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO public.countries VALUES ('FR')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM public.spatial_ref_sys")
    execute(world, new["username"], new["password"], MIGRATION)


def test_privileges_granted_to_the_app_user_itself_survive_the_rotation(world):
    box, app = world.box, sql.Identifier(world.box.app_user)
    readers = sql.Identifier(f"{box.prefix}-readers")
    with as_admin(world) as conn:  # written by the app, owned by the admin
        conn.execute("CREATE TABLE public.audit_events (id bigserial PRIMARY KEY, what text)")
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.audit_events TO {}").format(app)
        )
        conn.execute(
            sql.SQL("GRANT USAGE ON SEQUENCE public.audit_events_id_seq TO {}").format(app)
        )
        conn.execute("CREATE TABLE public.flags (name text PRIMARY KEY, enabled bool)")
        conn.execute(sql.SQL("GRANT SELECT, UPDATE (enabled) ON public.flags TO {}").format(app))
        conn.execute(
            "CREATE FUNCTION public.audit(text) RETURNS void LANGUAGE sql "
            "AS $$ INSERT INTO public.audit_events (what) VALUES ($1) $$"
        )
        conn.execute("REVOKE EXECUTE ON FUNCTION public.audit(text) FROM PUBLIC")
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION public.audit(text) TO {}").format(app))
        # A shared role the app was made a member of.
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(readers))
        conn.execute("CREATE TABLE public.rates (currency text, rate numeric)")
        conn.execute(sql.SQL("GRANT SELECT ON public.rates TO {}").format(readers))
        conn.execute(sql.SQL("GRANT {} TO {}").format(readers, app))
    engine = engine_for(world)
    final = drive(engine, engine.start("postgres", world.app, "staging", "alice").id)
    assert final.status == "done", statuses(final)

    assert f"{box.app_user} holds 5 privileges directly" in final.step("preflight").result
    new = world.current()
    execute(
        world,
        new["username"],
        new["password"],
        """
        INSERT INTO public.audit_events (what) VALUES ('x');
        UPDATE public.audit_events SET what = 'y';
        SELECT public.audit('z');
        UPDATE public.flags SET enabled = true;
        SELECT * FROM public.rates
    """,
    )
    with box.connect(new["username"], new["password"]) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE public.flags SET name = 'renamed'")  # only `enabled`, as before
    # In the owner role, so the next user has them too; the old user is gone.
    owner_role = final.data["owner_role"]
    assert f"GRANT {box.prefix}-readers TO {owner_role}" in final.step("convert").gate_summary
    with as_admin(world) as conn:
        assert postgres_grants.grants_to_copy(conn, new["username"], owner_role) == []
        assert postgres_grants.roles_to_copy(conn, new["username"], owner_role) == []
    assert box.app_user not in world.users()


def test_another_role_reads_a_table_a_migration_creates_after_the_rotation(world):
    box = world.box
    reporting, reporting_secret = reporting_role(world)
    with box.root(box.database) as root:  # what the DBA set up for the analytics team
        root.execute(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public GRANT SELECT ON TABLES TO {}"
            ).format(sql.Identifier(box.app_user), sql.Identifier(reporting))
        )
    engine = engine_for(world)
    rotation = engine.start("postgres", world.app, "staging", "alice")
    row = drive(engine, rotation.id, until=at("retire", "needs-approval"))
    owner_role, new = row.data["owner_role"], row.data["new_username"]
    summary = row.current.gate_summary
    assert (
        f"DROP OWNED drops the default privileges defined for {box.app_user} (FOR ROLE "
        f"{box.app_user} IN SCHEMA public GRANT SELECT ON TABLES TO {reporting}); "
        f"{owner_role} and {new} keep them" in summary
    )
    assert f"default privileges: FOR ROLE {new} IN SCHEMA public" in (
        row.step("create-user").result
    )
    final = drive(engine, rotation.id)
    assert final.status == "done", statuses(final)
    assert box.app_user not in world.users()

    # The next deploys: a migration as the new user, and one that runs as the owner role.
    current = world.current()
    execute(
        world,
        current["username"],
        current["password"],
        f"""
        CREATE TABLE public.orders (id bigserial PRIMARY KEY, total numeric);
        SET ROLE "{owner_role}";
        CREATE TABLE public.refunds (id bigserial PRIMARY KEY)
    """,
    )
    with box.connect(reporting, reporting_secret) as conn:
        conn.execute("SELECT count(*) FROM public.orders")
        conn.execute("SELECT count(*) FROM public.refunds")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO public.orders (total) VALUES (1)")

    # And after the next rotation, which retires this user in turn.
    world.clock.advance(1)
    second = drive(engine, engine.start("postgres", world.app, "staging", "alice").id)
    assert second.status == "done", statuses(second)
    assert new not in world.users()
    latest = world.current()
    execute(world, latest["username"], latest["password"], "CREATE TABLE public.returns (id int)")
    with box.connect(reporting, reporting_secret) as conn:
        conn.execute("SELECT count(*) FROM public.returns")


@pytest.mark.parametrize(
    ("before", "after", "outcome"),
    [
        ({"table public.t": "r"}, {"table public.t": "r"}, "same rights as old on 1 objects"),
        (
            {"table public.t": "r", "table public.gone": "r"},
            {"table public.t": "rO", "table public.made_since": "arwd"},
            "same rights as old on 1 objects; more on 1: table public.t (also owner's rights)",
        ),
        (
            {"table public.t": "arwd", "sequence public.s": "Urw"},
            {"table public.t": "r", "sequence public.s": "Urw"},
            "new has fewer rights than old had on 1 of 2 objects: "
            "table public.t (no INSERT, UPDATE, DELETE)",
        ),
    ],
)
def test_rights_compare_the_same_objects_fewer_fail_and_more_are_reported(before, after, outcome):
    try:
        assert postgres_rights.check_same(before, after, "new", "old") == outcome
    except StepFailed as exc:
        assert str(exc) == outcome
