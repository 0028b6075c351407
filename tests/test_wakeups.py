"""No lost wake-ups: a decision's wake-up is never overwritten by a worker's stale read."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from rotation import catalogue
from rotation.engine import Context, Done, Engine, Outcome
from rotation.errors import InvalidTransition
from rotation.store import Store
from tests.test_engine import CATALOGUE, ScriptedKind, done


def ask(ctx: Context) -> Outcome:
    ctx.approve("go ahead?")
    return Done("approved")


def _engine(state: str, clock: Any = time.time) -> Engine:
    kind = ScriptedKind({"ask": ask, "after": done})
    store = Store(state, clock=clock)
    return Engine(store, CATALOGUE, {"mysql": kind}, clients=None, clock=clock)


def test_an_approval_between_the_workers_read_and_its_schedule_keeps_its_wake_up(state_url):
    """The approval lands right after the worker read the rotation as needing approval, and
    before it recorded "nobody needs to look at this": the rotation must still be due."""
    engine = _engine(state_url)
    rotation = engine.start("mysql", "signon", "staging", "U1")
    worker = threading.current_thread()
    read = engine.store.rotation
    approved: list[int] = []

    def read_then_approve(rotation_id: int) -> Any:
        row = read(rotation_id)
        step = row.current
        if (threading.current_thread() is worker and not approved and step is not None
                and step.status == "needs-approval"):
            approved.append(rotation_id)  # another person clicks Approve just now
            other = threading.Thread(target=engine.approve, args=(rotation_id, "ask", "U2"))
            other.start()
            other.join(30)
        return row

    engine.store.rotation = read_then_approve  # type: ignore[method-assign]
    engine.advance(rotation.id)
    engine.store.rotation = read  # type: ignore[method-assign]
    assert approved == [rotation.id]
    after = engine.store.rotation(rotation.id)
    assert after.step("ask").decision == "approved"
    assert after.next_run_at is not None, "the approval's wake-up was overwritten"
    assert rotation.id in engine.store.due(engine.clock())
    engine.tick()
    assert engine.store.rotation(rotation.id).status == "done"


APPS = 20
MANY = catalogue.parse(
    "environments:\n  staging: {aws_region: eu-west-1}\napps:\n"
    + "".join(f"  app{i}: {{engine: mysql}}\n" for i in range(APPS))
    + "waits: {first_check: 1, max_check: 8}\n")


def test_many_rotations_with_instant_approvals_all_finish(state_url):
    """20 rotations, two workers, and a person who approves each gate the moment it opens:
    every rotation finishes (on the old `_schedule`, some stopped for good: approved, but
    never due again)."""
    kinds = {"mysql": ScriptedKind({"ask": ask, "after": done})}

    def engine() -> Engine:
        return Engine(Store(state_url, clock=time.time), MANY, kinds,
                      clients=None, clock=time.time)

    starter, person, workers = engine(), engine(), [engine(), engine()]
    opened: queue.Queue[int] = queue.Queue()
    for worker in workers:
        worker.heartbeat = None
        worker.on_change = opened.put
    stop = threading.Event()

    def approve() -> None:
        while not stop.is_set():
            try:
                rotation_id = opened.get(timeout=0.05)
            except queue.Empty:
                continue
            step = person.store.rotation(rotation_id).current
            if step is not None and step.status == "needs-approval":
                try:
                    person.approve(rotation_id, step.name, "U2")
                except InvalidTransition:
                    pass  # decided already

    def work(worker: Engine) -> None:
        while not stop.is_set():
            if worker.tick() is None:
                time.sleep(0.001)

    ids = [starter.start("mysql", f"app{i}", "staging", "U1").id for i in range(APPS)]
    threads = [threading.Thread(target=approve)] + [
        threading.Thread(target=work, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = [starter.store.rotation(i) for i in ids]
            stuck = [r.id for r in rows if r.status == "active" and r.next_run_at is None
                     and r.current is not None and r.current.decision == "approved"]
            assert not stuck, f"approved but never due again: {stuck}"
            if all(r.status == "done" for r in rows):
                break
            time.sleep(0.05)
        assert [r.status for r in rows] == ["done"] * APPS
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
