"""Who may act: one identity in Slack and on the command line, the installed workspace only,
policy for read actions, and typed text escaped exactly once. `rotor serve` and `rotor` run as
subprocesses; Slack's requests are signed; CLI operators are STS role sessions in moto."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from demo.slack_api import FakeSlack
from tests.rig import AWS_ENV, moto_url, operator_env
from tests.slackbot import GROUPS, BotProcess, running_bot

ARN = "arn:aws:sts::123456789012:assumed-role/govuk-admin/{}"


@pytest.fixture(scope="module")
def bot(slack, tmp_path_factory) -> Iterator[BotProcess]:
    aws = {**AWS_ENV, "AWS_ENDPOINT_URL": moto_url()}  # `keys` reads IAM's credential report
    with running_bot(tmp_path_factory.mktemp("identity"), slack, env=aws) as process:
        yield process


def rotor(bot: BotProcess, session: str, *args: str, **env: str
          ) -> subprocess.CompletedProcess[str]:
    """`rotor ARGS` as the operator of an STS role session named `session`."""
    return subprocess.run([sys.executable, "-m", "bot.cli", *args],
                          env=bot.env(**operator_env(session), **env), capture_output=True,
                          text=True, timeout=60, cwd=bot.workdir)


def start(bot: BotProcess, app: str, env: str, user: str = "U0ALICE") -> int:
    bot.command(f"{app} {env}", user=user)
    rotation = bot.wait_status(app, env, "active")
    bot.wait_step(app, env, "switch", "needs-approval")
    return int(rotation["id"])


# -- one identity ---------------------------------------------------------------------------


def test_the_cli_operator_is_the_sts_principal_and_four_eyes_holds_across_slack_and_cli(
        bot, apps):
    app = apps()
    rotation_id = start(bot, app, "production", user="U0ALICE")
    before = bot.changes()

    # Alice started it in Slack; from the CLI she is still Alice, whatever she claims.
    for claim in ({}, {"ROTOR_ACTOR": "U0BOB", "USER": "U0BOB"}):
        refused = rotor(bot, "alice", "approve", str(rotation_id), **claim)
        assert refused.returncode == 1
        assert "production needs a second person" in refused.stderr
        assert refused.stderr.count("\n") == 1
    # Someone the catalogue does not map may not act in production at all.
    unmapped = rotor(bot, "eve", "approve", str(rotation_id))
    assert unmapped.returncode == 1
    assert f"{ARN.format('eve')} maps to no one" in unmapped.stderr
    # Mallory maps to a person, who is no approver.
    mapped = rotor(bot, "mallory", "approve", str(rotation_id))
    assert mapped.returncode == 1
    assert "<@U0MALLORY> may not approve in production" in mapped.stderr
    assert bot.changes() == before

    approved = rotor(bot, "bob", "approve", str(rotation_id))
    assert approved.returncode == 0, approved.stderr
    bot.wait_step(app, "production", "drop-old-user", "needs-approval")
    [(actor,)] = bot.rows("SELECT actor FROM audit WHERE rotation_id = ? AND event = "
                          "'approved'", rotation_id)
    assert actor == f"U0BOB via {ARN.format('bob')}"  # the person, and the raw principal
    bot.wait_for(lambda: any("Approved by <@U0BOB> (from the CLI)" in m.text
                             for m in bot.slack.thread(bot.root_for(rotation_id))),
                 what="the approval in the thread")

    # In Slack, too, the starter may not approve her own destructive step.
    bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0ALICE")
    assert "needs a second person" in bot.wait_reply("needs a second person")


def test_a_rotation_started_from_the_cli_cannot_be_approved_by_its_starter_in_slack(bot, apps):
    app = apps()
    # Bob starts in staging from the CLI (staging: no four-eyes) ... and in production.
    plan = rotor(bot, "bob", "plan", app, "production")
    assert plan.returncode == 0, plan.stderr
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "rotate", app, "production"],
                            env=bot.env(**operator_env("bob")), cwd=bot.workdir,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        bot.wait_step(app, "production", "switch", "needs-approval", timeout=30)
        rotation_id = int(bot.rotation(app, "production")["id"])  # type: ignore[index]
        [(initiator,)] = bot.rows("SELECT initiator FROM rotations WHERE id = ?", rotation_id)
        assert initiator == f"U0BOB via {ARN.format('bob')}"
        before = bot.changes()
        bot.click(bot.button(rotation_id, "approve", "switch"), user="U0BOB")
        assert "needs a second person" in bot.wait_reply("needs a second person")
        assert bot.changes() == before
        bot.click(bot.button(rotation_id, "approve", "switch"), user="U0ALICE")
        bot.wait_step(app, "production", "drop-old-user", "needs-approval", timeout=30)
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_the_cli_checks_starters_and_unmapped_operators_per_environment(bot, apps):
    app = apps()
    refused = rotor(bot, "mallory", "plan", app, "production")
    assert refused.returncode == 1
    assert "<@U0MALLORY> may not plan rotations in production" in refused.stderr
    unmapped = rotor(bot, "eve", "rotate", app, "production")
    assert unmapped.returncode == 1 and "maps to no one" in unmapped.stderr
    assert bot.rotation(app, "production") is None
    # Staging allows unmapped operators by default, and has no starters list.
    allowed = rotor(bot, "eve", "plan", app, "staging")
    assert allowed.returncode == 0, allowed.stderr
    assert "preflight: user" in allowed.stdout


# -- the workspace ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["signon staging", "help", "list"])
def test_a_command_from_another_workspace_gets_one_line_and_changes_nothing(bot, slack, text):
    before, posts = bot.changes(), len(slack.calls_to("chat.postMessage"))
    answer = bot.command(text, team="T0OTHER")
    assert answer.status == 200
    assert answer.text.startswith(":no_entry:") and "\n" not in answer.text
    assert "workspace Rotor is installed in" in answer.text
    assert bot.changes() == before and len(slack.calls_to("chat.postMessage")) == posts


@pytest.mark.parametrize("how", [{"user_team": "T0OTHER"}, {"enterprise": "E0OTHER"},
                                 {"team": "T0OTHER"}])
def test_a_click_from_outside_the_workspace_is_refused(bot, apps, how):
    """A Slack Connect channel: the click is signed, but its user belongs to another team."""
    app = apps()
    rotation_id = start(bot, app, "staging")
    before = bot.changes()
    button = bot.button(rotation_id, "approve")
    assert bot.click(button, user="U0STRANGER", **how).status == 200
    refusal = bot.wait_reply("workspace Rotor is installed in")
    assert refusal.startswith(":no_entry:") and "\n" not in refusal
    assert bot.changes() == before
    assert bot.rotation(app, "staging")["steps"]["switch"] == "needs-approval"  # type: ignore


def test_enterprise_grid_teams_on_the_allow_list_may_act(tmp_path):
    with FakeSlack(groups=dict(GROUPS)) as slack:
        bot = BotProcess(tmp_path, slack)
        bot.write_config()
        config = tmp_path / "rotor.yml"
        config.write_text(config.read_text().replace("slack:\n", "slack:\n  teams: [T0GRID]\n"))
        bot.start()
        try:
            bot.command("list", team="T0GRID")
            bot.wait_reply("*Active rotations*")
            refused = bot.command("list", team="T0ELSEWHERE")
            assert "workspace Rotor is installed in" in refused.text
        finally:
            bot.stop()


# -- read actions --------------------------------------------------------------------------


def test_plan_needs_starter_rights_and_keys_starter_or_approver(bot):
    before = bot.changes()
    bot.command("plan signon production", user="U0MALLORY")
    refusal = bot.wait_reply("U0MALLORY> may not plan rotations in production")
    assert refusal.startswith(":no_entry: <@U0MALLORY>") and "\n" not in refusal
    bot.command("keys production", user="U0MALLORY")
    bot.wait_reply("U0MALLORY> may not see access key ages in production")
    bot.command("keys", user="U0MALLORY")  # every environment: only those Mallory may see
    report = bot.wait_reply("*Access keys in staging*", timeout=20)
    assert "*Access keys in production*" not in report
    assert bot.changes() == before

    bot.command("plan signon production", user="U0CAROL")  # in S0SRE, a starter
    bot.wait_reply("*Plan: mysql rotation of signon in production*")
    assert "runs credential rotations" in bot.command("help", user="U0MALLORY").text
    for text in ("status", "list"):  # open to everyone in the workspace
        answered = len(bot.slack.responses())
        bot.command(text, user="U0MALLORY")
        reply = bot.wait_for(lambda n=answered: bot.slack.responses()[n:], what=text)
        assert not str(reply[0].params.get("text")).startswith(":no_entry:")


# -- escaping typed text once ----------------------------------------------------------------


def test_slash_command_text_is_escaped_once(bot):
    # Slack sends `<!channel> & *x*` as `&lt;!channel&gt; &amp; *x*`.
    answer = bot.command("&lt;!channel&gt;&amp;*x* staging")
    assert "`&lt;!channel&gt;&amp;*x*`" in answer.text
    assert "&amp;lt;" not in answer.text and "<!channel>" not in answer.text
