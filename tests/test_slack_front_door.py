"""The HTTP front door of `rotor serve`: a body cap whatever Content-Length says, 401 before
any parsing, 400 for malformed payloads, read timeouts, bounded threads, ROTOR_BIND, and no
request body or response_url in the log."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from tests.slackbot import BotProcess, running_bot, sign


@pytest.fixture(scope="module")
def bot(slack, tmp_path_factory) -> Iterator[BotProcess]:
    with running_bot(tmp_path_factory.mktemp("front-door"), slack,
                     env={"ROTOR_HTTP_TIMEOUT": "2"}) as process:
        yield process


def head(length: str | None, *, extra: str = "", signed_body: bytes | None = None) -> bytes:
    lines = ["POST /slack/events HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             "Content-Type: application/x-www-form-urlencoded"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if signed_body is not None:
        now = int(time.time())
        lines += [f"X-Slack-Request-Timestamp: {now}",
                  f"X-Slack-Signature: {sign(signed_body, now)}"]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def healthy(bot: BotProcess) -> None:
    answer = bot.get("/healthz")
    assert (answer.status, answer.body) == (200, "ok\n")


BIG = b"payload=" + b"x" * (2 << 20)  # 2 MiB: twice the cap


@pytest.mark.parametrize("length, extra, body, expected", [
    ("-1", "", BIG, 400),  # once bypassed the 1 MiB cap
    ("abc", "", b"payload=%5B1%5D", 400),  # once a 500 and a traceback
    ("+5", "", b"x=1&y", 400),
    (str(len(BIG)), "", BIG, 413),
    (None, "Transfer-Encoding: chunked\r\n",
     b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in [BIG[:1 << 20], BIG[1 << 20:]])
     + b"0\r\n\r\n", 413),
])
def test_the_body_cap_holds_whatever_the_content_length_says(bot, slack, length, extra, body,
                                                             expected):
    before, calls = bot.changes(), len(slack.calls)
    answer = bot.raw(head(length, extra=extra), body)
    assert status_of(answer) == expected, answer[:200]
    healthy(bot)
    assert bot.changes() == before and len(slack.calls) == calls
    assert "Traceback" not in bot.log()


MALFORMED = {
    "a payload that is a list": urlencode({"payload": "[1]"}).encode(),
    "an integer enterprise": urlencode({"payload": json.dumps(
        {"type": "block_actions", "enterprise": 5, "team": {"id": "T0001"},
         "user": {"id": "U0BOB"}, "actions": []})}).encode(),
    "a team that is a number": urlencode({"payload": json.dumps(
        {"type": "block_actions", "team": 7, "user": {"id": "U0BOB"}})}).encode(),
    "actions that are not objects": urlencode({"payload": json.dumps(
        {"type": "block_actions", "team": {"id": "T0001"}, "user": {"id": "U0BOB"},
         "actions": ["approve"]})}).encode(),
    "payload that is not JSON": b"payload=%7Bnot-json",
    "bytes that are not UTF-8": b"payload=\xff\xfe",
    "a repeated field": b"command=%2Frotate&command=%2Frotate&text=list",
}
JSON_MALFORMED = {
    "JSON with an integer enterprise": json.dumps(
        {"type": "event_callback", "enterprise": 5, "team_id": "T0001",
         "event": {"type": "app_home_opened", "user": "U0BOB"}}).encode(),
    "a JSON array": b"[1, 2]",
    "an event that is a string": json.dumps({"type": "event_callback", "team_id": "T0001",
                                             "event": "app_home_opened"}).encode(),
}


@pytest.mark.parametrize("name", [*MALFORMED, *JSON_MALFORMED])
def test_unsigned_requests_get_401_and_malformed_signed_ones_400(bot, slack, name):
    body = MALFORMED.get(name) or JSON_MALFORMED[name]
    kind = "application/json" if name in JSON_MALFORMED else \
        "application/x-www-form-urlencoded"
    before, calls = bot.changes(), len(slack.calls)
    unsigned = bot.post(body, content_type=kind, signature="v0=0")
    assert unsigned.status == 401
    signed = bot.post(body, content_type=kind)
    assert signed.status == 400, signed.body
    healthy(bot)
    assert bot.changes() == before and len(slack.calls) == calls
    log = bot.log()
    assert "Traceback" not in log and " 500 " not in log


def test_idle_and_half_sent_connections_time_out_without_holding_threads(bot):
    assert bot.process is not None
    tasks = f"/proc/{bot.process.pid}/task"
    threads_before = len(os.listdir(tasks))
    stalled = []
    for _ in range(300):  # once held 300 threads for as long as the client liked
        conn = socket.create_connection(("127.0.0.1", bot.port), timeout=10)
        conn.sendall(b"POST /slack/events HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\nab")
        stalled.append(conn)
    try:
        started = time.monotonic()
        healthy(bot)  # answered while 300 requests hang half-sent
        assert len(os.listdir(tasks)) <= threads_before + 2  # no thread per connection
        closed = 0
        for conn in stalled:  # ROTOR_HTTP_TIMEOUT=2: each is closed by the server
            conn.settimeout(max(0.1, started + 20 - time.monotonic()))
            try:
                data = conn.recv(1024)
            except ConnectionResetError:
                data = b""
            closed += data == b"" or data.startswith(b"HTTP/1.1 4")
        assert closed == len(stalled)
    finally:
        for conn in stalled:
            conn.close()
    healthy(bot)


def test_rotor_bind_chooses_the_address(tmp_path):
    with running_bot(tmp_path, host="127.0.0.2") as bot:  # ROTOR_BIND=127.0.0.2
        healthy(bot)  # through 127.0.0.2
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", bot.port), timeout=5).close()


def test_no_request_body_or_response_url_reaches_the_log(bot, slack):
    """At INFO: rejected, unhandled and ordinary requests alike."""
    secret_url = "https://hooks.slack.com/commands/T0001/999/Secret-Response-Token"
    body = urlencode({"command": "/rotate", "text": "list", "user_id": "U0ALICE",
                      "team_id": "T0001", "response_url": secret_url,
                      "trigger_id": "t-log-1"}).encode()
    assert bot.post(body, signature="v0=forged").status == 401
    stale = int(time.time()) - 600
    assert bot.post(body, timestamp=stale, signature=sign(body, stale)).status == 401
    unhandled = urlencode({"payload": json.dumps({
        "type": "block_actions", "team": {"id": "T0001"}, "user": {"id": "U0BOB"},
        "response_url": secret_url, "trigger_id": "t-log-2",
        "actions": [{"action_id": "no_such_button", "value": "Secret-Value"}]})}).encode()
    assert bot.post(unhandled).status in (200, 404)
    bot.command("list")
    bot.wait_reply("*Active rotations*")
    log = bot.log()
    for leak in ("Secret-Response-Token", "hooks.slack.com", "/response/", "Secret-Value",
                 "response_url"):
        assert leak not in log, leak
