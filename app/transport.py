"""The data plane: length-framed messages of a JSON header and raw tensor bytes over TCP.

A step travels ingress -> stage 0 -> ... -> last stage -> ingress, each hop one message on a
persistent connection: the header says what to do and where to send the result (the remaining
route), the payload is the tensors' bytes, never pickled Python objects.
"""

from __future__ import annotations

import json
import socket
import struct
import threading

import torch

_LEN = struct.Struct("!Q")
DTYPES = {str(d).removeprefix("torch."): d for d in
          (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool)}


class ConnectionClosed(ConnectionError):
    """The peer closed the connection."""


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionClosed("connection closed by peer")
        got += n
    return buf


def send_message(sock: socket.socket, header: dict, tensors: list[torch.Tensor] = ()) -> None:
    """Sends one message: header length, header JSON, then each tensor's bytes.

    Args:
        sock: a connected socket.
        header: JSON-serialisable metadata (the tensors' dtypes and shapes are added).
        tensors: tensors on any device; they are copied to the CPU.
    """
    tensors = [t.detach().to("cpu").contiguous() for t in tensors]
    header = dict(header, tensors=[[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors])
    head = json.dumps(header).encode()
    payloads = [t.view(-1).view(torch.uint8).numpy() if t.numel() else b"" for t in tensors]
    total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in payloads)
    sock.sendall(_LEN.pack(len(head)) + head + _LEN.pack(total))
    for payload in payloads:
        sock.sendall(payload)


def recv_message(sock: socket.socket) -> tuple[dict, list[torch.Tensor]]:
    """Receives one message sent by `send_message`.

    Returns:
        (header, tensors) with the tensors on the CPU.

    Raises:
        ConnectionClosed: the peer closed the connection.
    """
    (head_len,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    header = json.loads(_recv_exact(sock, head_len))
    (total,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    payload = _recv_exact(sock, total) if total else bytearray()
    tensors, offset = [], 0
    for dtype_name, shape in header.pop("tensors"):
        dtype = DTYPES[dtype_name]
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * torch.empty((), dtype=dtype).element_size()
        raw = torch.frombuffer(payload, dtype=torch.uint8, offset=offset, count=size) if size else \
            torch.empty(0, dtype=torch.uint8)
        tensors.append(raw.view(dtype).reshape(shape))
        offset += size
    return header, tensors


def connect(address: str, timeout: float | None = None) -> socket.socket:
    """Opens a TCP connection to "host:port" with Nagle's algorithm off (steps are latency-bound)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Connections:
    """Persistent outgoing connections, one per address, safe to share between threads."""

    def __init__(self, connect_timeout: float = 10.0):
        self._socks: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._connect_timeout = connect_timeout

    def send(self, address: str, header: dict, tensors: list[torch.Tensor] = ()) -> None:
        """Sends a message to `address`, reconnecting once if the old connection broke."""
        with self._lock:
            for attempt in range(2):
                sock = self._socks.get(address)
                try:
                    if sock is None:
                        sock = self._socks[address] = connect(address, self._connect_timeout)
                    send_message(sock, header, tensors)
                    return
                except OSError:
                    self._drop(address)
                    if attempt:
                        raise

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


def serve_connections(server: socket.socket, on_message, on_close=None) -> threading.Thread:
    """Accepts connections on `server` and calls `on_message(header, tensors)` for each message.

    Each connection is read by its own daemon thread; returns the accepting thread.
    """

    def read(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                on_message(*recv_message(sock))
        except (ConnectionClosed, OSError):
            pass
        finally:
            sock.close()
            if on_close is not None:
                on_close()

    def accept() -> None:
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return  # listening socket closed
            threading.Thread(target=read, args=(sock,), daemon=True, name="stagewise-recv").start()

    thread = threading.Thread(target=accept, daemon=True, name="stagewise-accept")
    thread.start()
    return thread
