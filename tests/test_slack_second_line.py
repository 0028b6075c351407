"""2nd line is told exactly once, even when Slack's answer is lost; a channel Rotor may not
use is said in the thread and on /readyz, and never silently drops a rotation's messages."""

from __future__ import annotations

from pathlib import Path

from demo.slack_api import FakeSlack
from tests.slack_kinds import STEPS
from tests.slackbot import GROUPS, BotProcess, assert_posted_once


def production_until_drop(bot: BotProcess, app: str) -> int:
    bot.command(f"{app} production", user="U0ALICE")
    rotation_id = int(bot.wait_status(app, "production", "active")["id"])
    bot.click(bot.button(rotation_id, "approve", "switch"), user="U0BOB")
    bot.wait_step(app, "production", "drop-old-user", "needs-approval")
    return rotation_id


def notices(slack: FakeSlack, app: str) -> list[str]:
    return [m.text for m in slack.channel_messages("#govuk-2ndline") if f" on {app} " in m.text]


def test_a_notice_whose_answer_was_lost_is_found_not_posted_again(tmp_path: Path):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        slack.declare("#govuk-2ndline")  # a real channel exists before Rotor posts in it
        bot = BotProcess(tmp_path, slack).start()
        try:
            rotation_id = production_until_drop(bot, "signon")
            slack.lose_responses(1, channel="#govuk-2ndline")
            bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0DAVE")
            # The engine tries the notice again after 30 s; it finds the first one.
            bot.wait_status("signon", "production", "done", timeout=90)
            bot.wait_for(lambda: any(":tada:" in t for t in bot.thread_text(rotation_id)),
                         what="the finish")
        finally:
            bot.stop()
        assert len(notices(slack, "signon")) == 1
        assert "the notice was posted before; not posting again" in bot.log()
        assert slack.calls_to("conversations.join")  # to read the channel's history
        assert_posted_once(slack, rotation_id)


def test_a_private_notice_channel_is_said_in_the_thread_and_on_readyz(tmp_path: Path):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        slack.make_private("#govuk-2ndline")  # Rotor was never invited there
        bot = BotProcess(tmp_path, slack).start()
        try:
            rotation_id = production_until_drop(bot, "signon")
            bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0DAVE")
            bot.wait_step("signon", "production", "drop-old-user", "failed", timeout=30)
            failure = bot.wait_for(lambda: [t for t in bot.thread_text(rotation_id)
                                            if "`drop-old-user` failed" in t], what="failure")
            assert "not_in_channel" in failure[0] and "invite @rotor" in failure[0]
            readyz = bot.get("/readyz")
            assert readyz.status == 200  # still answering Slack
            assert "warning: Rotor cannot post or read in the 2nd line channel" in readyz.body

            slack.invite("#govuk-2ndline")
            bot.click(bot.button(rotation_id, "retry"), user="U0ALICE")
            # The retried drop asks again: its approval was spent on the failed attempt.
            bot.wait_step("signon", "production", "drop-old-user", "needs-approval", timeout=30)
            bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0DAVE")
            bot.wait_status("signon", "production", "done", timeout=30)
            bot.wait_for(lambda: any(":tada:" in t for t in bot.thread_text(rotation_id)),
                         what="the finish")
            bot.wait_for(lambda: bot.get("/readyz").body == "ready\n", what="the warning gone")
        finally:
            bot.stop()
        assert len(notices(slack, "signon")) == 1
        assert_posted_once(slack, rotation_id)


def test_a_rotation_channel_rotor_is_not_in_keeps_its_messages_until_invited(tmp_path: Path):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        bot = BotProcess(tmp_path, slack)
        bot.write_config()
        config = tmp_path / "rotor.yml"
        config.write_text(config.read_text().replace('channel: "#govuk-developers"',
                                                     'channel: "#private-ops"'))
        slack.make_private("#private-ops")
        bot.start()
        try:
            bot.command("signon staging", user="U0ALICE")
            bot.wait_step("signon", "staging", "switch", "needs-approval")
            bot.wait_for(lambda: "warning: Rotor cannot post or read in #private-ops"
                         in bot.get("/readyz").body, what="the warning on /readyz")
            assert slack.roots() == []

            slack.invite("#private-ops")  # someone types /invite @rotor
            rotation_id = int(bot.rotation("signon", "staging")["id"])  # type: ignore[index]
            bot.click(bot.button(rotation_id, "approve", "switch", timeout=60), user="U0BOB")
            bot.click(bot.button(rotation_id, "approve", "drop-old-user", timeout=30),
                      user="U0BOB")
            bot.wait_status("signon", "staging", "done")
            bot.wait_for(lambda: any(":tada:" in t for t in bot.thread_text(rotation_id)),
                         what="the finish", timeout=30)
            bot.wait_for(lambda: bot.get("/readyz").body == "ready\n", what="the warning gone")
        finally:
            bot.stop()
        thread = "\n".join(bot.thread_text(rotation_id))
        for step in STEPS:  # nothing from before the invite was dropped
            assert f"`{step}` done" in thread
        assert_posted_once(slack, rotation_id)
