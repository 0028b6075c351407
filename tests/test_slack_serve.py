"""`rotor serve` itself: health in both modes, a clean SIGTERM, configuration errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from demo.slack_api import FakeSlack
from tests.slackbot import BotProcess, running_bot


def test_http_mode_answers_health_and_stops_cleanly_on_sigterm(tmp_path):
    with running_bot(tmp_path) as bot:
        assert (bot.get("/healthz").status, bot.get("/healthz").body) == (200, "ok\n")
        assert (bot.get("/readyz").status, bot.get("/readyz").body) == (200, "ready\n")
        assert bot.get("/slack/events").status == 405
        assert bot.get("/nowhere").status == 404
        bot.command("signon staging")
        bot.wait_step("signon", "staging", "switch", "needs-approval")
        started = time.monotonic()
        assert bot.stop(signal.SIGTERM, timeout=60) == 0
        # Inside Kubernetes' default 30 s grace period, with room for a loaded machine (a
        # quiet one takes well under a second).
        assert time.monotonic() - started < 25
        log = bot.log()
        assert "serve: HTTP mode" in log and "serve: stopped" in log
        assert "Traceback" not in log
        # Leases and the reporter's lock are released for the next process.
        assert bot.rows("SELECT COUNT(*) FROM rotations WHERE lease_owner IS NOT NULL") == [(0,)]


def test_socket_mode_answers_health_while_it_cannot_reach_slack(tmp_path):
    with FakeSlack() as slack:  # it does not speak apps.connections.open: never connected
        bot = BotProcess(tmp_path, slack).start(ready="/healthz", SLACK_APP_TOKEN="xapp-1-test",
                                                SLACK_SIGNING_SECRET="")
        try:
            assert bot.get("/healthz").status == 200
            readyz = bot.get("/readyz")
            assert readyz.status == 503 and "not connected to Slack" in readyz.body
            assert bot.get("/slack/events").status == 404  # no HTTP endpoint in Socket Mode
            bot.wait_for(lambda: slack.calls_to("apps.connections.open"), what="a connect try")
            bot.wait_log("Socket Mode connection failed")
        finally:
            assert bot.stop() == 0


def test_without_slack_tokens_it_runs_workers_and_health_only(tmp_path):
    with FakeSlack() as slack:
        bot = BotProcess(tmp_path, slack).start(SLACK_BOT_TOKEN="", SLACK_SIGNING_SECRET="")
        try:
            assert bot.get("/readyz").status == 200
            assert bot.get("/slack/events").status == 404
            bot.wait_log("without Slack (no SLACK_BOT_TOKEN)")
        finally:
            assert bot.stop() == 0
        assert slack.calls == []


def test_http_mode_without_a_signing_secret_refuses_to_start(tmp_path):
    with FakeSlack() as slack:
        bot = BotProcess(tmp_path, slack)
        bot.write_config()
        result = subprocess.run([sys.executable, "-m", "bot.cli", "serve"],
                                env=bot.env(SLACK_SIGNING_SECRET=""), capture_output=True,
                                text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "rotor: HTTP mode needs SLACK_SIGNING_SECRET (or set SLACK_APP_TOKEN for Socket Mode)")


def test_request_locks_are_pruned_hourly_a_day_after_they_expire(tmp_path):
    from bot.serve import Service
    from bot.settings import Settings
    from tests.slackbot import free_port

    (tmp_path / "rotor.yml").write_text("environments: {staging: {aws_region: eu-west-1}}\n")
    now = time.time()
    service = Service(Settings.load({"ROTOR_CONFIG": str(tmp_path / "rotor.yml"),
                                     "ROTOR_STATE": str(tmp_path / "rotor.db"),
                                     "PORT": str(free_port())}),
                      host="127.0.0.1", clock=lambda: now)
    try:
        assert service.http.server_address[0] == "127.0.0.1"
        service._schedule()
        assert service.scheduler.get_job("prune-request-locks").trigger.interval.total_seconds() \
            == 3600
        store = service.engine.store
        for name, until in (("slack-request:old", now - 2 * 86400),
                            ("slack-request:recent", now - 3600),
                            ("reminders:old", now - 2 * 86400)):
            store.try_lock(name, "someone", until)
        service._prune_request_locks()
        names = {r[0] for r in store.db.execute("SELECT name FROM locks").fetchall()}
        assert names == {"slack-request:recent", "reminders:old"}
    finally:
        service.http.server_close()
