"""Fixtures shared by every layer of tests: real database sandboxes, moto, a temp state DB."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import servers


def _unavailable(exc: servers.ServerUnavailable) -> None:
    # Never skip silently: in CI an unreachable server fails the run; locally it fails too,
    # with the command that starts the server.
    pytest.fail(str(exc), pytrace=False)


def _sandbox(make: Callable[[], Any], drop: Callable[[Any], None]) -> Iterator[Any]:
    try:
        box = make()
    except servers.ServerUnavailable as exc:
        _unavailable(exc)
        raise
    try:
        yield box
    finally:
        drop(box)


@pytest.fixture
def mysql_box() -> Iterator[servers.MySQLSandbox]:
    yield from _sandbox(servers.mysql_sandbox, servers.drop_mysql_sandbox)


@pytest.fixture
def postgres_box() -> Iterator[servers.PostgresSandbox]:
    yield from _sandbox(servers.postgres_sandbox, servers.drop_postgres_sandbox)


@pytest.fixture(autouse=True)
def _aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach real AWS: fake credentials and a fixed region for boto3."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    if not os.environ.get("ROTOR_TEST_KEEP_ENDPOINT"):
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def world(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A MySQL rig (tests/rig.py), with this process's Rotor pointed at it."""
    from tests.rig import point_at, rig

    with rig("mysql", tmp_path) as r:
        point_at(r, monkeypatch)
        yield r


@pytest.fixture
def postgres_world(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A PostgreSQL rig (tests/rig.py), with this process's Rotor pointed at it."""
    from tests.rig import point_at, rig

    with rig("postgres", tmp_path) as r:
        point_at(r, monkeypatch)
        yield r


@pytest.fixture(scope="module")
def slack() -> Iterator[Any]:
    """A fake Slack Web API for one test module's `rotor serve` (tests/slackbot.py)."""
    from demo.slack_api import FakeSlack
    from tests.slackbot import GROUPS

    with FakeSlack(groups=dict(GROUPS)) as fake:
        yield fake


@pytest.fixture(scope="module")
def apps() -> Any:
    """Apps that sign requests to the bot as different Slack users."""
    from tests.slackbot import Apps

    return Apps()


@pytest.fixture
def deployments(world: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's ECS, taught to roll deployments out on the rig's clock (tests/rig.py)."""
    from tests.rig import EcsDeployments

    return EcsDeployments(world.clock).install(monkeypatch)


@pytest.fixture
def postgres_state() -> Iterator[str]:
    """The URL of a uniquely named PostgreSQL database for a state store, dropped after."""
    yield from _sandbox(servers.postgres_state_db, servers.drop_postgres_state_db)


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Each state backend in turn: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return str(request.getfixturevalue("postgres_state"))


# -- every Kubernetes call the suite makes, checked against `rotor rbac` (tests/kube_calls.py),
# -- and every AWS call Rotor's clients make, against `rotor iam-policy` (tests/aws_calls.py) --

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_deselected: list[Any] = []
_ran: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    from demo.kube_api import CALL_LOG_ENV
    from tests import aws_calls

    for env, prefix in ((CALL_LOG_ENV, "rotor-kube-calls-"),
                        (aws_calls.LOG_ENV, "rotor-aws-calls-")):
        if not os.environ.get(env) and not hasattr(config, "workerinput"):
            import tempfile

            os.environ[env] = os.path.join(tempfile.mkdtemp(prefix=prefix), "calls.jsonl")
    aws_calls.install()  # every process, xdist's workers included: they share the file


def pytest_deselected(items: list[Any]) -> None:
    _deselected.extend(items)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":  # under xdist the controller hears every worker's reports
        _ran.append(report.nodeid)


def _whole_suite(session: pytest.Session) -> bool:
    """Every test under tests/ ran and passed: only then must every granted kind be used."""
    config = session.config
    args = [os.path.abspath(str(a)) for a in config.args]
    narrowed = any(config.getoption(name, None) for name in ("keyword", "markexpr", "deselect",
                                                             "lf"))
    return (not _deselected and not narrowed and session.testsfailed == 0 and bool(_ran)
            and all(a == TESTS_DIR for a in args))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from demo.kube_api import CALL_LOG_ENV
    from tests import aws_calls, kube_calls

    if hasattr(session.config, "workerinput"):
        return  # an xdist worker ran a share: the controller judges the whole, after them all

    entries = kube_calls.read(os.environ.get(CALL_LOG_ENV, ""))
    problems = [f"refused by `rotor rbac`: {p}" for p in kube_calls.refused(entries)]
    if _whole_suite(session) and entries:
        problems += [f"granted by `rotor rbac` but never used: {p}"
                     for p in kube_calls.unused(entries)]
    report(session, "Kubernetes calls vs the generated RBAC:", problems)

    # -- every AWS call Rotor's clients made, checked against `rotor iam-policy` --
    calls = aws_calls.read(os.environ.get(aws_calls.LOG_ENV, ""))
    problems = [f"refused by `rotor iam-policy`: {p}" for p in aws_calls.refused(calls)]
    if _whole_suite(session) and calls:
        problems += [f"granted by `rotor iam-policy` but never called: {p}"
                     for p in aws_calls.unused(calls)]
    report(session, "AWS calls vs the generated IAM policy:", problems)


def report(session: pytest.Session, title: str, problems: list[str]) -> None:
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("\n".join([title, *problems]), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
