"""moto's server on a free loopback port, as `rotor demo` and the tests run it.

moto's server finds a request's service by listing its own package's directory (a listdir
and ~200 isdir calls) on every request; the list cannot change while the server runs, so it
is read once. Without that, a fleet of 50 rotations spent a fifth of its CPU there.
"""

from __future__ import annotations

import functools
import logging

from moto import backends
from moto.server import ThreadedMotoServer

_list_modules = backends.list_of_moto_modules


@functools.cache
def _modules_once() -> tuple[str, ...]:
    return tuple(_list_modules())


def start() -> ThreadedMotoServer:
    """A started server; `get_host_and_port()` says where."""
    backends.list_of_moto_modules = _modules_once
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server
