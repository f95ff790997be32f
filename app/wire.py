"""The data plane's wire format, in one place: typed messages, their framing, their checks, and
the handshake that lets only the application's own processes talk.

Every connection, in both directions, starts with a challenge and response over a
per-application secret (created by the ingress, handed to the stages only through Ray, see
`app.registry`): each side sends a random nonce and proves it knows the secret with an HMAC of
both nonces, before any message is read. Messages then travel in clear text, as Ray's own object
transfers do: the cluster network should be private.

A message is `!Q` header length, the header (a JSON object), `!Q` payload length, the payload
(the tensors' bytes). Decoding checks everything before anything reaches compute or the engine:
sizes against `Limits` (before allocating), a known kind with its fields of the right types,
known dtypes, shapes that are non-negative and add up to the payload.

    Step      ingress/stage -> stage   a batch to compute: rows' KV blocks per remaining stage, starts,
                                       new tokens, the route on (next stages..., the reply address);
                                       its rows padded to the longest, or packed in one row
    Result    last stage -> ingress    a step's tokens, sampled on the last stage as each row's spec says
                                       (with log-probabilities and alternatives where asked), and the
                                       log-probabilities of the prompt tokens of rows that score them
    Error     stage -> ingress         a step failed (message)
    Released  ingress -> stage         a draining replica holds no sequence any more
    Demand    ingress -> stage         sequences held and waiting, for autoscaling
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import socket
import struct
from dataclasses import dataclass, field

import torch

from app.sequence import WANT_NOTHING, WANT_SAMPLE, WANT_TOKEN  # noqa: F401 - what a row wants back
from stages.sampler import Sampled, SamplingSpec

LEN = struct.Struct("!Q")
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
HANDSHAKE_TIMEOUT_S = 5.0
DTYPES = {str(d).removeprefix("torch."): d for d in
          (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool)}


class WireError(ValueError):
    """A message or a handshake that is refused; the connection is closed."""


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts before it allocates.

    Attributes:
        max_header_bytes: a header's JSON.
        max_payload_bytes: a message's tensors together (a prefill's activations, a step's logits).
        max_rows: rows (sequences) in one step.
    """

    max_header_bytes: int = 1 << 20
    max_payload_bytes: int = 1 << 30
    max_rows: int = 4096


@dataclass(frozen=True)
class Step:
    step: int
    route: tuple[str, ...]  # the next stages' addresses, then the reply address
    tables: tuple[tuple[tuple[int, ...], ...], ...]  # per stage from this one on, each row's KV cache blocks
    starts: tuple[int, ...]
    num_new: tuple[int, ...]
    all_logits: bool
    inputs: torch.Tensor = field(compare=False)
    # per row, what the last stage returns (WANT_*); empty: every row's logits
    want: tuple[int, ...] = ()
    # per row with `want`: how a WANT_SAMPLE row samples (None for the others)
    sampling: tuple[SamplingSpec | None, ...] = ()
    # per row with `all_logits`: None, or (alternatives, the token ids its positions predict) of a
    # row that scores its prompt (echo with log-probabilities)
    scoring: tuple[tuple[int, tuple[int, ...]] | None, ...] = ()
    # per stage from this one on, (source, destination) KV blocks to copy before the step (a
    # beam that writes into blocks it shared with another); empty: none anywhere
    copies: tuple[tuple[tuple[int, int], ...], ...] = ()
    # per row, its LoRA adapter (0: none; i: the stages' i-th); empty: none in the step
    adapters: tuple[int, ...] = ()

    kind = "step"


@dataclass(frozen=True)
class Result:
    step: int
    # (B, V) or (B, T, V) without a step's `want`; else None
    logits: torch.Tensor | None = field(compare=False)
    # with a step's `want`: each row's token, and log-probabilities where asked (then those of
    # the scored prompt positions, see `Step.scoring`)
    sampled: Sampled | None = field(default=None, compare=False)

    kind = "result"


@dataclass(frozen=True)
class Error:
    step: int
    message: str

    kind = "error"


@dataclass(frozen=True)
class Released:
    kind = "released"


