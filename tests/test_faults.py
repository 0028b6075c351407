"""Randomized, model-based fault injection over real rotations (tests/fault_machine.py).

CI runs a few examples of each kind from a fixed seed, and a few from a random seed printed
at the start. A failure prints the sequence of actions and its seed; shrinking real rotations
takes minutes, so CI leaves it to `python benchmarks/soak.py --replay KIND:SEED`, which runs
that round again and prints the shrunk sequence. `make soak` runs the machine for longer.
"""

from __future__ import annotations

import os
import random

import pytest

from tests import fault_machine

FIXED_SEED = 20261129
# Examples per kind and seed: a real rotation each, several seconds on a loaded machine.
EXAMPLES = int(os.environ.get("ROTOR_FAULT_EXAMPLES", "2"))


def _random_seed() -> int:
    chosen = os.environ.get("ROTOR_FAULT_SEED")
    return int(chosen) if chosen else random.SystemRandom().randrange(2**32)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", fault_machine.KINDS)
def test_faults_from_the_fixed_seed_break_no_safety_rule(kind):
    fault_machine.run(kind, FIXED_SEED, EXAMPLES, shrink=False)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", fault_machine.KINDS)
def test_faults_with_the_state_in_postgresql_break_no_safety_rule(kind):
    """The same machine, its workers, reporter and referee sharing a PostgreSQL state store
    (a uniquely named database, dropped after), from the fixed seed."""
    fault_machine.run(kind, FIXED_SEED, EXAMPLES, shrink=False, state="postgres")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", fault_machine.KINDS)
