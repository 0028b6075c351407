"""Kind `mysql` end to end, in-process: real MariaDB, moto's server, the fake Kubernetes API."""

from __future__ import annotations

import json
import logging
import time

import pymysql
import pytest

from bot.settings import Settings
from bot.wiring import build_engine
from rotation import redact
from rotation.engine import Engine
from rotation.errors import RotationConflict, UnknownName
from tests.rig import ContinuityProbe, Rig, drive
from tests.waiting import DEADLINE


def engine_for(world: Rig) -> Engine:
    return build_engine(Settings.load())




def grants(world: Rig, user: str) -> list[str]:
    with world.box.root().cursor() as cur:
        cur.execute("SHOW GRANTS FOR %s@'%%'", (user,))
        return [
            r[0].replace(f"`{user}`@", "`USER`@")
            for r in cur.fetchall()
            if "IDENTIFIED BY PASSWORD" not in r[0]
        ]


def test_a_full_rotation_moves_the_app_to_a_new_user_and_drops_the_old(world, caplog):
    caplog.set_level(logging.DEBUG, logger="rotor")
    old = world.box.app_user
    engine = engine_for(world)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    with ContinuityProbe(world) as probe:
        final = drive(engine, rotation.id)
    assert final.status == "done", [(s.name, s.status, s.error) for s in final.steps]
    assert probe.failures == [] and probe.logins > 0

    new = world.current()["username"]
    assert new == f"{world.app}_user_{time.strftime('%Y%m%d', time.gmtime())}"
    assert world.users() == {world.box.admin_user, new}  # old dropped, nothing extra
    world.login(world.current())
    # The dropped user's version keeps no label: a hand rollback to AWSPREVIOUS would have
    # restored a password that logs in nowhere.
    stages = world.stages()
    assert sorted(s for v in stages.values() for s in v) == ["AWSCURRENT"]
    assert f"AWSPREVIOUS of {world.secret_id()} no longer names {old}" in (
        final.step("drop-old-user").result or "")
    secret = world.kube.secret_data("apps", world.external_secret)
    assert secret["DATABASE_URL"].startswith(f"mysql2://{new}:")
    assert all(p["metadata"]["uid"] for p in world.kube.pods("apps", world.app))

    steps = {s.name: s for s in final.steps}
    assert steps["redefine"].status == "skipped"
    assert steps["drop-old-user"].decided_by == "bob"
    assert f"dropped {old}" in (steps["drop-old-user"].result or "")

    # No password anywhere: not in the state DB, not in a log line.
    passwords = [world.current()["password"], world.box.app_password, world.box.admin_password]
    dump = "\n".join(engine.store.db.iterdump())
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for password in passwords:
        assert password not in dump and password not in logs


def test_grants_of_every_level_are_copied(world):
    old, db = world.box.app_user, world.box.database
    with world.box.root().cursor() as cur:
        cur.execute(f"CREATE TABLE `{db}`.t (a INT, b INT)")
        cur.execute(f"GRANT SELECT (a, b), UPDATE (b) ON `{db}`.t TO %s@'%%'", (old,))
        cur.execute(f"GRANT SELECT ON `{db}`.t TO %s@'%%' WITH GRANT OPTION", (old,))
        cur.execute("GRANT PROCESS ON *.* TO %s@'%%'", (old,))
    before = sorted(grants(world, old))
    engine = engine_for(world)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    final = drive(engine, rotation.id)
    assert final.status == "done"
    assert sorted(grants(world, world.current()["username"])) == before


def test_objects_defined_by_the_old_user_are_redefined_on_approval(world):
    old, db = world.box.app_user, world.box.database
    with world.box.root().cursor() as cur:
        cur.execute(f"CREATE TABLE `{db}`.t (a INT)")
        cur.execute(
            f"CREATE DEFINER=%s@'%%' VIEW `{db}`.v AS SELECT a * 2 AS twice FROM `{db}`.t", (old,)
        )
        cur.execute(
            f"CREATE DEFINER=%s@'%%' PROCEDURE `{db}`.p() SELECT COUNT(*) FROM `{db}`.t", (old,)
        )
    engine = engine_for(world)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    row = engine.advance(rotation.id)
    assert row.current.name == "redefine" and row.phase == "needs-approval"
    assert "VIEW" in row.current.gate_summary and "PROCEDURE" in row.current.gate_summary
    final = drive(engine, rotation.id)
    assert final.status == "done"
    with world.box.root().cursor() as cur:
        cur.execute("SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s", (db,))
        assert cur.fetchone()[0] == f"{world.box.admin_user}@%"
        cur.execute(f"SELECT twice FROM `{db}`.v")  # still works with the old user gone


def test_without_a_reloader_the_deployment_is_restarted(world):
    world.kube.reloader_enabled = False
    engine = engine_for(world)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    final = drive(engine, rotation.id)
    assert final.status == "done"
    assert "after a restart" in final.step("rollout").result
    template = world.kube.deployment("apps", world.app)["spec"]["template"]["metadata"]
    assert "kubectl.kubernetes.io/restartedAt" in template["annotations"]


