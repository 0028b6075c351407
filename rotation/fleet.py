"""Fleets: several apps' credentials rotated together after one plan and one confirmation.

A fleet is planned first (`plan`: each app, its kind, what will happen, what is skipped and
why), recorded with that plan (`Store.create_fleet`), then confirmed once: by its starter, and
in a four-eyes environment by a second person too (`confirm`). Confirming starts one ordinary
rotation per app, each pointing at the fleet; every safety rule of a single rotation still
holds for each of them. What a fleet is doing is computed from its rotations (`status`).
Plain Python: the engine and the policy are passed in.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rotation.errors import (
    ConfigError,
    NotAllowed,
    RotationConflict,
    RotorError,
    UnknownName,
)
from rotation.store import ACTIVE, DONE, SYSTEM, FleetRow, RotationRow

if TYPE_CHECKING:  # `rotor status` reads fleets without loading the catalogue (pydantic)
    from rotation.engine import Engine
    from rotation.policy import Policy

log = logging.getLogger(__name__)


def person(actor: str | None) -> str:
    """rotation.policy.person, imported when needed: reading a fleet's status stays light."""
    from rotation.policy import person as policy_person

    return policy_person(actor)

PLANNED, CONFIRMING, STARTED, CANCELLED = "planned", "confirming", "started", "cancelled"
STARTING = "starting"  # confirmed; its rotations are being created (resume_starts ends it)
START_LOCK_SECONDS = 300.0  # a starter creates 50 rotations in about a second


class FleetRefused(RotorError):
    """The fleet cannot be started as asked (bad input); nothing was started."""


@dataclass(frozen=True)
class FleetStatus:
    """What a fleet is doing: done, waiting (on what), failed (and why), or not started."""

    word: str
    detail: str
    counts: dict[str, int]

    def line(self, fleet: FleetRow) -> str:
        apps = sum(1 for p in fleet.plan if not p.get("skip"))
        tally = ", ".join(f"{n} {w}" for w, n in sorted(self.counts.items()))
        return (f"fleet #{fleet.id} in {fleet.env}: {self.word}"
                + (f" ({self.detail})" if self.detail else "")
                + f"; {apps} apps" + (f": {tally}" if tally else "")
                + f" (started by {fleet.initiator})")


def plan(engine: Engine, apps: Sequence[str] | None, env: str, *,
         compromised: bool = False) -> list[dict[str, Any]]:
    """One line per app: its kind, what will happen, or why it is skipped. `apps` None is
    every app in the catalogue. A named app that is unknown, or already rotating, is an
    error (nothing is planned); with every app, those are skipped and say why."""
    catalogue = engine.catalogue
    catalogue.environment(env)  # unknown environment: UnknownName, one line
    named = apps is not None
    names = list(dict.fromkeys(apps)) if apps is not None else sorted(catalogue.apps)
    if not names:
        raise FleetRefused(f"no apps to rotate in {env}")
    params = {"compromised": True} if compromised else {}
    lines: list[dict[str, Any]] = []
    for name in names:
        kind_name = catalogue.app(name).engine  # unknown app: UnknownName
        line: dict[str, Any] = {"app": name, "kind": kind_name}
        active = engine.store.find_active(kind_name, name, env)
        if active is not None:
            reason = f"already rotating (#{active.id}, started by {active.initiator})"
            if named:
                raise FleetRefused(f"{name} in {env} is {reason}; nothing started")
            line["skip"] = reason
            lines.append(line)
            continue
        kind = engine.kind(kind_name)
        try:
            kind.validate(catalogue, name, env, params)
        except (UnknownName, ValueError) as exc:
            if named:
                raise FleetRefused(f"{name}: {exc}; nothing started") from None
            line["skip"] = str(exc)
            lines.append(line)
            continue
        steps = kind.steps(catalogue, name, env, params)
        destructive = [s.name for s in steps if s.destructive]
        line["action"] = (f"{len(steps)} steps"
                          + (f"; approval before {', '.join(destructive)}" if destructive else ""))
        line["gates"] = destructive
        lines.append(line)
    if not any(not p.get("skip") for p in lines):
        raise FleetRefused(f"nothing to rotate in {env}: every app is skipped")
    return lines


