"""One line a person can act on, for the failures that come from the world, not from Rotor.

Missing or expired AWS credentials, an AWS refusal, an unknown kube context and a database
that cannot be reached are expected: each gets one line that names the environment and what
to set. Nothing here imports a client library; an exception from one means it is loaded.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from rotation.errors import ConfigError, DatabaseUnreachable

# Error codes AWS answers when the credentials were once good and are no longer.
EXPIRED = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "TokenRefreshRequired"}
INVALID = {"InvalidClientTokenId", "UnrecognizedClientException", "InvalidSignatureException",
           "SignatureDoesNotMatch", "AuthFailure"}
DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation",
          "UnauthorizedException", "AuthorizationError"}
SET_CREDENTIALS = ("set AWS_PROFILE (after `aws sso login`), or AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY, or run where an instance or IRSA role provides them")
_PERFORM = re.compile(r"not authorized to perform:? (\S+?)(?: on resource:? (\S+?))?"
                      r"(?: because|\.?$|\s)")


def _tag(name: str, text: str) -> str | None:
    found = re.search(f"<{name}>([^<]*)</{name}>", text)
    return found.group(1).strip() if found else None


def _in(env: str | None) -> str:
    return f" for {env}" if env else ""


def explain(exc: BaseException, env: str | None = None) -> str | None:
    """The one-line message for an expected failure, or None when `exc` is not one."""
    if isinstance(exc, DatabaseUnreachable):
        where = f"the {env} database" if env else "the database"
        return (f"cannot reach {where}: {exc}; check `host` and `port` in the app's secret, "
                "and run Rotor where the database is reachable (in the cluster, or through a "
                "tunnel)")
    botocore = sys.modules.get("botocore.exceptions")
    seen = 0
    cause: BaseException | None = exc
    # Rotor's own errors wrap the client's (`raise SecretError(...) from None` still keeps
    # it as the context): the client's error says best what to set.
    while cause is not None and seen < 5:
        if botocore is not None and (message := _aws(cause, env, botocore)):
            return message
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def _aws(exc: BaseException, env: str | None, botocore: Any) -> str | None:
    if isinstance(exc, botocore.NoCredentialsError | botocore.PartialCredentialsError):
        return f"no AWS credentials{_in(env)}: {SET_CREDENTIALS}"
    token_errors = tuple(getattr(botocore, name) for name in (
        "TokenRetrievalError", "SSOTokenLoadError", "UnauthorizedSSOTokenError")
        if hasattr(botocore, name))
    if token_errors and isinstance(exc, token_errors):
        return (f"the AWS SSO session{_in(env)} has expired or is missing: run `aws sso login` "
                "for your AWS_PROFILE, then run the same command again")
    if isinstance(exc, botocore.EndpointConnectionError | botocore.ConnectTimeoutError):
        return (f"cannot reach AWS{_in(env)} ({exc}); check AWS_ENDPOINT_URL, the region and "
                "the network")
    if not isinstance(exc, botocore.ClientError):
        return None
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), " ".join(str(error.get("Message", "")).split())
    if code.isdigit():  # a body the client could not parse (an emulator's or a proxy's XML)
        code, message = _tag("Code", message) or code, _tag("Message", message) or message
    operation = getattr(exc, "operation_name", "") or "the call"
    if code in EXPIRED:
        return (f"the AWS credentials{_in(env)} have expired ({code}): renew them (`aws sso "
                "login`, or fresh AWS_SESSION_TOKEN) and run the same command again")
    if code in INVALID:
        return f"AWS does not accept the credentials{_in(env)} ({code}): {SET_CREDENTIALS}"
    if code in DENIED:
        found = _PERFORM.search(message)
        action = found.group(1) if found else operation
        resource = found.group(2) if found and found.group(2) else None
        on = f" on {resource}" if resource else ""
        who = message.split(" is not authorized", 1)[0].removeprefix("User: ") \
            if " is not authorized" in message else "Rotor's identity"
        role = f" or environments.{env}.aws_role_arn" if env else ""
        return (f"AWS denied {action}{on}{_in(env)} ({code}): allow {action} for {who}"
                f"{role}; see 'Configuring AWS and Kubernetes' in the README")
    return None


def kube_contexts(config_file: str | None) -> tuple[Path, list[str]] | None:
    """The contexts a kubeconfig file names, or None when there is no file to read."""
    import os

    import yaml

    paths = (config_file or os.environ.get("KUBECONFIG") or
             str(Path.home() / ".kube" / "config")).split(os.pathsep)
    first: Path | None = None
    names: list[str] = []
    for name in paths:  # KUBECONFIG may list several files; kubectl merges them
        path = Path(name).expanduser()
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        first = first or path
        contexts = data.get("contexts") if isinstance(data, dict) else None
        names += [str(c.get("name")) for c in contexts or [] if isinstance(c, dict)]
    return None if first is None else (first, names)


def check_kube_context(env: str, context: str | None, config_file: str | None) -> None:
    """Refuse a kube context the kubeconfig does not name, in one line that says what to set."""
    if context is None:
        return
    found = kube_contexts(config_file)
    if found is None:
        raise ConfigError(f"no kubeconfig to find context {context!r} for {env} in: set "
                          "KUBECONFIG, or environments." + env + ".kubeconfig in rotor.yml")
    path, names = found
    if context not in names:
        known = ", ".join(names) or "none"
        raise ConfigError(f"unknown kube context {context!r} for {env} (contexts in {path}: "
                          f"{known}): set environments.{env}.kube_context, or KUBECONFIG")
