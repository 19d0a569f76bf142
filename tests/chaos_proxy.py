"""A TCP proxy that breaks connections: real sockets, real mid-stream drops, for the client tests.

Each connection is relayed to ``target``; the server-to-client direction is cut (both sockets reset) after
a random number of bytes drawn from a seeded generator, so a run is repeatable. A cut can land anywhere:
inside the response headers, inside an SSE event, between events. ``refuse_next`` connections are reset
as soon as they are accepted (a failure before the first byte).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from typing import Self


def _reset(sock: socket.socket) -> None:
    """End the connection at once, as a dying network path or middlebox would (SO_LINGER 0: a reset).

    ``shutdown`` first: a bare ``close`` does nothing while the other relay thread is blocked in ``recv`` on
    the same socket (the kernel keeps the socket until that call returns).
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class ChaosProxy:
    def __init__(self, target_port: int, seed: int, cut_bytes: tuple[int, int] = (40, 3000)) -> None:
        self.target_port = target_port
        self.rng = random.Random(seed)
        self.cut_bytes = cut_bytes
        self.cutting = True  # False: relay faithfully
        self.refuse_next = 0
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                if self.refuse_next > 0:
                    self.refuse_next -= 1
                    _reset(client)
                    continue
                budget = self.rng.randint(*self.cut_bytes) if self.cutting else None
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, budget), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if budget is not None and len(data) >= budget:
                    dst.sendall(data[:budget])
                    with self._lock:
                        self.cuts += 1
                    break
                if budget is not None:
                    budget -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        _reset(src)
        _reset(dst)
