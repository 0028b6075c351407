"""End to end from Slack: `/rotate secret ID staging` through the secret's own rotation function,
its consumers redeployed, then "Roll back" pressed in the grace period.

moto's server runs in this test process (tests.rig.moto_url), so the rotation function
(`RotationLambda`) and the ECS deployment controller (`EcsDeployments`) installed here serve
the `rotor serve` subprocess too.
"""

from __future__ import annotations

import json

from demo.slack_api import FakeSlack
from tests.rig import EcsDeployments, RotationLambda
from tests.slackbot import GROUPS, BotProcess, assert_posted_once
from tests.test_managed_secret import AlternatingUsers


def test_rotate_a_secret_from_slack_and_roll_it_back(world, monkeypatch):
    service = world.ecs_service()
    config = json.loads(world.config_path.read_text())
    config["secrets"] = {world.secret_id(): {"rollback_minutes": 30, "environments": {
        "staging": {"external_secrets": [world.external_secret], "deployments": [world.app],
                    "ecs_services": [service]}}}}
    world.config_path.write_text(json.dumps(config, indent=2))
    deployments = EcsDeployments(world.clock).install(monkeypatch)
    handler = AlternatingUsers(world)
    function = RotationLambda(world.moto, f"{world.app}-rotate", handler).install(monkeypatch)
    world.sm().rotate_secret(SecretId=world.secret_id(), RotationLambdaARN=function.arn,
                             RotationRules={"AutomaticallyAfterDays": 30})
    function.idle()
    before = world.current()

    rig_env = {k: v for k, v in world.env().items() if k.startswith(("AWS_", "KUBECONFIG"))}
    with FakeSlack(groups=dict(GROUPS)) as slack:
        bot = BotProcess(world.workdir, slack).start(ROTOR_EXTRA_KINDS="", **rig_env)
        try:
            bot.command(f"secret {world.secret_id()} staging", user="U0ALICE")
            rotation_id = bot.wait_status(world.secret_id(), "staging", "active")["id"]
            roll_back = bot.button(rotation_id, "request")
            assert roll_back["text"]["text"] == "Roll back"
            assert roll_back["value"] == f"{rotation_id}:rollback"
            assert roll_back["confirm"]["confirm"]["text"] == "Roll back"
            rotated = world.current()
            assert rotated["username"] != before["username"]

            before_click = bot.changes()
            bot.click(roll_back, user="U0MALLORY")  # staging: anyone may
            bot.wait_status(world.secret_id(), "staging", "done")
            assert bot.changes() != before_click
            bot.thread_text(rotation_id, ":lock: Roll back", "rolled back by U0MALLORY",
                            "asked for `rollback`", ":tada:")
        finally:
            bot.stop()
            function.stop()

        rotation = bot.rotation(world.secret_id(), "staging")
        assert rotation is not None and rotation["steps"]["grace"] == "done"
        assert all(not m.buttons() for m in bot.thread(rotation_id) if "Roll back" in m.text)
        assert world.current() == before  # AWSCURRENT is the version before the rotation
        world.login(world.current())
        assert len(deployments.forced) == 2  # after the rotation, and after the roll back
        assert_posted_once(slack, rotation_id)
        everything, log = slack.everything(), bot.log()
        for password in (before["password"], rotated["password"]):
            assert password not in everything and password not in log
