"""Reads made once per run of `Engine.advance`, and never for a destructive step's re-read.

One advance runs several steps of one rotation, and each used to read the app's secret and
the admin secret again (20 of the 26 Secrets Manager calls of a MySQL rotation). Within one
advance, a read is kept and served again, until Rotor writes anything: every AWS write (the
fence's botocore hook) and every write in `rotation.secrets` empties the cache.

Safety rule 7 stands: what a destructive action relies on is read from the world right
before it acts. `Context.act` and a kind's cancel run their reads inside `fresh()`, where
nothing is served from the cache (and nothing read there is kept either).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

_cache: ContextVar[dict[Hashable, Any] | None] = ContextVar("rotor_read_cache", default=None)
_fresh: ContextVar[bool] = ContextVar("rotor_read_fresh", default=False)


@contextmanager
def per_advance() -> Iterator[None]:
    """Keep reads for the block (one run of `advance`), then forget them."""
    reset = _cache.set({})
    try:
        yield
    finally:
        _cache.reset(reset)


@contextmanager
def fresh() -> Iterator[None]:
    """Read from the world for the block: the facts of a destructive step, a cancel."""
    reset = _fresh.set(True)
    try:
        yield
    finally:
        _fresh.reset(reset)


def serving() -> bool:
    """Whether a read now may come from the cache."""
    return _cache.get() is not None and not _fresh.get()


def read(key: Hashable, load: Callable[[], T], copy: Callable[[T], T] = lambda v: v) -> T:
    """`load()` once per advance for `key`; callers get `copy(value)` so they cannot change
    what the next caller is served."""
    cache = _cache.get()
    if cache is None or _fresh.get():
        return load()
    if key not in cache:
        try:
            cache[key] = _Value(load())
        except Exception as exc:  # a failed read fails the same way again in this advance,
            cache[key] = _Failed(exc)  # without a second wait on a hung or failing endpoint
            raise
    kept = cache[key]
    if isinstance(kept, _Failed):
        raise kept.error
    return copy(kept.value)


class _Value:
    def __init__(self, value: Any) -> None:
        self.value = value


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error


def invalidate() -> None:
    """Rotor wrote something: what was read before may be stale now."""
    cache = _cache.get()
    if cache is not None:
        cache.clear()
