"""Fenced leases: a worker that lost its lease neither acts on the world nor writes state."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from bot.settings import Settings
from bot.wiring import build_engine
from rotation import fence
from rotation.engine import LEASE_SECONDS, Context, Done, Outcome
from rotation.errors import LeaseLost
from rotation.store import holder_is_dead, process_identity
from tests.rig import Rig
from tests.test_engine import Clock, done, make


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _wait_until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the split brain of the issue, on a real rotation --------------------------------------


def test_a_worker_stalled_in_promote_does_not_promote_after_another_cancelled(world: Rig):
    """Worker A stalls inside promote (paused: no heartbeat); B takes over and cancels;
    A resumes. A must neither move AWSCURRENT nor write `promote: done`."""
    old = world.current()["username"]
    a = build_engine(Settings.load(), clock=world.clock)
    b = build_engine(Settings.load(), clock=world.clock)
    a.heartbeat = None  # a paused process renews nothing
    stalled, resume = threading.Event(), threading.Event()

    def stall(**_: Any) -> None:
        if not stalled.is_set():
            stalled.set()
            assert resume.wait(60)

    sm = a.clients.aws("staging", "secretsmanager")
    sm.meta.events.register_first(
        "before-call.secrets-manager.UpdateSecretVersionStage", stall)
    rotation = a.start("mysql", world.app, "staging", "alice")
    worker_a = threading.Thread(target=a.advance, args=(rotation.id,))
    worker_a.start()
    assert stalled.wait(60), "A never reached promote"
    world.clock.advance(LEASE_SECONDS + 1)

    cancelled = b.cancel(rotation.id, "carol")
    assert cancelled.status == "cancelled"
    resume.set()
    worker_a.join(60)
    assert not worker_a.is_alive()

    final = a.store.rotation(rotation.id)
    assert final.status == "cancelled"
    assert final.step("promote").status != "done"
    assert world.current()["username"] == old  # AWSCURRENT never moved
    world.login(world.current())
    assert all("AWSPENDING" not in stages for stages in world.stages().values())
    events = [(r.event, r.actor, r.detail or "") for r in a.store.audit_rows(rotation.id)]
    lost = [e for e in events if e[0] == "lease-lost"]
    assert lost and lost[0][1] == a.worker_id and "UpdateSecretVersionStage" in lost[0][2]
    after_cancel = events[[e[0] for e in events].index("cancelled") + 1:]
    assert [e[0] for e in after_cancel] == ["lease-lost"]


# -- the engine on its own -----------------------------------------------------------------


def test_every_claim_bumps_the_token_and_a_live_lease_is_never_taken(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"a": done})
    store = engine.store
    rotation = engine.start("mysql", "signon", "staging", "U1")
    first = store.claim(rotation.id, "w1", clock() + 60, is_stale=lambda h: False)
    assert first == 1
    assert store.claim(rotation.id, "w1", clock() + 60, is_stale=lambda h: False) is None
    assert store.claim(rotation.id, "w2", clock() + 60, is_stale=lambda h: False) is None
    clock.advance(61)
    assert store.claim(rotation.id, "w2", clock() + 60, is_stale=lambda h: False) == 2
    assert not store.renew(rotation.id, "w1", 1, clock() + 60)  # w1's claim is over
    store.release(rotation.id, "w1", 1)
    assert store.rotation(rotation.id).lease_owner == "w2"  # a stale release frees nothing


def test_a_stale_token_writes_nothing(tmp_path, clock):
    engine, _ = make(tmp_path, clock, {"a": done})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    store = engine.store
    token = store.claim(rotation.id, "w1", clock() + 60)
    assert token is not None
    lease = fence.Lease(store, rotation.id, "w1", token, seconds=60, clock=clock)
    clock.advance(61)
    assert store.claim(rotation.id, "w2", clock() + 60) == token + 1
    before = store.rotation(rotation.id)
    with lease.held(), pytest.raises(LeaseLost), store.transaction():
        store.update_step(rotation.id, 0, status="done", result="promoted")
        store.audit(rotation.id, "step", "rotor", step="a", to_status="done")
    after = store.rotation(rotation.id)
    assert after.steps == before.steps
    assert [r.event for r in store.audit_rows(rotation.id)] == ["started"]


def test_a_step_that_lost_its_lease_stops_at_its_next_side_effect(tmp_path, clock):
    acted: list[str] = []

    def overtaken(ctx: Context) -> Outcome:
        # Another worker claims the rotation while this step runs (this one was paused).
        ctx.engine.store.claim(ctx.rotation.id, "other:1:x:y", clock() + 60,
                               is_stale=lambda h: True)
        fence.guard("drop the old user")
        acted.append("dropped")
        return Done("dropped")

    engine, kind = make(tmp_path, clock, {"a": overtaken, "b": done})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    row = engine.advance(rotation.id)
    assert acted == [] and kind.calls == ["a"]
    assert row.steps[0].status == "running"  # not done, not failed: untouched
    assert row.lease_owner == "other:1:x:y"
    lost = [r for r in engine.store.audit_rows(rotation.id) if r.event == "lease-lost"]
    assert len(lost) == 1 and lost[0].step == "a" and "drop the old user" in lost[0].detail


def test_a_heartbeat_keeps_a_slow_step_s_lease(tmp_path, clock):
    entered, release = threading.Event(), threading.Event()

    def slow(ctx: Context) -> Outcome:
        entered.set()
        assert release.wait(30)
        fence.guard("change something")
        return Done("ok")

    engine, _ = make(tmp_path, clock, {"a": slow})
    engine.heartbeat = 0.01
    rotation = engine.start("mysql", "signon", "staging", "U1")
    worker = threading.Thread(target=engine.advance, args=(rotation.id,))
    worker.start()
    assert entered.wait(30)
    clock.advance(LEASE_SECONDS * 3)  # far past the lease the claim took
    _wait_until(lambda: (engine.store.rotation(rotation.id).lease_until or 0) > clock(),
                "a heartbeat")
    other, _ = make(tmp_path, clock, {"a": slow})
    assert other.advance(rotation.id).lease_owner == engine.worker_id  # kept out
    release.set()
    worker.join(30)
    assert engine.store.rotation(rotation.id).status == "done"


# -- who is dead -------------------------------------------------------------------------


def _identity_of_a_finished_process() -> str:
    return subprocess.run(
        [sys.executable, "-c", "from rotation.store import process_identity; "
         "print(process_identity())"], capture_output=True, text=True, check=True).stdout.strip()


def test_a_finished_process_on_this_host_is_dead_a_live_one_is_not():
    assert holder_is_dead(_identity_of_a_finished_process())
    assert not holder_is_dead(process_identity())


def test_a_shared_hostname_or_pid_is_not_taken_for_death():
    host, pid, instance, proof = process_identity().split(":")
    boot, namespace, started = proof.split(".")
    gone = _identity_of_a_finished_process().split(":")
    # Another container: same hostname, another pid namespace; its pid means nothing here.
    assert not holder_is_dead(":".join([host, gone[1], "c0ffee00",
                                        f"{boot}.{int(namespace) + 1}.{started}"]))
    # Another machine with the same hostname (another boot id).
    assert not holder_is_dead(":".join([host, gone[1], "c0ffee00",
                                        f"00000000-0000.{namespace}.{started}"]))
    # Our own pid (pid 1 in a container, say) but a process that started at another time:
    # the pid was reused, the holder is gone.
    assert holder_is_dead(":".join([host, pid, instance,
                                    f"{boot}.{namespace}.{int(started) + 1}"]))
    # Names without proof (older versions, no /proc) wait for the lease to run out.
    assert not holder_is_dead(f"{host}:{gone[1]}:abc")


# -- which calls are side effects --------------------------------------------------------


@pytest.mark.parametrize(("statement", "writes"), [
    ("SELECT user, host FROM mysql.user", False),
    ("  select 1", False),
    ("SHOW GRANTS FOR 'a'@'%'", False),
    ("SET NAMES utf8mb4", False),
    ("SET SESSION sql_mode = ''", False),
    ("SET @x = 1", False),
    ("SELECT set_config('lock_timeout', '10s', false)", False),
    ("SET LOCAL statement_timeout = '5s'", False),
    ("CREATE USER 'a'@'%' IDENTIFIED BY 'x'", True),
    ("GRANT SELECT ON db.* TO 'a'@'%'", True),
    ("DROP USER 'a'@'%'", True),
    ("KILL 42", True),
    ("CALL mysql.rds_kill(42)", True),
    ("SET PASSWORD FOR 'a'@'%' = 'x'", True),
    ("SET DEFAULT ROLE r FOR 'a'@'%'", True),
    ("ALTER ROLE a PASSWORD 'x'", True),
    ("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM x", True),
    (b"REASSIGN OWNED BY a TO b", True),
])
def test_sql_that_changes_something_is_guarded(statement, writes):
    assert fence.sql_writes(statement) is writes


@pytest.mark.parametrize(("operation", "writes"), [
    ("GetSecretValue", False), ("DescribeSecret", False), ("ListAccessKeys", False),
    ("GetAccessKeyLastUsed", False), ("DescribeServices", False),
    ("PutSecretValue", True), ("UpdateSecretVersionStage", True), ("CreateAccessKey", True),
    ("UpdateAccessKey", True), ("DeleteAccessKey", True), ("UpdateService", True),
])
def test_aws_calls_that_change_something_are_guarded(operation, writes):
    assert fence.aws_write(operation) is writes


def test_a_lost_lease_stops_sql_before_it_reaches_the_server(mysql_box, postgres_box, tmp_path,
                                                             clock):
    from rotation import mysql_db, postgres_db

    engine, _ = make(tmp_path, clock, {"a": done})
    rotation = engine.start("mysql", "signon", "staging", "U1")
    store = engine.store
    token = store.claim(rotation.id, "w1", clock() + 60)
    assert token is not None
    lease = fence.Lease(store, rotation.id, "w1", token, seconds=60, clock=clock)
    user = f"{mysql_box.prefix}_fenced"
    my = mysql_db.connect(mysql_db.Endpoint(
        host=mysql_box.host, port=mysql_box.port, user=mysql_box.admin_user,
        password=mysql_box.admin_password, tls="disabled"))
    pg = postgres_db.connect(postgres_db.Endpoint(
        host=postgres_box.host, port=postgres_box.port, user=postgres_box.admin_user,
        password=postgres_box.admin_password, database=postgres_box.database, tls="disabled"))
    try:
        with lease.held():
            my.cursor().execute("SELECT 1")  # reads need no lease check
            store.claim(rotation.id, "w2", clock() + 1000, is_stale=lambda h: True)
            assert pg.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(LeaseLost):
                my.cursor().execute("CREATE USER %s@'%%' IDENTIFIED BY 'x'", (user,))
            with pytest.raises(LeaseLost):
                pg.execute("CREATE ROLE " + user)
        assert not mysql_db.user_hosts(my, user)
        assert pg.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s",
                          (user,)).fetchone() == (0,)
    finally:
        my.close()
        pg.close()