def propose(engine: Engine, policy: Policy, actor: str, apps: Sequence[str] | None, env: str,
            *, compromised: bool = False) -> FleetRow:
    """Plan the fleet and record it (status planned); nothing runs yet."""
    policy.check_start(actor, env)
    lines = plan(engine, apps, env, compromised=compromised)
    params = {"compromised": True} if compromised else {}
    fleet_id = engine.store.create_fleet(env, actor, params, lines)
    return engine.store.fleet(fleet_id)


def needs_second_person(engine: Engine, fleet: FleetRow) -> bool:
    return engine.catalogue.four_eyes(fleet.env)


def confirm(engine: Engine, policy: Policy, fleet_id: int, actor: str) -> FleetRow:
    """The one confirmation. Its starter confirms a planned fleet; in a four-eyes environment
    it then waits for a second person, whose confirmation starts the rotations."""
    store = engine.store
    fleet = store.fleet(fleet_id)
    if fleet.status == PLANNED:
        if person(actor) != person(fleet.initiator):
            raise NotAllowed(f"fleet #{fleet_id} is confirmed first by the one who planned it "
                             f"({person(fleet.initiator)})")
        policy.check_start(actor, fleet.env)
        if needs_second_person(engine, fleet):
            if not store.move_fleet(fleet_id, PLANNED, CONFIRMING, actor):
                raise RotationConflict(f"fleet #{fleet_id} was confirmed already")
            return store.fleet(fleet_id)
        return _start(engine, fleet, PLANNED, actor)
    if fleet.status == CONFIRMING:
        policy.check_approve(actor, fleet.env)
        policy.check_four_eyes(actor, fleet.env, fleet.initiator)
        return _start(engine, fleet, CONFIRMING, actor)
    raise RotationConflict(f"fleet #{fleet_id} is {fleet.status}, not waiting for a confirmation")


def cancel(engine: Engine, fleet_id: int, actor: str) -> FleetRow:
    """Drop a fleet that has not started (its plan was not wanted)."""
    fleet = engine.store.fleet(fleet_id)
    if fleet.status not in (PLANNED, CONFIRMING) or not engine.store.move_fleet(
            fleet_id, fleet.status, CANCELLED, actor):
        raise RotationConflict(f"fleet #{fleet_id} is {fleet.status}; cancel its rotations "
                               "one by one")
    return engine.store.fleet(fleet_id)


def _start(engine: Engine, fleet: FleetRow, from_status: str, actor: str) -> FleetRow:
    """Start one rotation per planned app. The compare-and-set comes first, so a double
    click or two people confirming at once start the fleet once. The fleet is "starting"
    until every app's rotation exists: a starter that dies part way is taken over by
    `resume_starts`."""
    store = engine.store
    if not store.move_fleet(fleet.id, from_status, STARTING, actor, confirmed=True):
        raise RotationConflict(f"fleet #{fleet.id} was confirmed already")
    with _start_lock(engine, fleet.id) as mine:
        if not mine:
            return store.fleet(fleet.id)  # a resume took it in between: it starts the apps
        return _start_members(engine, store.fleet(fleet.id), actor)


def resume_starts(engine: Engine) -> list[int]:
    """Finish starting the fleets whose starter died part way (a crash, a redeploy): the
    apps whose rotation does not exist yet are started now. Safe beside a live starter: it
    holds the fleet's start lock, and the database lets one active rotation per app be."""
    resumed = []
    for fleet_id in engine.store.fleet_ids(STARTING):
        with _start_lock(engine, fleet_id) as mine:
            fleet = engine.store.fleet(fleet_id)
            if mine and fleet.status == STARTING:  # not mine: its starter is still at it
                log.warning("fleet: #%s was not fully started; starting the rest", fleet_id)
                _start_members(engine, fleet, fleet.confirmed_by or SYSTEM)
                resumed.append(fleet_id)
    return resumed


@contextmanager
def _start_lock(engine: Engine, fleet_id: int) -> Iterator[bool]:
    """The fleet's start lock for the block, if no live starter holds it (whether it did)."""
    store, name, owner = engine.store, f"fleet-start:{fleet_id}", engine.worker_id
    mine = store.try_lock(name, owner, store.clock() + START_LOCK_SECONDS)
    try:
        yield mine
    finally:
        if mine:
            store.try_lock(name, owner, store.clock())  # release


