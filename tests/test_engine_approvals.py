"""Approvals bound to one exact action, on the engine alone (scripted kind, injected clock,
real SQLite store): `Context.act` reads the facts before and after the gate, a changed action
asks again, and retry, Ask again and failures spend a destructive approval and its notice."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
import sqlite_utils

from handlers import messages
from rotation import fleet as fleets
from rotation.catalogue import SlackConfig
from rotation.engine import Context, Done, Engine, Outcome
from rotation.errors import InvalidTransition, NotAllowed, RotorError
from rotation.facts import Facts
from rotation.store import MIGRATIONS, Store
from tests.test_engine import CATALOGUE, Clock, Notices, ScriptedKind, clock, make  # noqa: F401


class World:
    """What the scripted step reads: the IDs it would kill, and whether it must refuse."""

    def __init__(self) -> None:
        self.ids = [7, 8]
        self.refused: str | None = None
        self.acted: list[list[int]] = []
        self.fail_after = False

    def read(self) -> Facts:
        return Facts({"ids": list(self.ids)}, self.refused)

    def step(self, ctx: Context) -> Outcome:
        facts = ctx.act("kill", self.read, lambda f: f"Kill {f.seen['ids']}", destructive=True)
        self.acted.append(facts.seen["ids"])
        if self.fail_after:
            raise RuntimeError("the server went away half-way")
        return Done("killed")


def test_a_changed_action_is_asked_for_again(tmp_path, clock):  # noqa: F811
    world = World()
    engine, _ = make(tmp_path, clock, {"kill": world.step})
    rid = engine.start("mysql", "signon", "staging", "alice").id
    row = engine.advance(rid)
    assert row.current.gate_summary == "Kill [7, 8]"
    first = row.current
    engine.approve(rid, "kill", "bob")
    world.ids = [7, 8, 9]
    row = engine.advance(rid)
    assert row.current.status == "needs-approval" and world.acted == []
    assert row.current.gate_summary.endswith("Kill [7, 8, 9]")
    # A click on the message that showed [7, 8] does not approve [7, 8, 9].
    text, blocks = messages.approval_request(row, first, first.gate_summary, True, "", False)
    stale = json.loads(blocks[-1]["elements"][0]["value"])["shown"]
    with pytest.raises(InvalidTransition, match="asks about something else now"):
        engine.approve(rid, "kill", "bob", shown=stale)
    engine.approve(rid, "kill", "bob")
    assert engine.advance(rid).status == "done" and world.acted == [[7, 8, 9]]


def test_a_failed_precondition_fails_the_step_and_does_nothing(tmp_path, clock):  # noqa: F811
    world = World()
    engine, _ = make(tmp_path, clock, {"kill": world.step})
    rid = engine.start("mysql", "signon", "staging", "alice").id
    engine.advance(rid)
    engine.approve(rid, "kill", "bob")
    world.refused = "7 belongs to someone else now"
    row = engine.advance(rid)
    assert row.current.status == "failed" and row.current.error == world.refused
    assert world.acted == [] and row.current.decision is None


def test_a_retry_after_a_failure_past_the_gate_needs_a_new_approval_and_notice(
    tmp_path, clock  # noqa: F811
):
    world, notices = World(), Notices()
    world.fail_after = True
    engine, _ = make(tmp_path, clock, {"kill": world.step}, notices=notices)
    rid = engine.start("mysql", "signon", "production", "alice").id
    engine.advance(rid)
    engine.approve(rid, "kill", "bob")
    engine.advance(rid)  # notice posted, hold period
    clock.advance(61)
    row = engine.advance(rid)
    assert row.current.status == "failed" and world.acted == [[7, 8]]
    assert len(notices.posted) == 1
    world.fail_after = False
    engine.retry(rid, "alice")
    row = engine.advance(rid)
    assert row.current.status == "needs-approval" and world.acted == [[7, 8]]
    engine.approve(rid, "kill", "bob")
    engine.advance(rid)
    assert len(notices.posted) == 2  # told again
    clock.advance(61)
    assert engine.advance(rid).status == "done" and world.acted == [[7, 8], [7, 8]]


def test_a_gate_can_demand_a_second_person_in_any_environment(tmp_path, clock):  # noqa: F811
    def step(ctx: Context) -> Outcome:
        ctx.approve("run p with the admin's rights", gate="p", binds={"p": "abc"},
                    four_eyes=True)
        return Done("ok")

    engine, _ = make(tmp_path, clock, {"p": step})
    rid = engine.start("mysql", "signon", "staging", "alice").id
    engine.advance(rid)
    with pytest.raises(NotAllowed, match="second person"):
        engine.approve(rid, "p", "alice")
    engine.approve(rid, "p", "bob")
    assert engine.advance(rid).status == "done"


def _gate(destructive: bool, acted: list[str]) -> Any:
    def step(ctx: Context) -> Outcome:
        ctx.approve(f"DROP USER {ctx.target}_1", gate="drop", destructive=destructive)
        acted.append(ctx.target)
        return Done("dropped")
    return step


@pytest.mark.parametrize("env, destructive, holdable", [
    ("production", True, True),  # 2nd line is told: held before its notice is recorded
    ("production", False, False),  # no notice, nothing to hold: it may act at once
    ("staging", True, False),  # no 2nd line notice there
])
def test_an_approved_gate_is_held_before_its_notice_only_where_2nd_line_is_told(
    tmp_path, clock, env, destructive, holdable  # noqa: F811
):
    """A fleet app approved by Approve all, whose worker has not yet picked up the fleet
    notice's link (notice_at None), is stopped by that notice's Hold."""
    acted: list[str] = []
    notices = Notices()
    engine, _ = make(tmp_path, clock, {"drop": _gate(destructive, acted)}, notices=notices)
    rid = engine.start("mysql", "signon", env, "alice").id
    engine.advance(rid)
    engine.approve(rid, "drop", "bob")
    assert engine.store.rotation(rid).current.notice_at is None
    if not holdable:
        with pytest.raises(InvalidTransition, match="not in a hold period"):
            engine.hold(rid, "drop", "erin")
        assert engine.advance(rid).status == "done" and acted == ["signon"]
        return
    row = engine.hold(rid, "drop", "erin")
    assert row.phase == "needs-approval" and row.current.decision is None
    assert [(r.event, r.actor) for r in engine.store.audit_rows(rid)][-1] == ("held", "erin")
    assert engine.advance(rid).phase == "needs-approval"
    assert acted == [] and notices.posted == []


class HeldWhileTold(Notices):
    """2nd line holds while the notice is being recorded (another thread, in production)."""

    engine: Engine

    def notify(self, rotation: Any, step: Any, summary: str, approved_by: str) -> str:
        self.engine.hold(rotation.id, step.name, "erin")
        return super().notify(rotation, step, summary, approved_by)


def test_a_hold_while_the_notice_is_recorded_stops_the_step_without_a_hold_period(
    tmp_path, clock  # noqa: F811
):
    acted: list[str] = []
    notices = HeldWhileTold()
    kind = ScriptedKind({"drop": _gate(True, acted)})
    no_hold_period = CATALOGUE.model_copy(update={"slack": SlackConfig(hold_seconds=0)})
    engine = Engine(Store(tmp_path / "state.db", clock=clock), no_hold_period, {"mysql": kind},
                    clients=None, second_line=notices, clock=clock)
    notices.engine = engine
    rid = engine.start("mysql", "signon", "production", "alice").id
    engine.advance(rid)
    engine.approve(rid, "drop", "bob")
    row = engine.advance(rid)
    assert row.phase == "needs-approval" and row.current.decision is None
    assert row.current.notice_at is None and acted == []
    events = [r.event for r in engine.store.audit_rows(rid)]
    assert "held" in events and "second-line-notified" not in events


def test_a_hold_that_read_the_step_before_its_notice_was_recorded_still_holds(
    tmp_path, clock  # noqa: F811
):
    """The fleet's notice is in Slack before each app's worker records it: a Hold clicked then
    reads the step without its notice, loses the compare-and-set to the worker, and reads
    again: the step is in its hold period now, so it is held."""
    acted: list[str] = []
    engine, _ = make(tmp_path, clock, {"drop": _gate(True, acted)}, notices=Notices())
    rid = engine.start("mysql", "signon", "production", "alice").id
    engine.advance(rid)
    engine.approve(rid, "drop", "bob")
    reads = 0
    read = engine._active

    def stale_then_fresh(rotation_id: int) -> Any:
        nonlocal reads
        reads += 1
        row = read(rotation_id)
        if reads == 1:  # the worker records the notice after the hold's read
            assert row.current.notice_at is None
            assert engine.advance(rotation_id).current.hold_until is not None
        return row

    engine._active = stale_then_fresh  # type: ignore[method-assign]
    row = engine.hold(rid, "drop", "erin")
    assert reads == 2 and row.phase == "needs-approval" and row.current.decision is None
    engine._active = read  # type: ignore[method-assign]
    assert engine.advance(rid).phase == "needs-approval" and acted == []


def test_a_hold_between_the_notice_and_the_hold_period_is_not_overwritten_by_the_wait(
    tmp_path, clock  # noqa: F811
):
    """The worker recorded the notice and read the step (approved, in its hold period);
    2nd line holds before the worker records the wait: the wait is not recorded over the
    hold, so the step shows it needs approval again (it would have sat "waiting" out the
    whole hold period)."""
    acted: list[str] = []
    engine, _ = make(tmp_path, clock, {"drop": _gate(True, acted)}, notices=Notices())
    rid = engine.start("mysql", "signon", "production", "alice").id
    engine.advance(rid)
    engine.approve(rid, "drop", "bob")
    tell = engine._second_line_notice

    def told_then_held(ctx: Context, summary: str) -> None:
        try:
            tell(ctx, summary)
        finally:  # it pauses for the hold period: 2nd line clicks Hold now
            engine.hold(rid, "drop", "erin")

    engine._second_line_notice = told_then_held  # type: ignore[method-assign]
    row = engine.advance(rid)
    assert row.phase == "needs-approval" and row.current.decision is None, row.current
    assert row.next_run_at is None  # a person must approve again
    engine._second_line_notice = tell  # type: ignore[method-assign]
    assert engine.advance(rid).phase == "needs-approval" and acted == []


def test_a_hold_whose_clock_is_behind_loses_to_the_worker_acting_after_the_hold_period(
    tmp_path, clock  # noqa: F811
):
    """The Slack handler's clock says the hold period has a moment left, the worker's says
    it is over: the worker claims the approval before it acts, and the Hold is refused
    instead of saying it held a step that is acting."""
    acted: list[str] = []
    worker, _ = make(tmp_path, clock, {"drop": _gate(True, acted)}, notices=Notices())
    rid = worker.start("mysql", "signon", "production", "alice").id
    worker.advance(rid)
    worker.approve(rid, "drop", "bob")
    hold_until = worker.advance(rid).current.hold_until
    assert hold_until is not None
    behind = Clock()
    behind.now = hold_until - 1
    handler, _ = make(tmp_path, behind, {"drop": _gate(True, acted)}, notices=Notices())
    clock.now = hold_until + 1
    read = handler._active
    reads = 0

    def read_then_the_worker_acts(rotation_id: int) -> Any:
        nonlocal reads
        reads += 1
        row = read(rotation_id)
        if reads == 1:
            assert worker.advance(rotation_id).status == "done"
        return row

    handler._active = read_then_the_worker_acts  # type: ignore[method-assign]
    with pytest.raises(RotorError):
        handler.hold(rid, "drop", "erin")
    assert acted == ["signon"]
    assert "held" not in [r.event for r in worker.store.audit_rows(rid)]


def test_a_fleet_notices_hold_holds_each_app_it_names_and_says_which_it_could_not(
    tmp_path, clock  # noqa: F811
):
    acted: list[str] = []
    engine, _ = make(tmp_path, clock, {"drop": _gate(True, acted)}, notices=Notices())
    fleet_id = engine.store.create_fleet("production", "alice", {}, [])
    signon, whitehall = (engine.start("mysql", app, "production", "alice",
                                      fleet_id=fleet_id).id for app in ("signon", "whitehall"))
    for rid in (signon, whitehall):
        engine.advance(rid)
    engine.approve(signon, "drop", "bob")  # whitehall is not approved: nothing to stop
    held, refused = fleets.hold_notice(engine, signon, "drop", "erin", also=[whitehall])
    assert [r.id for r in held] == [signon] and held[0].phase == "needs-approval"
    assert refused == [f"rotation #{whitehall} step drop is not in a hold period"]

    # The notice's Hold could not carry the ids: it names the fleet, whose approved apps
    # at the step are held.
    for rid in (signon, whitehall):
        engine.approve(rid, "drop", "bob")
    held, refused = fleets.hold_notice(engine, signon, "drop", "erin", fleet_id=fleet_id)
    assert sorted(r.id for r in held) == [signon, whitehall] and refused == []
    assert all(engine.advance(rid).phase == "needs-approval" for rid in (signon, whitehall))
    assert acted == []


def test_the_migration_carries_open_requests_out_of_data(tmp_path, clock):  # noqa: F811
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(sqlite3.connect(path))
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    db.table("rotations").insert({
        "kind": "secret", "target": "s", "env": "staging", "status": "active",
        "initiator": "alice", "params": "{}",
        "data": json.dumps({"_requests": {"rollback": "bob"}}), "created_at": 1,
        "updated_at": 2})
    db.conn.commit()
    db.conn.close()
    store = Store(path, clock=clock)
    assert store.open_requests(1) == {"rollback": (1, "bob", 2.0)}
