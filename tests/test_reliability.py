"""Hostile and vanishing clients against the real app (in-process stages, real HTTP): issue 6."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.request

import pytest

from tests.local import local_app

THREE = [(0, 2), (2, 4), (4, 6)]
JSON = {"Content-Type": "application/json"}


def raw(url: str, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.load(e)


def body(**fields) -> bytes:
    return json.dumps({"model": "model", "prompt": "the city", **fields}).encode()


# (name, method, path, raw body, headers, expected status)
HOSTILE = [
    ("not json", "POST", "/v1/completions", b"{not json", JSON, 400),
    ("truncated json", "POST", "/v1/completions", b'{"model": "model", "prompt": "x"', JSON, 400),
    ("json array", "POST", "/v1/completions", b"[1, 2]", JSON, 400),
    ("empty body", "POST", "/v1/completions", b"", JSON, 400),
    ("invalid utf-8", "POST", "/v1/completions", b'{"model": "model", "prompt": "\xff\xfe"}', JSON, 400),
    ("no model", "POST", "/v1/completions", json.dumps({"prompt": "x"}).encode(), JSON, 400),
    ("unknown model", "POST", "/v1/completions", json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), JSON, 404),
    ("max_tokens string", "POST", "/v1/completions", body(max_tokens="many"), JSON, 400),
    ("max_tokens negative", "POST", "/v1/completions", body(max_tokens=-1), JSON, 400),
    ("max_tokens float", "POST", "/v1/completions", body(max_tokens=1.5), JSON, 400),
    ("temperature too high", "POST", "/v1/completions", body(temperature=3), JSON, 400),
    ("top_p zero", "POST", "/v1/completions", body(top_p=0), JSON, 400),
    ("n zero", "POST", "/v1/completions", body(n=0), JSON, 400),
    ("n huge", "POST", "/v1/completions", body(n=100000), JSON, 400),
    ("logprobs 21", "POST", "/v1/completions", body(logprobs=21), JSON, 400),
    ("presence penalty", "POST", "/v1/completions", body(presence_penalty=5), JSON, 400),
    ("frequency penalty", "POST", "/v1/completions", body(frequency_penalty=-3), JSON, 400),
    ("best_of below n", "POST", "/v1/completions", body(n=3, best_of=2), JSON, 400),
    ("stop wrong type", "POST", "/v1/completions", body(stop=7), JSON, 400),
    ("negative token id", "POST", "/v1/completions", body(prompt=[1, -5]), JSON, 400),
    ("token id past vocab", "POST", "/v1/completions", body(prompt=[1, 10**9]), JSON, 400),
    ("empty prompt list", "POST", "/v1/completions", body(prompt=[]), JSON, 400),
    ("mixed prompt list", "POST", "/v1/completions", body(prompt=["a", 1]), JSON, 400),
    ("over context", "POST", "/v1/completions", body(prompt="the " * 300, max_tokens=10), JSON, 400),
    ("logit_bias key", "POST", "/v1/completions", body(logit_bias={"abc": 1}), JSON, 400),
    ("logit_bias value", "POST", "/v1/completions", body(logit_bias={"1": 1000}), JSON, 400),
    ("logit_bias past vocab", "POST", "/v1/completions", body(logit_bias={"99999999": 1}), JSON, 400),
    ("stream_options without stream", "POST", "/v1/completions", body(stream_options={"include_usage": True}),
     JSON, 400),
    ("suffix", "POST", "/v1/completions", body(suffix="x"), JSON, 400),
    ("min_tokens over max", "POST", "/v1/completions", body(max_tokens=2, min_tokens=5), JSON, 400),
    ("text/plain", "POST", "/v1/completions", body(), {"Content-Type": "text/plain"}, 415),
    ("form data", "POST", "/v1/completions", b"model=model", {"Content-Type": "application/x-www-form-urlencoded"},
     415),
    ("unknown path", "POST", "/v1/chat/nothing", body(), JSON, 404),
    ("wrong method", "GET", "/v1/completions", None, {}, 405),
    ("delete models", "DELETE", "/v1/models", None, {}, 405),
    ("deep nesting", "POST", "/v1/completions", b"[" * 100000 + b"]" * 100000, JSON, 400),
]


def test_hostile_requests_get_openai_errors_and_the_server_keeps_serving(checkpoint):
    with local_app(checkpoint("llama"), THREE, http=True, max_model_len=256) as (url, engine, _):
        for name, method, path, data, headers, expected in HOSTILE:
            status, _, answer = raw(url, method, path, data, headers)
            assert status == expected, (name, status, answer)
            error = answer["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], name
        assert len(HOSTILE) >= 25
        results = []

        def ok():
            status, _, answer = raw(url, "POST", "/v1/completions", body(max_tokens=8, temperature=0), JSON)
            results.append((status, answer["usage"]["completion_tokens"] if status == 200 else answer))

        threads = [threading.Thread(target=ok) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [s for s, _ in results] == [200] * 8
        request = urllib.request.Request(url + "/v1/completions", data=body(max_tokens=8, stream=True), headers=JSON)
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.read().decode().rstrip().endswith("data: [DONE]")
        assert engine.num_running == 0


def _disconnect(port: int, stream: bool, rng: random.Random) -> None:
    payload = body(max_tokens=200, ignore_eos=True, stream=stream)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + payload)
        if stream:
            sock.recv(256)  # the first bytes of the stream: generation has begun
        else:
            time.sleep(rng.uniform(0, 0.05))  # somewhere in prefill or decode


@pytest.mark.parametrize("num_clients", [1000])
def test_vanishing_clients_leave_nothing_behind(checkpoint, num_clients):
    rng = random.Random(0)
    with local_app(checkpoint("llama"), THREE, http=True, max_batch_size=8, max_model_len=256) as (url, engine, _):
        port = int(url.rsplit(":", 1)[1])
        for i in range(num_clients):
            _disconnect(port, stream=i % 2 == 0, rng=rng)
        deadline = time.monotonic() + 30
        while (engine.num_running or engine.waiting) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.num_running == 0 and not engine.waiting
        assert engine.num_free_slots == 8
        # the sequences were cut short, not run to their 200 tokens
        assert engine.stats["tokens"] < num_clients * 200 / 10, engine.stats
        # and it still serves
        status, _, answer = raw(url, "POST", "/v1/completions", body(max_tokens=4), JSON)
        assert status == 200
