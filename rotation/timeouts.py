"""How long any one network call may take, and why the lease is long enough for it.

Every client Rotor makes takes its bounds from `BOUNDS` when it is built: MySQL (connect,
read and write timeouts), PostgreSQL (connect timeout, `statement_timeout`, `lock_timeout`,
TCP keepalives for a peer that went away), botocore (connect and read timeouts, standard
retries with a bounded number of attempts), the Kubernetes client (a (connect, read)
`_request_timeout` on every call, one retry) and Slack's WebClient (a timeout, bounded retries).

A worker renews its lease before every side effect (`rotation.fence`), so the side effect
starts with a whole lease ahead. `check()` asserts that the lease outlives the longest
bounded call, plus a missed heartbeat, plus a margin: no other worker can claim the rotation
while a call this worker started is still running.
"""

from __future__ import annotations

from dataclasses import dataclass

LEASE_SECONDS = 120.0
HEARTBEAT_SECONDS = 30.0
# Time the lease keeps beyond the longest call: the state DB's busy timeout and clock drift.
MARGIN_SECONDS = 15.0

# botocore's standard retry mode waits min(random * 2 ** attempt, 20) s between attempts.
_AWS_MAX_BACKOFF = 20.0


@dataclass(frozen=True)
class Bounds:
    """Per-call time limits, in seconds."""

    db_connect: float = 5.0
    db_read: float = 30.0  # pymysql read_timeout; PostgreSQL statement_timeout
    db_write: float = 10.0  # pymysql write_timeout
    db_lock: float = 10.0  # PostgreSQL lock_timeout
    aws_connect: float = 5.0
    aws_read: float = 10.0
    aws_attempts: int = 3  # botocore's max_attempts: the first call and two retries
    kube_connect: float = 5.0
    kube_read: float = 15.0
    kube_attempts: int = 2
    slack: float = 10.0
    slack_attempts: int = 3
    slack_max_retry_after: float = 5.0  # a longer Retry-After fails the call instead

    def mysql_call(self) -> float:
        """Log in (each socket call of the login within db_connect), or send one statement
        and read back its answer."""
        return max(self.db_connect + self.db_read, self.db_write + self.db_read)

    def postgres_call(self) -> float:
        """libpq's connect_timeout covers the whole login; a statement ends at
        statement_timeout, or when keepalives find the peer gone."""
        connect = max(2.0, self.db_connect)  # libpq's connect_timeout is 2 s at least
        return max(connect, self.db_read + connect, self.keepalive_dead())

    def keepalive_dead(self) -> float:
        idle, interval, count = self.keepalives()
        return idle + interval * count

    def keepalives(self) -> tuple[int, int, int]:
        """TCP keepalive idle, interval and count for PostgreSQL connections."""
        return (max(1, int(self.db_connect)), max(1, int(self.db_connect)), 3)

    def aws_call(self) -> float:
        backoff = sum(min(2.0**attempt, _AWS_MAX_BACKOFF) for attempt in
                      range(1, self.aws_attempts))
        return self.aws_attempts * (self.aws_connect + self.aws_read) + backoff

    def kube_call(self) -> float:
        return self.kube_attempts * (self.kube_connect + self.kube_read)

    def slack_call(self) -> float:
        """Connection retries and 429 retries are counted apart: up to 2n-1 attempts. The
        rate limiter (`bot.slack_limits`) keeps its waits and 429 retries within this too."""
        retries = self.slack_attempts - 1
        return (1 + 2 * retries) * self.slack + retries * self.slack_max_retry_after

    def slack_attempt(self) -> float:
        """One call through slack_sdk with its connection retries (no 429 retries)."""
        return self.slack_attempts * self.slack

    def longest_call(self) -> float:
        return max(self.mysql_call(), self.postgres_call(), self.aws_call(), self.kube_call(),
                   self.slack_call())


BOUNDS = Bounds()


def check(bounds: Bounds = BOUNDS, lease: float = LEASE_SECONDS,
          heartbeat: float = HEARTBEAT_SECONDS) -> None:
    """Raise AssertionError unless the lease outlives the longest call with a margin."""
    needed = bounds.longest_call() + heartbeat + MARGIN_SECONDS
    if lease < needed:
        raise AssertionError(f"a {lease:.0f}s lease does not outlive the longest bounded call "
                             f"({bounds.longest_call():.0f}s) plus a heartbeat "
                             f"({heartbeat:.0f}s) and the margin: needs {needed:.0f}s")
