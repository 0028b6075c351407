"""Rotor's state: rotations, their steps, the audit trail and a few locks, in SQLite.

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
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # sqlite-utils loads on the first write: reading (`rotor status`) is quick
    import sqlite_utils

from rotation import fence, redact
from rotation.errors import LeaseLost, RotationConflict, RotorError, UnknownName

ACTIVE = "active"
DONE = "done"
CANCELLED = "cancelled"

STEP_STATUSES = ("pending", "running", "waiting", "needs-approval", "done", "failed", "skipped")
FINISHED_STEP = ("done", "skipped")


class SecretInState(RotorError):
    """Refused to store text that contains a secret value."""


def _m1_initial(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE rotations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            target TEXT NOT NULL,
            env TEXT NOT NULL,
            status TEXT NOT NULL,
            initiator TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            data TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL,
            next_run_at REAL,
            lease_owner TEXT,
            lease_until REAL,
            cancel_requested_by TEXT
        );
        CREATE UNIQUE INDEX one_active_rotation ON rotations (kind, target, env)
            WHERE status = 'active';
        CREATE INDEX rotations_due ON rotations (status, next_run_at);

        CREATE TABLE steps (
            rotation_id INTEGER NOT NULL REFERENCES rotations (id),
            position INTEGER NOT NULL,
            name TEXT NOT NULL,
            title TEXT NOT NULL,
            destructive INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            started_at REAL,
            finished_at REAL,
            result TEXT,
            error TEXT,
            wait_reason TEXT,
            waiting_since REAL,
            next_check_at REAL,
            checks INTEGER NOT NULL DEFAULT 0,
            gate TEXT,
            gate_summary TEXT,
            gate_destructive INTEGER,
            gate_requested_at REAL,
            decision TEXT,
            decided_by TEXT,
            decided_at REAL,
            notice_at REAL,
            notice_ref TEXT,
            hold_until REAL,
            reminded_at REAL,
            expired_at REAL,
            PRIMARY KEY (rotation_id, position)
        );

        CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rotation_id INTEGER,
            step TEXT,
            event TEXT NOT NULL,
            from_status TEXT,
            to_status TEXT,
            actor TEXT NOT NULL,
            at REAL NOT NULL,
            detail TEXT
        );
        CREATE INDEX audit_rotation ON audit (rotation_id, id);
        CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
            BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
        CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
            BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;

        CREATE TABLE locks (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            until REAL NOT NULL
        );

        CREATE TABLE kv (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """
    )


def _m2_bound_approvals(db: sqlite_utils.Database) -> None:
    """Approvals bound to one exact action; requests (Roll back, Reactivate) in their own table,
    so a step writing back its `data` can never overwrite one."""
    db.executescript(
        """
        ALTER TABLE steps ADD COLUMN gate_digest TEXT;
        ALTER TABLE steps ADD COLUMN gate_four_eyes INTEGER;
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rotation_id INTEGER NOT NULL REFERENCES rotations (id),
            name TEXT NOT NULL,
            actor TEXT NOT NULL,
            at REAL NOT NULL,
            consumed_at REAL
        );
        CREATE UNIQUE INDEX one_open_request ON requests (rotation_id, name)
            WHERE consumed_at IS NULL;
        INSERT INTO requests (rotation_id, name, actor, at)
            SELECT r.id, j.key, j.value, r.updated_at
            FROM rotations r, json_each(r.data, '$._requests') j
            WHERE r.status = 'active';
        """
    )


def _m3_fencing_token(db: sqlite_utils.Database) -> None:
    """Every claim of a rotation's lease bumps its token; a worker's writes carry it."""
    db.execute("ALTER TABLE rotations ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0")


# Numbered migrations: append, never edit. PRAGMA user_version records how many ran.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _m1_initial,
    _m2_bound_approvals,
    _m3_fencing_token,
]


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


_STEP_FIELDS = [f.name for f in fields(StepRow)]
_ROTATION_FIELDS = [f.name for f in fields(RotationRow) if f.name != "steps"]


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
    boot = (_read("/proc/sys/kernel/random/boot_id") or "-")[:13]
    start = _start_time(os.getpid()) or "-"
    return (f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:"
            f"{boot}.{_pid_namespace()}.{start}")


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
    mine = process_identity().split(":")[3].split(".")
    if "-" in (boot, namespace, started) or [boot, namespace] != mine[:2]:
        return False
    return _start_time(int(parts[1])) != started


