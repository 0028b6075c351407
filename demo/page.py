"""The local web page that plays Slack for `rotor demo`.

It is served by the fake Slack (`demo.slack_api`), which already implements the Web API
methods Rotor calls. The page shows what Rotor posted (channels, threads, replies only the
clicker sees, App Home) and sends what Slack would send: a slash command, a button click,
`app_home_opened`, each signed with the signing secret exactly as Slack signs (`World.send`).
It renders Block Kit's sections, fields, context, actions (buttons with their confirm
dialogs), headers, dividers, and mrkdwn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from demo.run import EMOJI
from demo.world import APP, CHANNEL, ENV, PEOPLE, SECOND_LINE, World

PAGE = Path(__file__).with_name("page.html")


def _state(world: World, user: str) -> dict[str, Any]:
    slack = world.slack
    names = {channel_id: name for name, channel_id in slack.channels.items()}
    messages = [{"channel": names.get(m.channel, m.channel), "channel_id": m.channel,
                 "ts": m.ts, "thread_ts": m.thread_ts,
                 "text": m.text, "blocks": m.blocks, "updates": m.updates}
                for m in list(slack.messages)]
    private = []
    for call in list(slack.calls):
        who = call.path.rsplit("-", 1)[-1] if call.method == "response_url" else \
            str(call.params.get("user", ""))
        if call.method in ("response_url", "chat.postEphemeral") and who == user:
            blocks = call.params.get("blocks")
            if isinstance(blocks, str):
                blocks = json.loads(blocks)
            private.append({"text": str(call.params.get("text") or ""),
                            "blocks": blocks or [], "at": call.at})
    counter = world.counter()
    return {"messages": messages, "private": private, "home": slack.views.get(user),
            "counter": counter, "people": PEOPLE, "channels": [CHANNEL, SECOND_LINE],
            "emoji": EMOJI, "hint": f"/rotate {APP} {ENV}"}


def handler(world: World) -> Any:
    def ui(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        url = urlsplit(path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if method == "GET" and url.path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", PAGE.read_bytes()
        if method == "GET" and url.path == "/ui/state":
            data = _state(world, query.get("user", "U0ALICE"))
            return 200, "application/json", json.dumps(data).encode()
        if method == "POST" and url.path.startswith("/ui/"):
            form = json.loads(body or b"{}")
            user = str(form.get("user") or "U0ALICE")
            if user not in PEOPLE:
                return 400, "application/json", b'{"error": "unknown user"}'
            if url.path == "/ui/command":
                text = str(form.get("text") or "").strip()
                if not text.startswith("/rotate"):
                    return 400, "application/json", b'{"error": "only /rotate is installed"}'
                status, answer = world.command(text.removeprefix("/rotate").strip(), user)
            elif url.path == "/ui/action":
                status, answer = world.click(str(form["action_id"]), str(form["value"]), user,
                                             str(form.get("channel") or "C0DEV"),
                                             str(form.get("ts") or "1.0"))
            elif url.path == "/ui/home":
                status, answer = world.open_home(user)
            else:
                return 404, "application/json", b"{}"
            return 200, "application/json", json.dumps({"status": status,
                                                         "answer": answer}).encode()
        return 404, "text/plain", b"not found"

    return ui


def attach(world: World) -> None:
    world.slack.ui = handler(world)
