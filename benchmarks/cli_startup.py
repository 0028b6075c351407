"""Start-up time of the `rotor` command: `rotor --help` and `rotor status`.

Each command runs RUNS times as a fresh process (the installed console script, as a person
types it), against the repository's rotor.yml and a state DB with a few finished rotations.
Prints the median wall time, the median CPU time (user + system, which a busy machine
inflates less), and the same for a bare `python -c pass`, the floor no command can beat.
The target is 0.15 s median for both commands.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("ROTOR_BENCH_RUNS", "15"))
TARGET = 0.15


def rotor_command() -> list[str]:
    script = Path(sys.executable).with_name("rotor")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bot.cli"]


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) over RUNS fresh processes."""
    walls, cpus = [], []
    for _ in range(RUNS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ROTOR_CONFIG": str(ROOT / "rotor.yml"),
               "ROTOR_STATE": str(Path(tmp) / "rotor.db"), "PYTHONPATH": str(ROOT)}
        _seed(Path(tmp) / "rotor.db")
        rotor = rotor_command()
        rows = [("python -c pass", [sys.executable, "-c", "pass"]),
                ("rotor --help", [*rotor, "--help"]), ("rotor status", [*rotor, "status"])]
        print(f"CLI start-up, median of {RUNS} runs (target {TARGET:.2f} s; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        floor = None
        for label, command in rows:
            wall, cpu = measure(command, env)
            floor = wall if floor is None else floor
            over = "" if label.startswith("python") else \
                f"  ({wall - floor:+.3f} s over the interpreter)"
            print(f"  {label:<16} wall {wall:.3f} s  cpu {cpu:.3f} s{over}")


def _seed(path: Path) -> None:
    """A state DB with three finished rotations, so `status` has something to print."""
    sys.path.insert(0, str(ROOT))
    from rotation.store import Store

    store = Store(str(path), clock=time.time)
    for n in range(3):
        rotation_id = store.create_rotation("mysql", f"app{n}", "staging", "bench", {},
                                            [("preflight", "Preflight", False)])
        with store.transaction():
            store.update_rotation(rotation_id, status="done", finished_at=time.time())


if __name__ == "__main__":
    main()
