"""A small TCP proxy for fault tests: put it between nodes and a shared server, then cut and restore.

``cut()`` closes every open connection and refuses new ones (accepts and closes them at once), the way a broker
restart looks to a client, without touching the shared server. ``restore()`` lets connections through again.
``drop_next_request()`` closes the connection of the next command a client sends, without forwarding it.
One named selector thread pumps every connection; ``close()`` stops and joins it.

    with TcpProxy("127.0.0.1", 6379) as proxy:
        url = proxy.url("redis://127.0.0.1:6379/0")   # redis://127.0.0.1:<proxy port>/0
        ...
        proxy.cut(); ...; proxy.restore()
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``.

    Parameters:
      target_host, target_port: the real server.
      port: where to listen (0: a free port, see :attr:`port`).
    """

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._cut = False
        self._cut_requested = threading.Event()
        self._clients: set[socket.socket] = set()
        self._drop_next_request = threading.Event()
        self.requests_dropped = 0
        self._stopping = False
        self.connections_accepted = 0
        self._thread = threading.Thread(target=self._loop, name=f"tcpproxy-{self.port}", daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str, default_port: int) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or default_port)

    @classmethod
    def for_broker(cls, url: str) -> TcpProxy:
        """A proxy to the broker of ``url``: Redis (default port 6379) or RabbitMQ (5672)."""
        return cls.for_url(url, 6379 if url.startswith("redis") else 5672)

    def url(self, url: str) -> str:
        """``url`` with its host:port replaced by this proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit((parts.scheme, f"{userinfo}127.0.0.1:{self.port}", parts.path, parts.query, parts.fragment))

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._peers) // 2

    def cut(self) -> None:
        """Close every connection now and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._cut = True
        self._cut_requested.set()
        self._wait_for(lambda: self.open_connections == 0)

    def drop_next_request(self) -> None:
        """The next bytes a client sends on an open connection are not forwarded: that connection is closed instead
        (the server never sees the command; the client finds its connection closed while it waits for the reply)."""
        self._drop_next_request.set()

    def restore(self) -> None:
        """Let connections through again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Close everything and join the thread."""
        self._stopping = True
        self._thread.join(10)
        self._selector.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_for(self, predicate: object, timeout: float = 10.0) -> None:
        deadline = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if predicate():  # type: ignore[operator]
                return
            deadline.wait(0.01)
        raise AssertionError("tcpproxy: connections did not close in time")

    # --- the pump ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            if self._cut_requested.is_set():
                self._cut_requested.clear()
                for sock in list(self._peers):
                    self._drop(sock)
            for key, _ in self._selector.select(timeout=0.05):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj in self._peers:
                    self._pump(key.fileobj)  # type: ignore[arg-type]
        for sock in list(self._peers):
            self._drop(sock)
        self._listener.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        with self._lock:
            refused = self._cut
        if refused:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        self.connections_accepted += 1
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._peers[client] = upstream
            self._peers[upstream] = client
            self._clients.add(client)
        self._selector.register(client, selectors.EVENT_READ, None)
        self._selector.register(upstream, selectors.EVENT_READ, None)

    def _pump(self, sock: socket.socket) -> None:
        peer = self._peers[sock]
        try:
            data = sock.recv(65536)
            if data and sock in self._clients and self._drop_next_request.is_set():
                self._drop_next_request.clear()
                self.requests_dropped += 1
                data = b""  # dropped below, unforwarded
            if data:
                # A peer that does not read for 5 s is dropped rather than stalling every other connection.
                peer.settimeout(5.0)
                peer.sendall(data)
                peer.setblocking(False)
                return
        except OSError:
            pass
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._peers.pop(sock, None)
            if peer is not None:
                self._peers.pop(peer, None)
            self._clients.difference_update((sock, peer))
        for s in (sock, peer):
            if s is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            with contextlib.suppress(OSError):
                s.close()