def _start_members(engine: Engine, fleet: FleetRow, actor: str) -> FleetRow:
    """Start each planned app's rotation that does not exist yet (idempotent), then mark the
    fleet started with each app's rotation in its plan."""
    store = engine.store
    ours = {r.target: r.id for r in store.fleet_rotations(fleet.id)}
    lines = [dict(p) for p in fleet.plan]
    for line in lines:
        if line.get("skip") or line["app"] in ours:
            continue
        try:
            ours[line["app"]] = engine.start(line["kind"], line["app"], fleet.env,
                                             fleet.initiator, fleet.params,
                                             fleet_id=fleet.id).id
        except RotationConflict as exc:
            mine = [r.id for r in store.fleet_rotations(fleet.id) if r.target == line["app"]]
            if mine:  # another starter of this fleet got there first
                ours[line["app"]] = mine[0]
            else:  # started by someone else since the plan was shown
                line["skip"] = str(exc)
        except (UnknownName, ConfigError, NotAllowed) as exc:  # the catalogue changed since
            line["skip"] = str(exc)  # the plan: this app cannot start; the others do
    for line in lines:
        if not line.get("skip"):
            line["rotation"] = ours[line["app"]]
    store.move_fleet(fleet.id, STARTING, STARTED, actor, plan=lines)
    log.info("fleet: #%s started %s rotations in %s", fleet.id,
             sum(1 for p in lines if "rotation" in p), fleet.env)
    return store.fleet(fleet.id)


def member_state(rotation: RotationRow) -> str:
    """One app's state in a fleet, in a few words."""
    if rotation.status != ACTIVE:
        return rotation.status
    step = rotation.current
    if step is None:
        return DONE
    if step.status == "failed":
        return f"failed at {step.name}"
    if step.status == "needs-approval":
        return f"needs approval: {step.name}"
    if step.status == "waiting":
        return f"waiting: {step.wait_reason or step.name}"
    return f"{step.status}: {step.name}"


def status(fleet: FleetRow, rotations: Sequence[RotationRow]) -> FleetStatus:
    """Done, waiting (on what), failed (and the reason), computed from the rotations."""
    if fleet.status == PLANNED:
        return FleetStatus("waiting", f"on {person(fleet.initiator)} to confirm the plan", {})
    if fleet.status == CONFIRMING:
        return FleetStatus("waiting", "on a second person to confirm: "
                           f"`rotor approve-fleet {fleet.id}`", {})
    if fleet.status == CANCELLED:
        return FleetStatus(CANCELLED, "", {})
    counts: Counter[str] = Counter()
    failures: list[str] = []
    waits: Counter[str] = Counter()
    for rotation in rotations:
        step = rotation.current
        if rotation.status == DONE or (rotation.status == ACTIVE and step is None):
            counts[DONE] += 1
        elif rotation.status != ACTIVE:
            counts["failed"] += 1
            failures.append(f"{rotation.target} {rotation.status}")
        elif step is not None and step.status == "failed":
            counts["failed"] += 1
            failures.append(f"{rotation.target} at {step.name}: {step.error or 'failed'}")
        else:
            counts["waiting" if step and step.status in ("waiting", "needs-approval")
                   else "running"] += 1
            if step is not None and step.status == "needs-approval":
                waits[f"approval of {step.name}"] += 1
            elif step is not None and step.status == "waiting":
                waits[step.wait_reason or step.name] += 1
    if failures:
        return FleetStatus("failed", "; ".join(failures), dict(counts))
    if rotations and counts[DONE] == len(rotations):
        return FleetStatus(DONE, "", dict(counts))
    if waits:
        return FleetStatus("waiting", "on " + ", ".join(
            f"{what} ({n} apps)" if n > 1 else what for what, n in waits.most_common()),
            dict(counts))
    return FleetStatus("running", "", dict(counts))


