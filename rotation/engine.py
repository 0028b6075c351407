"""The rotation engine: a persisted state machine that runs a kind's steps in order.

A step is a small function. It checks whether its work is already done before acting, so
running it twice is harmless; that is what makes a crash at any point resumable: the next
process re-runs the step that was running. A step returns `Done`, `Skipped` or `Wait`, or
asks for approval through `ctx.approve(...)`. Waits are persisted with their start time and
re-checked with backoff; no thread sleeps holding state.

The engine does no I/O of its own beyond the store: clients for AWS, Kubernetes and the
databases come in through `clients`, and 2nd line is told through a `SecondLine` notifier.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Protocol

from rotation import fence, readcache, redact, timeouts
from rotation.catalogue import Catalogue
from rotation.errors import (
    InvalidTransition,
    LeaseLost,
    NotAllowed,
    NoticePending,
    RotorError,
    StepFailed,
    UnknownName,
)
from rotation.explain import explain
from rotation.facts import Facts, digest
from rotation.policy import person
from rotation.store import (
    ACTIVE,
    CANCELLED,
    DONE,
    SYSTEM,
    RotationRow,
    SecretInState,
    StepRow,
    Store,
    holder_is_dead,
    is_this_process,
    process_identity,
)

log = logging.getLogger("rotor.engine")

LEASE_SECONDS = timeouts.LEASE_SECONDS
SLOT_RETRY = 0.5  # seconds before a rotation that found its host or account full is tried again
CANCEL_RECHECK = 0.05  # seconds between looks at a lease another engine of this process holds
HOLD_ATTEMPTS = 5  # a hold that loses its compare-and-set reads again this often
GUIDE = "guide:"  # gates whose key starts with this are guided steps: a person clicks "Done"
NOTICE_WAIT = "the 2nd line notice to be posted"
NOTICE_RECHECK = 5.0  # seconds; posting the notice wakes the step sooner (`Engine.recheck`)


# -- what steps return -------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """The step's work is done; `result` is a short, non-secret line for the thread."""

    result: str = ""


@dataclass(frozen=True)
class Skipped:
    """The step had nothing to do."""

    reason: str


@dataclass(frozen=True)
class Wait:
    """Not yet: re-check later with backoff (or at `check_at`); fail after `timeout` seconds."""

    reason: str
    timeout: float
    check_at: float | None = None


Outcome = Done | Skipped | Wait


class _NeedsApproval(Exception):
    """Control flow: the step asked for a decision it does not have yet."""

    def __init__(self, gate: str, summary: str, destructive: bool, digest: str | None = None,
                 four_eyes: bool = False) -> None:
        super().__init__(summary)
        self.gate, self.summary, self.destructive = gate, summary, destructive
        self.digest, self.four_eyes = digest, four_eyes


