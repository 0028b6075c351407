"""The catalogue, `rotor.yml`: environments, apps and where their credentials live.

Conventions make a typical app one line (`signon: {engine: mysql}`); every default can be
overridden per app, and per app and environment under the app's `environments:` key.
Loading validates everything up front, and an error names the key and what is wrong.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import types
from collections.abc import Iterable
from datetime import time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rotation.errors import ConfigError, UnknownName

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
ROLE_ARN = re.compile(r"^arn:aws(-[a-z]+)*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
# A channel by name (`#govuk-developers`) or by ID (`C0123ABCD`, `G…` for an old private one).
CHANNEL = re.compile(r"^(#[a-z0-9][a-z0-9._-]{0,79}|[CG][A-Z0-9]{8,})$")
# What people call environments, and the names catalogues give them.
ALIASES = {"prod": "production", "prd": "production", "live": "production",
           "stage": "staging", "stg": "staging", "int": "integration", "dev": "development",
           "develop": "development", "test": "testing", "qa": "testing"}
TlsMode = Literal["disabled", "required", "verify"]


@functools.cache
def aws_regions() -> frozenset[str]:
    """Every region botocore knows, read from its data file (no import of botocore)."""
    spec = importlib.util.find_spec("botocore")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    data = json.loads((Path(spec.submodule_search_locations[0]) / "data" /
                       "partitions.json").read_text())
    return frozenset(name for partition in data["partitions"]
                     for name in partition["regions"] if not name.endswith("-global"))


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r} (an IANA name such as "
                         "'Europe/London')") from None
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Waits(_Model):
    """How long each kind of wait may last (seconds), and how often it is re-checked."""

    sync: float = 300
    """Seconds an ExternalSecret may take to sync after the force-sync."""
    sync_error_grace: float = 10  # a SecretSyncedError this young may predate our force-sync
    """Seconds during which a SecretSyncedError may predate Rotor's force-sync and is ignored."""
    rollout_start: float = 120  # restart the Deployment if no new pod appears within this
    """Seconds to wait for Reloader to roll a Deployment before Rotor restarts it (Deployments
    with no Reloader annotation are restarted at once)."""
    rollout: float = 900
    """Seconds a rollout may take."""
    drain: float = 900  # old connections may linger this long before Rotor offers to kill them
    """Seconds the old user's connections may linger before Rotor offers to kill them."""
    restore_grace: float = 6 * 3600  # after an overnight restore is due, how long to keep looking
    """Seconds to keep looking for the new user after an overnight restore was due."""
    first_check: float = 0.05
    """Seconds before the first re-check of a wait; doubled each time."""
    max_check: float = 30
    """Longest gap, in seconds, between re-checks of a wait."""


class AccessRule(_Model):
    """Who may start and approve rotations in an environment (Slack user or user group IDs)."""

    starters: tuple[str, ...] = ()
    """Slack user (`U…`) or user group (`S…`) IDs who may start rotations; empty means anyone."""
    approvers: tuple[str, ...] = ()
    """Slack user or user group IDs who may approve; empty means anyone."""


