"""`rotor demo`: the world, then either the page that plays Slack, or (`--once`) a headless run.

`--once` types `/rotate demo-app staging` as Alice, approves each gate as Bob, then Carol
(four-eyes: never the person who started it), and prints the thread as text and the sample
app's login counter. It exits 0 when the rotation is done and no login failed.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

from demo.slack_api import Message
from demo.world import APP, CHANNEL, ENV, PEOPLE, SECOND_LINE, World

APPROVERS = ("U0BOB", "U0CAROL")
# Slack's emoji codes as characters every system font has (headless browsers have no emoji).
EMOJI = {":white_check_mark:": "✔", ":x:": "✘", ":hourglass_flowing_sand:": "…",
         ":mega:": "»", ":warning:": "⚠", ":no_entry:": "⛔", ":no_entry_sign:": "⊘",
         ":arrow_forward:": "▶", ":heavy_minus_sign:": "–", ":white_small_square:": "▫",
         ":alarm_clock:": "⏰", ":bell:": "♪", ":key:": "⚿", ":lock:": "⚿",
         ":point_right:": "☞", ":raised_hand:": "✋", ":raising_hand:": "✋", ":repeat:": "↻",
         ":rotating_light:": "‼", ":tada:": "★"}


def mrkdwn(text: str) -> str:
    """Slack's mrkdwn as plain text: links, mentions and user groups by name."""
    text = re.sub(r"<!date\^[^|>]*\|([^>]*)>", r"\1", text)
    text = re.sub(r"<(https?://[^|>]+)\|([^>]+)>", r"\2", text)
    for code, symbol in EMOJI.items():
        text = text.replace(code, symbol)
    text = re.sub(r"<@(U\w+)>", lambda m: "@" + PEOPLE.get(m.group(1), m.group(1)).split()[0],
                  text)
    text = re.sub(r"<!subteam\^(\w+)(\|[^>]*)?>", lambda m: "@" + m.group(1), text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def as_text(message: Message) -> str:
    """A message as Slack would show it, in plain text: its blocks, or its text."""
    lines: list[str] = []
    for block in message.blocks:
        kind = block.get("type")
        if kind in ("section", "header") and block.get("text"):
            lines.append(mrkdwn(block["text"].get("text", "")))
        for field in block.get("fields") or []:
            lines.append(mrkdwn(field.get("text", "")))
        if kind == "context":
            lines.append(" · ".join(mrkdwn(e.get("text", "")) for e in block.get("elements", [])
                                    if e.get("text")))
        if kind == "actions":
            lines.append("  ".join(f"[{b.get('text', {}).get('text', '?')}]"
                                   for b in block.get("elements", [])))
        if kind == "divider":
            lines.append("---")
    return "\n".join(lines) if lines else mrkdwn(message.text)


def _state_row(world: World, query: str, *args: Any) -> tuple[Any, ...] | None:
    """One row of the bot's state DB, read-only; None while it does not exist yet."""
    path = world.workdir / "rotor.db"
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute(query, args).fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the bot is creating it this instant
        return None
    return tuple(row) if row else None


def _rotation(world: World) -> tuple[int, str] | None:
    row = _state_row(world, "SELECT id, status FROM rotations ORDER BY id DESC LIMIT 1")
    return (int(row[0]), str(row[1])) if row else None


def _last_step(world: World, rotation_id: int) -> str:
    row = _state_row(world, "SELECT name FROM steps WHERE rotation_id = ? "
                            "ORDER BY position DESC LIMIT 1", rotation_id)
    return str(row[0]) if row else "?"


def _root(world: World, rotation_id: int) -> Message | None:
    return next((m for m in world.slack.roots()
                 if (m.metadata or {}).get("event_payload", {}).get("rotation") == rotation_id),
                None)


def _approve_buttons(world: World, root: Message) -> list[dict[str, Any]]:
    found = []
    for message in [root, *world.slack.thread(root)]:
        found += [b for b in message.buttons() if b.get("action_id") == "approve"]
    return found


def _wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def once(world: World, timeout: float = 300, out: Any = None) -> int:
    """The headless run; returns the exit code."""
    out = out or sys.stdout
    say: Callable[[str], None] = lambda line: print(line, file=out, flush=True)  # noqa: E731
    _wait("the sample app's first logins", lambda: world.counter()["ok"] >= 3, 60)
    say(f"» Alice types `/rotate {APP} {ENV}` in {CHANNEL}")
    status, _ = world.command(f"{APP} {ENV}", "U0ALICE")
    if status != 200:
        say(f"rotor answered {status}")
        return 1
    rotation_id = _wait("the rotation to start", lambda: (_rotation(world) or (None,))[0], 60)
    root = _wait("the root message", lambda: _root(world, rotation_id), 60)
    pressed: set[str] = set()
    deadline = time.monotonic() + timeout
    result = "active"
    while time.monotonic() < deadline:
        found = _rotation(world)
        result = found[1] if found else "active"
        if result != "active":
            break
        for button in _approve_buttons(world, root):
            if button["value"] in pressed:
                continue
            person = APPROVERS[len(pressed) % len(APPROVERS)]
            step = json.loads(button["value"]).get("step", "?")
            say(f"» {PEOPLE[person].split()[0]} presses Approve on {step}")
            world.click("approve", button["value"], person, root.channel, root.ts)
            pressed.add(button["value"])
        time.sleep(0.3)
    if result == "done":  # the reporter posts the last reply and the final update after it
        last = f"`{_last_step(world, rotation_id)}` done"
        try:
            _wait("the root message to show the rotation done, and the last step's reply",
                  lambda: "✔ done" in as_text(root) and any(
                      last in as_text(m) for m in world.slack.thread(root)), 30)
        except TimeoutError:
            pass  # shown as it is: the checks below still judge the rotation itself
    say("")
    say(f"{CHANNEL}, the rotation's root message (updated in place):")
    say(_indent(as_text(root)))
    say("")
    say("its thread:")
    for message in world.slack.thread(root):
        say(_indent(as_text(message)))
    notices = world.slack.channel_messages(SECOND_LINE)
    if notices:
        say("")
        say(f"{SECOND_LINE}:")
        for message in notices:
            say(_indent(as_text(message)))
    say("")
    say(world.login_line())
    if result != "done":
        say(f"rotation #{rotation_id} is {result}, not done")
        return 1
    if world.counter()["failed"]:
        say("some logins failed: the app was locked out")
        return 1
    say(f"rotation #{rotation_id} done; the app never failed to log in")
    return 0


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(once_only: bool, mysql_url: str | None = None, port: int = 0) -> int:
    # Ctrl-C and SIGTERM both stop the world and remove it, even where a shell started the
    # demo in the background with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    world = World(mysql_url=mysql_url)
    print("starting the demo world (PostgreSQL, moto, Kubernetes, Slack, rotor serve)…",
          flush=True)
    try:
        world.start()
        if once_only:
            return once(world)
        from demo import page

        page.attach(world)
        print(f"\nOpen {world.slack.page_url} and type `/rotate {APP} {ENV}`.\n"
              "Ctrl-C stops the demo and removes everything it made.", flush=True)
        while world.bot is not None and world.bot.poll() is None:
            time.sleep(0.5)
        print(world.bot_log()[-2000:], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        world.stop()
