"""Parallel steps: a pool of workers, per-host and per-account limits, a hung database, and
secrets read once per advance but never for a destructive step's re-read."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from bot.worker import EnginePool
from rotation import catalogue, mysql_db, readcache, timeouts
from rotation import secrets as sm_secrets
from rotation.engine import Context, Done, Engine, Outcome
from rotation.errors import DatabaseError
from rotation.facts import Facts
from rotation.store import Store
from tests.fakes.silent import SilentServer
from tests.test_engine import ScriptedKind
from tests.waiting import wait_for

APPS = 24
FLEET = catalogue.parse(
    "environments:\n  staging: {aws_region: eu-west-1}\napps:\n"
    + "".join(f"  app{i}: {{engine: mysql}}\n" for i in range(APPS))
    + "waits: {first_check: 1, max_check: 8}\n")


@dataclass
class Recorder:
    """Every step run, and how many ran at once on each host and overall."""

    hosts: dict[str, str] = field(default_factory=dict)  # app -> its database host
    runs: list[tuple[int, str, str]] = field(default_factory=list)  # (rotation, step, worker)
    busy: Counter[str] = field(default_factory=Counter)
    most: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def step(self, pause: float = 0.01) -> Callable[[Context], Outcome]:
        def run(ctx: Context) -> Outcome:
            host = self.hosts.get(ctx.target, "db")
            with self.lock:
                self.runs.append((ctx.rotation.id, ctx.step.name, ctx.engine.worker_id))
                for key in (host, "all"):
                    self.busy[key] += 1
                    self.most[key] = max(self.most[key], self.busy[key])
            threading.Event().wait(pause)  # a step's I/O: lets other workers overlap it
            with self.lock:
                for key in (host, "all"):
                    self.busy[key] -= 1
            return Done("ok")
        return run


class HostedKind(ScriptedKind):
    """A scripted kind that says which database host each app lives on."""

    def __init__(self, script: dict[str, Callable[[Context], Outcome]],
                 hosts: dict[str, str]) -> None:
        super().__init__(script)
        self.hosts = hosts

    def db_host(self, catalogue: Any, clients: Any, target: str, env: str) -> str:
        return self.hosts.get(target, "db")


def _pool(state: str, kind: Any, workers: int, *, per_host: int | None = None,
          per_account: int | None = None) -> EnginePool:
    engines = []
    for _ in range(workers):
        engine = Engine(Store(state, clock=time.time), FLEET, {"mysql": kind}, clients=None,
                        clock=time.time)
        engine.heartbeat = None
        engine.per_host, engine.per_account = per_host, per_account
        engines.append(engine)
    pool = EnginePool(engines, idle=0.2, after_error=0.2)
    for engine in engines:
        engine.on_change = pool.wake
    return pool


@pytest.fixture
def running() -> Iterator[list[EnginePool]]:
    pools: list[EnginePool] = []
    yield pools
    for pool in pools:
        pool.stop()


def _start_all(state: str, n: int, steps: str = "abc") -> list[int]:
    names = steps.split(",") if "," in steps else list(steps)
    starter = Engine(Store(state, clock=time.time), FLEET,
                     {"mysql": ScriptedKind({name: Recorder().step() for name in names})},
                     clients=None, clock=time.time)
    return [starter.start("mysql", f"app{i}", "staging", "U1").id for i in range(n)]


def _all_done(state: str, ids: list[int]) -> list[str]:
    store = Store(state, clock=time.time)
    return [store.rotation(i).status for i in ids]


def test_a_pool_runs_every_step_of_many_rotations_exactly_once(state_url, running):
    recorder = Recorder()
    kind = ScriptedKind({name: recorder.step() for name in ("a", "b", "c")})
    ids = _start_all(state_url, APPS)
    pool = _pool(state_url, kind, 4)
    running.append(pool)
    pool.start()
    wait_for(lambda: _all_done(state_url, ids), lambda s: s == ["done"] * APPS,
             what="every rotation done")
    counts = Counter((rotation, step) for rotation, step, _ in recorder.runs)
    assert set(counts) == {(i, s) for i in ids for s in "abc"}
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n != 1]
    workers = {worker for _, _, worker in recorder.runs}
    assert workers <= {e.worker_id for e in pool.engines}
    assert len(workers) > 1, "one worker did everything: the pool ran nothing in parallel"
    assert recorder.most["all"] > 1


def test_the_pool_refuses_workers_that_share_an_engine_or_a_store(tmp_path):
    store = Store(str(tmp_path / "s.db"), clock=time.time)
    one = Engine(store, FLEET, {}, clients=None)
    with pytest.raises(ValueError, match="own engine"):
        EnginePool([one, one])
    with pytest.raises(ValueError, match="own engine"):
        EnginePool([one, Engine(store, FLEET, {}, clients=None)])


def test_never_more_than_k_rotations_at_once_on_one_database_host(state_url, running):
    recorder = Recorder(hosts={f"app{i}": "db-a" if i % 2 == 0 else "db-b"
                               for i in range(APPS)})
    kind = HostedKind({name: recorder.step(0.02) for name in ("a", "b")}, recorder.hosts)
    ids = _start_all(state_url, 16, "ab")
    pool = _pool(state_url, kind, 6, per_host=2)
    running.append(pool)
    pool.start()
    wait_for(lambda: _all_done(state_url, ids), lambda s: s == ["done"] * 16,
             what="every rotation done")
    assert recorder.most["db-a"] <= 2 and recorder.most["db-b"] <= 2, recorder.most
    assert recorder.most["all"] > 1  # the two hosts ran side by side
    assert len(recorder.runs) == 16 * 2


def test_never_more_than_k_rotations_at_once_in_one_aws_account(state_url, running):
    recorder = Recorder()
    kind = HostedKind({name: recorder.step(0.02) for name in ("a", "b")}, {})
    ids = _start_all(state_url, 8, "ab")
    pool = _pool(state_url, kind, 4, per_account=1)
    running.append(pool)
    pool.start()
    wait_for(lambda: _all_done(state_url, ids), lambda s: s == ["done"] * 8,
             what="every rotation done")
    assert recorder.most["all"] == 1, recorder.most
    store = Store(state_url, clock=time.time)
    # The last advance gives its slot back right after its final write: wait for that.
    wait_for(lambda: [row for row in store.table_rows("locks")[1]
                      if str(row[0]).startswith("slot:")], lambda left: left == [],
             what="no slot outlives its advance")


def test_a_slot_is_free_again_once_its_holders_lease_is_gone(state_url):
    now = [1000.0]
    store = Store(state_url, clock=lambda: now[0])
    steps = [("a", "A", False)]
    first = store.create_rotation("mysql", "app0", "staging", "U1", {}, steps)
    second = store.create_rotation("mysql", "app1", "staging", "U1", {}, steps)
    alive = store.claim(first, "w1", now[0] + 120, is_stale=lambda h: False)
    other = store.claim(second, "w2", now[0] + 120, is_stale=lambda h: False)
    assert alive is not None and other is not None
    assert store.take_slot("host:db", 1, first, "w1", alive, is_stale=lambda h: False)
    assert store.take_slot("host:db", 1, second, "w2", other, is_stale=lambda h: False) is None
    # The holder's process is gone: its slot is free at once.
    assert store.take_slot("host:db", 1, second, "w2", other, is_stale=lambda h: h == "w1")
    store.release_slots(second, "w2", other)
    # The holder's lease ran out: free too.
    assert store.take_slot("host:db", 1, first, "w1", alive, is_stale=lambda h: False)
    now[0] += 121
    store.renew(second, "w2", other, now[0] + 120)
    assert store.take_slot("host:db", 1, second, "w2", other, is_stale=lambda h: False)
    # Given back at the end of the advance: the other claim gets it.
    store.release_slots(second, "w2", other)
    again = store.claim(first, "w1", now[0] + 120, is_stale=lambda h: False)
    assert again is not None
    assert store.take_slot("host:db", 1, first, "w1", again, is_stale=lambda h: False)


def test_a_hung_database_ties_up_one_worker_and_the_others_finish(state_url, running,
                                                                  monkeypatch):
    """app0's database host accepts and never answers; the other rotations on the pool
    finish while app0's worker is still waiting on it, within its bounded read timeout."""
    monkeypatch.setattr(timeouts, "BOUNDS", timeouts.Bounds(db_connect=2, db_read=60))
    recorder = Recorder()
    ended = threading.Event()
    errors: list[str] = []
    with SilentServer() as silent:
        def connect(ctx: Context) -> Outcome:
            if ctx.target == "app0":
                ep = mysql_db.Endpoint(host="127.0.0.1", port=silent.port, user="u",
                                       password="p", tls="disabled")
                try:
                    mysql_db.connect(ep)
                except DatabaseError as exc:
                    errors.append(str(exc))
                    raise
                finally:
                    ended.set()
            return recorder.step()(ctx)

        kind = ScriptedKind({"connect": connect, "after": recorder.step()})
        ids = _start_all(state_url, 12, "connect,after")
        pool = _pool(state_url, kind, 3)
        running.append(pool)
        pool.start()
        wait_for(lambda: silent.accepted, what="app0's worker connected to the hung host")
        others = wait_for(lambda: _all_done(state_url, ids[1:]),
                          lambda s: s == ["done"] * 11, what="the other rotations done")
        assert others == ["done"] * 11
        assert not ended.is_set(), "the hung connect returned before the others finished"
        assert Store(state_url, clock=time.time).rotation(ids[0]).status == "active"
    # Closing the hung peer ends the wait at once (else db_read bounds it).
    wait_for(ended.is_set, what="app0's connect ended")
    row = wait_for(lambda: Store(state_url, clock=time.time).rotation(ids[0]),
                   lambda r: r.current is not None and r.current.status == "failed",
                   what="app0's step failed")
    assert errors and row.current is not None and row.current.name == "connect"


