"""`/metrics`: scraped while `rotor serve` runs rotations, the values move as they should."""

from __future__ import annotations

import sqlite3

from prometheus_client.parser import text_string_to_metric_families

from tests.slackbot import BotProcess, running_bot


def scrape(bot: BotProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = bot.get("/metrics")
    assert answer.status == 200
    found = {}
    for family in text_string_to_metric_families(answer.body):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def test_metrics_move_with_a_rotation(tmp_path) -> None:
    with running_bot(tmp_path) as bot:
        before = scrape(bot)
        assert value(before, "rotor_approvals_waiting") == 0
        assert value(before, "rotor_rotations", kind="mysql", env="staging",
                     status="active") is None

        bot.command("signon staging")
        rotation_id = bot.wait_step("signon", "staging", "switch", "needs-approval")["id"]
        waiting = bot.wait_for(lambda: scrape(bot), lambda m: value(
            m, "rotor_approvals_waiting") == 1, what="one approval waiting in /metrics")
        assert value(waiting, "rotor_rotations", kind="mysql", env="staging",
                     status="active") == 1
        assert value(waiting, "rotor_approval_oldest_age_seconds") >= 0
        assert value(waiting, "rotor_step_duration_seconds_count", kind="mysql",
                     step="create-user") == 1
        assert value(waiting, "rotor_slack_backlog") is not None

        # A wait, by its reason.
        (bot.control / "block-sync").touch()
        bot.click(bot.button(rotation_id, "approve", "switch"), user="U0BOB")
        bot.wait_step("signon", "staging", "sync", "waiting")
        synced = bot.wait_for(lambda: scrape(bot), lambda m: value(
            m, "rotor_waits", kind="mysql", step="sync", reason="the ExternalSecret to sync")
            == 1, what="the sync wait in /metrics")
        assert value(synced, "rotor_approvals_waiting") == 0

        # A failure, by step.
        (bot.control / "fail").touch()
        (bot.control / "block-sync").unlink()
        bot.wait_step("signon", "staging", "login", "failed")
        failed = bot.wait_for(lambda: scrape(bot), lambda m: value(
            m, "rotor_step_failures_total", kind="mysql", step="login") == 1,
            what="the failed login in /metrics")
        assert value(failed, "rotor_rotations", kind="mysql", env="staging",
                     status="failed") == 1
        assert value(failed, "rotor_rotations", kind="mysql", env="staging",
                     status="active") is None

        # Done: retried, approved, finished.
        (bot.control / "fail").unlink()
        bot.click(bot.button(rotation_id, "retry", "login"), user="U0ALICE")
        bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0BOB")
        bot.wait_status("signon", "staging", "done")
        done = bot.wait_for(lambda: scrape(bot), lambda m: value(
            m, "rotor_rotations", kind="mysql", env="staging", status="done") == 1,
            what="the finished rotation in /metrics")
        assert value(done, "rotor_approvals_waiting") == 0
        assert value(done, "rotor_step_duration_seconds_count", kind="mysql",
                     step="drop-old-user") == 1
        # The final message carries the audit chain's head at that moment (tests/test_audit.py).
        [(row_id, digest)] = bot.rows("SELECT id, hash FROM audit WHERE rotation_id = ? AND "
                                      "event = 'finished'", rotation_id)
        bot.thread_text(rotation_id, f"Audit chain head: #{row_id} `{digest[:16]}`")

        # Slack delivered everything, the scheduler ran, and the key-age count is read back.
        delivered = bot.wait_for(lambda: scrape(bot), lambda m: value(
            m, "rotor_slack_backlog") == 0 and any(
                name == "rotor_scheduler_last_run_timestamp_seconds" and value > 0
                for (name, _), value in m.items()), what="no backlog and a scheduler run")
        assert value(delivered, "rotor_slack_lag_seconds") == 0
        with sqlite3.connect(bot.state) as db:
            db.execute("INSERT INTO kv VALUES ('metrics:keys-past-max-age:staging', '3')")
        assert value(scrape(bot), "rotor_iam_keys_past_max_age", env="staging") == 3
