"""`/rotate`: the grammar as a table, then the real endpoint with signed slash commands."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bot.wiring import kinds as wired_kinds
from handlers.commands import OTHER_KINDS, parse
from rotation import catalogue
from tests.rig import AWS_ENV, moto_url
from tests.slackbot import BotProcess, running_bot

CATALOGUE = catalogue.parse("""
environments:
  staging: {aws_region: eu-west-1}
  production: {aws_region: eu-west-1}
apps:
  signon: {engine: mysql}
  publisher: {engine: postgres}
""")
KINDS = {"mysql": object()}
ARGS = {"key": "alice staging", "secret": "govuk/x staging", "admin": "whitehall staging"}


@pytest.mark.parametrize("text, verb, fields", [
    ("", "help", {}),
    ("help", "help", {}),
    ("HELP me", "help", {}),
    ("list", "list", {}),
    ("status", "status", {}),
    ("status 12", "status", {"rotation_id": 12}),
    ("status #12", "status", {"rotation_id": 12}),
    ("status signon staging", "status", {"target": "signon", "env": "staging"}),
    ("cancel 3", "cancel", {"rotation_id": 3}),
    ("retry #4", "retry", {"rotation_id": 4}),
    ("keys", "keys", {"env": None}),
    ("keys Staging", "keys", {"env": "staging"}),
    ("plan signon staging", "plan", {"kind": "mysql", "target": "signon", "env": "staging"}),
    ("signon staging", "start", {"kind": "mysql", "target": "signon", "env": "staging",
                                 "params": {}}),
    ("  Signon   PRODUCTION ", "start", {"target": "signon", "env": "production"}),
    ("signon production --compromised", "start", {"params": {"compromised": True}}),
    ("--compromised signon production", "start", {"params": {"compromised": True}}),
    ("signon production --cleanup", "start", {"kind": "mysql", "params": {"cleanup": True}}),
])
def test_the_grammar(text, verb, fields):
    command = parse(text, CATALOGUE, KINDS)
    assert command.verb == verb
    for key, value in fields.items():
        assert getattr(command, key) == value
    assert (command.reply is None) == (verb != "help")


@pytest.mark.parametrize("text, reply", [
    ("signn staging", "unknown subcommand or app `signn` (did you mean `signon`?)"),
    ("stauts", "unknown subcommand or app `stauts` (did you mean `status`?)"),
    ("signon stagin", "unknown environment 'stagin' (did you mean 'staging'?)"),
    ("plan signon prod", "unknown environment 'prod'"),
    ("plan sigon staging", "unknown app 'sigon' (did you mean 'signon'?)"),
    ("staging signon", "app first, then environment: `signon staging`"),
    ("signon", "needs an app and an environment (environments: staging, production)"),
    ("plan signon", "`plan APP ENV` needs an app and an environment"),
    ("signon staging now", "unexpected `now` after `APP ENV`"),
    ("status signon staging x", "unexpected `x`"),
    ("list all", "`list` takes no arguments"),
    ("cancel", "`cancel` takes one rotation ID"),
    ("retry 1 2", "`retry` takes one rotation ID"),
    ("cancel abc", "`abc` is not a rotation ID"),
    ("status 1e3", "`1e3` is not a rotation ID"),
    ("signon staging --force", "unknown option `--force`"),
    ("signon staging --cleanup --compromised", "--compromised and --cleanup do not go together"),
    ("key bob staging --cleanup", "`/rotate APP ENV --cleanup`"),
    ("status --compromised", "--compromised goes with starting a rotation"),
    ("key", "`key USER ENV` needs USER and ENV"),
    ("key al;ce staging", "`al;ce` is not a valid USER"),
    ("secret x moon", "unknown environment 'moon'"),
    ("keys staging production", "unexpected `production`"),
    ("keys prod", "unknown environment 'prod'"),
    ("<!channel> staging", "unknown subcommand or app `&lt;!channel&gt;`"),
])
def test_garbled_input_gets_a_usage_line_naming_the_problem(text, reply):
    command = parse(text, CATALOGUE, KINDS)
    assert command.verb == "usage" and command.reply is not None
    assert reply in command.reply
    assert "Usage: `/rotate APP ENV`" in command.reply


def test_a_kind_this_rotor_does_not_run_is_not_available_yet():
    command = parse("publisher staging", CATALOGUE, KINDS)
    assert command.verb == "unavailable"
    assert command.reply == ("`/rotate publisher staging` is not available yet: this Rotor has "
                             "no `postgres` rotation kind.")
    for word, kind in OTHER_KINDS.items():
        command = parse(f"{word} {ARGS[word]}", CATALOGUE, KINDS)
        assert command.verb == "unavailable" and f"`{kind}`" in str(command.reply)


# -- through the real endpoint -------------------------------------------------------------


@pytest.fixture(scope="module")
def bot(slack, tmp_path_factory) -> Iterator[BotProcess]:
    aws = {**AWS_ENV, "AWS_ENDPOINT_URL": moto_url()}  # `keys` reads IAM's credential report
    with running_bot(tmp_path_factory.mktemp("commands"), slack, env=aws) as process:
        yield process


def test_help_is_the_ack_itself(bot):
    answer = bot.command("help")
    assert answer.status == 200
    assert "`/rotate plan APP ENV`" in answer.text and "`/rotate retry ID`" in answer.text


@pytest.mark.parametrize("text, reply", [
    ("signn staging", "did you mean `signon`?"),
    ("signon stagng", "did you mean 'staging'?"),
    ("signon staging extra", "unexpected `extra`"),
    ("cancel twelve", "is not a rotation ID"),
    ("", "*/rotate* runs credential rotations"),
])
def test_garbled_commands_change_nothing(bot, slack, text, reply):
    before, calls = bot.changes(), len(slack.calls)
    answer = bot.command(text)
    assert answer.status == 200 and reply in answer.text
    assert bot.changes() == before
    assert len(slack.calls) == calls  # answered in the ack: no Web API call at all


def test_start_posts_a_root_message_and_the_thread_follows(bot, slack, apps):
    app = apps()
    answer = bot.command(f"{app} staging", user="U0ALICE")
    assert answer.status == 200  # how fast: benchmarks/ack_latency.py
    reply = bot.wait_reply(f"{app} in staging")
    rotation = bot.wait_status(app, "staging", "active")
    assert f"Started rotation #{rotation['id']}" in reply and "#govuk-developers" in reply

    root = bot.root_for(rotation["id"])
    assert root.channel == slack.channels["#govuk-developers"]
    bot.button(rotation["id"], "approve")  # the approval request is in the thread
    bot.root_for(rotation["id"], f"Rotation #{rotation['id']}: {app} in staging", "(mysql)",
                 "Started by <@U0ALICE>", "2/6 done", "waiting for approval of `switch`",
                 "Preflight: the app's user and grants", "Drop the old user")
    bot.thread_text(rotation["id"], "`preflight` done", "`create-user` done",
                    "`switch` needs approval")


def test_a_command_slack_sends_again_starts_once(bot, slack, apps):
    app = apps()
    body = bot.command_body(f"{app} staging", user="U0BOB", trigger="trigger-retried-1")
    first = bot.post(body)
    again = bot.post(body, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason":
                                    "http_timeout"})
    assert first.status == again.status == 200
    rotation = bot.wait_status(app, "staging", "active")
    bot.root_for(rotation["id"])
    bot.wait_reply(f"{app} in staging")
    bot.wait_log("re-sent by Slack")
    started = [c for c in slack.responses() if f"{app} in staging" in str(c.params)]
    assert len(started) == 1
    assert bot.rows("SELECT COUNT(*) FROM rotations WHERE target = ?", app)[0][0] == 1


def test_a_second_start_is_refused_while_one_runs(bot, apps):
    app = apps()
    bot.command(f"{app} staging", user="U0ALICE")
    first = bot.wait_status(app, "staging", "active")
    bot.wait_step(app, "staging", "switch", "needs-approval")
    before = bot.changes()
    bot.command(f"{app} staging", user="U0BOB")
    reply = bot.wait_reply(f"{app} in staging already has an active rotation")
    assert f"(#{first['id']}, started by U0ALICE)" in reply
    assert reply.startswith(":no_entry:") and "\n" not in reply
    assert bot.changes() == before


def test_production_only_lets_listed_people_and_groups_start(bot, slack, apps):
    app = apps()
    before = bot.changes()
    bot.command(f"{app} production", user="U0MALLORY")
    reply = bot.wait_reply("<@U0MALLORY> may not start")
    assert "<@U0ALICE>, <@U0BOB>, <!subteam^S0SRE>" in reply
    assert bot.changes() == before

    bot.command(f"{app} production", user="U0CAROL")  # in S0SRE
    rotation = bot.wait_status(app, "production", "active")
    assert bot.rows("SELECT initiator FROM rotations WHERE id = ?", rotation["id"]) == [
        ("U0CAROL",)]
    assert any(c.params.get("usergroup") == "S0SRE"
               for c in slack.calls_to("usergroups.users.list"))


def test_status_list_and_plan_answer_only_the_asker(bot, apps):
    app = apps()
    bot.command(f"{app} staging")
    rotation = bot.wait_status(app, "staging", "active")
    bot.root_for(rotation["id"])
    bot.wait_rows("SELECT value FROM kv WHERE key = ? AND value LIKE ?",
                  f"slack:rotation:{rotation['id']}", '%"link": "https%', until=bool,
                  what="the thread's permalink")

    bot.command(f"status {rotation['id']}")
    detail = bot.wait_reply(f"#{rotation['id']} mysql {app} in staging")
    assert "https://test.slack.example/archives/" in detail  # a link to the thread
    assert "Create the new user: `created" in detail

    bot.command(f"status {app} staging")
    bot.wait_reply(f"#{rotation['id']} mysql {app} in staging")
    bot.command(f"status {app} integration")
    bot.wait_reply(f"No rotation of {app} in integration yet.")
    bot.command("list")
    assert f"{app} in staging" in bot.wait_reply("*Active rotations*")

    before = bot.changes()
    bot.command(f"plan {app} integration")
    plan = bot.wait_reply(f"*Plan: mysql rotation of {app} in integration*")
    assert "6. `drop-old-user` Drop the old user _(destructive: needs approval)_" in plan
    assert f"Preflight found: `user {app}_1 on 1 host" in plan
    assert bot.changes() == before


def test_unknown_rotation_ids_are_refused(bot):
    before = bot.changes()
    for text in ("status 9999", "cancel 9999", "retry 9999"):
        bot.command(text)
    bot.wait_for(lambda: sum("no rotation #9999" in str(c.params.get("text"))
                             for c in bot.slack.responses()) == 3, what="three refusals")
    assert bot.changes() == before


def test_other_runbooks_are_routed_or_not_available_yet(bot):
    available = wired_kinds("tests.slack_kinds:KINDS")
    before = bot.changes()
    for word, kind in OTHER_KINDS.items():
        answer = bot.command(f"{word} {ARGS[word]}")
        assert answer.status == 200
        if kind not in available:
            assert answer.text == (f"`/rotate {word}` is not available yet: this Rotor has no "
                                   f"`{kind}` rotation kind.")
        else:  # routed to the kind, which refuses names rotor.yml does not have
            assert answer.text == ""
            assert bot.wait_reply(f"'{ARGS[word].split()[0]}'").startswith(":no_entry:")
    assert bot.changes() == before


def test_keys_reports_access_key_ages(bot):
    bot.command("keys staging")
    report = bot.wait_reply("*Access keys in staging*")
    assert "0 overdue" in report


def test_cancel_and_retry_by_command(bot, apps):
    app = apps()
    bot.command(f"{app} staging")
    rotation = bot.wait_status(app, "staging", "active")
    bot.wait_step(app, "staging", "switch", "needs-approval")
    bot.command(f"retry {rotation['id']}")
    assert "has no failed step to retry" in bot.wait_reply(f"rotation #{rotation['id']} has no")

    bot.command(f"cancel {rotation['id']}", user="U0BOB")
    bot.wait_reply(f":x: Cancelled rotation #{rotation['id']}")
    bot.wait_status(app, "staging", "cancelled")
    bot.thread_text(rotation["id"], "Cancelled by <@U0BOB>")
    bot.command(f"cancel {rotation['id']}")
    bot.wait_reply(f"rotation #{rotation['id']} is cancelled; nothing to do")
