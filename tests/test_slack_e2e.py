"""End to end: a real MySQL rotation driven from Slack, against MariaDB, moto and fake Kubernetes."""

from __future__ import annotations

from demo.slack_api import FakeSlack
from rotation.mysql import KIND
from tests.rig import rig
from tests.slackbot import GROUPS, BotProcess, assert_posted_once

STEPS = [s.name for s in KIND.steps(None, "x", "staging", {})]  # type: ignore[arg-type]


def test_rotate_from_slack_with_two_approvers_and_no_password_anywhere(tmp_path):
    with rig("mysql", tmp_path) as world, FakeSlack(groups=dict(GROUPS)) as slack:
        app, db, old = world.app, world.box.database, world.box.app_user
        with world.box.root().cursor() as cur:  # makes a first gate: re-define this view
            cur.execute(f"CREATE DEFINER=%s@'%%' VIEW `{db}`.v AS SELECT 1 AS one", (old,))
        rig_env = {k: v for k, v in world.env().items() if k.startswith(("AWS_", "KUBECONFIG"))}
        bot = BotProcess(world.workdir, slack, log_level="DEBUG").start(ROTOR_EXTRA_KINDS="",
                                                                      **rig_env)
        try:
            bot.command(f"{app} staging", user="U0ALICE")
            rotation_id = bot.wait_status(app, "staging", "active")["id"]
            bot.click(bot.button(rotation_id, "approve", "redefine"), user="U0BOB")
            bot.click(bot.button(rotation_id, "approve", "drop-old-user"),
                      user="U0CAROL")
            bot.wait_status(app, "staging", "done")
            bot.thread_text(rotation_id, ":tada:", "Approved by <@U0BOB>",
                            "Approved by <@U0CAROL>")
            bot.root_for(rotation_id, "10/10 done")
        finally:
            bot.stop()

        thread = "\n".join(bot.thread_text(rotation_id))
        for step in STEPS:
            assert f"`{step}` done" in thread or f"`{step}` skipped" in thread, step
        assert_posted_once(slack, rotation_id)

        new = world.current()
        assert new["username"] != old
        world.login(new)
        everything, log = slack.everything(), bot.log()
        for password in (new["password"], world.box.app_password, world.box.admin_password):
            assert password not in everything
            assert password not in log
