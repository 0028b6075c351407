"""Never twice, never lost: Slack outages, 429s, lost responses, restarts and two processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from demo.slack_api import Call, FakeSlack
from tests.rig import operator_env
from tests.slack_kinds import STEPS
from tests.slackbot import GROUPS, BotProcess, assert_posted_once, running_bot


@pytest.fixture(scope="module")
def bot(slack, tmp_path_factory) -> Iterator[BotProcess]:
    with running_bot(tmp_path_factory.mktemp("delivery"), slack) as process:
        yield process


def start(bot: BotProcess, app: str, env: str = "staging") -> int:
    bot.command(f"{app} {env}")
    rotation_id = int(bot.wait_status(app, env, "active")["id"])
    bot.button(rotation_id, "approve")
    return rotation_id


@pytest.mark.parametrize("how", ["refuse", "500"])
def test_while_slack_is_down_rotations_go_on_and_the_thread_catches_up_once(bot, slack, apps,
                                                                            how):
    app = apps()
    rotation_id = start(bot, app)
    approve = bot.button(rotation_id, "approve")
    seen = bot.log().count("Slack unavailable")
    with slack.outage(how):
        assert bot.click(approve, user="U0BOB").status == 200  # Slack -> Rotor still works
        bot.wait_step(app, "staging", "drop-old-user", "needs-approval")
        bot.wait_for(lambda: bot.log().count("Slack unavailable"), lambda n: n > seen,
                     what="the reporter to notice")
        assert bot.get("/readyz").status == 200
    bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0BOB")
    bot.wait_status(app, "staging", "done")
    bot.thread_text(rotation_id, ":tada:", *(f"`{step}` done" for step in STEPS))
    keys = assert_posted_once(slack, rotation_id)
    assert len(keys) >= 1 + len(STEPS)  # the root, every step's result, approvals, finish


def test_rate_limits_are_retried_after_retry_after(bot, slack, apps):
    app = apps()
    slack.rate_limit(2, retry_after=1)
    rotation_id = start(bot, app)

    def same(one: Call, other: Call) -> bool:
        return (one.method, one.params) == (other.method, other.params)

    def answered(calls: list[Call]) -> bool:
        """Every call that got a 429 was made again later and answered."""
        return all(any(c.status == 200 and same(c, calls[i]) for c in calls[i + 1:])
                   for i, call in enumerate(calls) if call.status == 429)

    calls = bot.wait_for(lambda: list(slack.calls), answered,
                         what="the rate-limited calls to be made again and answered")
    limited = [i for i, c in enumerate(calls) if c.status == 429]
    assert len(limited) == 2
    for i in limited:
        again = next(c for c in calls[i + 1:] if same(c, calls[i]))
        assert again.at - calls[i].at >= 1.0  # Retry-After was honoured
    assert_posted_once(slack, rotation_id)


def test_a_post_whose_answer_was_lost_is_found_not_posted_again(bot, slack, apps):
    start(bot, apps())  # the channel's ID is known from here on
    app = apps()
    slack.lose_responses(1)  # the next root message reaches Slack, its answer does not
    rotation_id = start(bot, app)
    slack.lose_responses(1)  # and then a thread reply
    bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
    bot.button(rotation_id, "approve", "drop-old-user")
    assert_posted_once(slack, rotation_id)
    assert slack.calls_to("conversations.history") and slack.calls_to("conversations.replies")
    bot.wait_log("was posted before; not posting again")


def test_a_cli_fleets_table_whose_answer_was_lost_is_found_not_posted_again(bot, slack, apps):
    """A fleet started from the CLI gets its one table from rotor serve's reporter; when the
    post's answer is lost, the next attempt finds it in the channel's history."""
    start(bot, apps())  # the channel's ID is known from here on
    members = [apps(), apps()]
    slack.lose_responses(1)  # the fleet's table reaches Slack, its answer does not
    cli = subprocess.run(
        [sys.executable, "-m", "bot.cli", "rotate", *members, "staging"],
        input="y\nn\n",  # rotate these apps: yes; approve the first gate here: no
        env=bot.env(**operator_env("alice")), capture_output=True, text=True, timeout=120,
        cwd=bot.workdir)
    assert cli.returncode == 3, cli.stdout + cli.stderr  # the rest waits for a person
    (fleet_id,), = bot.rows("SELECT MAX(id) FROM fleets")
    bot.wait_log(f"fleet #{fleet_id} root message was posted before; not posting again")
    tables = [m for m in slack.roots() if f"fleet #{fleet_id}" in m.text]
    assert len(tables) == 1, [m.text for m in tables]
    assert slack.calls_to("conversations.history")


def test_a_restart_repeats_nothing_and_delivers_what_happened_while_down(tmp_path):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        first = BotProcess(tmp_path, slack).start()
        rotation_id = start(first, "signon")
        assert first.stop() == 0
        assert "serve: stopped" in first.log()

        # While the bot is down, a second person approves from the command line.
        approved = subprocess.run(
            [sys.executable, "-m", "bot.cli", "approve", str(rotation_id)],
            env=first.env(**operator_env("bob")), capture_output=True, text=True, timeout=60,
            cwd=tmp_path)
        assert approved.returncode == 0, approved.stderr
        updates_before = len(slack.calls_to("chat.update"))

        second = BotProcess(tmp_path, slack).start()
        try:
            second.wait_step("signon", "staging", "drop-old-user", "needs-approval")
            second.click(second.button(rotation_id, "approve", "drop-old-user"), user="U0CAROL")
            second.wait_status("signon", "staging", "done")
            second.thread_text(rotation_id, ":tada:")
        finally:
            second.stop()
        assert len(slack.calls_to("chat.update")) > updates_before  # the root was re-synced
        second.thread_text(rotation_id, "Approved by <@U0BOB> (from the CLI)")
        assert_posted_once(slack, rotation_id)


def test_two_processes_run_each_step_once_and_post_each_message_once(tmp_path):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        one = BotProcess(tmp_path, slack).start()
        two = BotProcess(tmp_path, slack).start()
        try:
            rotation_id = start(one, "signon")
            two.click(two.button(rotation_id, "approve"), user="U0BOB")
            two.wait_step("signon", "staging", "drop-old-user", "needs-approval")
            one.click(one.button(rotation_id, "approve", "drop-old-user"), user="U0BOB")
            one.wait_status("signon", "staging", "done")
            one.thread_text(rotation_id, ":tada:")
        finally:
            one.stop()
            two.stop()
        # Each step ran as often as it does in one process: gated steps once to ask, once
        # after the approval; and each finished exactly once.
        runs = dict(one.rows("SELECT step, COUNT(*) FROM audit WHERE rotation_id = ? AND "
                             "to_status = 'running' GROUP BY step", rotation_id))
        assert runs == {step: 2 if step in ("switch", "drop-old-user") else 1 for step in STEPS}
        done = dict(one.rows("SELECT step, COUNT(*) FROM audit WHERE rotation_id = ? AND "
                             "to_status = 'done' AND step IS NOT NULL GROUP BY step", rotation_id))
        assert done == {step: 1 for step in STEPS}
        assert_posted_once(slack, rotation_id)
