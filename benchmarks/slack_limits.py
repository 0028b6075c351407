"""Slack under its rate limits: N production rotations (single apps) against a fake Slack that
enforces chat.postMessage 1/s per channel and chat.update 50/min, answering 429 + Retry-After.

`rotor serve` runs the scripted test kind (no database), so Slack sets the pace. Every
rotation starts at once; each decision button is clicked as soon as it appears (the switch
by Bob, the destructive drop by Dave, after 2nd line was told). Prints the Slack calls made in
all, the 429s, the wall time, and the worst and median delay between a gate opening (its
`approval-requested` audit row) and its button reaching Slack. Goal: no button more than 5 s
after its gate opened.

Usage: python benchmarks/slack_limits.py [N] (default 10). Loopback only; stops by itself.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.slack_api import FakeSlack  # noqa: E402
from tests.slackbot import APPS, GROUPS, BotProcess  # noqa: E402


def main(n: int) -> int:
    apps = list(APPS[:n])
    if len(apps) < n:
        print(f"only {len(APPS)} apps in the test catalogue", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, FakeSlack(groups=dict(GROUPS)) as slack:
        slack.declare("#govuk-2ndline")
        slack.enforce_limits()
        bot = BotProcess(Path(tmp), slack).start()
        try:
            started = time.time()
            for app in apps:
                bot.command(f"{app} production", user="U0ALICE")
            ids = {app: int(bot.wait_status(app, "production", "active")["id"]) for app in apps}
            clicked: set[tuple[int, str]] = set()
            shown: dict[tuple[int, str], float] = {}
            deadline = time.monotonic() + 60 * n
            while time.monotonic() < deadline:
                rows = bot.rows("SELECT id, status FROM rotations")
                if all(status != "active" for _, status in rows):
                    break
                for rotation_id in ids.values():
                    root = bot._root(rotation_id)
                    for message in slack.thread(root) if root is not None else []:
                        for button in message.buttons():
                            if button["action_id"] != "approve":
                                continue
                            step = json.loads(button["value"])["step"]
                            if (rotation_id, step) in clicked:
                                continue
                            clicked.add((rotation_id, step))
                            shown[(rotation_id, step)] = float(message.ts)  # when posted
                            bot.click(button, user="U0DAVE" if step == "drop-old-user"
                                      else "U0BOB")
                time.sleep(0.1)
            wall = time.time() - started
            statuses = dict(bot.rows("SELECT target, status FROM rotations"))
            asked = bot.rows("SELECT rotation_id, step, at FROM audit "
                             "WHERE event = 'approval-requested'")
        finally:
            bot.stop()
        delays = [shown[(rotation_id, step)] - float(at) for rotation_id, step, at in asked
                  if (rotation_id, step) in shown]
        calls = [c for c in slack.calls if c.method != "response_url"]
        limited = slack.limited()
        done = sum(1 for s in statuses.values() if s == "done")
        print(f"production rotations: {n}, done: {done}, wall time: {wall:.1f} s")
        print(f"Slack calls in all: {len(calls)} ({len(limited)} answered 429)")
        by_method: dict[str, int] = {}
        for c in calls:
            by_method[c.method] = by_method.get(c.method, 0) + 1
        print("  " + ", ".join(f"{m} {k}" for m, k in sorted(by_method.items())))
        if delays:
            print(f"gate opened -> button in Slack: worst {max(delays):.1f} s, "
                  f"median {statistics.median(delays):.1f} s over {len(delays)} gates "
                  f"(goal: worst <= 5 s)")
        return 0 if done == n else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
