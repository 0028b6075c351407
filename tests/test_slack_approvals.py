"""Buttons in the thread: approvals, four-eyes, 2nd line, failures, refusals and double clicks."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.slackbot import BotProcess, running_bot


@pytest.fixture(scope="module")
def bot(slack, tmp_path_factory) -> Iterator[BotProcess]:
    with running_bot(tmp_path_factory.mktemp("approvals"), slack) as process:
        yield process


def start(bot: BotProcess, app: str, env: str, user: str = "U0ALICE") -> int:
    bot.command(f"{app} {env}", user=user)
    rotation = bot.wait_status(app, env, "active")
    bot.wait_step(app, env, "switch", "needs-approval")
    return int(rotation["id"])


def test_approvals_replace_their_buttons_and_the_rotation_finishes(bot, slack, apps):
    app = apps()
    rotation_id = start(bot, app, "staging")
    approve = bot.button(rotation_id, "approve")
    assert bot.click(approve, user="U0BOB").status == 200
    bot.wait_step(app, "staging", "drop-old-user", "needs-approval")

    decided = bot.message(rotation_id, "Approved by <@U0BOB>")
    assert decided.buttons() == [] and "`switch`" in decided.text
    drop = bot.button(rotation_id, "approve", "drop-old-user")
    assert drop["confirm"]["title"]["text"] == "Approve a destructive step?"
    bot.click(drop, user="U0CAROL")
    bot.wait_status(app, "staging", "done")

    finished = bot.message(rotation_id, ":tada:")
    assert [b["text"]["text"] for b in finished.buttons()] == ["Rotate production next"]
    bot.root_for(rotation_id, "6/6 done")
    bot.thread_text(rotation_id, *(f"`{step}` done" for step in (
        "preflight", "create-user", "sync", "login", "drop-old-user")))
    # Staging has no 2nd line notice.
    assert slack.channel_messages("#govuk-2ndline") == []


def test_production_needs_a_second_person_and_tells_second_line_first(bot, slack, apps):
    app = apps()
    rotation_id = start(bot, app, "production", user="U0ALICE")
    before = bot.changes()
    bot.click(bot.button(rotation_id, "approve"), user="U0ALICE")
    refusal = bot.wait_reply("needs a second person")
    assert refusal.startswith(":no_entry:") and "\n" not in refusal
    assert bot.changes() == before

    bot.click(bot.button(rotation_id, "approve"), user="U0MALLORY")
    assert "<@U0MALLORY> may not approve in production" in bot.wait_reply("U0MALLORY")
    assert bot.changes() == before

    bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
    bot.wait_step(app, "production", "drop-old-user", "needs-approval")
    bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0DAVE")  # in S0SRE
    bot.wait_status(app, "production", "done")

    notices = bot.wait_for(lambda: [m for m in slack.channel_messages("#govuk-2ndline")
                                    if app in m.text], what="the 2nd line notice")
    assert len(notices) == 1
    notice = notices[0]
    assert notice.text.startswith("<!subteam^S0SECONDLINE> ")
    assert f"DROP USER {app}_1" in notice.text and "Approved by <@U0DAVE>" in notice.text
    root = bot.root_for(rotation_id)
    assert f"p{root.ts.replace('.', '')}" in notice.text  # links to the thread
    # The notice went out before the drop ran.
    rows = bot.rows("SELECT event, step, to_status FROM audit WHERE rotation_id = ? "
                    "ORDER BY id", rotation_id)
    assert rows.index(("second-line-notified", "drop-old-user", None)) < rows.index(
        ("step", "drop-old-user", "done"))
    bot.message(rotation_id, "2nd line told before `drop-old-user`")


def test_a_double_click_approves_once(bot, apps):
    app = apps()
    rotation_id = start(bot, app, "staging")
    button = bot.button(rotation_id, "approve")
    answers = []
    clicks = [threading.Thread(target=lambda u=u: answers.append(bot.click(button, user=u)))
              for u in ("U0BOB", "U0CAROL", "U0BOB")]
    for click in clicks:
        click.start()
    for click in clicks:
        click.join()
    assert [a.status for a in answers] == [200, 200, 200]
    bot.wait_step(app, "staging", "drop-old-user", "needs-approval")
    # The losers are told, whichever check caught them ("already decided", "not waiting").
    bot.wait_for(lambda: sum(f"rotation #{rotation_id} step switch" in str(c.params)
                             for c in bot.slack.responses()) == 2, what="two refusals")
    approvals = bot.rows("SELECT COUNT(*) FROM audit WHERE rotation_id = ? AND event = "
                         "'approved'", rotation_id)
    assert approvals == [(1,)]
    runs = bot.rows("SELECT COUNT(*) FROM audit WHERE rotation_id = ? AND step = 'sync' AND "
                    "to_status = 'running'", rotation_id)
    assert runs == [(1,)]


def test_clicks_on_finished_unknown_or_malformed_rotations_change_nothing(bot, apps):
    app = apps()
    rotation_id = start(bot, app, "staging")
    stale = bot.button(rotation_id, "approve")
    bot.command(f"cancel {rotation_id}")
    bot.wait_status(app, "staging", "cancelled")
    before = bot.changes()

    bot.click(stale)
    assert bot.wait_reply(f"rotation #{rotation_id} is cancelled; nothing to do")
    bot.click({"action_id": "approve", "value": '{"rotation":99999,"step":"switch"}'})
    bot.wait_reply("no rotation #99999")
    bot.click({"action_id": "retry", "value": "not json"})
    bot.wait_reply("that button's payload is not one Rotor made")
    bot.click({"action_id": "approve", "value": '{"rotation":"1; DROP"}'})
    bot.wait_reply("that button's payload names no rotation")
    bot.click({"action_id": "hold", "value": f'{{"rotation":{rotation_id}}}'})
    bot.wait_reply("that button names no step")
    assert bot.changes() == before

    garbled = bot.post(b"payload=%7Bnot-json")  # signed, but not a payload at all
    assert 400 <= garbled.status < 500
    unknown = bot.post(bot.action_body("launch_missiles", "{}"))
    assert unknown.status == 404
    assert bot.changes() == before


def test_request_and_rotate_now_clicks_that_are_refused_change_nothing(bot, apps):
    app = apps()
    rotation_id = start(bot, app, "production")  # waits for approval: it offers nothing
    bot.button(rotation_id, "approve")  # the thread has caught up with the approval request
    assert not any(b["action_id"] == "request" for m in bot.thread(rotation_id)
                   for b in m.buttons())
    before = bot.changes()

    bot.click({"action_id": "request", "value": f"{rotation_id}:rollback"}, user="U0MALLORY")
    refusal = bot.wait_reply("may not ask for that in production")
    assert refusal.startswith(":no_entry: <@U0MALLORY>") and "\n" not in refusal
    bot.click({"action_id": "request", "value": f"{rotation_id}:rollback"}, user="U0CAROL")
    bot.wait_reply(f"rotation #{rotation_id} does not offer rollback now")
    bot.click({"action_id": "request", "value": "rollback"})
    bot.wait_reply("that button's payload is not one Rotor made")
    bot.click({"action_id": "rotate_key_now", "value": "govuk-ci production"}, user="U0MALLORY")
    bot.wait_reply("<@U0MALLORY> may not start or change rotations in production")
    bot.click({"action_id": "rotate_key_now", "value": "govuk-ci"}, user="U0ALICE")
    bot.wait_reply("names no IAM user and environment")
    bot.click({"action_id": "rotate_key_now", "value": "govuk-ci staging"}, user="U0ALICE")
    bot.wait_reply("unknown IAM user 'govuk-ci'")  # not in rotor.yml's iam_users
    assert bot.changes() == before


def test_a_failed_step_offers_retry_and_cancel(bot, apps):
    app = apps()
    fail = bot.control / "fail"
    fail.write_text("")
    try:
        rotation_id = start(bot, app, "staging")
        bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
        bot.wait_step(app, "staging", "login", "failed")
        failure = bot.message(rotation_id, "`login` failed", where=lambda m: m.buttons())
        assert "login as" in failure.text and "failed with password [redacted]" in failure.text
        assert [b["action_id"] for b in failure.buttons()] == ["retry", "cancel"]
        assert failure.buttons()[1]["confirm"]["confirm"]["text"] == "Cancel it"
    finally:
        fail.unlink()
    bot.click(failure.buttons()[0], user="U0BOB")
    bot.wait_step(app, "staging", "drop-old-user", "needs-approval")
    retried = bot.message(rotation_id, "Retried by <@U0BOB>")
    assert retried.buttons() == []


def test_reject_then_cancel_from_the_thread(bot, apps):
    app = apps()
    rotation_id = start(bot, app, "staging")
    bot.click(bot.button(rotation_id, "reject"), user="U0BOB")
    bot.wait_step(app, "staging", "switch", "failed")
    bot.message(rotation_id, "Rejected by <@U0BOB>")
    failure = bot.message(rotation_id, "`switch` failed: rejected by <@U0BOB>",
                          where=lambda m: m.buttons())
    bot.click(failure.buttons()[1], user="U0CAROL")
    bot.wait_status(app, "staging", "cancelled")
    bot.message(rotation_id, "Cancelled by <@U0CAROL>")
    assert bot.wait_for(lambda: failure.buttons() == [], what="the buttons to go")


def test_rotate_next_starts_the_next_environment_as_the_clicker(bot, apps):
    app = apps()
    rotation_id = start(bot, app, "integration")
    bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
    bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0BOB")
    bot.wait_status(app, "integration", "done")
    offer = bot.button(rotation_id, "rotate_next")
    assert offer["text"]["text"] == "Rotate staging next"
    bot.click(offer, user="U0CAROL")
    bot.wait_reply(f"mysql {app} in staging")
    following = bot.wait_status(app, "staging", "active")
    assert bot.rows("SELECT initiator FROM rotations WHERE id = ?", following["id"]) == [
        ("U0CAROL",)]


def test_app_home_lists_active_rotations_and_those_waiting(bot, slack, apps):
    app = apps()
    rotation_id = start(bot, app, "staging")
    assert bot.event({"type": "app_home_opened", "user": "U0BOB", "channel": "D0BOB",
                      "tab": "home", "event_ts": "1.0"}).status == 200
    listed = f"#{rotation_id} mysql {app} in staging"
    bot.wait_for(lambda: [str(c.params["view"]) for c in slack.calls_to("views.publish")
                          if c.params.get("user_id") == "U0BOB"],
                 lambda views: any("Waiting for approval" in v and listed in v for v in views),
                 what=f"U0BOB's home to list {listed} as waiting for approval")
