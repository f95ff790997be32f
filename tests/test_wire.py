"""Only the application's own processes talk on the data plane (issue 15): every attack below comes
from a plain socket client that is not part of the application, and is refused without harm."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest
import torch

from app import wire
from app.transport import connect
from tests.reference import greedy_text
from tests.local import local_app

TWO = [(0, 3), (3, 6)]
Q = struct.Struct("!Q")


def frame(header, payload: bytes = b"", head_len: int | None = None) -> bytes:
    """A message in the wire's framing (as a stranger who read the code would send it)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return Q.pack(len(head) if head_len is None else head_len) + head + Q.pack(len(payload)) + payload


def step_header(route, tables=(((0,),),), tensor=("int64", [1, 1]), starts=(0,), num_new=(1,)) -> dict:
    """A step of one row per stage left on the route: `tables[stage][row]` its blocks there."""
    return {"kind": "step", "step": 7, "route": route, "tables": [[list(t) for t in s] for s in tables],
            "starts": list(starts), "num_new": list(num_new), "all_logits": False, "tensors": [list(tensor)]}


TOKEN = struct.pack("<q", 5)  # one int64 token id


class Listener:
    """A stranger's own port: records whatever any stage sends it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        while data := conn.recv(65536):
            self.received += data


def stranger_sends(address: str, data: bytes) -> bool:
    """Sends raw bytes; True if the peer closed the connection on us (refused; a message too short
    for the handshake waits out its timeout first)."""
    sock = connect(address, timeout=5)
    sock.settimeout(wire.HANDSHAKE_TIMEOUT_S + 3)
    try:
        sock.sendall(data)
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()


def test_strangers_are_refused_and_nothing_is_computed_for_them(checkpoint):
    model_dir = checkpoint("llama")
    with local_app(model_dir, TWO) as (client, engine, servers):
        first, last = servers
        spy = Listener()
        attacks = {
            # a step with no route used to kill the compute thread
            "no route": frame({k: v for k, v in step_header([spy.address]).items() if k != "route"}, TOKEN),
            # compute for me, send the activations where I say, in blocks I choose (another user's cache)
            "compute for me": frame(step_header([last.address, spy.address], tables=(((0,),), ((0,),))), TOKEN),
            "drain": frame({"kind": "released", "tensors": []}),
            "autoscale": frame({"kind": "demand", "sequences": 99, "waiting": 99.0, "tensors": []}),
            "huge header": Q.pack(2**62),
        }
        for name, data in attacks.items():
            assert stranger_sends(first.address, data), name
        time.sleep(1)
        assert first.alive and last.alive
        assert first.load.steps == 0 and last.load.steps == 0  # nothing computed for a stranger
        assert not spy.received  # no byte sent where a stranger asked
        assert not first.released.is_set() and first.demand == {"sequences": 0, "waiting": 0.0}
        # ... and the application still serves
        r = client.post("/v1/completions", json={"model": "model", "prompt": "the", "max_tokens": 3})
        assert r.status_code == 200


def test_forged_results_change_no_one_s_tokens(checkpoint):
    model_dir = checkpoint("llama")
    expected = greedy_text(model_dir, "the city", 24)
    with local_app(model_dir, TWO, http=True) as (url, engine, servers):
        reply = engine.pipeline.reply_address
        stop = threading.Event()
        refused = []

        def forge():
            logits = torch.zeros(1, 1000)
            logits[0, 42] = 100.0
            while not stop.is_set():
                for step in range(200):  # guessable step ids
                    header = {"kind": "result", "step": step, "tensors": [["float32", [1, 1000]]]}
                    refused.append(stranger_sends(reply, frame(header, logits.numpy().tobytes())))
                    if stop.is_set():
                        return

        thread = threading.Thread(target=forge, daemon=True)
        thread.start()
        import httpx

        try:
            for _ in range(2):
                r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": "the city",
                                                               "max_tokens": 24, "min_tokens": 24, "temperature": 0},
                               timeout=120)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        finally:
            stop.set()
            thread.join()
        assert refused and all(refused)


@pytest.mark.parametrize("name, data", [
    ("header over the cap", Q.pack(2**40)),
    ("header not an object", frame([1, 2, 3])),
    ("header not JSON", frame(b"\xff\xfe{")),
    ("unknown kind", frame({"kind": "shutdown", "tensors": []})),
    ("unknown dtype", frame(step_header(["x:1"], tensor=("complex128", [1, 1])), TOKEN)),
    ("shape does not match the payload", frame(step_header(["x:1"], tensor=("int64", [1, 4])), TOKEN)),
    ("negative dimension", frame(step_header(["x:1"], tensor=("int64", [-1, -8])), TOKEN)),
    ("payload over the cap", frame(step_header(["x:1"]))[:-8] + Q.pack(2**50)),
    ("no route", frame({k: v for k, v in step_header(["x:1"]).items() if k != "route"}, TOKEN)),
    ("block beyond the cache", frame(step_header(["x:1"], tables=(((10**6,),),)), TOKEN)),
    ("fewer blocks than tokens", frame(step_header(["x:1"], tables=(((0,),),), starts=(16,)), TOKEN)),
    ("two rows write one position", frame(step_header(["x:1"], tables=(((3,), (3,)),), tensor=("int64", [2, 1]),
                                                      starts=(0, 0), num_new=(1, 1)), TOKEN * 2)),
    ("packed rows that do not add up", frame(step_header(["x:1"], tables=(((3,), (4,)),), tensor=("int64", [1, 3]),
                                                         starts=(0, 0), num_new=(1, 1)), TOKEN * 3)),
    ("packed rows write one position", frame(step_header(["x:1"], tables=(((3,), (3,)),), tensor=("int64", [1, 2]),
                                                         starts=(0, 0), num_new=(1, 1)), TOKEN * 2)),
    ("a row wants what no row can", frame(dict(step_header(["x:1"]), want=[3]), TOKEN)),
    ("want for fewer rows than there are", frame(dict(step_header(["x:1"], tables=(((3,), (4,)),),
                                                                  tensor=("int64", [2, 1]), starts=(0, 0),
                                                                  num_new=(1, 1)), want=[1]), TOKEN * 2)),
    ("a sampled row without its spec", frame(dict(step_header(["x:1"]), want=[2], sampling=[None]), TOKEN)),
    ("a spec for a greedy row", frame(dict(step_header(["x:1"]), want=[1], sampling=[{"key": 1}]), TOKEN)),
    ("a spec out of range", frame(dict(step_header(["x:1"]), want=[2], sampling=[{"key": 1, "top_p": 2}]), TOKEN)),
    ("penalties without the row's tokens", frame(dict(step_header(["x:1"]), want=[2],
                                                      sampling=[{"key": 1, "frequency_penalty": 1.0}]), TOKEN)),
    ("an unknown spec field", frame(dict(step_header(["x:1"]), want=[2], sampling=[{"key": 1, "x": 0}]), TOKEN)),
    ("scoring without all_logits", frame(dict(step_header(["x:1"]), want=[1], sampling=[None],
                                              scoring=[[0, [5]]]), TOKEN)),
    ("scoring more targets than tokens", frame(dict(step_header(["x:1"]), all_logits=True, want=[0],
                                                    sampling=[None], scoring=[[0, [5, 6]]]), TOKEN)),
    ("a block copy beyond the cache", frame(dict(step_header(["x:1"]), copies=[[[1, 10**6]]]), TOKEN)),
    ("two copies into one block", frame(dict(step_header(["x:1"]), copies=[[[1, 5], [2, 5]]]), TOKEN)),
    ("copies for another number of stages", frame(dict(step_header(["x:1"]), copies=[[], []]), TOKEN)),
    ("a LoRA adapter the stage does not hold", frame(dict(step_header(["x:1"]), adapters=[1]), TOKEN)),
    ("adapters for fewer rows than there are", frame(dict(step_header(["x:1"], tables=(((3,), (4,)),),
                                                                      tensor=("int64", [2, 1]), starts=(0, 0),
                                                                      num_new=(1, 1)), adapters=[0]), TOKEN * 2)),
    ("route through a stranger", frame(step_header(["10.9.9.9:1"]), TOKEN)),
])
def test_even_an_authenticated_peer_cannot_send_a_malformed_message(checkpoint, name, data):
    """A bug in one of our own processes: refused before compute, the connection closed, nothing dies."""
    model_dir = checkpoint("llama")
    with local_app(model_dir, [(0, 6)]) as (client, engine, servers):
        (server,) = servers
        server._known = lambda route: set(route) <= {engine.pipeline.reply_address}
        sock = connect(server.address, timeout=5)
        wire.prove_client(sock, engine.pipeline.secret)
        sock.settimeout(5)
        try:
            sock.sendall(data)
            assert sock.recv(1) == b""  # closed on us
        except ConnectionResetError:
            pass  # closed on us before it read all we sent
        sock.close()
        assert server.alive and server.load.steps == 0
        r = client.post("/v1/completions", json={"model": "model", "prompt": "the", "max_tokens": 2})
        assert r.status_code == 200


def test_handshake_needs_the_secret_both_ways():
    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            wire.prove_server(b, b"secret one")
        except wire.WireError as exc:
            errors.append(exc)
            b.close()  # as the server does

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises((wire.WireError, ConnectionError)):
        wire.prove_client(a, b"secret two")
    thread.join()
    assert errors  # the server refused the wrong client, and the client did not trust the server
    a, b = socket.socketpair()
    thread = threading.Thread(target=wire.prove_server, args=(b, b"same"))
    thread.start()
    wire.prove_client(a, b"same")
    thread.join()


def test_a_stage_that_does_not_know_the_secret_yet_is_not_taken_for_gone():
    """A stage learns the secret when it announces itself; under load the ingress may see it ready
    and connect first. Its watch tries the handshake again (a dead stage's closed connection, or
    nothing listening, is a death at once: `test_failover`)."""
    from app.pipeline import PipelineClient
    from app.transport import listen, serve_connections

    secret, known = b"s" * 32, threading.Event()
    server, address = listen()
    serve_connections(server, lambda message: None, lambda: secret if known.is_set() else None)
    client, gone = PipelineClient(secret), threading.Event()
    try:
        client.watch(address, gone.set)
        time.sleep(2.5)  # two handshakes refused
        known.set()
        assert not gone.wait(3)
    finally:
        client.close()
        server.close()


def test_a_stage_is_ready_to_others_only_once_it_knows_the_secret(monkeypatch):
    """The registry gives out a stage's address only after the stage announced with the secret, so
    no step reaches a stage that cannot answer the handshake yet (CI's first request once got 500:
    three steps refused by a stage that was listed ready before it had stored the secret)."""
    import types

    import ray

    from app.registry import Announcer, Registry

    registry = Registry(b"s" * 32, "10.0.0.1:9000")
    ready = {"id": "r1", "stage": 0, "state": "ready", "address": "10.0.0.2:7000", "draining": False}
    for known in (None, b"an old ingress's"):
        assert registry.announce(ready, known)["secret"] == b"s" * 32
        assert [(r["state"], r["address"]) for r in registry.replicas()] == [("starting", None)]
        assert registry.addresses() == ["10.0.0.1:9000"]
    registry.announce(ready, b"s" * 32)
    assert [(r["state"], r["address"]) for r in registry.replicas()] == [("ready", "10.0.0.2:7000")]

    # a stage's announcer learns the secret and says it knows it in the same announcement
    other = Registry(b"t" * 32, "10.0.0.1:9000")  # the actor, called in place
    actor = types.SimpleNamespace(announce=types.SimpleNamespace(remote=other.announce))
    monkeypatch.setattr(ray, "get_actor", lambda name: actor)
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    announcer = Announcer.__new__(Announcer)
    announcer.name, announcer.replica, announcer.secret, announcer._registry = "x", ready, None, None
    assert announcer.announce()
    assert announcer.secret == b"t" * 32 and "10.0.0.2:7000" in announcer.addresses


def test_a_message_goes_at_once_or_whole_from_a_thread():
    """The ingress sends steps from its event loop (`Connections.send_nowait`): with no connection
    open yet it sends nothing and hands the message to a thread, which connects; on an open
    connection a message goes at once; one that the socket takes only part of goes on from a
    thread, which holds the connection until it is whole. The receiver reads every message whole,
    in order."""
    from app.transport import Connections, listen

    secret = b"s" * 32
    server, address = listen()
    accepted: list[socket.socket] = []

    def accept():
        sock, _ = server.accept()
        wire.prove_server(sock, secret)
        accepted.append(sock)

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    out = Connections(secret)
    try:
        rest = out.send_nowait(address, wire.Error(1, "first"))
        assert rest is not None and not accepted  # not connected: nothing was sent from here
        rest()
        acceptor.join(10)
        [sock] = accepted
        assert out.send_nowait(address, wire.Error(2, "second")) is None
        big = torch.arange(4 << 20, dtype=torch.float32).view(64, -1)  # 16 MiB: more than the buffers take
        rest = out.send_nowait(address, wire.Result(3, big))
        assert rest is not None
        taken = out.send_nowait(address, wire.Error(4, "fourth"))
        assert taken is not None  # the half-sent message's thread holds the connection
        threads = [threading.Thread(target=rest), threading.Thread(target=taken)]  # the second waits for the first
        for thread in threads:
            thread.start()
        received = [wire.recv(sock, wire.Limits()) for _ in range(4)]
        for thread in threads:
            thread.join(10)
        assert [m.step for m in received] == [1, 2, 3, 4]
        assert [m.message for m in received if isinstance(m, wire.Error)] == ["first", "second", "fourth"]
        assert torch.equal(received[2].logits, big)
    finally:
        out.close()
        server.close()


def test_steps_reach_the_first_stage_in_the_order_they_were_sent():
    """A step the socket did not take at once is sent from a thread; the next step must not
    overtake it: a prompt's next chunk, computed first, would attend to a cache its chunk before
    has not written yet."""
    import asyncio

    from app.pipeline import PipelineClient, StepFailed

    client, sent = PipelineClient(b"s" * 32), []

    class Out:  # the socket takes every step but the first at once
        def send_nowait(self, address, message):
            if message.step == 0:
                return lambda: (time.sleep(0.05), sent.append(0))
            sent.append(message.step)

        def close(self):
            pass

    client._out = Out()

    async def two_steps():
        step = client.step(["127.0.0.1:1"], torch.zeros(1, 2, dtype=torch.long), [[[0]]], [0], [2], timeout=0.2)
        return await asyncio.gather(step, client.step(["127.0.0.1:1"], torch.zeros(1, 2, dtype=torch.long), [[[0]]],
                                                      [2], [2], timeout=0.2), return_exceptions=True)

    try:
        assert all(isinstance(r, StepFailed) for r in asyncio.run(two_steps()))  # nobody answers them
        assert sent == [0, 1]
    finally:
        client.close()
