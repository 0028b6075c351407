"""Block Kit builders on their own: redaction at the gate, guided steps, escaping."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from handlers import messages
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