@dataclass(frozen=True)
class Demand:
    sequences: int
    waiting: float

    kind = "demand"


Message = Step | Result | Error | Released | Demand
KINDS = {cls.kind: cls for cls in (Step, Result, Error, Released, Demand)}


# ---- encoding ----

def encode(message: Message) -> tuple[bytes, list[torch.Tensor]]:
    """The frame's head (lengths and header) and the tensors whose bytes follow it."""
    tensors = [t.detach().to("cpu").contiguous() for t in _tensors_of(message)]
    header = {"kind": message.kind, **_fields_of(message),
              "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors]}
    head = json.dumps(header).encode()
    total = sum(t.numel() * t.element_size() for t in tensors)
    return LEN.pack(len(head)) + head + LEN.pack(total), tensors


def buffers(message: Message) -> list:
    """The message's bytes as written: its head, then each tensor's bytes (not copied)."""
    head, tensors = encode(message)
    return [head] + [t.view(-1).view(torch.uint8).numpy() for t in tensors if t.numel()]


def send(sock: socket.socket, message: Message) -> None:
    for buffer in buffers(message):
        sock.sendall(buffer)


def _tensors_of(message: Message) -> list[torch.Tensor]:
    if isinstance(message, Step):
        return [message.inputs]
    if isinstance(message, Result):
        return ([message.logits] if message.logits is not None else []) + list(message.sampled or ())
    return []


def _fields_of(message: Message) -> dict:
    if isinstance(message, Step):
        return {"step": message.step, "route": list(message.route), "tables": [[list(t) for t in s] for s in message.tables],
                "starts": list(message.starts), "num_new": list(message.num_new), "all_logits": message.all_logits,
                "want": list(message.want),
                "sampling": [spec.to_wire() if spec is not None else None for spec in message.sampling],
                "scoring": [list(entry) if entry is not None else None for entry in message.scoring],
                "copies": [[list(pair) for pair in stage] for stage in message.copies],
                "adapters": list(message.adapters)}
    if isinstance(message, Result):
        return {"step": message.step}
    if isinstance(message, Error):
        return {"step": message.step, "message": message.message}
    if isinstance(message, Demand):
        return {"sequences": message.sequences, "waiting": message.waiting}
    return {}


# ---- decoding ----

def recv(sock: socket.socket, limits: Limits) -> Message:
    """Reads and checks one message.

    Raises:
        ConnectionError: the peer closed the connection.
        WireError: the message breaks the format or the limits (nothing larger than the limits
            was allocated).
    """
    (head_len,) = LEN.unpack(recv_exact(sock, LEN.size))
    if head_len > limits.max_header_bytes:
        raise WireError(f"header of {head_len} bytes over the limit of {limits.max_header_bytes}")
    try:
        header = json.loads(recv_exact(sock, head_len))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(f"header is {type(header).__name__}, not an object")
    (total,) = LEN.unpack(recv_exact(sock, LEN.size))
    specs = _tensor_specs(header.pop("tensors", None), total, limits)
    payload = recv_exact(sock, total) if total else bytearray()
    tensors, offset = [], 0
    for dtype, shape, size in specs:
        raw = torch.frombuffer(payload, dtype=torch.uint8, offset=offset, count=size) if size else \
            torch.empty(0, dtype=torch.uint8)
        tensors.append(raw.view(dtype).reshape(shape))
        offset += size
    return _message(header, tensors, limits)


def _tensor_specs(specs, total: int, limits: Limits) -> list[tuple[torch.dtype, list[int], int]]:
    if total > limits.max_payload_bytes:
        raise WireError(f"payload of {total} bytes over the limit of {limits.max_payload_bytes}")
    if not isinstance(specs, list) or len(specs) > 4:
        raise WireError("tensors: a list of at most 4 [dtype, shape] pairs expected")
    out, size_sum = [], 0
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in DTYPES and isinstance(spec[1], list)
                and len(spec[1]) <= 4 and all(type(d) is int and 0 <= d <= max(total, 1 << 20) for d in spec[1])):
            raise WireError(f"tensor {str(spec)[:80]}: a known dtype and at most 4 non-negative dims expected")
        dtype = DTYPES[spec[0]]
        size = math.prod(spec[1]) * torch.empty((), dtype=dtype).element_size()
        size_sum += size
        out.append((dtype, spec[1], size))
    if size_sum != total:
        raise WireError(f"the tensors' shapes make {size_sum} bytes, the payload has {total}")
    return out


