"""Three `rotor serve` replicas on one PostgreSQL state store, driven through Slack (signed
requests, the fake Web API). The replica running a step is SIGKILLed in its middle; another
finishes the rotation, every step runs once, nothing is posted twice, and the buttons keep
working through the replicas that are left. The rotation kind is the scripted stand-in for
`mysql` (tests/slack_kinds.py), whose `login` step can be held in its middle."""

from __future__ import annotations

import signal
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from rotation.timeouts import LEASE_SECONDS
from tests.fakes.slack_api import FakeSlack
from tests.slack_kinds import STEPS
from tests.slackbot import GROUPS, BotProcess, assert_posted_once

CHECK_INTERVAL = 15.0  # EngineWorker's idle: how often a replica looks for due work anyway


def _replicas(workdir: Path, slack: FakeSlack, url: str, n: int) -> list[BotProcess]:
    bots = [BotProcess(workdir, slack, state_url=url, remind_minutes=0.05) for _ in range(n)]
    for bot in bots:
        bot.start()
    return bots


def test_a_replica_killed_mid_step_is_replaced_and_nothing_happens_twice(tmp_path,
                                                                          postgres_state):
    with ExitStack() as stack:
        slack = stack.enter_context(FakeSlack(groups=dict(GROUPS)))
        bots = _replicas(tmp_path, slack, postgres_state, 3)
        for bot in bots:
            stack.callback(bot.stop)
        control = bots[0].control
        (control / "hang-login").touch()

        assert bots[0].command("signon staging", user="U0ALICE").status == 200
        rotation_id = bots[0].wait_status("signon", "staging", "active")["id"]
        switch = bots[1].button(rotation_id, "approve", "switch")
        assert bots[1].click(switch, user="U0BOB").status == 200
        holder_pid = int(bots[0].wait_for(lambda: (control / "in-login").exists()
                                          and (control / "in-login").read_text(),
                                          what="a replica in the middle of login"))
        victim = next(b for b in bots if b.process and b.process.pid == holder_pid)
        survivors = [b for b in bots if b is not victim]
        (control / "hang-login").unlink()  # the next holder runs the step through
        victim.stop(signal.SIGKILL)
        killed_at = time.monotonic()

        # Another replica takes the lease and runs login again, up to the drop's approval.
        survivors[0].wait_step("signon", "staging", "drop-old-user", "needs-approval",
                               timeout=LEASE_SECONDS + CHECK_INTERVAL)
        assert time.monotonic() - killed_at <= LEASE_SECONDS + CHECK_INTERVAL
        # The approval is reminded about once, whichever replica runs the scheduler.
        survivors[1].thread_text(rotation_id, "Reminder: `drop-old-user`")
        # A button posted before the kill, clicked on the survivors: Approve for switch is
        # answered (already decided), and the drop's Approve works.
        assert survivors[1].click(switch, user="U0BOB").status == 200
        survivors[1].wait_reply(f"rotation #{rotation_id} step switch")
        assert survivors[1].click(survivors[1].button(rotation_id, "approve",
                                                      "drop-old-user"),
                                  user="U0CAROL").status == 200
        survivors[0].wait_status("signon", "staging", "done")
        survivors[0].root_for(rotation_id, f"{len(STEPS)}/{len(STEPS)} done")

        events = survivors[0].rows("SELECT step, event, to_status FROM audit "
                                   "WHERE rotation_id = ? ORDER BY id", rotation_id)
        finished = Counter(step for step, _, to in events
                           if step is not None and to in ("done", "skipped"))
        assert finished == Counter(STEPS), events  # every step finished exactly once
        started = Counter(step for step, event, to in events
                          if event == "step" and to == "running")
        # Each step started once; a gated one once more after its approval...
        assert started == Counter(STEPS) + Counter(["switch", "drop-old-user"]), events
        resumed = [step for step, event, _ in events if event == "resumed"]
        assert resumed == ["login"], events  # ...and only the killed one taken over
        keys = assert_posted_once(slack, rotation_id)  # reminders included
        assert sum(k.startswith("reminder:drop-old-user:") for k in keys) == 1, keys
