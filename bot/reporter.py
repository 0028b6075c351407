"""Turns the audit trail into Slack: one root message per rotation, and its thread.

The audit table is the event stream. For each rotation the reporter keeps, in the state DB,
a cursor (the last audit row delivered), the timestamps of its messages and the one post it
may have in flight. It posts from the cursor onwards, so nothing is lost while Slack is down:
when Slack answers again, delivery resumes where it stopped.

Never twice:
- one process delivers at a time (a named lock in the state DB, renewed before each call);
- the cursor moves after each post, in the same write as the post's timestamp;
- before a post the row is marked in flight, and every post carries Slack message metadata
  naming its rotation and row. If a post's outcome is unknown (the connection dropped after
  Slack may have taken it), the next attempt first looks for that metadata in the thread and
  adopts the message it finds instead of posting again.
Updates (`chat.update`) are idempotent and simply repeated.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from slack_sdk.errors import SlackApiError

from bot import fleet_report
from bot.notify import NOT_IN_CHANNEL, join
from bot.slack import SLACK_ERRORS
from bot.slack_limits import DECISION, PROGRESS, priority
from handlers import messages
from rotation.engine import NOTICE_WAIT, Engine
from rotation.errors import StepFailed
from rotation.policy import Policy
from rotation.store import ACTIVE, DONE, AuditRow, RotationRow

log = logging.getLogger("rotor.reporter")

LOCK = "slack-reporter"
SCANNED = "slack:scanned"  # every audit row up to this id is delivered
CHANNEL_ID = "slack:channel-id"
ROOT_EVENT, ROW_EVENT = "rotor_rotation", "rotor_event"
_TRANSIENT_ERRORS = {"ratelimited", "internal_error", "fatal_error", "service_unavailable",
                     "request_timeout"}


class LostLock(Exception):
    """Another process took over delivery."""


@dataclass
class Delivery:
    """What the reporter knows about one rotation's messages (a kv row per rotation)."""

    channel: str | None = None
    root: str | None = None
    link: str | None = None
    cursor: int = 0
    synced: int = -1  # the cursor the root message last showed
    in_flight: str | None = None
    reminded: float | None = None
    # Messages that still carry buttons: key -> {"ts", "step", "text"}.
    open: dict[str, dict[str, Any]] = field(default_factory=dict)


def _transient(exc: Exception) -> bool:
    if isinstance(exc, SlackApiError):
        status = getattr(exc.response, "status_code", 200)
        return status >= 500 or status == 429 or exc.response.get("error") in _TRANSIENT_ERRORS
    return isinstance(exc, OSError | http.client.HTTPException)


