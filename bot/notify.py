"""Telling 2nd line before anything destructive runs, through Slack's Web API."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from slack_sdk.errors import SlackApiError

from bot.settings import Settings
from bot.slack_limits import NOTICE, priority
from rotation.errors import NoticePending, StepFailed
from rotation.store import RotationRow, StepRow

log = logging.getLogger("rotor.notify")

NOTICE_EVENT = "rotor_notice"
# Slack's answers meaning "Rotor cannot post or read there": a person must invite it.
NOT_IN_CHANNEL = {"not_in_channel", "channel_not_found", "is_archived"}


def channel_id(client: Any, store: Any, channel: str) -> str:
    """The ID of a channel given as `#name` (conversations.list, once; remembered in the
    state DB). An ID is returned as it is; a name Slack does not list stays a name."""
    if not channel.startswith("#"):
        return channel
    key = f"slack:channel:{channel}"
    known = store.get_kv(key) if store is not None else None
    if known:
        return str(known)
    cursor = None
    for _ in range(50):  # bounded: 50 pages of 1,000 channels
        response = client.conversations_list(types="public_channel,private_channel",
                                             exclude_archived=True, limit=1000, cursor=cursor)
        for found in response.get("channels") or []:
            if found.get("name") == channel[1:]:
                if store is not None:
                    store.set_kv(key, str(found["id"]))
                return str(found["id"])
        cursor = (response.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            break
    return channel


def join(client: Any, channel: str) -> None:
    """Join a public channel, so Rotor can read what it posted there (its history).

    A private channel cannot be joined: Slack then answers not_in_channel, and a person has
    to `/invite @rotor` there.
    """
    if not channel.startswith("C"):
        return
    try:
        client.conversations_join(channel=channel)
    except SlackApiError as exc:
        if exc.response.get("error") != "method_not_supported_for_channel_type":
            raise


def approval_id(step: StepRow) -> str:
    """Which approval of a step a notice told 2nd line about: each new one differs."""
    return f"{step.decided_at or 0:.6f}"


class SlackSecondLine:
    """Posts the 2nd line notice, once; returns a link to it (the step waits until then).

    `deferred` (rotor serve): the engine's thread never calls Slack. `notify` only reads
    what the Slack side recorded: the link once the notice is posted, else NoticePending
    (the step waits, its worker free); the reporter posts it (`post`) and wakes the step.
    Without `deferred` (the CLI), `notify` posts it itself.

    Once, even when Slack's answer is lost: before posting, the notice is marked in the state
    DB, and it carries metadata naming the rotation, step and approval. A later attempt that
    finds the mark looks for that metadata in the channel's history and adopts the notice it
    finds instead of posting again. Rotor joins the (public) channel to read it; a channel it
    cannot post in or read (private, not invited) fails the step with the reason, shown in
    the thread, and on /readyz until a notice gets through.
    """

    def __init__(self, client: Any, channel: str, group: str | None = None,
                 thread_link: Any = None, store: Any = None, deferred: bool = False) -> None:
        self.client = client
        self.deferred = deferred
        self.channel = channel
        self.group = group
        self.thread_link = thread_link or (lambda rotation: None)
        self.store = store
        self.problem: str | None = None
        self._joined: set[str] = set()

    @staticmethod
    def key(rotation: RotationRow, step: StepRow) -> str:
        """One notice per approval: a new approval (retry, ask again) makes a new key."""
        return f"{rotation.id}:{step.name}:{approval_id(step)}"

    def notify(self, rotation: RotationRow, step: StepRow, summary: str,
               approved_by: str) -> str:
        if not self.deferred:
            return self.post(rotation, step, summary, approved_by)
        record = self._load(self.key(rotation, step))
        if record.get("permalink"):
            return str(record["permalink"])
        if record.get("problem"):
            raise StepFailed(str(record["problem"]))
        raise NoticePending(self.key(rotation, step))

    def post(self, rotation: RotationRow, step: StepRow, summary: str,
             approved_by: str, *, also: Sequence[int] = ()) -> str:
        """Post the notice unless it was posted before; its link. StepFailed, recorded for
        `notify`, when Rotor may not post in the channel. `also`: the other rotations a
        fleet's notice names (bot.fleet_notice), which its Hold button holds too."""
        key = self.key(rotation, step)
        record = self._load(key)
        if record.get("permalink"):
            return str(record["permalink"])
        try:
            with priority(NOTICE):  # ahead of progress updates in the rate limiter's line
                permalink = self._post_once(key, record, rotation, step, summary, approved_by,
                                            also=also)
        except SlackApiError as exc:
            error = str(exc.response.get("error"))
            if error not in NOT_IN_CHANNEL:
                raise
            self.problem = (f"Rotor cannot post or read in the 2nd line channel {self.channel} "
                            f"({error}): invite @rotor there (`/invite @rotor`), then retry")
            log.warning("notify: #%s %s: %s", rotation.id, step.name, self.problem)
            self._save(key, {**self._load(key), "problem": self.problem})
            raise StepFailed(self.problem) from None
        self.problem = None
        return permalink

    def _post_once(self, key: str, record: dict[str, Any], rotation: RotationRow,
                   step: StepRow, summary: str, approved_by: str, *,
                   also: Sequence[int] = ()) -> str:
        from handlers import messages

        channel = channel_id(self.client, self.store, self.channel)
        if channel not in self._joined:
            join(self.client, channel)
            self._joined.add(channel)
        ts = record.get("ts") or (self._find(channel, key, float(record["at"]))
                                  if "at" in record else None)
        if ts is None:
            self._save(key, {"at": self._now()})  # in flight: a retry looks before it posts
            text, blocks = messages.second_line_notice(rotation, step, summary, approved_by,
                                                       self.group, self.thread_link(rotation),
                                                       also=also)
            response = self.client.chat_postMessage(
                channel=channel, text=text, blocks=blocks, unfurl_links=False,
                metadata={"event_type": NOTICE_EVENT, "event_payload": {"notice": key}})
            channel, ts = str(response["channel"]), str(response["ts"])
            if self.store is not None and self.channel.startswith("#"):
                self.store.set_kv(f"slack:channel:{self.channel}", channel)
        else:
            log.info("notify: #%s %s: the notice was posted before; not posting again",
                     rotation.id, step.name)
        self._save(key, {"at": record.get("at", self._now()), "channel": channel, "ts": ts})
        try:
            permalink = str(self.client.chat_getPermalink(channel=channel,
                                                          message_ts=ts)["permalink"])
        except Exception:  # the notice is posted; a missing link does not un-post it
            permalink = f"{channel}/{ts}"
        self._save(key, {"channel": channel, "ts": ts, "permalink": permalink})
        return permalink

    def _find(self, channel: str, key: str, since: float) -> str | None:
        if not channel.startswith(("C", "G")):
            return None  # never posted there, so its ID is unknown: nothing to find
        cursor = None
        for _ in range(20):
            response = self.client.conversations_history(
                channel=channel, oldest=f"{since - 60:.6f}", include_all_metadata=True,
                limit=200, cursor=cursor)
            for message in response.get("messages") or []:
                metadata = message.get("metadata") or {}
                if (metadata.get("event_type") == NOTICE_EVENT
                        and metadata.get("event_payload") == {"notice": key}):
                    return str(message["ts"])
            cursor = (response.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return None
        return None

    def _now(self) -> float:
        return float(self.store.clock()) if self.store is not None else 0.0

    def _load(self, key: str) -> dict[str, Any]:
        raw = self.store.get_kv(f"slack:notice:{key}") if self.store is not None else None
        return dict(json.loads(raw)) if raw else {}

    def _save(self, key: str, record: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.set_kv(f"slack:notice:{key}", json.dumps(record, sort_keys=True))


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
    from bot.slack import limited_client

    client = limited_client(settings.slack_bot_token, settings.slack_api_url)
    slack = settings.catalogue.slack
    return SlackSecondLine(client, slack.second_line_channel, slack.second_line_group)
