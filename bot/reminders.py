"""Scheduled reminders: the key-age check of each environment, and a daily nudge in the thread
of each rotation that has waited for a person for more than a day.

`schedule()` derives every job from rotor.yml (`key_age.schedule`, a cron in
`key_age.timezone`) and from the state DB at start: a slot that passed less than `CATCH_UP`
ago and was never posted (the bot was down, or restarting) runs once, at once.

A slot is posted at most once. A kv row per slot records what was posted, message by message,
so a restart part-way carries on where it stopped instead of posting again; a named lock in
the state DB lets only one of several bot processes work on a job at a time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from handlers import reminder_messages
from rotation import iam
from rotation.catalogue import Catalogue
from rotation.engine import Engine
from rotation.errors import ConfigError, RotorError

log = logging.getLogger("rotor.reminders")

CATCH_UP = timedelta(days=1)  # a slot missed longer ago than this is left alone
LOCK_SECONDS = 300.0  # renewed before every post
APPROVAL_REMINDERS = "0 9 * * *"  # daily, in key_age.timezone: working hours, not 3am
WAITED = 86400.0  # a step waiting for a person longer than this gets the daily reminder


class LostLock(Exception):
    """Another process took over the job (ours expired): stop without posting."""


def latest_slot(
    trigger: CronTrigger, now: datetime, window: timedelta = CATCH_UP
) -> datetime | None:
    """The trigger's last fire time in (now - window, now], if there is one."""
    slot = None
    fire = trigger.get_next_fire_time(None, now - window)
    while fire is not None and fire <= now:
        slot = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    return slot


