"""One request's failure stays its own; recovery is bounded; API keys (issue 13). In-process, no Ray."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.api import create_app
from app.builder import BuilderArgs, api_keys
from stages.sampler import SamplingSpec, apply_penalties, sample_token
from tests.reference import greedy_text
from tests.local import local_app, model_info

TWO = [(0, 3), (3, 6)]


def post_all(url: str, bodies: list[dict], timeout: float = 60) -> list[httpx.Response | Exception]:
    """Sends the bodies at once, each from its own thread; a request that hangs is an exception."""
    results: list = [None] * len(bodies)

    def send(i: int) -> None:
        try:
            results[i] = httpx.post(url + "/v1/completions", json={"model": "model", **bodies[i]}, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # in this order: the first request takes the first cache blocks
    for thread in threads:
        thread.join()
    return results


def poison_slot(server, nth: int | None, make) -> None:
    """Makes the stage's rows of the `nth` sequence it sees (0-based, told apart by their first KV
    block; None: every row) come out as `make(output_row)` (or raise)."""
    stage = server.stage
    original = stage.forward
    firsts: list[int] = []  # first blocks, in the order their sequences arrived

    def forward(inputs, tables, starts, num_new, **kwargs):
        out = original(inputs, tables, starts, num_new, **kwargs).clone()
        for row, table in enumerate(tables):
            if table[0] not in firsts:
                firsts.append(table[0])
            if nth is None or firsts.index(table[0]) == nth:
                out[row] = make(out[row])
        return out

    stage.forward = forward


def test_a_tiny_temperature_is_greedy_and_stalls_nobody(checkpoint):
    model_dir = checkpoint("llama")
    expected = greedy_text(model_dir, "the city", 12)
    body = {"prompt": "the city", "max_tokens": 12, "min_tokens": 12}
    with local_app(model_dir, TWO, http=True) as (url, engine, _):
        results = post_all(url, [dict(body, temperature=0), dict(body, temperature=1e-40), dict(body, temperature=0)])
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
        assert [r.json()["choices"][0]["text"] for r in results] == [expected] * 3
        assert engine.restarts == 0


def test_non_finite_logits_fail_only_their_sequence(checkpoint):
    model_dir = checkpoint("llama")
    expected = greedy_text(model_dir, "the city", 24)
    with local_app(model_dir, TWO, http=True) as (url, engine, servers):
        poison_slot(servers[-1], 1, lambda row: torch.full_like(row, float("nan")))  # the second request's blocks
        honest, poisoned = post_all(url, [{"prompt": "the city", "max_tokens": 24, "min_tokens": 24, "temperature": 0},
                                          {"prompt": "a river", "max_tokens": 24, "temperature": 0.7}])
        assert honest.status_code == 200 and honest.json()["choices"][0]["text"] == expected
        assert poisoned.status_code == 500, poisoned.text
        error = poisoned.json()["error"]
        assert error["type"] == "internal_server_error" and "not finite" in error["message"]
        # streamed: an error event, then [DONE]
        poison_slot(servers[-1], None, lambda row: torch.full_like(row, float("inf")))
        r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": "a river", "max_tokens": 4,
                                                      "stream": True}, timeout=60)
        events = [line for line in r.text.split("\n\n") if line]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"


def test_a_step_that_always_fails_ends_its_sequence_after_bounded_retries(checkpoint):
    model_dir = checkpoint("llama")

    def out_of_memory(row):
        raise RuntimeError("CUDA out of memory (simulated)")

    with local_app(model_dir, TWO, http=True, max_step_failures=3) as (url, engine, servers):
        poison_slot(servers[0], 0, out_of_memory)
        began = time.monotonic()
        (r,) = post_all(url, [{"prompt": "the city", "max_tokens": 8}], timeout=60)
        assert isinstance(r, httpx.Response) and r.status_code == 500, r
        message = r.json()["error"]["message"]
        assert "failed 3 times in a row" in message and "out of memory" in message
        assert time.monotonic() - began < 10
        time.sleep(1)  # nothing is replayed any more: 3 steps, 3 recoveries, not thousands
        assert engine.stats["steps"] == 3 and engine.stats["recoveries"] == 3
        servers[0].stage.forward = type(servers[0].stage).forward.__get__(servers[0].stage)  # healed
        assert httpx.post(url + "/v1/completions", json={"model": "model", "prompt": "the", "max_tokens": 2},
                          timeout=60).status_code == 200


def test_an_engine_loop_failure_fails_open_requests_and_the_loop_restarts(checkpoint, monkeypatch):
    model_dir = checkpoint("llama")
    with local_app(model_dir, TWO) as (client, engine, _):
        original = engine._admit
        calls = {"n": 0}

        def admit_once_broken():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("scheduler bug (simulated)")
            original()

        monkeypatch.setattr(engine, "_admit", admit_once_broken)
        r = client.post("/v1/completions", json={"model": "model", "prompt": "the", "max_tokens": 4})
        assert r.status_code == 500 and "the engine failed" in r.json()["error"]["message"]
        health = client.get("/health").json()
        assert health["engine"] == dict(health["engine"], alive=True, restarts=1)
        r = client.post("/v1/completions", json={"model": "model", "prompt": "the", "max_tokens": 4})
        assert r.status_code == 200


def test_api_keys(checkpoint, monkeypatch):
    model_dir = checkpoint("llama")
    with local_app(model_dir, TWO) as (_, engine, _):
        app = create_app(engine, model_info(model_dir, "model", 512), api_keys=("key-number-one", "key-number-two"))
        with TestClient(app) as client:
            body = {"model": "model", "prompt": "the", "max_tokens": 2}
            for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "key-number-one"},
                            {"Authorization": "Basic key-number-one"}):
                r = client.post("/v1/completions", json=body, headers=headers)
                assert r.status_code == 401, r.text
                assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                             "param": None, "code": "invalid_api_key"}
            for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/model"), ("GET", "/version"),
                                 ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize")):
                assert client.request(method, path, json={}).status_code == 401, path
            assert client.get("/health").status_code == 200  # open
            page = client.get("/")  # open: the page asks for the key itself, and holds none
            assert page.status_code == 200 and "key-number" not in page.text
            for key in ("key-number-one", "key-number-two"):
                r = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200
    monkeypatch.setenv("STAGEWISE_API_KEYS", "env-key-12345, other-key-678")
    assert api_keys(BuilderArgs(api_keys=["arg-key-12345"])) == ("arg-key-12345", "env-key-12345", "other-key-678")
    monkeypatch.setenv("STAGEWISE_API_KEYS", "")
    assert api_keys(BuilderArgs()) == ()


def test_best_of_returns_the_candidate_with_the_highest_cumulative_logprob(checkpoint):
    model_dir = checkpoint("llama")
    body = {"prompt": "the", "max_tokens": 6, "temperature": 1.0, "best_of": 4}
    with local_app(model_dir, TWO) as (client, _, _):
        for seed in range(20):
            every = client.post("/v1/completions", json={"model": "model", **body, "n": 4, "seed": seed,
                                                         "logprobs": 0}).json()["choices"]
            totals = [sum(c["logprobs"]["token_logprobs"]) for c in every]
            best = max(range(4), key=totals.__getitem__)
            if best != 0:  # the first candidate is what ranking by nothing would return
                break
        assert best != 0
        for logprobs in (None, 0):
            extra = {} if logprobs is None else {"logprobs": logprobs}
            picked = client.post("/v1/completions", json={"model": "model", **body, "n": 1, "seed": seed,
                                                          **extra}).json()["choices"]
            assert [c["text"] for c in picked] == [every[best]["text"]]


def test_penalties_shift_logits_as_openai_documents():
    # mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty
    logits = torch.zeros(6)
    spec = SamplingSpec(prompt_len=1, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, spec, torch.tensor([5, 1, 2, 2, 2]), num_generated=4)
    assert out.tolist() == [0.0, -0.75, -1.25, 0.0, 0.0, 0.0]  # the prompt's token 5 is not penalised
    negative = apply_penalties(logits, SamplingSpec(presence_penalty=-1.0), torch.tensor([3]), 1)
    assert negative.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("spec, kept", [(SamplingSpec(top_p=0.79), {0, 1}), (SamplingSpec(top_p=0.85), {0, 1, 2}),
                                        (SamplingSpec(top_k=1), {0}), (SamplingSpec(top_k=3), {0, 1, 2}),
                                        (SamplingSpec(top_p=1.0), {0, 1, 2, 3})])
def test_top_p_and_top_k_keep_exactly_their_tokens(spec, kept):
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {sample_token(logits, replace(spec, seed=seed), None, 0) for seed in range(3000)}
    assert seen == kept


def test_a_tiny_temperature_samples_greedily():
    logits = torch.tensor([0.1, 2.0, 0.3])
    assert {sample_token(logits, SamplingSpec(temperature=1e-40, seed=seed), None, 0) for seed in range(50)} == {1}


def test_an_engine_that_keeps_failing_reports_itself_dead(checkpoint, monkeypatch):
    """The ingress's Serve health check fails only then (a missing stage never makes it fail)."""
    model_dir = checkpoint("llama")
    with local_app(model_dir, TWO) as (client, engine, _):
        monkeypatch.setattr(engine, "_admit", lambda: (_ for _ in ()).throw(RuntimeError("broken for good")))
        for _ in range(6):
            assert client.post("/v1/completions", json={"model": "model", "prompt": "the",
                                                         "max_tokens": 2}).status_code == 500
        assert engine.restarts == 6 and not engine.alive
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["engine"]["alive"] is False
