"""Never twice, never lost: Slack outages, 429s, lost responses, restarts and two processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from demo.slack_api import FakeSlack
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


def thread_says(bot: BotProcess, rotation_id: int, text: str) -> bool:
    return any(text in t for t in bot.thread_text(rotation_id))


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
        bot.wait_for(lambda: bot.log().count("Slack unavailable") > seen,
                     what="the reporter to notice")
        assert bot.get("/readyz").status == 200
    bot.click(bot.button(rotation_id, "approve", "drop-old-user", timeout=15), user="U0BOB")
    bot.wait_status(app, "staging", "done")
    bot.wait_for(lambda: thread_says(bot, rotation_id, ":tada:"), what="the finish")
    keys = assert_posted_once(slack, rotation_id)
    assert len(keys) >= 1 + len(STEPS)  # the root, every step's result, approvals, finish
    for step in STEPS:
        assert thread_says(bot, rotation_id, f"`{step}` done")


def test_rate_limits_are_retried_after_retry_after(bot, slack, apps):
    app = apps()
    slack.rate_limit(2, retry_after=1)
    rotation_id = start(bot, app)
    calls = list(slack.calls)
    limited = [i for i, c in enumerate(calls) if c.status == 429]
    assert len(limited) == 2
    for i in limited:
        again = next(c for c in calls[i + 1:] if (c.method, c.params) == (calls[i].method,
                                                                          calls[i].params))
        assert again.at - calls[i].at >= 1.0  # Retry-After was honoured
    assert any(c.status == 200 and (c.method, c.params) == (calls[limited[-1]].method,
                                                            calls[limited[-1]].params)
               for c in calls[limited[-1]:])
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
    assert "was posted before; not posting again" in bot.log()


def test_a_restart_repeats_nothing_and_delivers_what_happened_while_down(tmp_path):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        first = BotProcess(tmp_path, slack).start()
        rotation_id = start(first, "signon")
        assert first.stop() == 0
        assert "serve: stopped" in first.log()

        # While the bot is down, a second person approves from the command line.
        approved = subprocess.run(
            [sys.executable, "-m", "bot.cli", "approve", str(rotation_id)],
            env=first.env(ROTOR_ACTOR="U0BOB"), capture_output=True, text=True, timeout=60,
            cwd=tmp_path)
        assert approved.returncode == 0, approved.stderr
        updates_before = len(slack.calls_to("chat.update"))

        second = BotProcess(tmp_path, slack).start()
        try:
            second.wait_step("signon", "staging", "drop-old-user", "needs-approval")
            second.click(second.button(rotation_id, "approve", "drop-old-user"), user="U0CAROL")
            second.wait_status("signon", "staging", "done")
            second.wait_for(lambda: thread_says(second, rotation_id, ":tada:"),
                            what="the finish")
        finally:
            second.stop()
        assert len(slack.calls_to("chat.update")) > updates_before  # the root was re-synced
        assert thread_says(second, rotation_id, "Approved by cli:U0BOB") or any(
            "Approved by" in m.text for m in slack.thread(second.root_for(rotation_id)))
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
            one.wait_for(lambda: thread_says(one, rotation_id, ":tada:"), what="the finish")
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
