"""The scheduler's side: approval reminders and expiry, and 2nd line's hold period."""

from __future__ import annotations

from tests.slackbot import BotProcess, running_bot


def start(bot: BotProcess, app: str, env: str, user: str = "U0ALICE") -> int:
    bot.command(f"{app} {env}", user=user)
    rotation = bot.wait_status(app, env, "active")
    return int(rotation["id"])


def messages_with(bot: BotProcess, rotation_id: int, text: str) -> list:
    return [m for m in bot.slack.thread(bot.root_for(rotation_id)) if text in m.everything()]


def test_an_unanswered_approval_is_reminded_once_then_pauses_until_asked_again(tmp_path):
    # Reminder after 0.6 s, expiry after 1.8 s.
    with running_bot(tmp_path, remind_minutes=0.01, expire_hours=0.0005) as bot:
        rotation_id = start(bot, "signon", "staging")
        bot.wait_for(lambda: messages_with(bot, rotation_id, ":bell: Reminder: `switch`"),
                     what="a reminder")
        expired = bot.wait_for(lambda: messages_with(bot, rotation_id, "Ask again"),
                               what="the expiry notice")[0]
        rotation = bot.rotation("signon", "staging")
        assert rotation and rotation["status"] == "active" and rotation["steps"]["switch"] == "needs-approval"
        assert len(messages_with(bot, rotation_id, ":bell: Reminder")) == 1
        request = messages_with(bot, rotation_id, ":alarm_clock: Expired")[0]
        assert request.buttons() == [] and "Point signon at signon_2" in request.everything()

        # An expired approval cannot be given; asking again reopens it.
        bot.click({"action_id": "approve", "value": f'{{"rotation":{rotation_id},'
                                                    f'"step":"switch"}}'}, user="U0BOB")
        bot.wait_reply("expired; ask for it again")
        bot.click(expired.buttons()[0], user="U0ALICE")
        bot.wait_for(lambda: "Asked again by <@U0ALICE>" in expired.text, what="asked again")
        bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
        bot.wait_step("signon", "staging", "switch", "done")


def test_second_line_can_hold_a_destructive_step_during_the_hold_period(tmp_path):
    with running_bot(tmp_path, hold=30) as bot:
        rotation_id = start(bot, "signon", "production")
        bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
        bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0CAROL")
        notice = bot.wait_for(lambda: bot.slack.channel_messages("#govuk-2ndline"),
                              what="the 2nd line notice")[0]
        bot.wait_step("signon", "production", "drop-old-user", "waiting")
        told = bot.wait_for(lambda: messages_with(bot, rotation_id, "unless someone holds it"),
                            what="the hold offer in the thread")[0]
        assert [b["action_id"] for b in told.buttons()] == ["hold"]

        bot.click(notice.buttons()[0], user="U0ERIN")  # 2nd line, in neither list
        bot.wait_step("signon", "production", "drop-old-user", "needs-approval")
        again = bot.wait_for(lambda: messages_with(bot, rotation_id, "it needs approving again"),
                             what="a new approval request naming the hold")[0]
        assert "Held by <@U0ERIN>" in again.everything()
        assert [b["action_id"] for b in again.buttons()] == ["approve", "reject"]
        assert messages_with(bot, rotation_id, "Approved by <@U0CAROL>")
        assert told.buttons() == [] and "Held by <@U0ERIN>" in told.text
        runs = bot.rows("SELECT COUNT(*) FROM audit WHERE step = 'drop-old-user' AND "
                        "to_status = 'done'")
        assert runs == [(0,)]