# -- secrets read once per advance ---------------------------------------------------------


class FakeSecrets:
    """Plays Secrets Manager's get/put for one secret; counts the reads."""

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value
        self.reads = 0
        self.version = 1

    def get_secret_value(self, SecretId: str, VersionStage: str = "AWSCURRENT",
                         **_: Any) -> dict[str, Any]:
        self.reads += 1
        return {"SecretString": json.dumps(self.value), "VersionId": f"v{self.version}"}

    def put_secret_value(self, SecretId: str, SecretString: str,
                         **_: Any) -> dict[str, Any]:
        self.value = json.loads(SecretString)
        self.version += 1
        return {"VersionId": f"v{self.version}"}


class OneSecret:
    def __init__(self, sm: FakeSecrets) -> None:
        self.sm = sm

    def aws(self, env: str, service: str) -> Any:
        return self.sm


def _secret_engine(tmp_path: Any, script: dict[str, Callable[[Context], Outcome]],
                   sm: FakeSecrets, destructive: set[str] = frozenset()) -> Engine:  # type: ignore[assignment]
    kind = ScriptedKind(script, destructive=set(destructive))
    engine = Engine(Store(str(tmp_path / "state.db"), clock=time.time), FLEET, {"mysql": kind},
                    clients=OneSecret(sm), clock=time.time)
    engine.heartbeat = None
    return engine


