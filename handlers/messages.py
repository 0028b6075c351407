"""Every string Rotor shows in Slack, and every Block Kit structure it sends (the
scheduler's key-age checks and nudges are in `handlers.reminder_messages`).

Builders return `(text, blocks)`: `text` is the notification and screen-reader fallback,
`blocks` what people see. Every builder's output goes through `rotation.redact`, so a secret
that slipped into a step result or an error still never reaches Slack. Text a person typed is
escaped before it is echoed, so `<!channel>` in a command stays text.

Text from outside Rotor (names and errors from the databases, AWS and Kubernetes, and what
people type, once Slack's own entities are undone) goes through one function, `escape`, at
these builders and nowhere else. Rotor's own words, catalogue names (validated when rotor.yml
loads), step names, and mentions Rotor makes from Slack IDs are not escaped.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from rotation import redact
from rotation.policy import PolicyRefusal, person, principal
from rotation.store import ACTIVE, CANCELLED, DONE, AuditRow, RotationRow, StepRow

# Action IDs of every button Rotor sends (manifest.yml and README.md list them too).
APPROVE = "approve"
REJECT = "reject"
RETRY = "retry"
CANCEL = "cancel"
HOLD = "hold"  # value {"rotation", "step"}; a fleet's notice adds "also": [ids] or "fleet"
ASK_AGAIN = "ask_again"
ROTATE_NEXT = "rotate_next"
REQUEST = "request"  # value "<rotation id>:<request name>": what a waiting step offers
ROTATE_KEY_NOW = "rotate_key_now"  # value "USER ENV": starts kind iam-key
FLEET_CONFIRM = "fleet_confirm"  # value {"fleet": ID}: the one confirmation of a fleet's plan
FLEET_APPROVE = "fleet_approve"  # value {"fleet": ID, "step": S, "shown": {rotation: digest}}
ACTIONS = (APPROVE, REJECT, RETRY, CANCEL, HOLD, ASK_AGAIN, ROTATE_NEXT, REQUEST, ROTATE_KEY_NOW,
           FLEET_CONFIRM, FLEET_APPROVE)

# The button for each request a step may offer (`Engine.offers`), and whether it confirms.
REQUEST_LABELS = {"reactivate": "Reactivate old key", "rollback": "Roll back"}
REQUEST_CONFIRMS = {"rollback": ("Roll back?", "AWSCURRENT moves back to the version before "
                                 "this rotation, and the consumers are redeployed again.",
                                 "Roll back")}

BUTTON_VALUE_CHARS = 2000  # Slack's limit on what a button carries

COMMAND = "/rotate"
HELP = f"""\
*{COMMAND}* runs credential rotations from the runbooks, step by step, in a thread.
`{COMMAND} APP ENV [--compromised]` start rotating APP's database credentials in ENV
`{COMMAND} plan APP ENV` dry run: the steps and what preflight finds (only you see it)
`{COMMAND} status [APP ENV | ID]` where a rotation is
`{COMMAND} list` active and recent rotations
`{COMMAND} cancel ID` stop a rotation, leaving the app on credentials that work
`{COMMAND} APP ENV --cleanup` drop the users cancelled rotations left (after an approval)
`{COMMAND} retry ID` run a rotation's failed step again
`{COMMAND} all ENV [--compromised]` · `{COMMAND} APP1,APP2,… ENV` a fleet: the plan, then one \
confirmation
`{COMMAND} key USER ENV` · `{COMMAND} keys [ENV]` · `{COMMAND} secret SECRET_ID ENV` · \
`{COMMAND} admin DATABASE ENV` other runbooks
`{COMMAND} help` this text"""
USAGE = (f"Usage: `{COMMAND} APP ENV`, `{COMMAND} plan APP ENV`, `{COMMAND} status [APP ENV | ID]`,"
         f" `{COMMAND} list`, `{COMMAND} cancel ID`, `{COMMAND} retry ID` (`{COMMAND} help` "
         "for more)")

SYMBOL = {"done": ":white_check_mark:", "skipped": ":heavy_minus_sign:", "failed": ":x:",
          "waiting": ":hourglass_flowing_sand:", "needs-approval": ":raising_hand:",
          "running": ":arrow_forward:", "pending": ":white_small_square:"}

P = ParamSpec("P")
R = TypeVar("R")
Message = tuple[str, list[dict[str, Any]]]


def _safe(obj: Any) -> Any:
    if isinstance(obj, str):
        return redact.redact(obj)
    if isinstance(obj, dict):
        return {k: _safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_safe(v) for v in obj)
    return obj


def redacted(builder: Callable[P, R]) -> Callable[P, R]:
    """Redact every string a builder returns: the one gate between Rotor and Slack."""

    @functools.wraps(builder)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return _safe(builder(*args, **kwargs))

    return wrapper


def escape(value: object) -> str:
    """Text from outside Rotor, shown exactly as it is: the one escaping function.

    `&`, `<` and `>` become Slack's entities, so nothing turns into a mention, a channel ping
    or a link; the value sits in an inline code span, inside which Slack applies no `*bold*`,
    `_italic_` or `~strike~`; a backtick, which would end the span, is shown as ˋ (U+02CB),
    and a line break as a space (a span is one line).
    """
    text = (str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("`", "\u02cb").replace("\r", " ").replace("\n", " "))
    return f"`{text}`" if text.strip() else ""


def unescape(text: str) -> str:
    """Undo Slack's encoding of typed text (`&amp;`, `&lt;`, `&gt;`), so it is escaped once."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


