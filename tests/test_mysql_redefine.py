"""Kind `mysql`, step `redefine`: objects the old user defines are re-created under the admin
only as approved, each shown with its SQL SECURITY and body digest; with --compromised, a
SQL SECURITY DEFINER object planted by whoever holds the app's credentials needs its own
decision by someone other than the starter; and a crash between DROP and CREATE (MySQL 8)
loses nothing. Real MariaDB, moto's server, fake Kubernetes."""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any

import pytest

from bot.settings import Settings
from bot.wiring import build_engine
from rotation import mysql_db
from rotation.engine import Engine
from rotation.errors import NotAllowed
from tests.rig import Rig, drive

PLANTED = "BEGIN CREATE USER 'rotor_planted'@'%' IDENTIFIED BY 'Planted1234567'; END"


def engine_for(world: Rig) -> Engine:
    return build_engine(Settings.load(), clock=world.clock)


def definer(world: Rig, kind: str, name: str) -> str | None:
    table, schema_col, name_col = {
        "PROCEDURE": ("ROUTINES", "ROUTINE_SCHEMA", "ROUTINE_NAME"),
        "VIEW": ("VIEWS", "TABLE_SCHEMA", "TABLE_NAME"),
    }[kind]
    with world.box.root().cursor() as cur:
        cur.execute(f"SELECT DEFINER FROM information_schema.{table} "
                    f"WHERE {schema_col} = %s AND {name_col} = %s", (world.box.database, name))
        row = cur.fetchone()
    return row[0] if row else None


def test_a_definer_routine_planted_by_the_app_user_needs_its_own_second_person(world):
    """Scenario: with the app's credentials compromised, a SQL SECURITY DEFINER routine
    planted with them is not re-created under the admin on the starter's word."""
    db, admin = world.box.database, world.box.admin_user
    app = world.box.connect(world.box.app_user, world.box.app_password, db)
    with app.cursor() as cur:  # planted with the compromised credentials
        cur.execute(f"CREATE TABLE `{db}`.t (a INT)")
        cur.execute(f"CREATE PROCEDURE `{db}`.p() SQL SECURITY DEFINER {PLANTED}")
        cur.execute(f"CREATE SQL SECURITY INVOKER VIEW `{db}`.v AS SELECT a FROM `{db}`.t")
    app.close()
    engine = engine_for(world)
    rid = engine.start("mysql", world.app, "staging", "alice", {"compromised": True}).id
    row = engine.advance(rid)
    step = row.current
    assert step.name == "redefine" and step.status == "needs-approval"
    with pytest.raises(NotAllowed, match="second person"):
        engine.approve(rid, "redefine", "alice")  # staging, yet not the starter
    assert f"PROCEDURE {db}.p" in step.gate and step.gate != "redefine"
    summary = step.gate_summary
    assert "SQL SECURITY DEFINER" in summary and f"{admin}'s" in summary
    assert "CREATE USER 'rotor_planted'@'%' IDENTIFIED BY 'Planted1234567'" in summary  # body
    assert definer(world, "PROCEDURE", "p").startswith(world.box.app_user)

    engine.approve(rid, step.name, "bob")
    row = engine.advance(rid)
    step = row.current
    assert step.name == "redefine" and step.gate == "redefine", step
    assert f"VIEW {db}.v (SQL SECURITY INVOKER" in step.gate_summary
    assert f"Will run with {admin}'s rights: PROCEDURE {db}.p" in step.gate_summary
    engine.approve(rid, "redefine", "alice")  # the rest runs with the caller's rights
    row = drive(engine, rid)
    assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
    assert definer(world, "PROCEDURE", "p") == f"{admin}@%"


def test_a_body_changed_after_the_approval_is_asked_for_again(world):
    db = world.box.database
    with world.box.root().cursor() as cur:
        cur.execute(f"CREATE DEFINER=%s@'%%' PROCEDURE `{db}`.p() SELECT 1", (world.box.app_user,))
    engine = engine_for(world)
    rid = engine.start("mysql", world.app, "staging", "alice").id
    row = engine.advance(rid)
    assert row.current.gate == "redefine" and "SQL SECURITY DEFINER" in row.current.gate_summary
    engine.approve(rid, "redefine", "bob")
    with world.box.root().cursor() as cur:  # the body changes after the approval
        cur.execute(f"CREATE OR REPLACE DEFINER=%s@'%%' PROCEDURE `{db}`.p() SELECT 2",
                    (world.box.app_user,))
    row = engine.advance(rid)
    assert row.current.name == "redefine" and row.current.status == "needs-approval"
    assert "changed since the approval" in row.current.gate_summary
    assert definer(world, "PROCEDURE", "p").startswith(world.box.app_user)


def _crash_between_drop_and_create(rotation_id: int) -> None:
    """In a child process: the MySQL 8 path (forced), killed right after the DROP."""
    mysql_db._flavor = lambda conn: "mysql"  # type: ignore[assignment]

    def killed(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    mysql_db._replace_dropped = killed  # type: ignore[assignment]
    build_engine(Settings.load()).advance(rotation_id)
    os._exit(0)  # not reached: the kill comes first


def test_sigkill_between_drop_and_create_loses_nothing(world, monkeypatch):
    """Scenario: SIGKILL between DROP and CREATE on the MySQL 8 path (flavour forced, as
    MariaDB has CREATE OR REPLACE and takes the other path)."""
    db, admin = world.box.database, world.box.admin_user
    with world.box.root().cursor() as cur:
        cur.execute(f"CREATE TABLE `{db}`.t (a INT)")
        cur.execute(f"INSERT INTO `{db}`.t VALUES (21)")
        cur.execute(f"CREATE DEFINER=%s@'%%' PROCEDURE `{db}`.p() SELECT a * 2 FROM `{db}`.t",
                    (world.box.app_user,))
        cur.execute(f"GRANT EXECUTE ON PROCEDURE `{db}`.p TO %s@'%%'", (world.box.app_user,))
    engine = engine_for(world)
    rid = engine.start("mysql", world.app, "staging", "alice").id
    row = engine.advance(rid)
    assert row.current.gate == "redefine"
    engine.approve(rid, "redefine", "bob")

    child = multiprocessing.get_context("fork").Process(
        target=_crash_between_drop_and_create, args=(rid,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert definer(world, "PROCEDURE", "p") is None  # dropped, not yet re-created

    resumed = engine_for(world)  # a new process resumes
    with monkeypatch.context() as forced:
        forced.setattr(mysql_db, "_flavor", lambda conn: "mysql")
        row = resumed.store.rotation(rid)
        resumed._run_step(row, row.current)  # just this step on the forced path
    step = resumed.store.rotation(rid).step("redefine")
    assert step.status == "done", (step.status, step.error, step.gate_summary)
    assert "lost between DROP and CREATE" in step.result
    assert definer(world, "PROCEDURE", "p") == f"{admin}@%"
    with world.box.root().cursor() as cur:
        cur.execute(f"CALL `{db}`.p()")
        assert cur.fetchone()[0] == 42
        cur.execute("SELECT Proc_priv FROM mysql.procs_priv WHERE Db = %s AND Routine_name = 'p'",
                    (db,))
        assert "Execute" in str(cur.fetchone()[0])  # its grant came back too
    row = drive(resumed, rid)  # and the rotation finishes: the old user defines nothing now
    assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
