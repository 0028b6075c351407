"""The scheduler's side: approval reminders and expiry, and 2nd line's hold period."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from demo.slack_api import FakeSlack
from tests.slackbot import GROUPS, BotProcess, running_bot


def start(bot: BotProcess, app: str, env: str, user: str = "U0ALICE") -> int:
    bot.command(f"{app} {env}", user=user)
    rotation = bot.wait_status(app, env, "active")
    return int(rotation["id"])


@contextmanager
def serving(workdir: Path, slack: FakeSlack, **settings: Any) -> Iterator[BotProcess]:
    """`rotor serve` on the state DB in `workdir`, with rotor.yml written for `settings`."""
    bot = BotProcess(workdir, slack, **settings)
    bot.write_config()
    bot.start()
    try:
        yield bot
    finally:
        bot.stop()


def test_an_unanswered_approval_is_reminded_once_then_pauses_until_asked_again(tmp_path):
    # Each timer gets a process of its own (the state DB carries on), so they never race
    # however slowly the machine runs: an approval that expired is not reminded of, and one
    # asked for again would expire again in 1.8 s.
    with FakeSlack(groups=dict(GROUPS)) as slack:
        with serving(tmp_path, slack, remind_minutes=0.01) as bot:  # reminded after 0.6 s
            rotation_id = start(bot, "signon", "staging")
            bot.message(rotation_id, ":bell: Reminder: `switch`")

        with serving(tmp_path, slack, remind_minutes=0.01, expire_hours=0.0005) as bot:
            expired = bot.message(rotation_id, "Ask again")  # expired after 1.8 s
            rotation = bot.rotation("signon", "staging")
            assert rotation and rotation["status"] == "active"
            assert rotation["steps"]["switch"] == "needs-approval"
            request = bot.message(rotation_id, ":alarm_clock: Expired")
            assert request.buttons() == [] and "Point signon at signon_2" in request.everything()
            assert len([m for m in bot.thread(rotation_id)
                        if ":bell: Reminder" in m.everything()]) == 1

        with serving(tmp_path, slack) as bot:  # reminders after an hour, expiry after a day
            # An expired approval cannot be given; asking again reopens it.
            bot.click({"action_id": "approve", "value": f'{{"rotation":{rotation_id},'
                                                        f'"step":"switch"}}'}, user="U0BOB")
            bot.wait_reply("expired; ask for it again")
            bot.click(expired.buttons()[0], user="U0ALICE")
            bot.message(rotation_id, "Asked again by <@U0ALICE>")
            bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
            bot.wait_step("signon", "staging", "switch", "done")


def test_second_line_can_hold_a_destructive_step_during_the_hold_period(tmp_path):
    with running_bot(tmp_path, hold=600) as bot:  # far longer than the test takes
        rotation_id = start(bot, "signon", "production")
        bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
        bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0CAROL")
        notice = bot.wait_for(lambda: bot.slack.channel_messages("#govuk-2ndline"),
                              lambda notices: notices and notices[0].buttons(),
                              what="the 2nd line notice with its Hold button")[0]
        bot.wait_step("signon", "production", "drop-old-user", "waiting")
        told = bot.message(rotation_id, "unless someone holds it")
        assert [b["action_id"] for b in told.buttons()] == ["hold"]

        bot.click(notice.buttons()[0], user="U0ERIN")  # 2nd line, in neither list
        bot.wait_step("signon", "production", "drop-old-user", "needs-approval")
        again = bot.message(rotation_id, "it needs approving again")
        assert "Held by <@U0ERIN>" in again.everything()
        assert [b["action_id"] for b in again.buttons()] == ["approve", "reject"]
        bot.message(rotation_id, "Approved by <@U0CAROL>")
        bot.wait_for(lambda: (told.text, told.buttons()),
                     lambda now: "Held by <@U0ERIN>" in now[0] and now[1] == [],
                     what="the hold offer to say who held it, without its button")
        runs = bot.rows("SELECT COUNT(*) FROM audit WHERE step = 'drop-old-user' AND "
                        "to_status = 'done'")
        assert runs == [(0,)]