REFUSED_WORKSPACE = "only members of the workspace Rotor is installed in may use it"


def when(ts: float | None) -> str:
    """A time every reader sees in their own time zone."""
    if ts is None:
        return "-"
    fallback = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(ts)}^{{date_short_pretty}} at {{time}}|{fallback}>"


def user(actor: str | None) -> str:
    """Slack users as mentions (with "from the CLI" for an operator); Rotor by name; an
    operator who maps to no one by their AWS principal."""
    if not actor:
        return "someone"
    who, via = person(actor), principal(actor)
    if _is_user_id(who):
        return f"<@{who}>" + (" (from the CLI)" if via else "")
    if actor == "rotor":
        return "Rotor"
    return escape(who)


def _is_user_id(text: str) -> bool:
    return text[:1] in "UW" and text[1:].isalnum() and text.isupper() and len(text) > 2


def _is_link(text: str) -> bool:
    """A link Slack itself gave Rotor (a permalink): https, and nothing that ends a link."""
    return text.startswith("https://") and not any(c in text for c in "<>|& \n")


def value(rotation_id: int, step: str | None = None, **extra: Any) -> str:
    """What a button carries back: which rotation and step it is about."""
    return json.dumps({"rotation": rotation_id, "step": step, **extra}, separators=(",", ":"))


def _title(rotation: RotationRow) -> str:
    return f"rotation #{rotation.id}: {rotation.kind} {rotation.target} in {rotation.env}"


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text[:3000]}]}


