"""Kind `rds-admin` end to end: moto's Secrets Manager, the fake Kubernetes API, real MariaDB.

The test plays the person and Terraform Cloud: on the guided step it writes a new version of
the admin secret and changes the sandbox admin's password, as the tainted
`random_string.database_password` would, then clicks Done.
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

import pytest

from bot.settings import Settings
from bot.wiring import build_engine
from demo import kube_api
from rotation.engine import Engine
from rotation.errors import ConfigError, UnknownName
from tests import servers
from tests.rig import Rig, drive

OTHER = "other-db"


@pytest.fixture(autouse=True)
def plain_extract(monkeypatch) -> None:
    """ESO's `dataFrom: extract` with no template: one Secret key per JSON key. FakeKube only
    templates database URLs; url_scheme="extract" asks it for the plain form."""
    templated = kube_api._database_secret_data

    def data(secret_string: str, scheme: str, url_key: str) -> dict[str, str]:
        if scheme != "extract":
            return templated(secret_string, scheme, url_key)
        return {k: kube_api._b64(str(v)) for k, v in json.loads(secret_string).items()}

    monkeypatch.setattr(kube_api, "_database_secret_data", data)



def backup_id(world: Rig) -> str:
    # moto's server is shared by every test in the process: a name of the rig's own.
    return f"govuk/{world.app}/db-backup/passwd"


def configure(world: Rig, **database: Any) -> None:
    config = json.loads(world.config_path.read_text())
    config["databases"] = {
        world.app: {
            "engine": "mysql",
            "apps": [world.app],
            "backup_secret": backup_id(world),
            **database,
        }
    }
    world.config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def configured(world) -> Rig:
    return add_backup(world)


def add_backup(world: Rig) -> Rig:
    """db-backup/passwd holding the admin password (and another database's), synced to a
    Secret, and the database in the catalogue."""
    world.sm().create_secret(
        Name=backup_id(world),
        SecretString=json.dumps(
            {OTHER: "OtherDatabasePassword123", world.app: world.box.admin_password}
        ),
    )
    world.kube.add_external_secret(
        "apps", "db-backup-passwd", secret_id=backup_id(world), url_scheme="extract"
    )
    configure(world)
    return world


def engine_for(world: Rig) -> Engine:
    return build_engine(Settings.load(), clock=world.clock)




def admin_secret(world: Rig) -> dict[str, str]:
    text = world.sm().get_secret_value(
        SecretId=world.admin_secret_id("staging"), VersionStage="AWSCURRENT"
    )["SecretString"]
    return dict(json.loads(text))


def terraform_apply(world: Rig, *, database: bool = True) -> str:
    """What the Terraform Cloud run does: a new admin secret version and, on the instance,
    the new master password."""
    new = servers.password()
    world.sm().put_secret_value(
        SecretId=world.admin_secret_id("staging"),
        SecretString=json.dumps({**admin_secret(world), world.app: new}),
    )
    if database:
        with world.box.root().cursor() as cur:
            cur.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (world.box.admin_user, new))
    return new


def backup(world: Rig) -> dict[str, str]:
    text = world.sm().get_secret_value(SecretId=backup_id(world), VersionStage="AWSCURRENT")[
        "SecretString"
    ]
    return dict(json.loads(text))


def test_a_terraform_guided_rotation_ends_with_db_backup_holding_the_new_password(
    configured, caplog
):
    world = configured
    caplog.set_level(logging.DEBUG, logger="rotor")
    old = world.box.admin_password
    engine = engine_for(world)
    rotation = engine.start("rds-admin", world.app, "staging", "alice")
    row = drive(engine, rotation.id, approver=None)
    assert row.current.name == "terraform" and row.current.status == "needs-approval"
    address = f'random_string.database_password["{world.app}"]'
    assert row.current.gate_summary.splitlines()[1:8] == [
        "cd govuk-infrastructure/terraform/deployments/rds",
        "terraform login",
        "terraform workspace select rds-staging",
        "terraform init",
        "terraform state list | grep 'random_string.database_password'",
        f"  (the list must show {address})",
        f"terraform taint '{address}'",
    ]
    assert "logs in as" in row.step("preflight").result

    new = terraform_apply(world)
    engine.approve(rotation.id, "terraform", "carol")
    final = drive(engine, rotation.id, approver=None)
    assert final.status == "done", [(s.name, s.status, s.error) for s in final.steps]
    assert final.step("terraform").result == "Terraform run applied (done by carol)"
    assert "the new" in final.step("check-admin").result

    assert backup(world) == {OTHER: "OtherDatabasePassword123", world.app: new}
    assert world.kube.secret_data("apps", "db-backup-passwd")[world.app] == new
    assert final.step("sync-backup").result == (
        "synced apps/db-backup-passwd into Secrets db-backup-passwd, each holding the new value"
    )

    dump = "\n".join(engine.store.db.iterdump())
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for password in (old, new):
        assert password not in dump and password not in logs


def test_done_without_a_terraform_run_fails_clearly(configured):
    world = configured
    engine = engine_for(world)
    rotation = engine.start("rds-admin", world.app, "staging", "alice")
    drive(engine, rotation.id, approver=None)
    engine.approve(rotation.id, "terraform", "carol")
    row = drive(engine, rotation.id, until="check-admin", approver=None)
    assert row.current.wait_reason.startswith("a new version of")
    world.clock.advance(engine.catalogue.waits.sync)
    row = drive(engine, rotation.id, approver=None)
    version = row.data["admin_version_before"]
    assert row.current.status == "failed" and row.current.error == (
        f"{world.admin_secret_id('staging')} is still at version {version}, as before the "
        "Terraform run: check that the run applied the taint, then retry"
    )
    assert backup(world)[world.app] == world.box.admin_password


def test_a_new_password_the_database_refuses_fails_clearly(configured):
    world = configured
    engine = engine_for(world)
    rotation = engine.start("rds-admin", world.app, "staging", "alice")
    drive(engine, rotation.id, approver=None)
    new = terraform_apply(world, database=False)  # the instance never took it
    engine.approve(rotation.id, "terraform", "carol")
    row = drive(engine, rotation.id, until="check-admin", approver=None)
    assert "admin password (version" in row.current.wait_reason
    world.clock.advance(engine.catalogue.waits.sync)
    row = drive(engine, rotation.id, approver=None)
    assert row.current.name == "check-admin" and row.current.status == "failed"
    assert "admin password (version" in row.current.error
    assert "does not log in after 20s: login as" in row.current.error
    assert new not in row.current.error and "\n" not in row.current.error
    assert backup(world)[world.app] == world.box.admin_password


def backup_versions(world: Rig) -> list[tuple[str, list[str]]]:
    """Which versions exist and their stages (not access dates, which every read moves)."""
    listed = world.sm().list_secret_version_ids(SecretId=backup_id(world))["Versions"]
    return sorted((v["VersionId"], v["VersionStages"]) for v in listed)


def test_a_backup_already_holding_the_password_is_not_written_again(configured):
    world = configured
    engine = engine_for(world)
    rotation = engine.start("rds-admin", world.app, "staging", "alice")
    drive(engine, rotation.id, approver=None)
    new = terraform_apply(world)
    world.sm().put_secret_value(
        SecretId=backup_id(world), SecretString=json.dumps({**backup(world), world.app: new})
    )
    versions = backup_versions(world)
    engine.approve(rotation.id, "terraform", "carol")
    final = drive(engine, rotation.id, approver=None)
    assert final.status == "done"
    assert final.step("backup-secret").result.startswith(f"{backup_id(world)} already holds")
    assert backup_versions(world) == versions


def test_the_host_in_rotor_yml_wins_over_the_app_secret(configured):
    world = configured
    configure(world, host=world.box.host, port=world.box.port)
    world.sm().put_secret_value(
        SecretId=world.secret_id(),
        SecretString=json.dumps({**world.app_secret(), "host": "nowhere.invalid"}),
    )
    engine = engine_for(world)
    row = drive(engine, engine.start("rds-admin", world.app, "staging", "alice").id, approver=None)
    assert row.current.name == "terraform"
    assert f"at {world.box.host}:{world.box.port}" in row.step("preflight").result


def test_unknown_or_unusable_databases_are_refused_at_start(configured):
    world = configured
    engine = engine_for(world)
    with pytest.raises(UnknownName, match="unknown database 'nope'"):
        engine.start("rds-admin", "nope", "staging", "alice")
    with pytest.raises(UnknownName, match="unknown environment"):
        engine.start("rds-admin", world.app, "moon", "alice")
    configure(world, apps=[])
    with pytest.raises(ConfigError, match="set host:, or apps: to read the host from"):
        engine_for(world).start("rds-admin", world.app, "staging", "alice")
    assert engine.store.recent() == []


def test_the_cli_posts_the_commands_and_resumes_once_they_are_done(configured):
    world = configured

    def rotor(answer: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            world.rotor() + ["rotate-admin", world.app, "staging"],
            env=world.env(),
            input=answer,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=world.workdir,
        )

    waiting = rotor("n\n")  # not applied yet: the rotation waits for it
    assert waiting.returncode == 1, waiting.stdout + waiting.stderr
    assert f"terraform taint 'random_string.database_password[\"{world.app}\"]'" in waiting.stdout
    assert "waits at terraform until it is done" in waiting.stderr
    new = terraform_apply(world)
    done = rotor("y\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming rotation #1" in done.stdout and "done: 5/5 done" in done.stdout
    assert backup(world)[world.app] == new
    for password in (new, world.box.admin_password):
        assert password not in done.stdout + done.stderr + waiting.stdout + waiting.stderr
