"""Ack latency of `rotor serve`: 50 concurrent signed slash commands while a rotation runs.

Next to it, in the same run, a bare Bolt app (one listener that only acks) on the same server
(`bot.serve.http_server`: waitress with Rotor's thread pool and timeouts, and Bolt's WSGI
adapter) answers the same requests. Rotor's own gates (body cap, signature, payload shape,
workspace) are in its figures, not the bare app's.
Rounds alternate between the two so both see the same machine. The commands are a mix of
what people type: status, list, plan, help and a typo. Rotor's rotation waits on a step that
is re-checked every 0.2 s, and every command queues real work (replies via response_url).

Loopback only; bounded (ROUNDS x 50 requests per app); stops by itself. Prints p50, p99 and
max for both, and the p99 ratio. Targets: Rotor's p99 under 50 ms, within 1.3x of the bare
app. Exits non-zero only when a request failed.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.slack_api import FakeSlack  # noqa: E402
from tests.slackbot import SIGNING_SECRET, BotProcess, free_port, sign  # noqa: E402

CONCURRENCY = 50
ROUNDS = 20
COMMANDS = ("status", "list", "plan whitehall staging", "help", "status signon staging",
            "signn staging", "status 1", "list", "plan publisher staging", "help")


def bare_app(port: int, inline: bool) -> None:
    """A Bolt app that only acks /rotate, served like Rotor serves (runs in a subprocess)."""
    from slack_bolt import App
    from slack_bolt.adapter.wsgi import SlackRequestHandler
    from slack_bolt.authorization import AuthorizeResult

    from bot.serve import http_server

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # as `rotor serve` does

    def authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
        return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id,
                               bot_token="xoxb-bench")

    # Authorized like Rotor's app (a fixed bot token, no auth.test); `inline` also runs the
    # listener in the request thread as Rotor does, otherwise Bolt's defaults.
    app = App(signing_secret=SIGNING_SECRET, authorize=authorize,
              process_before_response=inline)

    @app.command("/rotate")
    def rotate(ack: object) -> None:
        ack()  # type: ignore[operator]

    serve(http_server("127.0.0.1", port, SlackRequestHandler(app)))


def fake_slack(port: int) -> None:
    """The fake Web API in a process of its own, so it does not share the load generator's GIL."""
    from demo.slack_api import _handler

    fake = FakeSlack(port=port)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(fake))
    server.daemon_threads = True
    serve(server)


def serve(server: Any) -> None:
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.1)


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args],
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def fire(port: int, bodies: list[bytes]) -> list[float]:
    """POST every body at once (one thread each); return each request's latency in ms."""
    timestamp = int(time.time())
    signed = [(body, sign(body, timestamp)) for body in bodies]
    start = threading.Barrier(len(signed))
    latencies: list[float] = []
    errors: list[str] = []

    def one(body: bytes, signature: str) -> None:
        start.wait()
        began = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", "/slack/events", body, {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Slack-Request-Timestamp": str(timestamp), "X-Slack-Signature": signature})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors.append(f"HTTP {response.status}")
        except OSError as exc:
            errors.append(type(exc).__name__)
        finally:
            conn.close()
        latencies.append((time.perf_counter() - began) * 1000)

    threads = [threading.Thread(target=one, args=pair) for pair in signed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    if errors:
        raise SystemExit(f"ack_latency: {len(errors)} requests failed: {sorted(set(errors))}")
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    fake_port, inline_port, default_port = free_port(), free_port(), free_port()
    slack = FakeSlack(port=fake_port)  # not started here: only its addresses are used
    start_ack = 0.0
    results: dict[str, list[float]] = {"rotor serve": [], "bare Bolt, like Rotor": [],
                                       "bare Bolt, defaults": []}
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        helpers += [spawn("--fake", str(fake_port)), spawn("--bare", str(inline_port), "inline"),
                    spawn("--bare", str(default_port), "default")]
        for port in (fake_port, inline_port, default_port):
            _wait_for_port(port)
        with tempfile.TemporaryDirectory() as tmp:
            rotor = BotProcess(Path(tmp), slack, log_level="WARNING")
            rotor.control.mkdir()
            (rotor.control / "block-sync").write_text("")  # the rotation waits at `sync`
            rotor.start(ROTOR_BIND="127.0.0.1")  # loopback only, like the bare apps
            try:
                start_ack = rotor.command("signon staging", user="U0ALICE").seconds
                rotation_id = rotor.wait_status("signon", "staging", "active")["id"]
                rotor.wait_step("signon", "staging", "switch", "needs-approval")
                rotor.click({"action_id": "approve", "value": json.dumps(
                    {"rotation": rotation_id, "step": "switch"})}, user="U0BOB")
                rotor.wait_step("signon", "staging", "sync", "waiting")
                targets = list(zip(results.values(), (rotor.port, inline_port, default_port),
                                   strict=True))
                for round_number in range(ROUNDS):
                    bodies = [rotor.command_body(COMMANDS[i % len(COMMANDS)], user="U0CAROL")
                              for i in range(CONCURRENCY)]
                    shift = round_number % len(targets)
                    for latencies, port in targets[shift:] + targets[:shift]:
                        latencies += fire(port, bodies)
                        time.sleep(0.2)  # let queued work drain between bursts
                still = rotor.rotation("signon", "staging")
                assert still and still["steps"]["sync"] == "waiting", still
            finally:
                rotor.stop()
    finally:
        for helper in helpers:
            helper.send_signal(signal.SIGTERM)
            helper.wait(10)

    rotor_ms = results["rotor serve"]
    print(f"ack of `/rotate signon staging` (starts a rotation): {start_ack * 1000:.1f} ms "
          f"(Slack's limit 3 s: {'met' if start_ack < 3 else 'MISSED'})")
    print(f"ack latency: {CONCURRENCY} concurrent signed slash commands x {ROUNDS} rounds "
          f"({len(rotor_ms)} requests each), while a rotation runs")
    for name, values in results.items():
        print(f"  {name:<22} p50 {statistics.median(values):6.1f} ms   p99 "
              f"{percentile(values, 99):6.1f} ms   max {max(values):6.1f} ms")
    p99 = percentile(rotor_ms, 99)
    for name in list(results)[1:]:
        ratio = p99 / percentile(results[name], 99)
        print(f"  p99 rotor / {name}: {ratio:.2f}x "
              f"(target within 1.3x: {'met' if ratio <= 1.3 else 'MISSED'})")
    print(f"  rotor p99 {p99:.1f} ms (target under 50 ms: {'met' if p99 < 50 else 'MISSED'})")


def _wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"ack_latency: the bare app never listened on {port}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        bare_app(int(sys.argv[2]), inline=sys.argv[3] == "inline")
    elif sys.argv[1:2] == ["--fake"]:
        fake_slack(int(sys.argv[2]))
    else:
        main()