def test_a_deployment_without_a_reloader_annotation_is_restarted_at_once(world, caplog):
    world.waits["rollout_start"] = 3600  # a Reloader that never comes would cost an hour
    world.write_config()
    world.kube.configure_deployment("apps", world.app, reloads_on=())
    engine = engine_for(world)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    with caplog.at_level(logging.INFO, logger="rotor"):
        row = drive(engine, rotation.id, until="drain")  # the rollout is behind it
    assert row.step("rollout").status == "done", row.step("rollout")
    assert "after a restart" in row.step("rollout").result
    assert "has no Reloader annotation; restarted it at once" in caplog.text
    assert world.clock() - row.step("rollout").started_at < 600  # not after rollout_start


def test_a_failed_sync_stops_with_the_reason_and_retry_continues(world):
    engine = engine_for(world)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    world.kube.sync_error = "could not get secret data from provider"
    row = drive(engine, rotation.id)
    assert row.current.name == "sync" and row.current.status == "failed"
    assert "could not get secret data from provider" in row.current.error
    world.login(world.current())  # AWSCURRENT (already the new user) logs in meanwhile
    world.kube.sync_error = None
    engine.retry(rotation.id, "alice")
    assert drive(engine, rotation.id).status == "done"


def test_lingering_connections_are_killed_only_on_approval(world):
    engine = engine_for(world)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    held = world.box.connect(world.box.app_user, world.box.app_password, world.box.database)
    row = drive(engine, rotation.id,
                until=lambda r: r.current.name == "drain" and r.phase == "needs-approval")
    assert (row.current.name, row.phase) == ("drain", "needs-approval")
    assert "Kill 1 connections" in row.current.gate_summary
    assert held.open
    final = drive(engine, rotation.id)
    assert final.status == "done"
    with pytest.raises(pymysql.err.OperationalError):
        held.ping(reconnect=False)


def test_cancel_before_promotion_leaves_awscurrent_untouched(world):
    engine = engine_for(world)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    before = world.current()
    deadline = time.monotonic() + DEADLINE
    while engine.store.rotation(rotation.id).current.name != "test-login":
        assert time.monotonic() < deadline
        _advance_one(engine, rotation.id)
    row = engine.cancel(rotation.id, "alice")
    assert row.status == "cancelled"
    assert world.current() == before
    world.login(world.current())
    assert not any("AWSPENDING" in s for s in world.stages().values())


def _advance_one(engine: Engine, rotation_id: int) -> None:
    """Run exactly the current step (the engine runs on otherwise)."""
    row = engine.store.rotation(rotation_id)
    engine._run_step(row, row.current)


def test_a_second_rotate_reports_the_active_one(world):
    engine = engine_for(world)
    first = engine.start("mysql", world.app, "staging", "alice")
    with pytest.raises(RotationConflict, match=f"#{first.id}, started by alice"):
        engine.start("mysql", world.app, "staging", "carol")


@pytest.mark.parametrize("username", ["sig'non", "sig`non", "sig;non", "sig non"])
def test_unsafe_user_names_in_the_secret_stop_at_preflight(world, username):
    world.sm().put_secret_value(
        SecretId=world.secret_id(),
        SecretString=json.dumps({**world.app_secret(), "username": username}),
    )
    engine = engine_for(world)
    users_before = world.users()
    row = engine.advance(engine.start("mysql", world.app, "staging", "alice").id)
    assert row.current.name == "preflight" and row.current.status == "failed"
    assert "may only contain" in row.current.error
    assert world.users() == users_before


@pytest.mark.parametrize(
    "secret, message",
    [
        ("not json", "is not JSON"),
        (json.dumps({"host": "h"}), "has no port, dbname, username, password"),
    ],
)
def test_malformed_app_secrets_fail_clearly(world, secret, message):
    world.sm().put_secret_value(SecretId=world.secret_id(), SecretString=secret)
    engine = engine_for(world)
    row = engine.advance(engine.start("mysql", world.app, "staging", "alice").id)
    assert message in row.current.error and "\n" not in row.current.error


def test_admin_login_refused_fails_preflight_without_the_password(world):
    wrong = "WrongPassword1234567890abcdefABCD"
    redact.register(wrong)
    world.sm().put_secret_value(
        SecretId=world.admin_secret_id("staging"), SecretString=json.dumps({world.app: wrong})
    )
    engine = engine_for(world)
    row = engine.advance(engine.start("mysql", world.app, "staging", "alice").id)
    assert row.current.status == "failed" and "refused" in row.current.error
    assert wrong not in row.current.error


def test_unknown_app_or_environment_changes_nothing(world):
    engine = engine_for(world)
    with pytest.raises(UnknownName, match="unknown app"):
        engine.start("mysql", "nosuchapp", "staging", "alice")
    with pytest.raises(UnknownName, match="unknown environment"):
        engine.start("mysql", world.app, "moon", "alice")
    assert engine.store.recent() == []


def test_a_new_user_name_taken_by_another_user_gets_a_suffix(world):
    taken = f"{world.app}_user_{time.strftime('%Y%m%d', time.gmtime())}"
    with world.box.root().cursor() as cur:
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY 'x1234567'", (taken,))
        cur.execute("GRANT SELECT ON mysql.* TO %s@'%%'", (taken,))
    engine = engine_for(world)
    final = drive(engine, engine.start("mysql", world.app, "staging", "alice").id)
    assert final.status == "done" and world.current()["username"] == taken + "_2"
    assert grants(world, taken)  # the other user is untouched