def _ints(value, name: str, low: int = 0, high: int = 2**62) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and low <= v <= high for v in value):
        raise WireError(f"{name}: a list of integers in [{low}, {high}] expected")
    return tuple(value)


def _message(header: dict, tensors: list[torch.Tensor], limits: Limits) -> Message:
    kind = header.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown kind {str(kind)[:40]!r}")
    if kind in ("step", "result", "error") and type(header.get("step")) is not int:
        raise WireError(f"{kind}: an integer step id expected")
    expected_tensors = {"step": (1,), "result": (1, 4)}.get(kind, (0,))
    if len(tensors) not in expected_tensors:
        raise WireError(f"{kind}: {' or '.join(map(str, expected_tensors))} tensors expected, got {len(tensors)}")
    if kind == "step":
        return _step(header, tensors[0], limits)
    if kind == "result":
        return _result(header["step"], tensors)
    if kind == "error":
        if not isinstance(header.get("message"), str):
            raise WireError("error: a message string expected")
        return Error(header["step"], header["message"][:2000])
    if kind == "demand":
        sequences, waiting = header.get("sequences"), header.get("waiting")
        if type(sequences) is not int or sequences < 0 or type(waiting) not in (int, float) or not 0 <= waiting < 1e9:
            raise WireError("demand: non-negative sequences and waiting expected")
        return Demand(sequences, float(waiting))
    return Released()


def _step(header: dict, inputs: torch.Tensor, limits: Limits) -> Step:
    route = header.get("route")
    if not isinstance(route, list) or not route or not all(isinstance(a, str) and len(a) < 256 for a in route):
        raise WireError("step: a non-empty route of addresses expected")
    tables = header.get("tables")
    if not isinstance(tables, list) or len(tables) != len(route) or not all(isinstance(s, list) for s in tables):
        raise WireError("step: one list of block tables per stage left on the route expected")
    tables = tuple(tuple(_ints(t, "tables", 0, 1 << 24) for t in s) for s in tables)
    starts = _ints(header.get("starts"), "starts")
    num_new = _ints(header.get("num_new"), "num_new", 1)
    rows = len(starts)
    if not 0 < rows <= limits.max_rows or len(num_new) != rows or any(len(s) != rows for s in tables):
        raise WireError(f"step: 1 to {limits.max_rows} rows, the same number in tables, starts and num_new")
    padded = inputs.dim() in (2, 3) and inputs.shape[0] == rows and inputs.shape[1] >= max(num_new)
    packed = inputs.dim() in (2, 3) and inputs.shape[0] == 1 and inputs.shape[1] == sum(num_new)
    if not (padded or packed):
        raise WireError(f"step: inputs of shape {list(inputs.shape)} do not fit {rows} rows of up to "
                        f"{max(num_new)} tokens, padded, nor the {sum(num_new)} tokens of all rows packed in one")
    if not isinstance(header.get("all_logits", False), bool):
        raise WireError("step: all_logits must be a boolean")
    want = _ints(header.get("want", []), "want", WANT_NOTHING, WANT_SAMPLE)
    sampling = header.get("sampling", [])
    if want and len(want) != rows or not isinstance(sampling, list) or len(sampling) != len(want) or any(
            (spec is None) != (w != WANT_SAMPLE) for spec, w in zip(sampling, want)):
        raise WireError("step: want, when given, names what each row wants back, and sampling how each "
                        "sampled row samples")
    try:
        sampling = tuple(None if spec is None else SamplingSpec.from_wire(spec, n) for spec, n in zip(sampling, num_new))
    except ValueError as exc:
        raise WireError(f"step: {exc}") from None
    scoring = header.get("scoring", [])
    if not isinstance(scoring, list) or scoring and (len(scoring) != rows or not header.get("all_logits")) or not all(
            entry is None or isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int
            and 0 <= entry[0] <= 20 and isinstance(entry[1], list) and len(entry[1]) <= n
            and all(type(t) is int and 0 <= t < 1 << 24 for t in entry[1]) for entry, n in zip(scoring, num_new)):
        raise WireError("step: scoring, when given, is per row None or [alternatives, the token ids its positions "
                        "predict], in a step with all_logits")
    scoring = tuple(None if entry is None else (entry[0], tuple(entry[1])) for entry in scoring)
    copies = header.get("copies", [])
    if not isinstance(copies, list) or copies and len(copies) != len(route) or not all(
            isinstance(stage, list) and len(stage) <= limits.max_rows * 64 and all(
                isinstance(pair, list) and len(pair) == 2 and all(type(b) is int and 0 <= b < 1 << 24 for b in pair)
                for pair in stage) for stage in copies):
        raise WireError("step: copies, when given, are per stage left on the route a list of [source, "
                        "destination] blocks")
    copies = tuple(tuple((pair[0], pair[1]) for pair in stage) for stage in copies)
    adapters = _ints(header.get("adapters", []), "adapters", 0, 1 << 16)
    if adapters and len(adapters) != rows:
        raise WireError("step: adapters, when given, name one LoRA adapter (or 0) per row")
    return Step(header["step"], tuple(route), tables, starts, num_new, header.get("all_logits", False), inputs, want,
                sampling, scoring, copies, adapters)


