"""Randomized, model-based fault injection over real rotations (tests/fault_machine.py).

CI runs a few examples of each kind from a fixed seed, and a few from a random seed printed
at the start (replay with ROTOR_FAULT_SEED=<seed>). `make soak` runs the same machine for as
long as it is asked to.
"""

from __future__ import annotations

import os
import random

import pytest

from tests import fault_machine

FIXED_SEED = 20261129
EXAMPLES = int(os.environ.get("ROTOR_FAULT_EXAMPLES", "1"))


def _random_seed() -> int:
    chosen = os.environ.get("ROTOR_FAULT_SEED")
    return int(chosen) if chosen else random.SystemRandom().randrange(2**32)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", fault_machine.KINDS)
def test_faults_from_the_fixed_seed_break_no_safety_rule(kind):
    fault_machine.run(kind, FIXED_SEED, EXAMPLES)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", fault_machine.KINDS)
def test_faults_from_a_random_seed_break_no_safety_rule(kind, capsys):
    chosen = _random_seed()
    with capsys.disabled():
        print(f"\n{kind}: fault seed {chosen} (replay: ROTOR_FAULT_SEED={chosen})")
    fault_machine.run(kind, chosen, EXAMPLES)
