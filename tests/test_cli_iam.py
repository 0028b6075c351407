"""`rotor rotate-key` as a subprocess against moto's server: up to the persisted wait for the
new key to take over, where it parks (or, with --follow, waits until Ctrl-C), resumable."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading

from tests.rig import AWS_ENV, REPO, moto_client, moto_url
from tests.waiting import wait_for


def _rotate_until_waiting(cmd: list[str], env: dict[str, str]) -> str:
    """Run `rotor rotate-key` until it says it waits for the switch, then press Ctrl-C."""
    # A shell's background job (`make test &`, nohup) starts with SIGINT ignored, and Python
    # keeps an ignored SIGINT: give the child Ctrl-C back, as a terminal would.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    def printed() -> list[str]:
        assert proc.poll() is None, proc.communicate()
        return list(lines)

    wait_for(printed, lambda out: any(line.startswith("… wait-for-switch: waiting for")
                                      for line in out), what="rotor to wait for the switch")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    reader.join(timeout=5)
    out = "".join(lines)
    assert proc.returncode == 130, f"{proc.returncode}: {out}{err}"
    assert "resumable" in err
    return out + err


def test_rotate_key_from_the_cli_waits_for_the_switch_and_resumes(tmp_path):
    url = moto_url()
    user, secret_id = f"rt{secrets.token_hex(3)}-logs", f"govuk/rt{secrets.token_hex(3)}/aws"
    iam, sm = moto_client("iam", url), moto_client("secretsmanager", url)
    iam.create_user(UserName=user)
    old = iam.create_access_key(UserName=user)["AccessKey"]
    sm.create_secret(Name=secret_id, SecretString=json.dumps(
        {"access_key_id": old["AccessKeyId"], "secret_access_key": old["SecretAccessKey"]}))
    config = tmp_path / "rotor.yml"
    config.write_text(json.dumps({
        "environments": {"staging": {"aws_region": "eu-west-1"}},
        "iam_users": {user: {"environments": {"staging": {"secrets": [{"id": secret_id}]}}}},
    }))
    state = tmp_path / "rotor.db"
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": url, "ROTOR_CONFIG": str(config),
           "ROTOR_STATE": str(state), "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bot.cli", "rotate-key", user, "staging", "--yes"]

    parked = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert parked.returncode == 3, parked.stdout + parked.stderr  # parked, not failed
    first = parked.stdout
    assert f"started rotation #1: iam-key {user} in staging" in first
    assert "rotation #1 is parked at wait-for-switch" in first
    assert f"resume: `rotor rotate-key {user} staging`" in first
    keys = {k["AccessKeyId"]: k["Status"] for k in
            iam.list_access_keys(UserName=user)["AccessKeyMetadata"]}
    new = next(k for k in keys if k != old["AccessKeyId"])
    assert keys == {old["AccessKeyId"]: "Active", new: "Active"}  # nothing deactivated yet
    current = json.loads(sm.get_secret_value(SecretId=secret_id,
                                             VersionStage="AWSCURRENT")["SecretString"])
    assert current["access_key_id"] == new
    assert current["secret_access_key"] not in first and old["SecretAccessKey"] not in first

    again = _rotate_until_waiting([*cmd, "--follow"], env)
    assert "resuming rotation #1" in again
    assert len(iam.list_access_keys(UserName=user)["AccessKeyMetadata"]) == 2  # no third key
    status = subprocess.run([sys.executable, "-m", "bot.cli", "status", "1"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert "wait-for-switch" in status.stdout and "waiting" in status.stdout


def test_every_resume_command_names_the_command_of_the_rotations_kind():
    from types import SimpleNamespace

    from bot.cli import resume_command

    def row(kind: str, **params: object) -> object:
        return SimpleNamespace(id=7, kind=kind, target="t", env="staging", params=params)

    assert resume_command(row("iam-key")) == "rotor rotate-key t staging"
    assert resume_command(row("secret")) == "rotor rotate-secret t staging"
    assert resume_command(row("rds-admin")) == "rotor rotate-admin t staging"
    assert resume_command(row("mysql")) == "rotor rotate t staging"
    assert resume_command(row("postgres", compromised=True)) == \
        "rotor rotate t staging --compromised"
    assert resume_command(row("plugin-kind")) == "rotor status 7"
