"""Kind `rds-admin`: "Rotating admin credentials" in `rds-application-credentials.md`.

Terraform owns an RDS instance's admin password (`random_string.database_password["<db>"]`),
so a person taints it and applies the change through Terraform Cloud: the bot posts the exact
commands and waits for them to click "Done". Rotor then checks what Terraform should have done
(a new version of the admin secret whose password logs in) and does the runbook's manual tail
itself: copy the password into `govuk/db-backup/passwd` and force-sync `db-backup-passwd`.

Only version ids are kept. The password is read from Secrets Manager whenever a step needs it,
registered with the redactor on reading, and compared in memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rotation import consumers, mysql_db, postgres_db
from rotation import secrets as sm_secrets
from rotation.catalogue import Catalogue, Consumers, Database
from rotation.engine import Context, Done, Outcome, Step, Wait
from rotation.errors import ConfigError, DatabaseError, SecretError, StepFailed

# The name goes into a Terraform address inside shell quotes, so nothing that could end them.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
# Runbook: `kubectl annotate -n apps externalsecrets.external-secrets.io db-backup-passwd ...`
BACKUP_NAMESPACE = "apps"
DEFAULT_PORTS = {"mysql": 3306, "postgres": 5432}


def _database(ctx: Context) -> Database:
    return ctx.catalogue.database(ctx.target)


def _sm(ctx: Context) -> Any:
    return ctx.clients.aws(ctx.env, "secretsmanager")


def _admin(ctx: Context) -> tuple[str, str]:
    """(admin secret, admin user): the first app's settings, else the RDS defaults."""
    database = _database(ctx)
    if database.apps:
        t = ctx.catalogue.target(database.apps[0], ctx.env)
        return t.admin_secret, t.admin_user
    return f"{ctx.env}-rds-admin-passwords", "aws_db_admin"


def _server(ctx: Context) -> tuple[str, int, str]:
    """(host, port, database to log in to): rotor.yml's, else the first app's secret's."""
    database = _database(ctx)
    host, port, dbname = database.host, database.port, None
    if database.apps and (host is None or port is None or database.engine == "postgres"):
        secret_id = ctx.catalogue.target(database.apps[0], ctx.env).secret
        app = sm_secrets.read_json(_sm(ctx), secret_id, required=("host", "port")) or {}
        host, port, dbname = host or app["host"], port or int(app["port"]), app.get("dbname")
    if host is None:
        raise ConfigError(f"databases.{ctx.target}: no host, and no app to read it from")
    return host, port or DEFAULT_PORTS[database.engine], dbname or "postgres"


def _admin_password(ctx: Context, version: str | None = None) -> tuple[str, str]:
    """(password, version id) of this database's key in the admin secret (AWSCURRENT, or
    `version`)."""
    secret_id, _ = _admin(ctx)
    sm = _sm(ctx)
    if version is None:
        value = sm_secrets.read_json(sm, secret_id) or {}
    else:
        value = _read_version(sm, secret_id, version)
    password = value.get(ctx.target)
    if not isinstance(password, str) or not password:
        raise SecretError(f"secret {secret_id} has no key {ctx.target!r}")
    return password, str(value["_version"])


def _read_version(sm: Any, secret_id: str, version: str) -> dict[str, Any]:
    """One version by id, whatever its stages; every value registered with the redactor."""
    value = sm_secrets.read_json(sm, secret_id, version=version, secret_fields=None)
    assert value is not None  # reading by version id raises rather than answering None
    return value


def _login_problem(ctx: Context, password: str) -> str | None:
    """Why the admin login with `password` fails, or None when it works."""
    _, user = _admin(ctx)
    host, port, dbname = _server(ctx)
    env = ctx.catalogue.environment(ctx.env)
    login: dict[str, Any] = {"host": host, "port": port, "user": user, "password": password,
                             "tls": env.db_tls, "ca_file": env.db_ca_file}
    try:
        if _database(ctx).engine == "mysql":
            mysql_db.connect(mysql_db.Endpoint(**login)).close()
        else:
            postgres_db.connect(postgres_db.Endpoint(**login, database=dbname)).close()
    except DatabaseError as exc:
        return str(exc)
    return None