def _user(ctx: Context) -> str:
    value = sm_secrets.read_json(ctx.clients.aws(ctx.env, "secretsmanager"), "govuk/app0/mysql")
    assert value is not None
    return str(value["username"])


def test_one_advance_reads_a_secret_once_until_rotor_writes_it(tmp_path):
    sm = FakeSecrets({"username": "old", "password": "pw-1"})
    seen: list[str] = []

    def read(ctx: Context) -> Outcome:
        seen.append(_user(ctx))
        return Done("read")

    def write(ctx: Context) -> Outcome:
        sm_secrets.put_current(ctx.clients.aws(ctx.env, "secretsmanager"), "govuk/app0/mysql",
                               {"username": "new", "password": "pw-2"})
        return Done("wrote")

    engine = _secret_engine(tmp_path, {"r1": read, "r2": read, "w": write, "r3": read,
                                       "r4": read}, sm)
    rotation = engine.start("mysql", "app0", "staging", "U1")
    assert engine.advance(rotation.id).status == "done"
    assert seen == ["old", "old", "new", "new"]
    assert sm.reads == 2, "read once before the write and once after it"
    readcache.invalidate()  # outside an advance: nothing is kept
    assert not readcache.serving()


def test_a_destructive_steps_re_read_never_comes_from_the_cache(tmp_path):
    """The step read the secret (kept for this advance); someone changes the secret; the
    facts `Context.act` reads before and after the gate must see the change."""
    sm = FakeSecrets({"username": "old", "password": "pw-1"})
    facts_seen: list[tuple[str, str]] = []
    runs = [0]

    def drop(ctx: Context) -> Outcome:
        before = _user(ctx)  # kept for this advance from here on
        runs[0] += 1
        changed = f"changed-{runs[0]}"
        sm.value = {"username": changed, "password": "pw-9"}  # someone edits the secret
        reads = sm.reads

        def read() -> Facts:
            user = _user(ctx)
            facts_seen.append((changed, user))
            return Facts({"fresh": user == changed},
                         None if user == changed else "served a stale read")

        ctx.act("drop", read, lambda f: "drop the old user")
        assert sm.reads > reads
        assert _user(ctx) == before, "outside act the cache still serves (so this test bites)"
        return Done("dropped")

    engine = _secret_engine(tmp_path, {"drop": drop}, sm, {"drop"})
    rotation = engine.start("mysql", "app0", "staging", "U1")
    row = engine.advance(rotation.id)
    assert row.current is not None and row.current.status == "needs-approval", row.current
    engine.approve(rotation.id, "drop", "U2")
    row = engine.advance(rotation.id)
    assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
    assert [changed == user for changed, user in facts_seen] == [True] * 3
    # Read before the gate; then, once approved, again before and after it.