def _result(step: int, tensors: list[torch.Tensor]) -> Result:
    if len(tensors) == 1:
        if tensors[0].dtype != torch.float32 or tensors[0].dim() not in (2, 3):
            raise WireError("result: float32 logits of 2 or 3 dims expected")
        return Result(step, tensors[0])
    sampled = Sampled(*tensors)
    if not (sampled.tokens.dtype == sampled.top_ids.dtype == torch.int64
            and sampled.logprobs.dtype == sampled.top_logprobs.dtype == torch.float32
            and sampled.tokens.dim() == sampled.logprobs.dim() == 1 and sampled.top_ids.dim() == 1
            and sampled.top_ids.shape == sampled.top_logprobs.shape):
        raise WireError("result: int64 tokens and float32 log-probabilities of each row, and int64 ids and float32 "
                        "log-probabilities of the alternatives, each of 1 dim, expected")
    return Result(step, None, sampled)


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("connection closed by peer")
        got += n
    return buf


# ---- the handshake ----

def _mac(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, role + first + second, hashlib.sha256).digest()


def prove_client(sock: socket.socket, secret: bytes) -> None:
    """The connecting side: answers the server's challenge, then checks the server's answer.

    Raises:
        WireError: the server does not know the secret.
    """
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    server_nonce = bytes(recv_exact(sock, NONCE_BYTES))
    client_nonce = os.urandom(NONCE_BYTES)
    sock.sendall(client_nonce + _mac(secret, b"client", server_nonce, client_nonce))
    if not hmac.compare_digest(bytes(recv_exact(sock, MAC_BYTES)), _mac(secret, b"server", client_nonce, server_nonce)):
        raise WireError("the server did not prove that it knows the application's secret")
    sock.settimeout(None)


def prove_server(sock: socket.socket, secret: bytes | None) -> None:
    """The accepting side: challenges the client, checks its answer, then proves itself.

    Raises:
        WireError: the client does not know the secret (or this side knows none yet).
    """
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    server_nonce = os.urandom(NONCE_BYTES)
    sock.sendall(server_nonce)
    answer = bytes(recv_exact(sock, NONCE_BYTES + MAC_BYTES))
    client_nonce, mac = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if secret is None or not hmac.compare_digest(mac, _mac(secret, b"client", server_nonce, client_nonce)):
        raise WireError("the client did not prove that it knows the application's secret")
    sock.sendall(_mac(secret, b"server", client_nonce, server_nonce))
    sock.settimeout(None)
