"""Slack listeners, one module per surface. Each has `register(app, deps)`.

Listeners are thin: `ack()`, parse, then hand the work to Rotor's own job queue (never
Bolt's listener pool), where one engine function runs and the person gets a reply. Errors are
not caught here: Bolt's `app.error` and the job queue both end in `report_error`, which
tells the person one line and logs the rest.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from handlers import messages
from rotation.engine import Engine
from rotation.errors import RotorError
from rotation.policy import Policy
from rotation.store import RotationRow

log = logging.getLogger("rotor.slack")

Reply = Callable[[str], None]
REQUEST_MEMORY_SECONDS = 3600  # Slack retries within minutes; an hour is plenty


class BadRequest(RotorError):
    """A command or click Rotor cannot read."""


class Jobs(Protocol):
    def submit(self, name: str, work: Callable[[], None], reply: Reply) -> None: ...


class Links(Protocol):
    def thread_link(self, rotation: RotationRow) -> str | None: ...


class Workspace(Protocol):
    """Which Slack workspaces may act (bot.slack.Workspace)."""

    def verdict(self, body: dict[str, Any]) -> bool | None: ...

    def check(self, body: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Deps:
    """What listeners need, made once by `bot.serve`."""

    engine: Engine
    policy: Policy
    jobs: Jobs
    links: Links
    client: Any
    channel: str
    workspace: Workspace

    def first_time(self, body: dict[str, Any]) -> bool:
        """False when Slack re-sent a request this or another process already took."""
        trigger = body.get("trigger_id")
        if not trigger:
            return True
        store = self.engine.store
        return store.try_lock(f"slack-request:{trigger}", uuid.uuid4().hex,
                              store.clock() + REQUEST_MEMORY_SECONDS)


def _user_of(body: dict[str, Any]) -> str | None:
    user = (body.get("user_id") or (body.get("user") or {}).get("id")
            or (body.get("event") or {}).get("user"))
    return user if isinstance(user, str) and user else None


def sender(body: dict[str, Any]) -> str:
    """The Slack user a command or click came from."""
    user = _user_of(body)
    if user is None:
        raise BadRequest("that request names no Slack user")
    return user


def reply_to(respond: Any, body: dict[str, Any], client: Any) -> Reply:
    """An ephemeral reply to whoever sent `body`: by response_url, else a DM from the app."""
    if body.get("response_url") and respond is not None:
        def by_response_url(text: str) -> None:
            respond(text=text, response_type="ephemeral", replace_original=False)
        return by_response_url
    user = _user_of(body)

    def by_dm(text: str) -> None:
        if user is None:
            log.info("slack: nobody to tell: %s", text)
        else:
            client.chat_postMessage(channel=user, text=text)
    return by_dm


def enqueue(deps: Deps, name: str, body: dict[str, Any], respond: Any,
            work: Callable[[Reply], None], *, once: bool) -> None:
    """Queue `work(reply)` for Rotor's jobs. Call it right after `ack()`: it never raises.

    Bolt replaces an acked response with an error when a listener raises after `ack()`, so
    everything that can fail (reading the payload included) happens in the job. With `once`,
    a request Slack re-sent (X-Slack-Retry-Num) is dropped when this or another process
    already took it.
    """
    reply = reply_to(respond, body, deps.client)

    def run() -> None:
        try:
            deps.workspace.check(body)
        except RotorError as exc:
            if body.get("response_url"):
                raise
            log.info("slack: %s refused: %s", name, exc)  # an event: nobody asked, say nothing
            return
        if once and not deps.first_time(body):
            log.info("slack: %s re-sent by Slack; already handled", name)
            return
        work(reply)

    deps.jobs.submit(name, run, reply)


def report_error(error: BaseException, reply: Reply) -> None:
    """The one place a failed command or click ends: a one-line reason, or a brief apology."""
    if isinstance(error, RotorError):
        log.info("slack: refused: %s", error)
        text = messages.refused(error)
    else:
        log.error("slack: %s while handling a request", type(error).__name__,
                  exc_info=(type(error), error, error.__traceback__))
        text = messages.internal_error()
    reply(text)


def parse_value(action: dict[str, Any]) -> dict[str, Any]:
    """The rotation (and step, env) a button carries; BadRequest when it is not ours."""
    try:
        data = json.loads(action.get("value") or "")
    except ValueError:
        raise BadRequest("that button's payload is not one Rotor made") from None
    if not isinstance(data, dict) or not isinstance(data.get("rotation"), int):
        raise BadRequest("that button's payload names no rotation")
    step = data.get("step")
    if step is not None and not isinstance(step, str):
        raise BadRequest("that button's payload names no step")
    return data


def register(app: Any, deps: Deps) -> None:
    from handlers import actions, commands, home

    commands.register(app, deps)
    actions.register(app, deps)
    home.register(app, deps)

    @app.error
    def on_error(error: Exception, body: dict[str, Any], respond: Any) -> None:
        report_error(error, reply_to(respond, body or {}, deps.client))