def instruction(name: str, database: Database, env: str) -> str:
    """What the person runs: runbook steps 1-8, with `terraform show` (it prints the
    password) replaced by a `state list` filter."""
    address = f'random_string.database_password["{name}"]'
    return "\n".join(
        [
            f"Replace the {name} admin password in {env} with Terraform (platform engineer):",
            f"cd {database.terraform_dir}",
            "terraform login",
            f"terraform workspace select rds-{env}",
            "terraform init",
            "terraform state list | grep 'random_string.database_password'",
            f"  (the list must show {address})",
            f"terraform taint '{address}'",
            f"Then start a run (plan and apply) of the rds-{env} workspace in Terraform Cloud and "
            "click Done once it has applied. Skip `terraform show`: it prints the password.",
        ]
    )


# -- steps -------------------------------------------------------------------------------


def preflight(ctx: Context) -> Outcome:
    """Runbook: "Getting the aws_db_admin RDS admin user credentials": note the admin
    secret's version before the change and try the current password. Read-only."""
    secret_id, user = _admin(ctx)
    password, version = _admin_password(ctx)
    host, port, _ = _server(ctx)
    ctx.data.setdefault("admin_version_before", version)
    problem = _login_problem(ctx, password)
    works = "logs in" if problem is None else f"does not log in ({problem})"
    return Done(
        f"{secret_id} is at version {version}; its {ctx.target} password {works} as "
        f"{user} at {host}:{port}"
    )


def terraform(ctx: Context) -> Outcome:
    """Runbook steps 1-8: taint `random_string.database_password["<db>"]` and apply in
    Terraform Cloud. Guided: a person does it and clicks Done."""
    who = ctx.guide(instruction(ctx.target, _database(ctx), ctx.env), gate="terraform")
    return Done(f"Terraform run applied (done by {who})")


def check_admin(ctx: Context) -> Outcome:
    """Runbook step 8's result: Terraform wrote a new version of the admin secret, and the
    database took the new password: it logs in."""
    secret_id, user = _admin(ctx)
    before = ctx.data["admin_version_before"]
    limit = ctx.catalogue.waits.sync
    password, version = _admin_password(ctx)
    if version == before:
        if ctx.waited >= limit:
            raise StepFailed(
                f"{secret_id} is still at version {before}, as before the "
                "Terraform run: check that the run applied the taint, then retry"
            )
        return Wait(f"a new version of {secret_id} (still {before})", timeout=limit * 2)
    old, _ = _admin_password(ctx, before)
    if old == password:
        raise StepFailed(
            f"version {version} of {secret_id} did not change the {ctx.target} "
            "password: was another resource tainted? Check the address, then retry"
        )
    problem = _login_problem(ctx, password)
    if problem is not None:
        if ctx.waited >= limit:
            raise StepFailed(
                f"the new {ctx.target} admin password (version {version}) does not "
                f"log in after {int(limit)}s: {problem}"
            )
        # RDS applies a new master password a little after Terraform's apply returns.
        return Wait(
            f"the new {ctx.target} admin password (version {version}) to log in", timeout=limit * 2
        )
    ctx.data["admin_version"] = version
    host, port, _ = _server(ctx)
    return Done(
        f"{secret_id} has a new version {version} (was {before}); the new {ctx.target} "
        f"password logs in as {user} at {host}:{port}"
    )


