"""Wall time of a full MySQL rotation: approvals granted, an immediate rollout.

Real MariaDB, moto's server, the fake Kubernetes API; the engine in-process, driven the way
`rotor rotate --yes` drives it. Also times the same rotation as a `rotor` subprocess.
Target: under 2 s. Prints figures; asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.settings import Settings
from bot.wiring import build_engine
from tests.rig import AWS_ENV, rig, timed_rotation, timed_rotor

RUNS = 5


def one_rotation() -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp, rig("mysql", Path(tmp)) as world:
        os.environ.update({k: v for k, v in world.env().items()
                           if k.startswith(("AWS_", "ROTOR_", "KUBECONFIG"))})
        elapsed, row = timed_rotation(build_engine(Settings.load()), "mysql", world.app,
                                      "staging")
        return elapsed, len(row.steps)


def subprocess_rotation() -> float:
    with tempfile.TemporaryDirectory() as tmp, rig("mysql", Path(tmp)) as world:
        return timed_rotor(world, "rotate", world.app, "staging", "--yes")


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
