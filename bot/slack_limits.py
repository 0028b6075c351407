"""One rate limiter for all of Rotor's Slack Web API calls, per channel and method.

Slack limits each Web API method by tier, per workspace, and chat.postMessage also per
channel (about one message a second, with short bursts). Rotor's reporter, 2nd line notices,
reminders and handlers all send through one `SlackLimiter`, so together they stay under
those limits instead of each finding out with a 429.

- Every call takes a token from its bucket first: `chat.postMessage` has one per channel,
  other methods one per method (their tiers count per workspace).
- A 429 pauses that bucket for its Retry-After, and the call is made again when it ends: the
  channel waits, not the process. Only the calling thread waits (the reporter's, a
  reminder's, a handler's job; engine workers never call Slack in `rotor serve`), and never
  longer than `max_wait` per turn, within the call's bound (`rotation.timeouts`): a longer
  wait fails the call as transient, to be tried again later.
- Waiters are served by priority: decisions (approval requests and their buttons) and 2nd
  line notices go before progress (thread replies, root message updates).

slack_sdk's own 429 handler sleeps in the calling thread; `bot.slack.web_client` leaves it
out of Rotor's sending client, and this module handles 429s instead.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.errors import SlackApiError

log = logging.getLogger("rotor.slack")

DECISION, NOTICE, PROGRESS = 0, 1, 2  # lower goes first


@dataclass(frozen=True)
class Tier:
    """A token bucket: `rate` calls a second on average, up to `burst` at once."""

    rate: float
    burst: int


# Slack's documented tiers (https://api.slack.com/docs/rate-limits), a little under them, so
# the time a request takes to reach Slack does not turn a just-in-time call into a 429.
POST = Tier(rate=0.95, burst=3)  # chat.postMessage: ~1 a second per channel, short bursts
TIER_4 = Tier(rate=95 / 60, burst=10)  # 100+ a minute
TIER_3 = Tier(rate=45 / 60, burst=10)  # 50+ a minute
TIER_2 = Tier(rate=18 / 60, burst=5)  # 20+ a minute
TIERS = {
    "chat.postMessage": POST,
    "chat.update": TIER_3,
    "chat.postEphemeral": TIER_4,
    "chat.getPermalink": TIER_4,
    "conversations.history": TIER_3,
    "conversations.replies": TIER_3,
    "conversations.join": TIER_3,
    "conversations.list": TIER_2,
    "usergroups.users.list": TIER_2,
    "views.publish": TIER_4,
    "auth.test": TIER_4,
}
DEFAULT_TIER = TIER_3


class Throttled(OSError):
    """Slack asked Rotor to wait longer than one call may (transient: try again later)."""


_local = threading.local()


@contextmanager
def priority(level: int) -> Iterator[None]:
    """Calls made in this thread inside the block wait in line at `level`."""
    before = getattr(_local, "level", PROGRESS)
    _local.level = min(before, level)
    try:
        yield
    finally:
        _local.level = before


def current_priority() -> int:
    return int(getattr(_local, "level", PROGRESS))


@dataclass
class _Bucket:
    tier: Tier
    tokens: float
    at: float
    paused_until: float = 0.0
    waiting: list[tuple[int, int]] = field(default_factory=list)  # a heap of (priority, n)

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.tier.burst), self.tokens + (now - self.at) * self.tier.rate)
        self.at = now

    def ready_in(self, now: float) -> float:
        return max(self.paused_until - now, (1 - self.tokens) / self.tier.rate, 0.0)


class SlackLimiter:
    """Token buckets per (method, channel), served by priority; 429s pause a bucket."""

    def __init__(self, tiers: dict[str, Tier] | None = None, *, max_wait: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tiers = TIERS if tiers is None else tiers
        self.max_wait = max_wait
        self.clock = clock
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        self._aliases: dict[str, str] = {}  # "#name" -> channel ID
        self._cond = threading.Condition()
        self._numbers = itertools.count()
        self.limited = 0  # 429s seen
        self.waited = 0.0  # seconds spent waiting for tokens, in all threads

    def key(self, method: str, channel: Any = None) -> tuple[str, ...]:
        if method == "chat.postMessage":
            name = str(channel or "")
            return (method, self._aliases.get(name, name))
        return (method,)

    def learn(self, name: Any, channel: Any) -> None:
        """`#name` is channel ID `channel` (from Slack's answer): one bucket for both."""
        name, channel = str(name or ""), str(channel or "")
        if not name.startswith("#") or not channel or self._aliases.get(name) == channel:
            return
        with self._cond:
            self._aliases[name] = channel
            bucket = self._buckets.pop(("chat.postMessage", name), None)
            if bucket is not None:
                self._buckets.setdefault(("chat.postMessage", channel), bucket)

    def _bucket(self, key: tuple[str, ...], now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            tier = self.tiers.get(key[0], DEFAULT_TIER)
            bucket = self._buckets[key] = _Bucket(tier, float(tier.burst), now)
        return bucket

    def acquire(self, key: tuple[str, ...], level: int = PROGRESS,
                deadline: float | None = None) -> None:
        """Take a token, waiting behind more urgent callers; Throttled after `max_wait` (or
        at `deadline`, on `clock`, if sooner)."""
        with self._cond:
            start = self.clock()
            until = start + self.max_wait
            deadline = until if deadline is None else min(until, deadline)
            bucket = self._bucket(key, start)
            me = (level, next(self._numbers))
            heapq.heappush(bucket.waiting, me)
            try:
                while True:
                    now = self.clock()
                    bucket.refill(now)
                    wait = bucket.ready_in(now)
                    if bucket.waiting[0] == me and wait <= 0:
                        bucket.tokens -= 1
                        self.waited += now - start
                        return
                    if now + wait > deadline or now >= deadline:
                        self.waited += now - start
                        raise Throttled(f"Slack's rate limit for {key[0]} would make this "
                                        f"call wait more than {self.max_wait:g} s")
                    # Woken early when a caller ahead of us leaves or a 429 pauses the bucket.
                    self._cond.wait(max(wait, 0.01) if bucket.waiting[0] == me else
                                    max(wait, 0.05))
            finally:
                bucket.waiting.remove(me)
                heapq.heapify(bucket.waiting)
                self._cond.notify_all()

    def pause(self, key: tuple[str, ...], seconds: float) -> None:
        """Slack answered 429: nobody sends on this bucket for `seconds`."""
        with self._cond:
            now = self.clock()
            bucket = self._bucket(key, now)
            bucket.paused_until = max(bucket.paused_until, now + seconds)
            bucket.tokens = min(bucket.tokens, 0.0)
            self.limited += 1
            self._cond.notify_all()


def retry_after(exc: SlackApiError) -> float:
    headers = {k.lower(): v for k, v in (getattr(exc.response, "headers", None) or {}).items()}
    value = headers.get("retry-after") or "1"
    if isinstance(value, list):
        value = value[0] if value else "1"
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0


class LimitedClient:
    """A Web API client whose every call goes through a `SlackLimiter`.

    `client.chat_postMessage(...)` and the other methods keep their signatures; the caller's
    `priority()` decides its place in line. A 429 is handled here, not by slack_sdk: the
    bucket is paused for Retry-After and the call made again (a 429 means Slack took
    nothing, so a post cannot land twice), up to `attempts` times. With a `budget`, the
    waits and the attempts (each up to `attempt_time`) end within it: a wait that would
    overrun it fails the call as Throttled.
    """

    def __init__(self, client: Any, limiter: SlackLimiter | None = None, *,
                 attempts: int = 3, budget: float | None = None,
                 attempt_time: float = 0.0) -> None:
        self.client = client
        self.limiter = limiter or SlackLimiter()
        self.attempts = attempts
        self.budget = budget
        self.attempt_time = attempt_time

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if name.startswith("_") or not callable(attribute) or "_" not in name:
            return attribute
        method = name.replace("_", ".")

        def call(**kwargs: Any) -> Any:
            return self.call(method, attribute, kwargs)

        return call

    def call(self, method: str, function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        key = self.limiter.key(method, kwargs.get("channel"))
        level = current_priority()
        deadline = (None if self.budget is None else
                    self.limiter.clock() + self.budget - self.attempt_time)
        for attempt in range(1, self.attempts + 1):
            self.limiter.acquire(key, level, deadline)
            try:
                response = function(**kwargs)
                if method == "chat.postMessage":
                    self.limiter.learn(kwargs.get("channel"), response.get("channel"))
                return response
            except SlackApiError as exc:
                if getattr(exc.response, "status_code", 200) != 429:
                    raise
                wait = retry_after(exc)
                self.limiter.pause(key, wait)
                log.warning("slack: %s rate limited; that %s waits %s s (attempt %s of %s)",
                            method, "channel" if len(key) > 1 else "method",
                            _seconds(wait), attempt, self.attempts)
                if attempt == self.attempts or wait > self.limiter.max_wait:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


def _seconds(value: float) -> str:
    return str(int(value)) if value == math.floor(value) else f"{value:.1f}"
