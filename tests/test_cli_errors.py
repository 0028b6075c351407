"""Expected failures from the world: one line naming the environment and what to set, and
never a traceback (`rotor` as a subprocess, as a person meets it)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.aws_errors import FailingAws
from tests.rig import REPO, moto_client, moto_url, operator_env

CONFIG = """
environments:
  staging: {aws_region: eu-west-1, kube_context: KUBE_CONTEXT, db_tls: disabled}
apps:
  signon: {engine: mysql}
"""


def _run(tmp_path: Path, *args: str, context: str = "staging",
         **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "rotor.yml").write_text(CONFIG.replace("KUBE_CONTEXT", context))
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update({
        "ROTOR_CONFIG": str(tmp_path / "rotor.yml"), "ROTOR_STATE": str(tmp_path / "rotor.db"),
        "PYTHONPATH": str(REPO), "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true", "KUBECONFIG": str(tmp_path / "kubeconfig"),
        "ROTOR_LOG_LEVEL": "INFO",
    })
    base.update(env)
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], env=base,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # The log (INFO and up, timestamped) may come first; the person's answer is one line.
    lines = [line for line in result.stderr.strip().splitlines()
             if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ", line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rotor: ")
    return lines[0]


def _kubeconfig(tmp_path: Path, *contexts: str) -> None:
    (tmp_path / "kubeconfig").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": contexts[0],
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": c, "context": {"cluster": "c", "user": "u"}} for c in contexts]}))


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing"}


@pytest.mark.parametrize("command", [["plan", "signon", "staging"], ["keys", "staging"]])
def test_no_aws_credentials(tmp_path, command):
    line = _one_line(_run(tmp_path, *command, AWS_ENDPOINT_URL=moto_url()))
    assert "no AWS credentials for staging" in line
    assert "AWS_PROFILE" in line and "AWS_ACCESS_KEY_ID" in line


def test_expired_aws_credentials(tmp_path):
    with FailingAws("ExpiredTokenException",
                    "The security token included in the request is expired") as aws:
        line = _one_line(_run(tmp_path, "plan", "signon", "staging",
                              AWS_ENDPOINT_URL=aws.url, **CREDENTIALS))
    assert aws.requests, "Rotor never asked AWS"
    assert "AWS credentials for staging have expired (ExpiredTokenException)" in line
    assert "aws sso login" in line


def test_access_denied_names_the_action_and_resource(tmp_path):
    who = "arn:aws:sts::111111111111:assumed-role/developer/alice"
    message = (f"User: {who} is not authorized to perform: secretsmanager:GetSecretValue on "
               "resource: govuk/signon/mysql because no identity-based policy allows the "
               "secretsmanager:GetSecretValue action")
    with FailingAws("AccessDeniedException", message) as aws:
        line = _one_line(_run(tmp_path, "plan", "signon", "staging",
                              AWS_ENDPOINT_URL=aws.url, **CREDENTIALS))
    assert ("AWS denied secretsmanager:GetSecretValue on govuk/signon/mysql for staging "
            "(AccessDeniedException)") in line
    assert who in line and "environments.staging.aws_role_arn" in line


def test_access_denied_during_a_rotation_is_one_line_too(tmp_path):
    with FailingAws("AccessDeniedException", "User: x is not authorized to perform: "
                    "secretsmanager:GetSecretValue on resource: govuk/signon/mysql") as aws:
        _kubeconfig(tmp_path, "staging")
        line = _one_line(_run(tmp_path, "rotate", "signon", "staging",
                              AWS_ENDPOINT_URL=aws.url, **CREDENTIALS))
    assert "stopped at preflight: AWS denied secretsmanager:GetSecretValue on " \
           "govuk/signon/mysql for staging" in line


def test_unknown_kube_context(tmp_path):
    _kubeconfig(tmp_path, "staging", "production")
    result = _run(tmp_path, "rotate", "signon", "stagin", context="stagng",
                  AWS_ENDPOINT_URL=moto_url(), **CREDENTIALS)
    assert "unknown environment 'stagin' (did you mean 'staging'?)" in _one_line(result)
    line = _one_line(_run(tmp_path, "rotate", "signon", "staging", context="stagng",
                          AWS_ENDPOINT_URL=moto_url(), **CREDENTIALS))
    assert "unknown kube context 'stagng' for staging" in line
    assert "staging, production" in line and "environments.staging.kube_context" in line
    status = _run(tmp_path, "status", context="stagng")
    assert status.returncode == 0 and "no rotations yet" in status.stdout  # nothing started


def test_unreachable_database(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sm = moto_client("secretsmanager")
    suffix = os.urandom(3).hex()
    app = f"unreach{suffix}"
    sm.create_secret(Name=f"govuk/{app}/mysql", SecretString=json.dumps(
        {"host": "127.0.0.1", "port": port, "dbname": "x", "username": "u", "password": "p"}))
    sm.create_secret(Name=f"staging-rds-admin-passwords-{suffix}",
                     SecretString=json.dumps({app: "adminpw"}))
    config = CONFIG.replace("signon: {engine: mysql}", f"{app}: {{engine: mysql, admin_secret: "
                            f"staging-rds-admin-passwords-{suffix}}}")
    (tmp_path / "rotor.yml").write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "plan", app, "staging"],
        env={**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": moto_url(),
             "ROTOR_CONFIG": str(tmp_path / "rotor.yml"), "PYTHONPATH": str(REPO),
             "ROTOR_STATE": str(tmp_path / "rotor.db")},
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    line = _one_line(result)
    assert f"cannot reach the staging database: 127.0.0.1:{port} does not answer" in line
    assert "`host` and `port` in the app's secret" in line
    assert "adminpw" not in result.stderr


def test_the_trace_goes_to_the_log_at_debug(tmp_path):
    result = _run(tmp_path, "keys", "staging", AWS_ENDPOINT_URL=moto_url(),
                  ROTOR_LOG_LEVEL="DEBUG")
    assert result.returncode == 1
    assert "NoCredentialsError" in result.stderr and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("rotor: no AWS credentials")


def test_version():
    result = subprocess.run([sys.executable, "-m", "bot.cli", "--version"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and re.fullmatch(r"rotor \d+\.\d+\.\d+\n", result.stdout)


HEAVY = {"boto3", "botocore", "kubernetes", "pydantic", "yaml", "pymysql", "psycopg",
         "apscheduler", "slack_sdk", "slack_bolt", "sqlite_utils"}
PROBE = """
import sys
from bot.cli import main
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    print(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(","))))
"""


@pytest.mark.parametrize("command", [["--help"], ["status"]])
def test_help_and_status_import_no_kind_and_no_client(tmp_path, command):
    """What keeps them fast (benchmarks/cli_startup.py measures it)."""
    from rotation.store import Store

    Store(str(tmp_path / "rotor.db"), clock=lambda: 0.0)  # a state DB for status to read
    result = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(sorted(HEAVY)), *command], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "ROTOR_STATE": str(tmp_path / "rotor.db"),
             "ROTOR_CONFIG": str(REPO / "rotor.yml")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_a_long_wait_parks_and_rotor_request_rolls_back(tmp_path):
    """Without --follow, `rotor rotate-secret` returns at the hour-long grace period, saying
    until when and how to resume; `rotor request ID roll-back` does what the button does."""
    env = {"ROTOR_EXTRA_KINDS": "tests.parking_kind:KINDS", **operator_env("alice")}
    parked = _run(tmp_path, "rotate-secret", "demo-secret", "staging", **env)
    assert parked.returncode == 3, parked.stdout + parked.stderr
    assert "rotation #1 is parked at grace: it waits for the grace period to end; Rotor " \
           "checks again at " in parked.stdout
    assert "meanwhile: `rotor request 1 roll-back`" in parked.stdout
    assert "resume: `rotor rotate-secret demo-secret staging`" in parked.stdout

    again = _run(tmp_path, "rotate-secret", "demo-secret", "staging", **env)
    assert again.returncode == 3 and "resuming rotation #1" in again.stdout

    refused = _run(tmp_path, "request", "1", "reactivate", **env)
    assert "rotation #1 does not offer reactivate now" in _one_line(refused)
    rolled = _run(tmp_path, "request", "1", "roll-back", **env)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "rolled back by arn:aws:sts::" in rolled.stdout and "/alice" in rolled.stdout
    assert "rotation #1 done" in rolled.stdout


def test_follow_stays_through_a_long_wait(tmp_path):
    (tmp_path / "rotor.yml").write_text(CONFIG.replace("KUBE_CONTEXT", "staging"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "rotate-secret", "s", "staging", "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "ROTOR_CONFIG": str(tmp_path / "rotor.yml"),
             "ROTOR_STATE": str(tmp_path / "rotor.db"), "PYTHONPATH": str(REPO),
             "PYTHONUNBUFFERED": "1", "ROTOR_EXTRA_KINDS": "tests.parking_kind:KINDS",
             **operator_env("alice")})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test's timeout
            if line.startswith("… grace: waiting for the grace period to end"):
                break
        assert proc.poll() is None, "rotor --follow left the wait"
    finally:
        proc.kill()
        proc.wait()
