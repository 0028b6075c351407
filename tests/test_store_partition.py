"""Partition: one worker's PostgreSQL connections are cut (pg_terminate_backend) in the middle
of a step. Its lease runs out, another worker claims and finishes the step; the cut worker,
back on a new connection, acts on nothing (its writes and side effects meet LeaseLost) until
it holds a lease again."""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

import psycopg

from rotation import fence
from rotation.engine import Context, Done, Engine, Outcome
from rotation.store import Store
from rotation.store_pg import PostgresStore
from tests.test_engine import CATALOGUE, Clock, ScriptedKind, done
from tests.waiting import wait_for


def test_a_cut_worker_stops_acting_until_it_holds_a_lease_again(postgres_state):
    clock = Clock()
    entered, release = threading.Event(), threading.Event()
    effects: list[str] = []

    def slow(ctx: Context) -> Outcome:
        first = not entered.is_set()
        entered.set()
        if first:
            release.wait(60)
        fence.guard("write to the world")  # every side effect checks the lease first
        effects.append(ctx.engine.worker_id)
        return Done("written")

    kind = ScriptedKind({"a": slow, "b": done})
    cut = PostgresStore(postgres_state, clock=clock, application_name="rotor-cut")
    other = Store(postgres_state, clock=clock)
    a = Engine(cut, CATALOGUE, {"mysql": kind}, clients=None, clock=clock)
    b = Engine(other, CATALOGUE, {"mysql": kind}, clients=None, clock=clock)
    a.heartbeat = b.heartbeat = None  # the fake clock drives the lease
    try:
        rid = a.start("mysql", "signon", "staging", "U1").id
        runner = threading.Thread(target=a.advance, args=(rid,))
        runner.start()
        assert entered.wait(30)
        name = urlsplit(postgres_state).path.lstrip("/")
        with psycopg.connect(postgres_state, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                "AND application_name = 'rotor-cut'", (name,)).fetchall()
        assert killed
        clock.advance(10_000)  # the cut worker's lease runs out
        assert b.advance(rid).status == "done"
        assert effects == [b.worker_id]
        release.set()
        runner.join(60)
        assert effects == [b.worker_id]  # the cut worker's side effect never happened
        audit = other.audit_rows(rid)
        assert [r.step for r in audit if r.to_status == "done" and r.step] == ["a", "b"]
        assert any(r.event == "lease-lost" and r.actor == a.worker_id for r in audit)
        # Back on new connections, it acts again once it holds a lease of its own.
        again = a.start("mysql", "whitehall", "staging", "U1").id
        wait_for(lambda: cut.ping() is None, what="the cut store to reconnect", timeout=30)
        assert a.advance(again).status == "done" and effects[-1] == a.worker_id
    finally:
        release.set()
        cut.close()
        other.close()