def waiting_at(rotations: Sequence[RotationRow], gate: str | None = None
               ) -> dict[str, list[RotationRow]]:
    """The fleet's rotations that wait for an approval, by step name (one gate, or all)."""
    out: dict[str, list[RotationRow]] = {}
    for rotation in rotations:
        step = rotation.current
        if (rotation.status == ACTIVE and step is not None and step.status == "needs-approval"
                and step.decision is None and not step.guided
                and (gate is None or step.name == gate)):
            out.setdefault(step.name, []).append(rotation)
    return out


def batch_key(fleet_id: int, gate: str) -> str:
    """The rotations one "Approve all" click approves (kv), for the fleet's notice."""
    return f"fleet:approving:{fleet_id}:{gate}"


def approve_gate(engine: Engine, policy: Policy, fleet_id: int, gate: str, actor: str, *,
                 shown: Mapping[int, str] | None = None) -> list[RotationRow]:
    """Approve one gate for every app of the fleet waiting at it. Each app's approval is its
    own (Engine.approve): with `shown` (rotation id → the facts digest the approver was shown
    for it, as the Slack button carries), only those apps, each bound to its digest, so an app
    whose facts changed since asks again by itself."""
    store = engine.store
    fleet = store.fleet(fleet_id)
    policy.check_approve(actor, fleet.env)
    policy.check_four_eyes(actor, fleet.env, fleet.initiator)
    waiting = waiting_at(store.fleet_rotations(fleet_id), gate).get(gate, [])
    if not waiting:
        raise RotationConflict(f"no app of fleet #{fleet_id} waits for an approval of {gate}")
    # Written before the first approval and marked done after the last: the one 2nd line
    # notice (bot.fleet_notice) waits for the click to approve them all, and names each.
    batch = [r.id for r in waiting if shown is None or r.id in shown]
    record = {"ids": batch, "at": store.clock(), "done": False}
    store.set_kv(batch_key(fleet_id, gate), json.dumps(record))
    try:
        approved = _approve_each(engine, fleet_id, gate, actor, waiting, shown)
    finally:  # the notice waits for this: it names every app the click approved
        store.set_kv(batch_key(fleet_id, gate), json.dumps({**record, "done": True}))
    return approved


def _approve_each(engine: Engine, fleet_id: int, gate: str, actor: str,
                  waiting: list[RotationRow], shown: Mapping[int, str] | None
                  ) -> list[RotationRow]:
    approved: list[RotationRow] = []
    for rotation in waiting:
        if shown is not None and rotation.id not in shown:
            continue  # it opened its gate after the list was shown: not approved unseen
        step = rotation.current
        if shown is not None and step is not None and step.gate_digest and not shown[rotation.id]:
            continue  # shown without facts, it binds facts now: it asks again on its own
        try:
            approved.append(engine.approve(rotation.id, gate, actor,
                                           shown=shown.get(rotation.id) if shown else None))
        except RotorError as exc:  # one app moved on or asks again: the others still go
            log.warning("fleet: #%s approval of %s for #%s refused: %s", fleet_id, gate,
                        rotation.id, exc)
    return approved


def hold_notice(engine: Engine, rotation_id: int, step: str, actor: str, *,
                also: Sequence[int] = (), fleet_id: int | None = None
                ) -> tuple[list[RotationRow], list[str]]:
    """The Hold of a fleet's one 2nd line notice: hold `step` of its rotation and of each
    other app it names (`also`; or, when their ids did not fit in the button, each app of
    `fleet_id` approved at `step`). Each hold is its own: one that cannot be held (it acted
    already, it is not approved) does not stop the others. The rotations held, and why each
    of the others could not be."""
    ids = [rotation_id, *also]
    if fleet_id is not None:
        ids += [r.id for r in engine.store.fleet_rotations(fleet_id)
                if r.status == ACTIVE and r.current is not None and r.current.name == step
                and r.current.approved]
    held: list[RotationRow] = []
    refused: list[str] = []
    for held_id in dict.fromkeys(ids):
        try:
            held.append(engine.hold(held_id, step, actor))
        except RotorError as exc:  # one app moved on: the others are still held
            log.warning("fleet: hold of %s for #%s refused: %s", step, held_id, exc)
            refused.append(str(exc))
    return held, refused
