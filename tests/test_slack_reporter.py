"""The reporter in this process, with the engine's commits landing exactly where a loaded
machine lets them land: between the reporter's reads of one rotation."""

from __future__ import annotations

from typing import Any

from bot import slack as slack_api
from bot.reporter import Reporter
from bot.settings import Settings
from bot.wiring import build_engine
from demo.slack_api import FakeSlack
from rotation.policy import Policy
from tests.rig import drive
from tests.slackbot import BOT_TOKEN, GROUPS, SECRET_PASSWORD, BotProcess


def test_an_approval_asked_for_while_the_reporter_reads_still_asks_to_confirm(tmp_path,
                                                                              monkeypatch):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        bot = BotProcess(tmp_path, slack)  # its configuration, scripted kind and readers
        bot.control.mkdir()
        (bot.control / "password").write_text(SECRET_PASSWORD)
        bot.write_config()
        env = bot.env()
        monkeypatch.setenv("ROTOR_TEST_CONTROL", env["ROTOR_TEST_CONTROL"])
        settings = Settings.load(env)
        engine = build_engine(settings)
        client = slack_api.web_client(BOT_TOKEN, slack.url)
        reporter = Reporter(engine, client,
                            Policy(settings.catalogue, slack_api.GroupMembers(client)),
                            schedule_retry=lambda delay: None)

        rotation = engine.start("mysql", "signon", "staging", "U0ALICE", {})
        assert drive(engine, rotation.id, approver=None).current.name == "switch"
        engine.approve(rotation.id, "switch", "U0BOB")
        assert reporter.deliver()

        # The worker runs on to the destructive step's approval while the reporter is
        # between reading the rotation and reading its new audit rows.
        read_rows = engine.store.audit_rows

        def rows_after_the_worker(rotation_id: int | None = None, *args: Any,
                                  **kwargs: Any) -> Any:
            if rotation_id == rotation.id:
                monkeypatch.setattr(engine.store, "audit_rows", read_rows)
                assert drive(engine, rotation.id, approver=None).current.name == "drop-old-user"
            return read_rows(rotation_id, *args, **kwargs)

        monkeypatch.setattr(engine.store, "audit_rows", rows_after_the_worker)
        assert reporter.deliver()

        drop = bot.button(rotation.id, "approve", "drop-old-user")
        assert drop["confirm"]["title"]["text"] == "Approve a destructive step?"
