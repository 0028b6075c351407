"""Fleets in Slack, through signed requests to `rotor serve` and the fake Web API: the plan
with one Confirm (four-eyes in production), one root message with the apps' table, "Approve
all" per gate, and far fewer Slack calls than the same apps rotated one by one."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from demo.slack_api import FakeSlack, Message
from handlers.commands import parse
from tests.slackbot import BotProcess, running_bot
from tests.test_slack_commands import CATALOGUE, KINDS

POSTS = ("chat.postMessage", "chat.update")


@pytest.fixture(scope="module")
def bot(slack, tmp_path_factory) -> Iterator[BotProcess]:
    with running_bot(tmp_path_factory.mktemp("fleet"), slack) as process:
        yield process


@pytest.mark.parametrize("text, apps, env, params", [
    ("all staging", None, "staging", {}),
    ("ALL production --compromised", None, "production", {"compromised": True}),
    ("signon,signon staging", ("signon",), "staging", {}),
])
def test_the_fleet_grammar(text, apps, env, params):
    command = parse(text, CATALOGUE, {"mysql": object(), "postgres": object()})
    assert (command.verb, command.apps, command.env, command.params, command.reply) == (
        "all", apps, env, params, None)


@pytest.mark.parametrize("text, reply", [
    ("all moon", "unknown environment 'moon'"),
    ("signon,signn staging", "unknown subcommand or app `signn` (did you mean `signon`?)"),
    ("all", "Usage"),
    ("all staging --cleanup", "--cleanup"),
    ("signon,publisher staging", "postgres"),  # no postgres kind here: refused, not started
])
def test_bad_fleet_input_is_answered_at_once(text, reply):
    command = parse(text, CATALOGUE, KINDS)
    assert command.reply is not None and reply in command.reply


def _calls(slack: FakeSlack) -> int:
    return sum(len(slack.calls_to(m)) for m in POSTS)


def _fleet_root(bot: BotProcess, fleet_id: int, showing: str) -> Message:
    def find() -> Message | None:
        for message in bot.slack.roots():
            if f"fleet #{fleet_id}:" in message.text and showing in message.everything():
                return message
        return None
    found = bot.wait_for(find, lambda m: m is not None, what=f"fleet #{fleet_id} {showing!r}")
    assert found is not None
    return found


def _button(message: Message, action_id: str) -> dict:
    return next(b for b in message.buttons() if b["action_id"] == action_id)


def _waiting(bot: BotProcess, apps: list[str], step: str) -> None:
    marks = ", ".join("?" for _ in apps)
    bot.wait_rows("SELECT COUNT(*) FROM steps s JOIN rotations r ON r.id = s.rotation_id "
                  f"WHERE s.name = ? AND s.status = 'needs-approval' AND r.target IN ({marks})",
                  step, *apps, until=lambda rows: rows == [(len(apps),)],
                  what=f"{len(apps)} apps waiting at {step}")


def _single(bot: BotProcess, app: str) -> int:
    """Slack calls of one production rotation, driven by its own buttons."""
    before = _calls(bot.slack)
    bot.command(f"{app} production", user="U0ALICE")
    rotation = bot.wait_status(app, "production", "active")
    rid = int(rotation["id"])
    bot.wait_step(app, "production", "switch", "needs-approval")
    bot.click(bot.button(rid, "approve", "switch"), user="U0BOB")
    bot.wait_step(app, "production", "drop-old-user", "needs-approval")
    bot.click(bot.button(rid, "approve", "drop-old-user"), user="U0BOB")
    bot.wait_status(app, "production", "done")
    bot.message(rid, ":tada:")
    return _calls(bot.slack) - before


def test_a_production_fleet_confirmed_by_two_approved_per_gate_in_few_calls(bot, slack, apps):
    single = _single(bot, apps())
    members = [apps() for _ in range(5)]
    before = _calls(slack)
    bot.command(f"{','.join(members)} production", user="U0ALICE")
    assert "nothing runs until it is confirmed" in bot.wait_reply("Planned fleet #")
    fleet_id = int(bot.rows("SELECT MAX(id) FROM fleets")[0][0])
    plan = _fleet_root(bot, fleet_id, "the plan")
    for app in members:
        assert f"`{app}`" in plan.everything()
    assert bot.rows("SELECT COUNT(*) FROM rotations WHERE fleet_id = ?", fleet_id) == [(0,)]

    bot.click(_button(plan, "fleet_confirm"), user="U0ALICE")  # the planner: step one of two
    second = _fleet_root(bot, fleet_id, "Confirm (second person)")
    bot.click(_button(second, "fleet_confirm"), user="U0ALICE")
    assert "needs a second person" in bot.wait_reply("needs a second person")
    assert bot.rows("SELECT COUNT(*) FROM rotations WHERE fleet_id = ?", fleet_id) == [(0,)]
    bot.click(_button(second, "fleet_confirm"), user="U0BOB")
    bot.wait_rows("SELECT COUNT(*) FROM rotations WHERE fleet_id = ?", fleet_id,
                  until=lambda rows: rows == [(5,)], what="the fleet's 5 rotations")

    _waiting(bot, members, "switch")
    table = _fleet_root(bot, fleet_id, "Approve all 5 switch")
    approve = _button(table, "fleet_approve")
    shown = json.loads(approve["value"])["shown"]
    ids = [r[0] for r in bot.rows("SELECT id FROM rotations WHERE fleet_id = ?", fleet_id)]
    assert sorted(int(k) for k in shown) == sorted(ids)  # each app, with its gate's digest
    bot.click(approve, user="U0ALICE")  # the starter: four-eyes refuses
    assert "second person" in bot.wait_reply("cannot approve")
    bot.click(approve, user="U0BOB")
    assert "for 5 of 5 apps" in bot.wait_reply("Approved `switch`")

    _waiting(bot, members, "drop-old-user")
    drop = _button(_fleet_root(bot, fleet_id, "Approve all 5 drop-old-user"), "fleet_approve")
    assert drop["confirm"]["title"]["text"].startswith("Approve all 5 drop-old-user")
    bot.click(drop, user="U0BOB")
    for app in members:
        bot.wait_status(app, "production", "done")
    done = _fleet_root(bot, fleet_id, ": done")
    fleet_calls = _calls(slack) - before

    # The fleet's message only ever shows the fleet: no member writes its own root over it.
    updates = [c for c in slack.calls_to("chat.update") if c.params.get("ts") == done.ts]
    assert len(updates) >= 3
    assert all(f"fleet #{fleet_id}:" in c.params["text"] for c in updates), [
        c.params["text"][:60] for c in updates]

    # One 2nd line notice for the fleet's drop, naming every app, before any app dropped.
    notices = [m for m in slack.channel_messages("#govuk-2ndline") if f"fleet #{fleet_id}" in m.text]
    assert len(notices) == 1, [m.text for m in notices]
    assert all(app in notices[0].text for app in members)
    for app in members:
        rid = bot.rotation(app, "production")["id"]
        rows = bot.rows("SELECT event, step, to_status FROM audit WHERE rotation_id = ? "
                        "ORDER BY id", rid)
        assert rows.index(("second-line-notified", "drop-old-user", None)) < rows.index(
            ("step", "drop-old-user", "done"))

    # One root message for the fleet; no member has a root or per-step replies of its own.
    roots = [m for m in slack.roots() if any(f"`{a}`" in m.everything() or a in m.text
                                             for a in members)
             and m.channel == slack.channels.get("#govuk-developers", m.channel)]
    assert len([m for m in roots if "fleet #" in m.text]) == 1
    assert not [m for m in roots if "fleet #" not in m.text]
    assert fleet_calls * 2 < 5 * single, (fleet_calls, single)
    print(f"\nSlack posts+updates: one production rotation {single}, "
          f"5 one by one ~{5 * single}, a fleet of 5 {fleet_calls}")


def _in_thread(bot: BotProcess, root: Message, rotation_id: int, action_id: str,
               step: str | None = None) -> dict:
    """A fleet member's button in its fleet's thread (a member has no root of its own)."""
    def find() -> dict | None:
        for message in reversed(bot.slack.thread(root)):
            for button in message.buttons():
                value = json.loads(button["value"])
                if (button["action_id"] == action_id and value.get("rotation") == rotation_id
                        and (step is None or value.get("step") == step)):
                    return button
        return None
    found = bot.wait_for(find, lambda b: b is not None,
                         what=f"a {action_id} button for #{rotation_id} in the fleet's thread")
    assert found is not None
    return found


def _approve_the_drop(bot: BotProcess, members: list[str]) -> tuple[int, Message]:
    """A production fleet of `members`, confirmed by two and approved at both gates by
    "Approve all"; its id and its table."""
    (before,), = bot.rows("SELECT COALESCE(MAX(id), 0) FROM fleets")
    bot.command(f"{','.join(members)} production", user="U0ALICE")
    bot.wait_rows("SELECT COALESCE(MAX(id), 0) FROM fleets",
                  until=lambda rows: rows[0][0] > before, what="the new fleet")
    fleet_id = int(bot.rows("SELECT MAX(id) FROM fleets")[0][0])
    bot.click(_button(_fleet_root(bot, fleet_id, "the plan"), "fleet_confirm"), user="U0ALICE")
    bot.click(_button(_fleet_root(bot, fleet_id, "Confirm (second person)"), "fleet_confirm"),
              user="U0BOB")
    _waiting(bot, members, "switch")
    bot.click(_button(_fleet_root(bot, fleet_id, f"Approve all {len(members)} switch"),
                      "fleet_approve"), user="U0BOB")
    _waiting(bot, members, "drop-old-user")
    table = _fleet_root(bot, fleet_id, f"Approve all {len(members)} drop-old-user")
    bot.click(_button(table, "fleet_approve"), user="U0BOB")
    return fleet_id, table


def test_a_retried_fleet_member_needs_a_new_notice_of_its_own(bot, slack, apps):
    """One notice covers one approval: the member whose drop failed and was retried is
    approved again in the thread, and 2nd line is told again, naming it, before it drops."""
    first, second = apps(), apps()
    bot.control.mkdir(exist_ok=True)
    fail = bot.control / f"fail-drop-{second}"
    fail.write_text("")
    fleet_id, table = _approve_the_drop(bot, [first, second])
    bot.wait_status(first, "production", "done")
    bot.wait_step(second, "production", "drop-old-user", "failed")
    rid = int(bot.rotation(second, "production")["id"])

    def notices() -> list[Message]:
        return [m for m in slack.channel_messages("#govuk-2ndline")
                if f"fleet #{fleet_id}" in m.text]
    assert len(notices()) == 1 and second in notices()[0].text

    fail.unlink()
    bot.click(_in_thread(bot, table, rid, "retry"), user="U0BOB")
    bot.wait_step(second, "production", "drop-old-user", "needs-approval")
    bot.click(_in_thread(bot, table, rid, "approve", "drop-old-user"), user="U0BOB")
    bot.wait_status(second, "production", "done")
    again = bot.wait_for(notices, lambda found: len(found) == 2, what="a second notice")
    assert second in again[1].text and first not in again[1].text.split(". ")[0]
    rows = bot.rows("SELECT event, to_status, detail FROM audit WHERE rotation_id = ? "
                    "AND step = 'drop-old-user' ORDER BY id", rid)
    events = [(event, to_status) for event, to_status, _ in rows]
    told = [i for i, (event, _) in enumerate(events) if event == "second-line-notified"]
    approved = [i for i, (event, _) in enumerate(events) if event == "approved"]
    done = events.index(("step", "done"))
    assert len(told) == 2 and len(approved) == 2, events
    assert approved[1] < told[1] < done  # the retry's approval, then its own notice, then drop
    assert rows[told[0]][2] != rows[told[1]][2]  # a different notice's link


def test_hold_on_the_fleets_one_notice_holds_every_app_it_names(tmp_path, apps):
    """2nd line sees one notice naming every app "Approve all" approved at the drop; its Hold
    stops them all (before the hold period, or before an app picked up the notice's link),
    and a click that finds nothing left to hold says so, app by app."""
    members = [apps() for _ in range(3)]
    with running_bot(tmp_path, hold=600) as bot:  # far longer than the test takes
        fleet_id, _ = _approve_the_drop(bot, members)
        notice = bot.wait_for(
            lambda: [m for m in bot.slack.channel_messages("#govuk-2ndline")
                     if f"fleet #{fleet_id}" in m.text and m.buttons()],
            lambda found: len(found) == 1, what="the fleet's one 2nd line notice")[0]
        assert all(app in notice.text for app in members)
        hold = _button(notice, "hold")
        bot.click(hold, user="U0ERIN")  # 2nd line, in neither list

        for app in members:
            bot.wait_step(app, "production", "drop-old-user", "needs-approval")
            rid = bot.rotation(app, "production")["id"]
            assert bot.rows("SELECT actor, to_status FROM audit WHERE rotation_id = ? AND "
                            "event = 'held' AND step = 'drop-old-user'", rid) == [
                ("U0ERIN", "needs-approval")]
        assert bot.rows("SELECT COUNT(*) FROM audit WHERE step = 'drop-old-user' AND "
                        "to_status = 'done'") == [(0,)]

        bot.click(hold, user="U0ERIN")  # again: every app is held already
        again = bot.wait_reply("Could not hold")
        assert "Held `drop-old-user` for 0 of 3 apps (none)" in again
        assert all(f"rotation #{bot.rotation(app, 'production')['id']} step drop-old-user"
                   in again for app in members)
