"""`rotor` as a subprocess, against moto's server via AWS_ENDPOINT_URL: the break-glass path."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rotation.mysql import KIND
from tests.rig import ContinuityProbe, Rig, operator_env, read_state, rig
from tests.waiting import wait_for

STEPS = [s.name for s in KIND.steps(None, "x", "staging", {})]  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path) -> Iterator[Rig]:
    with rig("mysql", tmp_path) as r:
        yield r


def rotor(
    world: Rig, *args: str, timeout: float = 90, actor: str = "alice"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        world.rotor() + list(args),
        env={**world.env(), **operator_env(actor)},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=world.workdir,
    )


def test_rotate_in_the_foreground_prints_each_step_and_exits_zero(world):
    result = rotor(world, "rotate", world.app, "staging", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    for step in STEPS:
        assert step in result.stdout
    assert "done: 10/10 done" in result.stdout
    new = world.current()
    assert new["username"] != world.box.app_user
    output = result.stdout + result.stderr
    for password in (new["password"], world.box.app_password, world.box.admin_password):
        assert password not in output

    status = rotor(world, "status")
    assert status.returncode == 0 and "done, 10/10 done" in status.stdout


def test_plan_changes_nothing_and_shows_what_preflight_found(world):
    result = rotor(world, "plan", world.app, "staging")
    assert result.returncode == 0, result.stderr
    assert "drop-old-user" in result.stdout and "[destructive, needs approval]" in result.stdout
    assert f"{world.box.app_user}@%" in result.stdout
    assert _count(world.state_path) == 0
    assert world.users() == {world.box.admin_user, world.box.app_user}


@pytest.mark.parametrize(
    "args, message",
    [
        (["rotate", "nosuchapp", "staging"], "rotor: unknown app 'nosuchapp'"),
        (["rotate", "APP", "moon"], "rotor: unknown environment 'moon'"),
        (["retry", "99"], "rotor: no rotation #99"),
        (["cancel", "99"], "rotor: no rotation #99"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(world, args, message):
    args = [a.replace("APP", world.app) for a in args]
    result = rotor(world, *args)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(message) and result.stderr.count("\n") == 1
    assert world.users() == {world.box.admin_user, world.box.app_user}


def test_a_malformed_catalogue_names_the_key(world):
    world.config_path.write_text("environments: {staging: {aws_regio: x}}\n")
    result = rotor(world, "plan", world.app, "staging")
    assert result.returncode == 1
    assert "environments.staging.aws_regio: unknown key (did you mean 'aws_region'?)" \
        in result.stderr
    assert "Traceback" not in result.stderr


def _count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM rotations").fetchone()[0])


def _step_statuses(path: Path) -> dict[str, str]:
    return read_state(path)[0]


def _statuses_while_running(world: Rig, proc: subprocess.Popen[Any]) -> dict[str, str]:
    """The step statuses, as long as `rotor` has not failed."""
    assert proc.poll() in (None, 0), f"rotor exited {proc.returncode} before the test expected"
    return _step_statuses(world.state_path)


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_after_each_step_resumes_cleanly(tmp_path, step):
    """Kill `rotor` the moment `step` is committed; the next `rotor` finishes the job."""
    with rig("mysql", tmp_path) as world, ContinuityProbe(world) as probe:
        proc = subprocess.Popen(
            world.rotor() + ["rotate", world.app, "staging", "--yes"],
            env=world.env(),
            cwd=world.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _statuses_while_running(world, proc),
                 lambda statuses: statuses.get(step) in ("done", "skipped"),
                 what=f"{step} to finish", interval=0.002)  # kill it right after
        proc.kill()
        proc.wait()
        statuses = _step_statuses(world.state_path)
        if not all(s in ("done", "skipped") for s in statuses.values()):
            result = rotor(world, "rotate", world.app, "staging", "--yes")
            assert result.returncode == 0, result.stdout + result.stderr
            assert "resuming rotation #1" in result.stdout
        assert _count(world.state_path) == 1
        new = world.current()["username"]
        assert world.users() == {world.box.admin_user, new}
    assert probe.failures == [] and probe.logins > 0


def _audit(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
        return list(conn.execute("SELECT event, actor, COALESCE(detail, '') FROM audit"))


def test_production_needs_a_second_person_and_2nd_line_told_first(world):
    proc = subprocess.Popen(
        world.rotor() + ["rotate", world.app, "production", "--yes",
                         "--second-line-told", "phoned Sam on the 2nd line rota"],
        env={**world.env(), **operator_env("alice")}, cwd=world.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    wait_for(lambda: _statuses_while_running(world, proc),
             lambda statuses: statuses.get("drop-old-user") == "needs-approval",
             what="drop-old-user to need approval")
    refused = rotor(world, "approve", "1", actor="alice")
    assert refused.returncode == 1
    assert "production needs a second person" in refused.stderr
    approved = rotor(world, "approve", "1", actor="bob")
    assert approved.returncode == 0 and "DROP USER" in approved.stdout
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "needs a second person in production: `rotor approve 1`" in output
    events = _audit(world.state_path)
    notice = [e for e in events if e[0] == "second-line-notified"]
    assert notice and "phoned Sam on the 2nd line rota" in notice[0][2]
    names = [e[0] for e in events]
    assert names.index("approved") < names.index("second-line-notified") < names.index("finished")
    approved_by = "U0BOB via arn:aws:sts::123456789012:assumed-role/govuk-admin/bob"
    assert ("approved", approved_by) == events[names.index("approved")][:2]


def test_production_without_slack_or_a_word_from_the_operator_drops_nothing(world):
    proc = subprocess.Popen(world.rotor() + ["rotate", world.app, "production"],
                            env={**world.env(), **operator_env("alice")}, cwd=world.workdir,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _statuses_while_running(world, proc),
             lambda statuses: statuses.get("drop-old-user") == "needs-approval",
             what="drop-old-user to need approval")
    assert rotor(world, "approve", "1", actor="bob").returncode == 0
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "stopped at drop-old-user: 2nd line must be told" in err
    assert world.box.app_user in world.users()  # the old user is still there


def test_cleanup_drops_a_user_nothing_uses_and_keeps_the_one_in_use(world):
    leftover = f"{world.app}_user_20200101"
    with world.box.root().cursor() as cur:
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY 'x-unused-1'", (leftover,))
    assert rotor(world, "rotate", world.app, "staging", "--yes").returncode == 0
    in_use = world.current()["username"]
    assert {leftover, in_use} <= world.users()

    result = rotor(world, "cleanup", world.app, "staging", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"dropped {leftover}" in result.stdout
    assert f"{in_use} kept (AWSCURRENT in staging" in result.stdout
    assert world.users() == {world.box.admin_user, in_use}
    world.login(world.current())


def test_cleanup_while_a_rotation_is_active_is_refused(world):
    proc = subprocess.Popen(world.rotor() + ["rotate", world.app, "production"],
                            env={**world.env(), **operator_env("alice")}, cwd=world.workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _statuses_while_running(world, proc),
                 lambda statuses: "needs-approval" in statuses.values(),
                 what="a gate to open")
        result = rotor(world, "cleanup", world.app, "production")
        assert result.returncode == 1
        assert result.stderr.startswith("rotor: rotation #1 of ") and \
            f"(rotor rotate {world.app} production)" in result.stderr
        assert result.stderr.count("\n") == 1
    finally:
        proc.kill()
        proc.communicate(timeout=30)
