"""Three `rotor serve` replicas on one PostgreSQL state store run a real `mysql` rotation
(MariaDB, moto's server, the fake Kubernetes), started through Slack (signed requests, the
fake Web API).

The replica holding the lease is SIGKILLed in the middle of `create-user`: moto has staged
AWSPENDING for it and holds its answer, so the new database user does not exist yet. Another
replica takes the lease over and re-runs the step, which finds the pending version and
reuses it. Later the replica that posted the drop's approval request is killed too, and its
Approve button is clicked on the last replica. Every step runs once, nothing is posted twice,
the reminder fires once, and AWSCURRENT logs in at the end.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from contextlib import ExitStack

import pytest

from rotation.mysql import KIND
from rotation.timeouts import LEASE_SECONDS
from tests.failover import HeldPut, PostingSlack, lease_pid, replica, reporter_lock
from tests.rig import rig
from tests.slackbot import GROUPS, BotProcess, assert_posted_once

STEPS = [s.name for s in KIND.steps(None, "x", "staging", {})]  # type: ignore[arg-type]
CHECK_INTERVAL = 15.0  # EngineWorker's idle: how often a replica looks for due work anyway
LOADED = 60.0  # what a loaded 2-core machine may add to starting the step again


def _by_pid(bots: list[BotProcess], pid: int | None) -> BotProcess:
    found = [b for b in bots if b.process is not None and b.process.pid == pid]
    assert found, f"no replica has pid {pid}"
    return found[0]


@pytest.mark.timeout(900)  # three processes to start on a loaded machine, and two kills
def test_a_mysql_rotation_survives_its_lease_holder_and_its_poster_being_killed(
        tmp_path, postgres_state, monkeypatch, record_property):
    with ExitStack() as stack:
        world = stack.enter_context(rig("mysql", tmp_path,
                                        slack={"approval_reminder_minutes": 0.05}))
        slack = stack.enter_context(PostingSlack(groups=dict(GROUPS),
                                                 state_url=postgres_state))
        held = HeldPut(world.secret_id()).install(monkeypatch)
        app, old = world.app, world.box.app_user
        bots: list[BotProcess] = []
        for _ in range(3):
            bots.append(replica(world, slack, postgres_state))
            stack.callback(bots[-1].stop)

        held.arm()
        assert bots[0].command(f"{app} staging", user="U0ALICE").status == 200
        rotation_id = bots[0].wait_status(app, "staging", "active")["id"]
        bots[0].wait_for(held.reached.is_set, what="a replica staging AWSPENDING in create-user")
        victim = _by_pid(bots, lease_pid(postgres_state, rotation_id))
        victim.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        held.release.set()  # moto answers a dead socket: the pending version stays written
        survivors = [b for b in bots if b is not victim]

        bound = LEASE_SECONDS + CHECK_INTERVAL
        survivors[0].wait_step(app, "staging", "create-user", "done", timeout=bound + LOADED)
        failover = time.monotonic() - killed_at
        survivors[0].wait_step(app, "staging", "drop-old-user", "needs-approval",
                               timeout=bound + LOADED)
        record_property("failover_seconds", round(failover, 2))
        print(f"failover: create-user finished by another replica {failover:.2f} s after the "
              f"kill (lease {LEASE_SECONDS:.0f} s + check interval {CHECK_INTERVAL:.0f} s)")
        assert failover <= bound + LOADED

        # The drop's approval request, and its reminder, once; then its poster dies.
        survivors[0].thread_text(rotation_id, "Reminder: `drop-old-user`")
        request = survivors[0].message(
            rotation_id, "needs approval",
            where=lambda m: any(b["action_id"] == "approve" for b in m.buttons()))
        poster = _by_pid(survivors, slack.posted_by.get(request.ts))
        last = next(b for b in survivors if b is not poster)
        poster.stop(signal.SIGKILL)
        # The last replica delivers again (the dead poster's lock is taken at once) before
        # anyone clicks: a reminder it wrongly thought unsent would be posted now.
        last.wait_for(lambda: reporter_lock(postgres_state),
                      lambda lock: lock is not None and lock[0] == last.process.pid  # type: ignore[union-attr]
                      and lock[1] <= time.time(),
                      what="the last replica to finish a delivery pass")
        approve = next(b for b in request.buttons() if b["action_id"] == "approve")
        assert last.click(approve, user="U0BOB").status == 200
        last.wait_status(app, "staging", "done")
        last.root_for(rotation_id, f"{len(STEPS)}/{len(STEPS)} done")
        last.thread_text(rotation_id, "Approved by <@U0BOB>")

        events = last.rows("SELECT step, event, to_status FROM audit WHERE rotation_id = ? "
                           "ORDER BY id", rotation_id)
        finished = Counter(step for step, _, to in events
                           if step is not None and to in ("done", "skipped"))
        assert finished == Counter(STEPS), events  # every step finished exactly once
        resumed = [step for step, event, _ in events if event == "resumed"]
        assert resumed == ["create-user"], events  # only the killed step taken over
        keys = assert_posted_once(slack, rotation_id)
        assert sum(k.startswith("reminder:drop-old-user:") for k in keys) == 1, keys

        new = world.current()
        assert new["username"] != old
        world.login(new)  # AWSCURRENT logs in
        assert world.users() == {world.box.admin_user, new["username"]}  # one new user, old gone
        log = bots[0].log()
        for password in (new["password"], world.box.app_password, world.box.admin_password):
            assert password not in slack.everything()
            assert password not in log
