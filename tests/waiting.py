"""The one way tests wait for something another thread or process produces.

`rotor serve`, the engine worker and the reporter work asynchronously, and the machine that runs
the tests may be busy: a test that reads a message, a button or a row once can read it from an
earlier moment. `wait_for` polls until the expected content is there, with a bounded deadline,
and on timeout fails naming what it waited for and the last value it saw.

The deadline is generous (DEADLINE seconds, ROTOR_TEST_WAIT to change it): passing tests never
wait that long, and a loaded machine may be many times slower than a quiet one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

DEADLINE = float(os.environ.get("ROTOR_TEST_WAIT", "60"))
INTERVAL = 0.02
_SHOWN = 2000  # characters of the last value a timeout shows


@overload
def wait_for(get: Callable[[], T], until: None = None, *, what: str,
             timeout: float | None = None, interval: float = INTERVAL) -> T: ...


@overload
def wait_for(get: Callable[[], T], until: Callable[[T], Any], *, what: str,
             timeout: float | None = None, interval: float = INTERVAL) -> T: ...


def wait_for(get: Callable[[], T], until: Callable[[T], Any] | None = None, *, what: str,
             timeout: float | None = None, interval: float = INTERVAL) -> T:
    """Call `get()` until its value is truthy (or until `until(value)` is), and return it.

    `get` must only read (it is called many times). On timeout: AssertionError naming `what`
    and showing the last value `get` returned.
    """
    limit = DEADLINE if timeout is None else timeout
    deadline = time.monotonic() + limit
    while True:
        value = get()
        if (until(value) if until is not None else value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {limit:g}s for {what}; last seen: {shown(value)}")
        time.sleep(interval)


def shown(value: Any) -> str:
    """repr(value), its start and end only when it is long (a log, a whole thread)."""
    text = repr(value)
    if len(text) <= _SHOWN:
        return text
    half = _SHOWN // 2
    return f"{text[:half]} [... {len(text) - _SHOWN} characters ...] {text[-half:]}"
