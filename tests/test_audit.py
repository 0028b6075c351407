"""`rotor audit`: export with actors (JSON lines, CSV, one rotation, since a date); the hash
chain on both state backends; `--verify` names the first altered or removed row."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from contextlib import contextmanager

import psycopg
from click.testing import CliRunner

from bot.cli import main
from handlers import messages
from rotation import audit_chain
from rotation.store import Store

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time() - 10 * DAY

    def __call__(self) -> float:
        return self.now


def seed(url: str) -> list[int]:
    """Two rotations with a few rows each, ten days and one day ago."""
    clock = Clock()
    store = Store(url, clock=clock)
    try:
        first = store.create_rotation("mysql", "signon", "staging", "U0ALICE", {},
                                      [("preflight", "Preflight", False)])
        store.audit(first, "step", "rotor", step="preflight", from_status="pending",
                    to_status="done", detail="user signon_1")
        store.audit(first, "approved", "U0BOB", step="drop", detail="approved")
        clock.now += 9 * DAY
        second = store.create_rotation("postgres", "publisher", "production", "U0CAROL", {},
                                       [("preflight", "Preflight", False)])
        store.audit(second, "cancelled", "U0CAROL", detail="nothing to undo")
    finally:
        store.close()
    return [first, second]


def rotor(tmp_path, url: str, *args: str):
    config = tmp_path / "rotor.yml"
    config.write_text("environments: {staging: {aws_region: eu-west-1}}\n")
    return CliRunner().invoke(main, ["--config", str(config), *args], env={"ROTOR_STATE": url})


@contextmanager
def tampering(url: str):
    """A connection that may change audit rows (the append-only triggers off)."""
    if url.startswith("postgresql"):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
            yield conn
    else:
        conn = sqlite3.connect(url, isolation_level=None)
        try:
            conn.execute("DROP TRIGGER audit_append_only_update")
            conn.execute("DROP TRIGGER audit_append_only_delete")
            yield conn
        finally:
            conn.close()


def test_export_with_actors_as_json_lines_and_csv(tmp_path, state_url) -> None:
    first, second = seed(state_url)
    out = rotor(tmp_path, state_url, "audit")
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [(r["rotation_id"], r["event"], r["actor"]) for r in rows] == [
        (first, "started", "U0ALICE"), (first, "step", "rotor"), (first, "approved", "U0BOB"),
        (second, "started", "U0CAROL"), (second, "cancelled", "U0CAROL")]
    assert rows[2]["kind"] == "mysql" and rows[2]["target"] == "signon"
    assert rows[2]["time"].endswith("+00:00") and len(rows[2]["hash"]) == 64

    one = rotor(tmp_path, state_url, "audit", str(second), "--format", "csv")
    table = list(csv.DictReader(io.StringIO(one.output)))
    assert [(r["event"], r["actor"], r["env"]) for r in table] == [
        ("started", "U0CAROL", "production"), ("cancelled", "U0CAROL", "production")]

    recent = rotor(tmp_path, state_url, "audit", "--since",
                   time.strftime("%Y-%m-%d", time.gmtime(time.time() - 3 * DAY)))
    assert [json.loads(line)["rotation_id"] for line in recent.output.splitlines()] == [
        second, second]

    bad = rotor(tmp_path, state_url, "audit", "--since", "last tuesday")
    assert bad.exit_code == 2 and "is not a date" in bad.output
    unknown = rotor(tmp_path, state_url, "audit", "999")
    assert unknown.exit_code == 1 and "999" in unknown.output


def test_verify_finds_an_altered_row(tmp_path, state_url) -> None:
    seed(state_url)
    intact = rotor(tmp_path, state_url, "audit", "--verify")
    assert intact.exit_code == 0 and "audit chain intact: 5 rows, head #" in intact.output
    with tampering(state_url) as conn:
        conn.execute("UPDATE audit SET actor = 'U0MALLORY' WHERE event = 'approved'")
        altered = conn.execute("SELECT id FROM audit WHERE event = 'approved'").fetchone()[0]
    out = rotor(tmp_path, state_url, "audit", "--verify")
    assert out.exit_code == 1
    assert f"audit row #{altered} does not follow the chain: it was altered" in out.output


def test_verify_finds_a_removed_row(tmp_path, state_url) -> None:
    seed(state_url)
    with tampering(state_url) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM audit ORDER BY id").fetchall()]
        conn.execute("DELETE FROM audit WHERE id = " + str(ids[1]))
    out = rotor(tmp_path, state_url, "audit", "--verify")
    assert out.exit_code == 1
    assert (f"audit row #{ids[2]} does not follow the chain: it was altered, or a row before "
            f"it was removed (rows #{ids[1]}..#{ids[1]} are missing)") in out.output


def test_a_rewritten_chain_no_longer_matches_the_head_slack_was_given(tmp_path) -> None:
    """Rewriting a row and every hash after it passes --verify, but not the anchor."""
    url = str(tmp_path / "state.db")
    seed(url)
    store = Store(url, clock=time.time)
    rows = store.audit_rows()
    store.close()
    posted = messages.chain_head(rows[-1])
    assert posted == f"\nAudit chain head: #{rows[-1].id} `{rows[-1].hash[:16]}`"
    with tampering(url) as conn:
        previous = ""
        for row in rows:
            actor = "U0MALLORY" if row.event == "approved" else row.actor
            forged = audit_chain.link(previous, {**row.__dict__, "actor": actor})
            conn.execute("UPDATE audit SET actor = ?, hash = ? WHERE id = ?",
                         (actor, forged, row.id))
            previous = forged
    assert rotor(tmp_path, url, "audit", "--verify").exit_code == 0
    store = Store(url, clock=time.time)
    assert messages.chain_head(store.audit_rows()[-1]) != posted
    store.close()
