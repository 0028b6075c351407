"""Block Kit builders on their own: redaction at the gate, guided steps, escaping."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from typing import Any

import pytest

from handlers import BadRequest, actions, messages, reminder_messages
from rotation import redact
from rotation.store import RotationRow, StepRow


def step(**values: Any) -> StepRow:
    blank: dict[str, Any] = {f.name: None for f in fields(StepRow)}
    blank.update(rotation_id=7, position=5, name="drop-old-user", title="Drop the old user",
                 destructive=1, status="needs-approval", attempts=1, checks=0)
    blank.update(values)
    return StepRow(**blank)


def rotation(*steps: StepRow) -> RotationRow:
    return RotationRow(id=7, kind="mysql", target="signon", env="production", status="active",
                       initiator="U0ALICE", params={}, data={}, created_at=1.8e9,
                       updated_at=1.8e9, finished_at=None, next_run_at=None, lease_owner=None,
                       lease_until=None, cancel_requested_by=None, steps=steps)


def buttons(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for b in blocks if b["type"] == "actions" for e in b["elements"]]


def test_a_destructive_approval_asks_for_confirmation_and_names_four_eyes():
    gate = step(gate="drop", gate_summary="DROP USER signon_1")
    text, blocks = messages.approval_request(rotation(gate), gate, "DROP USER signon_1", True,
                                             "<!subteam^S0SRE>", True)
    approve, reject = buttons(blocks)
    assert (approve["action_id"], reject["action_id"]) == ("approve", "reject")
    assert approve["confirm"]["title"]["text"] == "Approve a destructive step?"
    assert "confirm" not in reject
    assert "(not <@U0ALICE>: four-eyes)" in str(blocks)
    assert approve["value"] == '{"rotation":7,"step":"drop-old-user"}'


def test_a_guided_step_gets_one_done_button():
    gate = step(gate="guide:terraform", destructive=0)
    text, blocks = messages.approval_request(rotation(gate), gate, "Run terraform apply", False,
                                             "anyone", True)
    assert [b["text"]["text"] for b in buttons(blocks)] == ["Done"]
    assert "needs a person" in text and "four-eyes" not in str(blocks)


def test_a_fleet_notices_hold_carries_the_apps_it_names_or_else_its_fleet():
    gate = step(gate="drop")
    member = replace(rotation(gate), fleet_id=3)

    def hold(also: list[int]) -> dict[str, Any]:
        _, blocks = messages.second_line_notice(member, gate, "DROP USER", "U0BOB", None, None,
                                                also=also)
        (button,) = buttons(blocks)
        assert len(button["value"]) <= messages.BUTTON_VALUE_CHARS
        return dict(json.loads(button["value"]))

    assert hold([]) == {"rotation": 7, "step": "drop-old-user"}  # a single rotation's
    assert hold([8, 9]) == {"rotation": 7, "step": "drop-old-user", "also": [8, 9]}
    assert hold(list(range(10_000, 10_400))) == {"rotation": 7, "step": "drop-old-user",
                                                 "fleet": 3}


@pytest.mark.parametrize("value", [
    '{"rotation":7,"step":"drop","also":["8"]}', '{"rotation":7,"step":"drop","also":[true]}',
    '{"rotation":7,"step":"drop","also":8}', '{"rotation":7,"step":"drop","fleet":"3"}',
])
def test_a_hold_naming_other_rotations_by_anything_but_ids_is_refused(value):
    with pytest.raises(BadRequest):
        actions.parse_hold({"value": value})


def test_every_builder_output_is_redacted():
    secret = "pw-Qx81Lm2Zt7Yc"
    redact.register(secret)
    failed = step(status="failed", error=f"login failed with {secret}")
    row = rotation(failed)
    assert secret not in messages.root(row)[0] + str(messages.root(row)[1])
    assert secret not in messages.status_detail(row, None)
    assert secret not in messages.refused(RuntimeError(f"bad {secret}"))
    gate = replace(failed, status="needs-approval")
    assert secret not in str(messages.approval_request(row, gate, f"use {secret}", False, "x",
                                                       False))


def test_policy_refusals_keep_their_mentions_and_other_errors_are_escaped():
    from rotation.policy import PolicyRefusal

    refused = messages.refused(PolicyRefusal("U0BOB", "approve", "production", ["S0SRE"]))
    assert refused == ":no_entry: <@U0BOB> may not approve in production; ask <!subteam^S0SRE>"
    assert messages.refused(RuntimeError("x <!here> y")) == ":no_entry: `x &lt;!here&gt; y`"


# -- text from outside Rotor, through every builder ----------------------------------------

from handlers.commands import parse  # noqa: E402
from rotation.catalogue import parse as parse_catalogue  # noqa: E402
from rotation.iam import KeyAgeReport, KeyFinding  # noqa: E402
from rotation.store import AuditRow  # noqa: E402

HOSTILE = "<!channel> <@U0EVIL> <https://x|Approve> & *bold* _it_ ~gone~ `code`"


def literally(value: str) -> str:
    """How Slack shows `value` as typed: in a code span (no *bold*, _italic_ or ~strike~),
    with Slack's three entities, and a backtick that cannot close the span."""
    entities = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`" + entities.replace("`", "\u02cb") + "`"


SHOWN = literally(HOSTILE)
WORD = "<!channel>&*bold*_it_~gone~`code`<@u0evil>"  # typed (the parser lower-cases it)
TOLD = f"told by the operator: {HOSTILE}"
EXPECTED = {"usage": literally(WORD), "second_line_told": literally(TOLD)}
# What must never reach Slack: a live mention, ping or link, a doubly escaped entity, or a
# backtick that closes Rotor's code span and lets the rest format.
LIVE = ("<!channel>", "<@U0EVIL>", "<https://x", "&amp;amp;", "&amp;lt;", "`code`")


def hostile_rotation() -> RotationRow:
    steps = (step(position=0, name="preflight", title="Preflight", destructive=0,
                  status="done", result=HOSTILE),
             step(position=1, name="sync", title="Sync", destructive=0, status="waiting",
                  wait_reason=HOSTILE, waiting_since=1.8e9),
             step(position=2, name="login", title="Log in", destructive=0, status="failed",
                  error=HOSTILE),
             step(position=3, gate="drop", gate_summary=HOSTILE))
    return replace(rotation(*steps), cancel_requested_by=None)


def row(**values: Any) -> AuditRow:
    base = {"id": 9, "rotation_id": 7, "step": "drop-old-user", "event": "step",
            "from_status": None, "to_status": "done", "actor": "U0ALICE", "at": 1.8e9,
            "detail": HOSTILE}
    return AuditRow(**{**base, **values})


def failed_rotation() -> RotationRow:
    failed = step(position=0, name="login", title="Log in", destructive=0, status="failed",
                  error=HOSTILE)
    return rotation(failed)


def waiting_rotation() -> RotationRow:
    waiting = step(position=0, name="sync", title="Sync", destructive=0, status="waiting",
                   wait_reason=HOSTILE, waiting_since=1.8e9)
    return rotation(waiting)


FINDING = KeyFinding(user=HOSTILE, slot=1, created=1.7e9, last_used=None, age_days=120,
                     overdue=True, rotatable=False)
REPORT = KeyAgeReport(env="staging", checked_at=1.8e9, users=3, active_keys=4,
                      max_age_days=90, warn_days=80, findings=(FINDING,))
CATALOGUE = parse_catalogue("environments: {staging: {aws_region: eu-west-1}}\n"
                            "apps: {signon: {engine: mysql}}\n")
R = hostile_rotation()
GATE = R.steps[3]

# Every builder, fed what comes from outside Rotor (None: it takes nothing from outside).
BUILDERS: dict[str, Any] = {
    "usage": lambda: parse(f"{WORD} staging", CATALOGUE, {}).reply,
    "refused": lambda: messages.refused(RuntimeError(HOSTILE)),
    "plan": lambda: messages.plan("mysql", "signon", "staging", [], HOSTILE),
    "status": lambda: messages.status([R, failed_rotation(), waiting_rotation()], {}),
    "status_detail": lambda: messages.status_detail(R, None),
    "listing": lambda: messages.listing([failed_rotation(), waiting_rotation()], [R], {}),
    "root": lambda: messages.root(R),
    "step_result": lambda: messages.step_result(R, row()),
    "waiting": lambda: messages.waiting(R, row()),
    "resumed": lambda: messages.resumed(R, row()),
    "approval_request": lambda: (messages.approval_request(R, GATE, HOSTILE, True, "anyone",
                                                           True),
                                 messages.approval_request(R, replace(GATE, gate="guide:x"),
                                                           HOSTILE, False, "anyone", False)),
    "approval_closed": lambda: messages.approval_closed(R, "drop-old-user", HOSTILE,
                                                        "approved", "U0BOB", 1.8e9),
    "failure": lambda: messages.failure(R, row(to_status="failed")),
    "failure_closed": lambda: messages.failure_closed(R, row(), "retried", "U0BOB", 1.8e9),
    "second_line_told": lambda: messages.second_line_told(
        R, row(detail=TOLD), None),
    "asked_for": lambda: messages.asked_for(R, row(event="requested")),
    "offers": lambda: messages.offers(R, waiting_rotation().steps[0], ["rollback"]),
    "cancelled": lambda: messages.cancelled(R, row(event="cancelled")),
    "second_line_notice": lambda: messages.second_line_notice(R, GATE, HOSTILE, "U0BOB",
                                                              "S0SECONDLINE", None),
    "home": lambda: messages.home([R, failed_rotation(), waiting_rotation()], {}),
    "key_age_user": lambda: reminder_messages.key_age_user(REPORT, HOSTILE, [FINDING]),
    "key_age_failed": lambda: reminder_messages.key_age_failed("staging", RuntimeError(HOSTILE)),
    "key_age_reply": lambda: reminder_messages.key_age_reply([REPORT]),
    # Rotor's own words, catalogue names and Slack IDs only:
    "help_text": None, "not_available": None, "internal_error": None, "started": None,
    "no_rotation_of": None, "cancel_requested": None, "retrying": None, "reminder": None,
    "approval_expired": None, "offers_closed": None, "finished": None,
    "key_age_summary": None, "still_waiting": None,
}


def test_every_builder_is_in_the_hostile_table():
    builders = {name for module in (messages, reminder_messages)
                for name, fn in vars(module).items()
                if callable(fn) and hasattr(fn, "__wrapped__")}
    assert builders == set(BUILDERS)


@pytest.mark.parametrize("name", [n for n, fn in BUILDERS.items() if fn is not None])
def test_text_from_outside_rotor_is_shown_literally_by_every_builder(name):
    out = json.dumps(BUILDERS[name](), ensure_ascii=False)
    shown = json.dumps(EXPECTED.get(name, SHOWN), ensure_ascii=False)[1:-1]
    assert shown in out, f"{name} does not show the value escaped, once"
    for live in LIVE:
        assert live.lower() not in out.replace(shown, "").lower(), f"{name} lets {live!r} in"


def test_the_one_escaping_function():
    assert messages.escape(HOSTILE) == SHOWN == (
        "`&lt;!channel&gt; &lt;@U0EVIL&gt; &lt;https://x|Approve&gt; &amp; *bold* _it_ "
        "~gone~ \u02cbcode\u02cb`")
    assert messages.escape("") == "" and messages.escape("a\nb") == "`a b`"
    assert messages.unescape("&lt;!here&gt; &amp;lt;") == "<!here> &lt;"
