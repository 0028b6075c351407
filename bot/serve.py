"""`rotor serve`: the Slack bot, the engine's worker, the reporter and the scheduler.

Socket Mode when SLACK_APP_TOKEN is set; otherwise HTTP on PORT, with Slack's requests at
POST /slack/events (signatures verified by Bolt). /healthz and /readyz answer in both modes.
Without SLACK_BOT_TOKEN it runs the worker and scheduler only (rotations started with the
CLI still run). SIGTERM or SIGINT stops it cleanly: no new requests, running jobs and the
running step finish, leases and locks are released.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from apscheduler.schedulers.background import BackgroundScheduler

import handlers
from bot import slack
from bot.metrics import RotorMetrics
from bot.notify import SlackSecondLine
from bot.reporter import Reporter
from bot.settings import Settings
from bot.wiring import build_engine
from bot.worker import AcksFirst, EngineWorker, Jobs, remind_and_expire
from rotation.errors import ConfigError
from rotation.policy import Policy

log = logging.getLogger("rotor.serve")

EVENTS_PATH = "/slack/events"
MAX_BODY = 1 << 20  # Slack's payloads are a few KB
SWEEP_SECONDS = 5.0  # the reporter also looks for rows other processes (the CLI) wrote
REQUEST_LOCKS = "slack-request:"  # handlers.Deps.first_time: one lock per Slack trigger_id
REQUEST_LOCK_DAYS = 1.0  # Slack retries within minutes; a day later the lock is only clutter

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server, one thread per request, with a backlog for bursts of commands."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class QuietHandler(WSGIRequestHandler):
    """No access log on stderr: Slack's requests carry user IDs, and health checks are noise."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


def http_server(host: str, port: int, app: WSGIApp) -> ThreadingWSGIServer:
    server = make_server(host, port, app, server_class=ThreadingWSGIServer,
                         handler_class=QuietHandler)
    assert isinstance(server, ThreadingWSGIServer)
    return server


def _answer(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]


def web_app(slack_events: WSGIApp | None, ready: Callable[[], list[str]],
            answering: AcksFirst, metrics: WSGIApp | None = None) -> WSGIApp:
    """Routes /healthz, /readyz, /metrics and (in HTTP mode) Slack's requests, counted in
    `answering`."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path == "/metrics" and metrics is not None:
            return metrics(environ, start_response)
        if path == "/healthz":
            return _answer(start_response, "200 OK", "ok")
        if path == "/readyz":
            problems = ready()
            return _answer(start_response, "503 Service Unavailable" if problems else "200 OK",
                           "; ".join(problems) or "ready")
        if path == EVENTS_PATH and slack_events is not None:
            if method != "POST":
                return _answer(start_response, "405 Method Not Allowed", "POST only")
            if int(environ.get("CONTENT_LENGTH") or 0) > MAX_BODY:
                return _answer(start_response, "413 Payload Too Large", "too large")
            try:
                with answering:
                    return slack_events(environ, start_response)
            except ValueError:  # Bolt parses the body before anything else: not Slack's JSON
                return _answer(start_response, "400 Bad Request", "malformed payload")
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
        self.socket: Any = None
        client = (slack.web_client(settings.slack_bot_token, settings.slack_api_url)
                  if settings.slack_bot_token else None)
        second_line = None
        if client is not None:
            second_line = SlackSecondLine(client, catalogue.slack.second_line_channel,
                                          catalogue.slack.second_line_group,
                                          thread_link=self._thread_link)
        self.engine = build_engine(settings, second_line=second_line, clock=clock)
        self.metrics = RotorMetrics(self.engine, slack=client is not None, clock=clock)
        self.worker = EngineWorker(self.engine)
        self.answering = AcksFirst()
        self.jobs = Jobs(handlers.report_error, acks=self.answering)
        slack_events: WSGIApp | None = None
        if client is not None:
            policy = Policy(catalogue, slack.GroupMembers(client))
            self.reporter = Reporter(self.engine, client, policy,
                                     schedule_retry=self._retry_reporter)
            app = slack.bolt_app(client, settings.slack_signing_secret, socket_mode=socket_mode)
            handlers.register(app, handlers.Deps(self.engine, policy, self.jobs, self.reporter,
                                                 client, catalogue.slack.channel))
            if socket_mode:
                from slack_bolt.adapter.socket_mode import SocketModeHandler

                self.socket = SocketModeHandler(app, settings.slack_app_token)
            else:
                from slack_bolt.adapter.wsgi import SlackRequestHandler

                slack_events = SlackRequestHandler(app, EVENTS_PATH)
        self.client = client
        self.engine.on_change = self._changed
        self.http = http_server(host, settings.port,
                                web_app(slack_events, self.problems, self.answering,
                                        self.metrics.wsgi()))

    # -- wiring -----------------------------------------------------------------------------

    def _changed(self, rotation_id: int) -> None:
        self.worker.wake()
        if self.reporter is not None:
            self.reporter.wake()

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
        from bot import reminders  # key-age checks and daily approval nudges (issue 5)

        reminders.schedule(self.scheduler, self.engine, self.client, self.settings.catalogue,
                           self.engine.clock)

    def _prune_request_locks(self) -> None:
        """Forget the locks that kept Slack's re-sent requests from running twice."""
        expired_before = self.engine.clock() - REQUEST_LOCK_DAYS * 86400
        pruned = self.engine.store.prune_locks(REQUEST_LOCKS, expired_before)
        if pruned:
            log.info("serve: pruned %s request locks that expired over a day ago", pruned)

    def problems(self) -> list[str]:
        """Why the process is not ready; empty when it is."""
        problems = []
        if not self.worker.alive:
            problems.append("the engine worker is not running")
        if (state := self.engine.store.ping()) is not None:
            problems.append(state)
        if not self.scheduler.running:
            problems.append("the scheduler is not running")
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
