"""Logs: ROTOR_LOG_FORMAT=json gives one JSON object a line, a step's lines carrying the
rotation ID and the step as fields, secrets masked; ROTOR_LOG_LEVEL is checked; APScheduler
says nothing at INFO."""

from __future__ import annotations

import io
import json
import logging

import pytest

from bot.settings import Settings
from bot.wiring import setup_logging
from demo.slack_api import FakeSlack
from rotation import redact
from rotation.engine import _StepLog
from rotation.errors import ConfigError
from tests.slackbot import SECRET_PASSWORD, BotProcess


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.NOTSET)


def test_json_lines_carry_the_rotation_and_step(restore_logging) -> None:
    out = io.StringIO()
    setup_logging("INFO", out, fmt="json")
    redact.register("hunter2-hunter2-hunter2")
    _StepLog(logging.getLogger("rotor.engine"), {"step": "promote", "rotation": 7}).info(
        "done: %s with %s", "AWSCURRENT moved", "hunter2-hunter2-hunter2")
    logging.getLogger("rotor.serve").warning("serve: plain")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["rotation_id"] == 7 and lines[0]["step"] == "promote"
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "rotor.engine"
    assert lines[0]["message"].startswith("promote: #7 done: AWSCURRENT moved with ")
    assert "hunter2" not in out.getvalue()
    assert lines[1]["message"] == "serve: plain" and "step" not in lines[1]


def test_the_scheduler_is_quiet_at_info(restore_logging) -> None:
    setup_logging("INFO", io.StringIO())
    assert not logging.getLogger("apscheduler.executors.default").isEnabledFor(logging.INFO)
    assert logging.getLogger("apscheduler").isEnabledFor(logging.WARNING)
    setup_logging("DEBUG", io.StringIO())
    assert logging.getLogger("apscheduler.executors.default").isEnabledFor(logging.INFO)


def test_bad_settings_are_one_line_errors(tmp_path) -> None:
    config = tmp_path / "rotor.yml"
    config.write_text("environments: {staging: {aws_region: eu-west-1}}\n")
    for env, message in (({"ROTOR_LOG_FORMAT": "xml"}, "ROTOR_LOG_FORMAT: 'xml'"),
                         ({"ROTOR_LOG_LEVEL": "LOUD"}, "ROTOR_LOG_LEVEL: 'LOUD'")):
        with pytest.raises(ConfigError, match=message):
            Settings.load(env, str(config))
    assert Settings.load({"ROTOR_LOG_LEVEL": "debug"}, str(config)).log_level == "DEBUG"


def test_rotor_serve_logs_json(tmp_path) -> None:
    with FakeSlack() as slack:
        bot = BotProcess(tmp_path, slack).start(ROTOR_LOG_FORMAT="json")
        try:
            bot.command("signon staging")
            bot.wait_step("signon", "staging", "switch", "needs-approval")
            bot.wait_log("approval needed")
        finally:
            assert bot.stop() == 0
    lines = [json.loads(line) for line in bot.log().splitlines() if line.strip()]
    steps = {(line.get("rotation_id"), line.get("step")) for line in lines}
    assert (1, "create-user") in steps and (1, "switch") in steps
    assert SECRET_PASSWORD not in bot.log()
    assert not [line for line in lines if line["logger"].startswith("apscheduler")]
