"""Kind `postgres` end to end: the real PostgreSQL, moto's server, the fake Kubernetes API.

Most tests rotate `staging` of a plain rig. The overnight-restore tests rotate `production`
of a rig whose staging is a second PostgreSQL server that `Rig.restore()` turns into a copy of
production's; they move the rig's clock to the restore instead of sleeping through the night.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from bot.settings import Settings
from bot.wiring import build_engine
from rotation import catalogue
from rotation import postgres_db as pg
from rotation.catalogue import Waits
from rotation.engine import Engine
from rotation.errors import NotAllowed, UnknownName
from rotation.postgres import KIND, next_restore
from rotation.store import RotationRow, StepRow
from tests.rig import Clock, ContinuityProbe, Rig, drive, point_at, read_state, rig
from tests.waiting import wait_for

# Saturday evening before the clocks go forward in London: the 03:00 restore after it is
# 02:00 UTC, not 03:00.
EVENING = datetime(2026, 3, 28, 21, 30, tzinfo=UTC).timestamp()
NEXT_RESTORE = datetime(2026, 3, 29, 2, 0, tzinfo=UTC).timestamp()

# What a Rails app's user leaves behind before the conversion, sequences and functions included.
APP_SCHEMA = """
    CREATE SCHEMA billing;
    CREATE TABLE public.users (id bigserial PRIMARY KEY, email text NOT NULL);
    CREATE TABLE billing.invoices (
        id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id bigint REFERENCES public.users (id), amount numeric);
    CREATE SEQUENCE billing.invoice_numbers;
    CREATE VIEW public.user_emails AS SELECT email FROM public.users;
    CREATE MATERIALIZED VIEW billing.totals AS
        SELECT user_id, sum(amount) AS total FROM billing.invoices GROUP BY user_id;
    CREATE FUNCTION public.normalise(text) RETURNS text LANGUAGE sql IMMUTABLE
        AS $$ SELECT lower($1) $$;
    CREATE TYPE public.mood AS ENUM ('ok', 'sad');
    INSERT INTO public.users (email) VALUES ('a@example.com');
"""

# What the app does on every deploy with whichever user it has: DDL on the old objects needs
# their owner's rights, which only the owner role's membership gives.
MIGRATION = """
    INSERT INTO public.users (email) VALUES (public.normalise('B@Example.com'));
    INSERT INTO billing.invoices (user_id, amount) VALUES (1, 10);
    SELECT nextval('billing.invoice_numbers');
    ALTER TABLE public.users ADD COLUMN IF NOT EXISTS name text;
    CREATE OR REPLACE FUNCTION public.normalise(text) RETURNS text LANGUAGE sql IMMUTABLE
        AS $$ SELECT lower(trim($1)) $$;
    REFRESH MATERIALIZED VIEW billing.totals;
    SELECT count(*) FROM public.user_emails;
"""


# -- the world ---------------------------------------------------------------------------




@pytest.fixture
def world(postgres_world: Rig) -> Rig:
    return postgres_world


@pytest.fixture
def restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    """Production, and a staging restored from it at 03:00 London time; Saturday evening."""
    with rig("postgres", tmp_path, restored=True, clock=Clock(EVENING)) as r:
        point_at(r, monkeypatch)
        yield r


class Told:
    """2nd line, as the engine tells it before a destructive step in production."""

    def __init__(self) -> None:
        self.notices: list[tuple[str, str]] = []

    def notify(self, rotation: RotationRow, step: StepRow, summary: str, approved_by: str) -> str:
        self.notices.append((step.name, summary))
        return f"#govuk-2ndline/{len(self.notices)}"


def engine_for(world: Rig, told: Told | None = None) -> Engine:
    return build_engine(Settings.load(), second_line=told, clock=world.clock)




def at(name: str, status: str) -> Callable[[RotationRow], bool]:
    return lambda row: (
        row.current is not None
        and (row.current.name, row.current.status)
        == (
            name,
            status,
        )
    )


def statuses(row: RotationRow) -> list[tuple[str, str, str | None]]:
    return [(s.name, s.status, s.error) for s in row.steps]


def execute(world: Rig, user: str, password: str, script: str, env: str | None = None) -> None:
    """Run SQL as `user` in the app's database (production's, or env's)."""
    box = world.box_for(env)
    with box.connect(user, password) as conn:
        for statement in filter(str.strip, script.split(";\n")):
            conn.execute(statement)


