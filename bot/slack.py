"""Rotor's Slack clients: the Web API client with its retries, group lookups, the Bolt app."""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any
from urllib.error import URLError

from slack_bolt import App
from slack_bolt.authorization import AuthorizeResult
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)

from bot.slack_limits import LimitedClient, SlackLimiter
from rotation import timeouts
from rotation.errors import NotAllowed

log = logging.getLogger("rotor.slack")

# What a Web API call raises: Slack's error answer, or no answer (refused, reset, timed out).
SLACK_ERRORS = (SlackApiError, OSError, http.client.HTTPException)

# Calls that create something: repeating one whose request may have reached Slack could post
# twice, so these are retried only when the connection was never made.
_NOT_IDEMPOTENT = ("chat.postMessage", "chat.postEphemeral")


class ConnectionRetry(ConnectionErrorRetryHandler):
    """slack_sdk's connection-error retries, minus retries that could post a message twice."""

    def _can_retry(self, *, state: Any, request: Any, response: Any = None,
                   error: Exception | None = None) -> bool:
        if not super()._can_retry(state=state, request=request, response=response, error=error):
            return False
        if str(request.url).endswith(_NOT_IDEMPOTENT):
            return isinstance(error, URLError) and isinstance(error.reason,
                                                               ConnectionRefusedError)
        return True


class BoundedRateLimitRetry(RateLimitErrorRetryHandler):
    """slack_sdk's 429 retries, sleeping in the calling thread only for a short Retry-After:
    a longer one fails the call, so no call outlives its bound (`rotation.timeouts`)."""

    def __init__(self, max_retry_count: int, max_wait: float) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.max_wait = max_wait

    def _can_retry(self, *, state: Any, request: Any, response: Any = None,
                   error: Exception | None = None) -> bool:
        if not super()._can_retry(state=state, request=request, response=response, error=error):
            return False
        headers = {k.lower(): v for k, v in (response.headers or {}).items()}
        wait = (headers.get("retry-after") or ["1"])[0]
        return str(wait).isdigit() and int(wait) + 1 <= self.max_wait


def web_client(token: str | None, base_url: str | None, *,
               timeout: float | None = None, rate_limit_retry: bool = True) -> WebClient:
    """A Web API client for `base_url` (SLACK_API_URL), retrying dropped connections and
    (unless `rate_limit_retry` is off: `limited_client` handles 429s itself) 429s, every call
    bounded (`rotation.timeouts`)."""
    bounds = timeouts.BOUNDS
    url = base_url or WebClient.BASE_URL
    retries = bounds.slack_attempts - 1
    handlers: list[Any] = [ConnectionRetry(max_retry_count=retries)]
    if rate_limit_retry:
        handlers.append(BoundedRateLimitRetry(retries, bounds.slack_max_retry_after))
    return WebClient(token=token, base_url=url if url.endswith("/") else url + "/",
                     timeout=int(timeout or bounds.slack), retry_handlers=handlers)


def limited_client(token: str | None, base_url: str | None, *,
                   limiter: SlackLimiter | None = None) -> LimitedClient:
    """Rotor's sending client: every call through one rate limiter (`bot.slack_limits`),
    which handles 429s by pausing the channel; slack_sdk never sleeps on a Retry-After."""
    bounds = timeouts.BOUNDS
    return LimitedClient(web_client(token, base_url, rate_limit_retry=False),
                         limiter or SlackLimiter(max_wait=bounds.slack_max_retry_after),
                         attempts=bounds.slack_attempts, budget=bounds.slack_call(),
                         attempt_time=bounds.slack_attempt())


