"""A fleet's start survives its starter dying part way: `fleet.resume_starts` starts the apps
whose rotation does not exist yet, once and only once, and leaves a live starter alone.

On the engine alone (scripted kind, injected clock, real SQLite store)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from rotation import fleet as fleets
from rotation.engine import Engine
from rotation.policy import Policy
from tests.test_engine import CATALOGUE, clock, done, make  # noqa: F401

ALICE = "U0ALICE"
PLAN = [{"app": "signon", "kind": "mysql"}, {"app": "whitehall", "kind": "mysql"}]


class Died(BaseException):
    """The starter's process ended here (a SIGKILL, a redeploy)."""


def _dead_process() -> str:
    """The identity of a process that has exited, as a crashed starter's lock names it."""
    return subprocess.run(
        [sys.executable, "-c", "from rotation.store import process_identity; "
         "print(process_identity())"], capture_output=True, text=True, check=True).stdout.strip()


def _starter_that_dies_at(engine: Engine, app: str, monkeypatch: Any) -> None:
    real = engine.start

    def start(kind: str, target: str, *args: Any, **kwargs: Any) -> Any:
        if target == app:
            raise Died()
        return real(kind, target, *args, **kwargs)

    monkeypatch.setattr(engine, "start", start)


def test_a_fleet_whose_starter_died_part_way_is_started_by_the_next_resume(
    tmp_path, clock, monkeypatch  # noqa: F811
):
    starter, _ = make(tmp_path, clock, {"a": done})
    starter.worker_id = _dead_process()
    fleet_id = starter.store.create_fleet("staging", ALICE, {}, PLAN)
    _starter_that_dies_at(starter, "whitehall", monkeypatch)
    with pytest.raises(Died):
        fleets.confirm(starter, Policy(CATALOGUE, lambda group: ()), fleet_id, ALICE)
    fleet = starter.store.fleet(fleet_id)
    assert fleet.status == fleets.STARTING
    assert [r.target for r in starter.store.fleet_rotations(fleet_id)] == ["signon"]

    survivor, _ = make(tmp_path, clock, {"a": done})
    assert fleets.resume_starts(survivor) == [fleet_id]
    fleet = survivor.store.fleet(fleet_id)
    members = survivor.store.fleet_rotations(fleet_id)
    assert fleet.status == fleets.STARTED
    assert sorted(r.target for r in members) == ["signon", "whitehall"]  # signon once
    assert {p["app"]: p["rotation"] for p in fleet.plan} == {r.target: r.id for r in members}
    assert [e.event for e in survivor.store.audit_rows(None)
            if e.event.startswith("fleet-")][-1] == "fleet-started"
    assert fleets.resume_starts(survivor) == []  # nothing left to start
    assert len(survivor.store.fleet_rotations(fleet_id)) == 2


def test_a_live_starters_fleet_is_left_to_it_until_its_lock_runs_out(
    tmp_path, clock  # noqa: F811
):
    starter, _ = make(tmp_path, clock, {"a": done})
    fleet_id = starter.store.create_fleet("staging", ALICE, {}, PLAN)
    assert starter.store.move_fleet(fleet_id, fleets.PLANNED, fleets.STARTING, ALICE,
                                    confirmed=True)
    assert starter.store.try_lock(f"fleet-start:{fleet_id}", starter.worker_id,
                                  clock() + fleets.START_LOCK_SECONDS)
    other, _ = make(tmp_path, clock, {"a": done})
    assert fleets.resume_starts(other) == []  # the starter is alive and at it
    assert starter.store.fleet_rotations(fleet_id) == []

    clock.advance(fleets.START_LOCK_SECONDS + 1)  # alive, but stuck past its lock
    assert fleets.resume_starts(other) == [fleet_id]
    assert sorted(r.target for r in other.store.fleet_rotations(fleet_id)) == [
        "signon", "whitehall"]


def test_an_app_started_by_someone_else_meanwhile_is_skipped_with_the_reason(
    tmp_path, clock  # noqa: F811
):
    engine, _ = make(tmp_path, clock, {"a": done})
    fleet_id = engine.store.create_fleet("staging", ALICE, {}, PLAN)
    loner = engine.start("mysql", "whitehall", "staging", "U0BOB")
    fleet = fleets.confirm(engine, Policy(CATALOGUE, lambda group: ()), fleet_id, ALICE)
    assert fleet.status == fleets.STARTED
    lines = {p["app"]: p for p in fleet.plan}
    assert "rotation" in lines["signon"] and "rotation" not in lines["whitehall"]
    assert lines["whitehall"]["skip"] == (f"whitehall in staging already has an active rotation "
                                          f"(#{loner.id}, started by U0BOB)")


def test_an_app_gone_from_the_catalogue_since_the_plan_is_skipped_and_the_fleet_starts(
    tmp_path, clock  # noqa: F811
):
    """A resume after a redeploy whose catalogue no longer has an app: the others start and
    the fleet is started, instead of staying "starting" and failing every minute."""
    engine, _ = make(tmp_path, clock, {"a": done})
    plan = [*PLAN, {"app": "retired-app", "kind": "mysql"}]
    fleet_id = engine.store.create_fleet("staging", ALICE, {}, plan)
    assert engine.store.move_fleet(fleet_id, fleets.PLANNED, fleets.STARTING, ALICE,
                                   confirmed=True)
    assert fleets.resume_starts(engine) == [fleet_id]
    fleet = engine.store.fleet(fleet_id)
    lines = {p["app"]: p for p in fleet.plan}
    assert fleet.status == fleets.STARTED
    assert "rotation" in lines["signon"] and "rotation" in lines["whitehall"]
    assert "retired-app" in lines["retired-app"]["skip"] and "rotation" not in lines["retired-app"]
