"""Three `rotor serve` replicas in Socket Mode on one PostgreSQL state store, each with its
own connection to a fake that speaks Slack's Socket Mode protocol (tests/socket_mode.py) to
the real slack_sdk client. A rotation started on one connection is approved on the second and
its destructive step on the third: every envelope is acknowledged once, by its envelope_id,
and the rotation finishes with nothing posted twice."""

from __future__ import annotations

import json
from contextlib import ExitStack
from urllib.parse import parse_qs, parse_qsl

import pytest

from tests.slack_kinds import STEPS
from tests.slackbot import GROUPS, BotProcess, assert_posted_once
from tests.socket_mode import SocketModeSlack

APP_TOKEN = "xapp-1-A0ROTOR-0000-test"


def _command(bot: BotProcess, text: str, user: str) -> dict[str, str]:
    return dict(parse_qsl(bot.command_body(text, user).decode()))


def _click(bot: BotProcess, button: dict[str, str], user: str) -> dict[str, object]:
    body = bot.action_body(button["action_id"], button["value"], user)
    return dict(json.loads(parse_qs(body.decode())["payload"][0]))


@pytest.mark.timeout(600)
def test_every_command_and_button_works_on_any_socket_mode_replica(tmp_path, postgres_state):
    with ExitStack() as stack:
        slack = stack.enter_context(SocketModeSlack(groups=dict(GROUPS)))
        bots: list[BotProcess] = []
        for n in range(3):  # one at a time: the n-th to connect holds connection n
            bot = BotProcess(tmp_path, slack, state_url=postgres_state)
            bot.start(SLACK_APP_TOKEN=APP_TOKEN)  # ready: connected in Socket Mode
            stack.callback(bot.stop)
            bots.append(bot)
            assert slack.connections == n + 1
        assert bots[0].get("/slack/events").status == 404  # no HTTP endpoint in Socket Mode

        started = slack.send(0, "slash_commands", _command(bots[0], "signon staging",
                                                           "U0ALICE"))
        assert len(slack.ack(started)) == 1
        rotation_id = bots[0].wait_status("signon", "staging", "active")["id"]

        switch = bots[1].button(rotation_id, "approve", "switch")
        approved = slack.send(1, "interactive", _click(bots[1], switch, "U0BOB"))
        assert len(slack.ack(approved)) == 1
        drop = bots[2].button(rotation_id, "approve", "drop-old-user")
        dropped = slack.send(2, "interactive", _click(bots[2], drop, "U0CAROL"))
        assert len(slack.ack(dropped)) == 1
        bots[2].wait_status("signon", "staging", "done")
        bots[2].root_for(rotation_id, f"{len(STEPS)}/{len(STEPS)} done")
        bots[2].thread_text(rotation_id, "Approved by <@U0BOB>", "Approved by <@U0CAROL>")

        # A status command on each connection is answered (via response_url) by that replica.
        before = len(slack.responses())
        for n, bot in enumerate(bots):
            asked = slack.send(n, "slash_commands", _command(bot, f"status {rotation_id}",
                                                             "U0DAVE"))
            assert len(slack.ack(asked)) == 1
        bots[0].wait_for(lambda: [c for c in slack.responses()[before:]
                                  if f"#{rotation_id}" in str(c.params.get("text", ""))],
                         lambda answers: len(answers) == 3, what="three status answers")
        assert slack.opened == 3  # one connection each, none dropped and reopened
        assert_posted_once(slack, rotation_id)