class Environment(_Model):
    aws_region: str
    """AWS region of the environment's secrets and services (checked against botocore's list)."""
    aws_role_arn: str | None = None
    """IAM role Rotor assumes in this environment (`arn:aws:iam::ACCOUNT:role/NAME`)."""
    kube_context: str | None = None
    """kubeconfig context of the environment's cluster; none means the in-cluster service
    account."""
    kubeconfig: str | None = None
    """kubeconfig file for this environment, instead of KUBECONFIG."""
    db_tls: TlsMode = "required"
    """TLS to the databases: `required`, `verify` (with `db_ca_file`) or `disabled`."""
    db_ca_file: str | None = None
    """CA bundle that database certificates are verified against (`db_tls: verify`)."""
    # Two different people for every approval (four-eyes); on by default in production.
    four_eyes: bool | None = None
    """A second person approves every gate; defaults to on in `production`."""
    # 2nd line is told before anything destructive runs; on by default in production.
    notify_second_line: bool | None = None
    """2nd line is told before anything destructive; defaults to on in `production`."""
    starters: tuple[str, ...] = ()
    """Slack user (`U…`) or user group (`S…`) IDs who may start rotations here; empty means
    anyone."""
    approvers: tuple[str, ...] = ()
    """Slack user or user group IDs who may approve here; empty means anyone."""
    allow_unmapped_operators: bool | None = None
    """CLI operators whose AWS principal matches no `operators:` pattern may act here; defaults
    to off in `production`."""
    restored_from: str | None = None
    """The environment this one is restored from overnight (needs `restore_time`)."""
    restore_time: time | None = None
    """Local time the overnight restore runs (`"03:00"`)."""
    timezone: str = "Europe/London"
    """IANA timezone of `restore_time`."""
    kms_keys: tuple[str, ...] = ()
    """Customer-managed KMS keys (ARNs) encrypting the secrets Rotor reads and writes."""
    where_used_prefix: str | None = None
    """The where-used scan of an IAM key reads every secret's value: set this to read only
    secrets whose name starts with it (and `rotor iam-policy` grants only those)."""

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        return _check_timezone(value)

    @field_validator("aws_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        known = aws_regions()
        if known and value not in known:
            raise ValueError(f"unknown AWS region {value!r}{_suggest(value, known)}")
        return value

    @field_validator("aws_role_arn")
    @classmethod
    def _role_arn(cls, value: str | None) -> str | None:
        if value is not None and not ROLE_ARN.match(value):
            raise ValueError(f"{value!r} is not an IAM role ARN "
                             "(arn:aws:iam::123456789012:role/NAME)")
        return value

    @model_validator(mode="after")
    def _restore_needs_time(self) -> Environment:
        if self.restored_from and self.restore_time is None:
            raise ValueError("restored_from needs restore_time (for example \"03:00\")")
        return self


class AppOverrides(_Model):
    """Fields an app may set, for all environments or for one."""

    secret: str | None = None
    """The app's secret (default `govuk/{app}/{engine}`): JSON with host, port, dbname,
    username, password."""
    admin_secret: str | None = None
    """Secret holding the RDS admin passwords (default `{env}-rds-admin-passwords`)."""
    admin_key: str | None = None
    """Key of the admin password in `admin_secret` (default: the app name)."""
    admin_user: str | None = None
    """The RDS admin user (default `aws_db_admin`)."""
    namespace: str | None = None
    """Kubernetes namespace of the app (default `apps`)."""
    external_secret: str | None = None
    """ExternalSecret that syncs the app's secret (default `{app}-{engine}`)."""
    deployment: str | None = None
    """The app's Deployment (default: the app name)."""
    container: str | None = None
    """Container that reads the secret (default `app`)."""
    secret_key: str | None = None
    """Key of the Kubernetes Secret holding the URL (default `DATABASE_URL`)."""
    url_scheme: str | None = None
    """Scheme of that URL (default `mysql2` or `postgresql`)."""


class App(AppOverrides):
    engine: Literal["mysql", "postgres"]
    """`mysql` or `postgres`."""
    environments: dict[str, AppOverrides] = Field(default_factory=dict)
    """Overrides for one environment, keyed by environment name."""


class EcsService(_Model):
    cluster: str
    """ECS cluster name."""
    service: str
    """ECS service name."""


class Consumers(_Model):
    """What reads a secret: Kubernetes through ExternalSecrets, ECS services, people."""

    namespace: str = "apps"
    """Kubernetes namespace of the ExternalSecrets and Deployments."""
    external_secrets: tuple[str, ...] = ()
    """ExternalSecrets to force-sync."""
    deployments: tuple[str, ...] = ()
    """Deployments to roll out."""
    ecs_services: tuple[EcsService, ...] = ()
    """ECS services to redeploy (`{cluster, service}`)."""


class SecretField(_Model):
    """A Secrets Manager secret holding an access key, and the JSON fields that hold it."""

    id: str
    """Secrets Manager secret holding the key."""
    key_id_field: str = "access_key_id"
    """JSON field of the access key ID."""
    secret_field: str = "secret_access_key"
    """JSON field of the secret access key."""


class ManualPlace(_Model):
    """Somewhere a key lives that Rotor cannot reach: a person updates it when told."""

    place: str
    """Where the key lives (a third party's console)."""
    instruction: str
    """What a person does there; posted as a guided step."""


class KeyPlaces(Consumers):
    secrets: tuple[SecretField, ...] = ()
    """Secrets that hold the key."""
    manual: tuple[ManualPlace, ...] = ()
    """Places a person updates by hand."""


class IamUser(_Model):
    """An IAM user whose access key Rotor rotates, and where the key lives per environment."""

    environments: dict[str, KeyPlaces]
    """Where the user's key lives, per environment."""
    grace_days: float = 7  # how long the deactivated old key waits before deletion
    """Days the deactivated old key waits before it is deleted."""


class KeyAge(_Model):
    """The scheduled key-age check: a cron in a timezone, and the age limits."""

    schedule: str = "0 9 * * mon"
    """Cron (minute hour day month weekday) of the key-age check."""
    timezone: str = "Europe/London"
    """IANA timezone of `schedule`."""
    max_key_age_days: int = 90
    """A key older than this is overdue."""
    warn_days: int = 80
    """A key older than this is due soon."""

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        return _check_timezone(value)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        # Only a schedule someone wrote is checked, so the default costs no import.
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a cron expression (minute hour day month "
                             f"weekday, e.g. '0 9 * * mon'): {exc}") from None
        return value


class ManagedSecret(_Model):
    """A secret with a Secrets Manager rotation function, and who must redeploy after it."""

    environments: dict[str, Consumers]
    """Who must redeploy after the rotation, per environment."""
    rollback_minutes: float = 60  # how long the "Roll back" button stays
    """Minutes the Roll back button stays after a rotation."""


class Database(_Model):
    """An RDS instance whose admin password Terraform owns (`rotate admin`)."""

    engine: Literal["mysql", "postgres"]
    """`mysql` or `postgres`."""
    host: str | None = None  # default: the host in the app secret of an app using it
    """Instance host; default: the host in the app secret of an app using it."""
    port: int | None = None
    """Instance port; default: as `host`."""
    apps: tuple[str, ...] = ()
    """Apps whose databases live on this instance."""
    terraform_dir: str = "govuk-infrastructure/terraform/deployments/rds"
    """Terraform directory of the RDS deployment, posted in the guided steps."""
    backup_secret: str = "govuk/db-backup/passwd"
    """Secret the db-backup job reads the admin passwords from."""
    backup_external_secret: str = "db-backup-passwd"
    """ExternalSecret that syncs `backup_secret`."""


class SlackConfig(_Model):
    channel: str = "#govuk-developers"
    """Channel of the rotation messages (`#name` or a channel ID)."""
    second_line_channel: str = "#govuk-2ndline"
    """Channel of the 2nd line notices (`#name` or a channel ID)."""
    second_line_group: str | None = None  # a user group ID, mentioned as <!subteam^ID>
    """User group ID (`S…`) mentioned in 2nd line notices."""
    hold_seconds: float = 0
    """Seconds after a 2nd line notice during which anyone may press Hold."""
    approval_reminder_minutes: float = 60
    """Minutes before an unanswered approval is reminded."""
    approval_expiry_hours: float = 24
    """Hours before an unanswered approval expires (the rotation pauses)."""
    teams: tuple[str, ...] = ()
    """Enterprise Grid: workspaces (team IDs, `T…`) besides the installed one that may act."""

    @field_validator("channel", "second_line_channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        if not CHANNEL.match(value):
            hint = f" (did you mean '#{value}'?)" if CHANNEL.match(f"#{value}") else ""
            raise ValueError(f"channel {value!r} must be '#name' (lower case) or a channel "
                             f"ID{hint}")
        return value


class Catalogue(_Model):
    environments: dict[str, Environment]
    """The environments, keyed by name (lower case, digits, hyphens)."""
    apps: dict[str, App] = Field(default_factory=dict)
    """Apps whose database credentials Rotor rotates (`/rotate APP ENV`)."""
    slack: SlackConfig = SlackConfig()
    """Slack channels and timings."""
    waits: Waits = Waits()
    """How long waits may last and how often they are re-checked."""
    iam_users: dict[str, IamUser] = Field(default_factory=dict)
    """IAM users whose access keys Rotor rotates (`/rotate key USER ENV`)."""
    key_age: KeyAge = KeyAge()
    """The scheduled key-age check."""
    secrets: dict[str, ManagedSecret] = Field(default_factory=dict)
    """Secrets Manager secrets with a rotation function (`/rotate secret ID ENV`)."""
    databases: dict[str, Database] = Field(default_factory=dict)
    """RDS instances whose admin password Terraform owns (`/rotate admin DATABASE ENV`)."""
    operators: dict[str, str] = Field(default_factory=dict)
    """CLI operators: AWS principal ARN patterns (`*` matches anything) mapped to the Slack
    user ID (`U…`) of the person; policy and four-eyes run on that person."""

    @field_validator("operators")
    @classmethod
    def _operator_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern, user in value.items():
            if not pattern.startswith("arn:"):
                raise ValueError(f"{pattern!r} is not an AWS principal ARN pattern (arn:…)")
            if not re.fullmatch(r"[UW][A-Z0-9]{2,}", user):
                raise ValueError(f"{pattern}: {user!r} is not a Slack user ID (U…)")
        return value

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
        problems = []  # every one of them, one per line
        for env_name, env in self.environments.items():
            if env.restored_from and env.restored_from not in self.environments:
                problems.append(f"environments.{env_name}.restored_from: no environment named "
                                f"{env.restored_from!r}"
                                f"{_suggest(env.restored_from, self.environments)}")
        sections: list[tuple[str, dict[str, Any]]] = [
            ("apps", self.apps), ("iam_users", self.iam_users), ("secrets", self.secrets)]
        for section, entries in sections:
            for name, entry in entries.items():
                for env_name in entry.environments:
                    if env_name not in self.environments:
                        problems.append(f"{section}.{name}.environments.{env_name}: no such "
                                        f"environment{_suggest(env_name, self.environments)}")
        for name, database in self.databases.items():
            for app_name in database.apps:
                if app_name not in self.apps:
                    problems.append(f"databases.{name}.apps: no app named {app_name!r}"
                                    f"{_suggest(app_name, self.apps)}")
        if problems:
            raise ValueError("\n".join(problems))
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

    def allows_unmapped_operators(self, env: str) -> bool:
        flag = self.environment(env).allow_unmapped_operators
        return env != "production" if flag is None else flag

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


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name someone most likely meant: an alias, a prefix, or a near spelling."""
    import difflib

    names = sorted(known)
    lower = name.lower()
    alias = ALIASES.get(lower)
    if alias in names:
        return alias
    for candidate in names:
        if candidate.lower() == lower:
            return candidate
    prefixed = [n for n in names if lower and n.lower().startswith(lower)]
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return close[0] if close else None


def _suggest(name: str, known: Iterable[str]) -> str:
    found = closest(name, known)
    return f" (did you mean {found!r}?)" if found else ""


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
        problems = _problems(exc)
        if len(problems) == 1:
            raise ConfigError(f"{source}: {problems[0]}") from None
        listed = "".join(f"\n  {problem}" for problem in problems)
        raise ConfigError(f"{source}: {len(problems)} problems:{listed}") from None


def load(path: str | Path) -> Catalogue:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (set --config or ROTOR_CONFIG)") from None
    return parse(text, str(path))


def _problems(exc: ValidationError) -> list[str]:
    """Every error pydantic found, each naming its key; an unknown key suggests the known
    one it most likely misspells, and then that key's "Field required" is not repeated."""
    errors = exc.errors()
    missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing"}
    meant: set[tuple[Any, ...]] = set()
    lines = []
    for err in errors:
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            fields = _fields_at(loc[:-1])
            found = closest(str(loc[-1]), fields) if fields else None
            message = f"unknown key (did you mean {found!r}?)" if found else "unknown key"
            if found:
                meant.add((*loc[:-1], found))
        for line in message.splitlines():
            key = ".".join(str(part) for part in loc)
            lines.append((loc, f"{key}: {line}" if key and not line.startswith(key) else line))
    return [line for loc, line in lines if not (loc in missing and loc in meant)]


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model at `loc` (a path from the catalogue's top) accepts."""
    import typing

    annotation: Any = Catalogue
    parts = list(loc)
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = options[0] if len(options) == 1 else None
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not parts:
                return list(annotation.model_fields)
            field = annotation.model_fields.get(str(parts.pop(0)))
            if field is None:
                return []
            annotation = field.annotation
        elif origin in (dict, tuple, list) and parts:
            parts.pop(0)
            annotation = typing.get_args(annotation)[-1 if origin is dict else 0]
        else:
            return []