class GroupMembers:
    """Who is in a Slack user group, from usergroups.users.list, cached for a short while."""

    def __init__(self, client: Any, ttl: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def __call__(self, group: str) -> Collection[str]:
        with self._lock:
            cached = self._cache.get(group)
        if cached and cached[0] > self.clock():
            return cached[1]
        try:
            users = frozenset(self.client.usergroups_users_list(usergroup=group)["users"])
        except SLACK_ERRORS as exc:  # Slack's answer decides a permission: fail closed, say why
            log.warning("policy: could not list members of %s: %s", group, exc)
            raise NotAllowed(f"could not check who is in user group {group} (Slack did not "
                             "answer); try again in a minute") from None
        with self._lock:
            self._cache[group] = (self.clock() + self.ttl, users)
        return users


def _ids(*values: Any) -> set[str]:
    return {v for v in values if isinstance(v, str) and v}


def teams_of(body: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Every workspace (team) and enterprise a request says its sender belongs to.

    Slack names them in several places: the request's team, and for a click the user's own
    team, which differs for someone from another organisation in a Slack Connect channel.
    """
    def part(key: str) -> dict[str, Any]:
        value = body.get(key)
        return value if isinstance(value, dict) else {}

    team, user, event, enterprise = part("team"), part("user"), part("event"), part("enterprise")
    teams = _ids(body.get("team_id"), team.get("id"), user.get("team_id"), body.get("user_team"),
                 event.get("user_team"), event.get("team"))
    enterprises = _ids(body.get("enterprise_id"), enterprise.get("id"),
                       user.get("enterprise_id"), event.get("user_enterprise"))
    return teams, enterprises


class Workspace:
    """Only the workspace Rotor is installed in (and its enterprise) may act.

    The installed team and enterprise come from auth.test, asked once and remembered; on
    Enterprise Grid, `slack.teams` in rotor.yml lists the other workspaces that may.
    """

    def __init__(self, client: Any, teams: Collection[str] = ()) -> None:
        self.client = client
        self.allowed = frozenset(teams)
        self._installed: tuple[str | None, str | None] | None = None
        self._lock = threading.Lock()

    def installed(self) -> tuple[str | None, str | None] | None:
        """(team, enterprise) from auth.test; None while Slack has not answered."""
        with self._lock:
            if self._installed is None:
                try:
                    answer = self.client.auth_test()
                except SLACK_ERRORS as exc:
                    log.warning("workspace: auth.test failed (%s); will ask again",
                                type(exc).__name__)
                    return None
                self._installed = (answer.get("team_id") or None,
                                   answer.get("enterprise_id") or None)
                log.info("workspace: installed in team %s, enterprise %s", *self._installed)
            return self._installed

    def known(self) -> tuple[str | None, str | None] | None:
        return self._installed

    def verdict(self, body: dict[str, Any], installed: tuple[str | None, str | None] | None
                = None) -> bool | None:
        """Whether the sender's workspace may act; None when that is not known yet."""
        installed = installed or self._installed
        if installed is None:
            return None
        team, enterprise = installed
        teams, enterprises = teams_of(body)
        allowed = self.allowed | ({team} if team else set())
        if not teams or not teams <= allowed:
            return False
        return all(found == enterprise for found in enterprises)

    def check(self, body: dict[str, Any]) -> None:
        """Raise NotAllowed, in one line, unless the sender's workspace may act."""
        installed = self.installed()
        if installed is None:
            raise NotAllowed("Rotor cannot check your workspace yet (Slack did not answer); "
                             "try again in a minute")
        if not self.verdict(body, installed):
            from handlers.messages import REFUSED_WORKSPACE

            raise NotAllowed(REFUSED_WORKSPACE)




def bolt_app(client: Any, signing_secret: str | None, *, socket_mode: bool) -> App:
    """A Bolt app that authorizes with the bot token without calling Slack per request.

    Bolt's default single-workspace authorization calls auth.test on the first request, so a
    Web API outage would turn every command into an error; the token is all Rotor needs.
    Listeners run in the request's own thread (`process_before_response`): they only ack and
    enqueue, so the answer goes back at once, without a hop through Bolt's listener pool and
    its 10 ms wait for the ack.
    """
    token = client.token

    def authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
        return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id, bot_token=token)

    bounds = timeouts.BOUNDS
    listener_client = WebClient(
        base_url=client.base_url, timeout=client.timeout,
        retry_handlers=[ConnectionRetry(max_retry_count=bounds.slack_attempts - 1),
                        BoundedRateLimitRetry(bounds.slack_attempts - 1,
                                              bounds.slack_max_retry_after)])
    return App(
        name="rotor",
        client=listener_client,
        authorize=authorize,
        signing_secret=signing_secret or "",
        request_verification_enabled=not socket_mode,
        process_before_response=True,
    )
