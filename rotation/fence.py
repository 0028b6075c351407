"""Fenced leases: a worker touches a rotation, and the world for it, only while it holds it.

A worker claims a rotation's lease before advancing it; every claim bumps the rotation's
fencing token (`Store.claim`). While the worker runs steps:

- a heartbeat thread renews the lease every `heartbeat` seconds, so a slow step keeps it;
- every state write it makes is fenced: `Store.transaction` first compare-and-sets the
  rotation's (owner, token) inside the same BEGIN IMMEDIATE, and rolls back when they moved;
- before every side effect (a SQL statement that changes something, an AWS write, a
  Kubernetes patch, the 2nd line post), `guard(what)` renews the lease with the same
  compare-and-set, and raises `LeaseLost` instead of acting when another worker took over.

A renewal at a guard leaves a whole lease ahead, and the lease outlives the longest bounded
call (`rotation.timeouts`), so the side effect ends before anyone else can claim the rotation.
The guard is found through a context variable the engine sets while it holds the lease: the
clients' write paths (botocore's `before-call` event, the MySQL and PostgreSQL connections,
`Kube`'s patches) call `guard` without knowing about rotations.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from rotation import readcache
from rotation.errors import LeaseLost

if TYPE_CHECKING:
    from rotation.store import Store

log = logging.getLogger("rotor.fence")

_current: ContextVar[Lease | None] = ContextVar("rotor_lease", default=None)


class Lease:
    """One claim of one rotation: its owner and fencing token, renewed while it is held."""

    def __init__(self, store: Store, rotation_id: int, owner: str, token: int, *,
                 seconds: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.rotation_id = rotation_id
        self.owner = owner
        self.token = token
        self.seconds = seconds
        self.clock = clock
        self.lost = threading.Event()
        self._lost_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.step: str | None = None  # what the worker is running, for the audit row

    def renew(self, before: str = "the next heartbeat") -> bool:
        """Extend the lease if it is still ours (owner and token unchanged)."""
        if self.lost.is_set():
            return False
        if self.store.renew(self.rotation_id, self.owner, self.token,
                            self.clock() + self.seconds):
            return True
        self._lose(before)
        return False

    def check(self, what: str) -> None:
        """Raise LeaseLost, having acted on nothing, unless the lease is still ours."""
        if not self.renew(what):
            raise LeaseLost(f"rotation #{self.rotation_id}: lease lost; did not {what}")

    def _lose(self, what: str) -> None:
        """Record once, in the log and the audit trail, that this worker lost the lease."""
        with self._lost_lock:
            if self.lost.is_set():
                return
            self.lost.set()
        holder = self.store.lease_holder(self.rotation_id)
        log.warning("%s: #%s lease lost (token %s, now %s); stopped before %s",
                    self.step or "lease", self.rotation_id, self.token, holder, what)
        try:
            with self.store.transaction(fenced=False):
                self.store.audit(self.rotation_id, "lease-lost", self.owner, step=self.step,
                                 detail=f"token {self.token} superseded by {holder}; "
                                        f"stopped before {what}")
        except Exception:  # the state DB itself is failing: the log line above remains
            log.exception("lease: #%s could not audit the lost lease", self.rotation_id)

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if self.lost.is_set():
                    return
                if self.store.renew(self.rotation_id, self.owner, self.token,
                                    self.clock() + self.seconds):
                    continue
                if not self._stop.is_set():  # not merely released while this beat waited
                    self._lose("the next heartbeat")
                return
            except Exception:  # a busy or failing state DB: try again at the next beat
                log.exception("lease: #%s heartbeat failed", self.rotation_id)

    def beat(self, every: float | None) -> None:
        """Start renewing the lease every `every` seconds (once a step is about to run: a
        look at a rotation with nothing due needs no heartbeat)."""
        if every and self._thread is None:
            self._thread = threading.Thread(target=self._heartbeat, args=(every,), daemon=True,
                                            name=f"rotor-lease-{self.rotation_id}")
            self._thread.start()

    @contextmanager
    def held(self) -> Iterator[Lease]:
        """Make this the lease `guard` checks; stop its heartbeat when the block ends."""
        reset = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(reset)
            self._stop.set()
            if self._thread is not None:
                # Bounded: a Ctrl-C that landed inside `with lock:` can leave the store's
                # lock held by this thread (bpo-29988), and the beat would wait on it forever.
                self._thread.join(5.0)


def current() -> Lease | None:
    """The lease this thread acts under, if it runs a step."""
    return _current.get()


def guard(what: str) -> None:
    """Before a side effect: stop (LeaseLost) unless this thread's lease is still current.

    Outside a step (a dry run, a test calling a helper directly) there is no lease to check.
    """
    lease = _current.get()
    if lease is not None:
        lease.check(what)


@contextmanager
def unfenced() -> Iterator[None]:
    """Run a block as no worker: for code that must not be fenced (the lease's own audit)."""
    reset = _current.set(None)
    try:
        yield
    finally:
        _current.reset(reset)


# -- which client calls are side effects ---------------------------------------------------

_READ_OPERATIONS = ("Get", "List", "Describe", "Head", "BatchGet", "Lookup")


def aws_write(operation: str) -> bool:
    """An AWS operation that may change something (anything not Get/List/Describe...)."""
    return not operation.startswith(_READ_OPERATIONS)


def guard_aws(model: Any = None, params: Any = None, **_: Any) -> None:
    """botocore `before-call` handler: guard every AWS operation that may change something."""
    name = getattr(model, "name", "")
    if name and aws_write(name):
        body = params.get("body") if isinstance(params, dict) else None
        status = body.get("Status") if isinstance(body, dict) else None
        guard(f"call AWS {name}" + (f" {status}" if isinstance(status, str) else ""))
        readcache.invalidate()  # what this advance read may change now


# Statements that read or only set up the session. Anything else changes something.
_READ_SQL = ("select", "show", "use", "explain", "describe", "begin",
             "commit", "rollback", "start transaction", "set session", "set local",
             "set names", "set character_set", "set collation", "set @", "set statement_timeout",
             "set lock_timeout", "set role", "set search_path", "reset")
# ... except functions that act although they are called from a SELECT.
_ACTING_FUNCTIONS = ("pg_terminate_backend", "pg_cancel_backend")


def sql_writes(statement: str | bytes) -> bool:
    """True unless `statement` only reads or sets session variables."""
    text = statement.decode("utf-8", "replace") if isinstance(statement, bytes) else statement
    head = text.lstrip(" \t\r\n(").lower()
    if head.startswith("set ") and not head.startswith(_READ_SQL):
        # MySQL: SET PASSWORD / SET DEFAULT ROLE change accounts; SET x = y is the session's.
        return head.startswith(("set password", "set default role", "set global",
                                "set persist"))
    if not head.startswith(_READ_SQL):
        return True
    return any(function in head for function in _ACTING_FUNCTIONS)


def guard_sql(statement: Any) -> None:
    """Guard one SQL statement about to be sent (str, bytes or a psycopg `sql.Composed`)."""
    text = statement if isinstance(statement, str | bytes) else str(statement)
    if sql_writes(text):
        guard(f"run {_head(text)}")


def _head(statement: str | bytes) -> str:
    """What a statement does, for the log: its first two words (never a value)."""
    text = statement.decode("utf-8", "replace") if isinstance(statement, bytes) else statement
    if any(function in text.lower() for function in _ACTING_FUNCTIONS):
        return "pg_terminate_backend"
    return " ".join(text.split()[:2]).upper().strip("(`'\"")
