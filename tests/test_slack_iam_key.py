"""End to end from Slack: `/rotate key USER staging` against moto, to the grace period, where
"Reactivate old key" makes the old key active again.

Waiting for the switch-over takes hours of quiet, so this one runs `rotor serve`'s `Service` in
the test process with the rig's clock (the subprocess has only the real one), still answering
signed requests over HTTP. moto's server runs in this process too (tests.rig.moto_url), which
is what lets `use()` record a key's last use in its IAM backend, as AWS would.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime

import boto3
from moto.iam.models import AccessKeyLastUsed, iam_backends

from bot.serve import Service
from bot.settings import Settings
from demo.slack_api import FakeSlack
from rotation import iam
from tests.rig import AWS_ENV, REGION, Clock, moto_url
from tests.slackbot import GROUPS, BotProcess, assert_posted_once

ACCOUNT = "123456789012"  # moto's default: staging has no role to assume
CONFIG = """\
environments:
  staging: {aws_region: %(region)s}
iam_users:
  %(user)s:
    grace_days: 7
    environments:
      staging:
        secrets: [{id: %(secret)s}]
slack: {channel: "#govuk-developers"}
waits: {first_check: 0.02, max_check: 0.2}
key_age: {schedule: "0 0 29 2 *"}
"""


def use(key_id: str, at: float) -> None:
    """A consumer signed a request with the key at `at` (moto cannot know it did)."""
    iam_backends[ACCOUNT]["aws"].access_keys[key_id].last_used = AccessKeyLastUsed(
        timestamp=datetime.fromtimestamp(at, UTC), service="s3", region=REGION)


def test_rotate_a_key_from_slack_and_reactivate_the_old_one(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="rotor")  # as `rotor serve` logs
    moto = moto_url()
    for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": moto}.items():
        monkeypatch.setenv(key, value)
    user, secret_id = f"rotor-slack-{uuid.uuid4().hex[:8]}", f"govuk/{uuid.uuid4().hex[:8]}/aws"
    aws = {"endpoint_url": moto, "region_name": REGION}
    iam_client, sm = boto3.client("iam", **aws), boto3.client("secretsmanager", **aws)
    iam_client.create_user(UserName=user)
    old = iam_client.create_access_key(UserName=user)["AccessKey"]
    sm.create_secret(Name=secret_id, SecretString=json.dumps({
        "access_key_id": old["AccessKeyId"], "secret_access_key": old["SecretAccessKey"]}))
    (tmp_path / "rotor.yml").write_text(CONFIG % {"region": REGION, "user": user,
                                                  "secret": secret_id})

    clock = Clock()
    with FakeSlack(groups=dict(GROUPS)) as slack:
        bot = BotProcess(tmp_path, slack)
        service = Service(Settings.load(bot.env(ROTOR_EXTRA_KINDS="")), host="127.0.0.1",
                          clock=clock)
        service.start()
        try:
            bot.wait_for(lambda: bot.get("/readyz").status == 200, what="ready")
            bot.command(f"key {user} staging", user="U0ALICE")
            rotation_id = bot.wait_status(user, "staging", "active")["id"]
            bot.wait_step(user, "staging", "wait-for-switch", "waiting")
            keys = iam_client.list_access_keys(UserName=user)["AccessKeyMetadata"]
            (new_id,) = [k["AccessKeyId"] for k in keys if k["AccessKeyId"] != old["AccessKeyId"]]

            use(new_id, clock())  # the consumers moved to the new key; the old one went quiet
            clock.advance(iam.QUIET_SECONDS + 60)
            service.worker.wake()
            bot.click(bot.button(rotation_id, "approve", "deactivate"), user="U0BOB")
            bot.wait_step(user, "staging", "grace", "waiting")
            assert status(iam_client, user, old["AccessKeyId"]) == "Inactive"

            reactivate = bot.button(rotation_id, "request")
            assert reactivate["text"]["text"] == "Reactivate old key"
            assert reactivate["value"] == f"{rotation_id}:reactivate"
            assert "confirm" not in reactivate
            bot.click(reactivate, user="U0CAROL")
            bot.wait_step(user, "staging", "grace", "needs-approval")
            assert status(iam_client, user, old["AccessKeyId"]) == "Active"
            bot.click(reactivate, user="U0DAVE")  # the old button, once the step moved on
            refusal = bot.wait_reply("does not offer reactivate")
            assert refusal.startswith(":no_entry:") and "\n" not in refusal
            bot.thread_text(rotation_id, ":lock: Reactivate old key",
                            "<@U0CAROL> asked for `reactivate`")
            bot.wait_for(slack.everything, lambda sent: "reactivated by U0CAROL" in sent,
                         what="'reactivated by U0CAROL' in Slack")

            # The key-age check's "Rotate now" starts the next rotation of the user's key.
            rotate_now = {"action_id": "rotate_key_now", "value": f"{user} staging"}
            bot.click(rotate_now, user="U0ALICE")
            assert f"already has an active rotation (#{rotation_id}" in bot.wait_reply("already has")
            bot.command(f"cancel {rotation_id}", user="U0ALICE")
            bot.wait_status(user, "staging", "cancelled")
            bot.click(rotate_now, user="U0ALICE")
            started = bot.wait_reply(f"Started rotation #{rotation_id + 1}: iam-key {user}")
            assert started.startswith(":arrow_forward:")
        finally:
            service.stop()

        assert_posted_once(slack, rotation_id)
        new_secret = json.loads(sm.get_secret_value(
            SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"])
        assert new_secret["access_key_id"] == new_id
        for secret in (old["SecretAccessKey"], new_secret["secret_access_key"]):
            assert secret not in slack.everything()
            assert secret not in caplog.text


def status(client: object, user: str, key_id: str) -> str:
    keys = client.list_access_keys(UserName=user)["AccessKeyMetadata"]  # type: ignore[attr-defined]
    return str(next(k["Status"] for k in keys if k["AccessKeyId"] == key_id))
