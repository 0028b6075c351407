"""The demo's world: databases, AWS, Kubernetes, Slack, a sample app, and `rotor serve`.

Everything listens on 127.0.0.1 and lives in one folder that is removed at the end.
`rotor serve` runs unchanged, as a subprocess in HTTP mode, pointed at moto's server
(AWS_ENDPOINT_URL), the fake Kubernetes API (KUBECONFIG) and the fake Slack (SLACK_API_URL).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import psycopg
from psycopg import sql

from demo import postgres
from demo.kube_api import FakeKube
from demo.slack_api import TEAM, FakeSlack

APP, ENV, NAMESPACE = "demo-app", "staging", "apps"
ADMIN = "aws_db_admin"
REGION = "eu-west-1"
# The demo's people: Slack user IDs and names.
PEOPLE = {"U0ALICE": "Alice (starts)", "U0BOB": "Bob (approves)", "U0CAROL": "Carol (approves)"}
CHANNEL, SECOND_LINE = "#govuk-developers", "#govuk-2ndline"
AWS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": REGION}

CATALOGUE = """\
# The demo's catalogue: one app in one environment, with the rules production has.
environments:
  staging:
    aws_region: eu-west-1
    kube_context: staging
    db_tls: disabled
    four_eyes: true            # a second person approves
    notify_second_line: true   # 2nd line is told before the old user is dropped
apps:
  demo-app: {engine: postgres}
slack:
  channel: "#govuk-developers"
  second_line_channel: "#govuk-2ndline"
