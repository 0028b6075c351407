"""`rotor serve` as a subprocess, driven like Slack drives it: signed HTTP requests.

`BotProcess` starts the real command in HTTP mode on a free port, pointed at a `FakeSlack`
through SLACK_API_URL, and signs slash commands, button clicks and events with the signing
secret exactly as Slack does (v0 = HMAC-SHA256 of "v0:{timestamp}:{body}").
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg

from demo.slack_api import TEAM, FakeSlack, Message
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_TOKEN = "xoxb-0000-test-token"
SECRET_PASSWORD = "Zq7uM2pXk9RtV4bN8cLw3HsY6dGf1JeA"  # what the scripted kind "creates"

CATALOGUE = """\
environments:
  integration: {aws_region: eu-west-1}
  staging: {aws_region: eu-west-1}
  production:
    aws_region: eu-west-1
    starters: [U0ALICE, U0BOB, S0SRE]
    approvers: [U0ALICE, U0BOB, S0SRE]
apps:
%(apps)s
slack:
  channel: "#govuk-developers"
  second_line_channel: "#govuk-2ndline"
  second_line_group: S0SECONDLINE
  hold_seconds: %(hold)s
  approval_reminder_minutes: %(remind)s
  approval_expiry_hours: %(expire)s
waits: {first_check: 0.02, max_check: 0.2}
key_age: {schedule: "0 0 29 2 *"}  # the scheduled key-age check (AWS) stays out of the way
operators:
  "arn:aws:sts::123456789012:assumed-role/*/alice": U0ALICE
  "arn:aws:sts::123456789012:assumed-role/*/bob": U0BOB
  "arn:aws:sts::123456789012:assumed-role/*/mallory": U0MALLORY
