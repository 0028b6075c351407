"""One 2nd line notice for a fleet's gate, instead of one per app.

Wraps the 2nd line notifier (bot.notify.SlackSecondLine). For a rotation that is not in a
fleet it changes nothing. For a fleet member's destructive step, the first member to need
the notice posts one notice (through the wrapped notifier, so it is posted once even when
Slack's answer is lost) that lists every app of the fleet approved at that gate, and those
the same "Approve all" click is approving (rotation.fleet.batch_key); each of those apps
then gets the same link, so each app's step still runs only after a notice that
names it went out. An app approved later (it asked again) is listed in a further notice.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

from rotation.errors import NoticePending
from rotation.fleet import batch_key
from rotation.store import ACTIVE, RotationRow, StepRow, Store

log = logging.getLogger("rotor.notify")

LOCK_SECONDS = 60.0
WAIT_SECONDS = 20.0  # for another worker posting the same fleet's notice


class FleetNoticeBusy(Exception):
    """Another worker is posting this fleet's notice; the step retries shortly."""


class FleetSecondLine:
    def __init__(self, inner: Any, store: Store | None = None) -> None:
        self.inner = inner
        self.store = store

    @staticmethod
    def _key(rotation: RotationRow, step: StepRow) -> str:
        return f"slack:fleet-notice:{rotation.fleet_id}:{step.name}"

    @property
    def problem(self) -> str | None:
        return getattr(self.inner, "problem", None)

    def notify(self, rotation: RotationRow, step: StepRow, summary: str,
               approved_by: str) -> str:
        """The engine asks (a worker's thread). A deferred notifier (rotor serve) never posts
        here: a fleet member finds the link its fleet's notice recorded for it, or waits
        (NoticePending) until the reporter has `post`ed a notice that names it."""
        store = self.store or getattr(self.inner, "store", None)
        if rotation.fleet_id is None or store is None:
            return str(self.inner.notify(rotation, step, summary, approved_by))
        if getattr(self.inner, "deferred", False):
            raw = store.get_kv(self._key(rotation, step))
            links = json.loads(raw)["links"] if raw else {}
            if rotation.target in links:
                return str(links[rotation.target])
            raise NoticePending(self._key(rotation, step))
        return self.post(rotation, step, summary, approved_by)

    def post(self, rotation: RotationRow, step: StepRow, summary: str,
             approved_by: str) -> str:
        """Post (the reporter's thread, or the CLI) one notice naming every app of the fleet
        approved at this gate, unless one already named this app; its link."""
        store = self.store or getattr(self.inner, "store", None)
        if rotation.fleet_id is None or store is None:
            return str(getattr(self.inner, "post", self.inner.notify)(
                rotation, step, summary, approved_by))
        key = self._key(rotation, step)
        lock, owner = f"fleet-notice:{rotation.fleet_id}:{step.name}", uuid.uuid4().hex
        waited = threading.Event()
        deadline = store.clock() + WAIT_SECONDS
        while not store.try_lock(lock, owner, store.clock() + LOCK_SECONDS):
            if store.clock() > deadline:
                raise FleetNoticeBusy(f"fleet #{rotation.fleet_id}'s 2nd line notice")
            waited.wait(0.05)
        try:
            raw = store.get_kv(key)
            record: dict[str, Any] = json.loads(raw) if raw else {"apps": [], "links": {}}
            if rotation.target in record["apps"]:
                return str(record["links"][rotation.target])
            batch = json.loads(store.get_kv(batch_key(rotation.fleet_id, step.name)) or "[]")
            listed = [rotation.target] + [
                r.target for r in store.fleet_rotations(rotation.fleet_id)
                if r.id != rotation.id and r.status == ACTIVE and r.current is not None
                and r.current.name == step.name and (r.current.approved or r.id in batch)
                and r.target not in record["apps"]]
            fleet_summary = (f"fleet #{rotation.fleet_id} in {rotation.env}: {step.name} for "
                             f"{len(listed)} apps ({', '.join(listed)}). {rotation.target}: "
                             f"{summary}")
            link = str(getattr(self.inner, "post", self.inner.notify)(
                rotation, step, fleet_summary, approved_by))
            record["apps"].extend(listed)
            record["links"].update(dict.fromkeys(listed, link))
            store.set_kv(key, json.dumps(record, sort_keys=True))
            log.info("notify: fleet #%s %s: one notice for %s apps", rotation.fleet_id,
                     step.name, len(listed))
            return link
        finally:
            store.try_lock(lock, owner, store.clock())  # release