def test_one_look_at_the_world_reads_each_secret_once_and_the_next_look_again(tmp_path):
    """The facts `Context.act` reads are one look at the world: the same secret read twice
    inside it (a precondition and what the action names) is one call; its read after the
    gate is another look, and a write inside a look empties it."""
    sm = FakeSecrets({"username": "old", "password": "pw-1"})
    looks: list[tuple[str, str, int]] = []

    @readcache.from_the_world
    def named(ctx: Context) -> str:
        return _user(ctx)

    def drop(ctx: Context) -> Outcome:
        _user(ctx)  # kept for this advance

        def read() -> Facts:
            before = sm.reads
            looks.append((named(ctx), _user(ctx), sm.reads - before))
            return Facts({"user": looks[-1][0]})

        ctx.act("drop", read, lambda f: f"drop {f.seen['user']}")
        return Done("dropped")

    engine = _secret_engine(tmp_path, {"drop": drop}, sm, {"drop"})
    rotation = engine.start("mysql", "app0", "staging", "U1")
    engine.advance(rotation.id)
    engine.approve(rotation.id, "drop", "U2")
    assert engine.advance(rotation.id).status == "done"
    assert looks == [("old", "old", 1)] * 3  # before the gate; then before and after it

    def user() -> Any:
        return (sm_secrets.read_json(sm, "govuk/app0/mysql") or {}).get("username")

    with readcache.per_advance(), readcache.fresh():
        first = sm.reads
        assert user() == user() == "old" and sm.reads == first + 1
        sm_secrets.put_current(sm, "govuk/app0/mysql", {"username": "new", "password": "p"})
        assert user() == "new" and sm.reads == first + 2


