"""The SQLite backend of the state store: one file, one connection, one lock.

The default, for one host: BEGIN IMMEDIATE serialises writers, so a claim is atomic without
row locks. Schema changes are numbered migrations; PRAGMA user_version counts those run.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rotation.store import Cursor, Db, Store

if TYPE_CHECKING:  # sqlite-utils loads on the first migration: reading (`rotor status`) is quick
    import sqlite_utils


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


def _m4_audit_chain(db: sqlite_utils.Database) -> None:
    """Each audit row carries a hash chained to the previous row's (rotation.audit_chain);
    rows written before stay unhashed."""
    db.execute("ALTER TABLE audit ADD COLUMN hash TEXT")


def _m5_fleets(db: sqlite_utils.Database) -> None:
    """A fleet (`rotor rotate --all ENV`) is a record of its own: the plan that was shown, who
    started and who confirmed it; its rotations point at it."""
    db.executescript(
        """
        CREATE TABLE fleets (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            env TEXT NOT NULL,
            initiator TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            plan TEXT NOT NULL DEFAULT '[]',
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            confirmed_by TEXT,
            confirmed_at REAL,
            message_ref TEXT
        );
        ALTER TABLE rotations ADD COLUMN fleet_id INTEGER REFERENCES fleets (id);
        CREATE INDEX rotations_fleet ON rotations (fleet_id);
        """
    )


# Numbered migrations: append, never edit. PRAGMA user_version records how many ran.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _m1_initial,
    _m2_bound_approvals,
    _m3_fencing_token,
    _m4_audit_chain,
    _m5_fleets,
]


class _Connection:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Iterable[Any] = ()) -> Cursor:
        return self.conn.execute(sql, list(args))


class SQLiteStore(Store):
    """The state DB in one SQLite file. Thread-safe: one connection, one lock."""

    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: str | Path, *, clock: Callable[[], float]) -> None:
        super().__init__(path, clock=clock)
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                               check_same_thread=False)
        self._sqlite = conn
        self._db: sqlite_utils.Database | None = None
        self._conn = _Connection(conn)
        self._lock = threading.RLock()
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    @property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils on the same connection, for migrations (made on first use)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self._sqlite, execute_plugins=False)
        return self._db

    @contextmanager
    def _connect(self) -> Iterator[Db]:
        with self._lock:
            yield self._conn

    @contextmanager
    def _begin(self) -> Iterator[Db]:
        """BEGIN IMMEDIATE so concurrent writers queue instead of failing half-way."""
        with self._lock:
            self._sqlite.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._sqlite.execute("ROLLBACK")
                raise
            else:
                self._sqlite.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[Db]:
        """One read transaction (WAL: a snapshot), so another process's or another Store's
        commit cannot land between a rotation's row and its steps."""
        if getattr(self._local, "db", None) is not None:
            with self._session() as db:
                yield db
            return
        with self._lock:
            self._sqlite.execute("BEGIN DEFERRED")
            try:
                yield self._conn
            finally:
                self._sqlite.execute("COMMIT")

    def migrate(self) -> int:
        """Run the migrations this file has not had yet; returns the schema version."""
        if self.version() == len(MIGRATIONS):
            return len(MIGRATIONS)  # up to date: nothing to write
        with self._begin():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(self.db)
                # PRAGMA takes no bound parameters; `number` is an int from enumerate.
                self.db.execute(f"PRAGMA user_version = {int(number)}")
            return len(MIGRATIONS)

    def version(self) -> int:
        with self._lock:
            return int(self._sqlite.execute("PRAGMA user_version").fetchone()[0])

    def ping(self) -> str | None:
        try:
            with self._lock:
                self._sqlite.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            return f"state DB: {exc}"
        return None

    def close(self) -> None:
        with self._lock:
            self._sqlite.close()

    def _columns(self, db: Db, table: str) -> list[str]:
        return [str(c[1]) for c in db.execute("SELECT * FROM pragma_table_info(?)",
                                             [table]).fetchall()]

    def dump(self) -> str:
        """Everything in the file as SQL text (tests look for secrets in it)."""
        with self._lock:
            return "\n".join(self._sqlite.iterdump())
