"""Keeps secret values out of logs, messages, exceptions and the state DB.

Every secret value Rotor reads or makes is registered here the moment it exists. Output
boundaries (the log handler, the Slack reporter, the state store) pass text through
`redact`, and the store refuses outright to write a row that still contains one.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import ahocorasick

MASK = "[redacted]"
_MIN_LENGTH = 6  # shorter strings are too common to hide without mangling ordinary text

_lock = threading.Lock()
_secrets: set[str] = set()
# Every spelling of every secret, matched in one pass over a text (Aho-Corasick): a check
# costs the text's length, not the number of secrets this process has seen (which only
# grows: 50 apps leave 500 spellings; a check of them one by one took 19 us and 5% of a
# fleet's CPU). Rebuilt on the first check after a new secret.
_matcher: Any = None


def _spellings(value: str) -> set[str]:
    """The value, and how JSON and Python's repr escape it (quotes, backslashes, non-ASCII):
    a secret written out escaped is still the secret."""
    return {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
            repr(value)[1:-1]}


def register(*values: str | None) -> None:
    """Remember values that must never be shown, however they are escaped."""
    global _matcher
    with _lock:
        for value in values:
            if value and len(value) >= _MIN_LENGTH:
                new = _spellings(value) - _secrets
                if new:
                    _secrets.update(new)
                    _matcher = None


def _found(text: str) -> set[str]:
    """The registered spellings in `text` (call under _lock)."""
    global _matcher
    if not _secrets:
        return set()
    if _matcher is None:
        automaton = ahocorasick.Automaton()
        for secret in _secrets:
            automaton.add_word(secret, secret)
        automaton.make_automaton()
        _matcher = automaton
    return {secret for _, secret in _matcher.iter(text)}


def redact(text: str) -> str:
    """Replace every registered secret in `text` with a mask."""
    with _lock:
        found = _found(text)
    for value in sorted(found, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def contains_secret(text: str) -> bool:
    with _lock:
        return bool(_found(text))


class RedactingFilter(logging.Filter):
    """Logging filter that masks registered secrets in the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if contains_secret(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if contains_secret(str(exc)):
                record.exc_info = None
                record.exc_text = f"{type(exc).__name__}: {redact(str(exc))}"
        return True
