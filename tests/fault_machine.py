"""A Hypothesis state machine that runs real rotations and injects faults between and inside
steps; the invariants of the safety rules are checked after every action (see tests/faults.py).

Used by tests/test_faults.py (CI: a few examples, a fixed seed and one random seed) and by
benchmarks/soak.py (as many examples as fit in a given time). A failing example is shrunk by
Hypothesis and printed as the sequence of actions, with the seed that replays it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bot import slack as slack_api
from bot.reporter import Reporter
from demo.slack_api import FakeSlack
from rotation.engine import LEASE_SECONDS
from rotation.errors import RotorError
from rotation.policy import Policy
from tests.faults import FaultWorld, Killed, Worker, make_world

KINDS = ("mysql", "postgres", "iam-key", "secret")
PEOPLE = st.sampled_from(["alice", "bob", "carol"])  # alice starts every rotation

REPO = Path(__file__).resolve().parent.parent
# Totals over every example this process ran (benchmarks/soak.py prints them).
TALLY: Counter[str] = Counter()
FAULTS: Counter[str] = Counter()
VIOLATIONS: list[str] = []


class RotationMachine(RuleBasedStateMachine):
    """One world, two workers, one rotation at a time; people and faults act at random."""

    KIND = "mysql"
    # A person moving AWSCURRENT back to AWSPREVIOUS by hand (`soak.py --no-manual-moves`
    # leaves it out). A soak once found the moved-back version not logging in: AWSPREVIOUS
    # still named the old database user after Rotor dropped it; the drop now takes the label
    # off first. For the secret kind see SecretWorld.move_current_back.
    MANUAL_MOVES = True
    STATE = "sqlite"  # or "postgres": the state store the workers share (tests.faults.STATES)

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="rotor-faults-"))
        self.world: FaultWorld = make_world(self.KIND, self.dir, self.STATE)
        self.referee = self.world.referee
        self.workers = [self._worker("a"), self._worker("b")]
        # Rotor's reporter, delivering every audit row to a fake Slack: every call it makes
        # is scanned for secrets, not only the 2nd line notices.
        self.slack = FakeSlack().start()
        self.world.stack.callback(self.slack.stop)
        reporting = Worker(self.world, "reporter")
        self.world.stack.callback(reporting.store.close)
        client = slack_api.web_client("xoxb-fault-suite", self.slack.url)
        self.reporter = Reporter(reporting.engine, client,
                                 Policy(reporting.engine.catalogue,
                                        slack_api.GroupMembers(client)),
                                 schedule_retry=lambda delay: None)
        self.rotation_id = 0
        self.rotations = 0
        self.moved_by_hand = False
        self.cleanups: set[int] = set()  # cleanup rotations, which make no user
        self.judged: set[int] = set()
        self.slack_seen = 0
        TALLY["examples"] += 1

    def _worker(self, name: str) -> Worker:
        worker = Worker(self.world, name)
        self.referee.workers[worker.engine.worker_id] = worker
        return worker

    def teardown(self) -> None:
        self.referee.resume.set()
        if self.rotation_id:
            row = self.row()
            TALLY[f"ended {row.status}/{row.phase} at {row.done_count} steps"] += 1
        FAULTS.update(self.referee.faults)
        VIOLATIONS.extend(self.referee.violations)
        for worker in self.workers:
            worker.store.close()
        self.world.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        return self.workers[0].engine

    def row(self) -> Any:
        return self.engine.store.rotation(self.rotation_id)

    def _run(self, index: int, action: Any) -> None:
        """Run one worker's action; a worker killed in it is replaced by a new process."""
        TALLY["actions"] += 1
        try:
            action(self.workers[index].engine)
        except Killed:
            self.workers[index] = self._worker(f"{self.workers[index].name}'")
        except RotorError:
            pass  # refused: a clear error that changed nothing

    def settle(self) -> None:
        """What the worker loop does between people's actions: run what is due, letting
        the short waits (a sync, a rollout check) pass on the clock rather than in real time."""
        for _ in range(8):
            self._run(0, lambda engine: engine.advance(self.rotation_id))
            row = self.row()
            step = row.current
            if row.status != "active" or step is None or step.status != "waiting":
                return
            due = (step.next_check_at or 0) - self.world.clock()
            if due > 5:
                return
            self.world.clock.advance(max(0.0, due) + 0.01)

    def _has_work(self) -> bool:
        """The rotation has a step to run now (a worker started now would act)."""
        row = self.row()
        step = row.current
        return row.status == "active" and step is not None and (
            step.status in ("pending", "running") or row.cancel_requested_by is not None
            or (step.status == "waiting" and (step.next_check_at or 0) <= self.world.clock()))

    def _current(self) -> Any:
        row = self.row()
        return row, row.current

    # -- starting -------------------------------------------------------------------------

    @initialize(env=st.sampled_from(["staging", "production"]))
    def start(self, env: str) -> None:
        TALLY["rule start"] += 1
        row = self.engine.start(self.world.kind, self.world.target(), env, "alice")
        self.rotation_id, self.env = row.id, env
        self.rotations += 1

    @precondition(lambda self: self.row().status != "active")
    @rule()
    def start_the_next_rotation(self) -> None:
        TALLY["rule start_the_next_rotation"] += 1
        self.start(self.env)

    @precondition(lambda self: self.KIND in ("mysql", "postgres")
                  and self.row().status == "cancelled")
    @rule()
    def clean_up_after_the_cancel(self) -> None:
        """`rotor cleanup APP ENV`: a rotation of its own that drops what nothing uses."""
        TALLY["rule clean_up_after_the_cancel"] += 1
        row = self.engine.start(self.world.kind, self.world.target(), self.env, "alice",
                                {"cleanup": True})
        self.rotation_id = row.id
        self.cleanups.add(row.id)
        self.settle()

    # -- workers ----------------------------------------------------------------------------

    @rule(index=st.integers(0, 1))
    def advance(self, index: int) -> None:
        TALLY["rule advance"] += 1
        self._run(index, lambda engine: engine.advance(self.rotation_id))

    @rule()
    def two_workers_race(self) -> None:
        TALLY["rule two_workers_race"] += 1
        threads = [threading.Thread(target=self._run, args=(i, lambda e: e.advance(
            self.rotation_id))) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)

    # Faults are armed until a side effect meets them, perhaps several actions later.

    @rule(at=st.integers(1, 12), index=st.integers(0, 1), in_a_process=st.booleans())
    def sigkill_a_worker_at_a_side_effect(self, at: int, index: int,
                                          in_a_process: bool) -> None:
        TALLY["rule sigkill_a_worker_at_a_side_effect"] += 1
        # The secret kind's rotation function is played in this process: no worker elsewhere.
        if in_a_process and self.KIND != "secret" and self._has_work():
            self.sigkill_a_worker_process_at_a_side_effect(1 + at // 2)
            return
        self.referee.kill_at[self.workers[index].engine.worker_id] = at
        self.advance(index)

    def sigkill_a_worker_process_at_a_side_effect(self, at: int) -> None:
        """A real SIGKILL: a worker process of its own (tests/fault_process.py) is killed by
        the kernel at its `at`-th side effect, its lease left held and its pid gone."""
        TALLY["sigkill a worker process"] += 1
        report = self.dir / f"process-{TALLY['actions']}.jsonl"
        TALLY["actions"] += 1
        done = subprocess.run(
            [sys.executable, "-m", "tests.fault_process", str(self.rotation_id), str(at),
             repr(self.world.clock()), str(report)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
            text=True, timeout=300)
        if done.returncode == -signal.SIGKILL:
            self.referee.faults["sigkill-process"] += 1
        elif done.returncode == 0:
            TALLY["worker processes that ran out of side effects before the kill"] += 1
        else:
            raise AssertionError(f"the worker process failed: {done.stderr[-2000:]}")
        for line in report.read_text().splitlines() if report.exists() else []:
            said = json.loads(line)
            if "violation" in said:
                self.referee.violations.append(said["violation"])
            elif "log" in said:
                self.world.logs.lines.append(said["log"])
        self.settle()

    @rule(at=st.integers(1, 12), cancel=st.booleans())
    def pause_a_worker_past_its_lease(self, at: int, cancel: bool) -> None:
        TALLY["rule pause_a_worker_past_its_lease"] += 1
        paused = self.workers[0]
        paused.engine.heartbeat = None  # a paused process renews nothing
        self.referee.paused.clear()
        self.referee.resume.clear()
        self.referee.pause_at[paused.engine.worker_id] = at
        thread = threading.Thread(target=self.advance, args=(0,))
        thread.start()
        while thread.is_alive() and not self.referee.paused.wait(0.05):
            pass
        self.referee.pause_at.pop(paused.engine.worker_id, None)
        if self.referee.paused.is_set():
            self.world.clock.advance(LEASE_SECONDS + 1)
            if cancel:
                self._run(1, lambda engine: engine.cancel(self.rotation_id, "carol"))
            else:
                self.advance(1)
        self.referee.resume.set()
        thread.join(120)
        paused.engine.heartbeat = 0.05

    @rule(seconds=st.sampled_from([1.0, 30.0, LEASE_SECONDS + 1, 3600.0, 2 * 86400.0]))
    def time_passes(self, seconds: float) -> None:
        TALLY["rule time_passes"] += 1
        self.world.clock.advance(seconds)
        self.settle()

    # -- people -----------------------------------------------------------------------------

    @rule(who=PEOPLE)
    def approve(self, who: str) -> None:
        TALLY["rule approve"] += 1
        row, step = self._current()
        if step is not None and step.status == "needs-approval":
            self._run(0, lambda engine: engine.approve(row.id, step.name, who))
        self.settle()

    @rule(who=PEOPLE)
    def reject(self, who: str) -> None:
        TALLY["rule reject"] += 1
        row, step = self._current()
        if step is not None and step.status == "needs-approval":
            self._run(0, lambda engine: engine.reject(row.id, step.name, who))
        self.settle()

    @rule(who=PEOPLE)
    def retry(self, who: str) -> None:
        TALLY["rule retry"] += 1
        self._run(0, lambda engine: engine.retry(self.rotation_id, who))
        self.settle()

    @rule(who=PEOPLE, now=st.booleans())
    def cancel(self, who: str, now: bool) -> None:
        TALLY["rule cancel"] += 1
        self._run(0, lambda engine: engine.cancel(self.rotation_id, who, now=now))
        self.settle()

    @rule(who=PEOPLE)
    def hold(self, who: str) -> None:
        TALLY["rule hold"] += 1
        row, step = self._current()
        if step is not None:
            self._run(0, lambda engine: engine.hold(row.id, step.name, who))
        self.settle()

    @rule(who=PEOPLE)
    def ask_again(self, who: str) -> None:
        TALLY["rule ask_again"] += 1
        row, step = self._current()
        if step is not None and step.status == "needs-approval":
            def expire_then_ask(engine: Any) -> None:
                engine.expire_approvals(older_than=engine.clock() + 1)
                engine.ask_again(row.id, step.name, who)
            self._run(0, expire_then_ask)
        self.settle()

    @rule(name=st.sampled_from(["rollback", "reactivate"]), who=PEOPLE)
    def request(self, name: str, who: str) -> None:
        TALLY["rule request"] += 1
        self._run(0, lambda engine: engine.request(self.rotation_id, name, who))
        self.settle()

    @rule()
    def a_person_edits_the_secret(self) -> None:
        TALLY["rule a_person_edits_the_secret"] += 1
        self.referee.faults["secret-edited"] += 1
        self.world.edit_secret()
        self.settle()

    # -- faults -----------------------------------------------------------------------------

    @rule(fault=st.sampled_from(["throttle", "5xx"]), calls=st.integers(1, 4),
          index=st.integers(0, 1))
    def aws_answers_badly(self, fault: str, calls: int, index: int) -> None:
        TALLY["rule aws_answers_badly"] += 1
        self.referee.aws_faults = [fault] * calls
        self.advance(index)

    @precondition(lambda self: self.KIND in ("mysql", "postgres", "secret"))
    @rule()
    def a_database_connection_drops_mid_statement(self) -> None:
        TALLY["rule a_database_connection_drops_mid_statement"] += 1
        self.referee.drop_next = True
        self.advance(0)

    @precondition(lambda self: self.MANUAL_MOVES)
    @rule()
    def a_person_moves_awscurrent_back(self) -> None:
        TALLY["rule a_person_moves_awscurrent_back"] += 1
        if self.world.move_current_back():
            self.referee.faults["awscurrent-moved"] += 1
            self.moved_by_hand = True

    # -- the invariants ---------------------------------------------------------------------

    @invariant()
    def the_safety_rules_hold(self) -> None:
        if not self.rotation_id:
            return
        why = self.world.check_current()
        if why:
            self.referee.violation(
                "current-after-manual-move" if self.moved_by_hand else "current", why)
        made = self.world.made()
        row = self.row()
        if row.id in self.cleanups and row.status == "done" and row.id not in self.judged:
            self.judged.add(row.id)
            TALLY["cleanups done"] += 1
            left = self.world.left_behind()
            if left:
                self.referee.violation("left-behind", f"after cleanup #{row.id}, nothing uses "
                                                      f"{sorted(left)} and it is still there")
        if len(made) > self.rotations:
            self.referee.violation("one-new-user", f"{len(made)} new users or keys for "
                                                   f"{self.rotations} rotations")
        self.reporter.deliver()
        TALLY["slack calls"] = TALLY["slack calls"] + len(self.slack.calls) - self.slack_seen
        self.slack_seen = len(self.slack.calls)
        self.referee.no_secrets(self.world.secrets(), self.world.logs.lines,
                                [*self.world.notices.posted, self.slack.everything()])
        assert not self.referee.violations, "\n".join(self.referee.violations)


def machine(kind: str, *, manual_moves: bool = True,
            state: str = "sqlite") -> type[RotationMachine]:
    return type(f"{kind.title().replace('-', '')}Rotation", (RotationMachine,),
                {"KIND": kind, "MANUAL_MOVES": manual_moves, "STATE": state})


def run(kind: str, seed_value: int, examples: int, steps: int = 25, *,
        manual_moves: bool = True, shrink: bool = True, state: str = "sqlite") -> None:
    """Run `examples` examples of `kind` from `seed_value`, the state in `state` ("sqlite"
    or "postgres"); raise on a violated invariant, with the (shrunk) sequence of actions
    that replays it."""
    factory = seed(seed_value)(machine(kind, manual_moves=manual_moves, state=state))
    phases = [Phase.generate] + ([Phase.shrink] if shrink else [])
    run_state_machine_as_test(factory, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        print_blob=True, phases=phases, suppress_health_check=list(HealthCheck)))
