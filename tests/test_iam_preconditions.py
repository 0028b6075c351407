"""Kind `iam-key` when the world changes under a waiting gate: deactivate and delete re-read
which secrets hold which key, right before acting. moto in-process, as tests/test_iam.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from rotation import iam
from rotation.engine import Engine
from rotation.store import Store
from tests.test_iam import HOUR, SECRET, World, _to_grace, at


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with mock_aws():
        yield World(tmp_path)


def _to_deactivate(world: World) -> tuple[int, dict[str, str], str]:
    old = world.seed("staging")
    rid = world.start("staging")
    row = world.advance(rid)
    world.engine.approve(rid, row.current.name, "U0ALICE")  # the manual place: done
    row = world.advance(rid)
    new_id = row.data["new_key_id"]
    world.use("staging", new_id, world.clock())
    row = world.advance(rid, 4 * HOUR + 1)
    assert at(row) == ("deactivate", "needs-approval")
    return rid, old, new_id


def test_deactivate_rereads_the_secrets_after_the_approval(world):
    """Scenario: while deactivate waits, a person puts the old key back in the secret."""
    rid, old, new_id = _to_deactivate(world)
    shown = world.store.rotation(rid).current.gate_summary
    # A person rolls the secret back by hand: AWSCURRENT to the version with the old key.
    sm = world.sm("staging")
    stages = sm.describe_secret(SecretId=SECRET)["VersionIdsToStages"]
    current = next(v for v, s in stages.items() if "AWSCURRENT" in s)
    previous = next(v for v, s in stages.items() if "AWSPREVIOUS" in s)
    sm.update_secret_version_stage(SecretId=SECRET, VersionStage="AWSCURRENT",
                                   MoveToVersionId=previous, RemoveFromVersionId=current)
    assert world.current("staging")["access_key_id"] == old["AccessKeyId"]
    row = world.approve(rid)
    assert at(row) == ("deactivate", "failed")
    assert world.keys("staging")[old["AccessKeyId"]] == "Active"  # never deactivated
    assert f"AWSCURRENT of {SECRET} holds it" in row.current.error
    assert row.current.decision is None  # a retry needs a new approval
    assert "every catalogued secret's AWSCURRENT holds it" in shown  # what was true then


def test_an_uncatalogued_secret_holding_the_old_key_stops_the_deletion(world):
    """The scan is re-run before acting: a secret made since that holds the old key."""
    rid, old, new_id = _to_deactivate(world)
    row = world.approve(rid)
    assert at(row) == ("grace", "waiting")
    row = world.advance(rid, 7 * 86400 + 1)
    assert at(row) == ("delete-old-key", "needs-approval")
    world.sm("staging").create_secret(
        Name="someone/else", SecretString=json.dumps({"key": old["AccessKeyId"]}))
    row = world.approve(rid)
    assert at(row) == ("delete-old-key", "failed")
    assert old["AccessKeyId"] in world.keys("staging")
    assert "someone/else" in row.current.error


def test_a_reactivate_landing_while_the_grace_period_is_rechecked_is_not_lost(world, tmp_path):
    """Scenario: a request racing a re-check. Another bot process records the click after the
    grace step looked for requests and before it writes back its state."""
    rid, old, _ = _to_grace(world)
    other = Engine(Store(tmp_path / "state.db", clock=world.clock), world.catalogue,
                   {iam.KIND.name: iam.KIND}, world.clients, clock=world.clock)
    write_back = world.engine._transition
    clicked: list[str] = []

    def click_then_write_back(ctx: Any, to_status: str, **values: Any) -> None:
        if ctx.step.name == "grace" and to_status == "waiting" and not clicked:
            other.request(rid, "reactivate", "U0CAROL")
            clicked.append("U0CAROL")
        write_back(ctx, to_status, **values)

    world.engine._transition = click_then_write_back  # type: ignore[method-assign]
    row = world.advance(rid, HOUR)  # the grace period's periodic re-check is due
    assert clicked
    assert world.keys("staging")[old["AccessKeyId"]] == "Active"
    assert at(row) == ("grace", "needs-approval")
    assert "reactivated by U0CAROL" in row.current.gate_summary
