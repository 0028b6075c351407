"""Slack under its rate limits: N production apps against a fake Slack that enforces
chat.postMessage 1/s per channel and chat.update 50/min, answering 429 + Retry-After.

`rotor serve` runs the scripted test kind (no database), so Slack sets the pace. Two ways:

- as one fleet (the default): `/rotate A,B,... production`, Confirm by the planner and a second
  person, then one "Approve all" per gate, clicked once every app waits at it (the switch by
  Bob, the destructive drop by Dave, after 2nd line was told once for the fleet);
- `--one-by-one`: N single rotations started at once, each button clicked as it appears.

Prints the Slack calls made in all, the 429s, the wall time, and the worst and median delay
between a gate opening (its `approval-requested` audit row) and the first Slack call that
carried a button deciding it (the app's own Approve, or an "Approve all" listing it), from the
fake's own record of when it answered. Goals (issue 15, 20 apps): at most 40 Slack calls in
all, no button more than 5 s after its gate opened.

Usage: python benchmarks/slack_limits.py [N] [--one-by-one] (default 20, as a fleet).
Loopback only; stops by itself.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.slack_api import Call, FakeSlack, Message  # noqa: E402
from tests.slackbot import APPS, GROUPS, BotProcess  # noqa: E402

DECISIONS = ("approve", "fleet_approve")


def _decided(call: Call) -> list[tuple[int, str]]:
    """The (rotation, step) pairs a successful post or update carried a decision button for."""
    if call.status != 200 or call.method not in ("chat.postMessage", "chat.update"):
        return []
    blocks = call.params.get("blocks") or []
    if isinstance(blocks, str):
        blocks = json.loads(blocks)
    found = []
    for block in blocks:
        for element in block.get("elements", []) if isinstance(block, dict) else []:
            if not isinstance(element, dict) or element.get("action_id") not in DECISIONS:
                continue
            value = json.loads(element["value"])
            if "rotation" in value:
                found.append((int(value["rotation"]), value["step"]))
            found += [(int(rid), value["step"]) for rid in value.get("shown", {})]
    return found


def _approver(step: str) -> str:
    return "U0DAVE" if step == "drop-old-user" else "U0BOB"


def _one_by_one(bot: BotProcess, slack: FakeSlack, apps: list[str], deadline: float) -> None:
    for app in apps:
        bot.command(f"{app} production", user="U0ALICE")
    ids = [int(bot.wait_status(app, "production", "active")["id"]) for app in apps]
    clicked: set[tuple[int, str]] = set()
    while time.monotonic() < deadline and _active(bot):
        for rotation_id in ids:
            root = bot._root(rotation_id)
            for message in slack.thread(root) if root is not None else []:
                for button in message.buttons():
                    if button["action_id"] != "approve":
                        continue
                    step = json.loads(button["value"])["step"]
                    if (rotation_id, step) not in clicked:
                        clicked.add((rotation_id, step))
                        bot.click(button, user=_approver(step))
        time.sleep(0.1)


def _fleet_root(slack: FakeSlack) -> Message | None:
    return next((m for m in slack.roots() if "fleet #" in m.text), None)


def _as_fleet(bot: BotProcess, slack: FakeSlack, apps: list[str], deadline: float) -> None:
    bot.command(f"{','.join(apps)} production", user="U0ALICE")
    confirmed_by: list[str] = []
    clicked: set[str] = set()
    while time.monotonic() < deadline and (not confirmed_by or _active(bot)):
        root = _fleet_root(slack)
        for button in root.buttons() if root is not None else []:
            if button["action_id"] == "fleet_confirm" and len(confirmed_by) < 2:
                want = "Confirm (second person)" in root.everything()
                user = "U0BOB" if want else "U0ALICE"
                if user not in confirmed_by:
                    confirmed_by.append(user)
                    bot.click(button, user=user)
            elif button["action_id"] == "fleet_approve":
                value: dict[str, Any] = json.loads(button["value"])
                if value["step"] not in clicked and len(value["shown"]) == len(apps):
                    clicked.add(value["step"])
                    bot.click(button, user=_approver(value["step"]))
        time.sleep(0.1)
    while time.monotonic() < deadline:  # the table's last update, "done", counts too
        root = _fleet_root(slack)
        if root is not None and ": done" in root.text:
            return
        time.sleep(0.1)


def _active(bot: BotProcess) -> bool:
    rows = bot.rows("SELECT status FROM rotations")
    return not rows or any(status == "active" for (status,) in rows)


def main(n: int, one_by_one: bool) -> int:
    apps = list(APPS[:n])
    if len(apps) < n:
        print(f"only {len(APPS)} apps in the test catalogue", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, FakeSlack(groups=dict(GROUPS)) as slack:
        slack.declare("#govuk-2ndline")
        slack.enforce_limits()
        bot = BotProcess(Path(tmp), slack).start()
        try:
            wall_offset = time.time() - time.monotonic()
            started = time.time()
            run = _one_by_one if one_by_one else _as_fleet
            run(bot, slack, apps, time.monotonic() + 60 * n)
            wall = time.time() - started
            statuses = dict(bot.rows("SELECT target, status FROM rotations"))
            asked = bot.rows("SELECT rotation_id, step, at FROM audit "
                             "WHERE event = 'approval-requested'")
        finally:
            bot.stop()
        shown: dict[tuple[int, str], float] = {}
        for call in slack.calls:
            for key in _decided(call):
                shown.setdefault(key, call.at + wall_offset)
        delays = [shown[(rid, step)] - float(at) for rid, step, at in asked
                  if (rid, step) in shown]
        calls = [c for c in slack.calls if c.method != "response_url"]
        done = sum(1 for s in statuses.values() if s == "done")
        how = "one by one" if one_by_one else "as one fleet"
        print(f"production apps: {n} {how}, done: {done}, wall time: {wall:.1f} s")
        print(f"Slack calls in all: {len(calls)} ({len(slack.limited())} answered 429; "
              f"goal for 20 apps: <= 40)")
        by_method: dict[str, int] = {}
        for c in calls:
            by_method[c.method] = by_method.get(c.method, 0) + 1
        print("  " + ", ".join(f"{m} {k}" for m, k in sorted(by_method.items())))
        if delays:
            print(f"gate opened -> its button in Slack: worst {max(delays):.1f} s, "
                  f"median {statistics.median(delays):.1f} s over {len(delays)} gates "
                  f"(goal: worst <= 5 s)")
        missing = len(asked) - len(delays)
        if missing:
            print(f"gates whose button never reached Slack: {missing}")
        return 0 if done == n else 1


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(int(args[0]) if args else 20, "--one-by-one" in sys.argv))