def _button(label: str, action_id: str, button_value: str, *, style: str | None = None,
            confirm: dict[str, Any] | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {"type": "button", "action_id": action_id, "value": button_value,
                              "text": {"type": "plain_text", "text": label}}
    if style:
        button["style"] = style
    if confirm:
        button["confirm"] = confirm
    return button


def _confirm(title: str, text: str, yes: str) -> dict[str, Any]:
    return {"title": {"type": "plain_text", "text": title[:100]},
            "text": {"type": "mrkdwn", "text": text[:300]},
            "confirm": {"type": "plain_text", "text": yes},
            "deny": {"type": "plain_text", "text": "Not now"}, "style": "danger"}


def _actions(*buttons: dict[str, Any]) -> dict[str, Any]:
    return {"type": "actions", "elements": list(buttons)}


# -- replies to commands and clicks (ephemeral) ------------------------------------------

# What is wrong with a garbled /rotate, by name (handlers.commands fills in the values).
# Values named in TYPED are what someone typed, and go through `escape`.
PROBLEMS = {
    "unknown-option": "unknown option {option} (the options are {only})",
    "one-flag": "{flags} do not go together",
    "cleanup-apps": "--cleanup drops the database users a cancelled rotation of an app left: "
                    "`/rotate APP ENV --cleanup`",
    "misplaced-flag": "{flag} goes with starting a rotation, not with `{verb}`",
    "no-arguments": "`{verb}` takes no arguments, got {got}",
    "one-id": "`{verb}` takes one rotation ID, like `{verb} 12`",
    "not-an-id": "{word} is not a rotation ID; IDs are numbers, like `{verb} 12`",
    "needs-app-env": "`{shape}` needs an app and an environment (environments: {envs})",
    "needs-args": "`{shape}` needs {args}",
    "unexpected": "unexpected {extra} after `{shape}`",
    "swapped": "app first, then environment: `{fixed}`",
    "invalid-target": "{target} is not a valid {what}",
}
TYPED = ("option", "got", "word", "extra", "target")


def unknown_word(word: str, closest: str | None) -> str:
    hint = f" (did you mean `{closest}`?)" if closest else ""
    return f"unknown subcommand or app {escape(word)}{hint}"



@redacted
def usage(problem: str) -> str:
    """`problem` is Rotor's sentence, its typed values already through `escape`."""
    return f"{problem}\n{USAGE}"


@redacted
def help_text() -> str:
    return HELP


@redacted
def not_available(what: str, kind: str) -> str:
    return (f"`{COMMAND} {what}` is not available yet: this Rotor has no `{kind}` rotation "
            "kind.")


@redacted
def refused(error: BaseException) -> str:
    """A refused command or click: one line, why. A policy refusal names people as mentions;
    any other error's text is escaped (it may carry what someone typed, or a database's
    words)."""
    if isinstance(error, PolicyRefusal):
        return (f":no_entry: {user(error.who)} may not {error.what} in {error.env}; ask "
                f"{_who(error.ask)}")
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f":no_entry: {escape(line)}"


def _who(entries: Sequence[str]) -> str:
    ids = [e for e in entries if re.fullmatch(r"[SUW][A-Z0-9]+", e)]
    return ", ".join(f"<!subteam^{e}>" if e.startswith("S") else f"<@{e}>" for e in ids) \
        or "anyone"


@redacted
def internal_error() -> str:
    return ":warning: Something went wrong inside Rotor; nothing more was done. The details are in its log."


@redacted
def started(rotation: RotationRow, channel: str) -> str:
    return (f":arrow_forward: Started {_title(rotation)}. Follow it in {channel_ref(channel)}; "
            "approvals are asked for in its thread.")


def channel_ref(channel: str) -> str:
    if channel.startswith("#"):
        return channel
    return f"<#{channel}>"


@redacted
def plan(kind: str, target: str, env: str, steps: Sequence[Any], found: str) -> str:
    lines = [f"*Plan: {kind} rotation of {target} in {env}* (nothing was changed)"]
    for number, step in enumerate(steps, 1):
        mark = " _(destructive: needs approval)_" if step.destructive else ""
        lines.append(f"{number}. `{step.name}` {step.title}{mark}")
    lines.append(f"Preflight found: {escape(found) or 'nothing to report'}")
    return "\n".join(lines)


@redacted
def status(rotations: Sequence[RotationRow], links: dict[int, str | None]) -> str:
    if not rotations:
        return "No rotations yet."
    return "\n".join(_status_line(r, links.get(r.id)) for r in rotations)


@redacted
def no_rotation_of(target: str, env: str) -> str:
    return f"No rotation of {target} in {env} yet."


def _status_line(rotation: RotationRow, link: str | None) -> str:
    title = f"#{rotation.id} {rotation.kind} {rotation.target} in {rotation.env}"
    if link:
        title = f"<{link}|{title}>"
    return (f"{_rotation_symbol(rotation)} {title}: {phase_text(rotation)} · {rotation.progress}"
            f" · started by {user(rotation.initiator)} {when(rotation.created_at)}")


@redacted
def status_detail(rotation: RotationRow, link: str | None) -> str:
    lines = [_status_line(rotation, link)]
    lines += [_checklist_line(step) for step in rotation.steps]
    return "\n".join(lines)


@redacted
def listing(active: Sequence[RotationRow], recent: Sequence[RotationRow],
            links: dict[int, str | None]) -> str:
    lines = ["*Active rotations*"]
    lines += [_status_line(r, links.get(r.id)) for r in active] or ["none"]
    finished = [r for r in recent if r.status != ACTIVE]
    if finished:
        lines.append("*Recently finished*")
        lines += [_status_line(r, links.get(r.id)) for r in finished]
    return "\n".join(lines)


@redacted
def cancel_requested(rotation: RotationRow) -> str:
    if rotation.status == CANCELLED:
        return f":x: Cancelled {_title(rotation)}."
    return (f":hourglass_flowing_sand: Cancel of {_title(rotation)} requested; the worker running "
            "it finishes the cancel.")


@redacted
def retrying(rotation: RotationRow) -> str:
    step = rotation.current
    return f":repeat: Retrying `{step.name if step else '-'}` of {_title(rotation)}."


# -- the thread --------------------------------------------------------------------------


def _rotation_symbol(rotation: RotationRow) -> str:
    if rotation.status == DONE:
        return SYMBOL["done"]
    if rotation.status == CANCELLED:
        return ":no_entry_sign:"
    return SYMBOL.get(rotation.phase, SYMBOL["running"])


def phase_text(rotation: RotationRow) -> str:
    """What the rotation waits on, and since when, in a few words."""
    if rotation.status == DONE:
        return f"done {when(rotation.finished_at)}"
    if rotation.status == CANCELLED:
        return f"cancelled by {user(rotation.cancel_requested_by)} {when(rotation.finished_at)}"
    step = rotation.current
    if step is None:
        return "finishing"
    if rotation.cancel_requested_by:
        return f"cancelling (requested by {user(rotation.cancel_requested_by)})"
    if step.status == "needs-approval":
        if step.expired_at:
            return (f"paused: the approval of `{step.name}` expired {when(step.expired_at)}; "
                    "ask for it again")
        return f"waiting for approval of `{step.name}` since {when(step.gate_requested_at)}"
    if step.status == "waiting":
        return (f"`{step.name}` waiting for {escape(step.wait_reason or '')} since "
                f"{when(step.waiting_since)}")
    if step.status == "failed":
        return f"stopped: `{step.name}` failed: {escape(step.error or '')}"
    if step.status == "running":
        return f"running `{step.name}`"
    return f"next: `{step.name}`"


def _checklist_line(step: StepRow) -> str:
    note = ""
    if step.status in ("done", "skipped") and step.result:
        note = f": {escape(_clip(step.result))}"
    elif step.status == "failed" and step.error:
        note = f": {escape(_clip(step.error))}"
    elif step.status == "waiting" and step.wait_reason:
        note = f": waiting for {escape(_clip(step.wait_reason))}"
    elif step.status == "needs-approval":
        note = ": needs approval"
    return f"{SYMBOL.get(step.status, '•')} {step.position + 1}. {step.title}{note}"


def _clip(text: str, limit: int = 240) -> str:
    """Shorten before escaping, so a cut never splits an entity or a code span."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


@redacted
def root(rotation: RotationRow) -> Message:
    head = (f"*Rotation #{rotation.id}: {rotation.target} in {rotation.env}* ({rotation.kind}"
            f"{', compromised' if rotation.params.get('compromised') else ''}"
            f"{', cleanup' if rotation.params.get('cleanup') else ''})")
    state = f"{_rotation_symbol(rotation)} {phase_text(rotation)} · *{rotation.progress}*"
    started_by = f"Started by {user(rotation.initiator)} {when(rotation.created_at)}"
    checklist = "\n".join(_checklist_line(step) for step in rotation.steps)
    text = (f"Rotation #{rotation.id} of {rotation.target} in {rotation.env}: "
            f"{rotation.progress}")
    return text, [_section(f"{head}\n{state}"), _context(started_by), _section(checklist)]


@redacted
def step_result(rotation: RotationRow, row: AuditRow) -> Message:
    status = row.to_status or ""
    text = f"{SYMBOL.get(status, '•')} `{row.step}` {status}" + (f": {escape(row.detail)}"
                                                                if row.detail else "")
    return text, [_section(text)]


@redacted
def waiting(rotation: RotationRow, row: AuditRow) -> Message:
    text = f"{SYMBOL['waiting']} `{row.step}` waiting for {escape(row.detail or '')}"
    return text, [_section(text)]


@redacted
def resumed(rotation: RotationRow, row: AuditRow) -> Message:
    text = f":repeat: `{row.step}` resumed after a restart ({escape(row.detail or '')})"
    return text, [_section(text)]


@redacted
def approval_request(rotation: RotationRow, step: StepRow, summary: str, destructive: bool,
                     approvers: str, four_eyes: bool, note: str = "") -> Message:
    """What will happen, with Approve and Reject; a guided step gets one "Done" button."""
    target = value(rotation.id, step.name)
    if step.gate_digest:  # the Approve click approves exactly what this message shows
        current = step.gate_summary == summary
        target = value(rotation.id, step.name,
                       shown=step.gate_digest[:16] if current else "superseded")
    summary = escape(summary)
    if step.guided:
        text = f":point_right: `{step.name}` needs a person: {summary}"
        done = _button("Done", APPROVE, target, style="primary",
                       confirm=_confirm("Is it done?", summary, "It is done"))
        return text, [_section(f":point_right: *{step.title}*: do this, then click Done.\n"
                               f"{summary}"), _actions(done)]
    who = " ".join(filter(None, (note, f"Approvers: {approvers}")))
    if four_eyes:
        who += f" (not {user(rotation.initiator)}: four-eyes)"
    text = f"{SYMBOL['needs-approval']} `{step.name}` needs approval: {summary}"
    approve = _button("Approve", APPROVE, target, style="primary",
                      confirm=_confirm("Approve a destructive step?",
                                       f"{step.title} in {rotation.env}: {summary}", "Approve")
                      if destructive else None)
    reject = _button("Reject", REJECT, target, style="danger")
    danger = ":warning: *Destructive.* " if destructive else ""
    blocks = [_section(f"{danger}{SYMBOL['needs-approval']} *{step.title}* needs approval.\n"
                       f"{summary}"), _context(who), _actions(approve, reject)]
    return text, blocks


@redacted
def approval_closed(rotation: RotationRow, step_name: str, summary: str, how: str,
                    actor: str | None, at: float | None) -> Message:
    """The approval message once decided: who, what and when, no buttons."""
    marks = {"approved": ":white_check_mark: Approved", "done": ":white_check_mark: Done",
             "rejected": ":x: Rejected",
             "expired": ":alarm_clock: Expired", "held": ":raised_hand: Held",
             "ran": ":white_check_mark: No hold; it ran",
             "asked-again": ":repeat: Asked again", "cancelled": ":no_entry_sign: Cancelled"}
    by = f" by {user(actor)}" if how not in ("expired", "ran") else ""
    text = f"{marks.get(how, how)}{by} {when(at)}: `{step_name}`"
    return text, [_section(f"{text}\n{escape(summary)}")]


@redacted
def approval_expired(rotation: RotationRow, step: StepRow) -> Message:
    text = (f":alarm_clock: Nobody approved `{step.name}` in time, so the rotation is paused "
            "(not failed). Ask for the approval again to carry on.")
    button = _button("Ask again", ASK_AGAIN, value(rotation.id, step.name))
    return text, [_section(text), _actions(button)]


@redacted
def reminder(rotation: RotationRow, step: StepRow, approvers: str) -> Message:
    text = (f":bell: Reminder: `{step.name}` has waited for approval since "
            f"{when(step.gate_requested_at)}. Approvers: {approvers}")
    return text, [_section(text)]


def _failed(row: AuditRow, rejected_by: str | None) -> str:
    why = f"rejected by {user(rejected_by)}" if rejected_by else escape(row.detail or "")
    return f"{SYMBOL['failed']} `{row.step}` failed: {why}"


@redacted
def failure(rotation: RotationRow, row: AuditRow, rejected_by: str | None = None) -> Message:
    text = _failed(row, rejected_by)
    retry = _button("Retry", RETRY, value(rotation.id, row.step), style="primary")
    cancel = _button("Cancel rotation", CANCEL, value(rotation.id, row.step), style="danger",
                     confirm=_confirm("Cancel the rotation?",
                                      f"Rotor undoes what is unsafe to leave and keeps "
                                      f"{rotation.target} on credentials that work.", "Cancel it"))
    return text, [_section(text), _actions(retry, cancel)]


@redacted
def failure_closed(rotation: RotationRow, row: AuditRow, how: str, actor: str | None,
                   at: float | None, rejected_by: str | None = None) -> Message:
    verb = {"retried": ":repeat: Retried", "cancelled": ":no_entry_sign: Cancelled"}.get(how, how)
    text = _failed(row, rejected_by)
    return text, [_section(text), _context(f"{verb} by {user(actor)} {when(at)}")]


@redacted
def second_line_told(rotation: RotationRow, row: AuditRow, hold_until: float | None
                     ) -> Message:
    link = row.detail or ""
    where = f"<{link}|the notice>" if _is_link(link) else escape(link)
    text = f":mega: 2nd line told before `{row.step}` runs ({where})."
    if not hold_until:
        return text, [_section(text)]
    return text, [_section(f"{text} It runs after {when(hold_until)} unless someone holds it."),
                  _actions(_button("Hold", HOLD, value(rotation.id, row.step), style="danger"))]


@redacted
def asked_for(rotation: RotationRow, row: AuditRow) -> Message:
    """Someone asked a rotation for something: to cancel, or what a step offers (roll back)."""
    what = "a cancel" if row.event == "cancel-requested" else escape(row.detail or "")
    text = f":hourglass_flowing_sand: {user(row.actor)} asked for {what}"
    return text, [_section(text)]


def request_value(rotation_id: int, name: str) -> str:
    """What a request button carries back: "<rotation id>:<request name>"."""
    return f"{rotation_id}:{name}"


def _request_label(name: str) -> str:
    return REQUEST_LABELS.get(name, name.replace("-", " ").capitalize())


@redacted
def offers(rotation: RotationRow, step: StepRow, names: Sequence[str]) -> Message:
    """While a step waits, a button per request it honours (Reactivate old key, Roll back)."""
    what = " or ".join(f"*{_request_label(n)}*" for n in names)
    text = f":point_right: While `{step.name}` waits, {what} is available."
    buttons = []
    for name in names:
        confirm = REQUEST_CONFIRMS.get(name)
        buttons.append(_button(_request_label(name), REQUEST, request_value(rotation.id, name),
                               style="danger" if confirm else None,
                               confirm=_confirm(*confirm) if confirm else None))
    return text, [_section(f"{text}\n{escape(step.wait_reason or '')}".strip()),
                  _context("The environment's starters and approvers may press it."),
                  _actions(*buttons)]


@redacted
def offers_closed(rotation: RotationRow, step_name: str, names: Sequence[str],
                  at: float | None) -> Message:
    """The offer once the step stopped honouring it: no buttons."""
    what = ", ".join(_request_label(n) for n in names)
    text = f":lock: {what}: no longer offered by `{step_name}` ({when(at)})"
    return text, [_section(text)]


@redacted
def cancelled(rotation: RotationRow, row: AuditRow) -> Message:
    text = (f":no_entry_sign: Cancelled by {user(row.actor)}: "
            f"{escape(row.detail or '') or 'nothing to undo'}")
    return text + chain_head(row), [_section(text + chain_head(row))]
def chain_head(row: AuditRow | None) -> str:
    """The audit chain's head when a rotation ends, kept in Slack, outside the database:
    `rotor audit --verify` and this line together show a chain rewritten after the fact."""
    if row is None or not row.hash:
        return ""
    return f"\nAudit chain head: #{row.id} `{row.hash[:16]}`"


@redacted
def finished(rotation: RotationRow, next_envs: Iterable[str],
             row: AuditRow | None = None) -> Message:
    text = (f":tada: Rotation #{rotation.id} of {rotation.target} in {rotation.env} is done."
            + chain_head(row))
    blocks: list[dict[str, Any]] = [_section(text)]
    buttons = [_button(f"Rotate {env} next", ROTATE_NEXT,
                       value(rotation.id, None, env=env), style="primary")
               for env in next_envs]
    if buttons:
        blocks.append(_actions(*buttons))
    return text, blocks


@redacted
def second_line_notice(rotation: RotationRow, step: StepRow, summary: str, approved_by: str,
                       group: str | None, link: str | None, also: Sequence[int] = ()
                       ) -> Message:
    """What 2nd line is told before a destructive step runs. `also`: the other rotations a
    fleet's notice names, which its Hold holds too."""
    ping = f"<!subteam^{group}> " if group else ""
    where = f" (<{link}|thread>)" if link and _is_link(link) else ""
    text = (f"{ping}:warning: Rotor is about to run `{step.name}` on {rotation.target} in "
            f"{rotation.env}: {escape(summary)}. Approved by {user(approved_by)}{where}.")
    hold = _button("Hold", HOLD, _hold_value(rotation, step, also), style="danger",
                   confirm=_confirm("Hold this step?", "It will need approving again.", "Hold"))
    return text, [_section(text), _actions(hold)]


def _hold_value(rotation: RotationRow, step: StepRow, also: Sequence[int]) -> str:
    """The notice's rotation and the others it names; when their ids pass Slack's limit on a
    button's value, its fleet instead, whose apps approved at the step are held."""
    if not also:
        return value(rotation.id, step.name)
    named = value(rotation.id, step.name, also=list(also))
    if len(named) <= BUTTON_VALUE_CHARS or rotation.fleet_id is None:
        return named
    return value(rotation.id, step.name, fleet=rotation.fleet_id)


# -- App Home ------------------------------------------------------------------------------


@redacted
def home(active: Sequence[RotationRow], links: dict[int, str | None]) -> dict[str, Any]:
    waiting = [r for r in active if r.phase == "needs-approval"]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": "Rotor"}},
        _section("*Waiting for approval*"),
    ]
    blocks += [_section(_status_line(r, links.get(r.id))) for r in waiting] or [
        _context("Nothing is waiting for approval.")]
    blocks.append({"type": "divider"})
    blocks.append(_section("*Active rotations*"))
    blocks += [_section(_status_line(r, links.get(r.id))) for r in active] or [
        _context(f"No rotation is running. Start one with `{COMMAND} APP ENV`.")]
    return {"type": "home", "blocks": blocks[:100]}
