"""One Rotor worker in a process of its own, SIGKILLed by the kernel at its Nth side effect:
the fault suite's real kill (tests/fault_machine.py runs it).

    python -m tests.fault_process ROTATION_ID AT NOW REPORT

It advances the rotation with the settings in its environment (the fault world's), on a
clock that starts at NOW (the world's clock), with a referee judging each of its side effects
as the suite's does. When the AT-th side effect is about to happen it sends itself SIGKILL:
no `finally`, no lease release, no flush. Whatever it judged or logged before is appended,
a JSON line at a time, to REPORT, for the suite to read: {"violation": ...} and {"log": ...}.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO

from bot.settings import Settings
from bot.wiring import kinds
from rotation.clients import Clients
from rotation.engine import Engine
from rotation.store import Store
from tests.faults import Notices, Referee, watching
from tests.rig import Clock


class _Report(logging.Handler):
    """Every log record, unredacted, a line at a time (a leak would reach a log file so)."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        write(self.out, {"log": record.getMessage()})


def write(out: TextIO, line: dict[str, Any]) -> None:
    out.write(json.dumps(line) + "\n")
    out.flush()


def main(argv: list[str]) -> int:
    rotation_id, at, now, report = int(argv[0]), int(argv[1]), float(argv[2]), Path(argv[3])
    with report.open("a") as out:
        for name in ("rotor", "rotation", "bot", "handlers"):
            logger = logging.getLogger(name)
            logger.addHandler(_Report(out))
            logger.setLevel(logging.DEBUG)
        clock = Clock(start=now)
        settings = Settings.load()
        store = Store(settings.state_path, clock=clock)
        engine = Engine(store, settings.catalogue, kinds(),
                        Clients(settings.catalogue, kubeconfig=settings.kubeconfig),
                        second_line=Notices(), clock=clock)
        referee = Referee(settings.state_path, clock)
        referee.violation = lambda name, detail: write(  # type: ignore[method-assign]
            out, {"violation": f"{name}: {detail} (in a worker process)"})
        referee.kill_at[engine.worker_id] = at
        referee.workers[engine.worker_id] = SimpleNamespace(  # type: ignore[assignment]
            kill=lambda: os.kill(os.getpid(), signal.SIGKILL))
        with watching(referee):
            row = engine.advance(rotation_id)
        write(out, {"finished": f"{row.status}/{row.phase}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