class _Pause(Exception):
    """Control flow: the gate is approved but must wait (2nd line notice, hold period)."""

    def __init__(self, reason: str, until: float, event: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.until = reason, until
        self.event, self.detail = event, detail  # the audit row when the wait begins


@dataclass(frozen=True)
class Step:
    """One runbook step: `run(ctx)` does it, idempotently."""

    name: str
    title: str
    run: Callable[[Context], Outcome]
    destructive: bool = False
    # Requests (`Engine.request`) this step honours while it waits, e.g. ("rollback",):
    # the bot shows a button for each.
    offers: tuple[str, ...] = ()


class Kind(Protocol):
    """A rotation kind: the ordered steps of one runbook, and how to cancel it safely."""

    name: str

    def validate(self, catalogue: Catalogue, target: str, env: str,
                 params: Mapping[str, Any]) -> None:
        """Raise a RotorError when this rotation must not start (bad names, config)."""

    def steps(self, catalogue: Catalogue, target: str, env: str,
              params: Mapping[str, Any]) -> list[Step]:
        """The steps, in order, fixed when the rotation starts."""

    def cancel(self, ctx: Context) -> str:
        """Leave the app on credentials that work; return what was done."""


class SecondLine(Protocol):
    """Tells 2nd line what is about to happen; returns where the notice went."""

    def notify(self, rotation: RotationRow, step: StepRow, summary: str,
               approved_by: str) -> str: ...


# -- the context a step runs in ----------------------------------------------------------


@dataclass
class Context:
    """What a running step can see and do."""

    engine: Engine
    rotation: RotationRow
    step: StepRow
    data: dict[str, Any]
    clients: Any
    log: logging.LoggerAdapter[logging.Logger] = field(init=False)
    dry_run: bool = False

    # Set when a destructive approval was used in this run: it is spent once acted on.
    used_destructive: bool = field(default=False, init=False)
    # Requests recorded before this run began (ids); a newer one makes a wait re-check at once.
    requests_seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.log = _StepLog(log, {"step": self.step.name, "rotation": self.rotation.id})
        if not self.dry_run:
            opened = self.engine.store.open_requests(self.rotation.id)
            self.requests_seen = max((i for i, _, _ in opened.values()), default=0)

    @property
    def catalogue(self) -> Catalogue:
        return self.engine.catalogue

    @property
    def target(self) -> str:
        return self.rotation.target

    @property
    def env(self) -> str:
        return self.rotation.env

    @property
    def params(self) -> dict[str, Any]:
        return self.rotation.params

    def now(self) -> float:
        return self.engine.clock()

    def today(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)

    @property
    def waited(self) -> float:
        """Seconds since this step began waiting (0 when it is not waiting)."""
        since = self.step.waiting_since
        return 0.0 if since is None else self.now() - since

    def save(self) -> None:
        """Persist `data` now, before an action whose effect must be found again on resume."""
        if not self.dry_run:
            self.engine._save_data(self.rotation.id, self.data)

    def approve(self, summary: str, *, gate: str = "approval",
                destructive: bool | None = None, binds: Any = None,
                four_eyes: bool = False) -> None:
        """Return when a person approved `gate`; otherwise ask (and stop the step here).

        With `binds` (what the action would do: users@hosts, IDs, digests), the approval
        covers exactly that: a digest of it is stored with the request, and if it differs
        now, the approval is asked for again. `four_eyes` demands an approver other than the
        starter in any environment. Destructive gates in environments that notify 2nd line
        also post the notice first, and honour the hold period, before returning.
        """
        is_destructive = bool(self.step.destructive) if destructive is None else destructive
        where = (self.rotation.kind, self.target, self.env)
        bound = None if binds is None else digest(gate, where, binds)
        if self.dry_run:
            raise _NeedsApproval(gate, summary, is_destructive, bound, four_eyes)
        step = self.step
        if not (step.approved and step.gate == gate):
            raise _NeedsApproval(gate, summary, is_destructive, bound, four_eyes)
        if bound is not None and step.gate_digest != bound:
            raise _NeedsApproval(gate, "What would be done changed since the approval; "
                                 f"asking again. {summary}", is_destructive, bound, four_eyes)
        if is_destructive and self.catalogue.notify_second_line(self.env):
            self.engine._second_line_notice(self, summary)
            if not (self.step.approved and self.step.decided_at == step.decided_at):
                # Held while 2nd line was being told (Engine.hold): this approval is gone.
                raise _NeedsApproval(gate, summary, is_destructive, bound, four_eyes)
        if is_destructive:
            self.used_destructive = True

    def act(self, gate: str, read: Callable[[], Facts], describe: Callable[[Facts], str], *,
            destructive: bool | None = None, four_eyes: bool = False) -> Facts:
        """The approval of one exact destructive action, on preconditions read from the world.

        `read()` re-reads the facts the action relies on; a `refused` reason fails the step
        before anything changes. The approval text is `describe(facts)`, and the approval is
        bound to `facts.seen`. After the gate (2nd line notice, hold period) the facts are
        read once more, immediately before acting: refused, the step fails; changed, the
        approval is asked for again. Returns the facts just read, for the action to use.
        """
        with readcache.fresh():  # facts come from the world, never from this advance's reads
            facts = read()
        if facts.refused:
            raise StepFailed(facts.refused)
        self.approve(describe(facts), gate=gate, destructive=destructive, binds=facts.seen,
                     four_eyes=four_eyes)
        with readcache.fresh():
            now = read()
        if now.refused:
            raise StepFailed(now.refused)
        if now.seen != facts.seen:
            self.approve(describe(now), gate=gate, destructive=destructive, binds=now.seen,
                         four_eyes=four_eyes)
        return now


    def guide(self, instruction: str, *, gate: str = "done") -> str:
        """A guided step: post the exact instruction, return once a person clicked "Done".

        Returns who did it. Four-eyes does not apply: the person doing the work says so.
        """
        key = GUIDE + gate
        if self.dry_run or not (self.step.approved and self.step.gate == key):
            raise _NeedsApproval(key, instruction, False)
        return self.step.decided_by or "?"

    def consume(self, name: str) -> None:
        """Close an honoured request, so the same button works again later."""
        if not self.dry_run:
            self.engine.store.consume_request(self.rotation.id, name)

    def requested(self, name: str) -> str | None:
        """Who asked for `name` (e.g. "rollback") through `Engine.request`, if anyone.

        Requests live in their own table, not in `data`: one made while this step runs is
        never lost when the step writes back its data."""
        if self.dry_run:
            return None
        found = self.engine.store.open_requests(self.rotation.id).get(name)
        return found[1] if found else None


class _StepLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        # As fields too, for ROTOR_LOG_FORMAT=json.
        kwargs["extra"] = {"rotation_id": extra.get("rotation"), "step": extra.get("step"),
                           **kwargs.get("extra", {})}
        return f"{extra.get('step')}: #{extra.get('rotation')} {msg}", kwargs


# -- the engine --------------------------------------------------------------------------


# Clearing these makes a destructive gate ask again, and tell 2nd line again.
_SPENT: dict[str, Any] = {"decision": None, "decided_by": None, "decided_at": None,
                          "notice_at": None, "notice_ref": None, "hold_until": None}


def _scratch_step(step: Step, now: float) -> StepRow:
    """A step row that lives only in memory, for dry runs."""
    values: dict[str, Any] = {f.name: None for f in fields(StepRow)}
    values.update(rotation_id=0, position=0, name=step.name, title=step.title,
                  destructive=int(step.destructive), status="running", attempts=1, checks=0,
                  started_at=now)
    return StepRow(**values)


class Engine:
    """Starts rotations, advances them step by step, and records every decision."""

    def __init__(self, store: Store, catalogue: Catalogue, kinds: Mapping[str, Kind],
                 clients: Any, *, second_line: SecondLine | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.store = store
        self.catalogue = catalogue
        self.kinds = dict(kinds)
        self.clients = clients
        self.second_line = second_line
        self.clock = clock or store.clock
        self.worker_id = process_identity()
        # At most this many rotations at once per database host and per AWS account, across
        # every worker and replica (None: no limit). Set from ROTOR_PER_HOST, ROTOR_PER_ACCOUNT.
        self.per_host: int | None = None
        self.per_account: int | None = None
        self._hosts: dict[tuple[str, str], str] = {}
        # The lease is renewed this often while a step runs (None: only at side effects).
        self.heartbeat: float | None = timeouts.HEARTBEAT_SECONDS
        timeouts.check(timeouts.BOUNDS, LEASE_SECONDS, timeouts.HEARTBEAT_SECONDS)
        self.on_change: Callable[[int], None] = lambda rotation_id: None
        self._released = threading.Condition()  # notified whenever this engine lets a lease go

    # -- starting ---------------------------------------------------------------------

    def kind(self, name: str) -> Kind:
        try:
            return self.kinds[name]
        except KeyError:
            raise UnknownName(f"unknown rotation kind {name!r}") from None

    def start(self, kind_name: str, target: str, env: str, initiator: str,
              params: Mapping[str, Any] | None = None, *,
              fleet_id: int | None = None) -> RotationRow:
        """Create the rotation and its steps; the worker picks it up from there."""
        params = dict(params or {})
        kind = self.kind(kind_name)
        self.catalogue.environment(env)
        kind.validate(self.catalogue, target, env, params)
        steps = kind.steps(self.catalogue, target, env, params)
        rotation_id = self.store.create_rotation(
            kind_name, target, env, initiator, params,
            [(s.name, s.title, s.destructive) for s in steps], fleet_id=fleet_id)
        log.info("start: #%s %s rotation of %s in %s by %s", rotation_id, kind_name, target,
                 env, initiator)
        self.on_change(rotation_id)
        return self.store.rotation(rotation_id)

    def plan(self, kind_name: str, target: str, env: str,
             params: Mapping[str, Any] | None = None) -> tuple[list[Step], str]:
        """The steps, and what the first (read-only preflight) step finds. Changes nothing."""
        params = dict(params or {})
        kind = self.kind(kind_name)
        self.catalogue.environment(env)
        kind.validate(self.catalogue, target, env, params)
        steps = kind.steps(self.catalogue, target, env, params)
        now = self.clock()
        rotation = RotationRow(id=0, kind=kind_name, target=target, env=env, status=ACTIVE,
                               initiator="plan", params=params, data={}, created_at=now,
                               updated_at=now, finished_at=None, next_run_at=None,
                               lease_owner=None, lease_until=None, cancel_requested_by=None)
        ctx = Context(self, rotation, _scratch_step(steps[0], now), {}, self.clients,
                      dry_run=True)
        outcome = steps[0].run(ctx)
        found = outcome.result if isinstance(outcome, Done) else getattr(outcome, "reason", "")
        return steps, found

    # -- running ----------------------------------------------------------------------

    def tick(self) -> float | None:
        """Advance every rotation that is due; return seconds until the next one is."""
        ran: set[int] = set()
        while claimed := self.store.claim_due(self.clock(), self.worker_id,
                                              self.clock() + LEASE_SECONDS, skip=ran,
                                              is_stale=holder_is_dead):
            ran.add(claimed[0])
            self._advance_claimed(*claimed)
        next_at = self.store.next_due_at()
        return None if next_at is None else max(0.0, next_at - self.clock())

    def advance(self, rotation_id: int) -> RotationRow:
        """Run the rotation's steps as far as they go now. Safe to call from any process."""
        token = self.store.claim(rotation_id, self.worker_id, self.clock() + LEASE_SECONDS,
                                 is_stale=holder_is_dead)
        if token is None:
            return self.store.rotation(rotation_id)
        return self._advance_claimed(rotation_id, token)

    def _advance_claimed(self, rotation_id: int, token: int) -> RotationRow:
        lease = fence.Lease(self.store, rotation_id, self.worker_id, token,
                            seconds=LEASE_SECONDS, clock=self.clock)
        try:
            with lease.held(), readcache.per_advance():
                full = self._take_slots(rotation_id, token)
                if full is not None:
                    return self._later(rotation_id, full)
                return self._advance(rotation_id, lease)
        except LeaseLost as exc:
            # Another worker has the rotation now; what this one had not done stays undone.
            log.warning("advance: #%s %s", rotation_id, exc)
            return self.store.rotation(rotation_id)
        finally:
            if self.per_host or self.per_account:
                self.store.release_slots(rotation_id, self.worker_id, token)
            self.store.release(rotation_id, self.worker_id, token)
            with self._released:
                self._released.notify_all()

    def _resources(self, rotation: RotationRow) -> list[tuple[str, int]]:
        """The limited resources this rotation uses: its database host, its AWS account."""
        found: list[tuple[str, int]] = []
        if self.per_account:
            arn = self.catalogue.environment(rotation.env).aws_role_arn
            found.append((f"account:{arn.split(':')[4] if arn else 'default'}",
                          self.per_account))
        kind = self.kind(rotation.kind)
        db_host = getattr(kind, "db_host", None)
        if self.per_host and db_host is not None:
            where = (rotation.target, rotation.env)
            if where not in self._hosts:  # an instance does not move: asked once an engine
                self._hosts[where] = db_host(self.catalogue, self.clients, *where)
            found.append((f"host:{self._hosts[where]}", self.per_host))
        return found

    def _take_slots(self, rotation_id: int, token: int) -> str | None:
        """Take a slot of every limited resource the rotation uses; None when all were
        taken, else which resource is full (the slots taken are given back at once)."""
        if not (self.per_host or self.per_account):
            return None
        rotation = self.store.rotation(rotation_id)
        if rotation.status != ACTIVE:
            return None
        try:
            resources = self._resources(rotation)
        except Exception as exc:  # the step's own read fails with the reason
            # (this advance's cache keeps the failure: the step does not wait on it again)
            log.warning("limits: #%s database host unknown (%s); running without its limit",
                        rotation_id, redact.redact(type(exc).__name__))
            return None
        for resource, limit in resources:
            if self.store.take_slot(resource, limit, rotation_id, self.worker_id, token,
                                    is_stale=holder_is_dead) is None:
                self.store.release_slots(rotation_id, self.worker_id, token)
                return resource
        return None

    def _later(self, rotation_id: int, resource: str) -> RotationRow:
        """The rotation's host or account is full: look again soon, holding no worker."""
        log.info("limits: #%s waits for a slot of %s", rotation_id, resource)
        with self.store.transaction():
            self.store.update_rotation(rotation_id, next_run_at=self.clock() + SLOT_RETRY)
        return self.store.rotation(rotation_id)

    def _advance(self, rotation_id: int, lease: fence.Lease) -> RotationRow:
        while True:
            rotation = self.store.rotation(rotation_id)
            if rotation.status != ACTIVE:
                return rotation
            if rotation.cancel_requested_by:
                lease.step = "cancel"
                lease.beat(self.heartbeat)
                self._cancel_now(rotation)
                continue
            step = rotation.current
            if step is None:
                self._finish(rotation)
                continue
            if not self._runnable(step):
                self._schedule(rotation)
                return self.store.rotation(rotation_id)
            lease.step = step.name
            lease.beat(self.heartbeat)
            self._run_step(rotation, step)

    def _runnable(self, step: StepRow) -> bool:
        if step.status in ("pending", "running"):
            return True
        if step.status == "waiting":
            return (step.next_check_at or 0) <= self.clock()
        return False

    def _schedule(self, rotation: RotationRow) -> None:
        """Record when the worker should look at this rotation next (None: a person must).

        Compare-and-set against the step as `rotation` shows it: a decision made since it
        was read (an approval, a retry, a request, a cancel) set its own wake-up, and a
        stale read must never overwrite it. When the step moved, look again at once.
        """
        step = rotation.current
        if step is None:
            return
        next_run = step.next_check_at if step.status == "waiting" else None
        with self.store.transaction():
            if not self.store.schedule(rotation.id, next_run, position=step.position,
                                       status=step.status, next_check_at=step.next_check_at):
                self.store.update_rotation(rotation.id, next_run_at=self.clock())

    def _run_step(self, rotation: RotationRow, step: StepRow) -> None:
        kind = self.kind(rotation.kind)
        definition = self._definition(kind, rotation, step)
        if step.status != "waiting":
            with self.store.transaction():
                self.store.update_step(rotation.id, step.position, status="running",
                                       attempts=step.attempts + 1,
                                       started_at=step.started_at or self.clock())
                if step.status != "running":
                    self.store.audit(rotation.id, "step", SYSTEM, step=step.name,
                                     from_status=step.status, to_status="running")
                else:
                    self.store.audit(rotation.id, "resumed", SYSTEM, step=step.name,
                                     from_status="running", to_status="running",
                                     detail=f"attempt {step.attempts + 1}")
            rotation = self.store.rotation(rotation.id)
            step = rotation.step(step.position)
        ctx = Context(self, rotation, step, dict(rotation.data), self.clients)
        try:
            self._run_definition(ctx, definition)
        except SecretInState as exc:
            ctx.data = dict(rotation.data)  # drop what the step added; keep the last good state
            self._fail(ctx, str(exc))
        self.on_change(rotation.id)

    def _run_definition(self, ctx: Context, definition: Step) -> None:
        try:
            outcome = definition.run(ctx)
        except LeaseLost:
            raise  # another worker has the rotation: write nothing, not even the failure
        except _NeedsApproval as need:
            self._ask(ctx, need)
        except _Pause as pause:  # an approved gate waits: unless a Hold cleared it meanwhile
            self._wait(ctx, pause.reason, until=pause.until, event=pause.event,
                       detail=pause.detail, expect={"decision": ctx.step.decision,
                                                    "decided_at": ctx.step.decided_at})
        except RotorError as exc:
            self._fail(ctx, explain(exc, ctx.env) or str(exc))
        except Exception as exc:
            expected = explain(exc, ctx.env)  # missing credentials, AWS refusals: one line
            if expected:
                ctx.log.debug("%s", type(exc).__name__, exc_info=True)
                self._fail(ctx, expected)
                return
            # A bug or an unexpected client error: keep the trace in the log, not the thread.
            ctx.log.exception("unexpected %s", type(exc).__name__)
            self._fail(ctx, f"{type(exc).__name__}: {exc}")
        else:
            if isinstance(outcome, Wait):
                if ctx.waited > outcome.timeout:
                    self._fail(ctx, f"timed out after {int(outcome.timeout)}s waiting for "
                                    f"{outcome.reason}")
                else:
                    self._wait(ctx, outcome.reason, until=outcome.check_at)
            else:
                self._complete(ctx, outcome)

    def _definition(self, kind: Kind, rotation: RotationRow, step: StepRow) -> Step:
        steps = kind.steps(self.catalogue, rotation.target, rotation.env, rotation.params)
        for definition in steps:
            if definition.name == step.name:
                return definition
        raise InvalidTransition(f"rotation #{rotation.id}: step {step.name!r} no longer exists "
                                f"in kind {rotation.kind!r}")

    def _save_data(self, rotation_id: int, data: dict[str, Any]) -> None:
        with self.store.transaction():
            self.store.update_rotation(rotation_id, data=data)

    def _transition(self, ctx: Context, to_status: str, *, event: str = "step",
                    detail: str | None = None, actor: str = SYSTEM,
                    expect: dict[str, Any] | None = None, **values: Any) -> None:
        """Record the step's new status. With `expect`, only if the step still holds those
        values (compare-and-set): otherwise what changed it meanwhile stands, and nothing of
        this run is recorded (its step runs again, and checks before acting)."""
        with self.store.transaction():
            if to_status == "waiting" and any(
                    i > ctx.requests_seen
                    for i, _, _ in self.store.open_requests(ctx.rotation.id).values()):
                # Asked for while this check ran (Roll back, Reactivate): look at it at once.
                # Read inside the write transaction, so a request is either seen here or
                # sets the re-check itself after this commits.
                values["next_check_at"] = self.clock()
            if not self.store.update_step(ctx.rotation.id, ctx.step.position, expect=expect,
                                          status=to_status, **values) and expect is not None:
                ctx.log.info("changed while it ran (its %s); not recorded as %s",
                             " and ".join(expect), to_status)
                return
            self.store.update_rotation(ctx.rotation.id, data=ctx.data)
            if to_status != ctx.step.status or detail:
                self.store.audit(ctx.rotation.id, event, actor, step=ctx.step.name,
                                 from_status=ctx.step.status, to_status=to_status,
                                 detail=detail)

    def _complete(self, ctx: Context, outcome: Done | Skipped) -> None:
        status = "done" if isinstance(outcome, Done) else "skipped"
        text = outcome.result if isinstance(outcome, Done) else outcome.reason
        text = redact.redact(text)
        ctx.log.info("%s: %s", status, text)
        self._transition(ctx, status, detail=text, result=text, error=None,
                         finished_at=self.clock(), wait_reason=None, next_check_at=None)

    def _fail(self, ctx: Context, reason: str) -> None:
        reason = redact.redact(reason)
        ctx.log.warning("failed: %s", reason)
        spent = _SPENT if (ctx.step.gate_destructive or ctx.used_destructive) else {}
        self._transition(ctx, "failed", detail=reason, error=reason, next_check_at=None,
                         **spent)

    def _wait(self, ctx: Context, reason: str, *, until: float | None = None,
              event: str | None = None, detail: str | None = None,
              expect: dict[str, Any] | None = None) -> None:
        now = self.clock()
        waits = self.catalogue.waits
        if until is None:
            delay = min(waits.max_check, waits.first_check * 2 ** min(ctx.step.checks, 30))
            until = now + delay
        first = ctx.step.status != "waiting" or ctx.step.wait_reason != reason
        reason = redact.redact(reason)
        if first:
            ctx.log.info("waiting for %s", reason)
        # A destructive approval acted on is spent: the next round needs its own decision.
        spent = _SPENT if ctx.used_destructive else {}
        self._transition(ctx, "waiting", event=(event or "waiting") if first else "step",
                         detail=redact.redact(detail or reason) if first else None,
                         wait_reason=reason,
                         waiting_since=ctx.step.waiting_since or now,
                         next_check_at=until, checks=ctx.step.checks + 1, expect=expect,
                         **spent)

    def _ask(self, ctx: Context, need: _NeedsApproval) -> None:
        summary = redact.redact(need.summary)
        ctx.log.info("approval needed: %s", summary)
        self._transition(ctx, "needs-approval", event="approval-requested", detail=summary,
                         gate=need.gate, gate_summary=summary,
                         gate_destructive=int(need.destructive), gate_digest=need.digest,
                         gate_four_eyes=int(need.four_eyes),
                         gate_requested_at=self.clock(), decision=None, decided_by=None,
                         decided_at=None, notice_at=None, notice_ref=None, hold_until=None,
                         reminded_at=None, expired_at=None, next_check_at=None,
                         waiting_since=None, wait_reason=None, checks=0)

    def _second_line_notice(self, ctx: Context, summary: str) -> None:
        """Post the 2nd line notice once, then hold; raises _Pause until the step may run.

        A notifier that posts from a thread of its own (Slack) raises NoticePending: the step
        then waits, its worker free, with a `second-line-requested` row (the request, in the
        wait's own transaction) until the notice is posted and `recheck` wakes it.
        """
        step = ctx.step
        now = self.clock()
        if step.notice_at is None:
            if self.second_line is None:
                raise StepFailed("2nd line must be told before this destructive step, and no "
                                 "notifier is configured (set SLACK_BOT_TOKEN)")
            fence.guard("post the 2nd line notice")
            try:
                where = self.second_line.notify(ctx.rotation, step, summary,
                                                step.decided_by or "?")
            except NoticePending:
                raise _Pause(NOTICE_WAIT, now + NOTICE_RECHECK, event="second-line-requested",
                             detail=summary) from None
            except RotorError:
                raise  # the notifier says it cannot tell 2nd line at all: the step fails
            except Exception as exc:  # Slack down: keep the approval, retry the notice.
                ctx.log.warning("2nd line notice failed: %s", exc)
                raise _Pause(NOTICE_WAIT, now + 30) from None
            hold = self.catalogue.slack.hold_seconds
            with self.store.transaction():
                # Compare-and-set: a Hold since this run read the approval cleared it, and
                # the notice is not recorded for an approval that no longer stands.
                if self.store.update_step(ctx.rotation.id, step.position,
                                          expect={"decided_at": step.decided_at,
                                                  "notice_at": None},
                                          notice_at=now, notice_ref=where[:300],
                                          hold_until=now + hold):
                    self.store.audit(ctx.rotation.id, "second-line-notified", SYSTEM,
                                     step=step.name, detail=where[:300])
            ctx.step = step = self.store.rotation(ctx.rotation.id).step(step.position)
        if step.hold_until and step.hold_until > now:
            raise _Pause("the 2nd line hold period to pass", step.hold_until)
        if step.hold_until is not None:
            # The hold period is over: claim the approval before acting, compare-and-set, so
            # a Hold that read the step a moment ago (its clock behind this one) loses,
            # rather than say it held a step that is acting. Context.approve sees a Hold
            # that won.
            with self.store.transaction():
                self.store.update_step(ctx.rotation.id, step.position,
                                       expect={"decided_at": step.decided_at,
                                               "hold_until": step.hold_until},
                                       hold_until=None)
            ctx.step = self.store.rotation(ctx.rotation.id).step(step.position)

    def _finish(self, rotation: RotationRow) -> None:
        with self.store.transaction():
            self.store.update_rotation(rotation.id, status=DONE, finished_at=self.clock(),
                                       next_run_at=None)
            self.store.audit(rotation.id, "finished", SYSTEM, from_status=ACTIVE,
                             to_status=DONE, detail=rotation.progress)
        log.info("finish: #%s %s in %s is done", rotation.id, rotation.target, rotation.env)
        self.on_change(rotation.id)

    # -- decisions (compare-and-set, so a double click or a second process cannot win twice)

    def approve(self, rotation_id: int, step_name: str, actor: str, *,
                shown: str | None = None) -> RotationRow:
        """`shown`: the digest the approver was shown (a Slack button carries it); a request
        asked again since, for a different action, is not approved by it."""
        rotation = self._active(rotation_id)
        step = rotation.step(step_name)
        self._check_gate_open(rotation, step)
        if shown is not None and not (step.gate_digest or "").startswith(shown):
            raise InvalidTransition(f"rotation #{rotation.id} step {step.name} asks about "
                                    "something else now; approve its latest request")
        guided = (step.gate or "").startswith(GUIDE)
        if step.gate_four_eyes and person(actor) == person(rotation.initiator):
            raise NotAllowed(f"this decision needs a second person: the one who started "
                             f"rotation #{rotation.id} cannot approve it")
        if (not guided and self.catalogue.four_eyes(rotation.env)
                and person(actor) == person(rotation.initiator)):  # Slack and CLI alike
            raise NotAllowed(f"{rotation.env} needs a second person: the one who started "
                             f"rotation #{rotation.id} cannot approve it")
        self._decide(rotation, step, actor, "approved", "pending", next_run_at=self.clock())
        log.info("approve: #%s %s approved by %s", rotation.id, step.name, actor)
        return self.store.rotation(rotation.id)

    def reject(self, rotation_id: int, step_name: str, actor: str) -> RotationRow:
        rotation = self._active(rotation_id)
        step = rotation.step(step_name)
        self._check_gate_open(rotation, step, allow_expired=True)
        self._decide(rotation, step, actor, "rejected", "failed", next_run_at=None,
                     error=f"rejected by {actor}")
        return self.store.rotation(rotation.id)

    def _decide(self, rotation: RotationRow, step: StepRow, actor: str, decision: str,
                to_status: str, *, next_run_at: float | None, **values: Any) -> None:
        """Record a decision on an open gate: compare-and-set, so exactly one click wins."""
        with self.store.transaction():
            won = self.store.update_step(
                rotation.id, step.position,
                expect={"status": "needs-approval", "decision": None, "gate": step.gate,
                        "gate_digest": step.gate_digest},
                status=to_status, decision=decision, decided_by=actor,
                decided_at=self.clock(), **values)
            if won:
                self.store.update_rotation(rotation.id, next_run_at=next_run_at)
                self.store.audit(rotation.id, decision, actor, step=step.name,
                                 from_status="needs-approval", to_status=to_status,
                                 detail=step.gate_summary)
        if not won:
            raise InvalidTransition(f"rotation #{rotation.id} step {step.name} was already decided")
        self.on_change(rotation.id)

    def hold(self, rotation_id: int, step_name: str, actor: str) -> RotationRow:
        """2nd line stops a destructive step before it acts; it must be approved again.

        During its hold period, or once approved and before its 2nd line notice is recorded:
        a fleet's apps are named in one notice, and an app whose worker has not yet picked up
        the notice's link cannot have acted (it acts only after the notice and hold period).
        """
        for _ in range(HOLD_ATTEMPTS):
            rotation = self._active(rotation_id)
            step = rotation.step(step_name)
            in_hold_period = step.hold_until is not None and step.hold_until > self.clock()
            before_notice = (step.notice_at is None and bool(step.gate_destructive)
                             and self.catalogue.notify_second_line(rotation.env))
            if not (step.approved and (in_hold_period or before_notice)):
                raise InvalidTransition(f"rotation #{rotation.id} step {step.name} is not in a "
                                        "hold period")
            with self.store.transaction():
                # Compare-and-set on the approval and its notice: a notice recorded since this
                # read may have let the step act (no hold period); read again and decide anew
                # (recording the notice starts a hold period, which can still be held).
                won = self.store.update_step(
                    rotation.id, step.position,
                    expect={"decided_at": step.decided_at, "notice_at": step.notice_at,
                        "hold_until": step.hold_until},
                    status="needs-approval", decision=None, decided_by=None, decided_at=None,
                    notice_at=None, notice_ref=None, hold_until=None,
                    gate_requested_at=self.clock(), wait_reason=None, next_check_at=None)
                if won:
                    self.store.update_rotation(rotation.id, next_run_at=None)
                    self.store.audit(rotation.id, "held", actor, step=step.name,
                                     from_status=step.status, to_status="needs-approval",
                                     detail=f"held by {actor}")
            if won:
                self.on_change(rotation.id)
                return self.store.rotation(rotation.id)
        raise InvalidTransition(f"rotation #{rotation_id} step {step_name} kept moving on while "
                                "it was being held")

    def expire_approvals(self, older_than: float) -> list[RotationRow]:
        """Pause (not fail) rotations whose approval request waited too long."""
        expired = []
        for rotation in self.store.active():
            step = rotation.current
            if (step and step.status == "needs-approval" and step.decision is None
                    and step.expired_at is None and (step.gate_requested_at or 0) < older_than):
                with self.store.transaction():
                    if self.store.update_step(rotation.id, step.position,
                                              expect={"expired_at": None, "decision": None},
                                              expired_at=self.clock()):
                        self.store.audit(rotation.id, "approval-expired", SYSTEM,
                                         step=step.name, detail=step.gate_summary)
                        expired.append(rotation.id)
        for rotation_id in expired:
            self.on_change(rotation_id)
        return [self.store.rotation(i) for i in expired]

    def ask_again(self, rotation_id: int, step_name: str, actor: str) -> RotationRow:
        rotation = self._active(rotation_id)
        step = rotation.step(step_name)
        if step.status != "needs-approval" or step.expired_at is None:
            raise InvalidTransition(f"rotation #{rotation.id} step {step.name} has no expired "
                                    "approval")
        with self.store.transaction():
            self.store.update_step(rotation.id, step.position, expired_at=None,
                                   reminded_at=None, gate_requested_at=self.clock(), **_SPENT)
            self.store.audit(rotation.id, "approval-requested", actor, step=step.name,
                             from_status="needs-approval", to_status="needs-approval",
                             detail=step.gate_summary)
        self.on_change(rotation.id)
        return self.store.rotation(rotation.id)

    def mark_reminded(self, rotation_id: int, step_name: str) -> bool:
        rotation = self.store.rotation(rotation_id)
        step = rotation.step(step_name)
        with self.store.transaction():
            return self.store.update_step(rotation.id, step.position,
                                          expect={"reminded_at": step.reminded_at},
                                          reminded_at=self.clock())

    def offers(self, rotation: RotationRow) -> tuple[str, ...]:
        """What the current step honours if asked now (buttons to show)."""
        step = rotation.current
        if rotation.status != ACTIVE or step is None or step.status != "waiting":
            return ()
        return self._definition(self.kind(rotation.kind), rotation, step).offers

    def request(self, rotation_id: int, name: str, actor: str) -> RotationRow:
        """Ask a running step for something it offers (Reactivate, Roll back); once only."""
        rotation = self._active(rotation_id)
        if name not in self.offers(rotation):
            raise InvalidTransition(f"rotation #{rotation.id} does not offer {name} now")
        with self.store.transaction():
            already = self.store.add_request(rotation.id, name, actor)
            if already:
                raise InvalidTransition(f"rotation #{rotation.id}: {name} was already asked for "
                                        f"by {already}")
            self.store.update_rotation(rotation.id, next_run_at=self.clock())
            step = rotation.current
            if step is not None and step.status == "waiting":  # re-check it now, not later
                self.store.update_step(rotation.id, step.position, next_check_at=self.clock())
            self.store.audit(rotation.id, "requested", actor, detail=name)
        self.on_change(rotation.id)
        return self.store.rotation(rotation.id)

    def recheck(self, rotation_id: int, step_name: str, reason: str) -> None:
        """Look at a step waiting for `reason` again now (what it waits for happened)."""
        rotation = self.store.rotation(rotation_id)
        step = rotation.current
        if (rotation.status != ACTIVE or step is None or step.name != step_name
                or step.status != "waiting" or step.wait_reason != reason):
            return
        with self.store.transaction(fenced=False):
            won = self.store.update_step(rotation.id, step.position,
                                         expect={"status": "waiting", "wait_reason": reason},
                                         next_check_at=self.clock())
            if won:
                self.store.update_rotation(rotation.id, next_run_at=self.clock())
        self.on_change(rotation.id)

    def retry(self, rotation_id: int, actor: str) -> RotationRow:
        """Run the failed step again (a rejected gate asks for approval again)."""
        rotation = self._active(rotation_id)
        step = rotation.current
        if step is None or step.status != "failed":
            raise InvalidTransition(f"rotation #{rotation.id} has no failed step to retry "
                                    f"(it is {rotation.phase})")
        # A rejected gate, and any destructive one, needs a new decision (and a new 2nd line
        # notice): an approval covers one attempt, not the retry of a failed one.
        spent = _SPENT if step.decision == "rejected" or step.gate_destructive else {}
        with self.store.transaction():
            won = self.store.update_step(
                rotation.id, step.position, expect={"status": "failed"}, status="pending",
                error=None, waiting_since=None, wait_reason=None, checks=0, **spent)
            if won:
                self.store.update_rotation(rotation.id, next_run_at=self.clock())
                self.store.audit(rotation.id, "retried", actor, step=step.name,
                                 from_status="failed", to_status="pending")
        if not won:
            raise InvalidTransition(f"rotation #{rotation.id} step {step.name} is no longer failed")
        self.on_change(rotation.id)
        return self.store.rotation(rotation.id)

    def cancel(self, rotation_id: int, actor: str, *, now: bool = True) -> RotationRow:
        """Ask to cancel; the worker holding the rotation undoes what is unsafe to leave."""
        rotation = self._active(rotation_id)
        with self.store.transaction():
            self.store.update_rotation(rotation.id, cancel_requested_by=actor,
                                       next_run_at=self.clock())
            self.store.audit(rotation.id, "cancel-requested", actor, detail=rotation.phase)
        self.on_change(rotation.id)
        if not now:
            return self.store.rotation(rotation.id)
        row = self.advance(rotation.id)
        # A worker of this process (this engine's, or another engine's of the pool) may hold
        # the rotation (a lease is never taken twice): it sees the request at its next step;
        # wait for it to let go, then cancel here. Another process's worker finishes it.
        deadline = time.monotonic() + LEASE_SECONDS
        with self._released:
            row = self.store.rotation(rotation.id)  # read under the lock: no missed notify
            while (row.status == ACTIVE and self._held_here(row)
                   and time.monotonic() < deadline):
                # This engine's release notifies; another engine's is seen by looking again.
                self._released.wait(min(CANCEL_RECHECK, deadline - time.monotonic()))
                row = self.store.rotation(rotation.id)
        return self.advance(rotation.id) if row.status == ACTIVE else row

    def _held_here(self, rotation: RotationRow) -> bool:
        """Whether a worker of this very process holds the rotation's lease now."""
        owner = rotation.lease_owner
        return (owner is not None and (rotation.lease_until or 0) > self.clock()
                and is_this_process(owner))

    def _cancel_now(self, rotation: RotationRow) -> None:
        step = rotation.current or rotation.steps[-1]
        ctx = Context(self, rotation, step, dict(rotation.data), self.clients)
        actor = rotation.cancel_requested_by or SYSTEM
        try:
            with readcache.fresh():  # a cancel decides from the secret's real stages
                what = self.kind(rotation.kind).cancel(ctx)
        except RotorError as exc:
            reason = redact.redact(f"cancel could not finish: {exc}")
            with self.store.transaction():
                self.store.update_rotation(rotation.id, cancel_requested_by=None, data=ctx.data)
                self.store.audit(rotation.id, "cancel-failed", actor, detail=reason)
            self._fail(ctx, reason)
            return
        with self.store.transaction():
            self.store.update_rotation(rotation.id, status=CANCELLED, finished_at=self.clock(),
                                       next_run_at=None, data=ctx.data)
            self.store.audit(rotation.id, "cancelled", actor, from_status=ACTIVE,
                             to_status=CANCELLED, detail=redact.redact(what))
        log.info("cancel: #%s cancelled by %s: %s", rotation.id, actor, what)

    def _active(self, rotation_id: int) -> RotationRow:
        rotation = self.store.rotation(rotation_id)
        if rotation.status != ACTIVE:
            raise InvalidTransition(f"rotation #{rotation.id} is {rotation.status}; "
                                    "nothing to do")
        return rotation

    def _check_gate_open(self, rotation: RotationRow, step: StepRow, *,
                         allow_expired: bool = False) -> None:
        if step.status != "needs-approval" or step.decision is not None:
            raise InvalidTransition(f"rotation #{rotation.id} step {step.name} is not waiting "
                                    f"for approval (it is {step.status})")
        if step.expired_at is not None and not allow_expired:
            raise InvalidTransition(f"the approval for rotation #{rotation.id} step {step.name} "
                                    "expired; ask for it again")