class Store:
    """The state DB. Thread-safe: one connection, one lock, short transactions."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float]) -> None:
        self.path = str(path)
        self.clock = clock
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                               check_same_thread=False)
        self._conn = conn
        self._db: sqlite_utils.Database | None = None
        self._lock = threading.RLock()
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    @property
    def db(self) -> sqlite_utils.Database:
        """The connection through sqlite-utils, made on first use."""
        with self._lock:
            if self._db is None:
                import sqlite_utils

                self._db = sqlite_utils.Database(self._conn, execute_plugins=False)
            return self._db

    def migrate(self) -> int:
        """Run the migrations this file has not had yet; returns the schema version."""
        if self._conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
            return len(MIGRATIONS)  # up to date: nothing to write
        with self.transaction():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(self.db)
                # PRAGMA takes no bound parameters; `number` is an int from enumerate.
                self.db.execute(f"PRAGMA user_version = {int(number)}")
            return len(MIGRATIONS)

    @contextmanager
    def transaction(self, *, fenced: bool = True) -> Iterator[sqlite_utils.Database]:
        """BEGIN IMMEDIATE so concurrent writers queue instead of failing half-way.

        A worker that holds a rotation's lease (`rotation.fence`) writes only while its
        fencing token is still the rotation's: the first statement compare-and-sets it, and
        the transaction rolls back with LeaseLost when another worker has claimed since.
        BEGIN IMMEDIATE holds the write lock from there to COMMIT, so no claim can slip in.
        """
        lease = fence.current() if fenced else None
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if lease is not None and self.db.execute(
                        "UPDATE rotations SET lease_token = lease_token WHERE id = ? "
                        "AND lease_owner = ? AND lease_token = ?",
                        [lease.rotation_id, lease.owner, lease.token]).rowcount != 1:
                    raise LeaseLost(f"rotation #{lease.rotation_id}: lease lost; "
                                    "nothing written")
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            else:
                self.db.execute("COMMIT")

    # -- writes ---------------------------------------------------------------------------

    def audit(self, rotation_id: int | None, event: str, actor: str, *, step: str | None = None,
              from_status: str | None = None, to_status: str | None = None,
              detail: str | None = None) -> None:
        """Append one audit row; call inside the transaction that made the change."""
        row = {"rotation_id": rotation_id, "step": step, "event": event,
               "from_status": from_status, "to_status": to_status, "actor": actor,
               "at": self.clock(), "detail": detail}
        _guard(row)
        self.db.table("audit").insert(row)

    def create_rotation(self, kind: str, target: str, env: str, initiator: str,
                        params: dict[str, Any], steps: list[tuple[str, str, bool]]) -> int:
        now = self.clock()
        _guard({"params": params})
        row = {"kind": kind, "target": target, "env": env, "status": ACTIVE,
               "initiator": initiator, "params": json.dumps(params, sort_keys=True),
               "data": "{}", "created_at": now, "updated_at": now, "next_run_at": now}
        _guard(row)
        with self.transaction() as db:
            try:
                rotation_id = db.table("rotations").insert(row).last_pk
            except sqlite3.IntegrityError:
                active = self.find_active(kind, target, env)
                raise RotationConflict(
                    f"{target} in {env} already has an active rotation"
                    f"{f' (#{active.id}, started by {active.initiator})' if active else ''}"
                ) from None
            assert isinstance(rotation_id, int)
            db.table("steps").insert_all(
                {"rotation_id": rotation_id, "position": i, "name": name, "title": title,
                 "destructive": int(destructive)}
                for i, (name, title, destructive) in enumerate(steps))
            self.audit(rotation_id, "started", initiator, to_status=ACTIVE,
                       detail=f"{kind} rotation of {target} in {env}")
        return rotation_id

    def update_rotation(self, rotation_id: int, **values: Any) -> None:
        _guard(values)
        if "data" in values:
            values["data"] = json.dumps(values["data"], sort_keys=True)
            _guard({"data": values["data"]})
        values["updated_at"] = self.clock()
        self.db.table("rotations").update(rotation_id, values)

    def update_step(self, rotation_id: int, position: int, *, expect: dict[str, Any] | None = None,
                    **values: Any) -> bool:
        """Update one step; with `expect`, only if its columns still hold those values (CAS)."""
        _guard(values)
        unknown = (set(values) | set(expect or {})) - set(_STEP_FIELDS)
        if unknown:
            raise ValueError(f"steps has no column {sorted(unknown)}")
        # Column names are checked against StepRow above and quoted by sqlite-utils.
        from sqlite_utils.db import quote_identifier

        sets = ", ".join(f"{quote_identifier(k)} = ?" for k in values)
        where = "rotation_id = ? AND position = ?"
        args: list[Any] = [*values.values(), rotation_id, position]
        for key, value in (expect or {}).items():
            if value is None:
                where += f" AND {quote_identifier(key)} IS NULL"
            else:
                where += f" AND {quote_identifier(key)} = ?"
                args.append(value)
        cursor = self.db.execute(f"UPDATE steps SET {sets} WHERE {where}", args)  # noqa: S608
        return cursor.rowcount == 1

    def claim(self, rotation_id: int, owner: str, until: float, *,
              is_stale: Callable[[str], bool] = holder_is_dead) -> int | None:
        """Take the rotation's lease if it is free, expired, or held by a dead process.

        Returns the new fencing token (bumped at every claim), or None. A live lease is
        never taken, not even by its own owner: one engine's two threads must not both run
        a rotation (a cancel clicked while the worker runs leaves it to the worker).
        """
        with self.transaction(fenced=False) as db:
            row = db.execute("SELECT lease_owner, lease_until, lease_token FROM rotations "
                             "WHERE id = ?", [rotation_id]).fetchone()
            if row is None:
                return None
            holder, held_until, token = row
            if holder and held_until > self.clock() and not is_stale(holder):
                return None
            db.execute("UPDATE rotations SET lease_owner = ?, lease_until = ?, "
                       "lease_token = ? WHERE id = ?", [owner, until, token + 1, rotation_id])
            return int(token + 1)

    def renew(self, rotation_id: int, owner: str, token: int, until: float) -> bool:
        """Extend a lease, compare-and-set: only while `owner` still holds `token`."""
        with self.transaction(fenced=False) as db:
            return db.execute("UPDATE rotations SET lease_until = ? WHERE id = ? "
                              "AND lease_owner = ? AND lease_token = ?",
                              [until, rotation_id, owner, token]).rowcount == 1

    def lease_holder(self, rotation_id: int) -> str:
        """Who holds the rotation's lease now, and with which token (for log lines)."""
        with self._lock:
            row = self.db.execute("SELECT lease_owner, lease_token FROM rotations WHERE id = ?",
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
            row = db.execute("SELECT owner, until FROM locks WHERE name = ?", [name]).fetchone()
            if row and row[0] != owner and row[1] > self.clock() and not is_stale(row[0]):
                return False
            db.execute("INSERT OR REPLACE INTO locks (name, owner, until) VALUES (?, ?, ?)",
                       [name, owner, until])
            return True

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
        row = self.db.execute("SELECT actor FROM requests WHERE rotation_id = ? AND name = ? "
                              "AND consumed_at IS NULL", [rotation_id, name]).fetchone()
        if row:
            return str(row[0])
        self.db.table("requests").insert({"rotation_id": rotation_id, "name": name,
                                          "actor": actor, "at": self.clock()})
        return None

    def open_requests(self, rotation_id: int) -> dict[str, tuple[int, str, float]]:
        """Open requests of a rotation: name -> (request id, who asked, when)."""
        with self._lock:
            rows = self.db.execute("SELECT id, name, actor, at FROM requests "
                                   "WHERE rotation_id = ? AND consumed_at IS NULL ORDER BY id",
                                   [rotation_id]).fetchall()
        return {name: (int(i), actor, at) for i, name, actor, at in rows}

    def consume_request(self, rotation_id: int, name: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE requests SET consumed_at = ? WHERE rotation_id = ? AND name = ? "
                       "AND consumed_at IS NULL", [self.clock(), rotation_id, name])

    def get_kv(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_kv(self, key: str, value: str) -> None:
        _guard({key: value})
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", [key, value])

    # -- reads ----------------------------------------------------------------------------

    def rotation(self, rotation_id: int) -> RotationRow:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join(_ROTATION_FIELDS)} FROM rotations WHERE id = ?",  # noqa: S608
                [rotation_id]).fetchone()
            if row is None:
                raise UnknownName(f"no rotation #{rotation_id}")
            steps = self._conn.execute(
                f"SELECT {', '.join(_STEP_FIELDS)} FROM steps "  # noqa: S608
                "WHERE rotation_id = ? ORDER BY position", [rotation_id]).fetchall()
        values = dict(zip(_ROTATION_FIELDS, row, strict=True))
        values["params"] = json.loads(values["params"])
        values["data"] = json.loads(values["data"])
        return RotationRow(**values, steps=tuple(
            StepRow(**dict(zip(_STEP_FIELDS, s, strict=True))) for s in steps))

    def _ids(self, query: str, args: list[Any]) -> list[int]:
        with self._lock:
            return [r[0] for r in self._conn.execute(query, args).fetchall()]

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
        with self._lock:
            row = self.db.execute("SELECT MIN(next_run_at) FROM rotations "
                                  "WHERE status = 'active'").fetchone()
        return row[0] if row else None

    def audit_rows(self, rotation_id: int | None = None, after: int = 0,
                   limit: int = 1000) -> list[AuditRow]:
        query = ("SELECT id, rotation_id, step, event, from_status, to_status, actor, at, detail "
                 "FROM audit WHERE id > ?")
        args: list[Any] = [after]
        if rotation_id is not None:
            query += " AND rotation_id = ?"
            args.append(rotation_id)
        with self._lock:
            rows = self.db.execute(query + " ORDER BY id LIMIT ?", [*args, limit]).fetchall()
        return [AuditRow(*r) for r in rows]
