"""Telling 2nd line before anything destructive runs, through Slack's Web API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bot.settings import Settings
from rotation.errors import StepFailed
from rotation.store import RotationRow, StepRow


class SlackSecondLine:
    """Posts the 2nd line notice; returns a link to it (the step waits until this returns)."""

    def __init__(self, client: Any, channel: str, group: str | None = None,
                 thread_link: Any = None) -> None:
        self.client = client
        self.channel = channel
        self.group = group
        self.thread_link = thread_link or (lambda rotation: None)

    def notify(self, rotation: RotationRow, step: StepRow, summary: str,
               approved_by: str) -> str:
        from handlers import messages

        link = self.thread_link(rotation)
        text, blocks = messages.second_line_notice(rotation, step, summary, approved_by,
                                                   self.group, link)
        response = self.client.chat_postMessage(channel=self.channel, text=text, blocks=blocks)
        try:
            permalink = self.client.chat_getPermalink(channel=response["channel"],
                                                      message_ts=response["ts"])["permalink"]
        except Exception:  # the notice is posted; a missing link does not un-post it
            permalink = f"{response['channel']}/{response['ts']}"
        return str(permalink)


class OperatorSecondLine:
    """Break glass without Slack: the operator tells 2nd line and records how.

    `told` comes from `--second-line-told`; otherwise a terminal is asked. Without either
    the destructive step does not run.
    """

    def __init__(self, told: str | None, ask: Callable[[str], str] | None) -> None:
        self.told = told
        self.ask = ask

    def notify(self, rotation: RotationRow, step: StepRow, summary: str,
               approved_by: str) -> str:
        if self.told:
            return f"told by the operator: {self.told}"
        if self.ask is not None:
            answer = self.ask(f"2nd line must be told first: {summary} (approved by "
                              f"{approved_by}). How did you tell them?").strip()
            if answer:
                return f"told by the operator: {answer}"
        raise StepFailed("2nd line must be told before this destructive step: set "
                         "SLACK_BOT_TOKEN, or say how you told them with --second-line-told")


def second_line_for_cli(settings: Settings, told: str | None = None,
                        ask: Callable[[str], str] | None = None) -> SlackSecondLine | OperatorSecondLine:
    """With a bot token the CLI tells 2nd line through Slack; without, the operator does."""
    if not settings.slack_bot_token:
        return OperatorSecondLine(told, ask)
    from bot.slack import web_client

    client = web_client(settings.slack_bot_token, settings.slack_api_url)
    slack = settings.catalogue.slack
    return SlackSecondLine(client, slack.second_line_channel, slack.second_line_group)
