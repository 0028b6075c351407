"""Rotor's state: rotations, their steps, the audit trail and a few locks.

Two backends share this module's logic and SQL: SQLite (`rotation.store_sqlite`, the default:
a file path) and PostgreSQL (`rotation.store_pg`: a `postgresql://` URL), which several
`rotor serve` replicas can share. `Store(path_or_url, clock=...)` opens the right one.
Every state change is written in one transaction together with its audit row. The audit
table is append-only (triggers refuse UPDATE and DELETE). The database itself enforces at
most one active rotation per kind, target and environment (a partial unique index), and
decisions are compare-and-set, so two bot processes or a double click cannot both win.
No row may hold a secret value: writes are checked against the redaction registry.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from rotation import audit_chain, fence, redact
from rotation.errors import LeaseLost, RotationConflict, RotorError, UnknownName

ACTIVE = "active"
DONE = "done"
CANCELLED = "cancelled"
SYSTEM = "rotor"  # the actor of what Rotor does by itself, in the audit

STEP_STATUSES = ("pending", "running", "waiting", "needs-approval", "done", "failed", "skipped")
FINISHED_STEP = ("done", "skipped")


class SecretInState(RotorError):
    """Refused to store text that contains a secret value."""


@dataclass(frozen=True)
class StepRow:
    rotation_id: int
    position: int
    name: str
    title: str
    destructive: int
    status: str
    attempts: int
    started_at: float | None
    finished_at: float | None
    result: str | None
    error: str | None
    wait_reason: str | None
    waiting_since: float | None
    next_check_at: float | None
    checks: int
    gate: str | None
    gate_summary: str | None
    gate_destructive: int | None
    gate_requested_at: float | None
    decision: str | None
    decided_by: str | None
    decided_at: float | None
    notice_at: float | None
    notice_ref: str | None
    hold_until: float | None
    reminded_at: float | None
    expired_at: float | None
    gate_digest: str | None = None  # what the approval was shown (Context.approve's facts)
    gate_four_eyes: int | None = None  # this gate needs an approver other than the starter

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STEP

    @property
    def approved(self) -> bool:
        return self.decision == "approved"

    @property
    def guided(self) -> bool:
        """A guided step waits for a person to do something and click "Done"."""
        return (self.gate or "").startswith("guide:")


@dataclass(frozen=True)
class RotationRow:
    id: int
    kind: str
    target: str
    env: str
    status: str
    initiator: str
    params: dict[str, Any]
    data: dict[str, Any]
    created_at: float
    updated_at: float
    finished_at: float | None
    next_run_at: float | None
    lease_owner: str | None
    lease_until: float | None
    cancel_requested_by: str | None
    steps: tuple[StepRow, ...] = ()
    lease_token: int = 0
    fleet_id: int | None = None  # the fleet (`rotor rotate --all`) this rotation belongs to

    @property
    def current(self) -> StepRow | None:
        """The first step that has not finished, or None when all have."""
        return next((s for s in self.steps if not s.finished), None)

    @property
    def done_count(self) -> int:
        return sum(1 for s in self.steps if s.finished)

    @property
    def progress(self) -> str:
        return f"{self.done_count}/{len(self.steps)} done"

    @property
    def phase(self) -> str:
        """What the rotation is doing now, in one word: the current step's status."""
        if self.status != ACTIVE:
            return self.status
        step = self.current
        return step.status if step else "done"

    def step(self, name_or_position: str | int) -> StepRow:
        for s in self.steps:
            if s.name == name_or_position or s.position == name_or_position:
                return s
        raise UnknownName(f"rotation {self.id} has no step {name_or_position!r}")


@dataclass(frozen=True)
class AuditRow:
    id: int
    rotation_id: int | None
    step: str | None
    event: str
    from_status: str | None
    to_status: str | None
    actor: str
    at: float
    detail: str | None
    hash: str | None = None  # chained to the previous row's (rotation.audit_chain)


@dataclass(frozen=True)
class FleetRow:
    """A fleet: several apps rotated together after one plan and one confirmation.

    `status` is the fleet's own: planned (shown, not yet confirmed), confirming (confirmed by
    its starter, waiting for a second person: four-eyes), starting (confirmed; its rotations
    are being created), started (its rotations exist) or cancelled. Once started, what it is doing comes from its rotations (rotation.fleet)."""

    id: int
    env: str
    initiator: str
    params: dict[str, Any]
    plan: list[dict[str, Any]]
    status: str
    created_at: float
    confirmed_by: str | None
    confirmed_at: float | None
    message_ref: str | None


