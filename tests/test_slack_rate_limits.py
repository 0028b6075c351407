"""`rotor serve` against a Slack that enforces its rate limits: production rotations finish,
decisions go before progress, nothing is posted twice, and the engine never waits on Slack."""

from __future__ import annotations

from pathlib import Path

from bot import slack as slack_api
from bot.reporter import Reporter
from bot.settings import Settings
from bot.wiring import build_engine
from demo.slack_api import FakeSlack
from rotation.engine import NOTICE_WAIT
from rotation.policy import Policy
from tests.rig import drive
from tests.slackbot import APPS, BOT_TOKEN, GROUPS, BotProcess, assert_posted_once


def notices(slack: FakeSlack, app: str) -> list[str]:
    return [m.text for m in slack.channel_messages("#govuk-2ndline") if f" on {app} " in m.text]


def to_drop(bot: BotProcess, app: str) -> int:
    bot.command(f"{app} production", user="U0ALICE")
    return int(bot.wait_status(app, "production", "active")["id"])


def test_a_delivery_pass_posts_every_decision_before_any_progress_update(tmp_path,
                                                                          monkeypatch):
    apps = list(APPS[:3])
    with FakeSlack(groups=dict(GROUPS)) as slack:
        slack.enforce_limits()
        bot = BotProcess(tmp_path, slack)  # its configuration and scripted kind
        bot.control.mkdir()
        bot.write_config()
        env = bot.env()
        monkeypatch.setenv("ROTOR_TEST_CONTROL", env["ROTOR_TEST_CONTROL"])
        settings = Settings.load(env)
        engine = build_engine(settings)
        client = slack_api.limited_client(BOT_TOKEN, slack.url)
        reporter = Reporter(engine, client,
                            Policy(settings.catalogue, slack_api.GroupMembers(client)),
                            schedule_retry=lambda delay: None)
        ids = [engine.start("mysql", app, "staging", "U0ALICE", {}).id for app in apps]
        for rotation_id in ids:
            assert drive(engine, rotation_id, approver=None).current.name == "switch"
        assert reporter.deliver()
        roots = {bot.root_for(rotation_id).ts for rotation_id in ids}
        # Each rotation's progress and its next decision (the drop) queue up; one pass
        # delivers them all.
        for rotation_id in ids:
            engine.approve(rotation_id, "switch", "U0BOB")
            assert drive(engine, rotation_id, approver=None).current.name == "drop-old-user"
        since = len(slack.calls)
        assert reporter.deliver()
        calls = [c for c in slack.calls[since:] if c.status == 200]
        asks = [i for i, c in enumerate(calls) if c.method == "chat.postMessage"
                and "DROP USER" in c.text() and "approve" in c.text()]
        progress = [i for i, c in enumerate(calls)
                    if c.method == "chat.update" and c.params.get("ts") in roots]
        assert len(asks) == len(apps) and len(progress) == len(apps)
        assert max(asks) < min(progress)  # every decision before any progress update
        for rotation_id in ids:
            assert_posted_once(slack, rotation_id)


def test_under_slack_limits_production_rotations_finish_posting_once(tmp_path: Path):
    apps = list(APPS[:3])
    with FakeSlack(groups=dict(GROUPS)) as slack:
        slack.declare("#govuk-2ndline")
        slack.enforce_limits()
        bot = BotProcess(tmp_path, slack).start()
        try:
            ids = {app: to_drop(bot, app) for app in apps}
            for app in apps:
                bot.click(bot.button(ids[app], "approve", "switch", timeout=90), user="U0BOB")
            for app in apps:
                bot.click(bot.button(ids[app], "approve", "drop-old-user", timeout=90),
                          user="U0DAVE")
            for app in apps:
                bot.wait_status(app, "production", "done", timeout=90)
                bot.thread_text(ids[app], ":tada:", timeout=90)
        finally:
            bot.stop()
        for app in apps:
            assert len(notices(slack, app)) == 1
            assert_posted_once(slack, ids[app])
        # Paced by the limiter, Slack rarely has to say no; a 429 only delayed a call.
        posted = [c for c in slack.calls if c.status == 200]
        for limited in slack.limited():
            assert any((c.method, c.params) == (limited.method, limited.params) for c in posted)


def test_while_slack_rate_limits_the_notice_the_engine_goes_on_with_other_rotations(
        tmp_path: Path):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        slack.declare("#govuk-2ndline")
        bot = BotProcess(tmp_path, slack).start()
        try:
            waiting, other = "signon", "whitehall"
            first = to_drop(bot, waiting)
            bot.click(bot.button(first, "approve", "switch"), user="U0BOB")
            drop = bot.button(first, "approve", "drop-old-user")
            second = to_drop(bot, other)
            switch = bot.button(second, "approve", "switch")

            # Every post and update: 429, Retry-After 3 (who may approve is still answered).
            slack.rate_limit(10**6, retry_after=3, methods=(
                "chat.postMessage", "chat.update", "chat.getPermalink",
                "conversations.history", "conversations.replies", "conversations.join"))
            bot.click(drop, user="U0DAVE")  # 2nd line must be told first: Slack says wait
            bot.wait_rows("SELECT s.status, s.wait_reason, r.lease_owner FROM steps s JOIN "
                          "rotations r ON r.id = s.rotation_id WHERE s.rotation_id = ? AND "
                          "s.name = 'drop-old-user'", first,
                          until=lambda rows: rows == [("waiting", NOTICE_WAIT, None)],
                          what="the drop to wait for its notice, its worker free")
            bot.click(switch, user="U0BOB")  # the engine is not stuck behind Slack
            bot.wait_step(other, "production", "drop-old-user", "needs-approval")
            assert not notices(slack, waiting)
            assert bot.rotation(waiting, "production")["steps"]["drop-old-user"] == "waiting"  # type: ignore[index]
            assert [c for c in slack.calls[-20:] if c.status == 429]  # still rate limited

            slack.rate_limit(0)
            bot.wait_status(waiting, "production", "done", timeout=90)
            bot.thread_text(first, ":tada:", timeout=90)
        finally:
            bot.stop()
        assert len(notices(slack, waiting)) == 1
        assert "second-line-requested" in {r[0] for r in bot.rows(
            "SELECT event FROM audit WHERE rotation_id = ?", first)}
        assert_posted_once(slack, first)
