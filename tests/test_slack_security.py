"""Only Slack gets in, and no secret gets out: signatures, timestamps, redaction, escaping."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.slackbot import SECRET_PASSWORD, BotProcess, running_bot, sign


@pytest.fixture(scope="module")
def bot(slack, tmp_path_factory) -> Iterator[BotProcess]:
    # DEBUG: slack_sdk then logs every request body too, and the scan covers those lines.
    with running_bot(tmp_path_factory.mktemp("security"), slack, log_level="DEBUG") as process:
        yield process


@pytest.mark.parametrize("tamper", ["forged", "stale", "future", "altered", "unsigned"])
def test_requests_not_signed_by_slack_get_401_and_change_nothing(bot, slack, tamper):
    body = bot.command_body("signon production --compromised", user="U0ALICE")
    now = int(time.time())
    before, calls = bot.changes(), len(slack.calls)
    if tamper == "forged":
        answer = bot.post(body, signature=sign(body, now, secret="not-the-signing-secret"))
    elif tamper == "stale":  # a replay: correctly signed, 10 minutes ago
        answer = bot.post(body, timestamp=now - 600, signature=sign(body, now - 600))
    elif tamper == "future":
        answer = bot.post(body, timestamp=now + 600, signature=sign(body, now + 600))
    elif tamper == "altered":
        answer = bot.post(body.replace(b"U0ALICE", b"U0MALLORY"), signature=sign(body, now),
                          timestamp=now)
    else:
        answer = bot.post(body, signature="v0=")
    assert answer.status == 401
    # A signed command whose reply comes through Slack: once it is in, the server has dealt
    # with what came before it, and the tampered request must have left no trace.
    bot.command("status 999999")
    fence = bot.wait_for(lambda: slack.calls[calls:], lambda after: any(
        "no rotation #999999" in c.text() for c in after), what="the reply to `status 999999`")
    assert [c for c in fence if "no rotation #999999" not in c.text()] == []
    assert bot.changes() == before


def test_no_secret_reaches_slack_or_the_log(bot, slack):
    """The scripted kind puts the password in a result, an approval summary, an error and a
    log line; none of it may leave the process unredacted."""
    fail = bot.control / "fail"
    fail.write_text("")
    bot.command("plan signon staging")
    bot.wait_reply("*Plan: mysql rotation of signon in staging*")
    bot.command("signon staging")
    rotation_id = bot.wait_status("signon", "staging", "active")["id"]
    bot.click(bot.button(rotation_id, "approve"), user="U0BOB")
    bot.wait_step("signon", "staging", "login", "failed")
    failure = bot.button(rotation_id, "retry")
    fail.unlink()
    bot.click(failure, user="U0BOB")
    bot.click(bot.button(rotation_id, "approve", "drop-old-user"), user="U0BOB")
    bot.wait_status("signon", "staging", "done")
    bot.message(rotation_id, ":tada:")
    bot.command(f"status {rotation_id}")
    bot.wait_reply(f"#{rotation_id} mysql signon in staging")

    everything = slack.everything()
    assert "[redacted]" in everything  # the leaks were there, and were masked
    assert SECRET_PASSWORD not in everything
    log = bot.log()
    assert "created signon_2 with password [redacted]" in log
    assert SECRET_PASSWORD not in log
    state = bot.rows("SELECT group_concat(detail, ' ') FROM audit")[0][0]
    assert SECRET_PASSWORD not in state


def test_typed_text_is_echoed_escaped(bot):
    answer = bot.command("<!channel> staging")
    assert "&lt;!channel&gt;" in answer.text and "<!channel>" not in answer.text
