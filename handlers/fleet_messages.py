"""A fleet's one Slack message: its plan with a Confirm button, then a table of its apps with
their state, and one "Approve all" button per gate that apps wait at.

Each app in an "Approve all" button carries the facts digest its own gate showed, so the
click approves exactly what was listed; an app whose facts changed since asks again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from handlers.messages import (
    FLEET_APPROVE,
    FLEET_CONFIRM,
    SYMBOL,
    Message,
    _actions,
    _button,
    _confirm,
    _context,
    _section,
    escape,
    redacted,
    user,
)
from rotation import fleet as fleets
from rotation.store import FleetRow, RotationRow

ROWS_PER_SECTION = 20  # a section holds 3000 characters
SHOWN_CHARS = 12  # of each app's gate digest, in an "Approve all" button (2000 at most)


def fleet_value(fleet_id: int, step: str | None = None, **extra: Any) -> str:
    data: dict[str, Any] = {"fleet": fleet_id, **({"step": step} if step else {}), **extra}
    return json.dumps(data, separators=(",", ":"))


def _title(fleet: FleetRow) -> str:
    apps = sum(1 for p in fleet.plan if not p.get("skip"))
    flag = " (compromised)" if fleet.params.get("compromised") else ""
    return f"fleet #{fleet.id}: {apps} apps in {fleet.env}{flag}"


def _sections(lines: Sequence[str]) -> list[dict[str, Any]]:
    return [_section("\n".join(lines[i:i + ROWS_PER_SECTION]))
            for i in range(0, len(lines), ROWS_PER_SECTION)] or [_section("(no apps)")]


def _plan_lines(fleet: FleetRow) -> list[str]:
    out = []
    for line in fleet.plan:
        what = (f"skipped: {escape(line['skip'])}" if line.get("skip")
                else escape(line.get("action", "")))
        out.append(f"• {escape(line['app'])} ({escape(line['kind'])}): {what}")
    return out


@redacted
def plan(fleet: FleetRow, four_eyes: bool) -> Message:
    """The plan, posted in the channel, with the one Confirm button."""
    if fleet.status == fleets.CONFIRMING:
        note = (f"Confirmed by {user(fleet.initiator)}; it starts when a second person "
                "confirms (four-eyes).")
        label = "Confirm (second person)"
    else:
        note = (f"Planned by {user(fleet.initiator)}. "
                + ("Four-eyes: after their confirmation a second person confirms."
                   if four_eyes else "Nothing runs until it is confirmed."))
        label = "Confirm"
    text = f":clipboard: {_title(fleet)}: plan, waiting for a confirmation"
    confirm = _button(label, FLEET_CONFIRM, fleet_value(fleet.id), style="primary",
                      confirm=_confirm(f"Rotate {_title(fleet)}?",
                                       "Each app is rotated as planned above.", "Confirm"))
    return text, [_section(f"*{escape(_title(fleet))}*: the plan"), *_sections(_plan_lines(fleet)),
                  _context(note), _actions(confirm)]


@redacted
def planned(fleet: FleetRow) -> str:
    """The ephemeral answer to the command."""
    return (f"Planned fleet #{fleet.id} in {escape(fleet.env)}: the plan is in the channel; "
            "nothing runs until it is confirmed there.")


@redacted
def cancelled(fleet: FleetRow) -> Message:
    text = f"{SYMBOL['skipped']} {_title(fleet)}: not started"
    return text, [_section(escape(text))]


@redacted
def table(fleet: FleetRow, rotations: Sequence[RotationRow]) -> Message:
    """The fleet's state: one line per app, and an "Approve all" button per open gate."""
    result = fleets.status(fleet, rotations)
    text = f"{_title(fleet)}: {result.word}" + (f" ({result.detail})" if result.detail else "")
    lines = []
    for rotation in rotations:
        state = fleets.member_state(rotation)
        mark = SYMBOL.get(rotation.phase, ":arrows_counterclockwise:")
        lines.append(f"{mark} {escape(rotation.target)} #{rotation.id}: {escape(state)}")
    for line in fleet.plan:
        if line.get("skip"):
            lines.append(f"{SYMBOL['skipped']} {escape(line['app'])}: skipped, "
                         f"{escape(line['skip'])}")
    blocks: list[dict[str, Any]] = [_section(f"*{escape(text)}*"), *_sections(lines)]
    confirmed = (f"Started by {user(fleet.initiator)}"
                 + (f", confirmed by {user(fleet.confirmed_by)}" if fleet.confirmed_by
                    and fleet.confirmed_by != fleet.initiator else ""))
    blocks.append(_context(confirmed))
    for gate, members in sorted(fleets.waiting_at(rotations).items()):
        names = ", ".join(f"{escape(r.target)}" for r in members)
        shown = {str(r.id): (r.current.gate_digest or "")[:SHOWN_CHARS]
                 for r in members if r.current is not None}
        destructive = any(r.current is not None and r.current.gate_destructive
                          for r in members)
        label = f"Approve all {len(members)} {gate}"
        button = _button(label[:75], FLEET_APPROVE, fleet_value(fleet.id, gate, shown=shown),
                         style="primary",
                         confirm=_confirm(f"{label}?"[:100], f"{gate} in {fleet.env} for: "
                                          f"{names}", "Approve all") if destructive else None)
        warn = ":warning: *Destructive.* " if destructive else ""
        blocks.append(_section(f"{warn}{SYMBOL['needs-approval']} {len(members)} apps wait for "
                               f"{escape(gate)}: {names}"))
        blocks.append(_actions(button))
    return text, blocks[:50]


@redacted
def gate_approved(fleet_id: int, gate: str, approved: int, shown: int) -> str:
    return (f"Approved {escape(gate)} for {approved} of {shown} apps of fleet #{fleet_id}"
            + ("" if approved == shown else "; the others ask again in their threads"))


@redacted
def held(step: str, held: Sequence[RotationRow], refused: Sequence[str]) -> str:
    """The reply to a fleet notice's Hold when some of the apps it names could not be held."""
    names = ", ".join(f"{r.target} #{r.id}" for r in held) or "none"
    why = "; ".join(escape(reason) for reason in refused)
    return (f":no_entry: Held {escape(step)} for {len(held)} of {len(held) + len(refused)} "
            f"apps ({names}). Could not hold: {why}")
