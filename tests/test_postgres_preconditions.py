"""Kind `postgres`: retire acts on what it reads after the gate, and an approval covers one
attempt. Real PostgreSQL, moto's server, fake Kubernetes."""

from __future__ import annotations

from tests.rig import drive
from tests.test_postgres_rotation import at, engine_for, statuses, world  # noqa: F401


def test_a_retried_retire_needs_a_new_approval(world):  # noqa: F811
    """Scenario: retry after a failed destructive step."""
    old = world.box.app_user
    engine = engine_for(world)
    rid = engine.start("postgres", world.app, "staging", "alice").id
    row = drive(engine, rid, until=at("retire", "needs-approval"), approver="bob")
    assert at("retire", "needs-approval")(row), statuses(row)
    shown = row.current.gate_summary
    engine.approve(rid, "retire", "bob")
    with world.box.connect(old, world.box.app_password):  # the old user is back meanwhile
        row = engine.advance(rid)
        assert at("retire", "failed")(row), statuses(row)
        assert "sessions" in row.current.error
    assert row.current.decision is None
    engine.retry(rid, "alice")
    row = engine.advance(rid)
    assert at("retire", "needs-approval")(row), statuses(row)  # not on the old approval
    assert old in world.users()
    engine.approve(rid, "retire", "bob")
    assert engine.advance(rid).status == "done"
    assert old not in world.users()
    assert "no sessions" in shown  # the approval said what it was read to be


def test_a_retire_after_awscurrent_was_moved_back_is_refused(world):  # noqa: F811
    """Scenario: a second actor moves AWSCURRENT while the gate waits (retire refused this
    before too; it now does so through the same preconditions as MySQL's drop)."""
    old = world.box.app_user
    engine = engine_for(world)
    rid = engine.start("postgres", world.app, "staging", "alice").id
    row = drive(engine, rid, until=at("retire", "needs-approval"), approver="bob")
    stages = world.stages()
    current = next(v for v, s in stages.items() if "AWSCURRENT" in s)
    previous = next(v for v, s in stages.items() if "AWSPREVIOUS" in s)
    world.sm().update_secret_version_stage(
        SecretId=world.secret_id(), VersionStage="AWSCURRENT",
        MoveToVersionId=previous, RemoveFromVersionId=current)
    engine.approve(rid, "retire", "bob")
    row = engine.advance(rid)
    assert at("retire", "failed")(row), statuses(row)
    assert "it is the user in AWSCURRENT in staging" in row.current.error
    assert old in world.users()
    world.login(world.current())
