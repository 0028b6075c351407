"""Scheduled reminders: the key-age check and the daily approval nudge.

Slack is the small fake Web API (`demo.slack_api`) spoken to by the real WebClient;
AWS is moto in-process; time is an injected clock set to the slot being tested.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from click.testing import CliRunner
from moto import mock_aws
from moto.iam.models import iam_backends
from slack_sdk import WebClient

from bot import reminders
from bot.cli import main
from demo.slack_api import FakeSlack
from handlers import messages
from rotation.engine import Engine
from rotation.errors import AwsError
from rotation.store import Store
from tests.test_iam import CONFIG, DAY, STAGING_ACCOUNT, USER, World

LONDON = ZoneInfo("Europe/London")
MONDAY_9 = datetime(2026, 7, 6, 9, 0, tzinfo=LONDON).timestamp()  # summer time: 08:00 UTC
CHANNEL = "#govuk-developers"


@pytest.fixture(scope="module")
def slack_server() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


@pytest.fixture
def slack(slack_server: FakeSlack) -> FakeSlack:
    """One fake Slack for the module (stopping one takes half a second), emptied per test."""
    slack_server.calls.clear()
    slack_server.messages.clear()
    slack_server.channels.clear()
    return slack_server


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with mock_aws():
        w = World(tmp_path)
        w.clock.now = MONDAY_9 + 30  # the Monday job fired half a minute ago
        yield w


def client(slack: FakeSlack) -> WebClient:
    return WebClient(token="xoxb-test", base_url=slack.url)


def seed_ages(world: World, ages: dict[str, float]) -> None:
    """Users with one key each, `ages` days old (set in moto's backend)."""
    backend = iam_backends[STAGING_ACCOUNT]["aws"]
    for name, age in ages.items():
        backend.create_user("eu-west-1", name)
        key = backend.create_access_key(name)
        key.create_date = datetime.fromtimestamp(world.clock() - age * DAY, UTC).replace(
            tzinfo=None
        )


AGES = {
    USER: 120,
    "legacy-uploader": 95,
    "search-indexer": 91,
    "cdn-logs": 85,
    "backups": 80.5,
    "fresh": 10,
}


def key_age_job(
    world: World, slack: FakeSlack, engine: Engine | None = None
) -> reminders.KeyAgeCheck:
    return reminders.KeyAgeCheck(
        engine or world.engine, client(slack), world.catalogue, "staging", world.clock
    )


# -- the key-age check -------------------------------------------------------------------------


def test_one_summary_and_a_thread_reply_per_user_with_rotate_now(world, slack):
    seed_ages(world, AGES)
    key_age_job(world, slack).run()
    [root] = slack.roots()
    assert root.channel == slack.channels[CHANNEL]
    assert "Access keys in staging" in root.text and "3 overdue" in root.text
    assert "2 due soon" in root.text
    replies = slack.thread(root)
    assert [r.text.split("`")[1] for r in replies] == [
        USER,
        "legacy-uploader",
        "search-indexer",
        "cdn-logs",
        "backups",
    ]
    buttons = [b for r in replies for b in r.buttons()]
    assert buttons == [
        {
            "type": "button",
            "action_id": messages.ROTATE_KEY_NOW,
            "value": f"{USER} staging",
            "style": "primary",
            "text": {"type": "plain_text", "text": "Rotate now"},
        }
    ]
    assert "not in rotor.yml" in str(replies[1].blocks)


def test_nothing_due_is_one_line(world, slack):
    seed_ages(world, {"fresh": 10})
    key_age_job(world, slack).run()
    [root] = slack.roots()
    assert "no active key is 80 days old or more" in root.text and not slack.thread(root)


def test_a_restart_part_way_carries_on_without_posting_twice(world, slack):
    seed_ages(world, AGES)
    real = WebClient.chat_postMessage
    posts = []

    def dies_after_three(self: WebClient, **kwargs: Any) -> Any:
        posts.append(kwargs)
        if len(posts) > 3:
            raise ConnectionResetError("the process was killed")
        return real(self, **kwargs)

    WebClient.chat_postMessage = dies_after_three  # type: ignore[method-assign]
    try:
        key_age_job(world, slack).run()  # logged at the job's boundary, not raised
    finally:
        WebClient.chat_postMessage = real  # type: ignore[method-assign]
    [root] = slack.roots()
    assert len(slack.thread(root)) == 2

    restarted = Engine(
        Store(world.store.path, clock=world.clock),
        world.catalogue,
        world.engine.kinds,
        world.clients,
        clock=world.clock,
    )
    world.clock.advance(120)
    key_age_job(world, slack, restarted).run()
    key_age_job(world, slack, restarted).run()
    assert slack.roots() == [root]
    assert len(slack.thread(root)) == 5  # each user once


def test_two_bot_processes_post_the_slot_once(world, slack):
    seed_ages(world, AGES)
    engines = [
        Engine(
            Store(world.store.path, clock=world.clock),
            world.catalogue,
            world.engine.kinds,
            world.clients,
            clock=world.clock,
        )
        for _ in range(2)
    ]
    jobs = [key_age_job(world, slack, e) for e in engines]
    start = threading.Barrier(2)

    def fire(job: reminders.KeyAgeCheck) -> None:
        start.wait()
        job.run()

    threads = [threading.Thread(target=fire, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    for job in jobs:
        job.run()  # a late fire in either process finds the slot posted
    [root] = slack.roots()
    assert len(slack.thread(root)) == 5


def test_an_aws_failure_is_said_once_in_the_channel(world, slack):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "rotation.iam.credential_report",
            lambda *a, **k: (_ for _ in ()).throw(
                AwsError("AccessDenied: iam:GenerateCredentialReport")
            ),
        )
        key_age_job(world, slack).run()
        key_age_job(world, slack).run()
    [root] = slack.roots()
    assert "key-age check of staging failed: `AccessDenied" in root.text


# -- the schedule ------------------------------------------------------------------------------


def test_jobs_come_from_rotor_yml_and_a_missed_slot_runs_at_start(world, slack):
    scheduler = BackgroundScheduler(timezone=UTC)
    reminders.schedule(scheduler, world.engine, client(slack), world.catalogue, world.clock)
    ids = sorted(job.id for job in scheduler.get_jobs())
    assert ids == [
        "approval-reminders",
        "approval-reminders:catch-up",
        "key-age:production",
        "key-age:production:catch-up",
        "key-age:staging",
        "key-age:staging:catch-up",
    ]
    weekly = scheduler.get_job("key-age:staging").trigger
    now = datetime.fromtimestamp(world.clock(), UTC)
    assert weekly.get_next_fire_time(None, now) == datetime(2026, 7, 13, 9, 0, tzinfo=LONDON)
    assert reminders.latest_slot(weekly, now) == datetime(2026, 7, 6, 8, 0, tzinfo=UTC)

    for job in reminders.jobs(world.engine, client(slack), world.catalogue, world.clock):
        job.run()  # what the catch-up jobs do
    again = BackgroundScheduler(timezone=UTC)
    reminders.schedule(again, world.engine, client(slack), world.catalogue, world.clock)
    assert sorted(job.id for job in again.get_jobs()) == [
        "approval-reminders",
        "key-age:production",
        "key-age:staging",
    ]


def test_a_slot_longer_ago_than_the_catch_up_window_is_left_alone(world, slack):
    world.clock.now = MONDAY_9 + 2 * DAY
    assert key_age_job(world, slack).due() is None
    key_age_job(world, slack).run()
    assert slack.roots() == []


def test_a_bad_cron_in_rotor_yml_is_one_clear_line_when_it_is_loaded(tmp_path, slack):
    from rotation import catalogue

    text = CONFIG.replace("warn_days: 80", 'warn_days: 80, schedule: "0 9 * * someday"')
    with pytest.raises(reminders.ConfigError,
                       match="^rotor.yml: key_age.schedule: '0 9 .*someday.* is not a cron"):
        catalogue.parse(text)


# -- the daily approval nudge ------------------------------------------------------------------


def _waiting_rotation(world: World, slack: FakeSlack) -> int:
    """A rotation waiting for approval (deleting a spare key), with a root message in Slack."""
    world.seed("staging")
    spare = world.iam("staging").create_access_key(UserName=USER)["AccessKey"]["AccessKeyId"]
    world.iam("staging").update_access_key(UserName=USER, AccessKeyId=spare, Status="Inactive")
    rid = world.start("staging")
    assert world.advance(rid).phase == "needs-approval"
    root = client(slack).chat_postMessage(channel=CHANNEL, text=f"Rotation #{rid}")
    world.store.set_kv(
        f"slack:rotation:{rid}", f'{{"channel": "{root["channel"]}", "root": "{root["ts"]}"}}'
    )
    return rid


def test_a_rotation_waiting_over_a_day_is_reminded_daily_in_its_thread(world, slack):
    world.clock.now = MONDAY_9 - 2 * 3600  # asked for at 07:00
    rid = _waiting_rotation(world, slack)
    [root] = slack.roots()
    nudge = reminders.ApprovalReminders(
        world.engine,
        client(slack),
        reminders.cron(reminders.APPROVAL_REMINDERS, "Europe/London", "-"),
        world.clock,
    )

    world.clock.now = MONDAY_9 + 10
    nudge.run()
    assert slack.thread(root) == []  # two hours is not a day

    world.clock.now = MONDAY_9 + DAY + 10
    nudge.run()
    nudge.run()
    [reminder] = slack.thread(root)
    assert reminder.text.startswith(":bell: `make-room` has waited 1 day for approval")
    assert f"rotation #{rid}" in reminder.text

    world.clock.now = MONDAY_9 + 2 * DAY + 10
    nudge.run()
    assert [m.text.split(" for ")[0] for m in slack.thread(root)] == [
        ":bell: `make-room` has waited 1 day",
        ":bell: `make-room` has waited 2 days",
    ]


# -- `rotor keys` ------------------------------------------------------------------------------


def test_rotor_keys_prints_the_report(world, tmp_path, monkeypatch):
    world.clock.now = time.time()  # the CLI's clock is the real one
    seed_ages(world, AGES)
    monkeypatch.setattr("bot.wiring.setup_logging", lambda *args, **kwargs: None)
    config = tmp_path / "rotor.yml"
    config.write_text(CONFIG)
    monkeypatch.setenv("ROTOR_STATE", str(tmp_path / "cli.db"))
    result = CliRunner().invoke(main, ["--config", str(config), "keys", "staging"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("staging: 3 overdue (older than 90 days), 2 due soon")
    assert f"rotor rotate-key {USER} staging" in lines[1]
    assert "not in rotor.yml" in lines[2]
    bad = CliRunner().invoke(main, ["--config", str(config), "keys", "prod"])
    assert bad.exit_code == 1 and "unknown environment 'prod'" in bad.output
