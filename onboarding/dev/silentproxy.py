"""A TCP proxy whose connections can die silently, for tests and rehearsals.

What a NAT or a firewall does when it forgets a connection: from then on, whatever either side
sends on it vanishes, and neither side hears a FIN or a RST. New connections, made afterwards,
go through as before. This machine's kernel has no ``netem``; a proxy that stops forwarding
without closing is the portable way to stage it, on loopback only.

    proxy = SilentProxy(("127.0.0.1", nats_port)).start()
    ... a process connects to proxy.url ...
    proxy.silence()   # every connection open now goes quiet for ever; new ones work
    proxy.stop()
"""

from __future__ import annotations

import socket
import threading


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.silent = threading.Event()

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self.silent.is_set():
                    sink.sendall(data)
                # Silent: read and dropped, as a black hole drops the packets; nothing is
                # closed, so neither side learns of it but by a timeout of its own.
        except OSError:
            pass
        if not self.silent.is_set():
            for sock in (self.client, self.server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for sock in (self.client, self.server):
            try:
                sock.close()
            except OSError:
                pass


class SilentProxy:
    """Forwards ``host``:<port> (127.0.0.1 unless told) to ``target``; :meth:`silence` kills the
    open connections silently (see the module). ``host`` may be the address of a test host of
    one's own (a network namespace's veth, tests/test_partitions.py)."""

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> SilentProxy:
        threading.Thread(target=self._accept, name="silent-proxy", daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=pair.pump, args=(source, sink), daemon=True).start()

    def silence(self) -> int:
        """Every connection open now goes quiet for ever; returns how many."""
        with self._lock:
            for pair in self._pairs:
                pair.silent.set()
            return len(self._pairs)

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for pair in self._pairs:
                pair.close()
            self._pairs.clear()
