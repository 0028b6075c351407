"""Kind `mysql` when the world changes under it: destructive steps act only on what they just
read (the secret's stages, the users and their sessions), an approval covers one exact action,
and cancel decides from the secret's real stages. Real MariaDB, moto's server, fake Kubernetes.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.awsrequest import AWSResponse

from bot.settings import Settings
from bot.wiring import build_engine
from rotation.engine import Engine
from rotation.store import RotationRow
from tests.rig import Rig, drive
from tests.test_iam import Notices


def engine_for(world: Rig, notices: Notices | None = None, hold: float = 0) -> Engine:
    if hold:
        config = json.loads(world.config_path.read_text())
        config["slack"] = {"hold_seconds": hold}
        world.config_path.write_text(json.dumps(config))
    return build_engine(Settings.load(), second_line=notices, clock=world.clock)


def at_gate(name: str) -> Any:
    return lambda row: row.current.name == name and row.phase == "needs-approval"


def failed(row: RotationRow) -> list[tuple[str, str, str | None]]:
    return [(s.name, s.status, s.error) for s in row.steps if s.status != "done"]


def test_a_drop_after_awscurrent_was_moved_back_to_the_old_user_is_refused(world):
    """Scenario: while the drop waits for approval, a person moves AWSCURRENT back."""
    old = world.box.app_user
    engine = engine_for(world)
    rid = engine.start("mysql", world.app, "staging", "alice").id
    row = drive(engine, rid, until=at_gate("drop-old-user"))
    new = world.current()["username"]
    assert at_gate("drop-old-user")(row), failed(row)
    shown = row.current.gate_summary

    stages = world.stages()
    current = next(v for v, s in stages.items() if "AWSCURRENT" in s)
    previous = next(v for v, s in stages.items() if "AWSPREVIOUS" in s)
    world.sm().update_secret_version_stage(
        SecretId=world.secret_id(), VersionStage="AWSCURRENT",
        MoveToVersionId=previous, RemoveFromVersionId=current)
    assert world.current()["username"] == old

    engine.approve(rid, "drop-old-user", "bob")
    row = engine.advance(rid)
    step = row.current
    assert step.name == "drop-old-user" and step.status == "failed", failed(row)
    assert f"refusing to drop {old}: it is the user in AWSCURRENT in staging" in step.error
    assert old in world.users()
    world.login(world.current())  # the app is not locked out
    # The approval said what was true when it was asked for, read from the world.
    assert f"AWSCURRENT in staging holds {new}" in shown and f"DROP USER {old}@%" in shown


def test_cancel_after_a_throttled_second_stage_call_keeps_the_new_user(world):
    """Scenario: promotion's second Secrets Manager call is throttled, then cancel."""
    engine = engine_for(world)
    sm = engine.clients.aws("staging", "secretsmanager")
    calls: list[int] = []

    def throttle_second(**kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) != 2:
            return None
        error = {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                 "ResponseMetadata": {"HTTPStatusCode": 400}}
        return AWSResponse("https://secretsmanager", 400, {}, None), error

    sm.meta.events.register("before-call.secrets-manager.UpdateSecretVersionStage",
                            throttle_second)
    rid = engine.start("mysql", world.app, "staging", "alice").id
    row = drive(engine, rid)
    assert row.current.name == "promote" and row.current.status == "failed", failed(row)
    assert "ThrottlingException" in row.current.error
    new = row.data["new_username"]
    assert world.current()["username"] == new  # the first call moved AWSCURRENT already

    row = engine.cancel(rid, "alice")
    assert row.status == "cancelled"
    said = [a.detail for a in engine.store.audit_rows(rid) if a.event == "cancelled"][0]
    assert "drop it by hand" not in said and "never in AWSCURRENT" not in said
    assert f"AWSCURRENT in staging of {world.secret_id()} already holds {new}" in said
    assert new in world.users()
    world.login(world.current())
    assert not any("AWSPENDING" in s for s in world.stages().values())


def test_a_retried_drop_needs_a_new_approval_and_a_new_notice(world):
    """Scenario: retry after a failed destructive step (production: four eyes, 2nd line)."""
    notices = Notices()
    engine = engine_for(world, notices, hold=60)
    old = world.box.app_user
    rid = engine.start("mysql", world.app, "production", "alice").id
    row = drive(engine, rid, until=at_gate("drop-old-user"))
    assert at_gate("drop-old-user")(row), failed(row)
    engine.approve(rid, "drop-old-user", "bob")
    row = engine.advance(rid)
    assert row.current.wait_reason == "the 2nd line hold period to pass"
    assert len(notices.posted) == 1

    held = world.box.connect(old, world.box.app_password, world.box.database)
    world.clock.advance(61)
    row = engine.advance(rid)
    assert row.current.status == "failed", failed(row)
    assert row.current.decision is None and row.current.notice_at is None
    held.close()

    engine.retry(rid, "alice")
    row = engine.advance(rid)
    assert at_gate("drop-old-user")(row), failed(row)  # not dropped on the old approval
    assert old in world.users()
    engine.approve(rid, "drop-old-user", "bob")
    row = engine.advance(rid)
    assert len(notices.posted) == 2  # 2nd line told again
    world.clock.advance(61)
    row = engine.advance(rid)
    assert row.status == "done", failed(row)
    assert old not in world.users()


def after_drain_wait(engine: Engine, rid: int, world: Rig) -> RotationRow:
    """An approved drain waits its `drain` seconds again before it acts: let them pass."""
    engine.advance(rid)
    world.clock.advance(1.5)  # past `drain` (1s), within the kill's own wait (2s)
    return engine.advance(rid)


def test_every_round_of_kills_is_its_own_decision(world):
    """Scenario: connections come back after a kill: the next kill needs a new approval."""
    old = world.box.app_user
    engine = engine_for(world)
    rid = engine.start("mysql", world.app, "staging", "alice").id
    held = world.box.connect(old, world.box.app_password, world.box.database)
    row = drive(engine, rid, until=at_gate("drain"))
    assert at_gate("drain")(row), failed(row)
    first = row.current.gate_summary
    engine.approve(rid, "drain", "bob")
    again = world.box.connect(old, world.box.app_password, world.box.database)
    row = after_drain_wait(engine, rid, world)
    # Approved for one ID; another appeared meanwhile: the approval does not cover it.
    assert at_gate("drain")(row), failed(row)
    assert again.open and held.open
    assert "changed since the approval" in row.current.gate_summary
    assert f"(IDs {held.thread_id()})" in first
    engine.approve(rid, "drain", "bob")
    row = after_drain_wait(engine, rid, world)
    assert row.current.name == "drain" and row.current.status == "waiting"
    assert row.current.decision is None  # spent on the kill
    third = world.box.connect(old, world.box.app_password, world.box.database)
    world.clock.advance(5)
    row = engine.advance(rid)
    assert at_gate("drain")(row), failed(row)
    assert f"(IDs {third.thread_id()})" in row.current.gate_summary
    assert third.open
    third.close()