waits: {first_check: 0.2, max_check: 1, rollout_start: 20, drain: 30, sync: 60}
key_age: {schedule: "0 0 29 2 *"}  # no scheduled key-age check in the demo
"""

log = logging.getLogger("rotor.demo")


def _password() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SampleApp:
    """The app's pods: each logs in with the DATABASE_URL it started with, again and again.

    A pod's environment is read from the Kubernetes Secret the moment the pod is created, as
    the kubelet does; it never changes after. Pods log in while ready and not terminating.
    """

    def __init__(self, kube: FakeKube, secret: str, interval: float = 0.3,
                 deployment: str = APP) -> None:
        self.kube, self.secret, self.interval = kube, secret, interval
        self.deployment = deployment
        self.urls: dict[str, str] = {}
        self.ok = 0
        self.failed = 0
        self.by_user: dict[str, int] = {}
        self.last_failure = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-app", daemon=True)
        previous = kube.on_pod_created  # several apps may watch their own pods

        def created(namespace: str, deployment: str, pod: str) -> None:
            if previous is not None:
                previous(namespace, deployment, pod)
            self._created(namespace, deployment, pod)

        kube.on_pod_created = created

    def _created(self, namespace: str, deployment: str, pod: str) -> None:
        if namespace == NAMESPACE and deployment == self.deployment:
            url = self.kube.secret_data_now(NAMESPACE, self.secret).get("DATABASE_URL")
            if url:  # without the Secret, the pod could not start its app
                self.urls[pod] = url

    def start(self) -> SampleApp:
        for pod in self.kube.pods(NAMESPACE, self.deployment):  # pods before the hook
            self._created(NAMESPACE, self.deployment, pod["metadata"]["name"])
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def running(self) -> list[str]:
        pods = self.kube.pods(NAMESPACE, self.deployment)
        return [p["metadata"]["name"] for p in pods
                if "deletionTimestamp" not in p["metadata"]
                and any(c["type"] == "Ready" and c["status"] == "True"
                        for c in p["status"].get("conditions", []))]

    def _run(self) -> None:
        while not self._stop.is_set():
            for pod in self.running():
                url = self.urls.get(pod)
                if url:
                    self._login(url)
            self._stop.wait(self.interval)

    def _login(self, url: str) -> None:
        parts = urlsplit(url)
        user = unquote(parts.username or "?")
        try:
            if parts.scheme.startswith("mysql"):
                import pymysql

                mysql = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=user,
                                        password=unquote(parts.password or ""),
                                        database=parts.path.lstrip("/"), ssl_disabled=True,
                                        connect_timeout=5, read_timeout=5, write_timeout=5)
                with mysql.cursor() as cur:
                    cur.execute("SELECT COUNT(*) FROM visits")
                mysql.close()
            else:
                with psycopg.connect(url, connect_timeout=5) as conn:
                    conn.execute("SELECT count(*) FROM visits").fetchone()
        except Exception as exc:  # every failure is the finding: keep the user, not the URL
            self.failed += 1
            first = str(exc).strip().splitlines()
            self.last_failure = f"{user}: {first[-1] if first else type(exc).__name__}"
            return
        self.ok += 1
        self.by_user[user] = self.by_user.get(user, 0) + 1


class World:
    """Start with `start()`; `stop()` ends every process and removes the folder."""

    def __init__(self, workdir: Path | None = None, mysql_url: str | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="rotor-demo-"))
        self.mysql_url = mysql_url
        self.signing_secret = secrets.token_hex(16)
        self.bot_token = "xoxb-demo-" + secrets.token_hex(6)
        self.port = _free_port()
        self.pg: postgres.Postgres | None = None
        self.moto: Any = None
        self.kube: FakeKube | None = None
        self.slack = FakeSlack(groups={})
        self.app: SampleApp | None = None
        self.apps: list[SampleApp] = []
        self.mysql_prefix = "rotordemo" + secrets.token_hex(3)
        self.bot: subprocess.Popen[bytes] | None = None
        self._n = 0

    # -- starting --------------------------------------------------------------------------

    def start(self) -> World:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pg = postgres.start(self.workdir / "postgres")
        from demo import moto_server

        self.moto = moto_server.start()
        host, port = self.moto.get_host_and_port()
        self.moto_url = f"http://{host}:{port}"
        app_user, app_password, admin_password = APP, _password(), _password()
        self._seed_postgres(app_user, app_password, admin_password)
        sm = self.secretsmanager()
        self.secret_id = f"govuk/{APP}/postgres"
        sm.create_secret(Name=self.secret_id, SecretString=json.dumps({
            "engine": "postgres", "host": self.pg.host, "port": self.pg.port,
            "dbname": "demo_app", "username": app_user, "password": app_password}))
        sm.create_secret(Name=f"{ENV}-rds-admin-passwords",
                         SecretString=json.dumps({APP: admin_password}))

        def read(secret_id: str) -> str:
            return str(sm.get_secret_value(SecretId=secret_id,
                                           VersionStage="AWSCURRENT")["SecretString"])

        self.kube = FakeKube(read, termination_grace=2.0).start()
        external_secret = f"{APP}-postgres"
        self.kube.add_external_secret(NAMESPACE, external_secret, secret_id=self.secret_id,
                                      url_scheme="postgresql")
        self.app = SampleApp(self.kube, external_secret)
        self.kube.add_deployment(NAMESPACE, APP, replicas=3, reloads_on=[external_secret],
                                 rollout_delay=1.0)
        self.apps = [self.app]
        catalogue = CATALOGUE
        if self.mysql_url:
            catalogue = self._seed_mysql(sm, catalogue)
        self.kube.write_kubeconfig(self.workdir / "kubeconfig", context=ENV)
        (self.workdir / "rotor.yml").write_text(catalogue)
        self.slack.start()
        for app in self.apps:
            app.start()
        self._start_bot()
        return self

    def _seed_mysql(self, sm: Any, catalogue: str) -> str:
        """`demo-mysql` on the MySQL/MariaDB server ROTOR_DEMO_MYSQL_URL names (root's URL)."""
        import pymysql

        assert self.kube is not None and self.mysql_url
        url = urlsplit(self.mysql_url)
        host, port = url.hostname or "127.0.0.1", url.port or 3306
        prefix = self.mysql_prefix
        admin, admin_pw, user, user_pw = f"{prefix}_admin", _password(), f"{prefix}_app", \
            _password()
        conn = pymysql.connect(host=host, port=port, user=unquote(url.username or "root"),
                               password=unquote(url.password or ""), ssl_disabled=True,
                               autocommit=True, connect_timeout=5, read_timeout=30,
                               write_timeout=30)
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{prefix}_app`")  # our own generated name
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (admin, admin_pw))
            # RDS's master user: every privilege with grant option, except SUPER.
            cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@'%%' WITH GRANT OPTION", (admin,))
            cur.execute("REVOKE SUPER ON *.* FROM %s@'%%'", (admin,))
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, user_pw))
            cur.execute(f"GRANT ALL PRIVILEGES ON `{prefix}_app`.* TO %s@'%%'", (user,))
            cur.execute(f"CREATE TABLE `{prefix}_app`.visits (id INT AUTO_INCREMENT "
                        "PRIMARY KEY, at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)")
        conn.close()
        sm.create_secret(Name="govuk/demo-mysql/mysql", SecretString=json.dumps({
            "engine": "mysql", "host": host, "port": port, "dbname": f"{prefix}_app",
            "username": user, "password": user_pw}))
        admins = json.loads(sm.get_secret_value(SecretId=f"{ENV}-rds-admin-passwords",
                                                VersionStage="AWSCURRENT")["SecretString"])
        sm.put_secret_value(SecretId=f"{ENV}-rds-admin-passwords",
                            SecretString=json.dumps({**admins, "demo-mysql": admin_pw}))
        self.kube.add_external_secret(NAMESPACE, "demo-mysql-mysql",
                                      secret_id="govuk/demo-mysql/mysql", url_scheme="mysql2")
        app = SampleApp(self.kube, "demo-mysql-mysql", deployment="demo-mysql")
        self.kube.add_deployment(NAMESPACE, "demo-mysql", replicas=2,
                                 reloads_on=["demo-mysql-mysql"], rollout_delay=1.0)
        self.apps.append(app)
        return catalogue.replace(
            "  demo-app: {engine: postgres}\n",
            f"  demo-app: {{engine: postgres}}\n  demo-mysql: {{engine: mysql, admin_user: "
            f"{admin}}}\n")

    def _drop_mysql(self) -> None:
        import pymysql

        assert self.mysql_url
        url = urlsplit(self.mysql_url)
        conn = pymysql.connect(host=url.hostname or "127.0.0.1", port=url.port or 3306,
                               user=unquote(url.username or "root"),
                               password=unquote(url.password or ""), ssl_disabled=True,
                               autocommit=True, connect_timeout=5, read_timeout=30,
                               write_timeout=30)
        with conn.cursor() as cur:
            cur.execute("SELECT User, Host FROM mysql.user WHERE User LIKE %s OR User LIKE %s",
                        (self.mysql_prefix + "%", "demo_mysql_user_%"))
            for user, host in cur.fetchall():
                cur.execute("DROP USER IF EXISTS %s@%s", (user, host))
            cur.execute(f"DROP DATABASE IF EXISTS `{self.mysql_prefix}_app`")
        conn.close()

    def counter(self) -> dict[str, Any]:
        """Every sample app's logins, added up."""
        by_user: dict[str, int] = {}
        for app in self.apps:
            by_user.update(app.by_user)
        failures = [app.last_failure for app in self.apps if app.last_failure]
        return {"ok": sum(a.ok for a in self.apps), "failed": sum(a.failed for a in self.apps),
                "by_user": by_user, "pods": sum(len(a.running()) for a in self.apps),
                "last_failure": failures[-1] if failures else ""}

    def login_line(self) -> str:
        k = self.counter()
        users = ", ".join(f"{user} {n}" for user, n in k["by_user"].items())
        return (f"logins: {k['ok']} succeeded, {k['failed']} failed ({users})"
                + (f"; last failure {k['last_failure']}" if k["failed"] else ""))

    def secretsmanager(self) -> Any:
        import boto3

        return boto3.client("secretsmanager", endpoint_url=self.moto_url, region_name=REGION,
                            aws_access_key_id="demo", aws_secret_access_key="demo")

    def _seed_postgres(self, app_user: str, app_password: str, admin_password: str) -> None:
        """An RDS-like instance: the admin can create roles, the app owns its database."""
        assert self.pg is not None
        with psycopg.connect(host=self.pg.host, port=self.pg.port, user=self.pg.superuser,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE CREATEDB PASSWORD {}").format(
                sql.Identifier(ADMIN), sql.Literal(admin_password)))
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(app_user), sql.Literal(app_password)))
            conn.execute(sql.SQL("CREATE DATABASE demo_app OWNER {}").format(
                sql.Identifier(app_user)))
            # On RDS the admin made the app's role, so it may drop it (PG16: ADMIN OPTION).
            conn.execute(sql.SQL("GRANT {} TO {} WITH ADMIN OPTION").format(
                sql.Identifier(app_user), sql.Identifier(ADMIN)))
        with psycopg.connect(host=self.pg.host, port=self.pg.port, user=app_user,
                             password=app_password, dbname="demo_app", autocommit=True) as conn:
            conn.execute("CREATE TABLE visits (id serial PRIMARY KEY, at timestamptz "
                         "NOT NULL DEFAULT now())")
            conn.execute("INSERT INTO visits DEFAULT VALUES")

    def env(self) -> dict[str, str]:
        """Environment of `rotor serve`: everything pointed into the world."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLACK_", "ROTOR_", "AWS_", "KUBECONFIG"))}
        env.update(AWS)
        env.update({
            "AWS_ENDPOINT_URL": self.moto_url, "KUBECONFIG": str(self.workdir / "kubeconfig"),
            "ROTOR_CONFIG": str(self.workdir / "rotor.yml"),
            "ROTOR_STATE": str(self.workdir / "rotor.db"),
            "SLACK_BOT_TOKEN": self.bot_token, "SLACK_SIGNING_SECRET": self.signing_secret,
            "SLACK_API_URL": self.slack.url, "PORT": str(self.port), "ROTOR_BIND": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def _start_bot(self) -> None:
        logfile = (self.workdir / "rotor.log").open("ab")
        self.bot = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve"], env=self.env(),
                                    stdout=logfile, stderr=logfile, cwd=self.workdir)
        logfile.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.bot.poll() is not None:
                raise RuntimeError(f"rotor serve exited {self.bot.returncode}:\n{self.bot_log()}")
            try:
                with urllib.request.urlopen(f"{self.bot_url}/readyz", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"rotor serve never became ready:\n{self.bot_log()}")

    def bot_log(self) -> str:
        path = self.workdir / "rotor.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def bot_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what Slack sends ------------------------------------------------------------------

    def send(self, body: bytes, content_type: str = "application/x-www-form-urlencoded"
             ) -> tuple[int, str]:
        """POST to Rotor's /slack/events, signed with the signing secret exactly as Slack
        signs: v0=HMAC-SHA256(secret, "v0:{timestamp}:{body}")."""
        timestamp = str(int(time.time()))
        base = f"v0:{timestamp}:".encode() + body
        signature = "v0=" + hmac.new(self.signing_secret.encode(), base,
                                     hashlib.sha256).hexdigest()
        request = urllib.request.Request(f"{self.bot_url}/slack/events", data=body,
                                         method="POST")
        request.add_header("Content-Type", content_type)
        request.add_header("X-Slack-Request-Timestamp", timestamp)
        request.add_header("X-Slack-Signature", signature)
        try:
            with urllib.request.urlopen(request, timeout=15) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def _next(self) -> int:
        self._n += 1
        return self._n

    def command(self, text: str, user: str = "U0ALICE") -> tuple[int, str]:
        n = self._next()
        return self.send(urlencode({
            "token": "demo", "team_id": TEAM, "team_domain": "demo", "channel_id": "C0DEV",
            "channel_name": CHANNEL.lstrip("#"), "user_id": user,
            "user_name": PEOPLE.get(user, user).split()[0].lower(), "command": "/rotate",
            "text": text, "api_app_id": "A0ROTOR",
            "response_url": self.slack.response_url(f"cmd-{n}-{user}"),
            "trigger_id": f"trigger-{n}-{time.monotonic_ns()}"}).encode())

    def click(self, action_id: str, value: str, user: str, channel: str = "C0DEV",
              message_ts: str = "1.0") -> tuple[int, str]:
        n = self._next()
        payload = {
            "type": "block_actions", "team": {"id": TEAM, "domain": "demo"},
            "user": {"id": user, "username": user.lower(), "team_id": TEAM},
            "api_app_id": "A0ROTOR", "token": "demo",
            "trigger_id": f"trigger-{n}-{time.monotonic_ns()}",
            "container": {"type": "message", "message_ts": message_ts, "channel_id": channel,
                          "is_ephemeral": False},
            "channel": {"id": channel, "name": CHANNEL.lstrip("#")},
            "response_url": self.slack.response_url(f"act-{n}-{user}"),
            "actions": [{"type": "button", "action_id": action_id, "block_id": "b",
                         "value": value, "action_ts": str(time.time())}],
        }
        return self.send(urlencode({"payload": json.dumps(payload)}).encode())

    def open_home(self, user: str) -> tuple[int, str]:
        body = json.dumps({"token": "demo", "team_id": TEAM, "api_app_id": "A0ROTOR",
                           "type": "event_callback", "event_id": f"Ev{self._next()}",
                           "event_time": int(time.time()),
                           "event": {"type": "app_home_opened", "user": user, "tab": "home",
                                     "channel": "D0HOME"}}).encode()
        return self.send(body, "application/json")

    # -- stopping --------------------------------------------------------------------------

    def stop(self) -> None:
        if self.bot is not None and self.bot.poll() is None:
            self.bot.terminate()
            try:
                self.bot.wait(30)
            except subprocess.TimeoutExpired:
                self.bot.kill()
        for app in self.apps:
            app.stop()
        if self.mysql_url and self.moto is not None:
            try:
                self._drop_mysql()
            except Exception as exc:  # the server went away: say what is left behind
                log.warning("demo: could not drop %s* on the MySQL server: %s",
                            self.mysql_prefix, exc)
        self.slack.stop()
        if self.kube is not None:
            self.kube.stop()
        if self.moto is not None:
            self.moto.stop()
        if self.pg is not None:
            self.pg.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> World:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
