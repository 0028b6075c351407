"""What a destructive or irreversible action relies on, read from the world just before it.

A step that drops a user, kills connections, deactivates or deletes a key, or rolls a secret
back declares a `read` function returning `Facts`: what it found (the secret's stages, the
database's users and sessions, IAM's keys) and, when a precondition does not hold, why the
action must not run. `Context.act` reads them, asks for approval with a text built from them,
and reads them again after the gate, immediately before acting: a failed precondition fails
the step and changes nothing; facts that changed since the approval ask again. A note in the
state DB is a hint, never the authority.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Facts:
    """What an action would do and what it relies on, as just read.

    `seen` is JSON-able and holds no secret: users@hosts, connection IDs, key IDs, version
    IDs, object names with their security type and body digest. The approval is bound to it.
    `refused` is set when a precondition does not hold: the reason, one line.
    """

    seen: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None


def digest(gate: str, where: tuple[str, str, str], seen: Any) -> str:
    """A digest of one exact action: the gate, the rotation's kind/target/environment, and
    what the approval was shown."""
    text = json.dumps({"gate": gate, "where": list(where), "seen": seen}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def body_digest(text: str) -> str:
    """A short digest of an object's body (SHOW CREATE text), to name it in an approval."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]