def owners(world: Rig, env: str | None = None) -> dict[str, int]:
    """Owner -> number of objects in the app's database (the database itself included)."""
    box = world.box_for(env)
    with box.root(box.database) as conn:
        return pg.preflight(conn, box.admin_user, box.admin_user).owners


def old_and_new(row: RotationRow) -> tuple[str, str]:
    """The rotation's old and new user, as it recorded them."""
    return row.data["old_username"], row.data["new_username"]


# -- a whole rotation --------------------------------------------------------------------


def test_a_full_rotation_converts_then_moves_the_app_to_a_new_user(world, caplog):
    caplog.set_level(logging.DEBUG)
    for noisy in ("botocore", "urllib3", "kubernetes"):  # as bot.wiring.setup_logging does
        caplog.set_level(logging.WARNING, logger=noisy)
    box = world.box
    execute(world, box.app_user, box.app_password, APP_SCHEMA)
    owner_role = f"{world.app}-owner-role"
    engine = engine_for(world)
    rotation = engine.start("postgres", world.app, "staging", "alice")
    with ContinuityProbe(world) as probe:
        final = drive(engine, rotation.id)
    assert final.status == "done", statuses(final)
    assert probe.failures == [] and probe.logins > 0

    new = world.current()["username"]
    assert new == f"{world.app}-user-{time.strftime('%Y%m%d', time.gmtime())}"
    assert world.users() == {box.admin_user, owner_role, new}
    assert owners(world) == {owner_role: 11, "pg_database_owner": 1}  # that one owns `public`
    execute(world, new, world.current()["password"], MIGRATION)
    secret = world.kube.secret_data("apps", world.external_secret)
    assert secret["DATABASE_URL"].startswith(f"postgresql://{new}:")

    steps = {s.name: s for s in final.steps}
    assert [s.name for s in final.steps] == [
        "preflight",
        "convert",
        "create-user",
        "test-login",
        "promote",
        "sync",
        "rollout",
        "drain",
        "retire",
    ]
    assert "conversion to" in steps["preflight"].result
    assert (
        f"{box.app_user} owns 1 database, 1 function, 1 materialized view, 1 schema, "
        "3 sequences, 2 tables, 1 type, 1 view" in steps["preflight"].result
    )
    assert (
        steps["convert"].decided_by == "bob"
        and "materialized view" in steps["convert"].gate_summary
    )
    assert "read/write OK on 2 tables" in steps["test-login"].result
    assert f"dropped role {box.app_user}" in steps["retire"].result
    # Nothing left to roll back to by hand: the dropped user's version lost AWSPREVIOUS.
    assert f"AWSPREVIOUS of {world.secret_id()} no longer names {box.app_user}" in (
        steps["retire"].result)
    assert sorted(s for v in world.stages().values() for s in v) == ["AWSCURRENT"]

    passwords = [world.current()["password"], box.app_password, box.admin_password]
    dump = "\n".join(engine.store.db.iterdump())
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for password in passwords:
        assert password not in dump
        assert password not in logs


def test_each_advance_logs_in_as_the_admin_once(world, monkeypatch):
    """One admin connection per advance (readcache.connection), not one a step: preflight,
    convert and create-user run in one advance, on one login."""
    connect = pg.connect
    logins: list[int] = []

    def counted(ep: pg.Endpoint, **kwargs: Any) -> Any:
        if ep.user == world.box.admin_user:
            logins[-1] += 1
        return connect(ep, **kwargs)

    monkeypatch.setattr(pg, "connect", counted)
    engine = engine_for(world)
    advance = engine.advance

    def one_advance(rotation_id: int) -> RotationRow:
        logins.append(0)
        return advance(rotation_id)

    monkeypatch.setattr(engine, "advance", one_advance)
    rotation = engine.start("postgres", world.app, "staging", "alice")
    final = drive(engine, rotation.id)
    assert final.status == "done", statuses(final)
    admin_steps = {"preflight", "convert", "create-user", "drain", "retire"}
    assert max(logins) == 1 and sum(logins) < len(admin_steps), logins


