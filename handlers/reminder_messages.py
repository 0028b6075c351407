"""What the scheduler says in Slack: key-age checks (and `/rotate keys`), and daily nudges
while a step waits for a person. Built like `handlers.messages`, with its primitives: every
string is redacted, and text from outside Rotor goes through `messages.escape`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from handlers.messages import (
    COMMAND,
    ROTATE_KEY_NOW,
    Message,
    _actions,
    _button,
    _context,
    _section,
    _title,
    escape,
    redacted,
    when,
)
from rotation.iam import KeyAgeReport, KeyFinding
from rotation.store import RotationRow, StepRow

# -- key-age reminders and approval nudges (bot.reminders, `/rotate keys`) ---------------------



def _key_line(finding: KeyFinding) -> str:
    mark = ":rotating_light:" if finding.overdue else ":warning:"
    state = "overdue" if finding.overdue else "due soon"
    used = when(finding.last_used) if finding.last_used else "never"
    return (f"{mark} {escape(finding.user)} key {finding.slot} is *{finding.age_days} days "
            f"old* ({state}; created {when(finding.created)}, last used {used})")


def _key_counts(report: KeyAgeReport) -> str:
    return (f"{len(report.overdue)} overdue (older than {report.max_age_days} days), "
            f"{len(report.due_soon)} due soon ({report.warn_days} days or more), of "
            f"{report.active_keys:,} active keys of {report.users:,} users")


@redacted
def key_age_summary(report: KeyAgeReport) -> Message:
    """The one channel message of a key-age check; each user gets a thread reply."""
    head = f"*Access keys in {report.env}*"
    if not report.findings:
        text = (f":white_check_mark: {head}: no active key is {report.warn_days} days old or "
                f"more ({report.active_keys:,} active keys of {report.users:,} users)")
        return text, [_section(text)]
    text = f":key: {head}: {_key_counts(report)}."
    users = len(report.by_user())
    note = (f"One reply per user in the thread ({users}); \"Rotate now\" starts the rotation "
            "for users in rotor.yml.")
    return text, [_section(text), _context(f"Checked {when(report.checked_at)}. {note}")]


@redacted
def key_age_user(report: KeyAgeReport, user_name: str,
                 findings: Sequence[KeyFinding]) -> Message:
    """A thread reply for one user's old keys, with "Rotate now" when Rotor knows the user."""
    lines = "\n".join(_key_line(f) for f in findings)
    text = lines.split("\n")[0]
    blocks: list[dict[str, Any]] = [_section(lines)]
    if findings and findings[0].rotatable:
        blocks.append(_actions(_button("Rotate now", ROTATE_KEY_NOW,
                                       f"{user_name} {report.env}", style="primary")))
    else:
        blocks.append(_context(f"{escape(user_name)} is not in rotor.yml for {report.env}: "
                               "rotate it by hand (runbook: AWS IAM Key Rotation), or add it "
                               "to `iam_users`."))
    return text, blocks


@redacted
def key_age_failed(env: str, error: BaseException) -> Message:
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = (f":warning: The key-age check of {env} failed: {escape(line)}. Run "
            f"`{COMMAND} keys {env}` to try again.")
    return text, [_section(text)]


@redacted
def key_age_reply(reports: Sequence[KeyAgeReport]) -> str:
    """`/rotate keys [ENV]`: every environment's findings, for the person who asked."""
    parts = []
    for report in reports:
        parts.append(f"*Access keys in {report.env}*: {_key_counts(report)}")
        parts += [_key_line(f) for f in report.findings[:40]]
        if len(report.findings) > 40:
            parts.append(f"… and {len(report.findings) - 40} more (`rotor keys {report.env}`)")
    return "\n".join(parts)[:3900]


@redacted
def still_waiting(rotation: RotationRow, step: StepRow, now: float) -> Message:
    """The daily reminder in a rotation's thread while a step waits for a person."""
    whole = int((now - (step.gate_requested_at or now)) // 86400)
    waited = f"{whole} day{'' if whole == 1 else 's'}"
    if step.guided:
        what = f"`{step.name}` has waited {waited} for someone to do it and click Done"
    elif step.expired_at:
        what = (f"`{step.name}` has waited {waited} for approval; the rotation is paused, "
                "ask for the approval again to carry on")
    else:
        what = f"`{step.name}` has waited {waited} for approval"
    text = f":bell: {what} (since {when(step.gate_requested_at)}). {_title(rotation)}."
    return text, [_section(text)]
