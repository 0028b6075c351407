"""Drift: what the code handles must be in manifest.yml (so Slack sends it) and the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from handlers import actions, commands, messages

REPO = Path(__file__).resolve().parent.parent
MANIFEST_TEXT = (REPO / "manifest.yml").read_text()
MANIFEST = yaml.safe_load(MANIFEST_TEXT)
README = (REPO / "README.md").read_text()
SUBCOMMANDS = sorted({*commands.WORK, *commands.OTHER_KINDS, "help"} - {"start"})


def test_the_code_and_its_constants_agree():
    assert set(actions.WORK) == set(messages.ACTIONS)
    assert set(commands.WORK) - {"start"} <= set(commands.VERBS)
    assert set(commands.OTHER_KINDS) <= set(commands.VERBS)


def test_the_manifest_declares_the_command_its_subcommands_and_events():
    (command,) = MANIFEST["features"]["slash_commands"]
    assert command["command"] == messages.COMMAND
    hint = command["usage_hint"]
    assert hint.startswith("APP ENV [--compromised]")
    for sub in SUBCOMMANDS:
        assert f"| {sub}" in hint, f"manifest.yml's usage_hint lacks {sub!r}"
    settings = MANIFEST["settings"]
    assert settings["interactivity"]["is_enabled"] is True
    assert settings["socket_mode_enabled"] is True
    assert settings["event_subscriptions"]["bot_events"] == ["app_home_opened"]
    assert MANIFEST["features"]["app_home"]["home_tab_enabled"] is True
    scopes = set(MANIFEST["oauth_config"]["scopes"]["bot"])
    assert {"commands", "chat:write", "chat:write.public", "usergroups:read",
            "channels:history"} <= scopes


@pytest.mark.parametrize("action_id", messages.ACTIONS)
def test_every_button_is_listed_in_the_manifest(action_id):
    listed = MANIFEST_TEXT.split("action_id values:")[1].split("\n_metadata")[0]
    assert action_id in listed.replace(",", " ").replace(".", " ").split()


@pytest.mark.parametrize("sub", ["APP ENV", *SUBCOMMANDS])
def test_every_subcommand_is_in_the_readme(sub):
    assert f"/rotate {sub}" in README, f"README.md does not mention `/rotate {sub}`"


@pytest.mark.parametrize("action_id", messages.ACTIONS)
def test_every_button_is_in_the_readme(action_id):
    assert f"`{action_id}`" in README, f"README.md does not mention the `{action_id}` button"


# The bot scopes each Web API method Rotor calls needs (https://api.slack.com/methods).
SCOPES = {
    "chat_postMessage": {"chat:write", "chat:write.public"},  # public channels uninvited
    "chat_update": {"chat:write"},
    "chat_postEphemeral": {"chat:write"},
    "chat_getPermalink": set(),
    "conversations_history": {"channels:history", "groups:history"},
    "conversations_replies": {"channels:history", "groups:history"},
    "conversations_join": {"channels:join"},
    "conversations_list": {"channels:read", "groups:read"},
    "usergroups_users_list": {"usergroups:read"},
    "views_publish": set(),
    "auth_test": set(),
}
METHOD = re.compile(r"\b((?:chat|conversations|usergroups|views|auth|users|reactions|files|"
                    r"apps|bots|pins|reminders|dnd|emoji|search|stars)_[a-z][A-Za-z_]*)\b")


def test_the_manifest_scopes_are_exactly_what_the_web_api_calls_need():
    called = set()
    for path in [*(REPO / "bot").glob("*.py"), *(REPO / "handlers").glob("*.py")]:
        called |= set(METHOD.findall(path.read_text()))
    unknown = called - set(SCOPES)
    assert not unknown, f"add the scopes of {sorted(unknown)} to SCOPES and manifest.yml"
    needed = {"commands"}.union(*(SCOPES[method] for method in called))
    assert set(MANIFEST["oauth_config"]["scopes"]["bot"]) == needed