def test_objects_the_old_user_makes_after_the_conversion_go_to_the_owner_role(world):
    box = world.box
    execute(world, box.app_user, box.app_password, APP_SCHEMA)
    engine = engine_for(world)
    rotation = engine.start("postgres", world.app, "staging", "alice")
    row = drive(engine, rotation.id, until=at("retire", "needs-approval"))
    # A last deploy on the old user, after the conversion and before the retirement.
    execute(
        world,
        box.app_user,
        box.app_password,
        """
        CREATE TABLE public.late (id serial PRIMARY KEY, note text);
        CREATE SEQUENCE public.late_numbers;
        CREATE FUNCTION public.late_count() RETURNS bigint LANGUAGE sql
            AS $$ SELECT count(*) FROM public.late $$
    """,
    )
    assert f'REASSIGN OWNED BY "{box.app_user}"' in row.current.gate_summary
    final = drive(engine, rotation.id)
    assert final.status == "done", statuses(final)
    assert "reassigned 4 objects" in final.step("retire").result  # table, serial, sequence, fn
    owner_role = f"{world.app}-owner-role"
    assert set(owners(world)) == {owner_role, "pg_database_owner"}
    new = world.current()
    execute(
        world,
        new["username"],
        new["password"],
        """
        INSERT INTO public.late (note) VALUES ('x');
        SELECT nextval('public.late_numbers'), public.late_count();
        ALTER TABLE public.late ADD COLUMN extra int
    """,
    )


def test_a_second_rotation_straight_after_the_first_retires_the_first_new_user(world):
    box = world.box
    execute(world, box.app_user, box.app_password, APP_SCHEMA)
    engine = engine_for(world)
    first = drive(engine, engine.start("postgres", world.app, "staging", "alice").id)
    assert first.status == "done", statuses(first)
    one = world.current()
    # ESO's force-sync annotation holds whole seconds: the same second twice would not sync.
    world.clock.advance(1)
    # The new user, now the app's, makes objects of its own (owned by it, not the role).
    execute(
        world,
        one["username"],
        one["password"],
        """
        CREATE TABLE public.made_by_new (id bigserial PRIMARY KEY);
        CREATE FUNCTION public.made_by_new_count() RETURNS bigint LANGUAGE sql
            AS $$ SELECT count(*) FROM public.made_by_new $$
    """,
    )

    second = drive(engine, engine.start("postgres", world.app, "staging", "alice").id)
    assert second.status == "done", statuses(second)
    two = world.current()
    old, new = old_and_new(second)
    assert old == one["username"] and new == f"{one['username']}-2"
    assert two["username"] == new
    assert second.step("convert").status == "done"  # the first new user's objects moved too
    owner_role = f"{world.app}-owner-role"
    assert world.users() == {box.admin_user, owner_role, new}
    assert set(owners(world)) == {owner_role, "pg_database_owner"}
    execute(
        world,
        new,
        two["password"],
        MIGRATION
        + """
        INSERT INTO public.made_by_new DEFAULT VALUES;
        SELECT public.made_by_new_count()
    """,
    )


def test_a_converted_database_skips_the_conversion(world):
    box = world.box
    owner_role = f"{world.app}-owner-role"
    with box.connect(box.admin_user, box.admin_password) as conn:
        pg.convert_to_owner_role(conn, box.app_user, owner_role)
    engine = engine_for(world)
    final = drive(engine, engine.start("postgres", world.app, "staging", "alice").id)
    assert final.status == "done", statuses(final)
    assert final.step("convert").status == "skipped"
    assert final.step("convert").decided_by is None
    assert "already converted" in final.step("preflight").result


def test_plan_reports_owners_and_roles_and_changes_nothing(world):
    box = world.box
    execute(world, box.app_user, box.app_password, APP_SCHEMA)
    users = world.users()
    engine = engine_for(world)
    steps, found = engine.plan("postgres", world.app, "staging")
    assert [s.name for s in steps][-1] == "retire" and steps[-1].destructive
    assert f"database {box.database}" in found
    assert f"{box.app_user} owns 1 database" in found and "3 sequences" in found
    assert f"{box.admin_user} is a member of {box.app_user}" in found
    assert world.users() == users and engine.store.recent() == []


def test_lingering_connections_are_terminated_only_on_approval(world):
    box = world.box
    engine = engine_for(world)
    rotation = engine.start("postgres", world.app, "staging", "alice")
    held = box.connect(box.app_user, box.app_password)
    row = drive(engine, rotation.id, until=at("drain", "needs-approval"))
    assert "Terminate 1 connection of" in row.current.gate_summary
    assert row.current.gate_destructive
    held.execute("SELECT 1")  # still alive while nobody approved
    final = drive(engine, rotation.id)
    assert final.status == "done", statuses(final)
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")


