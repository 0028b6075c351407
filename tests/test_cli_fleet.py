"""`rotor rotate --all ENV` and `rotor rotate APP1 APP2 … ENV` as a subprocess: a fleet is
planned and shown first, confirmed once (four-eyes in production: `rotor approve-fleet`),
and `rotor status` shows its line. A second app, `ghost`, is in the catalogue without a
secret, so its preflight fails: the fleet says so, and the real app still finishes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import Rig, operator_env, rig

GHOST = "ghost"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Rig]:
    with rig("mysql", tmp_path) as r:
        config = json.loads(r.config_path.read_text())
        config["apps"][GHOST] = {"engine": "mysql"}
        r.config_path.write_text(json.dumps(config, indent=2))
        yield r


def rotor(world: Rig, *args: str, actor: str = "alice", timeout: float = 120
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(world.rotor() + list(args), env={**world.env(), **operator_env(actor)},
                          capture_output=True, text=True, timeout=timeout, cwd=world.workdir,
                          stdin=subprocess.DEVNULL)


def _rows(path: Path, query: str) -> list[tuple[object, ...]]:
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
        return list(conn.execute(query))


def test_all_plans_then_rotates_each_app_and_the_fleet_says_who_failed_and_why(world):
    result = rotor(world, "rotate", "--all", "staging", "--yes")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr  # ghost failed
    plan = out[:out.index("started fleet #1")]
    assert f"  {world.app}" in plan and f"  {GHOST}" in plan and "approval before" in plan
    assert "started fleet #1: 2 rotations" in out
    assert f"{world.app:<24} done" in out
    assert f"{GHOST:<24} failed at preflight" in out
    assert "fleet #1 in staging: failed (ghost at preflight:" in out
    assert world.current()["username"] != world.box.app_user  # the real app was rotated
    assert sorted(_rows(world.state_path, "SELECT target, fleet_id FROM rotations")) == sorted([
        (world.app, 1), (GHOST, 1)])
    status = rotor(world, "status")
    assert status.returncode == 0
    assert "fleet #1 in staging: failed (ghost at preflight:" in status.stdout
    assert "2 apps: 1 done, 1 failed (started by " in status.stdout

    # ghost's failed rotation is still active: naming it again is refused, nothing started.
    again = rotor(world, "rotate", world.app, GHOST, "staging", "--yes")
    assert again.returncode == 1
    assert again.stderr.startswith(f"rotor: {GHOST} in staging is already rotating (#1")
    assert again.stderr.count("\n") == 1
    assert _rows(world.state_path, "SELECT COUNT(*) FROM rotations") == [(2,)]
    # With --all, it is skipped and says why.
    skipped = rotor(world, "rotate", "--all", "staging", "--yes")
    assert f"{GHOST:<24} mysql     skipped: already rotating (#1" in skipped.stdout


@pytest.mark.parametrize("args, message", [
    (["rotate", "APP", "nosuchapp", "staging"], "rotor: unknown app 'nosuchapp'"),
    (["rotate", "--all", "moon"], "rotor: unknown environment 'moon'"),
    (["rotate", "APP", GHOST, "moon"], "rotor: unknown environment 'moon'"),
    (["rotate", "--all", "APP", "staging"], "rotor: give either --all ENV or APP... ENV"),
    (["approve-fleet", "9"], "rotor: no fleet #9"),
])
def test_bad_input_is_one_line_and_starts_nothing(world, args, message):
    result = rotor(world, *[a.replace("APP", world.app) for a in args])
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert _rows(world.state_path, "SELECT COUNT(*) FROM rotations") in ([], [(0,)])
    assert world.users() == {world.box.admin_user, world.box.app_user}


def test_a_production_fleet_is_started_by_a_second_person(world):
    first = rotor(world, "rotate", world.app, GHOST, "production", "--yes")
    assert first.returncode == 3, first.stdout + first.stderr
    assert "fleet #1 needs a second person in production: `rotor approve-fleet 1`" in first.stdout
    assert _rows(world.state_path, "SELECT COUNT(*) FROM rotations") == [(0,)]
    assert "fleet #1 in production: waiting (on a second person" in rotor(world, "status").stdout

    refused = rotor(world, "approve-fleet", "1", "--yes", actor="alice")
    assert refused.returncode == 1
    assert "production needs a second person" in refused.stderr
    assert _rows(world.state_path, "SELECT COUNT(*) FROM rotations") == [(0,)]

    started = rotor(world, "approve-fleet", "1", "--yes", actor="bob")
    assert started.returncode == 0, started.stderr
    assert "fleet #1 started: 2 rotations" in started.stdout
    rows = _rows(world.state_path, "SELECT target, initiator, fleet_id FROM rotations")
    assert sorted((t, f) for t, _, f in rows) == sorted([(world.app, 1), (GHOST, 1)])
    assert all("U0ALICE" in str(i) for _, i, _ in rows)  # the starter stays the initiator
    fleet = _rows(world.state_path, "SELECT status, confirmed_by FROM fleets")
    assert fleet[0][0] == "started" and "U0BOB" in str(fleet[0][1])
    twice = rotor(world, "approve-fleet", "1", "--yes", actor="carol")
    assert twice.returncode == 1 and "not waiting for a second person" in twice.stderr
