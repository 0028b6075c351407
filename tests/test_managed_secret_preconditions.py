"""Kind `secret`: Roll back acts only on what it just read, the version it returns to must
still exist and log in. moto's server, a real rotation function, real MariaDB."""

from __future__ import annotations

import json

from tests.rig import drive
from tests.test_managed_secret import configured, engine_for, function, service  # noqa: F401


def test_a_roll_back_to_a_version_that_no_longer_logs_in_is_refused(
    configured, function, deployments  # noqa: F811
):
    world = configured
    engine = engine_for(world)
    rotation = engine.start("secret", world.secret_id(), "staging", "alice")
    drive(engine, rotation.id, until="grace")
    after = world.current()
    previous = json.loads(world.sm().get_secret_value(
        SecretId=world.secret_id(), VersionStage="AWSPREVIOUS")["SecretString"])
    # The previous version's user was changed since (a DBA reset its password).
    with world.box.root().cursor() as cur:
        cur.execute("ALTER USER %s@'%%' IDENTIFIED BY 'ChangedByADba123'",
                    (previous["username"],))
    engine.request(rotation.id, "rollback", "bob")
    row = drive(engine, rotation.id)
    step = row.current
    assert step.name == "grace" and step.status == "failed", [
        (s.name, s.status, s.error) for s in row.steps]
    assert "does not log in" in step.error and "not rolling back" in step.error
    assert world.current() == after  # AWSCURRENT stays on the version that works
    world.login(after)