def cron(expression: str, timezone: str, key: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(expression, timezone=ZoneInfo(timezone))
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise ConfigError(
            f"{key}: {expression!r} in {timezone!r} is not a valid cron schedule ({exc})"
        ) from None


class SlotJob:
    """A job that does its work once per slot of its trigger, across restarts and processes."""

    name = "slot-job"

    def __init__(
        self, engine: Engine, client: Any, trigger: CronTrigger, clock: Callable[[], float]
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.client = client
        self.trigger = trigger
        self.clock = clock
        self.owner = f"{engine.worker_id}:reminders"

    def due(self) -> datetime | None:
        """The slot to post now, or None (no recent slot, or posted already)."""
        slot = latest_slot(self.trigger, datetime.fromtimestamp(self.clock(), UTC))
        if slot is None or self._state(slot).get("done"):
            return None
        return slot

    def run(self) -> None:
        """The scheduler's entry point, and the job's error boundary."""
        slot = self.due()
        if slot is None:
            return
        if not self._renew():
            log.info("%s: another process has it", self.name)
            return
        try:
            state = self._state(slot)  # again, under the lock
            if state.get("done"):
                return
            self.work(state, lambda: self._save(slot, state))
            state["done"] = True
            self._save(slot, state)
            log.info("%s: slot %s posted", self.name, slot.isoformat())
        except LostLock:
            log.warning("%s: lost the lock; the other process carries on", self.name)
        except Exception:  # the job's boundary: Slack or AWS down; a restart catches up
            log.exception("%s: slot %s failed", self.name, slot.isoformat())
        finally:
            self.store.try_lock(self._lock_name, self.owner, self.clock())  # release

    def work(self, state: dict[str, Any], save: Callable[[], None]) -> None:
        raise NotImplementedError

    def post(self, **kwargs: Any) -> Any:
        if not self._renew():
            raise LostLock(self.name)
        return self.client.chat_postMessage(unfurl_links=False, **kwargs)

    @property
    def _lock_name(self) -> str:
        return f"reminders:{self.name}"

    def _renew(self) -> bool:
        return self.store.try_lock(self._lock_name, self.owner, self.clock() + LOCK_SECONDS)

    def _key(self, slot: datetime) -> str:
        return f"reminders:{self.name}:{slot.astimezone(UTC).isoformat()}"

    def _state(self, slot: datetime) -> dict[str, Any]:
        raw = self.store.get_kv(self._key(slot))
        return dict(json.loads(raw)) if raw else {}

    def _save(self, slot: datetime, state: dict[str, Any]) -> None:
        self.store.set_kv(self._key(slot), json.dumps(state, sort_keys=True))


class KeyAgeCheck(SlotJob):
    """One environment's key-age check: one summary message, then a thread reply per user."""

    def __init__(
        self,
        engine: Engine,
        client: Any,
        catalogue: Catalogue,
        env: str,
        clock: Callable[[], float],
    ) -> None:
        limits = catalogue.key_age
        super().__init__(
            engine, client, cron(limits.schedule, limits.timezone, "key_age.schedule"), clock
        )
        self.catalogue = catalogue
        self.env = env
        self.name = f"key-age:{env}"
        self.channel = catalogue.slack.channel

    def work(self, state: dict[str, Any], save: Callable[[], None]) -> None:
        try:
            report = iam.key_age_report(self.engine.clients, self.catalogue, self.env, self.clock())
            # For /metrics (bot/metrics.py), in the store so every replica reports it.
            self.store.set_kv(f"metrics:keys-past-max-age:{self.env}", str(len(report.overdue)))
        except RotorError as exc:  # AccessDenied and the like: say so, once this slot
            log.warning("%s: %s", self.name, exc)
            text, blocks = reminder_messages.key_age_failed(self.env, exc)
            self.post(channel=self.channel, text=text, blocks=blocks)
            return
        if "ts" not in state:
            text, blocks = reminder_messages.key_age_summary(report)
            response = self.post(channel=self.channel, text=text, blocks=blocks)
            state.update(channel=str(response["channel"]), ts=str(response["ts"]), users=[])
            save()
        posted = set(state["users"])
        for user_name, findings in report.by_user().items():
            if user_name in posted:
                continue
            text, blocks = reminder_messages.key_age_user(report, user_name, findings)
            self.post(channel=state["channel"], thread_ts=state["ts"], text=text, blocks=blocks)
            state["users"].append(user_name)
            save()


class ApprovalReminders(SlotJob):
    """Daily: a reminder in the thread of every rotation whose step waited over a day."""

    name = "approval-reminders"

    def work(self, state: dict[str, Any], save: Callable[[], None]) -> None:
        now = self.clock()
        reminded = state.setdefault("rotations", [])
        for rotation in self.store.active():
            step = rotation.current
            if (
                step is None
                or step.status != "needs-approval"
                or step.decision is not None
                or now - (step.gate_requested_at or now) < WAITED
                or rotation.id in reminded
            ):
                continue
            thread = self._thread(rotation.id)
            if thread is None:
                continue  # the reporter has not posted its root message yet
            text, blocks = reminder_messages.still_waiting(rotation, step, now)
            self.post(channel=thread[0], thread_ts=thread[1], text=text, blocks=blocks)
            reminded.append(rotation.id)
            save()

    def _thread(self, rotation_id: int) -> tuple[str, str] | None:
        # Where bot.reporter keeps a rotation's root message (its `Delivery` row).
        raw = self.store.get_kv(f"slack:rotation:{rotation_id}")
        delivery = json.loads(raw) if raw else {}
        if delivery.get("channel") and delivery.get("root"):
            return str(delivery["channel"]), str(delivery["root"])
        return None


def jobs(
    engine: Engine, web_client: Any, catalogue: Catalogue, clock: Callable[[], float]
) -> list[SlotJob]:
    """Every reminder job rotor.yml asks for: a key-age check per environment, and the nudge."""
    found: list[SlotJob] = [
        KeyAgeCheck(engine, web_client, catalogue, env, clock) for env in catalogue.environments
    ]
    nudge = cron(APPROVAL_REMINDERS, catalogue.key_age.timezone, "key_age.timezone")
    found.append(ApprovalReminders(engine, web_client, nudge, clock))
    return found


def schedule(
    scheduler: Any,
    engine: Engine,
    web_client: Any,
    catalogue: Catalogue,
    clock: Callable[[], float],
) -> None:
    """Add the reminder jobs to an APScheduler scheduler; a slot missed recently runs now."""
    if web_client is None:
        log.info("reminders: no Slack client (SLACK_BOT_TOKEN unset); key-age reminders off")
        return
    for job in jobs(engine, web_client, catalogue, clock):
        scheduler.add_job(
            job.run,
            job.trigger,
            id=job.name,
            name=job.name,
            replace_existing=True,
            coalesce=True,
            misfire_grace_time=int(CATCH_UP.total_seconds()),
        )
        missed = job.due()
        if missed is not None:
            log.info("%s: slot %s was not posted; posting it now", job.name, missed.isoformat())
            scheduler.add_job(
                job.run, "date", id=f"{job.name}:catch-up", name=job.name, replace_existing=True
            )