def test_cancel_before_promotion_leaves_the_app_on_its_user(world):
    engine = engine_for(world)
    before = world.current()
    rotation = engine.start("postgres", world.app, "staging", "alice")
    drive(engine, rotation.id, until=at("convert", "needs-approval"))
    engine.approve(rotation.id, "convert", "bob")
    while engine.store.rotation(rotation.id).current.name != "promote":
        row = engine.store.rotation(rotation.id)
        engine._run_step(row, row.current)  # exactly one step; advance() would run on
    new = engine.store.rotation(rotation.id).data["new_username"]
    assert any("AWSPENDING" in s for s in world.stages().values())
    row = engine.cancel(rotation.id, "alice")
    assert row.status == "cancelled"
    assert world.current() == before
    world.login(world.current())
    assert not any("AWSPENDING" in s for s in world.stages().values())
    assert (
        f"the unused new user {new} is left in place"
        in engine.store.audit_rows(rotation.id)[-1].detail
    )


# -- faults and bad input: a clear reason, nothing retired ---------------------------------


def test_an_owner_role_that_belongs_to_someone_else_stops_the_conversion(world):
    box = world.box
    owner_role, intruder = f"{world.app}-owner-role", f"{world.app}-reporting"
    with box.root() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner_role)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(intruder)))
        conn.execute(
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(owner_role), sql.Identifier(intruder))
        )
    before, users = world.current(), world.users()
    engine = engine_for(world)
    row = drive(engine, engine.start("postgres", world.app, "staging", "alice").id)
    assert row.current.name == "convert" and row.current.status == "failed"
    assert f"owner role {owner_role} already has members Rotor does not manage ({intruder})" in (
        row.current.error
    )
    assert world.users() == users and world.current() == before
    assert f"{world.app}-user" not in " ".join(world.users())
    assert box.app_user in owners(world)  # nothing converted


def test_objects_of_the_old_user_in_another_database_stop_the_retirement(world):
    box = world.box
    other = f"{world.app}-reports"
    with box.root() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    with box.root(other) as conn:
        conn.execute(sql.SQL("CREATE TABLE t (a int)"))
        conn.execute(sql.SQL("ALTER TABLE t OWNER TO {}").format(sql.Identifier(box.app_user)))
    engine = engine_for(world)
    rotation = engine.start("postgres", world.app, "staging", "alice")
    row = drive(engine, rotation.id)
    assert row.current.name == "retire" and row.current.status == "failed"
    assert f"has objects or privileges in database {other}" in row.current.error
    assert box.app_user in world.users()  # nothing retired
    world.login(world.current())  # the app runs on the new user meanwhile

    with box.root(other) as conn:  # what the reason asks for, by hand
        conn.execute(
            sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                sql.Identifier(box.app_user), sql.Identifier(f"{world.app}-owner-role")
            )
        )
    engine.retry(rotation.id, "alice")
    final = drive(engine, rotation.id)
    assert final.status == "done", statuses(final)
    assert box.app_user not in world.users()


def test_an_admin_without_createdb_is_told_so_at_preflight(world):
    box = world.box
    with box.root() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} NOCREATEDB").format(sql.Identifier(box.admin_user)))
    users = world.users()
    engine = engine_for(world)
    row = drive(engine, engine.start("postgres", world.app, "staging", "alice").id)
    assert row.current.name == "preflight" and row.current.status == "failed"
    assert f"{box.admin_user} lacks CREATEDB" in row.current.error
    assert world.users() == users


def test_an_unknown_app_changes_nothing(world):
    engine = engine_for(world)
    with pytest.raises(UnknownName, match="unknown app"):
        engine.start("postgres", "nosuchapp", "staging", "alice")
    assert engine.store.recent() == []


# -- the overnight restore into staging ----------------------------------------------------


def test_the_next_restore_is_found_in_local_time_across_a_clock_change():
    staging = catalogue.Environment(
        aws_region="eu-west-1", restored_from="production", restore_time="03:00", timezone="Europe/London"
    )
    assert next_restore(staging, EVENING) == NEXT_RESTORE  # 03:00 BST
    winter = datetime(2026, 1, 10, 2, 59, tzinfo=UTC).timestamp()
    assert next_restore(staging, winter) == datetime(2026, 1, 10, 3, tzinfo=UTC).timestamp()
    assert next_restore(staging, NEXT_RESTORE) == NEXT_RESTORE + 86400