def _ensure_backup(ctx: Context) -> str | None:
    """Make the db-backup secret hold the checked password under this database's key, other
    keys unchanged. Returns the version written, or None when it already held it."""
    backup_id = _database(ctx).backup_secret
    sm = _sm(ctx)
    password, _ = _admin_password(ctx, ctx.data["admin_version"])
    backup = sm_secrets.read_json(sm, backup_id) or {}
    if backup.get(ctx.target) == password:
        ctx.data["backup_version"] = backup["_version"]
        return None
    value = {k: v for k, v in backup.items() if not k.startswith("_")}
    value[ctx.target] = password
    ctx.data["backup_version"] = version = sm_secrets.put_current(sm, backup_id, value)
    return version


def copy_to_backup(ctx: Context) -> Outcome:
    """Runbook step 9: copy the new password from the admin secret into
    `govuk/db-backup/passwd`, under the database's key."""
    backup_id = _database(ctx).backup_secret
    if _ensure_backup(ctx) is None:
        return Done(
            f"{backup_id} already holds the new {ctx.target} password (version "
            f"{ctx.data['backup_version']})"
        )
    return Done(
        f"{backup_id} version {ctx.data['backup_version']} holds the new {ctx.target} "
        "password; its other keys are unchanged"
    )


def sync_backup(ctx: Context) -> Outcome:
    """Runbook step 10: `kubectl annotate -n apps externalsecrets.external-secrets.io
    db-backup-passwd force-sync=$(date +%s) --overwrite`, then check the Secret's value."""
    database = _database(ctx)
    # Another rotation's read-modify-write may have put the old value back since the copy.
    if _ensure_backup(ctx) is not None:
        ctx.log.info(
            "%s lost the new %s password since the copy; copied it again",
            database.backup_secret,
            ctx.target,
        )
        ctx.data.get("consumers", {}).pop("backup", None)  # force a fresh sync
    backup = Consumers(
        namespace=BACKUP_NAMESPACE, external_secrets=(database.backup_external_secret,)
    )
    return consumers.sync_external_secrets(
        ctx,
        backup,
        "backup",
        expect=lambda ctx: consumers.Expected(
            new=[_admin_password(ctx, ctx.data["admin_version"])[0]],
            old=[_admin_password(ctx, ctx.data["admin_version_before"])[0]],
        ),
    )


class RdsAdminKind:
    """Terraform-guided rotation of an RDS instance's admin password."""

    name = "rds-admin"

    def validate(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> None:
        database = catalogue.database(target)
        if not NAME.match(target):
            raise ConfigError(
                f"databases.{target}: the name may only hold letters, digits, "
                "'-' and '_' (it goes into a Terraform address)"
            )
        if not database.host and not database.apps:
            raise ConfigError(f"databases.{target}: set host:, or apps: to read the host from")

    def steps(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> list[Step]:
        return [
            Step(
                "preflight",
                "Note the admin secret's version and try the current password",
                preflight,
            ),
            Step(
                "terraform",
                "Taint the admin password and apply it in Terraform Cloud (guided)",
                terraform,
            ),
            Step("check-admin", "Check the admin secret's new version logs in", check_admin),
            Step(
                "backup-secret", "Copy the new password into the db-backup secret", copy_to_backup
            ),
            Step(
                "sync-backup",
                "Force-sync the db-backup ExternalSecret and check its Secret",
                sync_backup,
            ),
        ]

    def cancel(self, ctx: Context) -> str:
        """Nothing Rotor did needs undoing: Terraform owns the password."""
        database = _database(ctx)
        if ctx.data.get("backup_version"):
            return (
                f"{database.backup_secret} already holds the new {ctx.target} password; "
                f"force-sync {BACKUP_NAMESPACE}/{database.backup_external_secret} by hand"
            )
        return (
            f"nothing to undo; if the Terraform run applied, copy the new {ctx.target} "
            f"password into {database.backup_secret} and force-sync "
            f"{BACKUP_NAMESPACE}/{database.backup_external_secret} by hand (runbook steps "
            "9 and 10)"
        )


KIND = RdsAdminKind()
