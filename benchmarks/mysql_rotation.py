"""Wall time of a full MySQL rotation: approvals granted, an immediate rollout.

Real MariaDB, moto's server, the fake Kubernetes API; the engine in-process, driven the way
`rotor rotate --yes` drives it. Also times the same rotation as a `rotor` subprocess.
Target: under 2 s. Prints figures; asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.settings import Settings
from bot.wiring import build_engine
from tests.rig import AWS_ENV, rig

RUNS = 5


def one_rotation(engine_name: str = "mysql") -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp, rig(engine_name, Path(tmp)) as world:
        os.environ.update({k: v for k, v in world.env().items()
                           if k.startswith(("AWS_", "ROTOR_", "KUBECONFIG"))})
        engine = build_engine(Settings.load())
        started = time.perf_counter()
        rotation = engine.start(engine_name, world.app, "staging", "alice")
        wake = __import__("threading").Event()
        while True:
            row = engine.advance(rotation.id)
            step = row.current
            if row.status != "active" or step is None or step.status == "failed":
                break
            if step.status == "needs-approval":
                engine.approve(rotation.id, step.name, "bob")
            elif step.status == "waiting":
                wake.wait(max(0.0, (step.next_check_at or 0) - engine.clock()))
        elapsed = time.perf_counter() - started
        assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
        return elapsed, len(row.steps)


def subprocess_rotation() -> float:
    with tempfile.TemporaryDirectory() as tmp, rig("mysql", Path(tmp)) as world:
        started = time.perf_counter()
        result = subprocess.run(world.rotor() + ["rotate", world.app, "staging", "--yes"],
                                env=world.env(), capture_output=True, text=True, timeout=120)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(result.stdout + result.stderr)
        return elapsed


def main() -> None:
    os.environ.update(AWS_ENV)
    times = []
    for _ in range(RUNS):
        elapsed, steps = one_rotation()
        times.append(elapsed)
    print(f"mysql rotation, in-process ({steps} steps, {RUNS} runs): "
          f"median {statistics.median(times):.3f} s, max {max(times):.3f} s (target < 2 s)")
    print(f"mysql rotation, `rotor rotate --yes` subprocess incl. start-up: "
          f"{subprocess_rotation():.3f} s")


if __name__ == "__main__":
    main()
