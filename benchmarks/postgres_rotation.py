"""Wall time of a full PostgreSQL rotation: approvals granted, an immediate rollout.

Real PostgreSQL, moto's server, the fake Kubernetes API; the engine in-process, driven the
way `rotor rotate --yes` drives it. The app's user owns a small schema, so the rotation
converts it to an owner role (one approval) before creating, promoting, rolling out and
retiring (a second approval). Also times the same rotation as a `rotor` subprocess, and a
compromised-mode rotation of production together with the staging restored from it.
Target: under 2 s. Prints figures; asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.settings import Settings
from bot.wiring import build_engine
from tests.rig import AWS_ENV, Rig, rig, timed_rotation, timed_rotor

RUNS = 5
SCHEMA = """
    CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL);
    CREATE TABLE invoices (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                           user_id bigint REFERENCES users (id), amount numeric);
    CREATE VIEW user_emails AS SELECT email FROM users;
    CREATE FUNCTION normalise(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT lower($1) $$
"""


class _Told:
    def notify(self, *args: Any) -> str:
        return "#2ndline"


def _seed(world: Rig) -> None:
    box = world.box
    with box.connect(box.app_user, box.app_password) as conn:
        for statement in SCHEMA.split(";"):
            conn.execute(statement)
    os.environ.update(
        {k: v for k, v in world.env().items() if k.startswith(("AWS_", "ROTOR_", "KUBECONFIG"))}
    )


def _drive(world: Rig, env: str, params: dict[str, Any]) -> tuple[float, int]:
    engine = build_engine(Settings.load(), second_line=_Told(), clock=world.clock)
    elapsed, row = timed_rotation(engine, "postgres", world.app, env, params)
    return elapsed, len(row.steps)


def one_rotation() -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp, rig("postgres", Path(tmp)) as world:
        _seed(world)
        return _drive(world, "staging", {})


def compromised_rotation() -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp, rig("postgres", Path(tmp), restored=True) as world:
        _seed(world)
        return _drive(world, "production", {"compromised": True})


def subprocess_rotation() -> float:
    with tempfile.TemporaryDirectory() as tmp, rig("postgres", Path(tmp)) as world:
        _seed(world)
        return timed_rotor(world, "rotate", world.app, "staging", "--yes")


def main() -> None:
    os.environ.update(AWS_ENV)
    times, steps = [], 0
    for _ in range(RUNS):
        elapsed, steps = one_rotation()
        times.append(elapsed)
    print(
        f"postgres rotation, in-process ({steps} steps, {RUNS} runs): "
        f"median {statistics.median(times):.3f} s, max {max(times):.3f} s (target < 2 s)"
    )
    print(
        f"postgres rotation, `rotor rotate --yes` subprocess incl. start-up: "
        f"{subprocess_rotation():.3f} s"
    )
    elapsed, steps = compromised_rotation()
    print(
        f"postgres compromised rotation of production and its restored staging, in-process "
        f"({steps} steps): {elapsed:.3f} s"
    )


if __name__ == "__main__":
    main()
