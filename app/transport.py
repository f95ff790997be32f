"""The data plane's connections: authenticated TCP between the application's own processes.

A step travels ingress -> stage 0 -> ... -> last stage -> ingress, each hop one message (see
`app.wire`, which owns the format, its checks and the handshake) on a persistent connection.
Every connection starts with the handshake; a peer that fails it, or later sends a message that
breaks the format, is refused: the connection is closed, the event logged and counted, and
nothing it sent reaches compute or the engine.
"""

from __future__ import annotations

import logging
import socket
import threading

from app import wire

logger = logging.getLogger(__name__)


def _secret_of(secret) -> bytes | None:
    return secret() if callable(secret) else secret


def connect(address: str, timeout: float | None = None) -> socket.socket:
    """Opens a TCP connection to "host:port" with Nagle's algorithm off (steps are latency-bound)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class HandshakeFailed(ConnectionRefusedError):
    """The peer is there but the handshake did not complete: a wrong secret, or one it does not
    know yet (a stage that has just started), or a peer too busy to answer in time."""


def connect_authenticated(address: str, secret, timeout: float | None = None) -> socket.socket:
    """A connection to "host:port" on which both sides have proved they know `secret`.

    Raises:
        OSError: the peer cannot be reached (`ConnectionRefusedError`: nothing listens there), or
            the handshake failed (`HandshakeFailed`; `wire.WireError` counts as a connection
            failure here: the step goes elsewhere or fails).
    """
    key = _secret_of(secret)
    if key is None:
        raise HandshakeFailed("no application secret yet: cannot prove who we are")
    sock = connect(address, timeout)
    try:
        wire.prove_client(sock, key)
    except (wire.WireError, OSError) as exc:
        sock.close()
        raise HandshakeFailed(f"{address}: handshake failed: {exc}") from None
    return sock


class Connections:
    """Persistent authenticated outgoing connections, one per address, safe to share between threads.

    Args:
        secret: the application's secret (bytes), or a callable returning it (None: not known yet).
        connect_timeout: seconds to connect and complete the handshake.
    """

    def __init__(self, secret, connect_timeout: float = 10.0):
        self._socks: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._secret = secret
        self._connect_timeout = connect_timeout

    def send(self, address: str, message: wire.Message) -> None:
        """Sends a message to `address`, reconnecting once if the old connection broke."""
        with self._lock:
            for attempt in range(2):
                sock = self._socks.get(address)
                try:
                    if sock is None:
                        sock = self._socks[address] = connect_authenticated(address, self._secret,
                                                                            self._connect_timeout)
                    wire.send(sock, message)
                    return
                except OSError:
                    self._drop(address)
                    if attempt:
                        raise

    def send_nowait(self, address: str, message: wire.Message):
        """Sends a message to `address` if that can be done without blocking: the connection
        is open and not in use, and its socket takes the message at once.

        Returns:
            None when the message went whole; otherwise a function to call from a thread, which
            sends it (connecting first if needed) or the part that did not go, and may block.
        """
        def send() -> None:  # connects if needed, and waits for the connection
            self.send(address, message)

        if address not in self._socks:  # not connected yet: the thread connects
            return send
        parts = wire.buffers(message)  # encoded before the lock is taken: an error here leaves it free
        if not self._lock.acquire(blocking=False):
            return send
        sock, sent = self._socks.get(address), 0
        try:
            if sock is not None:
                sent = sock.sendmsg(parts, [], socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        except OSError:
            self._drop(address)  # `send` connects again
        if sock is None or sent == 0:
            self._lock.release()
            return send
        rest = b"".join(parts)[sent:]
        if not rest:
            self._lock.release()
            return None

        def send_rest() -> None:  # the message is half written: the connection is ours until it is whole
            try:
                sock.sendall(rest)
            except OSError:
                self._drop(address)
                raise
            finally:
                self._lock.release()
        return send_rest

    def _drop(self, address: str) -> None:
        sock = self._socks.pop(address, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        with self._lock:
            for address in list(self._socks):
                self._drop(address)


def listen(host: str = "127.0.0.1", port: int = 0) -> tuple[socket.socket, str]:
    """A listening socket and its "host:port" address (an ephemeral port by default)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(64)
    return server, f"{host}:{server.getsockname()[1]}"


def serve_connections(server: socket.socket, on_message, secret, limits: wire.Limits = wire.Limits(),
                      on_refused=None, on_close=None) -> threading.Thread:
    """Accepts connections on `server`; for each authenticated one, calls `on_message(message)` with
    every message it sends (checked by `app.wire`).

    A connection that fails the handshake or sends a message that breaks the format is refused:
    closed, logged with the peer's address and the reason, and `on_refused(reason)` is called.
    `on_message` may raise `wire.WireError` to refuse a message that is well-formed but not
    acceptable (a route through an unknown replica, say). Each connection is read by its own daemon
    thread; returns the accepting thread.

    Args:
        secret: the application's secret (bytes), or a callable returning it (None: refuse all).
    """

    def read(sock: socket.socket, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stage = "handshake"
        try:
            wire.prove_server(sock, _secret_of(secret))
            stage = "message"
            while True:
                on_message(wire.recv(sock, limits))
        except wire.WireError as exc:
            logger.warning("data plane: refused %s (%s): %s", peer, stage, exc)
            if on_refused is not None:
                on_refused(stage)
        except (ConnectionError, OSError):
            if stage == "handshake":  # a stranger that connected and left, or timed out
                logger.warning("data plane: refused %s (handshake): it did not complete the handshake", peer)
                if on_refused is not None:
                    on_refused(stage)
        finally:
            sock.close()
            if on_close is not None:
                on_close()

    def accept() -> None:
        while True:
            try:
                sock, peer = server.accept()
            except OSError:
                return  # listening socket closed
            threading.Thread(target=read, args=(sock, f"{peer[0]}:{peer[1]}"), daemon=True,
                             name="stagewise-recv").start()

    thread = threading.Thread(target=accept, daemon=True, name="stagewise-accept")
    thread.start()
    return thread
