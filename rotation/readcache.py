"""Reads made once per run of `Engine.advance`, and never for a destructive step's re-read.

One advance runs several steps of one rotation, and each used to read the app's secret and
the admin secret again (20 of the 26 Secrets Manager calls of a MySQL rotation). Within one
advance, a read is kept and served again, until Rotor writes anything: every AWS write (the
fence's botocore hook) and every write in `rotation.secrets` empties the cache.

Safety rule 7 stands: what a destructive action relies on is read from the world right
before it acts. `Context.act` and a kind's cancel run their reads inside `fresh()`, where
nothing is served from the advance's cache: a fresh block reads the world anew and shares
its reads only within itself (one look at the world, a few milliseconds long, of which the
facts are made), and forgets them when it ends. `Context.act`'s read before the gate and
its read after it are two blocks, so the second reads the world again. The admin
connection of each database is kept for the advance too (`connection`): it caches no data,
every query on it reads the world.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

_cache: ContextVar[dict[Hashable, Any] | None] = ContextVar("rotor_read_cache", default=None)
_connections: ContextVar[dict[Hashable, Any] | None] = ContextVar("rotor_connections",
                                                                  default=None)
_fresh: ContextVar[dict[Hashable, Any] | None] = ContextVar("rotor_read_fresh", default=None)


@contextmanager
def per_advance() -> Iterator[None]:
    """Keep reads for the block (one run of `advance`), then forget them."""
    reset = _cache.set({})
    opened: dict[Hashable, Any] = {}
    held = _connections.set(opened)
    try:
        yield
    finally:
        _cache.reset(reset)
        _connections.reset(held)
        for conn in opened.values():
            _close(conn)


@contextmanager
def connection(key: Hashable, open_: Callable[[], T]) -> Iterator[T]:
    """One connection per database for the advance (one admin login, not one a step).

    Outside an advance: opened and closed around the block. A block that raises closes it
    and forgets it, whatever state the session was left in."""
    opened = _connections.get()
    if opened is None:
        conn = open_()
        try:
            yield conn
        finally:
            _close(conn)
        return
    if key not in opened:
        opened[key] = open_()
    try:
        yield opened[key]
    except BaseException:
        _close(opened.pop(key, None))
        raise


def _close(conn: Any) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except Exception:  # closing a broken session: nothing left to do
        pass


@contextmanager
def fresh(*, join: bool = False) -> Iterator[None]:
    """Read from the world for the block: the facts of a destructive step, a cancel. With
    `join`, a block inside another fresh block shares that block's reads."""
    if join and _fresh.get() is not None:
        yield
        return
    reset = _fresh.set({})
    try:
        yield
    finally:
        _fresh.reset(reset)


def from_the_world(read: Callable[P, T]) -> Callable[P, T]:
    """Mark a function that reads a destructive action's facts: it never uses the advance's
    cache, whoever calls it (`Context.act` or a step directly); inside a fresh block it is
    part of that block's one look at the world."""
    @functools.wraps(read)
    def fresh_read(*args: P.args, **kwargs: P.kwargs) -> T:
        with fresh(join=True):
            return read(*args, **kwargs)
    return fresh_read


def serving() -> bool:
    """Whether a read now may come from the advance's cache."""
    return _cache.get() is not None and _fresh.get() is None


def read(key: Hashable, load: Callable[[], T], copy: Callable[[T], T] = lambda v: v) -> T:
    """`load()` once per advance for `key` (once per fresh block inside one); callers get
    `copy(value)` so they cannot change what the next caller is served."""
    scope = _fresh.get()
    cache = scope if scope is not None else _cache.get()
    if cache is None:
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
    for cache in (_cache.get(), _fresh.get()):
        if cache is not None:
            cache.clear()
