"""A small Slack Web API for tests, spoken to by the real `slack_sdk` WebClient.

It serves POST /api/<method> on 127.0.0.1 and records every call (method and parameters,
form-encoded or JSON). It keeps the messages it was sent, per channel and thread, with their
metadata, so chat.update, chat.getPermalink, conversations.history and conversations.replies
answer like Slack. It also takes posts to response URLs (/response/<id>), which Bolt's
`respond()` uses.

It can misbehave like Slack does:
- `down("refuse")` closes the port (connection refused) and `down("500")` answers errors,
  until `up()`;
- `rate_limit(n, retry_after)` answers the next n calls with 429 and Retry-After;
- `enforce_limits()` (opt-in) answers like Slack's rate limits: chat.postMessage about 1 a
  second per channel (a burst of 3), chat.update 50 a minute; over them, 429 with a
  Retry-After;
- `lose_responses(n)` takes the next n chat.postMessage calls, then drops the connection
  without answering, as when a response is lost on the way back.

Channels have members, as in Slack: the bot posts in a public channel without being in it
(chat:write.public), but reads its history only after conversations.join; a private channel
(`make_private`) answers not_in_channel to everything until someone `invite`s the bot.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

BOT_USER = "UROTOR"
TEAM = "T0001"


@dataclass(frozen=True)
class Call:
    """One request the fake received: `method` is the Web API method, or `response_url`."""

    method: str
    params: dict[str, Any]
    path: str
    at: float = field(default_factory=time.monotonic)
    status: int = 200

    def text(self) -> str:
        """Everything the call carried, as one string (for scanning for secrets)."""
        return json.dumps(self.params, sort_keys=True)


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str | None
    metadata: dict[str, Any] | None
    updates: int = 0

    def as_slack(self, with_metadata: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "message", "user": BOT_USER, "ts": self.ts,
                                   "text": self.text, "blocks": self.blocks}
        if self.thread_ts:
            message["thread_ts"] = self.thread_ts
        if with_metadata and self.metadata:
            message["metadata"] = self.metadata
        return message

    def buttons(self) -> list[dict[str, Any]]:
        return [element for block in self.blocks if block.get("type") == "actions"
                for element in block.get("elements", [])]

    def everything(self) -> str:
        return self.text + json.dumps(self.blocks)


@dataclass
class FakeSlack:
    """Start with `start()` (or as a context manager); `url` is the Web API base URL."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    channels: dict[str, str] = field(default_factory=dict)  # "#name" -> ID
    private: set[str] = field(default_factory=set)  # IDs of private channels
    joined: set[str] = field(default_factory=set)  # IDs of channels the bot is in
    port: int = 0  # 0: any free port
    views: dict[str, dict[str, Any]] = field(default_factory=dict)  # App Home, per user
    # GET and POST /ui/… go here when set: (method, path, body) -> (status, type, body).
    # The demo's page (demo.page) plays Slack's client on it.
    ui: Callable[[str, str, bytes], tuple[int, str, bytes]] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ts = 0.0
        self._mode = "up"
        self._rate_limited = 0
        self._retry_after = 1
        self._limited_methods: set[str] | None = None
        self._lose = 0
        self._limits: dict[str, tuple[float, float]] | None = None  # method -> (rate, burst)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, at)
        self._lose_in: str | None = None
        self._server: ThreadingHTTPServer | None = None

    # -- running ---------------------------------------------------------------------------

    def start(self) -> FakeSlack:
        handler = _handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="fake-slack",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def response_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/response/{name}"

    # -- misbehaving -----------------------------------------------------------------------

    def down(self, how: str = "refuse") -> None:
        with self._lock:
            self._mode = how
        if how == "refuse":
            self.stop()

    def up(self) -> None:
        with self._lock:
            mode, self._mode = self._mode, "up"
        if mode == "refuse":
            self.start()

    @contextmanager
    def outage(self, how: str = "refuse") -> Iterator[None]:
        self.down(how)
        try:
            yield
        finally:
            self.up()

    def rate_limit(self, calls: int, retry_after: int = 1,
                   methods: Collection[str] | None = None) -> None:
        """Answer the next `calls` calls (to `methods` only, when given) with 429."""
        with self._lock:
            self._rate_limited, self._retry_after = calls, retry_after
            self._limited_methods = None if methods is None else set(methods)

    def enforce_limits(self, post_per_second: float = 1.0, post_burst: float = 3,
                       update_per_minute: float = 50, update_burst: float = 10) -> None:
        """From now on, answer 429 + Retry-After like Slack to calls over its limits:
        chat.postMessage per channel, chat.update per workspace (token buckets)."""
        with self._lock:
            self._limits = {"chat.postMessage": (post_per_second, post_burst),
                            "chat.update": (update_per_minute / 60, update_burst)}
            self._buckets.clear()

    def limited(self) -> list[Call]:
        """The calls answered 429."""
        with self._lock:
            return [c for c in self.calls if c.status == 429]

    def _over_limit(self, method: str, params: dict[str, Any]) -> float | None:
        """Seconds to wait when this call is over its limit (None: it may go)."""
        if self._limits is None or method not in self._limits:
            return None
        rate, burst = self._limits[method]
        key = (method, self._channel_id(str(params.get("channel") or ""))
               if method == "chat.postMessage" else "")
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / rate
        self._buckets[key] = (tokens - 1, now)
        return None

    def lose_responses(self, posts: int, channel: str | None = None) -> None:
        """Lose the answers to the next `posts` posts (to `channel` only, when given)."""
        with self._lock:
            self._lose, self._lose_in = posts, channel

    def declare(self, name: str) -> str:
        """A channel that exists before Rotor posts in it, as real ones do; its ID."""
        with self._lock:
            return self._channel_id(name)

    def make_private(self, name: str) -> str:
        with self._lock:
            channel = self._channel_id(name)
            self.private.add(channel)
            return channel

    def invite(self, name: str) -> None:
        """Someone typed `/invite @rotor` in the channel."""
        with self._lock:
            self.joined.add(self._channel_id(name))

    # -- looking at what happened ----------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def responses(self) -> list[Call]:
        return self.calls_to("response_url")

    def roots(self) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.thread_ts is None]

    def thread(self, root: Message) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.thread_ts == root.ts]

    def channel_messages(self, name: str) -> list[Message]:
        with self._lock:
            channel = self.channels.get(name, name)
            return [m for m in self.messages if m.channel == channel]

    def everything(self) -> str:
        """Every call's parameters, as one string."""
        with self._lock:
            return "\n".join(c.text() for c in self.calls)

    # -- the API ---------------------------------------------------------------------------

    def _next_ts(self) -> str:
        """Like Slack's: the time, to the microsecond, unique in the workspace."""
        self._last_ts = max(time.time(), self._last_ts + 0.000001)
        return f"{self._last_ts:.6f}"

    def _channel_id(self, channel: str) -> str:
        if not channel.startswith("#"):
            return channel
        if channel not in self.channels:
            self.channels[channel] = f"C{len(self.channels) + 1:08d}"
        return self.channels[channel]

    def _member(self, channel: str) -> bool:
        return channel in self.joined

    def _find(self, channel: str, ts: str) -> Message | None:
        return next((m for m in self.messages if m.channel == channel and m.ts == ts), None)

    def handle(self, method: str, params: dict[str, Any], path: str
               ) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        """(status, headers, body); body None means: drop the connection."""
        with self._lock:
            if self._mode == "500":
                self.calls.append(Call(method, params, path, status=500))
                return 500, {}, {"ok": False, "error": "internal_error"}
            if self._rate_limited > 0 and method != "response_url" and (
                    self._limited_methods is None or method in self._limited_methods):
                self._rate_limited -= 1
                self.calls.append(Call(method, params, path, status=429))
                return 429, {"Retry-After": str(self._retry_after)}, {"ok": False,
                                                                     "error": "ratelimited"}
            wait = self._over_limit(method, params)
            if wait is not None:
                self.calls.append(Call(method, params, path, status=429))
                return 429, {"Retry-After": str(max(1, math.ceil(wait)))}, {
                    "ok": False, "error": "ratelimited"}
            self.calls.append(Call(method, params, path))
            body = self._api(method, params)
            lost_here = self._lose_in is None or body.get("channel") == self.channels.get(
                self._lose_in, self._lose_in)
            if method == "chat.postMessage" and self._lose > 0 and body.get("ok") and lost_here:
                self._lose -= 1
                return 200, {}, None
            return 200, {}, body

    def _api(self, method: str, p: dict[str, Any]) -> dict[str, Any]:
        if method == "response_url":
            return {"ok": True}
        if method == "auth.test":
            return {"ok": True, "user_id": BOT_USER, "bot_id": "BROTOR", "team_id": TEAM,
                    "team": "Test", "user": "rotor", "url": "https://test.slack.example/"}
        if method == "chat.postMessage":
            if not p.get("channel"):
                return {"ok": False, "error": "channel_not_found"}
            channel = self._channel_id(str(p["channel"]))
            if channel in self.private and not self._member(channel):
                return {"ok": False, "error": "not_in_channel"}
            ts = self._next_ts()
            thread = p.get("thread_ts") or None
            if thread and self._find(channel, str(thread)) is None:
                return {"ok": False, "error": "thread_not_found"}
            message = Message(channel, ts, str(p.get("text") or ""), _blocks(p),
                              str(thread) if thread else None, _json(p.get("metadata")))
            self.messages.append(message)
            return {"ok": True, "channel": channel, "ts": ts,
                    "message": message.as_slack(True)}
        if method == "chat.update":
            found = self._find(str(p.get("channel")), str(p.get("ts")))
            if found is None:
                return {"ok": False, "error": "message_not_found"}
            found.text, found.blocks = str(p.get("text") or ""), _blocks(p)
            found.updates += 1
            return {"ok": True, "channel": found.channel, "ts": found.ts}
        if method == "chat.getPermalink":
            found = self._find(str(p.get("channel")), str(p.get("message_ts")))
            if found is None:
                return {"ok": False, "error": "message_not_found"}
            return {"ok": True, "channel": found.channel,
                    "permalink": f"https://test.slack.example/archives/{found.channel}/"
                                 f"p{found.ts.replace('.', '')}"}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": self._next_ts()}
        if method == "views.publish":
            view = _json(p.get("view")) or {}
            self.views[str(p.get("user_id"))] = view
            return {"ok": True, "view": {"id": "V1", **view}}
        if method == "usergroups.users.list":
            group = str(p.get("usergroup"))
            if group not in self.groups:
                return {"ok": False, "error": "no_such_subteam"}
            return {"ok": True, "users": self.groups[group]}
        if method == "conversations.join":
            channel = str(p.get("channel"))
            if channel not in self.channels.values():
                return {"ok": False, "error": "channel_not_found"}
            if channel in self.private:
                return {"ok": False, "error": "method_not_supported_for_channel_type"}
            self.joined.add(channel)
            return {"ok": True, "channel": {"id": channel}}
        if method == "conversations.list":
            channels = [{"id": cid, "name": name.lstrip("#"), "is_private": cid in self.private,
                       "is_member": cid in self.joined} for name, cid in self.channels.items()
                      if cid not in self.private or cid in self.joined]
            return {"ok": True, "channels": channels, "response_metadata": {"next_cursor": ""}}
        if method in ("conversations.replies", "conversations.history"):
            channel = str(p.get("channel"))
            if channel in self.channels.values() and not self._member(channel):
                return {"ok": False, "error": "not_in_channel"}
            with_metadata = str(p.get("include_all_metadata")).lower() in ("1", "true")
            listed: list[Message]
            if method == "conversations.replies":
                root = self._find(channel, str(p.get("ts")))
                if root is None:
                    return {"ok": False, "error": "thread_not_found"}
                listed = [root, *(m for m in self.messages if m.thread_ts == root.ts)]
            else:
                oldest = float(p.get("oldest") or 0)
                listed = [m for m in reversed(self.messages) if m.channel == channel
                          and m.thread_ts is None and float(m.ts) >= oldest]
            return {"ok": True, "messages": [m.as_slack(with_metadata) for m in listed],
                    "has_more": False, "response_metadata": {"next_cursor": ""}}
        return {"ok": False, "error": "unknown_method"}


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _blocks(params: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = _json(params.get("blocks"))
    return blocks if isinstance(blocks, list) else []


def _handler(fake: FakeSlack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._ui("GET", b"")

        def _ui(self, method: str, raw: bytes) -> None:
            if fake.ui is None:
                self.send_error(404)
                return
            status, content_type, data = fake.ui(method, self.path, raw)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/ui/"):
                self._ui("POST", raw)
                return
            if self.path.startswith("/response/"):
                method = "response_url"
            elif self.path.startswith("/api/"):
                method = self.path.removeprefix("/api/").split("?")[0]
            else:
                self.send_error(404)
                return
            params = _parse(raw, self.headers.get("Content-Type") or "")
            status, headers, body = fake.handle(method, params, self.path)
            if body is None:
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            data = json.dumps(body).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json; charset=utf-8",
                               "Content-Length": str(len(data)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _parse(raw: bytes, content_type: str) -> dict[str, Any]:
    text = raw.decode("utf-8", errors="replace")
    if "json" in content_type:
        data = _json(text)
        return data if isinstance(data, dict) else {"_raw": text}
    return {k: v[0] if len(v) == 1 else v for k, v in parse_qs(text).items()}
