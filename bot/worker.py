"""The threads that do Rotor's work in `rotor serve`, outside Bolt's listener pool.

- `EngineWorker` advances rotations: it calls `engine.tick()`, then waits on an Event until
  the next rotation is due or something changed (the engine's `on_change` wakes it). It never
  sleeps holding state; a rotation's waits live in the state DB.
- `Jobs` runs what a click or command asked for (start, plan, approve, cancel...) so that
  listeners only ack and enqueue. Its errors end in the same place as Bolt's: `on_error`.
- `remind_and_expire` is the scheduler's approval job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from rotation.engine import Engine

log = logging.getLogger("rotor.worker")

Reply = Callable[[str], None]
ErrorHandler = Callable[[BaseException, Reply], None]


class EngineWorker:
    """One thread that runs every due rotation, woken early by any change."""

    def __init__(self, engine: Engine, *, idle: float = 15.0, after_error: float = 5.0,
                 name: str = "rotor-engine") -> None:
        self.engine = engine
        self.idle = idle  # re-read the DB this often anyway: other processes add rotations
        self.after_error = after_error
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self, rotation_id: int | None = None) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the running step finish (it releases its lease), then end the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        log.info("worker: started as %s", self.engine.worker_id)
        while not self._stop.is_set():
            self._wake.clear()  # before the tick, so a change during it is not lost
            try:
                delay = self.engine.tick()
            except Exception:  # the thread's boundary: log it and keep the engine running
                log.exception("worker: tick failed")
                delay = self.after_error
            self._wake.wait(self.idle if delay is None else min(delay, self.idle))
        log.info("worker: stopped")


class EnginePool:
    """A bounded pool of `EngineWorker`s, each with its own engine (so its own lease owner)
    and its own state DB connection: an engine shared by two threads is unsafe.

    The store hands out due work (`Store.claim_due`: FOR UPDATE SKIP LOCKED on PostgreSQL,
    BEGIN IMMEDIATE on SQLite), oldest due first, so two workers never run one rotation and
    no app waits for all the others. A hung database ties up the one worker that reached it,
    until its bounded timeout; the others keep going.
    """

    def __init__(self, engines: list[Engine], *, idle: float = 15.0,
                 after_error: float = 5.0) -> None:
        if not engines:
            raise ValueError("a pool needs at least one engine")
        owners = {engine.worker_id for engine in engines}
        if len(owners) != len(engines) or len({id(e.store) for e in engines}) != len(engines):
            raise ValueError("each worker needs its own engine and store")
        self.workers = [EngineWorker(engine, idle=idle, after_error=after_error,
                                     name=f"rotor-engine-{i}")
                        for i, engine in enumerate(engines)]

    @property
    def engines(self) -> list[Engine]:
        return [worker.engine for worker in self.workers]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def wake(self, rotation_id: int | None = None) -> None:
        for worker in self.workers:
            worker.wake(rotation_id)

    @property
    def alive(self) -> bool:
        return all(worker.alive for worker in self.workers)

    def stop(self, timeout: float = 30.0) -> None:
        """Tell every worker at once, then wait for each (their running steps finish)."""
        for worker in self.workers:
            worker._stop.set()
            worker._wake.set()
        for worker in self.workers:
            worker.stop(timeout)


class AcksFirst:
    """Counts Slack requests being answered, so queued jobs can let them go first.

    Python runs one thread at a time; a burst of commands whose jobs start at once would
    share the interpreter with their own acks and slow every ack down. Jobs wait until no
    request has been answered for `quiet` seconds (`patience` at most): the acks leave first,
    the work follows.
    """

    def __init__(self, quiet: float = 0.02, patience: float = 0.25) -> None:
        self.quiet = quiet
        self.patience = patience
        self._answering = 0
        self._last = 0.0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._answering += 1

    def __exit__(self, *exc: object) -> None:
        with self._idle:
            self._answering -= 1
            self._last = time.monotonic()
            if self._answering == 0:
                self._idle.notify_all()

    def wait(self) -> None:
        """Until no request was answered for `quiet` seconds, or `patience` seconds at most."""
        deadline = time.monotonic() + self.patience
        with self._idle:
            while (now := time.monotonic()) < deadline:
                calm_at = self._last + self.quiet
                if self._answering == 0 and now >= calm_at:
                    return
                self._idle.wait(min(deadline, calm_at if self._answering == 0 else deadline)
                                - now)


class Jobs:
    """A small pool for work that listeners enqueue; errors go to `on_error` with the reply."""

    def __init__(self, on_error: ErrorHandler, *, workers: int = 4,
                 acks: AcksFirst | None = None) -> None:
        self.on_error = on_error
        self.acks = acks or AcksFirst(quiet=0, patience=0)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rotor-job")

    def submit(self, name: str, work: Callable[[], None], reply: Reply) -> None:
        self._pool.submit(self._run, name, work, reply)

    def _run(self, name: str, work: Callable[[], None], reply: Reply) -> None:
        self.acks.wait()
        try:
            work()
        except Exception as exc:  # the job's boundary, like Bolt's app.error
            try:
                self.on_error(exc, reply)
            except Exception:
                log.exception("jobs: %s failed, and telling the person failed too", name)

    def stop(self) -> None:
        """Finish what is running; drop what has not started."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def remind_and_expire(engine: Engine, remind_after: float, expire_after: float,
                      reminded: Callable[[int], None]) -> None:
    """Remind once about approvals waiting `remind_after` seconds; pause those past expiry."""
    now = engine.clock()
    for rotation in engine.store.active():
        step = rotation.current
        if (step is not None and step.status == "needs-approval" and step.decision is None
                and step.expired_at is None and step.reminded_at is None
                and (step.gate_requested_at or now) <= now - remind_after
                and engine.mark_reminded(rotation.id, step.name)):
            log.info("approvals: #%s %s reminded", rotation.id, step.name)
            reminded(rotation.id)
    for rotation in engine.expire_approvals(older_than=now - expire_after):
        log.info("approvals: #%s approval expired; paused", rotation.id)