class Reporter:
    """Delivers audit rows to Slack from a thread of its own, woken by engine changes."""

    def __init__(self, engine: Engine, client: Any, policy: Policy, *,
                 schedule_retry: Callable[[float], None], lease: float = 60.0,
                 max_backoff: float = 30.0, second_line: Any = None) -> None:
        self.engine = engine
        self.second_line = second_line  # posts the 2nd line notices steps ask for
        self.store = engine.store
        self.client = client
        self.policy = policy
        self.channel = engine.catalogue.slack.channel
        self.schedule_retry = schedule_retry
        self.lease = lease
        self.max_backoff = max_backoff
        self.owner = f"{engine.worker_id}:reporter:{uuid.uuid4().hex[:4]}"
        self._failures = 0
        self.problem: str | None = None  # a channel Rotor cannot use (shown on /readyz)
        self._joined: set[str] = set()
        self._resync = True  # on start, refresh every active rotation's root message
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rotor-reporter", daemon=True)

    # -- the thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._wake.set()

    def wake(self, rotation_id: int | None = None) -> None:
        self._wake.set()

    def sweep(self) -> None:
        """The scheduler's regular look for rows other processes wrote (not while backing off)."""
        if self._failures == 0:
            self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                delivered = self.deliver()
            except Exception:  # the thread's boundary: keep reporting whatever broke once
                log.exception("reporter: delivery pass failed")
                delivered = False
            if delivered:
                self._failures = 0
            else:
                self._failures += 1
                delay = min(self.max_backoff, 0.5 * 2 ** min(self._failures - 1, 10))
                self.schedule_retry(delay)

    # -- one pass -------------------------------------------------------------------------

    def deliver(self) -> bool:
        """Deliver everything undelivered; False when something must be retried later."""
        if not self._renew():
            log.debug("reporter: another process is delivering")
            return False
        try:
            scanned = self._scanned()
            rows = self.store.audit_rows(after=scanned, limit=500)
            ids = dict.fromkeys(r.rotation_id for r in rows if r.rotation_id is not None)
            ids.update(dict.fromkeys(r.id for r in self.store.active()))
            # Decisions first: rotations with a decision to post go before the others, and
            # every root message's progress update waits until all the rows are posted.
            deciding = {r.rotation_id for r in rows if _is_decision(r)}
            order = sorted(ids, key=lambda i: i not in deciding)
            stuck: list[int] = []
            failed: dict[int, int] = {}
            for rotation_id in order:
                failed_at = self._deliver_rotation(rotation_id)
                if failed_at is not None:
                    failed[rotation_id] = failed_at
            for rotation_id in order:
                if rotation_id not in failed:
                    failed_at = self._sync_root(rotation_id)
                    if failed_at is not None:
                        failed[rotation_id] = failed_at
            stuck.extend(failed.values())
            try:
                fleet_report.refresh(self)
            except SLACK_ERRORS as exc:
                log.warning("reporter: fleet tables: Slack unavailable (%s); will retry",
                            _reason(exc))
                stuck.append(scanned + 1)
            newest = rows[-1].id if rows else scanned
            done_up_to = min([newest, *(i - 1 for i in stuck)])
            if done_up_to > scanned:
                self.store.set_kv(SCANNED, str(done_up_to))
            if len(rows) == 500:
                self._wake.set()
            if not stuck:
                self._resync = False
                self.problem = None
            return not stuck
        except LostLock:
            return False
        finally:
            self.store.try_lock(LOCK, self.owner, self.store.clock())  # release

    def _scanned(self) -> int:
        value = self.store.get_kv(SCANNED)
        if value is not None:
            return int(value)
        # First run against this DB: report the active rotations, not the whole history.
        firsts = [rows[0].id for r in self.store.active()
                  if (rows := self.store.audit_rows(r.id, limit=1))]
        if firsts:
            return min(firsts) - 1
        return self.store.last_audit_id()

    def _deliver_rotation(self, rotation_id: int) -> int | None:
        """Deliver one rotation's new rows; the id of the row that must be retried, if any."""
        state = self._load(rotation_id)
        rows = self.store.audit_rows(rotation_id, after=state.cursor)
        # Read after the rows, so it is never older than them (a row asking for an approval
        # finds the step's gate, destructive or not, that the same commit wrote).
        rotation = self.store.rotation(rotation_id)
        if rotation.fleet_id is not None:  # its fleet's message, and only what it needs
            return fleet_report.deliver_member(self, rotation)
        for row in rows:
            try:
                self._deliver_row(state, rotation, row)
            except SLACK_ERRORS as exc:
                if _transient(exc) or self._not_in_channel(state, exc):
                    log.warning("reporter: #%s %s: Slack unavailable (%s); will retry",
                                rotation_id, row.event, _reason(exc))
                    self._save(rotation_id, state)
                    return row.id
                log.error("reporter: #%s %s: Slack refused it (%s); skipped", rotation_id,
                          row.event, _reason(exc))
            state.cursor, state.in_flight = row.id, None
            self._save(rotation_id, state)
        try:
            rotation = self.store.rotation(rotation_id)
            with priority(DECISION):
                self._remind(state, rotation)
                self._offer(state, rotation)
            self._save(rotation_id, state)
        except SLACK_ERRORS as exc:
            return self._update_failed(rotation_id, state, exc)
        return None

    def _sync_root(self, rotation_id: int) -> int | None:
        """Bring the root message's checklist up to date (progress: after the decisions).
        A fleet member has no root of its own: its fleet's table (fleet_report) shows it."""
        state = self._load(rotation_id)
        if not state.root or (state.synced >= state.cursor and not self._resync):
            return None
        rotation = self.store.rotation(rotation_id)
        if rotation.fleet_id is not None:
            return None
        try:
            text, blocks = messages.root(rotation)
            self._call("chat_update", channel=state.channel, ts=state.root, text=text,
                       blocks=blocks)
            state.synced = state.cursor
            self._save(rotation_id, state)
        except SLACK_ERRORS as exc:
            return self._update_failed(rotation_id, state, exc)
        return None

    def _update_failed(self, rotation_id: int, state: Delivery, exc: Exception) -> int | None:
        if not _transient(exc) and not self._not_in_channel(state, exc):
            log.error("reporter: #%s: Slack refused the update (%s)", rotation_id,
                      _reason(exc))
            return None
        log.warning("reporter: #%s: Slack unavailable (%s); will retry", rotation_id,
                    _reason(exc))
        self._save(rotation_id, state)
        return state.cursor  # read this rotation's last row again: it brings it back

    def _not_in_channel(self, state: Delivery, exc: Exception) -> bool:
        """Rotor may not post or read in the channel: join it if it is public, otherwise say
        so on /readyz. Either way the rows wait (nothing is skipped) and are retried."""
        if not (isinstance(exc, SlackApiError)
                and exc.response.get("error") in NOT_IN_CHANNEL):
            return False
        channel = state.channel or self.store.get_kv(CHANNEL_ID) or self.channel
        try:
            join(self.client, channel)
            log.info("reporter: joined %s to read what Rotor posted there", channel)
        except SLACK_ERRORS as failed:
            log.debug("reporter: could not join %s: %s", channel, _reason(failed))
        self.problem = (f"Rotor cannot post or read in {self.channel} "
                        f"({exc.response.get('error')}): invite @rotor there "
                        "(`/invite @rotor`); its messages wait until then")
        return True

    def _join_once(self, channel: str) -> None:
        if channel not in self._joined:
            self._joined.add(channel)
            try:
                join(self.client, channel)
            except SLACK_ERRORS as exc:  # found out, and said, when a lookup needs it
                log.warning("reporter: could not join %s (%s)", channel, _reason(exc))

    # -- what each event becomes ------------------------------------------------------------

    def _deliver_row(self, state: Delivery, rotation: RotationRow, row: AuditRow) -> None:
        with priority(DECISION if _is_decision(row) else PROGRESS):
            self._deliver_event(state, rotation, row)

    def _deliver_event(self, state: Delivery, rotation: RotationRow, row: AuditRow) -> None:
        event, step = row.event, row.step or ""
        if event == "started" or state.root is None:
            self._ensure_root(state, rotation)
            if event == "started":
                return
        if event == "step":
            if row.to_status in ("done", "skipped", "failed"):
                self._close(state, rotation, f"hold:{step}", "ran", row)
            if row.to_status in ("done", "skipped"):
                self._post(state, rotation, row, *messages.step_result(rotation, row))
            elif row.to_status == "failed":
                self._post_open(state, rotation, row, f"failed:{step}", row.detail,
                                *messages.failure(rotation, row))
            elif row.to_status == "waiting":
                self._post(state, rotation, row, *messages.waiting(rotation, row))
        elif event == "waiting":
            self._post(state, rotation, row, *messages.waiting(rotation, row))
        elif event == "resumed":
            self._post(state, rotation, row, *messages.resumed(rotation, row))
        elif event == "approval-requested":
            self._close(state, rotation, f"expired:{step}", "asked-again", row)
            self._close(state, rotation, f"approval:{step}", "asked-again", row)
            self._ask(state, rotation, row, row.detail or "")
        elif event in ("approved", "rejected"):
            self._close(state, rotation, f"approval:{step}", event, row)
            if event == "rejected":
                self._post_open(state, rotation, row, f"failed:{step}", row.detail,
                                *messages.failure(rotation, row, rejected_by=row.actor))
                state.open[f"failed:{step}"]["rejected_by"] = row.actor
        elif event == "held":
            self._close(state, rotation, f"hold:{step}", "held", row)
            note = f"Held by {messages.user(row.actor)} {messages.when(row.at)}; it needs " \
                   "approving again."
            self._ask(state, rotation, row, rotation.step(step).gate_summary or "", note)
        elif event == "approval-expired":
            self._close(state, rotation, f"approval:{step}", "expired", row)
            self._post_open(state, rotation, row, f"expired:{step}", row.detail,
                            *messages.approval_expired(rotation, rotation.step(step)))
        elif event == "second-line-notified":
            hold_until = rotation.step(step).hold_until or 0
            if hold_until > self.store.clock():  # offer Hold until the step runs
                text, blocks = messages.second_line_told(rotation, row, hold_until)
                self._post_open(state, rotation, row, f"hold:{step}", text, text, blocks)
            else:
                self._post(state, rotation, row, *messages.second_line_told(rotation, row, None))
        elif event == "second-line-requested":
            self._tell_second_line(rotation, row)
        elif event == "retried":
            self._close(state, rotation, f"failed:{step}", "retried", row)
        elif event in ("cancel-requested", "requested"):
            self._post(state, rotation, row, *messages.asked_for(rotation, row))
        elif event == "cancelled":
            for key in list(state.open):
                self._close(state, rotation, key, "cancelled", row)
            self._post(state, rotation, row, *messages.cancelled(rotation, row))
        elif event == "finished":
            self._post(state, rotation, row, *messages.finished(rotation, self._next_envs(
                rotation), row))
        # Other events need no message of their own: a step starting shows in the root's
        # checklist, and "cancel-failed" is followed by the step's failure.

    def _tell_second_line(self, rotation: RotationRow, row: AuditRow) -> None:
        """Post the notice a step waits for (once: `SlackSecondLine.post`), then wake it."""
        step = self.store.rotation(rotation.id).step(row.step or "")
        if (self.second_line is None or step.status != "waiting"
                or step.wait_reason != NOTICE_WAIT or step.notice_at is not None):
            return  # asked for by an earlier attempt, or told already
        if not self._renew():
            raise LostLock(LOCK)
        try:
            self.second_line.post(rotation, step, row.detail or step.gate_summary or "",
                                  step.decided_by or "?")
        except StepFailed:
            pass  # recorded with the reason: the step fails with it, shown in the thread
        self.engine.recheck(rotation.id, step.name, NOTICE_WAIT)

    def _ask(self, state: Delivery, rotation: RotationRow, row: AuditRow, summary: str,
             note: str = "") -> None:
        step = rotation.step(row.step or "")
        approvers = self.policy.who(self.policy.approvers(rotation.env))
        text, blocks = messages.approval_request(
            rotation, step, summary, bool(step.gate_destructive),
            approvers, self.engine.catalogue.four_eyes(rotation.env), note)
        self._post_open(state, rotation, row, f"approval:{step.name}", summary, text, blocks)
        if step.guided:
            state.open[f"approval:{step.name}"]["guided"] = True

    def _remind(self, state: Delivery, rotation: RotationRow) -> None:
        step = rotation.current
        if (rotation.status != ACTIVE or step is None or step.status != "needs-approval"
                or step.reminded_at is None or step.expired_at is not None
                or state.reminded == step.reminded_at or state.root is None):
            return
        approvers = self.policy.who(self.policy.approvers(rotation.env))
        text, blocks = messages.reminder(rotation, step, approvers)
        key = f"reminder:{step.name}:{step.reminded_at}"
        self._send(state, rotation, key, text, blocks)
        state.reminded = step.reminded_at

    def _offer(self, state: Delivery, rotation: RotationRow) -> None:
        """A button per request the current step honours while it waits (Reactivate old key,
        Roll back); the buttons go as soon as the step stops honouring them."""
        step = rotation.current
        names = (self.engine.offers(rotation)
                 if state.root and rotation.kind in self.engine.kinds else ())
        key = f"offer:{step.name}" if step is not None and names else None
        for stale in [k for k in state.open if k.startswith("offer:") and k != key]:
            self._close_offer(state, rotation, stale, self.store.clock())
        if step is None or key is None or key in state.open:
            return
        text, blocks = messages.offers(rotation, step, names)
        # One post per spell of waiting: a step that waits again offers again.
        ts = self._send(state, rotation, f"{key}:{step.waiting_since or 0:.3f}", text, blocks)
        state.in_flight = None
        state.open[key] = {"ts": ts, "step": step.name, "text": text, "offers": list(names)}
        log.info("reporter: #%s %s offers %s", rotation.id, step.name, ", ".join(names))

    def _close_offer(self, state: Delivery, rotation: RotationRow, key: str,
                     at: float | None) -> None:
        message = state.open[key]
        text, blocks = messages.offers_closed(rotation, message["step"],
                                              message.get("offers", []), at)
        self._call("chat_update", channel=state.channel, ts=message["ts"], text=text,
                   blocks=blocks)
        del state.open[key]

    def _next_envs(self, rotation: RotationRow) -> list[str]:
        """The environment after this one in the catalogue, offered when this one is done."""
        if rotation.status != DONE:
            return []
        envs = list(self.engine.catalogue.environments)
        at = envs.index(rotation.env) if rotation.env in envs else len(envs)
        return envs[at + 1:at + 2]

    # -- Slack calls ------------------------------------------------------------------------

    def _ensure_root(self, state: Delivery, rotation: RotationRow) -> None:
        if state.root is None:
            key = "root"
            found = self._find_root(state, rotation) if state.in_flight == key else None
            if found is None:
                self._mark(state, rotation.id, key)
                text, blocks = messages.root(rotation)
                found = self.post_root(state.channel, text, blocks, {"rotation": rotation.id})
            self._join_once(found[0])  # a lost answer is looked for in its history
            state.channel, state.root = found
            state.in_flight = None
            self._save(rotation.id, state)
            log.info("reporter: #%s root message posted", rotation.id)
        if state.link is None:
            response = self._call("chat_getPermalink", channel=state.channel,
                                  message_ts=state.root)
            state.link = str(response["permalink"])
            self._save(rotation.id, state)

    def _post(self, state: Delivery, rotation: RotationRow, row: AuditRow, text: str,
              blocks: list[dict[str, Any]]) -> str:
        return self._send(state, rotation, f"audit:{row.id}", text, blocks)

    def _post_open(self, state: Delivery, rotation: RotationRow, row: AuditRow, key: str,
                   summary: str | None, text: str, blocks: list[dict[str, Any]]) -> None:
        """Post a message with buttons, remembered so a later event can replace them."""
        ts = self._post(state, rotation, row, text, blocks)
        state.open[key] = {"ts": ts, "step": row.step, "text": summary or ""}

    def _close(self, state: Delivery, rotation: RotationRow, key: str, how: str,
               row: AuditRow) -> None:
        """Replace a message's buttons by who did what, and when."""
        message = state.open.get(key)
        if message is None:
            return
        if key.startswith("offer:"):
            self._close_offer(state, rotation, key, row.at)
            return
        if key.startswith("failed:"):
            failed = replace(row, step=message["step"], detail=message["text"])
            text, blocks = messages.failure_closed(rotation, failed, how, row.actor, row.at,
                                                   message.get("rejected_by"))
        else:
            if how == "approved" and message.get("guided"):
                how = "done"
            text, blocks = messages.approval_closed(rotation, message["step"], message["text"],
                                                    how, row.actor, row.at)
        self._call("chat_update", channel=state.channel, ts=message["ts"], text=text,
                   blocks=blocks)
        del state.open[key]

    def _send(self, state: Delivery, rotation: RotationRow, key: str, text: str,
              blocks: list[dict[str, Any]]) -> str:
        """Post a thread reply once: adopt the earlier post if one with this key got through."""
        if state.in_flight == key:
            found = self._find_reply(state, rotation.id, key)
            if found is not None:
                log.info("reporter: #%s %s was posted before; not posting again", rotation.id,
                         key)
                return found
        self._mark(state, rotation.id, key)
        response = self._call(
            "chat_postMessage", channel=state.channel, thread_ts=state.root, text=text,
            blocks=blocks, unfurl_links=False,
            metadata={"event_type": ROW_EVENT,
                      "event_payload": {"rotation": rotation.id, "key": key}})
        return str(response["ts"])

    def _mark(self, state: Delivery, rotation_id: int, key: str) -> None:
        state.in_flight = key
        self._save(rotation_id, state)

    def _find_reply(self, state: Delivery, rotation_id: int, key: str) -> str | None:
        cursor = None
        for _ in range(20):
            response = self._call("conversations_replies", channel=state.channel,
                                  ts=state.root, include_all_metadata=True, limit=200,
                                  cursor=cursor)
            for message in response.get("messages") or []:
                if _payload(message, ROW_EVENT) == {"rotation": rotation_id, "key": key}:
                    return str(message["ts"])
            cursor = (response.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return None
        return None

    def _find_root(self, state: Delivery, rotation: RotationRow) -> tuple[str, str] | None:
        return self.find_posted_root(state.channel, rotation.created_at,
                                     {"rotation": rotation.id})

    def find_posted_root(self, channel: str | None, since: float,
                         payload: dict[str, int]) -> tuple[str, str] | None:
        """A root message posted since `since` whose metadata carries `payload` (a post whose
        answer was lost), looked for in the channel's history; None if there is none."""
        channel = channel or self.store.get_kv(CHANNEL_ID)
        if channel is None:  # never posted to the channel, so its ID is unknown: post again
            return None
        response = self._call("conversations_history", channel=channel,
                              oldest=str(since - 60), include_all_metadata=True, limit=200)
        for message in response.get("messages") or []:
            if _payload(message, ROOT_EVENT) == payload:
                return channel, str(message["ts"])
        return None

    def post_root(self, channel: str | None, text: str, blocks: list[dict[str, Any]],
                  payload: dict[str, int]) -> tuple[str, str]:
        """Post a root message carrying `payload` in its metadata (`find_posted_root` finds
        it if the answer is lost); where it went. The channel's ID is kept for that search."""
        response = self._call("chat_postMessage", channel=channel or self.channel, text=text,
                              blocks=blocks, unfurl_links=False,
                              metadata={"event_type": ROOT_EVENT, "event_payload": payload})
        found = (str(response["channel"]), str(response["ts"]))
        if self.store.get_kv(CHANNEL_ID) != found[0]:
            self.store.set_kv(CHANNEL_ID, found[0])
        return found

    def _call(self, method: str, **kwargs: Any) -> Any:
        if not self._renew():
            raise LostLock(LOCK)
        return getattr(self.client, method)(**kwargs)

    def _renew(self) -> bool:
        return self.store.try_lock(LOCK, self.owner, self.store.clock() + self.lease)

    # -- state ----------------------------------------------------------------------------

    def _load(self, rotation_id: int) -> Delivery:
        raw = self.store.get_kv(f"slack:rotation:{rotation_id}")
        return Delivery(**json.loads(raw)) if raw else Delivery()

    def _save(self, rotation_id: int, state: Delivery) -> None:
        self.store.set_kv(f"slack:rotation:{rotation_id}",
                          json.dumps(asdict(state), sort_keys=True))

    def thread_link(self, rotation: RotationRow) -> str | None:
        """The rotation's thread, when its root message is posted (no Slack call)."""
        return self._load(rotation.id).link


# Rows whose message asks someone to decide (buttons) or tells them a decision is near.
_DECISIONS = {"approval-requested", "held", "rejected", "approval-expired",
              "second-line-requested", "second-line-notified"}


def _is_decision(row: AuditRow) -> bool:
    return row.event in _DECISIONS or (row.event == "step" and row.to_status == "failed")


def _payload(message: dict[str, Any], event_type: str) -> Any:
    metadata = message.get("metadata") or {}
    return metadata.get("event_payload") if metadata.get("event_type") == event_type else None


def _reason(exc: Exception) -> str:
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error") or exc.response.status_code)
    return f"{type(exc).__name__}: {exc}"
