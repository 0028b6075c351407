"""End to end: a real PostgreSQL rotation driven from Slack, against PostgreSQL, moto and fake
Kubernetes: the owner-role conversion and the retirement approved by two other people."""

from __future__ import annotations

from demo.slack_api import FakeSlack
from tests.rig import rig
from tests.slackbot import GROUPS, BotProcess, assert_posted_once


def test_rotate_a_postgres_app_from_slack_with_two_approvers(tmp_path):
    with rig("postgres", tmp_path) as world, FakeSlack(groups=dict(GROUPS)) as slack:
        box, old = world.box, world.box.app_user
        with box.connect(old, box.app_password) as conn:  # the app user owns a table: convert
            conn.execute("CREATE TABLE public.users (id bigserial PRIMARY KEY, email text)")
        rig_env = {k: v for k, v in world.env().items() if k.startswith(("AWS_", "KUBECONFIG"))}
        bot = BotProcess(world.workdir, slack).start(ROTOR_EXTRA_KINDS="", **rig_env)
        try:
            bot.command(f"{world.app} staging", user="U0ALICE")
            rotation_id = bot.wait_status(world.app, "staging", "active")["id"]
            bot.click(bot.button(rotation_id, "approve", "convert"), user="U0BOB")
            bot.click(bot.button(rotation_id, "approve", "retire"), user="U0CAROL")
            bot.wait_status(world.app, "staging", "done")
            bot.root_for(rotation_id, "9/9 done")
            bot.thread_text(rotation_id, ":tada:", "Approved by <@U0BOB>",
                            "Approved by <@U0CAROL>")
        finally:
            bot.stop()

        thread = "\n".join(bot.thread_text(rotation_id))
        steps = bot.rows("SELECT name FROM steps WHERE rotation_id = ?", rotation_id)
        for (step,) in steps:
            assert f"`{step}` done" in thread or f"`{step}` skipped" in thread, step
        assert_posted_once(slack, rotation_id)

        new = world.current()
        assert new["username"] != old and old not in world.users()
        world.login(new)
        everything, log = slack.everything(), bot.log()
        for password in (new["password"], box.app_password, box.admin_password):
            assert password not in everything
            assert password not in log