"""
APPS = ("signon", "whitehall", "publisher", "collections", "content-store", "search-api",
        "frontend", "router", "email-alert-api", "link-checker-api", "locations-api",
        "manuals-publisher", "specialist-publisher", "transition", "travel-advice-publisher",
        "asset-manager", "account-api", "support-api", "release", "imminence")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sign(body: bytes, timestamp: int, secret: str = SIGNING_SECRET) -> str:
    base = f"v0:{timestamp}:".encode() + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


@dataclass
class Answer:
    status: int
    body: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def text(self) -> str:
        data = self.json() if self.body.startswith("{") else None
        return str(data.get("text", "")) if isinstance(data, dict) else self.body


@dataclass
class BotProcess:
    workdir: Path
    slack: FakeSlack
    hold: float = 0
    remind_minutes: float = 60
    expire_hours: float = 24
    log_level: str = "INFO"
    host: str = "127.0.0.1"  # ROTOR_BIND: tests never listen beyond loopback
    port: int = field(default_factory=free_port)
    state_url: str | None = None  # a postgresql:// state store instead of workdir/rotor.db
    process: subprocess.Popen[bytes] | None = None
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    # -- the process -------------------------------------------------------------------------

    @property
    def control(self) -> Path:
        return self.workdir / "control"

    @property
    def state(self) -> Path:
        return self.workdir / "rotor.db"

    @property
    def log_path(self) -> Path:
        return self.workdir / "rotor.log"

    def write_config(self) -> None:
        apps = "\n".join(f"  {app}: {{engine: mysql}}" for app in APPS)
        (self.workdir / "rotor.yml").write_text(CATALOGUE % {
            "apps": apps, "hold": self.hold, "remind": self.remind_minutes,
            "expire": self.expire_hours})

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "ROTOR_"))}
        env.update({
            "ROTOR_CONFIG": str(self.workdir / "rotor.yml"), "ROTOR_STATE": self.state_url or str(self.state),
            "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": self.slack.url, "PORT": str(self.port),
            "ROTOR_EXTRA_KINDS": "tests.slack_kinds:KINDS",
            "ROTOR_TEST_CONTROL": str(self.control), "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1", "ROTOR_LOG_LEVEL": self.log_level,
            "ROTOR_BIND": self.host,
        })
        env.update(extra)
        return env

    def start(self, ready: str = "/readyz", **env: str) -> BotProcess:
        self.control.mkdir(exist_ok=True)
        (self.control / "password").write_text(SECRET_PASSWORD)
        if not (self.workdir / "rotor.yml").exists():
            self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve"],
                                        env=self.env(**env), stdout=log, stderr=log,
                                        cwd=self.workdir)
        log.close()
        self.wait_ready(ready)
        return self

    def wait_ready(self, path: str = "/readyz", timeout: float | None = None) -> None:
        def answer() -> int | str:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"rotor serve exited {self.process.returncode}:\n"
                                     f"{self.log()}")
            try:
                return self.get(path).status
            except OSError as exc:
                return f"{type(exc).__name__}: {exc}"
        wait_for(answer, lambda status: status == 200, what=f"{path} to answer 200",
                 timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str) -> Answer:
        return self._request(urllib.request.Request(self.url + path))

    def post(self, body: bytes, *, content_type: str = "application/x-www-form-urlencoded",
             timestamp: int | None = None, signature: str | None = None,
             headers: dict[str, str] | None = None) -> Answer:
        timestamp = int(time.time()) if timestamp is None else timestamp
        request = urllib.request.Request(self.url + "/slack/events", data=body, method="POST")
        request.add_header("Content-Type", content_type)
        request.add_header("X-Slack-Request-Timestamp", str(timestamp))
        request.add_header("X-Slack-Signature", signature or sign(body, timestamp))
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        return self._request(request)

    def _request(self, request: urllib.request.Request) -> Answer:
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read().decode(), exc.code
        return Answer(status, body, time.perf_counter() - started)

    # -- what Slack sends -------------------------------------------------------------------

    def command_body(self, text: str, user: str = "U0ALICE", trigger: str | None = None,
                     team: str = TEAM, **extra: str) -> bytes:
        n = next(self._ids)
        return urlencode({
            **extra,
            "token": "legacy", "team_id": team, "team_domain": "test", "channel_id": "C0DEV",
            "channel_name": "govuk-developers", "user_id": user, "user_name": user.lower(),
            "command": "/rotate", "text": text, "api_app_id": "A0ROTOR",
            "response_url": self.slack.response_url(f"cmd-{n}"),
            "trigger_id": trigger or f"trigger-{n}-{time.monotonic_ns()}",
        }).encode()

    def command(self, text: str, user: str = "U0ALICE", **kwargs: Any) -> Answer:
        body = {k: kwargs.pop(k) for k in ("team", "enterprise_id") if k in kwargs}
        return self.post(self.command_body(text, user, **body), **kwargs)

    def action_body(self, action_id: str, value: str, user: str = "U0BOB",
                    message: Message | None = None, trigger: str | None = None,
                    team: str = TEAM, user_team: str | None = None,
                    enterprise: str | None = None) -> bytes:
        n = next(self._ids)
        payload: dict[str, Any] = {
            "type": "block_actions", "team": {"id": team, "domain": "test"},
            "user": {"id": user, "username": user.lower(), "team_id": user_team or team},
            "enterprise": {"id": enterprise, "name": "Org"} if enterprise else None,
            "api_app_id": "A0ROTOR", "token": "legacy",
            "trigger_id": trigger or f"trigger-{n}-{time.monotonic_ns()}",
            "container": {"type": "message", "message_ts": message.ts if message else "1.0",
                          "channel_id": message.channel if message else "C0DEV",
                          "is_ephemeral": False},
            "channel": {"id": message.channel if message else "C0DEV", "name": "dev"},
            "response_url": self.slack.response_url(f"act-{n}"),
            "actions": [{"type": "button", "action_id": action_id, "block_id": "b",
                         "value": value, "action_ts": str(time.time())}],
        }
        return urlencode({"payload": json.dumps(payload)}).encode()

    def click(self, button: dict[str, Any], user: str = "U0BOB", **kwargs: Any) -> Answer:
        body = self.action_body(button["action_id"], button["value"], user, **kwargs)
        return self.post(body)

    def raw(self, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
        """Send bytes as they are (a request no HTTP client would make); the raw answer."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as conn:
            try:
                conn.sendall(head + body)
            except (ConnectionResetError, BrokenPipeError):
                pass  # the server answered and closed before taking the whole body: read it
            chunks = []
            while True:
                try:
                    chunk = conn.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    def event(self, event: dict[str, Any]) -> Answer:
        body = json.dumps({"token": "legacy", "team_id": TEAM, "api_app_id": "A0ROTOR",
                           "type": "event_callback", "event_id": f"Ev{next(self._ids)}",
                           "event_time": int(time.time()), "event": event}).encode()
        return self.post(body, content_type="application/json")

    # -- the state DB, read-only ---------------------------------------------------------------

    def rows(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.state_url:
            with psycopg.connect(self.state_url, autocommit=True, connect_timeout=5) as pg:
                return [tuple(r) for r in pg.execute(query.replace("?", "%s"),  # type: ignore[call-overload]
                                                     args).fetchall()]
        conn = sqlite3.connect(f"file:{self.state}?mode=ro", uri=True)
        try:
            return conn.execute(query, args).fetchall()
        finally:
            conn.close()

    def rotation(self, app: str, env: str) -> dict[str, Any] | None:
        found = self.rows("SELECT id, status FROM rotations WHERE target = ? AND env = ? "
                          "ORDER BY id DESC LIMIT 1", app, env)
        if not found:
            return None
        steps = self.rows("SELECT name, status, decided_by FROM steps WHERE rotation_id = ? "
                          "ORDER BY position", found[0][0])
        return {"id": found[0][0], "status": found[0][1],
                "steps": {name: status for name, status, _ in steps},
                "decided_by": {name: by for name, _, by in steps if by}}

    def changes(self) -> tuple[int, int]:
        """(rotations, audit rows): equal before and after means nothing changed."""
        return (int(self.rows("SELECT COUNT(*) FROM rotations")[0][0]),
                int(self.rows("SELECT COUNT(*) FROM audit")[0][0]))

    def wait_rows(self, query: str, *args: Any, until: Callable[[list[tuple[Any, ...]]], Any],
                  what: str, timeout: float | None = None) -> list[tuple[Any, ...]]:
        """The query's rows, once `until(rows)` holds."""
        return wait_for(lambda: self.rows(query, *args), until, what=what, timeout=timeout)

    def wait_step(self, app: str, env: str, step: str, status: str,
                  timeout: float | None = None) -> dict[str, Any]:
        found = wait_for(lambda: self.rotation(app, env),
                         lambda r: r is not None and r["steps"].get(step) == status,
                         what=f"{app} {env}: {step} {status}", timeout=timeout)
        assert found is not None
        return found

    def wait_status(self, app: str, env: str, status: str,
                    timeout: float | None = None) -> dict[str, Any]:
        found = wait_for(lambda: self.rotation(app, env),
                         lambda r: r is not None and r["status"] == status,
                         what=f"{app} {env} {status}", timeout=timeout)
        assert found is not None
        return found

    # -- waiting for what `rotor serve` does ---------------------------------------------------

    def wait_for(self, get: Callable[[], Any], until: Callable[[Any], Any] | None = None, *,
                 what: str, timeout: float | None = None) -> Any:
        """tests.waiting.wait_for, for tests that have a bot at hand."""
        return wait_for(get, until, what=what, timeout=timeout)

    def wait_log(self, text: str, timeout: float | None = None) -> str:
        """The process's log, once it holds `text`."""
        return str(wait_for(self.log, lambda log: text in log, what=f"{text!r} in the log",
                            timeout=timeout))

    # -- reading the thread: every reader waits for what the caller expects -------------------

    def _root(self, rotation_id: int) -> Message | None:
        return next((m for m in self.slack.roots()
                     if (m.metadata or {}).get("event_payload") == {"rotation": rotation_id}),
                    None)

    def root_for(self, rotation_id: int, *showing: str, timeout: float | None = None
                 ) -> Message:
        """The rotation's root message, once it shows every one of `showing`.

        The message is the fake's own object: chat.update changes it in place later."""
        found = wait_for(lambda: self._root(rotation_id),
                         lambda m: m is not None and all(t in m.everything() for t in showing),
                         what=f"the root message of #{rotation_id} showing {list(showing)}",
                         timeout=timeout)
        assert found is not None
        return found

    def thread(self, rotation_id: int) -> list[Message]:
        """The thread's replies as they are now (the root is waited for)."""
        return self.slack.thread(self.root_for(rotation_id))

    def thread_text(self, rotation_id: int, *expected: str,
                    timeout: float | None = None) -> list[str]:
        """The thread's texts, once every one of `expected` is in one of them."""
        return wait_for(lambda: [m.text for m in self.thread(rotation_id)],
                        lambda texts: all(any(e in t for t in texts) for e in expected),
                        what=f"the thread of #{rotation_id} to say {list(expected)}",
                        timeout=timeout)

    def message(self, rotation_id: int, text: str,
                where: Callable[[Message], Any] | None = None,
                timeout: float | None = None) -> Message:
        """The newest reply in the thread holding `text` (in its text or blocks), once there
        is one and `where(message)` holds for it."""
        def newest() -> Message | None:
            return next((m for m in reversed(self.thread(rotation_id))
                         if text in m.everything()), None)
        found = wait_for(newest, lambda m: m is not None and (where is None or where(m)),
                         what=f"a message with {text!r} in #{rotation_id}", timeout=timeout)
        assert found is not None
        return found

    def button(self, rotation_id: int, action_id: str, step: str | None = None,
               where: Callable[[dict[str, Any]], Any] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
        """The newest button with this action id (and step) in the rotation's thread, once
        there is one and `where(button)` holds for it."""
        def newest() -> dict[str, Any] | None:
            for message in reversed(self.thread(rotation_id)):
                for button in message.buttons():
                    if button["action_id"] == action_id and (
                            step is None or json.loads(button["value"])["step"] == step):
                        return button
            return None
        found = wait_for(newest, lambda b: b is not None and (where is None or where(b)),
                         what=f"a {action_id} button{f' for {step}' if step else ''} in "
                              f"#{rotation_id}", timeout=timeout)
        assert found is not None
        return found

    def wait_reply(self, contains: str, timeout: float | None = None) -> str:
        """The newest response (via response_url) containing `contains`, once there is one."""
        def find() -> str | None:
            for call in reversed(self.slack.responses()):
                text = str(call.params.get("text", ""))
                if contains in text:
                    return text
            return None
        return str(wait_for(find, what=f"a reply containing {contains!r}", timeout=timeout))


GROUPS = {"S0SRE": ["U0CAROL", "U0DAVE"], "S0SECONDLINE": ["U0ERIN"]}


@contextmanager
def running_bot(workdir: Path, slack: FakeSlack | None = None,
                env: dict[str, str] | None = None, **kwargs: Any) -> Iterator[BotProcess]:
    """A FakeSlack (unless given) and `rotor serve` against it; stopped with SIGTERM after."""
    with ExitStack() as stack:
        fake = slack or stack.enter_context(FakeSlack(groups=dict(GROUPS)))
        bot = BotProcess(workdir, fake, **kwargs).start(**(env or {}))
        try:
            yield bot
        finally:
            bot.stop()


class Apps:
    """Hands out app names no other test in the module used, so rotations never collide."""

    def __init__(self) -> None:
        self._left = list(APPS)

    def __call__(self) -> str:
        return self._left.pop(0)


def delivered(slack: FakeSlack, rotation_id: int) -> list[str]:
    """The delivery keys of every message posted for a rotation, root first."""
    keys = []
    for message in slack.messages:
        payload = (message.metadata or {}).get("event_payload") or {}
        if payload.get("rotation") == rotation_id:
            keys.append(payload.get("key", "root"))
    return keys


def assert_posted_once(slack: FakeSlack, rotation_id: int) -> list[str]:
    keys = delivered(slack, rotation_id)
    doubles = sorted({k for k in keys if keys.count(k) > 1})
    assert not doubles, f"posted more than once for #{rotation_id}: {doubles}"
    assert keys.count("root") == 1
    return keys
