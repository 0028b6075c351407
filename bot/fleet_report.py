"""A fleet in Slack: one root message (the fleet's table) and, in its thread, each app's
failures and the decisions it needs; nothing else per app.

Called by the reporter (bot.reporter.Reporter), from its own thread and under its lock:
`deliver_member` replaces the per-rotation delivery for a rotation that belongs to a fleet,
and `refresh` updates each fleet's table, at most every UPDATE_SECONDS (chat.update is
rate limited), so 50 apps changing state cost one update every few seconds, not 50.
Approvals of a gate for the whole fleet are the table's "Approve all" buttons; an app whose
gate asks again (its facts changed) gets its own approval message in the thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from bot.fleet_notice import FleetNoticeBusy
from bot.slack import SLACK_ERRORS
from handlers import fleet_messages, messages
from rotation import fleet as fleets
from rotation.store import ACTIVE, AuditRow, FleetRow, RotationRow

if TYPE_CHECKING:
    from bot.reporter import Delivery, Reporter

log = logging.getLogger("rotor.reporter")

UPDATE_SECONDS = 3.0  # a fleet's table changes at most this often
RECENT_FLEETS = 10


def _where(fleet: FleetRow) -> tuple[str, str] | None:
    if not fleet.message_ref:
        return None
    channel, _, ts = fleet.message_ref.partition(":")
    return channel, ts


def ensure_root(rep: Reporter, fleet: FleetRow) -> tuple[str, str]:
    """The fleet's one message; a fleet started from the CLI gets it on first delivery.

    As for a rotation's root: the post is marked in flight first and carries the fleet's id
    in its metadata, so a post whose answer was lost (Slack may have taken it) is looked for
    in the channel's history before it is posted again."""
    found = _where(fleet)
    if found is not None:
        return found
    marker = f"slack:fleet-root-in-flight:{fleet.id}"
    found = (rep.find_posted_root(None, fleet.created_at, {"fleet": fleet.id})
             if rep.store.get_kv(marker) else None)
    if found is None:
        rep.store.set_kv(marker, "1")
        text, blocks = fleet_messages.table(fleet, rep.store.fleet_rotations(fleet.id))
        found = rep.post_root(None, text, blocks, {"fleet": fleet.id})
        log.info("reporter: fleet #%s root message posted", fleet.id)
    else:
        log.info("reporter: fleet #%s root message was posted before; not posting again",
                 fleet.id)
    rep._join_once(found[0])  # a lost answer is looked for in its history
    rep.store.set_fleet_message(fleet.id, f"{found[0]}:{found[1]}")
    rep.store.set_kv(marker, "")
    return found


def deliver_member(rep: Reporter, rotation: RotationRow) -> int | None:
    """Deliver a fleet member's new rows; the id of the row to retry, if any."""
    assert rotation.fleet_id is not None
    state = rep._load(rotation.id)
    rows = rep.store.audit_rows(rotation.id, after=state.cursor)
    if not rows:
        return None
    try:
        state.channel, state.root = ensure_root(rep, rep.store.fleet(rotation.fleet_id))
    except SLACK_ERRORS as exc:
        log.warning("reporter: fleet #%s: Slack unavailable (%s); will retry",
                    rotation.fleet_id, exc)
        return rows[0].id
    rotation = rep.store.rotation(rotation.id)
    for row in rows:
        try:
            _member_row(rep, state, rotation, row)
        except (*SLACK_ERRORS, FleetNoticeBusy) as exc:
            log.warning("reporter: #%s %s: Slack unavailable (%s); will retry", rotation.id,
                        row.event, exc)
            rep._save(rotation.id, state)
            return row.id
        state.cursor, state.in_flight = row.id, None
        rep._save(rotation.id, state)
    return None


def _asked_before(rep: Reporter, rotation: RotationRow, row: AuditRow) -> bool:
    return any(r.event == "approval-requested" and r.step == row.step and r.id < row.id
               for r in rep.store.audit_rows(rotation.id))


def _member_row(rep: Reporter, state: Delivery, rotation: RotationRow, row: AuditRow) -> None:
    """Only failures and decisions: the table shows every other change."""
    event, step = row.event, row.step or ""
    if event == "second-line-requested":  # the step waits for its notice: post it
        rep._tell_second_line(rotation, row)
    elif event == "step" and row.to_status == "failed":
        rep._post_open(state, rotation, row, f"failed:{step}", row.detail,
                       *messages.failure(rotation, row))
    elif event == "approval-requested":
        rep._close(state, rotation, f"approval:{step}", "asked-again", row)
        guided = rotation.step(step).guided
        if guided or _asked_before(rep, rotation, row):  # not covered by "Approve all"
            rep._ask(state, rotation, row, row.detail or "")
    elif event in ("approved", "rejected"):
        rep._close(state, rotation, f"approval:{step}", event, row)
        rep._close(state, rotation, f"expired:{step}", event, row)
        if event == "rejected":
            rep._post_open(state, rotation, row, f"failed:{step}", row.detail,
                           *messages.failure(rotation, row, rejected_by=row.actor))
            state.open[f"failed:{step}"]["rejected_by"] = row.actor
    elif event == "approval-expired":
        rep._close(state, rotation, f"approval:{step}", "expired", row)
        rep._post_open(state, rotation, row, f"expired:{step}", row.detail,
                       *messages.approval_expired(rotation, rotation.step(step)))
    elif event == "held":
        note = f"Held by {messages.user(row.actor)} {messages.when(row.at)}; it needs " \
               "approving again."
        rep._ask(state, rotation, row, rotation.step(step).gate_summary or "", note)
    elif event == "retried":
        rep._close(state, rotation, f"failed:{step}", "retried", row)
    elif event == "cancelled":
        for key in list(state.open):
            rep._close(state, rotation, key, "cancelled", row)


def _digest(blocks: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(blocks, sort_keys=True).encode()).hexdigest()[:16]


def refresh(rep: Reporter) -> None:
    """Update each recent fleet's table when it changed, at most every UPDATE_SECONDS; a
    change held back wakes the reporter again when its turn comes."""
    now = rep.store.clock()
    for fleet in rep.store.fleets(RECENT_FLEETS):
        where = _where(fleet)
        if fleet.status not in (fleets.STARTING, fleets.STARTED) or where is None:
            continue
        key = f"slack:fleet:{fleet.id}"
        raw = rep.store.get_kv(key)
        seen: dict[str, Any] = json.loads(raw) if raw else {"digest": "", "at": 0.0}
        if seen.get("done"):
            continue
        rotations = rep.store.fleet_rotations(fleet.id)
        text, blocks = fleet_messages.table(fleet, rotations)
        digest = _digest(blocks)
        if digest == seen["digest"]:
            continue
        wait = seen["at"] + UPDATE_SECONDS - now
        if wait > 0:
            rep.schedule_retry(wait)
            continue
        rep._call("chat_update", channel=where[0], ts=where[1], text=text, blocks=blocks)
        finished = all(r.status != ACTIVE for r in rotations)
        rep.store.set_kv(key, json.dumps({"digest": digest, "at": now, "done": finished}))
