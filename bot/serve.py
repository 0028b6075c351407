"""`rotor serve`: the Slack bot, the engine's worker, the reporter and the scheduler.

Socket Mode when SLACK_APP_TOKEN is set; otherwise HTTP on PORT, with Slack's requests at
POST /slack/events (signatures verified by Bolt). /healthz and /readyz answer in both modes.
Without SLACK_BOT_TOKEN it runs the worker and scheduler only (rotations started with the
CLI still run). SIGTERM or SIGINT stops it cleanly: no new requests, running jobs and the
running step finish, leases and locks are released.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from apscheduler.schedulers.background import BackgroundScheduler

import handlers
from bot import slack
from bot.fleet_notice import FleetSecondLine
from bot.metrics import RotorMetrics
from bot.notify import SlackSecondLine
from bot.reporter import Reporter
from bot.settings import Settings
from bot.wiring import build_engine
from bot.worker import AcksFirst, EnginePool, Jobs, remind_and_expire
from rotation.errors import ConfigError
from rotation.policy import Policy

log = logging.getLogger("rotor.serve")

EVENTS_PATH = "/slack/events"
MAX_BODY = 1 << 20  # Slack's payloads are a few KB
HTTP_THREADS = 8  # listeners only ack and enqueue: a few threads answer a burst of commands
HTTP_CONNECTIONS = 512  # open connections at most; idle and half-sent ones time out
SWEEP_SECONDS = 5.0  # the reporter also looks for rows other processes (the CLI) wrote
REQUEST_LOCKS = "slack-request:"  # handlers.Deps.first_time: one lock per Slack trigger_id
REQUEST_LOCK_DAYS = 1.0  # Slack retries within minutes; a day later the lock is only clutter

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class HttpServer:
    """waitress behind Rotor's routes: a bounded pool of worker threads, read timeouts, a body
    cap, and a clean stop from another thread.

    waitress reads each request completely in its I/O loop before a worker thread sees it,
    so slow or half-sent requests hold a socket (until `timeout`), never a thread; it refuses
    a Content-Length that is not digits, and bodies over `MAX_BODY`, before the app runs.
    """

    def __init__(self, host: str, port: int, app: WSGIApp, *, threads: int = HTTP_THREADS,
                 timeout: float = 10.0, answering: AcksFirst | None = None) -> None:
        from waitress.server import create_server
        from waitress.task import ThreadedTaskDispatcher

        counted = answering or AcksFirst()

        class Dispatcher(ThreadedTaskDispatcher):
            """Counts a request as being answered from the moment it waits for a thread, so
            Rotor's queued jobs let every waiting ack go first (`AcksFirst`)."""

            def add_task(self, task: Any) -> None:
                counted.__enter__()
                super().add_task(task)

        def app_counted(environ: dict[str, Any], start_response: Callable[..., Any]
                        ) -> Iterable[bytes]:
            try:
                return app(environ, start_response)
            finally:
                counted.__exit__(None, None, None)

        dispatcher = Dispatcher()
        dispatcher.set_thread_count(threads)
        self.server: Any = create_server(
            app_counted, host=host, port=port, _dispatcher=dispatcher,
            channel_timeout=max(1, int(timeout)),
            cleanup_interval=max(1, int(timeout) // 2), connection_limit=HTTP_CONNECTIONS,
            max_request_body_size=MAX_BODY, max_request_header_size=64 * 1024, backlog=128,
            ident="rotor", expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        self._stop = threading.Event()
        self._stopped = threading.Event()

    @property
    def server_address(self) -> tuple[str, int]:
        return str(self.server.effective_host), int(self.server.effective_port)

    @property
    def server_port(self) -> int:
        return int(self.server.effective_port)

    def serve_forever(self, poll_interval: float = 0.1) -> None:
        from waitress import wasyncore

        try:
            while not self._stop.is_set():  # one poll at a time, so a stop is seen at once
                wasyncore.loop(timeout=poll_interval, map=self.server._map, use_poll=True,
                               count=1)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop accepting; requests being answered finish first (bounded)."""
        self._stop.set()
        self.server.pull_trigger()
        self._stopped.wait(5)
        self.server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)

    def server_close(self) -> None:
        from waitress import wasyncore

        wasyncore.close_all(self.server._map, ignore_all=True)


def http_server(host: str, port: int, app: WSGIApp, *, timeout: float = 10.0,
                answering: AcksFirst | None = None) -> HttpServer:
    return HttpServer(host, port, app, timeout=timeout, answering=answering)


def _answer(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]


class Rejected(Exception):
    """A request Rotor does not pass on to Bolt; `status` says why."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


def read_body(environ: Mapping[str, Any]) -> bytes:
    """The request body, never more than MAX_BODY, whatever Content-Length claims."""
    length = str(environ.get("CONTENT_LENGTH") or "").strip()
    if length and not length.isdigit():
        raise Rejected("400 Bad Request", "bad Content-Length")
    if length and int(length) > MAX_BODY:
        raise Rejected("413 Payload Too Large", "too large")
    stream = environ.get("wsgi.input")
    body = stream.read(min(int(length or 0), MAX_BODY) if length else MAX_BODY + 1) \
        if stream is not None else b""
    if len(body) > MAX_BODY:
        raise Rejected("413 Payload Too Large", "too large")
    return bytes(body)


# The parts of a payload Bolt reads before any listener runs, and the types it expects.
_OBJECTS = ("team", "enterprise", "user", "channel", "container", "view", "message", "event",
            "authorizations", "function_data", "bot_access_token", "workflow_step")


def check_shape(body: bytes, content_type: str) -> None:
    """Raise Rejected (400) unless the body is a payload Slack could have sent: a form or
    JSON object whose fields have the types Bolt assumes. Run only on signed requests."""
    try:
        text = body.decode("utf-8")
        if "application/json" in content_type:
            payload: Any = json.loads(text)
        else:
            form = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
            if any(len(values) != 1 for values in form.values()):
                raise ValueError("a repeated form field")
            payload = {key: values[0] for key, values in form.items()}
            if "payload" in payload:
                payload = json.loads(payload["payload"])
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Rejected("400 Bad Request", "malformed payload") from exc
    if not isinstance(payload, dict):
        raise Rejected("400 Bad Request", "malformed payload")
    problems = [key for key in _OBJECTS if key in payload and not _object_like(key, payload[key])]
    for key in ("type", "team_id", "enterprise_id", "user_id", "channel_id", "command", "text",
                "response_url", "trigger_id", "api_app_id", "token", "event_id", "callback_id"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            problems.append(key)
    actions = payload.get("actions")
    if actions is not None and not (isinstance(actions, list) and all(
            isinstance(a, dict) and all(isinstance(a.get(k, ""), str)
                                        for k in ("action_id", "block_id", "value", "type"))
            for a in actions)):
        problems.append("actions")
    for key in ("team", "enterprise", "user", "channel"):
        value = payload.get(key)
        if isinstance(value, dict) and any(not isinstance(value.get(k, ""), str | type(None))
                                           for k in ("id", "team_id", "enterprise_id")):
            problems.append(key)
    event = payload.get("event")
    if isinstance(event, dict) and any(not isinstance(event.get(k, ""), str | type(None))
                                       for k in ("type", "user", "channel", "tab", "subtype",
                                                 "user_team", "team")):
        problems.append("event")
    if problems:
        raise Rejected("400 Bad Request", f"malformed payload ({', '.join(sorted(problems))})")


def _object_like(key: str, value: Any) -> bool:
    if key in ("authorizations",):
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if key in ("team", "enterprise", "user", "channel"):
        return value is None or isinstance(value, dict | str)
    if key == "bot_access_token":
        return isinstance(value, str)
    return value is None or isinstance(value, dict)


def _header(environ: Mapping[str, Any], name: str) -> str | None:
    value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return str(value) if value is not None else None


def _signed(secret: str | None, body: bytes, environ: Mapping[str, Any],
            now: Callable[[], float] = time.time) -> bool:
    """Slack's v0 signature (HMAC-SHA256 of "v0:{timestamp}:{body}") over the raw bytes, and
    a timestamp within five minutes. slack_sdk's verifier decodes the body first, so bytes
    that are not UTF-8 would raise before the signature is even compared."""
    timestamp = _header(environ, "X-Slack-Request-Timestamp") or ""
    signature = _header(environ, "X-Slack-Signature") or ""
    if not secret or not timestamp.isdigit() or abs(now() - int(timestamp)) > 300:
        return False
    expected = hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body,
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest("v0=" + expected, signature)


def web_app(slack_events: WSGIApp | None, ready: Callable[[], list[str]],
            answering: AcksFirst, signing_secret: str | None = None,
            warnings: Callable[[], list[str]] = list,
            metrics: WSGIApp | None = None) -> WSGIApp:
    """Routes /healthz, /readyz, /metrics and (in HTTP mode) Slack's requests, counted in
    `answering`.

    Slack's requests pass three gates before Bolt sees them: the body cap (413), the
    signature, checked on the raw bytes before anything parses them (401), and the shape of
    the payload (400). Bolt then checks the signature again and dispatches.
    """
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path == "/metrics" and metrics is not None:
            return metrics(environ, start_response)
        if path == "/healthz":
            return _answer(start_response, "200 OK", "ok")
        if path == "/readyz":
            problems, notes = ready(), warnings()
            text = "; ".join(problems) or "ready"
            if notes:
                text += "".join(f"\nwarning: {note}" for note in notes)
            return _answer(start_response, "503 Service Unavailable" if problems else "200 OK",
                           text)
        if path == EVENTS_PATH and slack_events is not None:
            if method != "POST":
                return _answer(start_response, "405 Method Not Allowed", "POST only")
            try:
                body = read_body(environ)
                if not _signed(signing_secret, body, environ):
                    raise Rejected("401 Unauthorized", "invalid request")
                check_shape(body, str(environ.get("CONTENT_TYPE") or ""))
            except Rejected as rejected:
                log.info("http: %s: %s", rejected.status, rejected.text)
                return _answer(start_response, rejected.status, rejected.text)
            environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
            return slack_events(environ, start_response)
        return _answer(start_response, "404 Not Found", "not found")

    return app


class Service:
    """Everything `rotor serve` runs, built from settings; `start()` and `stop()`."""

    def __init__(self, settings: Settings, *, host: str = "0.0.0.0",
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        catalogue = settings.catalogue
        socket_mode = bool(settings.slack_app_token)
        if settings.slack_bot_token and not socket_mode and not settings.slack_signing_secret:
            raise ConfigError("HTTP mode needs SLACK_SIGNING_SECRET (or set SLACK_APP_TOKEN "
                              "for Socket Mode)")
        if socket_mode and not settings.slack_bot_token:
            raise ConfigError("Socket Mode needs SLACK_BOT_TOKEN as well as SLACK_APP_TOKEN")
        self.scheduler = BackgroundScheduler(timezone=UTC, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        self.stopping = threading.Event()
        self.reporter: Reporter | None = None
        self.workspace: slack.Workspace | None = None
        self.socket: Any = None
        client = (slack.limited_client(settings.slack_bot_token, settings.slack_api_url)
                  if settings.slack_bot_token else None)
        second_line = None
        if client is not None:
            second_line = SlackSecondLine(client, catalogue.slack.second_line_channel,
                                          catalogue.slack.second_line_group,
                                          thread_link=self._thread_link, deferred=True)
        # A fleet's members share one 2nd line notice per gate (bot.fleet_notice); the
        # reporter posts it, never a worker's thread.
        notifier = FleetSecondLine(second_line) if second_line is not None else None
        self.engine = build_engine(settings, second_line=notifier, clock=clock)
        if second_line is not None:
            second_line.store = self.engine.store
        self.second_line = second_line
        self.metrics = RotorMetrics(self.engine, slack=client is not None, clock=clock)
        # The engine above serves people (commands, clicks); the pool's engines run steps,
        # each with its own store connection and lease owner, sharing the clients.
        self.worker = EnginePool([
            build_engine(settings, clients=self.engine.clients, second_line=notifier,
                         clock=clock) for _ in range(settings.workers)])
        self.answering = AcksFirst()
        self.jobs = Jobs(handlers.report_error, acks=self.answering)
        slack_events: WSGIApp | None = None
        if client is not None:
            policy = Policy(catalogue, slack.GroupMembers(client))
            self.reporter = Reporter(self.engine, client, policy,
                                     schedule_retry=self._retry_reporter,
                                     second_line=notifier)
            app = slack.bolt_app(client, settings.slack_signing_secret, socket_mode=socket_mode)
            self.workspace = slack.Workspace(client, catalogue.slack.teams)
            handlers.register(app, handlers.Deps(self.engine, policy, self.jobs, self.reporter,
                                                 client, catalogue.slack.channel,
                                                 self.workspace))
            if socket_mode:
                from slack_bolt.adapter.socket_mode import SocketModeHandler

                self.socket = SocketModeHandler(app, settings.slack_app_token)
            else:
                from slack_bolt.adapter.wsgi import SlackRequestHandler

                slack_events = SlackRequestHandler(app, EVENTS_PATH)
        self.client = client
        self.engine.on_change = self._changed
        for engine in self.worker.engines:
            engine.on_change = self._changed
        self.http = http_server(host, settings.port,
                                web_app(slack_events, self.problems, self.answering,
                                        settings.slack_signing_secret, self.warnings,
                                        self.metrics.wsgi()),
                                timeout=settings.http_timeout, answering=self.answering)

    # -- wiring -----------------------------------------------------------------------------

    def _changed(self, rotation_id: int) -> None:
        self.worker.wake()
        if self.reporter is not None:
            self.reporter.wake()

    def _learn_workspace(self) -> None:
        """Ask Slack which team Rotor is installed in, until it answers (bounded backoff)."""
        delay = 1.0
        while self.workspace is not None and self.workspace.installed() is None:
            if self.stopping.wait(delay):
                return
            delay = min(delay * 2, 60.0)

    def _thread_link(self, rotation: Any) -> str | None:
        return self.reporter.thread_link(rotation) if self.reporter else None

    def _retry_reporter(self, delay: float) -> None:
        if self.reporter is not None and self.scheduler.running:
            self.scheduler.add_job(self.reporter.wake, "date", id="reporter-retry",
                                   replace_existing=True,
                                   run_date=datetime.now(UTC) + timedelta(seconds=delay))

    def _schedule(self) -> None:
        slack_config = self.settings.catalogue.slack
        remind = slack_config.approval_reminder_minutes * 60
        expire = slack_config.approval_expiry_hours * 3600
        every = min(60.0, max(0.2, min(remind, expire) / 4))
        reminded = self.reporter.wake if self.reporter else (lambda rotation_id: None)
        self.scheduler.add_listener(self.metrics.scheduler_ran,
                                    EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self.scheduler.add_job(remind_and_expire, "interval", seconds=every, id="approvals",
                               args=(self.engine, remind, expire, reminded))
        if self.reporter is not None:
            self.scheduler.add_job(self.reporter.sweep, "interval", seconds=SWEEP_SECONDS,
                                   id="reporter-sweep")
        self.scheduler.add_job(self._prune_request_locks, "interval", hours=1,
                               id="prune-request-locks")
        # A fleet whose starter died part way starts the rest (now, then every minute).
        self.scheduler.add_job(self._resume_fleet_starts, "interval", seconds=60,
                               id="fleet-starts", next_run_time=datetime.now(UTC))
        from bot import reminders  # key-age checks and daily approval nudges (issue 5)

        reminders.schedule(self.scheduler, self.engine, self.client, self.settings.catalogue,
                           self.engine.clock)

    def _resume_fleet_starts(self) -> None:
        from rotation import fleet as fleets

        for fleet_id in fleets.resume_starts(self.engine):
            log.info("serve: fleet #%s: started the apps its starter had not", fleet_id)

    def _prune_request_locks(self) -> None:
        """Forget the locks that kept Slack's re-sent requests from running twice."""
        expired_before = self.engine.clock() - REQUEST_LOCK_DAYS * 86400
        pruned = self.engine.store.prune_locks(REQUEST_LOCKS, expired_before)
        if pruned:
            log.info("serve: pruned %s request locks that expired over a day ago", pruned)

    def warnings(self) -> list[str]:
        """What people must fix while Rotor keeps answering (shown by /readyz, still 200):
        a channel Rotor cannot post or read in."""
        found = [self.second_line.problem if self.second_line else None,
                 self.reporter.problem if self.reporter else None]
        return [problem for problem in found if problem]

    def problems(self) -> list[str]:
        """Why the process is not ready; empty when it is."""
        problems = []
        if not self.worker.alive:
            problems.append("the engine worker is not running")
        if (state := self.engine.store.ping()) is not None:
            problems.append(state)
        if not self.scheduler.running:
            problems.append("the scheduler is not running")
        if self.workspace is not None and self.workspace.known() is None:
            problems.append("the installed workspace is not known yet (auth.test)")
        if self.socket is not None and not self.socket.client.is_connected():
            problems.append("not connected to Slack (Socket Mode)")
        if self.stopping.is_set():
            problems.append("stopping")
        return problems

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        self._schedule()
        self.scheduler.start()
        self.worker.start()
        if self.reporter is not None:
            self.reporter.start()
        self._spawn("rotor-http", lambda: self.http.serve_forever(poll_interval=0.1))
        if self.workspace is not None:  # which team is ours: asked now, not on a click
            self._spawn("rotor-workspace", self._learn_workspace)
        if self.socket is not None:
            self._spawn("rotor-socket", self._connect_socket)
        mode = ("Socket Mode" if self.socket is not None else "HTTP mode" if self.reporter
                else "without Slack (no SLACK_BOT_TOKEN)")
        log.info("serve: %s; health on port %s", mode, self.http.server_port)

    @staticmethod
    def _spawn(name: str, target: Callable[[], None]) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    def _connect_socket(self) -> None:
        delay = 1.0
        while not self.stopping.is_set():
            try:
                self.socket.connect()
                log.info("serve: connected to Slack in Socket Mode")
                return
            except slack.SLACK_ERRORS as exc:
                log.warning("serve: Socket Mode connection failed (%s); retrying in %ss",
                            type(exc).__name__, delay)
            self.stopping.wait(delay)
            delay = min(delay * 2, 60.0)

    def stop(self) -> None:
        log.info("serve: stopping")
        self.stopping.set()
        self.http.shutdown()
        self.http.server_close()
        if self.socket is not None:
            self.socket.close()
        self.scheduler.shutdown(wait=False)
        self.jobs.stop()
        self.worker.stop()
        if self.reporter is not None:
            self.reporter.stop()
        log.info("serve: stopped")


def run(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT."""
    service = Service(settings, host=settings.host)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    stop.wait()
    service.stop()
