"""One 2nd line notice for a fleet's gate, instead of one per app.

Wraps the 2nd line notifier (bot.notify.SlackSecondLine). For a rotation that is not in a
fleet it changes nothing. For a fleet member's destructive step, the first member to need
the notice posts one notice (through the wrapped notifier, so it is posted once even when
Slack's answer is lost) that lists every app of the fleet approved at that gate, once the
"Approve all" click approving them has approved them all (rotation.fleet.batch_key). Each
of those apps then gets the same link, so each app's step still runs only after a notice
that names it went out.

A notice covers one approval, as for a single rotation: each app's link is recorded with the
approval it was told about (the step's decided_at). An app approved again (a retry, Ask
again, Hold) finds no link for its new approval and is listed in a further notice.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

from bot.notify import approval_id
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
            link = _told(_links(store.get_kv(self._key(rotation, step))), rotation, step)
            if link is not None:
                return link
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
            links = _links(store.get_kv(key))
            told = _told(links, rotation, step)
            if told is not None:
                return told
            batch = json.loads(store.get_kv(batch_key(rotation.fleet_id, step.name)) or "{}")
            if (isinstance(batch, dict) and batch and not batch.get("done")
                    and store.clock() < float(batch["at"]) + LOCK_SECONDS):
                raise FleetNoticeBusy(f"fleet #{rotation.fleet_id}'s Approve all is still "
                                      "approving; its 2nd line notice follows")
            listed = [(rotation, step)] + [
                (r, r.current) for r in store.fleet_rotations(rotation.fleet_id)
                if r.id != rotation.id and r.status == ACTIVE and r.current is not None
                and r.current.name == step.name and r.current.approved
                and _told(links, r, r.current) is None]
            names = [r.target for r, _ in listed]
            fleet_summary = (f"fleet #{rotation.fleet_id} in {rotation.env}: {step.name} for "
                             f"{len(names)} apps ({', '.join(names)}). {rotation.target}: "
                             f"{summary}")
            post = getattr(self.inner, "post", None)
            # The notice's Hold holds every app it names, not only the first.
            also = [r.id for r, _ in listed[1:]]
            link = str(post(rotation, step, fleet_summary, approved_by, also=also)
                       if post is not None
                       else self.inner.notify(rotation, step, fleet_summary, approved_by))
            links.update({r.target: {"link": link, "approval": approval_id(told_step)}
                          for r, told_step in listed})
            store.set_kv(key, json.dumps({"links": links}, sort_keys=True))
            log.info("notify: fleet #%s %s: one notice for %s apps", rotation.fleet_id,
                     step.name, len(names))
            return link
        finally:
            store.try_lock(lock, owner, store.clock())  # release


def _links(raw: str | None) -> dict[str, Any]:
    """app -> {"link", "approval"}: the notices posted for a fleet's gate (kv)."""
    links = json.loads(raw).get("links", {}) if raw else {}
    return links if isinstance(links, dict) else {}


def _told(links: dict[str, Any], rotation: RotationRow, step: StepRow) -> str | None:
    """The link of the fleet notice that named this app for this very approval, if any."""
    entry = links.get(rotation.target)
    if isinstance(entry, dict) and entry.get("approval") == approval_id(step):
        return str(entry["link"])
    return None  # not told, told of an earlier approval, or an older record: a new notice