def _park(engine: Engine, world: Rig, rotation_id: int) -> RotationRow:
    row = drive(engine, rotation_id)
    assert row.current.name == "await-restore-staging", statuses(row)
    assert row.current.status == "waiting"
    return row


def test_production_waits_for_the_restore_then_moves_staging_then_retires(restored):
    world = restored
    told = Told()
    engine = engine_for(world, told)
    old_staging = world.current("staging")
    with ContinuityProbe(world) as probe:
        rotation = engine.start("postgres", world.app, "production", "alice")
        row = _park(engine, world, rotation.id)
        old, new = old_and_new(row)
        # Parked until the restore, in the worker's schedule too; staging untouched.
        assert row.current.next_check_at == NEXT_RESTORE == row.next_run_at
        assert "restore of staging from production due at 03:00 Europe/London on Sun 29 Mar" in (
            row.current.wait_reason
        )
        assert world.current("staging") == old_staging
        assert new not in world.users("staging")

        world.clock.set(NEXT_RESTORE + 60)  # the restore job is late
        row = drive(
            engine, rotation.id, until=lambda r: "has not brought" in (r.current.wait_reason or "")
        )
        assert f"{new} to appear in staging" in row.current.wait_reason
        assert any(
            "has not brought" in (a.detail or "") for a in engine.store.audit_rows(rotation.id)
        )

        world.restore()
        with ContinuityProbe(world, env="staging") as staging_probe:
            row = drive(engine, rotation.id, until=at("retire", "needs-approval"))
            moved = world.current("staging")
            assert (moved["username"], moved["password"]) == (new, world.current()["password"])
            assert moved["port"] == old_staging["port"]  # staging's own server, kept
            url = world.kube_for("staging").secret_data("apps", world.external_secret)
            assert url["DATABASE_URL"].startswith(f"postgresql://{new}:")
            assert old in world.users() and told.notices == []  # asked only now
            assert "the next restore carries this to staging" in row.current.gate_summary

            final = drive(engine, rotation.id)
        assert final.status == "done", statuses(final)
    assert probe.failures == [] and probe.logins > 0
    assert staging_probe.failures == [] and staging_probe.logins > 0
    assert [name for name, _ in told.notices] == ["retire"]  # 2nd line told first
    assert old not in world.users() and old in world.users("staging")

    world.restore()  # the next night carries the drop to staging
    assert old not in world.users("staging")
    world.login(world.current("staging"))


def test_staging_without_the_new_user_the_morning_after_fails_and_retires_nothing(restored):
    world = restored
    engine = engine_for(world, Told())
    rotation = engine.start("postgres", world.app, "production", "alice")
    old, new = old_and_new(_park(engine, world, rotation.id))

    world.clock.set(NEXT_RESTORE + Waits().restore_grace + 1)  # no restore ran
    row = drive(engine, rotation.id)
    step = row.current
    assert (step.name, step.status) == ("await-restore-staging", "failed")
    assert f"staging still has no user {new}" in step.error
    assert "the restore from production due at 03:00 Europe/London on Sun 29 Mar" in step.error
    assert "nothing was retired" in step.error
    assert old in world.users() and world.current()["username"] == new
    assert world.current("staging")["username"] == old

    engine.retry(rotation.id, "alice")  # after fixing the job: waits for the next restore
    row = drive(engine, rotation.id)
    assert row.current.next_check_at == NEXT_RESTORE + 86400


def test_a_restored_environment_is_not_rotated_on_its_own(restored):
    world = restored
    engine = engine_for(world)
    with pytest.raises(
        NotAllowed,
        match="staging is restored from production every night at "
        "03:00 Europe/London, which would undo a rotation",
    ):
        engine.start("postgres", world.app, "staging", "alice")
    assert engine.store.recent() == []

    rotation = engine.start("postgres", world.app, "staging", "alice", {"compromised": True})
    assert not any(s.name.startswith("await") for s in rotation.steps)
    row = engine.advance(rotation.id)
    assert "rotate production with --compromised to cover both" in row.step("preflight").result
    engine.cancel(rotation.id, "alice")


