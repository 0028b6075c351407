"""Soak: the fault-injection machine (tests/fault_machine.py) for a given time and seed.

    python benchmarks/soak.py --minutes 20 --seed 1234 [--kinds mysql,postgres,iam-key]
                              [--state sqlite|postgres]

    python benchmarks/soak.py --replay mysql:1234   # one round a test printed, shrunk

Runs examples of each kind in turn, each round from a seed drawn from `--seed` (printed, so
a round replays alone with `--seed <round seed> --rounds 1 --kinds <kind>`), until the time
is up. `--state postgres` keeps the workers' shared state in PostgreSQL (a uniquely named
database on the local server per example, dropped after) instead of a SQLite file. Prints the
examples run, the faults injected by type, and the invariant violations,
which must be 0 (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import fault_machine
from tests.faults import STATES
from tests.rig import AWS_ENV


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kinds", default=",".join(fault_machine.KINDS))
    parser.add_argument("--examples", type=int, default=2, help="examples per round")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many (0: time)")
    parser.add_argument("--replay", metavar="KIND:SEED",
                        help="run the one round a test printed, and shrink what fails")
    parser.add_argument("--state", choices=STATES, default="sqlite",
                        help="where the workers keep Rotor's state (default: sqlite)")
    parser.add_argument("--no-manual-moves", dest="manual_moves", action="store_false",
                        help="leave out a person moving AWSCURRENT back to AWSPREVIOUS by hand")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack
    base = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    seeds = random.Random(base)
    kinds = args.kinds.split(",")
    os.environ.update(AWS_ENV)
    print(f"soak: seed {base}, {args.minutes} min, kinds {', '.join(kinds)}, state in "
          f"{args.state}", flush=True)
    deadline = time.monotonic() + args.minutes * 60
    started, rounds, failed = time.monotonic(), 0, 0
    if args.replay:
        kind, _, replay_seed = args.replay.partition(":")
        kinds, args.rounds, deadline = [kind], 1, float("inf")
    while time.monotonic() < deadline and (not args.rounds or rounds < args.rounds):
        kind = kinds[rounds % len(kinds)]
        round_seed = int(replay_seed) if args.replay else seeds.randrange(2**32)
        rounds += 1
        print(f"round {rounds}: {kind} seed {round_seed} ...", flush=True)
        try:
            fault_machine.run(kind, round_seed, args.examples, manual_moves=args.manual_moves,
                              state=args.state)
            outcome = "ok"
        except Exception as exc:  # a violated invariant, shrunk; keep soaking
            failed += 1
            outcome = f"FAILED: {type(exc).__name__}"
            traceback.print_exc()
        print(f"round {rounds}: {kind} seed {round_seed}: {outcome} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    tally = fault_machine.TALLY
    print(f"\nexamples run: {tally['examples']} in {rounds} rounds, "
          f"{time.monotonic() - started:.0f} s; actions: {tally['actions']}")
    ended = sorted((k, v) for k, v in tally.items() if k.startswith("ended "))
    for key, value in ended:
        print(f"  {key}: {value}")
    print(f"cleanups finished and judged: {tally['cleanups done']}; Slack calls scanned for "
          f"secrets: {tally['slack calls']}")
    for key, value in sorted(tally.items()):
        if key.startswith("rule "):
            print(f"  {key}: {value}")
    survived = tally["worker processes that ran out of side effects before the kill"]
    print(f"worker processes that ran out of side effects before their kill: {survived}")
    print("faults injected by type:")
    for fault, count in sorted(fault_machine.FAULTS.items()):
        print(f"  {fault}: {count}")
    # A failing example is shrunk: the same violation repeats in the smaller examples.
    print(f"invariant violations: {len(set(fault_machine.VIOLATIONS))} distinct, "
          f"{failed} failing rounds")
    for line in sorted(set(fault_machine.VIOLATIONS)):
        print(f"  {line}")
    return 1 if fault_machine.VIOLATIONS or failed else 0


if __name__ == "__main__":
    sys.exit(main())
