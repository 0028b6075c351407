"""The audit trail as a hash chain: each row's hash covers its content and the previous row's
hash, so editing or removing a row breaks the chain from there on. The head (the last row's
id and hash) is posted with each rotation's final Slack message, outside the database, so a
chain rewritten after the fact no longer matches what Slack shows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# The columns a row's hash covers, in this order (the id is left out: PostgreSQL's ids may
# skip numbers, and a removed row shows as a broken link anyway).
FIELDS = ("rotation_id", "step", "event", "from_status", "to_status", "actor", "at", "detail")


def link(previous: str, row: Any) -> str:
    """The hash of `row` (a mapping or an object with FIELDS) following `previous`."""
    get = row.get if isinstance(row, dict) else lambda name: getattr(row, name)
    content = json.dumps([get(name) for name in FIELDS], separators=(",", ":"),
                         ensure_ascii=False)
    return hashlib.sha256(f"{previous}\n{content}".encode()).hexdigest()


def short(digest: str | None) -> str:
    return (digest or "")[:16]


@dataclass(frozen=True)
class Verdict:
    checked: int
    head_id: int | None
    head: str | None
    problem: str | None  # the first altered or removed row, in one line

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(rows: Iterable[Any]) -> Verdict:
    """Walk the rows in id order; the first row whose hash does not follow is reported."""
    previous, previous_id, checked = "", None, 0
    head_id: int | None = None
    for row in rows:
        if row.hash is None:
            if previous:
                return Verdict(checked, head_id, previous,
                               f"audit row #{row.id} has no hash: it was altered")
            previous_id = row.id
            continue  # written before the chain began
        if row.hash != link(previous, row):
            gap = ""
            if previous_id is not None and row.id > previous_id + 1:
                gap = f" (rows #{previous_id + 1}..#{row.id - 1} are missing)"
            return Verdict(checked, head_id, previous or None,
                           f"audit row #{row.id} does not follow the chain: it was altered, or "
                           f"a row before it was removed{gap}")
        previous, previous_id, head_id = row.hash, row.id, row.id
        checked += 1
    return Verdict(checked, head_id, previous or None, None)