def test_compromised_credentials_move_every_environment_at_once(restored):
    world = restored
    told = Told()
    engine = engine_for(world, told)
    old_app = world.box.app_user
    with ContinuityProbe(world) as probe, ContinuityProbe(world, env="staging") as staging_probe:
        rotation = engine.start("postgres", world.app, "production", "alice", {"compromised": True})
        final = drive(engine, rotation.id)
    assert final.status == "done", statuses(final)
    assert probe.failures == [] and staging_probe.failures == []
    assert probe.logins > 0 and staging_probe.logins > 0
    assert [s.name for s in final.steps] == [
        "preflight",
        "convert",
        "create-user",
        "test-login",
        "convert-staging",
        "create-user-staging",
        "test-login-staging",
        "promote",
        "sync",
        "rollout",
        "drain",
        "secret-staging",
        "sync-staging",
        "rollout-staging",
        "drain-staging",
        "retire",
        "retire-staging",
    ]
    production, staging = world.current(), world.current("staging")
    assert (staging["username"], staging["password"]) == (
        production["username"],
        production["password"],
    )
    owner_role, new = f"{world.app}-owner-role", production["username"]
    for env in ("production", "staging"):
        assert world.users(env) == {world.box.admin_user, owner_role, new}
        assert old_app not in world.users(env)
    assert [name for name, _ in told.notices] == ["retire", "retire-staging"]


# -- crash and resume ----------------------------------------------------------------------


def _rotor(world: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        world.rotor() + list(args),
        env=world.env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=world.workdir,
    )


def _wait_finished(world: Rig, proc: subprocess.Popen[bytes], step: str) -> None:
    """Return the moment `step` is committed (polled often: the caller kills `rotor` then)."""

    def statuses() -> dict[str, str]:
        assert proc.poll() in (None, 0), f"rotor died before {step} finished"
        return read_state(world.state_path)[0]

    wait_for(statuses, lambda now: now.get(step) in ("done", "skipped"),
             what=f"{step} to finish", interval=0.002)


def _kill_after_each_step(world: Rig, args: list[str], steps: list[str]) -> None:
    """Start `rotor`, SIGKILL it the moment `step` is committed, for each step in turn."""
    for step in steps:
        if read_state(world.state_path)[1] == "done":
            break  # the last process got further than the kill
        proc = subprocess.Popen(
            world.rotor() + args,
            env=world.env(),
            cwd=world.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_finished(world, proc, step)
        proc.kill()
        proc.wait()
    if read_state(world.state_path)[1] != "done":
        result = _rotor(world, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "resuming rotation #1" in result.stdout
    with sqlite3.connect(world.state_path) as conn:
        assert conn.execute("SELECT count(*), min(status) FROM rotations").fetchone() == (1, "done")


def _steps(world: Rig, env: str, params: dict[str, Any]) -> list[str]:
    return [s.name for s in KIND.steps(catalogue.load(world.config_path), world.app, env, params)]


def test_sigkill_after_each_step_in_turn_resumes_cleanly(world):
    box = world.box
    execute(world, box.app_user, box.app_password, APP_SCHEMA)
    with ContinuityProbe(world) as probe:
        _kill_after_each_step(
            world, ["rotate", world.app, "staging", "--yes"], _steps(world, "staging", {})
        )
    assert probe.failures == [] and probe.logins > 0
    new = world.current()
    assert world.users() == {box.admin_user, f"{world.app}-owner-role", new["username"]}
    execute(world, new["username"], new["password"], MIGRATION)


def test_sigkill_during_a_compromised_rotation_of_both_environments_resumes(tmp_path):
    # `rotor rotate --yes` approves its own gates: production without four-eyes and 2nd line.
    relaxed = {"production": {"four_eyes": False, "notify_second_line": False}}
    with rig("postgres", tmp_path, restored=True, environments=relaxed) as world:
        args = ["rotate", world.app, "production", "--compromised", "--yes"]
        # The steps the plain rotation above does not have; the rest are the same functions.
        every = _steps(world, "production", {"compromised": True})
        steps = [s for s in every if s.endswith("-staging")]
        with ContinuityProbe(world) as probe, ContinuityProbe(world, env="staging") as staging:
            _kill_after_each_step(world, args, steps)
        assert probe.failures == [] and staging.failures == []
        new = world.current()["username"]
        assert world.current("staging")["username"] == new
        for env in ("production", "staging"):
            assert world.users(env) == {world.box.admin_user, f"{world.app}-owner-role", new}
