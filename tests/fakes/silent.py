"""A TCP server that accepts every connection and never answers: a hung peer, for timeouts."""

from __future__ import annotations

import socket
import threading


class SilentServer:
    """Listens on 127.0.0.1; holds every connection open and sends nothing."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self._sock.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            self._held.append(conn)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        except OSError:
            pass
        self._sock.close()
        for conn in self._held:
            conn.close()
        self._thread.join(5)
