"""Secrets Manager operations shared by every kind: read, stage AWSPENDING, promote.

Values read here are registered with the redactor before anything else sees them.
Reads always name the stage: moto (unlike AWS) keeps answering the old version for an
unstaged read after AWSCURRENT moved.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from rotation import readcache, redact
from rotation.errors import SecretError

APP_KEYS = ("host", "port", "dbname", "username", "password")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


PLAIN_FIELDS = ("host", "dbname", "username", "engine")


def read_json(sm: Any, secret_id: str, *, stage: str = "AWSCURRENT", version: str | None = None,
              required: tuple[str, ...] = (),
              secret_fields: tuple[str, ...] | None = None) -> dict[str, Any] | None:
    """The secret's JSON at `stage` (or at `version`), or None when no version has that stage.

    Every string field is registered with the redactor, but for PLAIN_FIELDS; with
    `secret_fields`, only those are (an access key ID is no secret, and the thread names it).
    Read once per advance (`rotation.readcache`), but never for a destructive step's facts.
    """
    key = ("secret", id(sm), secret_id, stage, version, required, secret_fields)
    return readcache.read(key, lambda: _read_json(sm, secret_id, stage=stage, version=version,
                                                  required=required,
                                                  secret_fields=secret_fields),
                          lambda value: None if value is None else dict(value))


def _read_json(sm: Any, secret_id: str, *, stage: str, version: str | None,
               required: tuple[str, ...],
               secret_fields: tuple[str, ...] | None) -> dict[str, Any] | None:
    where = f"version {version}" if version else f"({stage})"
    try:
        response = sm.get_secret_value(
            SecretId=secret_id, **({"VersionId": version} if version else {"VersionStage": stage}))
    except ClientError as exc:
        code = _error_code(exc)
        if code == "ResourceNotFoundException" and not version:
            if stage != "AWSCURRENT":
                return None
            raise SecretError(f"secret {secret_id} not found") from None
        raise SecretError(f"secret {secret_id} {where}: {code or 'unreadable'}") from None
    text = response.get("SecretString")
    redact.register(text)
    try:
        value = json.loads(text or "")
    except json.JSONDecodeError:
        raise SecretError(f"secret {secret_id} {where} is not JSON") from None
    if not isinstance(value, dict):
        raise SecretError(f"secret {secret_id} {where} is not a JSON object")
    for key, item in value.items():
        if isinstance(item, str) and (key in secret_fields if secret_fields is not None
                                      else key not in PLAIN_FIELDS):
            redact.register(item)
    missing = [k for k in required if value.get(k) in (None, "")]
    if missing:
        raise SecretError(f"secret {secret_id} {where} has no {', '.join(missing)}")
    value["_version"] = response["VersionId"]
    return value


def versions(sm: Any, secret_id: str) -> dict[str, list[str]]:
    """Version id -> its stages."""
    try:
        return dict(sm.describe_secret(SecretId=secret_id).get("VersionIdsToStages", {}))
    except ClientError as exc:
        raise SecretError(f"secret {secret_id}: {_error_code(exc) or 'cannot describe'}") from None


def version_with(sm: Any, secret_id: str, stage: str) -> str | None:
    return next((v for v, stages in versions(sm, secret_id).items() if stage in stages), None)


def put_pending(sm: Any, secret_id: str, value: dict[str, Any]) -> str:
    """Write `value` as a new version labelled AWSPENDING; returns its version id."""
    readcache.invalidate()  # also done by the fence's hook; fakes of sm have none
    body = {k: v for k, v in value.items() if not k.startswith("_")}
    try:
        response = sm.put_secret_value(SecretId=secret_id, SecretString=json.dumps(body),
                                       VersionStages=["AWSPENDING"])
    except ClientError as exc:
        raise SecretError(f"secret {secret_id}: could not stage AWSPENDING "
                          f"({_error_code(exc)})") from None
    return str(response["VersionId"])


def promote(sm: Any, secret_id: str, version_id: str) -> bool:
    """Move AWSCURRENT to `version_id` (AWSPREVIOUS follows) and drop its AWSPENDING label.

    Returns False when it was already current: promoting twice is harmless.
    """
    readcache.invalidate()  # also done by the fence's hook; fakes of sm have none
    current = version_with(sm, secret_id, "AWSCURRENT")
    changed = False
    try:
        if current != version_id:
            sm.update_secret_version_stage(SecretId=secret_id, VersionStage="AWSCURRENT",
                                           MoveToVersionId=version_id,
                                           RemoveFromVersionId=current)
            changed = True
        if "AWSPENDING" in versions(sm, secret_id).get(version_id, []):
            sm.update_secret_version_stage(SecretId=secret_id, VersionStage="AWSPENDING",
                                           RemoveFromVersionId=version_id)
    except ClientError as exc:
        raise SecretError(f"secret {secret_id}: could not promote version {version_id} "
                          f"({_error_code(exc)})") from None
    return changed


def unstage(sm: Any, secret_id: str, stage: str, version_id: str) -> bool:
    """Remove `stage` from `version_id` if it is there."""
    readcache.invalidate()  # also done by the fence's hook; fakes of sm have none
    if stage not in versions(sm, secret_id).get(version_id, []):
        return False
    sm.update_secret_version_stage(SecretId=secret_id, VersionStage=stage,
                                   RemoveFromVersionId=version_id)
    return True


def put_current(sm: Any, secret_id: str, value: dict[str, Any]) -> str:
    """Write `value` as the new AWSCURRENT (AWSPREVIOUS keeps the old one)."""
    readcache.invalidate()  # also done by the fence's hook; fakes of sm have none
    body = {k: v for k, v in value.items() if not k.startswith("_")}
    try:
        response = sm.put_secret_value(SecretId=secret_id, SecretString=json.dumps(body))
    except ClientError as exc:
        raise SecretError(f"secret {secret_id}: could not write ({_error_code(exc)})") from None
    return str(response["VersionId"])