_FLEET_FIELDS = [f.name for f in fields(FleetRow)]
_FLEET_SELECT = ", ".join(_FLEET_FIELDS)
_STEP_FIELDS = [f.name for f in fields(StepRow)]
_ROTATION_FIELDS = [f.name for f in fields(RotationRow) if f.name != "steps"]
# The rows' own field names: identifiers of ours, so reads need no quoting (nor sqlite-utils).
_ROTATION_SELECT = ", ".join(_ROTATION_FIELDS)
_STEP_SELECT = ", ".join(_STEP_FIELDS)


def _holds_secret(value: Any) -> bool:
    """True if any string in `value` (nested dicts and lists too) contains a secret.

    Checked on the values themselves, before they become JSON: JSON escapes quotes,
    backslashes and non-ASCII characters, and a secret holding one would slip past a
    check of the JSON text."""
    if isinstance(value, str):
        return redact.contains_secret(value)
    if isinstance(value, dict):
        return any(_holds_secret(k) or _holds_secret(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_secret(v) for v in value)
    return False


def _guard(values: dict[str, Any]) -> None:
    for key, value in values.items():
        if _holds_secret(value):
            raise SecretInState(f"refused to store {key}: it contains a secret value")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (None: no such process)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the name in (...) may hold spaces


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "-"


def process_identity() -> str:
    """Who this process is, in a form another process can check: "host:pid:instance:proof".

    A hostname and a pid alone do not name a process: two containers may share a hostname
    and both run Rotor as pid 1. The proof says which kernel boot and pid namespace the pid
    belongs to and when that process started, so `holder_is_dead` only judges pids it can
    see and only a process that is really gone; the random instance tells apart workers
    (engines) in one process.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{_proof()}"


_proofs: dict[int, str] = {}


def _proof() -> str:
    """This process's "boot.namespace.start", read once per pid (a fork reads its own)."""
    pid = os.getpid()
    if pid not in _proofs:
        boot = (_read("/proc/sys/kernel/random/boot_id") or "-")[:13]
        _proofs[pid] = f"{boot}.{_pid_namespace()}.{_start_time(pid) or '-'}"
    return _proofs[pid]


def holder_is_dead(holder: str) -> bool:
    """A lease or lock whose holder process is provably gone is free to take now.

    Provably: the holder names this kernel boot and this pid namespace (see
    `process_identity`), and its pid no longer exists or now belongs to a process that
    started at another time. Anything else (another host, another container, an old-style
    name, no /proc) is left alone until its lease runs out.
    """
    parts = holder.split(":")
    if len(parts) < 4 or not parts[1].isdigit():
        return False
    boot, _, rest = parts[3].partition(".")
    namespace, _, started = rest.partition(".")
    mine = _proof().split(".")
    if "-" in (boot, namespace, started) or [boot, namespace] != mine[:2]:
        return False
    if is_this_process(holder):
        return False  # alive (claims ask this often; no /proc read)
    return _start_time(int(parts[1])) != started


def is_this_process(holder: str) -> bool:
    """Whether `holder` (a `process_identity`) names this very process: its pid, boot, pid
    namespace and start time (any of its workers, whatever the instance)."""
    parts = holder.split(":")
    return len(parts) >= 4 and parts[1] == str(os.getpid()) and parts[3] == _proof()


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Db(Protocol):
    """One connection as the shared SQL sees it: `?` placeholders, whichever backend."""

    def execute(self, sql: str, args: Iterable[Any] = ()) -> Cursor: ...


def quote_identifier(name: str) -> str:
    """sqlite-utils' quoting (PostgreSQL quotes the same way), loaded on first use so that
    reading the state (`rotor status`) does not import sqlite-utils."""
    from sqlite_utils.db import quote_identifier as quote

    return str(quote(name))


def _names(columns: Iterable[str]) -> str:
    return ", ".join(quote_identifier(c) for c in columns)


class Store:
    """The state DB: the logic and SQL both backends share.

    `Store(path_or_url, clock=...)` opens SQLite for a path and PostgreSQL for a
    `postgresql://` URL. A backend provides connections (`_session`, `_begin`), migrations,
    `ping` and `close`, and a few dialect words; everything else is here, in SQL both accept.
    Within `transaction()` every call on this thread uses the transaction's connection.
    """

    path: str
    # Dialect: what follows a SELECT that locks the rows a claim will update ("" where the
    # transaction holds the whole database, as SQLite's BEGIN IMMEDIATE does).
    for_update = ""
    skip_locked = ""
    integrity_errors: tuple[type[BaseException], ...] = ()

    def __new__(cls, path: str | Path, *, clock: Callable[[], float], **options: Any) -> Store:
        if cls is Store:
            if str(path).startswith(POSTGRES_SCHEMES):
                from rotation.store_pg import PostgresStore
                cls = PostgresStore
            else:
                from rotation.store_sqlite import SQLiteStore
                cls = SQLiteStore
        return super().__new__(cls)

    def __init__(self, path: str | Path, *, clock: Callable[[], float]) -> None:
        self.path = str(path)
        self.clock = clock
        self._local = threading.local()

    # -- what a backend provides ----------------------------------------------------------

    def _connect(self) -> AbstractContextManager[Db]:
        """A connection for statements outside a transaction (each commits on its own)."""
        raise NotImplementedError

    def _begin(self) -> AbstractContextManager[Db]:
        """A connection in a write transaction: committed at the end, rolled back on error."""
        raise NotImplementedError

    def _snapshot(self) -> AbstractContextManager[Db]:
        """A connection whose statements all read one moment of the database, for reads of
        more than one statement (a rotation and its steps)."""
        raise NotImplementedError

    def migrate(self) -> int:
        raise NotImplementedError

    def ping(self) -> str | None:
        """None when the database answers now; else why not, in one line (for /readyz)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _order_audit(self, db: Db) -> None:
        """Make audit ids commit in the order they are handed out (see PostgresStore)."""

    # -- connections ----------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[Db]:
        current = getattr(self._local, "db", None)
        if current is not None:
            yield current
            return
        with self._connect() as db:
            yield db

    @contextmanager
    def transaction(self, *, fenced: bool = True) -> Iterator[Db]:
        """One write transaction; every write made by this thread inside it joins it.

        A worker that holds a rotation's lease (`rotation.fence`) writes only while its
        fencing token is still the rotation's: the first statement compare-and-sets it, and
        the transaction rolls back with LeaseLost when another worker has claimed since.
        The statement holds the rotation (SQLite: the whole database, BEGIN IMMEDIATE;
        PostgreSQL: its row) until COMMIT, so no claim can slip in.
        """
        lease = fence.current() if fenced else None
        with self._begin() as db:
            self._local.db = db
            try:
                if lease is not None and db.execute(
                        "UPDATE rotations SET lease_token = lease_token WHERE id = ? "
                        "AND lease_owner = ? AND lease_token = ?",
                        [lease.rotation_id, lease.owner, lease.token]).rowcount != 1:
                    raise LeaseLost(f"rotation #{lease.rotation_id}: lease lost; "
                                    "nothing written")
                yield db
            finally:
                self._local.db = None

    def _insert(self, db: Db, table: str, row: dict[str, Any], *, returning: bool = True
                ) -> int | None:
        # Table and column names come from this module's code, quoted all the same.
        sql = ("INSERT INTO " + quote_identifier(table)  # noqa: S608
               + " (" + _names(row) + ") VALUES (" + ", ".join("?" for _ in row) + ")"
               + (" RETURNING id" if returning else ""))
        cursor = db.execute(sql, list(row.values()))
        return int(cursor.fetchone()[0]) if returning else None

    # -- writes ---------------------------------------------------------------------------

    def audit(self, rotation_id: int | None, event: str, actor: str, *, step: str | None = None,
              from_status: str | None = None, to_status: str | None = None,
              detail: str | None = None) -> None:
        """Append one audit row; call inside the transaction that made the change."""
        row = {"rotation_id": rotation_id, "step": step, "event": event,
               "from_status": from_status, "to_status": to_status, "actor": actor,
               "at": self.clock(), "detail": detail}
        _guard(row)
        if getattr(self._local, "db", None) is None:
            with self.transaction(fenced=False) as db:  # reading the head and appending: one
                self._append_audit(db, row)
        else:
            with self._session() as db:
                self._append_audit(db, row)

    def _append_audit(self, db: Db, row: dict[str, Any]) -> None:
        """Append the row, chained to the last one (rotation.audit_chain)."""
        self._order_audit(db)
        last = db.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        row["hash"] = audit_chain.link((last[0] or "") if last else "", row)
        self._insert(db, "audit", row)

    def create_rotation(self, kind: str, target: str, env: str, initiator: str,
                        params: dict[str, Any], steps: list[tuple[str, str, bool]], *,
                        fleet_id: int | None = None) -> int:
        now = self.clock()
        _guard({"params": params})
        row = {"kind": kind, "target": target, "env": env, "status": ACTIVE,
               "initiator": initiator, "params": json.dumps(params, sort_keys=True),
               "data": "{}", "created_at": now, "updated_at": now, "next_run_at": now}
        if fleet_id is not None:
            row["fleet_id"] = fleet_id
        _guard(row)
        try:
            with self.transaction() as db:
                rotation_id = self._insert(db, "rotations", row)
                assert rotation_id is not None
                for i, (name, title, destructive) in enumerate(steps):
                    self._insert(db, "steps", {
                        "rotation_id": rotation_id, "position": i, "name": name,
                        "title": title, "destructive": int(destructive)}, returning=False)
                self.audit(rotation_id, "started", initiator, to_status=ACTIVE,
                           detail=f"{kind} rotation of {target} in {env}")
        except self.integrity_errors:
            active = self.find_active(kind, target, env)
            raise RotationConflict(
                f"{target} in {env} already has an active rotation"
                f"{f' (#{active.id}, started by {active.initiator})' if active else ''}"
            ) from None
        return rotation_id

    def update_rotation(self, rotation_id: int, **values: Any) -> None:
        _guard(values)
        if "data" in values:
            values["data"] = json.dumps(values["data"], sort_keys=True)
            _guard({"data": values["data"]})
        values["updated_at"] = self.clock()
        unknown = set(values) - set(_ROTATION_FIELDS)
        if unknown:
            raise ValueError(f"rotations has no column {sorted(unknown)}")
        sets = ", ".join(quote_identifier(k) + " = ?" for k in values)
        with self._session() as db:
            db.execute("UPDATE rotations SET " + sets + " WHERE id = ?",  # noqa: S608
                       [*values.values(), rotation_id])

    def update_step(self, rotation_id: int, position: int, *, expect: dict[str, Any] | None = None,
                    **values: Any) -> bool:
        """Update one step; with `expect`, only if its columns still hold those values (CAS)."""
        _guard(values)
        unknown = (set(values) | set(expect or {})) - set(_STEP_FIELDS)
        if unknown:
            raise ValueError(f"steps has no column {sorted(unknown)}")
        # Column names are checked against StepRow above and quoted.
        sets = ", ".join(quote_identifier(k) + " = ?" for k in values)
        where = "rotation_id = ? AND position = ?"
        args: list[Any] = [*values.values(), rotation_id, position]
        for key, value in (expect or {}).items():
            if value is None:
                where += " AND " + quote_identifier(key) + " IS NULL"
            else:
                where += " AND " + quote_identifier(key) + " = ?"
                args.append(value)
        with self._session() as db:
            cursor = db.execute("UPDATE steps SET " + sets + " WHERE " + where,  # noqa: S608
                                args)
            return cursor.rowcount == 1

    def _take(self, db: Db, rotation_id: int, holder: str | None, held_until: float | None,
              token: int, owner: str, until: float, is_stale: Callable[[str], bool]
              ) -> int | None:
        if holder and (held_until or 0) > self.clock() and not is_stale(holder):
            return None
        db.execute("UPDATE rotations SET lease_owner = ?, lease_until = ?, lease_token = ? "
                   "WHERE id = ?", [owner, until, token + 1, rotation_id])
        return int(token + 1)

    def schedule(self, rotation_id: int, next_run_at: float | None, *, position: int,
                 status: str, next_check_at: float | None) -> bool:
        """Set when the worker looks at the rotation next, compare-and-set: only while step
        `position` still has `status` and `next_check_at` and no cancel was asked for.

        Call inside a transaction. False: something changed since the caller read it."""
        with self._session() as db:
            cursor = db.execute(
                "UPDATE rotations SET next_run_at = ?, updated_at = ? WHERE id = ? "
                "AND status = 'active' AND cancel_requested_by IS NULL AND EXISTS ("
                "SELECT 1 FROM steps WHERE rotation_id = ? AND position = ? AND status = ? "
                "AND next_check_at IS NOT DISTINCT FROM ?)",
                [next_run_at, self.clock(), rotation_id, rotation_id, position, status,
                 next_check_at])
            return bool(cursor.rowcount == 1)

    def claim(self, rotation_id: int, owner: str, until: float, *,
              is_stale: Callable[[str], bool] = holder_is_dead) -> int | None:
        """Take the rotation's lease if it is free, expired, or held by a dead process.

        Returns the new fencing token (bumped at every claim), or None. A live lease is
        never taken, not even by its own owner: one engine's two threads must not both run
        a rotation (a cancel clicked while the worker runs leaves it to the worker).
        """
        with self.transaction(fenced=False) as db:
            row = db.execute("SELECT lease_owner, lease_until, lease_token "
                             "FROM rotations WHERE id = ?" + self.for_update,
                             [rotation_id]).fetchone()
            if row is None:
                return None
            return self._take(db, rotation_id, row[0], row[1], row[2], owner, until, is_stale)

    def claim_due(self, now: float, owner: str, until: float, *, skip: Iterable[int] = (),
                  is_stale: Callable[[str], bool] = holder_is_dead) -> tuple[int, int] | None:
        """Claim one due rotation whose lease is free: (rotation id, token), or None.

        One transaction finds and claims it: PostgreSQL locks the candidates FOR UPDATE SKIP
        LOCKED, so replicas claiming at once take different rotations and never wait on
        each other; SQLite's BEGIN IMMEDIATE makes the whole claim one atomic step.
        `skip`: rotations this worker already ran in this round."""
        passed = set(skip)
        with self.transaction(fenced=False) as db:
            rows = db.execute(
                "SELECT id, lease_owner, lease_until, lease_token FROM rotations "  # noqa: S608
                "WHERE status = 'active' AND next_run_at IS NOT NULL AND next_run_at <= ? "
                "ORDER BY next_run_at, id LIMIT ?" + self.for_update + self.skip_locked,
                [now, len(passed) + 16]).fetchall()
            for rotation_id, holder, held_until, token in rows:
                if rotation_id in passed:
                    continue
                taken = self._take(db, rotation_id, holder, held_until, token, owner, until,
                                   is_stale)
                if taken is not None:
                    return int(rotation_id), taken
        return None

    def renew(self, rotation_id: int, owner: str, token: int, until: float) -> bool:
        """Extend a lease, compare-and-set: only while `owner` still holds `token`."""
        with self.transaction(fenced=False) as db:
            return db.execute("UPDATE rotations SET lease_until = ? WHERE id = ? "
                              "AND lease_owner = ? AND lease_token = ?",
                              [until, rotation_id, owner, token]).rowcount == 1

    def lease_holder(self, rotation_id: int) -> str:
        """Who holds the rotation's lease now, and with which token (for log lines)."""
        with self._session() as db:
            row = db.execute("SELECT lease_owner, lease_token FROM rotations WHERE id = ?",
                             [rotation_id]).fetchone()
        return f"{row[0] or 'nobody'} (token {row[1]})" if row else "nobody"

    def release(self, rotation_id: int, owner: str, token: int | None = None) -> None:
        """Give the lease up, if this claim still holds it."""
        with self.transaction(fenced=False) as db:
            db.execute("UPDATE rotations SET lease_owner = NULL, lease_until = NULL "
                       "WHERE id = ? AND lease_owner = ? AND lease_token = COALESCE(?, "
                       "lease_token)", [rotation_id, owner, token])

    def try_lock(self, name: str, owner: str, until: float, *,
                 is_stale: Callable[[str], bool] = holder_is_dead) -> bool:
        """A named lock across processes (scheduler slots, singleton jobs); a dead holder's
        lock is taken at once rather than after its lease."""
        with self.transaction() as db:
            row = db.execute("SELECT owner, until FROM locks WHERE name = ?"  # noqa: S608
                             + self.for_update, [name]).fetchone()
            if row is None:  # two first takers: the unique name lets one insert win
                return db.execute("INSERT INTO locks (name, owner, until) VALUES (?, ?, ?) "
                                  "ON CONFLICT (name) DO NOTHING",
                                  [name, owner, until]).rowcount == 1
            if row[0] != owner and row[1] > self.clock() and not is_stale(row[0]):
                return False
            db.execute("UPDATE locks SET owner = ?, until = ? WHERE name = ?",
                       [owner, until, name])
            return True

    def take_slot(self, resource: str, limit: int, rotation_id: int, owner: str, token: int,
                  *, is_stale: Callable[[str], bool] = holder_is_dead,
                  patience: float = 5.0) -> str | None:
        """One of `limit` slots of `resource` (a database host, an AWS account) for the
        rotation's claim (`owner`, `token`): the slot's name, or None when all are taken.

        A slot is held while the claim that took it still holds its rotation's lease: when
        the lease expires, is taken over, or its holder's process is gone, the slot is free
        again, so a crashed worker never keeps one. Across replicas: the slots are rows.
        Fair: a rotation that found the slots taken queues (a `queue:` row, first come first
        served); a free slot goes to those queued longer first, so rotations that come back
        often (short waits) cannot starve the others. A queued rotation that stopped asking
        for `patience` seconds (finished, cancelled) is forgotten.
        """
        names = [f"slot:{resource}#{i}" for i in range(limit)]
        queue = f"queue:{resource}#"
        mine = f"{rotation_id} {token} {owner}"
        now = self.clock()
        with self.transaction(fenced=False) as db:
            marks = ", ".join("?" for _ in names)
            held = dict(db.execute("SELECT name, owner FROM locks WHERE name IN ("  # noqa: S608
                                   + marks + ")" + self.for_update, names).fetchall())
            for name in names:
                if held.get(name) == mine:
                    return name
            db.execute("DELETE FROM locks WHERE substr(name, 1, ?) = ? AND until < ?",
                       [len(queue), queue, now - patience])
            waiting = sorted((float(first), name) for name, first in db.execute(
                "SELECT name, owner FROM locks WHERE substr(name, 1, ?) = ?",
                [len(queue), queue]).fetchall())
            me = queue + str(rotation_id)
            ahead = next((i for i, (_, name) in enumerate(waiting) if name == me), len(waiting))
            free = [name for name in names if name not in held
                    or not self._slot_alive(db, held[name], is_stale)]
            if len(free) > ahead:
                for name in free:
                    if name not in held:
                        taken = db.execute("INSERT INTO locks (name, owner, until) VALUES "
                                           "(?, ?, ?) ON CONFLICT (name) DO NOTHING",
                                           [name, mine, now]).rowcount == 1
                    else:
                        db.execute("UPDATE locks SET owner = ?, until = ? WHERE name = ?",
                                   [mine, now, name])
                        taken = True
                    if taken:
                        db.execute("DELETE FROM locks WHERE name = ?", [me])
                        return name
            db.execute("INSERT INTO locks (name, owner, until) VALUES (?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET until = excluded.until",
                       [me, repr(now), now])
        return None

    def _slot_alive(self, db: Db, holder: str, is_stale: Callable[[str], bool]) -> bool:
        rotation_id, token, owner = (holder.split(" ", 2) + ["", "", ""])[:3]
        if not rotation_id.isdigit() or not token.isdigit():
            return False
        row = db.execute("SELECT lease_owner, lease_until, lease_token FROM rotations "
                         "WHERE id = ?", [int(rotation_id)]).fetchone()
        return (row is not None and row[0] == owner and row[2] == int(token)
                and (row[1] or 0) > self.clock() and not is_stale(owner))

    def release_slots(self, rotation_id: int, owner: str, token: int) -> None:
        """Give back every slot this claim holds."""
        with self.transaction(fenced=False) as db:
            db.execute("DELETE FROM locks WHERE name LIKE 'slot:%' AND owner = ?",
                       [f"{rotation_id} {token} {owner}"])

    def prune_locks(self, prefix: str, expired_before: float) -> int:
        """Forget locks under `prefix` that expired before `expired_before`."""
        with self.transaction() as db:
            cursor = db.execute("DELETE FROM locks WHERE name LIKE ? AND until < ?",
                                [prefix.replace("%", "") + "%", expired_before])
            return cursor.rowcount

    # -- requests: what a person asked a waiting step for (Roll back, Reactivate) -----------

    def add_request(self, rotation_id: int, name: str, actor: str) -> str | None:
        """Record a request; returns who asked already if one is still open (nothing added).

        Call inside a transaction. Requests live apart from `rotations.data`, so a step
        that writes back its copy of `data` cannot lose one."""
        _guard({"name": name, "actor": actor})
        with self._session() as db:
            row = db.execute("SELECT actor FROM requests WHERE rotation_id = ? AND name = ? "
                             "AND consumed_at IS NULL", [rotation_id, name]).fetchone()
            if row:
                return str(row[0])
            self._insert(db, "requests", {"rotation_id": rotation_id, "name": name,
                                          "actor": actor, "at": self.clock()})
        return None

    def open_requests(self, rotation_id: int) -> dict[str, tuple[int, str, float]]:
        """Open requests of a rotation: name -> (request id, who asked, when)."""
        with self._session() as db:
            rows = db.execute("SELECT id, name, actor, at FROM requests "
                              "WHERE rotation_id = ? AND consumed_at IS NULL ORDER BY id",
                              [rotation_id]).fetchall()
        return {name: (int(i), actor, at) for i, name, actor, at in rows}

    def consume_request(self, rotation_id: int, name: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE requests SET consumed_at = ? WHERE rotation_id = ? AND name = ? "
                       "AND consumed_at IS NULL", [self.clock(), rotation_id, name])

    def get_kv(self, key: str) -> str | None:
        with self._session() as db:
            row = db.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_kv(self, key: str, value: str) -> None:
        _guard({key: value})
        with self.transaction() as db:
            db.execute("INSERT INTO kv (key, value) VALUES (?, ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", [key, value])

    # -- fleets ---------------------------------------------------------------------------

    def create_fleet(self, env: str, initiator: str, params: dict[str, Any],
                     plan: list[dict[str, Any]]) -> int:
        """Record a fleet's plan (status planned); nothing runs until it is confirmed."""
        row = {"env": env, "initiator": initiator, "params": json.dumps(params, sort_keys=True),
               "plan": json.dumps(plan, sort_keys=True), "status": "planned",
               "created_at": self.clock()}
        _guard(row)
        with self.transaction(fenced=False) as db:
            fleet_id = self._insert(db, "fleets", row)
            assert fleet_id is not None
            self.audit(None, "fleet-planned", initiator, to_status="planned",
                       detail=f"fleet #{fleet_id} in {env}: "
                              f"{sum(1 for p in plan if not p.get('skip'))} apps")
        return fleet_id

    def move_fleet(self, fleet_id: int, from_status: str, to_status: str, actor: str, *,
                   plan: list[dict[str, Any]] | None = None, confirmed: bool = False) -> bool:
        """Compare-and-set the fleet's status (a double click or two people: one wins)."""
        values: dict[str, Any] = {"status": to_status}
        if plan is not None:
            values["plan"] = json.dumps(plan, sort_keys=True)
        if confirmed:
            values["confirmed_by"], values["confirmed_at"] = actor, self.clock()
        _guard(values)
        sets = ", ".join(quote_identifier(k) + " = ?" for k in values)
        with self.transaction(fenced=False) as db:
            moved = db.execute("UPDATE fleets SET " + sets  # noqa: S608
                               + " WHERE id = ? AND status = ?",
                               [*values.values(), fleet_id, from_status]).rowcount == 1
            if moved:
                self.audit(None, f"fleet-{to_status}", actor, from_status=from_status,
                           to_status=to_status, detail=f"fleet #{fleet_id}")
        return moved

    def set_fleet_message(self, fleet_id: int, ref: str) -> None:
        """Where the fleet's one Slack message is (channel:ts)."""
        _guard({"ref": ref})
        with self._session() as db:
            db.execute("UPDATE fleets SET message_ref = ? WHERE id = ?", [ref, fleet_id])

    def fleet(self, fleet_id: int) -> FleetRow:
        with self._session() as db:
            row = db.execute("SELECT " + _FLEET_SELECT + " FROM fleets WHERE id = ?",  # noqa: S608
                             [fleet_id]).fetchone()
        if row is None:
            raise UnknownName(f"no fleet #{fleet_id}")
        values = dict(zip(_FLEET_FIELDS, row, strict=True))
        values["params"] = json.loads(values["params"])
        values["plan"] = json.loads(values["plan"])
        return FleetRow(**values)

    def fleets(self, limit: int = 5) -> list[FleetRow]:
        """The most recent fleets, newest first."""
        return [self.fleet(i) for i in
                self._ids("SELECT id FROM fleets ORDER BY id DESC LIMIT ?", [limit])]

    def fleet_ids(self, status: str) -> list[int]:
        """The fleets in `status`, oldest first."""
        return self._ids("SELECT id FROM fleets WHERE status = ? ORDER BY id", [status])

    def fleet_rotations(self, fleet_id: int) -> list[RotationRow]:
        return [self.rotation(i) for i in
                self._ids("SELECT id FROM rotations WHERE fleet_id = ? ORDER BY id", [fleet_id])]

    # -- reads ----------------------------------------------------------------------------

    def rotation(self, rotation_id: int) -> RotationRow:
        with self._snapshot() as db:
            row = db.execute(
                "SELECT " + _ROTATION_SELECT + " FROM rotations WHERE id = ?",  # noqa: S608
                [rotation_id]).fetchone()
            if row is None:
                raise UnknownName(f"no rotation #{rotation_id}")
            steps = db.execute(
                "SELECT " + _STEP_SELECT + " FROM steps "  # noqa: S608
                "WHERE rotation_id = ? ORDER BY position", [rotation_id]).fetchall()
        values = dict(zip(_ROTATION_FIELDS, row, strict=True))
        values["params"] = json.loads(values["params"])
        values["data"] = json.loads(values["data"])
        return RotationRow(**values, steps=tuple(
            StepRow(**dict(zip(_STEP_FIELDS, s, strict=True))) for s in steps))

    def _ids(self, query: str, args: list[Any]) -> list[int]:
        with self._session() as db:
            return [int(r[0]) for r in db.execute(query, args).fetchall()]

    def find_active(self, kind: str, target: str, env: str) -> RotationRow | None:
        ids = self._ids("SELECT id FROM rotations WHERE kind = ? AND target = ? AND env = ? "
                        "AND status = 'active'", [kind, target, env])
        return self.rotation(ids[0]) if ids else None

    def active(self) -> list[RotationRow]:
        return [self.rotation(i) for i in
                self._ids("SELECT id FROM rotations WHERE status = 'active' ORDER BY id", [])]

    def recent(self, limit: int = 20) -> list[RotationRow]:
        return [self.rotation(i) for i in
                self._ids("SELECT id FROM rotations ORDER BY id DESC LIMIT ?", [limit])]

    def latest_for(self, target: str, env: str) -> RotationRow | None:
        ids = self._ids("SELECT id FROM rotations WHERE target = ? AND env = ? "
                        "ORDER BY id DESC LIMIT 1", [target, env])
        return self.rotation(ids[0]) if ids else None

    def due(self, now: float) -> list[int]:
        return self._ids("SELECT id FROM rotations WHERE status = 'active' AND next_run_at "
                         "IS NOT NULL AND next_run_at <= ? ORDER BY next_run_at", [now])

    def next_due_at(self) -> float | None:
        with self._session() as db:
            row = db.execute("SELECT MIN(next_run_at) FROM rotations "
                             "WHERE status = 'active'").fetchone()
        return row[0] if row else None

    def last_audit_id(self) -> int:
        with self._session() as db:
            return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0])

    def audit_rows(self, rotation_id: int | None = None, after: int = 0,
                   limit: int = 1000) -> list[AuditRow]:
        query = ("SELECT id, rotation_id, step, event, from_status, to_status, actor, at, detail, "
                 "hash FROM audit WHERE id > ?")
        args: list[Any] = [after]
        if rotation_id is not None:
            query += " AND rotation_id = ?"
            args.append(rotation_id)
        with self._session() as db:
            rows = db.execute(query + " ORDER BY id LIMIT ?", [*args, limit]).fetchall()
        return [AuditRow(*r) for r in rows]

    # -- moving state (`rotor state copy`) ----------------------------------------------

    TABLES = ("fleets", "rotations", "steps", "audit", "requests", "locks", "kv")

    def is_empty(self) -> bool:
        with self._session() as db:
            return all(db.execute("SELECT COUNT(*) FROM " + quote_identifier(t)  # noqa: S608
                                  ).fetchone()[0] == 0 for t in self.TABLES)

    def table_rows(self, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Every row of one of TABLES, in key order: (column names, rows)."""
        if table not in self.TABLES:
            raise ValueError(f"no table {table!r}")
        with self._session() as db:
            columns = self._columns(db, table)
            rows = db.execute("SELECT " + _names(columns) + " FROM "  # noqa: S608
                              + quote_identifier(table) + " ORDER BY 1, 2").fetchall()
        return columns, [tuple(r) for r in rows]

    def _columns(self, db: Db, table: str) -> list[str]:
        raise NotImplementedError

    def _restart_ids(self, db: Db) -> None:
        """After rows were copied in with their ids, new rows get ids above them."""

    def copy_from(self, source: Store) -> dict[str, int]:
        """Copy every row of `source` into this empty store, ids and audit included."""
        counts: dict[str, int] = {}
        with self.transaction(fenced=False) as db:
            if not self.is_empty():
                raise RotorError(f"{self.describe()} is not empty; copy only into a new store")
            for table in self.TABLES:
                columns, rows = source.table_rows(table)
                mine = set(self._columns(db, table))
                keep = [c for c in columns if c in mine]
                for row in rows:
                    values = dict(zip(columns, row, strict=True))
                    self._insert(db, table, {c: values[c] for c in keep}, returning=False)
                counts[table] = len(rows)
            self._restart_ids(db)
        return counts

    def describe(self) -> str:
        """Where the store is, without a password."""
        return self.path


from rotation.store_sqlite import MIGRATIONS as MIGRATIONS  # noqa: E402
from rotation.store_sqlite import SQLiteStore as SQLiteStore  # noqa: E402