def test_a_kinds_db_host_names_the_instance_from_the_secret():
    from rotation import appcreds

    sm = FakeSecrets({"host": "db-7.internal", "port": 3306, "dbname": "d", "username": "u",
                      "password": "p"})
    assert appcreds.db_host(FLEET, OneSecret(sm), "app0", "staging") == "db-7.internal:3306"


def test_a_free_slot_goes_to_the_rotation_that_queued_for_it_first(state_url):
    """A rotation with short waits comes back at once after each advance; it must not take
    the slot again ahead of one that has been waiting for it."""
    now = [1000.0]
    store = Store(state_url, clock=lambda: now[0])
    steps = [("a", "A", False)]
    hog = store.create_rotation("mysql", "app0", "staging", "U1", {}, steps)
    patient = store.create_rotation("mysql", "app1", "staging", "U1", {}, steps)
    live = {"is_stale": lambda h: False}
    first = store.claim(hog, "w1", now[0] + 120, **live)
    waiting = store.claim(patient, "w2", now[0] + 120, **live)
    assert first is not None and waiting is not None
    assert store.take_slot("host:db", 1, hog, "w1", first, **live)
    assert store.take_slot("host:db", 1, patient, "w2", waiting, **live) is None  # queues
    store.release_slots(hog, "w1", first)
    now[0] += 0.1
    assert store.take_slot("host:db", 1, hog, "w1", first, **live) is None, \
        "the hog took the slot again ahead of the rotation queued for it"
    assert store.take_slot("host:db", 1, patient, "w2", waiting, **live)
    store.release_slots(patient, "w2", waiting)
    assert store.take_slot("host:db", 1, hog, "w1", first, **live)
    # A queued rotation that stopped asking (finished, cancelled) does not block the slot.
    store.release_slots(hog, "w1", first)
    assert store.take_slot("host:db", 2, hog, "w1", first, **live)
    assert store.take_slot("host:db", 2, patient, "w2", waiting, **live)
    third = store.create_rotation("mysql", "app2", "staging", "U1", {}, steps)
    token = store.claim(third, "w3", now[0] + 120, **live)
    assert token is not None
    assert store.take_slot("host:db", 2, third, "w3", token, **live) is None  # queues
    store.release_slots(patient, "w2", waiting)
    assert store.take_slot("host:db", 2, patient, "w2", waiting, **live) is None, \
        "the slot belongs to the third rotation while it keeps asking"
    now[0] += 60  # the third stopped asking long ago
    store.renew(patient, "w2", waiting, now[0] + 120)
    store.renew(hog, "w1", first, now[0] + 120)
    assert store.take_slot("host:db", 2, patient, "w2", waiting, **live)


def test_facts_read_outside_act_come_from_the_world_too(tmp_path):
    """A roll back or a drop may call its facts function itself (not through `Context.act`):
    the function is marked, and never served from the advance's cache."""
    from rotation import appcreds

    sm = FakeSecrets({"username": "old", "password": "pw-1"})
    seen: list[dict[str, Any]] = []

    def step(ctx: Context) -> Outcome:
        assert _user(ctx) == "old"
        sm.value = {"username": "by-hand", "password": "pw-2"}
        assert _user(ctx) == "old"  # the step's own read is kept for the advance
        seen.append(dict(appcreds.secret_users(ctx)))
        return Done("read")

    engine = _secret_engine(tmp_path, {"look": step}, sm)
    rotation = engine.start("mysql", "app0", "staging", "U1")
    assert engine.advance(rotation.id).status == "done"
    assert seen == [{"AWSCURRENT in staging": "by-hand", "AWSPENDING in staging": "by-hand"}]