def test_faults_from_a_random_seed_break_no_safety_rule(kind, capsys):
    chosen = _random_seed()
    with capsys.disabled():
        print(f"\n{kind}: fault seed {chosen} (replay: python benchmarks/soak.py "
              f"--replay {kind}:{chosen})")
    fault_machine.run(kind, chosen, max(1, EXAMPLES // 2), shrink=False)


# -- the referee's checks can fail -----------------------------------------------------------


def _referee_with_rotation(tmp_path, state, destructive: bool = True):
    from tests.faults import Referee
    from tests.test_engine import Clock, make

    clock = Clock()
    engine, _ = make(tmp_path, clock, {"drop": lambda ctx: None},
                     destructive={"drop"} if destructive else set(), state=state)
    rotation = engine.start("mysql", "signon", "production", "alice")
    referee = Referee(state, clock)
    return referee, engine, rotation, clock


# Each runs on both state backends (conftest's `state_url`): the referee reads through Store.


def test_the_referee_flags_a_side_effect_by_a_worker_without_the_current_lease(tmp_path,
                                                                              state_url):
    from rotation import fence

    referee, engine, rotation, clock = _referee_with_rotation(tmp_path, state_url)
    token = engine.store.claim(rotation.id, "w1", clock() + 60)
    old = fence.Lease(engine.store, rotation.id, "w1", token, seconds=60, clock=clock)
    clock.advance(61)
    engine.store.claim(rotation.id, "w2", clock() + 60)
    referee.after(old, "call AWS PutSecretValue")
    assert [v.split(":")[0] for v in referee.violations] == ["lease"]


def test_the_referee_flags_a_destructive_effect_without_a_valid_approval(tmp_path, state_url):
    from rotation import fence

    referee, engine, rotation, clock = _referee_with_rotation(tmp_path, state_url)
    token = engine.store.claim(rotation.id, "w1", clock() + 60)
    lease = fence.Lease(engine.store, rotation.id, "w1", token, seconds=60, clock=clock)
    referee.after(lease, "run DROP USER")
    assert [v.split(":")[0] for v in referee.violations] == ["approval"]
    with engine.store.transaction(fenced=False):
        engine.store.update_step(rotation.id, 0, decision="approved", decided_by="alice",
                                 decided_at=clock())
    referee.violations.clear()
    referee.after(lease, "call AWS DeleteAccessKey")
    assert sorted(v.split(":")[0] for v in referee.violations) == ["four-eyes", "second-line"]
    with engine.store.transaction(fenced=False):
        engine.store.update_rotation(rotation.id, status="cancelled")
    referee.violations.clear()
    referee.after(lease, "call AWS PutSecretValue")
    assert [v.split(":")[0] for v in referee.violations] == ["after-cancel"]


def test_the_referee_finds_a_secret_in_the_state_db_the_logs_or_slack(tmp_path, state_url):
    referee, engine, rotation, _ = _referee_with_rotation(tmp_path, state_url)
    referee.no_secrets(["hunter2hunter2"], ["rotating"], ["notice"])
    assert referee.violations == []
    referee.no_secrets(["hunter2hunter2"], ["password hunter2hunter2"], ["the hunter2hunter2"])
    assert len(referee.violations) == 2
    engine.store.set_kv("k", "hunter2hunter2")
    referee.violations.clear()
    referee.no_secrets(["hunter2hunter2"], [], [])
    assert referee.violations == ["secret: a secret value is in the state DB"]


def test_a_retried_destructive_step_asks_again(tmp_path):
    from rotation import fence
    from rotation.engine import Done
    from rotation.errors import StepFailed
    from tests.faults import Referee, watching
    from tests.test_engine import Clock, Notices, make

    attempts: list[int] = []

    def drop(ctx):
        ctx.approve("DROP USER old", gate="drop")
        fence.guard("run DROP USER")
        attempts.append(1)
        if len(attempts) == 1:
            raise StepFailed("the connection dropped mid-statement")
        return Done("dropped")

    clock = Clock()
    engine, _ = make(tmp_path, clock, {"drop": drop}, destructive={"drop"}, notices=Notices())
    referee = Referee(tmp_path / "state.db", clock)
    with watching(referee):
        rotation = engine.start("mysql", "signon", "staging", "alice")
        engine.advance(rotation.id)
        engine.approve(rotation.id, "drop", "bob")
        engine.advance(rotation.id)
        clock.advance(1)
        engine.retry(rotation.id, "alice")
        engine.advance(rotation.id)
    assert referee.violations == []


def test_the_machine_scans_every_slack_call_the_reporter_makes():
    """A leak planted in the reporter's calls (below Rotor's redaction) fails the example."""
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    class Leaky(fault_machine.machine("mysql")):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            leaked, send = self.world.rig.box.app_password, self.reporter._call

            def leaking(method, **kwargs):
                return send(method, **{**kwargs, "text": f"{kwargs.get('text', '')} {leaked}"})

            self.reporter._call = leaking  # type: ignore[method-assign]

    with pytest.raises(AssertionError, match="a secret value is in the Slack"):
        run_state_machine_as_test(Leaky, settings=settings(
            max_examples=1, stateful_step_count=2, deadline=None, database=None,
            phases=[Phase.generate], suppress_health_check=list(HealthCheck)))


def test_the_machine_flags_a_user_a_finished_cleanup_left(monkeypatch):
    """A cleanup that drops nothing, with a user nothing uses: the invariant fails."""
    from rotation import mysql_db

    monkeypatch.setattr(mysql_db, "drop_user", lambda conn, user, hosts: None)
    machine = fault_machine.machine("mysql")()
    try:
        machine.start("staging")
        with machine.world.rig.box.root().cursor() as cur:
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY 'x-unused-1'",
                        (f"{machine.world.rig.app}_user_20200101",))
        machine.cancel("alice", True)
        machine.clean_up_after_the_cancel()
        machine.approve("bob")
        assert machine.row().status == "done"
        with pytest.raises(AssertionError, match="left-behind: after cleanup"):
            machine.the_safety_rules_hold()
    finally:
        machine.teardown()


@pytest.mark.parametrize("state", ["sqlite", "postgres"])
def test_a_worker_process_sigkilled_at_a_side_effect_is_taken_over(state):
    """The kernel kills a worker process mid-step; its lease is left held; another worker
    sees the holder is dead, takes over at once and finishes, and the invariants hold."""
    machine = fault_machine.machine("mysql", state=state)()
    try:
        machine.start("staging")
        machine.sigkill_a_worker_process_at_a_side_effect(3)
        assert machine.referee.faults["sigkill-process"] == 1
        row = machine.row()
        assert row.status == "active" and row.done_count >= 1
        machine.the_safety_rules_hold()
        for _ in range(6):
            machine.approve("bob")
            if machine.row().status != "active":
                break
            machine.time_passes(3600.0)
        assert machine.row().status == "done", [(s.name, s.status, s.error)
                                                for s in machine.row().steps]
        machine.the_safety_rules_hold()
    finally:
        machine.teardown()
