"""Several `rotor serve` replicas on one PostgreSQL state store: three measurements.

    python benchmarks/ha.py claim     # time to claim due work, 200 active rotations, SQLite and PG
    python benchmarks/ha.py ack       # ack p50/p99: 3 replicas against 1, rounds alternating
    python benchmarks/ha.py failover [KILLS]   # SIGKILL the lease holder mid-step of a real
                                               # mysql rotation, KILLS times (10)

Uses the local PostgreSQL (127.0.0.1:5432, or ROTOR_TEST_POSTGRES_URL) in uniquely named
databases it drops after, and the fake Slack Web API; `failover` also MariaDB (127.0.0.1:3306),
moto's server and the fake Kubernetes, through tests/rig.py. Loopback only; bounded; stops by
itself.
"""

from __future__ import annotations

import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.slack_api import FakeSlack  # noqa: E402
from rotation.store import Store  # noqa: E402
from tests import servers  # noqa: E402
from tests.slackbot import GROUPS, BotProcess  # noqa: E402

ROTATIONS = 200
CONCURRENCY = 30
ROUNDS = 6


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _ms(values: list[float]) -> str:
    return (f"p50 {statistics.median(values) * 1000:7.2f} ms  p99 {_pct(values, 0.99) * 1000:7.2f} "
            f"ms  max {max(values) * 1000:7.2f} ms  (n={len(values)})")


def claim() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = servers.postgres_state_db()
        try:
            for name, where in (("SQLite", str(Path(tmp) / "state.db")), ("PostgreSQL", url)):
                store = Store(where, clock=time.time)
                steps = [("a", "A", False), ("b", "B", False)]
                for i in range(ROTATIONS):
                    store.create_rotation("mysql", f"app{i}", "staging", "bench", {}, steps)
                one: list[float] = []
                for i in range(50):  # claim the most overdue one, then give it back
                    started = time.perf_counter()
                    got = store.claim_due(time.time(), f"w{i}", time.time() + 60)
                    one.append(time.perf_counter() - started)
                    assert got is not None
                    store.release(got[0], f"w{i}", got[1])
                drained, started = 0, time.perf_counter()
                ran: list[int] = []
                while got := store.claim_due(time.time(), "drain", time.time() + 60, skip=ran):
                    ran.append(got[0])
                    drained += 1
                total = time.perf_counter() - started
                print(f"{name:10} claim one due of {ROTATIONS}: {_ms(one)}")
                print(f"{name:10} claim all {drained} one by one: {total * 1000:.0f} ms "
                      f"({total / drained * 1000:.2f} ms each)")
                store.close()
        finally:
            servers.drop_postgres_state_db(url)


def _fire(bots: list[BotProcess], n: int) -> list[float]:
    times: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        bot = bots[i % len(bots)]
        answer = bot.command("status", user="U0ALICE")
        assert answer.status == 200, answer
        with lock:
            times.append(answer.seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times


def ack() -> None:
    url = servers.postgres_state_db()
    try:
        with tempfile.TemporaryDirectory() as tmp, FakeSlack(groups=dict(GROUPS)) as slack:
            bots = [BotProcess(Path(tmp), slack, state_url=url, log_level="WARNING").start()
                    for _ in range(3)]
            try:
                bots[0].command("signon staging", user="U0ALICE")  # a rotation running too
                one: list[float] = []
                three: list[float] = []
                _fire(bots, CONCURRENCY)  # warm up
                for _ in range(ROUNDS):
                    one += _fire(bots[:1], CONCURRENCY)
                    three += _fire(bots, CONCURRENCY)
                print(f"ack, 1 replica : {_ms(one)}")
                print(f"ack, 3 replicas: {_ms(three)}")
                print(f"p99 ratio 3/1: {_pct(three, 0.99) / _pct(one, 0.99):.2f}")
            finally:
                for bot in bots:
                    bot.stop()
    finally:
        servers.drop_postgres_state_db(url)


def _wait(get: Callable[[], object], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not get():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.02)


def failover(kills: int) -> None:
    """A real mysql rotation (MariaDB, moto, the fake Kubernetes) per kill: the replica
    holding the lease is SIGKILLed in the middle of create-user (moto holds its answer to
    the AWSPENDING write); the time is until another replica has finished that step."""
    import pytest

    from tests.failover import HeldPut, PostingSlack, lease_pid, replica
    from tests.rig import rig

    url = servers.postgres_state_db()
    times: list[float] = []
    patch = pytest.MonkeyPatch()
    try:
        with tempfile.TemporaryDirectory() as tmp, rig("mysql", Path(tmp)) as world, \
                PostingSlack(groups=dict(GROUPS), state_url=url) as slack:
            held = HeldPut(world.secret_id()).install(patch)
            bots = [replica(world, slack, url, "WARNING") for _ in range(3)]
            try:
                for _ in range(kills):
                    held.arm()
                    bots[0].command(f"{world.app} staging", user="U0ALICE")
                    rid = bots[0].wait_status(world.app, "staging", "active")["id"]
                    _wait(held.reached.is_set, 120)
                    pid = lease_pid(url, rid)
                    victim = next(b for b in bots if b.process and b.process.pid == pid)
                    victim.stop(signal.SIGKILL)
                    killed = time.monotonic()
                    held.release.set()
                    other = bots[0 if victim is not bots[0] else 1]
                    other.wait_step(world.app, "staging", "create-user", "done", timeout=300)
                    times.append(time.monotonic() - killed)
                    print(f"kill {len(times)}: create-user finished by another replica after "
                          f"{times[-1]:.2f} s", flush=True)
                    other.click(other.button(rid, "approve", "drop-old-user"), user="U0BOB")
                    other.wait_status(world.app, "staging", "done", timeout=300)
                    world.login(world.current())
                    bots[bots.index(victim)] = replica(world, slack, url, "WARNING")
            finally:
                for bot in bots:
                    bot.stop()
    finally:
        patch.undo()
        servers.drop_postgres_state_db(url)
    print(f"failover over {len(times)} kills: median {statistics.median(times):.2f} s, "
          f"max {max(times):.2f} s")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "claim"
    if what == "claim":
        claim()
    elif what == "ack":
        ack()
    elif what == "failover":
        failover(int(sys.argv[2]) if len(sys.argv) > 2 else 10)
    else:
        raise SystemExit(__doc__)
