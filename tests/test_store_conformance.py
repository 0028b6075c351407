"""One conformance suite for both state backends: every test runs against SQLite and against
a uniquely named PostgreSQL database (the `state_url` fixture), through `Store(url)`.

What the database itself must enforce is checked with statements that go around the store's
own methods: the one-active-rotation index and the append-only audit."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rotation import fence, redact, store_pg, store_sqlite
from rotation.errors import LeaseLost, RotationConflict, RotorError
from rotation.store import DONE, FleetRow, SecretInState, StepRow, Store
from rotation.store_pg import MIGRATIONS as PG_MIGRATIONS
from rotation.store_sqlite import MIGRATIONS as SQLITE_MIGRATIONS

STEPS = [("preflight", "Check", False), ("retire", "Retire", True)]


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def opened(state_url: str) -> Iterator[Callable[..., Store]]:
    """Opens stores on the backend under test (several: several processes' worth)."""
    stores: list[Store] = []

    def open_store(clock: Callable[[], float] | None = None) -> Store:
        store = Store(state_url, clock=clock or Clock())
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        store.close()


@pytest.fixture
def store(opened: Callable[..., Store]) -> Store:
    return opened()


def _start(store: Store, target: str = "signon") -> int:
    return store.create_rotation("mysql", target, "staging", "alice", {}, STEPS)


def _together(workers: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables in threads released at the same moment; their results in order."""
    results: list[Any] = [None] * len(workers)
    barrier = threading.Barrier(len(workers))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = workers[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_the_backend_matches_the_url(store: Store, state_url: str) -> None:
    expected = "PostgresStore" if state_url.startswith("postgresql://") else "SQLiteStore"
    assert type(store).__name__ == expected
    assert store.ping() is None


def test_migrations_run_once_and_give_both_backends_the_same_columns(
        opened: Callable[..., Store]) -> None:
    first = opened()
    again = opened()  # a second process opening a migrated store changes nothing
    assert len(SQLITE_MIGRATIONS) == len(PG_MIGRATIONS)
    assert first.version() == again.version() == len(SQLITE_MIGRATIONS)  # type: ignore[attr-defined]
    with first.transaction() as db:
        steps = set(first._columns(db, "steps"))
        rotations = set(first._columns(db, "rotations"))
    assert steps == set(StepRow.__dataclass_fields__)
    assert {"lease_token", "lease_owner", "next_run_at", "params", "data"} <= rotations


def test_the_database_allows_one_active_rotation_per_target(store: Store) -> None:
    first = _start(store)
    with pytest.raises(RotationConflict, match=f"#{first}"):
        _start(store)
    # Around the store's own check: the partial unique index refuses it.
    with pytest.raises(store.integrity_errors), store.transaction() as db:
        db.execute("INSERT INTO rotations (kind, target, env, status, initiator, created_at, "
                   "updated_at) VALUES ('mysql', 'signon', 'staging', 'active', 'x', 0, 0)")
    store.update_rotation(first, status=DONE)
    assert _start(store) != first  # a finished rotation does not count
    assert _start(store, "other") > first


@pytest.mark.parametrize("statement", ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"])
def test_the_database_keeps_the_audit_append_only(store: Store, statement: str) -> None:
    rid = _start(store)
    with pytest.raises(Exception, match="append-only"), store.transaction() as db:
        db.execute(statement)
    assert [r.actor for r in store.audit_rows(rid)] == ["alice"]


def test_decisions_are_compare_and_set_across_processes(opened: Callable[..., Store]) -> None:
    stores = [opened() for _ in range(4)]
    rid = _start(stores[0])

    def decide(store: Store, who: str) -> Callable[[], bool]:
        def run() -> bool:
            with store.transaction():
                return store.update_step(rid, 1, expect={"decision": None},
                                         decision="approved", decided_by=who)
        return run

    won = _together([decide(s, f"user{i}") for i, s in enumerate(stores)])
    assert won.count(True) == 1
    step = stores[0].rotation(rid).step("retire")
    assert step.decided_by == f"user{won.index(True)}"


def test_locks_are_exclusive_expire_and_a_dead_holder_loses_them(
        opened: Callable[..., Store]) -> None:
    clock = Clock()
    a, b = opened(clock), opened(clock)
    assert a.try_lock("job", "A", clock.now + 60)
    assert not b.try_lock("job", "B", clock.now + 60)
    assert a.try_lock("job", "A", clock.now + 60)  # the holder renews
    assert b.try_lock("job", "B", clock.now + 60, is_stale=lambda holder: holder == "A")
    clock.now += 61
    assert a.try_lock("job", "A", clock.now + 60)  # B's lock ran out
    assert a.prune_locks("jo", clock.now + 120) == 1
    first = _together([lambda s=s, i=i: s.try_lock("new", f"P{i}", clock.now + 60)  # type: ignore[misc]
                       for i, s in enumerate([opened(clock) for _ in range(4)])])
    assert first.count(True) == 1


def test_leases_carry_fencing_tokens_and_a_lost_lease_writes_nothing(
        opened: Callable[..., Store]) -> None:
    clock = Clock()
    a, b = opened(clock), opened(clock)
    rid = _start(a)
    token = a.claim(rid, "A", clock.now + 60)
    assert token == 1
    assert b.claim(rid, "B", clock.now + 60) is None
    assert a.renew(rid, "A", token, clock.now + 90)
    clock.now += 91
    assert b.claim(rid, "B", clock.now + 60) == 2
    assert not a.renew(rid, "A", token, clock.now + 60)
    lease = fence.Lease(a, rid, "A", token, seconds=60, clock=clock)
    with lease.held(), pytest.raises(LeaseLost):
        with a.transaction():
            a.update_rotation(rid, data={"written": "by A"})
    assert b.rotation(rid).data == {}
    assert "B (token 2)" == b.lease_holder(rid)
    b.release(rid, "B", 2)
    assert b.rotation(rid).lease_owner is None


def test_due_work_is_claimed_once_across_processes(opened: Callable[..., Store]) -> None:
    clock = Clock()
    stores = [opened(clock) for _ in range(4)]
    rids = [_start(stores[0], f"t{i}") for i in range(12)]

    def drain(store: Store, me: str) -> Callable[[], list[int]]:
        def run() -> list[int]:
            got: list[int] = []
            while claimed := store.claim_due(clock.now, me, clock.now + 60, skip=got):
                got.append(claimed[0])
            return got
        return run

    claims = _together([drain(s, f"W{i}") for i, s in enumerate(stores)])
    flat = sorted(r for got in claims for r in got)
    assert flat == rids  # each due rotation claimed exactly once
    assert stores[0].claim_due(clock.now, "late", clock.now + 60) is None


def test_the_secret_guard_refuses_every_row_with_a_secret(store: Store) -> None:
    secret = "s3cr\u00e9t\"" + secrets.token_hex(6)
    redact.register(secret)
    rid = _start(store)
    with pytest.raises(SecretInState):
        store.create_rotation("mysql", "x", "staging", "alice", {"p": [secret]}, STEPS)
    with pytest.raises(SecretInState):
        store.update_rotation(rid, data={"nested": {"k": secret}})
    with pytest.raises(SecretInState):
        store.update_step(rid, 0, result=f"password={secret}")
    with pytest.raises(SecretInState), store.transaction():
        store.audit(rid, "note", "alice", detail=secret)
    with pytest.raises(SecretInState):
        store.set_kv("k", secret)
    for table in Store.TABLES:
        _, rows = store.table_rows(table)
        assert secret not in repr(rows)


def test_state_copy_refuses_a_store_that_is_not_empty(store: Store, tmp_path: Any) -> None:
    source = Store(tmp_path / "source.db", clock=Clock())
    _start(source)
    _start(store)
    with pytest.raises(RotorError, match="not empty"):
        store.copy_from(source)
    source.close()


def test_a_rotation_is_read_at_one_moment(opened, monkeypatch):
    """A rotation's row and its steps are two statements: a commit that lands between them
    (an approval that sets the decision and the wake-up together) must not give the reader
    the row from before it and the steps from after it."""
    reader, writer = opened(), opened()
    rid = _start(writer)
    before = writer.rotation(rid).next_run_at

    landed: list[bool] = []

    def approve_now() -> None:
        landed.append(True)
        with writer.transaction(fenced=False):
            writer.update_rotation(rid, next_run_at=5.0)
            writer.update_step(rid, 1, decision="approved")

    for module in (store_pg, store_sqlite):
        plain = module._Connection.execute

        def execute(self: Any, text: str, args: Any = (), plain: Any = plain) -> Any:
            cursor = plain(self, text, args)
            if not landed and text.startswith("SELECT") and "FROM rotations WHERE id" in text:
                approve_now()
            return cursor

        monkeypatch.setattr(module._Connection, "execute", execute)
    row = reader.rotation(rid)
    assert landed == [True]
    assert (row.next_run_at, row.step(1).decision) == (before, None)
    again = reader.rotation(rid)
    assert (again.next_run_at, again.step(1).decision) == (5.0, "approved")


def test_a_fleet_is_a_record_grouping_its_rotations_with_a_computed_status(
        opened: Callable[..., Store]) -> None:
    from rotation import fleet as fleets

    store = opened()
    plan = [{"app": "signon", "kind": "mysql", "action": "2 steps"},
            {"app": "other", "kind": "mysql", "action": "2 steps"},
            {"app": "gone", "kind": "mysql", "skip": "already rotating (#9)"}]
    fid = store.create_fleet("staging", "alice", {"compromised": True}, plan)
    row = store.fleet(fid)
    assert (row.status, row.plan, row.params) == ("planned", plan, {"compromised": True})
    assert fleets.status(row, []).word == "waiting"
    # Confirming is compare-and-set across processes: one of four wins.
    others = [opened() for _ in range(4)]
    won = _together([lambda s=s, i=i: s.move_fleet(fid, "planned", "started", f"user{i}",
                                                   confirmed=True)
                     for i, s in enumerate(others)])
    assert won.count(True) == 1
    assert store.fleet(fid).confirmed_by == f"user{won.index(True)}"
    first = store.create_rotation("mysql", "signon", "staging", "alice", {}, STEPS,
                                  fleet_id=fid)
    second = store.create_rotation("mysql", "other", "staging", "alice", {}, STEPS,
                                   fleet_id=fid)
    _start(store, "loner")  # not in the fleet
    members = store.fleet_rotations(fid)
    assert [r.id for r in members] == [first, second]
    assert {r.fleet_id for r in members} == {fid}
    assert fleets.status(store.fleet(fid), members).word == "running"
    with store.transaction():
        store.update_step(second, 0, status="done")
        store.update_step(second, 1, status="needs-approval")
    waiting = fleets.status(store.fleet(fid), store.fleet_rotations(fid))
    assert (waiting.word, waiting.detail) == ("waiting", "on approval of retire")
    with store.transaction():
        store.update_step(first, 0, status="failed", error="no such user")
    failed = fleets.status(store.fleet(fid), store.fleet_rotations(fid))
    assert (failed.word, failed.detail) == ("failed", "signon at preflight: no such user")
    for rid in (first, second):
        store.update_rotation(rid, status=DONE)
    assert fleets.status(store.fleet(fid), store.fleet_rotations(fid)).word == "done"
    assert [f.id for f in store.fleets()] == [fid]
    store.set_fleet_message(fid, "C1:123.4")
    assert store.fleet(fid).message_ref == "C1:123.4"
    with store.transaction() as db:
        assert set(store._columns(db, "fleets")) == set(FleetRow.__dataclass_fields__)
