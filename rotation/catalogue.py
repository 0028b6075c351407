"""The catalogue, `rotor.yml`: environments, apps and where their credentials live.

Conventions make a typical app one line (`signon: {engine: mysql}`); every default can be
overridden per app, and per app and environment under the app's `environments:` key.
Loading validates everything up front, and an error names the key and what is wrong.
"""

from __future__ import annotations

import re
from datetime import time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rotation.errors import ConfigError, UnknownName

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TlsMode = Literal["disabled", "required", "verify"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Waits(_Model):
    """How long each kind of wait may last (seconds), and how often it is re-checked."""

    sync: float = 300
    sync_error_grace: float = 10  # a SecretSyncedError this young may predate our force-sync
    rollout_start: float = 120  # restart the Deployment if no new pod appears within this
    rollout: float = 900
    drain: float = 900  # old connections may linger this long before Rotor offers to kill them
    restore_grace: float = 6 * 3600  # after an overnight restore is due, how long to keep looking
    first_check: float = 0.05
    max_check: float = 30


class AccessRule(_Model):
    """Who may start and approve rotations in an environment (Slack user or user group IDs)."""

    starters: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()


class Environment(_Model):
    aws_region: str
    aws_role_arn: str | None = None
    kube_context: str | None = None
    kubeconfig: str | None = None
    db_tls: TlsMode = "required"
    db_ca_file: str | None = None
    # Two different people for every approval (four-eyes); on by default in production.
    four_eyes: bool | None = None
    # 2nd line is told before anything destructive runs; on by default in production.
    notify_second_line: bool | None = None
    starters: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()
    restored_from: str | None = None
    restore_time: time | None = None
    timezone: str = "Europe/London"
    # Customer-managed KMS keys (ARNs) encrypting the secrets Rotor reads and writes.
    kms_keys: tuple[str, ...] = ()
    # The where-used scan of an IAM key reads every secret's value; set this to read only
    # secrets whose name starts with it (and `rotor iam-policy` grants only those).
    where_used_prefix: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _restore_needs_time(self) -> Environment:
        if self.restored_from and self.restore_time is None:
            raise ValueError("restored_from needs restore_time (for example \"03:00\")")
        return self


class AppOverrides(_Model):
    """Fields an app may set, for all environments or for one."""

    secret: str | None = None
    admin_secret: str | None = None
    admin_key: str | None = None
    admin_user: str | None = None
    namespace: str | None = None
    external_secret: str | None = None
    deployment: str | None = None
    container: str | None = None
    secret_key: str | None = None
    url_scheme: str | None = None


class App(AppOverrides):
    engine: Literal["mysql", "postgres"]
    environments: dict[str, AppOverrides] = Field(default_factory=dict)


class EcsService(_Model):
    cluster: str
    service: str


class Consumers(_Model):
    """What reads a secret: Kubernetes through ExternalSecrets, ECS services, people."""

    namespace: str = "apps"
    external_secrets: tuple[str, ...] = ()
    deployments: tuple[str, ...] = ()
    ecs_services: tuple[EcsService, ...] = ()


class SecretField(_Model):
    """A Secrets Manager secret holding an access key, and the JSON fields that hold it."""

    id: str
    key_id_field: str = "access_key_id"
    secret_field: str = "secret_access_key"


class ManualPlace(_Model):
    """Somewhere a key lives that Rotor cannot reach: a person updates it when told."""

    place: str
    instruction: str


class KeyPlaces(Consumers):
    secrets: tuple[SecretField, ...] = ()
    manual: tuple[ManualPlace, ...] = ()


class IamUser(_Model):
    """An IAM user whose access key Rotor rotates, and where the key lives per environment."""

    environments: dict[str, KeyPlaces]
    grace_days: float = 7  # how long the deactivated old key waits before deletion


class KeyAge(_Model):
    """The scheduled key-age check: a cron in a timezone, and the age limits."""

    schedule: str = "0 9 * * mon"
    timezone: str = "Europe/London"
    max_key_age_days: int = 90
    warn_days: int = 80


class ManagedSecret(_Model):
    """A secret with a Secrets Manager rotation function, and who must redeploy after it."""

    environments: dict[str, Consumers]
    rollback_minutes: float = 60  # how long the "Roll back" button stays


class Database(_Model):
    """An RDS instance whose admin password Terraform owns (`rotate admin`)."""

    engine: Literal["mysql", "postgres"]
    host: str | None = None  # default: the host in the app secret of an app using it
    port: int | None = None
    apps: tuple[str, ...] = ()
    terraform_dir: str = "govuk-infrastructure/terraform/deployments/rds"
    backup_secret: str = "govuk/db-backup/passwd"
    backup_external_secret: str = "db-backup-passwd"


class SlackConfig(_Model):
    channel: str = "#govuk-developers"
    second_line_channel: str = "#govuk-2ndline"
    second_line_group: str | None = None  # a user group ID, mentioned as <!subteam^ID>
    hold_seconds: float = 0
    approval_reminder_minutes: float = 60
    approval_expiry_hours: float = 24


class Catalogue(_Model):
    environments: dict[str, Environment]
    apps: dict[str, App] = Field(default_factory=dict)
    slack: SlackConfig = SlackConfig()
    waits: Waits = Waits()
    iam_users: dict[str, IamUser] = Field(default_factory=dict)
    key_age: KeyAge = KeyAge()
    secrets: dict[str, ManagedSecret] = Field(default_factory=dict)
    databases: dict[str, Database] = Field(default_factory=dict)

    @field_validator("environments", "apps")
    @classmethod
    def _safe_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not NAME.match(name):
                raise ValueError(
                    f"name {name!r} must be lower-case letters, digits and hyphens")
        return value

    @model_validator(mode="after")
    def _references_exist(self) -> Catalogue:
        for env_name, env in self.environments.items():
            if env.restored_from and env.restored_from not in self.environments:
                raise ValueError(f"environments.{env_name}.restored_from: no environment "
                                 f"named {env.restored_from!r}")
        sections: list[tuple[str, dict[str, Any]]] = [
            ("apps", self.apps), ("iam_users", self.iam_users), ("secrets", self.secrets)]
        for section, entries in sections:
            for name, entry in entries.items():
                for env_name in entry.environments:
                    if env_name not in self.environments:
                        raise ValueError(f"{section}.{name}.environments.{env_name}: "
                                         "no such environment")
        for name, database in self.databases.items():
            for app_name in database.apps:
                if app_name not in self.apps:
                    raise ValueError(f"databases.{name}.apps: no app named {app_name!r}")
        return self

    def environment(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            raise UnknownName(f"unknown environment {name!r}"
                              f"{_suggest(name, self.environments)}") from None

    def app(self, name: str) -> App:
        try:
            return self.apps[name]
        except KeyError:
            raise UnknownName(f"unknown app {name!r}{_suggest(name, self.apps)}") from None

    def iam_user(self, name: str, env: str) -> KeyPlaces:
        user = self.iam_users.get(name)
        if user is None:
            raise UnknownName(f"unknown IAM user {name!r}{_suggest(name, self.iam_users)}")
        self.environment(env)
        if env not in user.environments:
            raise UnknownName(f"IAM user {name!r} has no key in {env}")
        return user.environments[env]

    def managed_secret(self, secret_id: str, env: str) -> Consumers:
        entry = self.secrets.get(secret_id)
        if entry is None:
            raise UnknownName(f"unknown secret {secret_id!r}{_suggest(secret_id, self.secrets)}")
        self.environment(env)
        if env not in entry.environments:
            raise UnknownName(f"secret {secret_id!r} is not rotated in {env}")
        return entry.environments[env]

    def database(self, name: str) -> Database:
        try:
            return self.databases[name]
        except KeyError:
            raise UnknownName(f"unknown database {name!r}"
                              f"{_suggest(name, self.databases)}") from None

    def four_eyes(self, env: str) -> bool:
        flag = self.environment(env).four_eyes
        return env == "production" if flag is None else flag

    def notify_second_line(self, env: str) -> bool:
        flag = self.environment(env).notify_second_line
        return env == "production" if flag is None else flag

    def restored_into(self, source_env: str) -> list[str]:
        """Environments that an overnight restore copies from `source_env`."""
        return [name for name, env in self.environments.items() if env.restored_from == source_env]

    def target(self, app_name: str, env_name: str) -> AppTarget:
        """Everything a rotation of one app in one environment needs, defaults applied."""
        app, env = self.app(app_name), self.environment(env_name)
        merged: dict[str, Any] = {
            "secret": f"govuk/{app_name}/{app.engine}",
            "admin_secret": f"{env_name}-rds-admin-passwords",
            "admin_key": app_name,
            "admin_user": "aws_db_admin",
            "namespace": "apps",
            "external_secret": f"{app_name}-{app.engine}",
            "deployment": app_name,
            "container": "app",
            "secret_key": "DATABASE_URL",
            "url_scheme": "mysql2" if app.engine == "mysql" else "postgresql",
        }
        for layer in (app, app.environments.get(env_name)):
            if layer is not None:
                merged.update({k: v for k, v in layer.model_dump(include=set(merged)).items()
                               if v is not None})
        return AppTarget(app=app_name, env=env_name, engine=app.engine, db_tls=env.db_tls,
                         db_ca_file=env.db_ca_file, **merged)


class AppTarget(_Model):
    """One app in one environment, with every default resolved."""

    app: str
    env: str
    engine: Literal["mysql", "postgres"]
    secret: str
    admin_secret: str
    admin_key: str
    admin_user: str
    namespace: str
    external_secret: str
    deployment: str
    container: str
    secret_key: str
    url_scheme: str
    db_tls: TlsMode
    db_ca_file: str | None


def _suggest(name: str, known: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse(text: str, source: str = "rotor.yml") -> Catalogue:
    """Validate catalogue text; a ConfigError names the first bad key and what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with `environments:` and `apps:`")
    try:
        return Catalogue.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None


def load(path: str | Path) -> Catalogue:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (set --config or ROTOR_CONFIG)") from None
    return parse(text, str(path))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{key}: {message}" if key else message
