"""The engine on its own: a scripted kind, an injected clock, a real SQLite store."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from rotation import catalogue, redact
from rotation.engine import Context, Done, Engine, Outcome, Skipped, Step, Wait
from rotation.errors import InvalidTransition, NotAllowed, RotationConflict, StepFailed
from rotation.store import MIGRATIONS, Store

CATALOGUE = catalogue.parse("""
environments:
  staging: {aws_region: eu-west-1}
  production: {aws_region: eu-west-1}
apps:
  signon: {engine: mysql}
  whitehall: {engine: mysql}
slack: {hold_seconds: 60}
waits: {first_check: 1, max_check: 8}
""")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ScriptedKind:
    """Steps whose behaviour each test scripts; records every call."""

    script: dict[str, Callable[[Context], Outcome]]
    destructive: set[str] = field(default_factory=set)
    offers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    name: str = "mysql"

    def validate(self, catalogue: Any, target: str, env: str, params: Any) -> None:
        catalogue.app(target)

    def steps(self, catalogue: Any, target: str, env: str, params: Any) -> list[Step]:
        def wrap(name: str, fn: Callable[[Context], Outcome]) -> Callable[[Context], Outcome]:
            def run(ctx: Context) -> Outcome:
                self.calls.append(name)
                return fn(ctx)
            return run
        return [Step(n, f"step {n}", wrap(n, fn), destructive=n in self.destructive,
                     offers=self.offers.get(n, ())) for n, fn in self.script.items()]

    def cancel(self, ctx: Context) -> str:
        self.cancelled.append(ctx.rotation.id)
        return "nothing to undo"


class Notices:
    def __init__(self) -> None:
        self.posted: list[str] = []
        self.fail = False

    def notify(self, rotation: Any, step: Any, summary: str, approved_by: str) -> str:
        if self.fail:
            raise ConnectionError("slack is down")
        self.posted.append(f"{step.name}: {summary} ({approved_by})")
        return "https://slack.example/archives/C2/p1"


def done(ctx: Context) -> Outcome:
    return Done("ok")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(tmp_path: Any, clock: Clock, script: dict[str, Callable[[Context], Outcome]],
         destructive: set[str] | None = None, notices: Notices | None = None,
         state: str | None = None) -> tuple[Engine, ScriptedKind]:
    """`state`: a SQLite path or PostgreSQL URL instead of tmp_path/state.db."""
    kind = ScriptedKind(script, destructive or set())
    store = Store(state or tmp_path / "state.db", clock=clock)
    return Engine(store, CATALOGUE, {"mysql": kind}, clients=None, second_line=notices,
                  clock=clock), kind


def test_steps_run_in_order_and_the_rotation_finishes(tmp_path, clock):
    engine, kind = make(tmp_path, clock, {"a": done, "b": lambda c: Skipped("nothing"),
                                          "c": done})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    final = engine.advance(rotation.id)
    assert kind.calls == ["a", "b", "c"]
    assert final.status == "done"
    assert [s.status for s in final.steps] == ["done", "skipped", "done"]
    events = [(r.event, r.step, r.to_status) for r in engine.store.audit_rows(rotation.id)]
    assert events[0] == ("started", None, "active")
    assert ("step", "b", "skipped") in events and events[-1][0] == "finished"


def test_one_active_rotation_per_app_and_environment(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"a": lambda c: Wait("x", 100)})
    first = engine.start("mysql", "signon", "staging", "U1")
    with pytest.raises(RotationConflict, match=f"#{first.id}, started by U1"):
        engine.start("mysql", "signon", "staging", "U2")
    engine.start("mysql", "signon", "production", "U2")  # another environment is fine
    engine.start("mysql", "whitehall", "staging", "U2")  # and another app
    # The database itself refuses a second active row, whatever the code above it does.
    with pytest.raises(sqlite3.IntegrityError):
        engine.store.db.execute("INSERT INTO rotations (kind, target, env, status, initiator, "
                                "created_at, updated_at) VALUES ('mysql', 'signon', 'staging',"
                                " 'active', 'x', 0, 0)")


def test_waits_back_off_up_to_the_maximum(tmp_path, clock):
    engine, kind = make(tmp_path, clock, {"a": lambda c: Wait("sync", 1000)})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    delays = []
    for _ in range(6):
        step = engine.advance(rotation.id).steps[0]
        assert engine.store.rotation(rotation.id).next_run_at == step.next_check_at
        delays.append(step.next_check_at - clock.now)
        clock.now = step.next_check_at
    assert delays == [1, 2, 4, 8, 8, 8]
    assert kind.calls == ["a"] * 6
    waits = [r for r in engine.store.audit_rows(rotation.id) if r.event == "waiting"]
    assert len(waits) == 1  # re-checks are not transitions


def test_a_wait_past_its_timeout_fails_the_step_with_the_reason(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"a": lambda c: Wait("the ExternalSecret to sync", 30)})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    engine.advance(rotation.id)
    clock.advance(31)
    step = engine.advance(rotation.id).steps[0]
    assert step.status == "failed"
    assert step.error == "timed out after 30s waiting for the ExternalSecret to sync"


def test_a_waiting_step_is_not_due_before_its_next_check(tmp_path, clock):
    engine, kind = make(tmp_path, clock, {"a": lambda c: Wait("x", 100)})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    engine.tick()
    assert engine.tick() == pytest.approx(1.0)
    engine.advance(rotation.id)
    assert kind.calls == ["a"]
    clock.advance(1)
    engine.tick()
    assert kind.calls == ["a", "a"]


def test_a_wait_can_name_when_to_check_again(tmp_path, clock):
    restore = clock() + 6 * 3600
    engine, kind = make(tmp_path, clock, {"overnight": lambda c: Done("restored")
                                          if c.now() >= restore else
                                          Wait("the overnight restore", 86400, check_at=restore)})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    assert engine.advance(rotation.id).current.next_check_at == restore
    assert engine.tick() == pytest.approx(6 * 3600)
    clock.now = restore
    engine.tick()
    assert engine.store.rotation(rotation.id).status == "done"
    assert kind.calls == ["overnight", "overnight"]


def gated(ctx: Context) -> Outcome:
    ctx.approve("Drop user signon", gate="drop")
    return Done("dropped")


def test_approval_gate_stops_until_someone_else_approves(tmp_path, clock):
    engine, kind = make(tmp_path, clock, {"a": done, "drop": gated})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    row = engine.advance(rotation.id)
    assert row.phase == "needs-approval" and row.current.gate_summary == "Drop user signon"
    assert row.next_run_at is None  # the worker leaves it alone until a person decides
    engine.approve(rotation.id, "drop", "U2")
    final = engine.advance(rotation.id)
    assert final.status == "done" and final.steps[1].decided_by == "U2"
    assert kind.calls == ["a", "drop", "drop"]


def test_four_eyes_refuses_self_approval_in_production_only(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"drop": gated})
    prod = engine.start("mysql", "signon", "production", "U1")
    engine.advance(prod.id)
    with pytest.raises(NotAllowed, match="second person"):
        engine.approve(prod.id, "drop", "U1")
    assert engine.store.rotation(prod.id).current.decision is None  # nothing changed
    staging = engine.start("mysql", "signon", "staging", "U1")
    engine.advance(staging.id)
    engine.approve(staging.id, "drop", "U1")


def test_a_guided_step_waits_for_done_from_anyone_even_the_initiator(tmp_path, clock):
    def fastly(ctx: Context) -> Outcome:
        who = ctx.guide("Paste the new key into Fastly's logging endpoint", gate="fastly")
        return Done(f"Fastly updated by {who}")

    engine, _ = make(tmp_path, clock, {"fastly": fastly})
    rotation = engine.start("mysql", "signon", "production", "U1")
    row = engine.advance(rotation.id)
    assert row.current.guided and row.current.gate_summary.startswith("Paste the new key")
    engine.approve(rotation.id, "fastly", "U1")  # four-eyes is for approvals, not for "Done"
    assert engine.advance(rotation.id).steps[0].result == "Fastly updated by U1"


def test_a_step_can_offer_a_request_during_a_grace_period(tmp_path, clock):
    def grace(ctx: Context) -> Outcome:
        who = ctx.requested("rollback")
        if who:
            return Done(f"rolled back for {who}")
        return Wait("the grace period", 3600, check_at=ctx.now() + 600)

    engine, kind = make(tmp_path, clock, {"grace": grace})
    kind.offers["grace"] = ("rollback",)
    rotation = engine.start("mysql", "signon", "staging", "U1")
    with pytest.raises(InvalidTransition, match="does not offer rollback now"):
        engine.request(rotation.id, "rollback", "U2")  # not waiting in the grace period yet
    engine.advance(rotation.id)
    assert engine.offers(engine.store.rotation(rotation.id)) == ("rollback",)
    with pytest.raises(InvalidTransition, match="does not offer reactivate now"):
        engine.request(rotation.id, "reactivate", "U2")
    engine.request(rotation.id, "rollback", "U2")
    with pytest.raises(InvalidTransition, match="already asked for by U2"):
        engine.request(rotation.id, "rollback", "U3")
    engine.tick()  # due at once: the request set next_run_at to now
    final = engine.store.rotation(rotation.id)
    assert final.status == "done" and final.steps[0].result == "rolled back for U2"


def test_a_double_click_approves_once(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"drop": gated})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    engine.advance(rotation.id)
    engine.approve(rotation.id, "drop", "U2")
    with pytest.raises(InvalidTransition, match="not waiting for approval"):
        engine.approve(rotation.id, "drop", "U3")
    approvals = [r for r in engine.store.audit_rows(rotation.id) if r.event == "approved"]
    assert [r.actor for r in approvals] == ["U2"]


def test_reject_stops_and_retry_asks_again(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"drop": gated})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    engine.advance(rotation.id)
    row = engine.reject(rotation.id, "drop", "U2")
    assert row.current.status == "failed" and row.current.error == "rejected by U2"
    engine.retry(rotation.id, "U1")
    assert engine.advance(rotation.id).phase == "needs-approval"


def test_destructive_gate_in_production_tells_second_line_first_then_holds(tmp_path, clock):
    notices = Notices()
    engine, kind = make(tmp_path, clock, {"drop": gated}, destructive={"drop"},
                        notices=notices)
    rotation = engine.start("mysql", "signon", "production", "U1")
    engine.advance(rotation.id)
    engine.approve(rotation.id, "drop", "U2")
    row = engine.advance(rotation.id)
    assert notices.posted == ["drop: Drop user signon (U2)"]
    assert row.current.status == "waiting" and "hold period" in row.current.wait_reason
    assert kind.calls == ["drop", "drop"]  # asked, then notified; the drop itself not yet
    clock.advance(61)
    assert engine.advance(rotation.id).status == "done"
    assert len(notices.posted) == 1


def test_second_line_can_hold_a_destructive_step(tmp_path, clock):
    notices = Notices()
    engine, _ = make(tmp_path, clock, {"drop": gated}, destructive={"drop"}, notices=notices)
    rotation = engine.start("mysql", "signon", "production", "U1")
    engine.advance(rotation.id)
    engine.approve(rotation.id, "drop", "U2")
    engine.advance(rotation.id)
    row = engine.hold(rotation.id, "drop", "U9")
    assert row.phase == "needs-approval" and row.current.decision is None
    clock.advance(120)
    assert engine.advance(rotation.id).phase == "needs-approval"


def test_slack_down_keeps_the_approval_and_retries_the_notice(tmp_path, clock):
    notices = Notices()
    notices.fail = True
    engine, _ = make(tmp_path, clock, {"drop": gated}, destructive={"drop"}, notices=notices)
    rotation = engine.start("mysql", "signon", "production", "U1")
    engine.advance(rotation.id)
    engine.approve(rotation.id, "drop", "U2")
    row = engine.advance(rotation.id)
    assert row.current.status == "waiting" and row.current.decision == "approved"
    notices.fail = False
    clock.advance(31)
    engine.advance(rotation.id)
    clock.advance(61)
    assert engine.advance(rotation.id).status == "done"


def test_no_notifier_means_no_destructive_step_in_production(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"drop": gated}, destructive={"drop"})
    rotation = engine.start("mysql", "signon", "production", "U1")
    engine.advance(rotation.id)
    engine.approve(rotation.id, "drop", "U2")
    step = engine.advance(rotation.id).current
    assert step.status == "failed" and "2nd line must be told" in step.error


def test_a_step_interrupted_by_a_crash_resumes_with_its_data(tmp_path, clock):
    def pick_name(ctx: Context) -> Outcome:
        if "name" not in ctx.data:
            ctx.data["name"] = "signon_user_1"
            ctx.save()
            raise KeyboardInterrupt  # the process dies half-way through the step
        return Done(ctx.data["name"])

    engine, _ = make(tmp_path, clock, {"create": pick_name, "next": done})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    with pytest.raises(KeyboardInterrupt):
        engine.advance(rotation.id)
    # A new process: same state file, new worker id.
    engine2, _ = make(tmp_path, clock, {"create": pick_name, "next": done})
    final = engine2.advance(rotation.id)
    assert final.status == "done"
    assert final.steps[0].attempts == 2 and final.steps[0].result == "signon_user_1"
    assert any(r.event == "resumed" for r in engine2.store.audit_rows(rotation.id))


def test_a_live_lease_keeps_a_second_worker_out(tmp_path, clock):
    engine, kind = make(tmp_path, clock, {"a": done})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    assert engine.store.claim(rotation.id, "otherhost:1:abc", clock() + 60,
                              is_stale=lambda holder: False)
    assert engine.advance(rotation.id).phase == "pending"
    assert kind.calls == []
    clock.advance(61)
    assert engine.advance(rotation.id).status == "done"


def test_a_failed_step_stops_and_retry_runs_it_again(tmp_path, clock):
    attempts: list[int] = []

    def flaky(ctx: Context) -> Outcome:
        attempts.append(1)
        if len(attempts) == 1:
            raise StepFailed("admin login refused")
        return Done("ok")

    engine, _ = make(tmp_path, clock, {"a": flaky, "b": done})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    row = engine.advance(rotation.id)
    assert row.phase == "failed" and row.current.error == "admin login refused"
    engine.retry(rotation.id, "U1")
    assert engine.advance(rotation.id).status == "done"
    with pytest.raises(InvalidTransition, match="is done"):
        engine.retry(rotation.id, "U1")


def test_cancel_runs_the_kinds_cancel_and_frees_the_app(tmp_path, clock):
    engine, kind = make(tmp_path, clock, {"a": lambda c: Wait("x", 100)})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    engine.advance(rotation.id)
    row = engine.cancel(rotation.id, "U2")
    assert row.status == "cancelled" and kind.cancelled == [rotation.id]
    assert engine.store.audit_rows(rotation.id)[-1].detail == "nothing to undo"
    engine.start("mysql", "signon", "staging", "U1")
    with pytest.raises(InvalidTransition, match="cancelled"):
        engine.approve(rotation.id, "a", "U2")


def test_a_cancel_waits_for_another_engine_of_this_process_to_let_the_rotation_go(
    tmp_path, clock
):
    """rotor serve's pool: a worker engine is in a step when the Slack handler's engine
    cancels; the cancel waits for the step to end and then cancels, rather than answer
    "requested" (and the person wait for the worker)."""
    entered, leave = threading.Event(), threading.Event()

    def slow(ctx: Context) -> Outcome:
        entered.set()
        leave.wait(10)
        return Wait("x", 100)

    worker, kind = make(tmp_path, clock, {"a": slow})
    handler, _ = make(tmp_path, clock, {"a": slow})
    handler.kinds["mysql"] = kind  # one kind: the cancels it ran are counted once
    rotation = worker.start("mysql", "signon", "staging", "U1")
    running = threading.Thread(target=worker.advance, args=(rotation.id,))
    running.start()
    assert entered.wait(10)
    threading.Timer(0.3, leave.set).start()
    row = handler.cancel(rotation.id, "U2")
    running.join(10)
    assert row.status == "cancelled" and kind.cancelled == [rotation.id]


def test_expired_approvals_pause_and_can_be_asked_again(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"drop": gated})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    engine.advance(rotation.id)
    clock.advance(3600)
    assert [r.id for r in engine.expire_approvals(older_than=clock() - 60)] == [rotation.id]
    with pytest.raises(InvalidTransition, match="expired"):
        engine.approve(rotation.id, "drop", "U2")
    engine.ask_again(rotation.id, "drop", "U1")
    engine.approve(rotation.id, "drop", "U2")
    assert engine.advance(rotation.id).status == "done"


def test_a_secret_never_reaches_the_state_db(tmp_path, clock):
    secret = "Zs8Qm2LrT4vX9pKc"
    redact.register(secret)

    def leaky(ctx: Context) -> Outcome:
        ctx.data["oops"] = secret
        return Done(f"password is {secret}")

    engine, _ = make(tmp_path, clock, {"a": leaky})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    row = engine.advance(rotation.id)
    assert row.phase == "failed"
    dump = "\n".join(engine.store.db.iterdump())
    assert secret not in dump


def test_audit_is_append_only_and_migrations_run_once(tmp_path, clock):
    store = Store(tmp_path / "s.db", clock=clock)
    store.audit(None, "note", "U1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.execute("UPDATE audit SET actor = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.execute("DELETE FROM audit")
    again = Store(tmp_path / "s.db", clock=clock)
    assert again.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_locks_of_dead_processes_are_taken_at_once_and_old_ones_pruned(tmp_path, clock):
    import subprocess
    import sys

    from rotation.store import process_identity

    store = Store(tmp_path / "s.db", clock=clock)
    dead = subprocess.run([sys.executable, "-c", "from rotation.store import process_identity; "
                           "print(process_identity())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    alive = process_identity()
    assert store.try_lock("slack-reporter", dead, clock() + 60)
    assert store.try_lock("slack-reporter", "me", clock() + 60)  # its holder died: taken now
    assert not store.try_lock("slack-reporter", alive, clock() + 60)  # a live holder keeps it
    assert store.try_lock("slack-request:T1", alive, clock() + 5)
    clock.advance(10)
    assert store.prune_locks("slack-request:", expired_before=clock()) == 1
    assert store.prune_locks("slack-request:", expired_before=clock()) == 0
