"""`rotor state copy --to postgresql://…`: a SQLite state, its audit history and an unfinished
rotation, moved to a fresh PostgreSQL database, where the rotation finishes."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from bot.cli import main
from rotation.engine import Engine
from rotation.store import Store
from tests.test_engine import CATALOGUE, Clock, ScriptedKind, done, gated

YAML = """
environments:
  staging: {aws_region: eu-west-1}
apps:
  signon: {engine: mysql}
"""


def _copy(tmp_path: Path, source: Path, to: str) -> tuple[int, str]:
    config = tmp_path / "rotor.yml"
    config.write_text(YAML)
    result = CliRunner().invoke(main, ["--config", str(config), "--state", str(source),
                                       "state", "copy", "--to", to])
    return result.exit_code, result.output


def test_a_rotation_started_on_sqlite_finishes_on_postgres(tmp_path, postgres_state):
    clock = Clock()
    kind = ScriptedKind({"a": done, "drop": gated, "c": done})
    sqlite = Store(tmp_path / "state.db", clock=clock)
    engine = Engine(sqlite, CATALOGUE, {"mysql": kind}, clients=None, clock=clock)
    finished = engine.start("mysql", "whitehall", "staging", "U1")
    engine.advance(finished.id)
    engine.approve(finished.id, "drop", "U2")
    engine.advance(finished.id)
    rotation = engine.start("mysql", "signon", "staging", "U1")
    assert engine.advance(rotation.id).phase == "needs-approval"
    history = sqlite.audit_rows()
    sqlite.close()

    code, output = _copy(tmp_path, tmp_path / "state.db", postgres_state)
    assert code == 0, output
    assert f"{len(history)} audit" in output and "2 rotations" in output

    pg = Store(postgres_state, clock=clock)
    assert type(pg).__name__ == "PostgresStore"
    assert pg.audit_rows() == history  # ids, times and words unchanged
    moved = Engine(pg, CATALOGUE, {"mysql": kind}, clients=None, clock=clock)
    moved.approve(rotation.id, "drop", "U2")
    final = moved.advance(rotation.id)
    assert final.status == "done" and final.step("drop").decided_by == "U2"
    assert kind.calls[-4:] == ["a", "drop", "drop", "c"]  # a and drop on SQLite, the rest here
    newer = pg.audit_rows(after=history[-1].id)
    assert newer and all(r.rotation_id == rotation.id for r in newer)
    # New rotations get ids above the copied ones.
    assert moved.start("mysql", "whitehall", "staging", "U1").id > rotation.id
    pg.close()


def test_copy_refuses_a_store_that_is_not_empty_and_changes_nothing(tmp_path, postgres_state):
    clock = Clock()
    source = Store(tmp_path / "state.db", clock=clock)
    source.create_rotation("mysql", "signon", "staging", "U1", {}, [("a", "A", False)])
    source.close()
    assert _copy(tmp_path, tmp_path / "state.db", postgres_state)[0] == 0
    code, output = _copy(tmp_path, tmp_path / "state.db", postgres_state)
    assert code == 1 and "is not empty" in output and output.count("\n") == 1
    pg = Store(postgres_state, clock=clock)
    assert len(pg.recent()) == 1 and len(pg.audit_rows()) == 1
    pg.close()
