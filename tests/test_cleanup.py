"""After a cancel: a cleanup (`rotor cleanup APP ENV`, `/rotate APP ENV --cleanup`) is a
rotation of its own that drops the users earlier rotations made and nothing uses, on an
approval bound to exactly those users. Real MariaDB and PostgreSQL, moto's server, fake
Kubernetes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from bot.settings import Settings
from bot.wiring import build_engine
from rotation.engine import Engine
from rotation.errors import NotAllowed
from tests.rig import Rig, drive, point_at, rig
from tests.test_iam import Notices


@pytest.fixture(params=["mysql", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    with rig(request.param, tmp_path) as r:
        point_at(r, monkeypatch)
        yield r


def engine_for(world: Rig, notices: Notices | None = None) -> Engine:
    return build_engine(Settings.load(), second_line=notices, clock=world.clock)


def cancel_after_the_new_user(world: Rig, engine: Engine, env: str = "staging") -> str:
    """Start a rotation, stop once the new user logs in, cancel; return the user left."""
    rid = engine.start(world.engine_name, world.app, env, "alice").id

    def cancel_once_it_logs_in(rotation_id: int) -> None:
        row = engine.store.rotation(rotation_id)
        if row.status == "active" and not row.cancel_requested_by and any(
                s.name == "test-login" and s.status == "done" for s in row.steps):
            engine.cancel(rotation_id, "alice", now=False)

    engine.on_change = cancel_once_it_logs_in
    row = drive(engine, rid)
    engine.on_change = lambda rotation_id: None
    assert row.status == "cancelled", [(s.name, s.status, s.error) for s in row.steps]
    new = row.data["new_username"]
    said = [a.detail for a in engine.store.audit_rows(rid) if a.event == "cancelled"][0]
    assert f"`rotor cleanup {world.app} {env}`" in said
    assert new in world.users()
    return new


def label_the_version_of(world: Rig, user: str, label: str) -> None:
    """A person puts `label` on the (unlabelled) version of the secret that names `user`."""
    sm, secret = world.sm(), world.secret_id()
    for version in sm.list_secret_version_ids(SecretId=secret,
                                              IncludeDeprecated=True)["Versions"]:
        value = json.loads(sm.get_secret_value(SecretId=secret, VersionId=version["VersionId"])[
            "SecretString"])
        if value["username"] == user:
            sm.update_secret_version_stage(SecretId=secret, VersionStage=label,
                                           MoveToVersionId=version["VersionId"])
            return
    raise AssertionError(f"no version names {user}")


def gate(row: Any) -> tuple[str, str]:
    return row.current.name, row.current.status


def test_a_cleanup_drops_the_user_a_cancel_left_and_nothing_else(world):
    engine = engine_for(world)
    old = world.current()["username"]
    new = cancel_after_the_new_user(world, engine)

    rid = engine.start(world.engine_name, world.app, "staging", "alice", {"cleanup": True}).id
    row = drive(engine, rid, approver=None)
    assert [s.name for s in row.steps] == ["find-leftovers", "drop-leftovers"]
    assert f"drop {new}:" in row.steps[0].result
    assert gate(row) == ("drop-leftovers", "needs-approval")
    assert f"drop {new}:" in row.current.gate_summary and old not in row.current.gate_summary
    assert new in world.users()  # nothing is dropped before the approval

    engine.approve(rid, "drop-leftovers", "bob")
    row = drive(engine, rid, approver=None)
    assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
    assert row.steps[-1].result == f"dropped {new}"
    assert new not in world.users() and old in world.users()
    world.login(world.current())


def test_a_user_the_secret_names_is_kept(world):
    """A person staged the leftover's version again: the cleanup keeps the user."""
    engine = engine_for(world)
    new = cancel_after_the_new_user(world, engine)
    label_the_version_of(world, new, "REVIEW")

    rid = engine.start(world.engine_name, world.app, "staging", "alice", {"cleanup": True}).id
    row = drive(engine, rid)
    assert row.status == "done"
    assert row.steps[-1].result.startswith(f"nothing to drop; {new} kept (REVIEW in staging)")
    assert new in world.users()


def make_user(world: Rig, name: str) -> None:
    """A user named as a rotation names them, made outside this test's rotations."""
    if world.engine_name == "mysql":
        with world.box.root().cursor() as cur:
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY 'x-unused-1'", (name,))
    else:
        with world.box.root() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))


def test_facts_that_changed_after_the_approval_ask_again(world):
    """Approved to drop one leftover; another appears before the drop: asked again."""
    engine = engine_for(world)
    new = cancel_after_the_new_user(world, engine)
    rid = engine.start(world.engine_name, world.app, "staging", "alice", {"cleanup": True}).id
    row = drive(engine, rid, approver=None)
    assert gate(row) == ("drop-leftovers", "needs-approval")
    engine.approve(rid, "drop-leftovers", "bob")

    sep = "_" if world.engine_name == "mysql" else "-"
    other = f"{world.app}{sep}user{sep}20200101"
    make_user(world, other)
    row = engine.advance(rid)
    assert gate(row) == ("drop-leftovers", "needs-approval")
    assert "changed since the approval" in row.current.gate_summary
    assert other in row.current.gate_summary
    assert {new, other} <= world.users()  # nothing dropped on the old approval

    engine.approve(rid, "drop-leftovers", "bob")
    row = drive(engine, rid, approver=None)
    assert row.status == "done" and not {new, other} & world.users()


def test_in_production_2nd_line_is_told_and_another_person_approves(world):
    notices = Notices()
    engine = engine_for(world, notices)
    new = cancel_after_the_new_user(world, engine, "production")
    rid = engine.start(world.engine_name, world.app, "production", "alice",
                       {"cleanup": True}).id
    row = drive(engine, rid, approver=None)
    assert gate(row) == ("drop-leftovers", "needs-approval")
    with pytest.raises(NotAllowed, match="second person"):
        engine.approve(rid, "drop-leftovers", "alice")  # the starter
    engine.approve(rid, "drop-leftovers", "bob")
    row = drive(engine, rid, approver=None)
    assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
    assert len(notices.posted) == 1 and new in notices.posted[0]
    assert new not in world.users()


def test_a_cleanup_with_nothing_left_asks_nothing(world):
    engine = engine_for(world)
    rid = engine.start(world.engine_name, world.app, "staging", "alice", {"cleanup": True}).id
    row = drive(engine, rid, approver=None)
    assert row.status == "done"
    assert all(s.decision is None for s in row.steps)
    assert "nothing to clean up" in row.steps[0].result
