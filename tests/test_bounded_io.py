"""Every network call has a bounded time: each client, pointed at a peer that accepts and
never answers, fails within its bound instead of hanging (and the lease outlives them all).

The bounds are shrunk to a second here so the tests are quick; each assertion allows the
bound plus a generous allowance for a loaded machine, far below "hangs forever".
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import kubernetes
import pytest

from bot.settings import Settings
from bot.wiring import build_engine
from rotation import aws, mysql_db, postgres_db, timeouts
from rotation.engine import LEASE_SECONDS
from rotation.errors import DatabaseError, KubeError
from rotation.kube import Kube
from tests.fakes.silent import SilentServer
from tests.rig import Rig

SMALL = timeouts.Bounds(db_connect=1, db_read=1, db_write=1, db_lock=1, aws_connect=1,
                        aws_read=1, aws_attempts=2, kube_connect=1, kube_read=1,
                        kube_attempts=1, slack=1, slack_attempts=2, slack_max_retry_after=1)
LOADED = 10.0  # what a loaded 2-core machine may add to a bound


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> timeouts.Bounds:
    monkeypatch.setattr(timeouts, "BOUNDS", SMALL)
    return SMALL


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


def _fails_within(bound: float, call: object, *errors: type[BaseException]) -> float:
    started = time.monotonic()
    with pytest.raises(errors):
        call()  # type: ignore[operator]
    elapsed = time.monotonic() - started
    assert elapsed < bound + LOADED, f"took {elapsed:.1f}s, bound {bound:.1f}s"
    return elapsed


def test_the_lease_outlives_the_longest_bounded_call_with_a_margin():
    bounds = timeouts.BOUNDS
    assert LEASE_SECONDS >= (bounds.longest_call() + timeouts.HEARTBEAT_SECONDS
                             + timeouts.MARGIN_SECONDS)
    timeouts.check()
    with pytest.raises(AssertionError, match="does not outlive"):
        timeouts.check(timeouts.Bounds(aws_read=60))
    with pytest.raises(AssertionError, match="does not outlive"):
        timeouts.check(bounds, lease=bounds.longest_call() + 1)


def test_mysql_connect_to_a_silent_server_fails_within_its_bound(small_bounds, silent):
    ep = mysql_db.Endpoint(host="127.0.0.1", port=silent.port, user="u", password="p",
                           tls="disabled")
    _fails_within(small_bounds.mysql_call(), lambda: mysql_db.connect(ep), DatabaseError)
    assert silent.accepted == 1


def test_postgres_connect_to_a_silent_server_fails_within_its_bound(small_bounds, silent):
    ep = postgres_db.Endpoint(host="127.0.0.1", port=silent.port, user="u", password="p",
                              database="d", tls="disabled")
    _fails_within(small_bounds.postgres_call(), lambda: postgres_db.connect(ep), DatabaseError)
    assert silent.accepted >= 1


def test_a_postgres_statement_ends_at_statement_timeout(small_bounds, postgres_box):
    ep = postgres_db.Endpoint(host=postgres_box.host, port=postgres_box.port,
                              user=postgres_box.admin_user, password=postgres_box.admin_password,
                              database=postgres_box.database, tls="disabled")
    with postgres_db.connect(ep) as conn:
        import psycopg

        _fails_within(small_bounds.postgres_call(),
                      lambda: conn.execute("SELECT pg_sleep(60)"), psycopg.errors.QueryCanceled)


def test_a_mysql_host_that_accepts_and_never_greets_fails_within_the_connect_bound(
    monkeypatch, silent
):
    """The login is bounded by db_connect, not by the statements' longer db_read."""
    bounds = timeouts.Bounds(db_connect=1, db_read=60, db_write=60)
    monkeypatch.setattr(timeouts, "BOUNDS", bounds)
    ep = mysql_db.Endpoint(host="127.0.0.1", port=silent.port, user="u", password="p",
                           tls="disabled")
    _fails_within(bounds.db_connect, lambda: mysql_db.connect(ep), DatabaseError)


def test_a_mysql_statement_ends_at_its_read_timeout(small_bounds, mysql_box):
    ep = mysql_db.Endpoint(host=mysql_box.host, port=mysql_box.port, user=mysql_box.admin_user,
                           password=mysql_box.admin_password, tls="disabled")
    import pymysql

    conn = mysql_db.connect(ep)
    try:
        _fails_within(small_bounds.mysql_call(),
                      lambda: conn.cursor().execute("SELECT SLEEP(60)"),
                      pymysql.err.OperationalError)
    finally:
        conn.close()


def test_aws_calls_to_a_silent_endpoint_fail_within_their_bound(small_bounds, silent,
                                                                 monkeypatch):
    import boto3
    from botocore.exceptions import BotoCoreError

    monkeypatch.setenv("AWS_ENDPOINT_URL", silent.url)
    client = aws.fenced_client(boto3.Session(region_name="eu-west-1"), "secretsmanager")
    _fails_within(small_bounds.aws_call(),
                  lambda: client.get_secret_value(SecretId="x"), BotoCoreError)
    assert silent.accepted == small_bounds.aws_attempts


def test_kubernetes_calls_to_a_silent_api_fail_within_their_bound(small_bounds, silent):
    configuration = kubernetes.client.Configuration()
    configuration.host = silent.url
    configuration.retries = small_bounds.kube_attempts - 1
    kube = Kube(kubernetes.client.ApiClient(configuration))
    _fails_within(small_bounds.kube_call(), lambda: kube.external_secret("apps", "x"),
                  KubeError)
    _fails_within(small_bounds.kube_call(),
                  lambda: kube.force_sync("apps", "x", 1), KubeError)


def test_slack_calls_to_a_silent_api_fail_within_their_bound(small_bounds, silent):
    from bot.slack import SLACK_ERRORS, web_client

    client = web_client("xoxb-test", silent.url + "/api/")
    _fails_within(small_bounds.slack_call(),
                  lambda: client.chat_postMessage(channel="C1", text="notice"), *SLACK_ERRORS)


# -- a step, not just a client -------------------------------------------------------------


def test_a_step_whose_database_hangs_fails_within_the_bound(small_bounds, silent, world: Rig):
    secret = world.current()
    secret.pop("_version", None)
    world.sm().put_secret_value(SecretId=world.secret_id(), SecretString=json.dumps(
        {**secret, "host": "127.0.0.1", "port": silent.port}))
    engine = build_engine(Settings.load(), clock=world.clock)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    started = time.monotonic()
    row = engine.advance(rotation.id)
    elapsed = time.monotonic() - started
    assert row.current is not None and row.current.name == "preflight"
    assert row.current.status == "failed" and "cannot connect" in (row.current.error or "")
    assert elapsed < small_bounds.mysql_call() + LOADED


def test_a_step_whose_aws_endpoint_hangs_fails_within_the_bound(small_bounds, silent, world,
                                                                 monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent.url)
    engine = build_engine(Settings.load(), clock=world.clock)
    rotation = engine.start("mysql", world.app, "staging", "alice")
    started = time.monotonic()
    row = engine.advance(rotation.id)
    elapsed = time.monotonic() - started
    assert row.current is not None and row.current.status == "failed"
    assert "Timeout" in (row.current.error or ""), row.current.error
    assert elapsed < small_bounds.aws_call() + LOADED
