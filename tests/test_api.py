"""The HTTP API over real stages, in-process (no Ray): behaviour of every request field."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from placement import ModelSpec
from tests.checkpoints import ARCHITECTURES
from tests.local import local_app
from tests.reference import greedy_text

THREE = [(0, 2), (2, 4), (4, 6)]


def reference_ids(model_dir: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"model": "model", **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, **body) -> list[dict]:
    r = client.post("/v1/completions", json={"model": "model", "stream": True, **body})
    assert r.status_code == 200, r.text
    lines = [line for line in r.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_over_http(checkpoint, arch):
    model_dir = checkpoint(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer("a quick brown fox jumps").input_ids
    expected = reference_ids(model_dir, prompt_ids, 16)
    with local_app(model_dir, THREE) as (client, _, _):
        body = complete(client, prompt=prompt_ids, max_tokens=16, temperature=0, logprobs=0)
        tokens = body["choices"][0]["logprobs"]["tokens"]
        assert len(tokens) == len(expected)
        text = tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert body["choices"][0]["text"] == text


def test_concurrent_requests_join_and_leave(checkpoint):
    """Sequences of different lengths, arriving at different times, each get what they get alone."""
    model_dir = checkpoint("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["the", "a quick brown fox jumps over the lazy dog", "stone garden", "city of Paris and the river"]
    lengths = [20, 5, 12, 30]
    expected = [reference_ids(model_dir, tokenizer(p).input_ids, n) for p, n in zip(prompts, lengths)]
    with local_app(model_dir, [(0, 3), (3, 6)], max_batch_size=3, max_num_batched_tokens=8) as (client, engine, _):
        results = [None] * len(prompts)
        packed, send = [], engine.pipeline.step

        async def step(route, inputs, tables, starts, num_new, **kwargs):
            packed.append(inputs.shape[0] == 1 and len(starts) > 1)
            return await send(route, inputs, tables, starts, num_new, **kwargs)

        engine.pipeline.step = step

        def run(i):
            body = complete(client, prompt=prompts[i], max_tokens=lengths[i], temperature=0, logprobs=0,
                            ignore_eos=True)
            results[i] = body["choices"][0]["logprobs"]["tokens"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, tokens in enumerate(results):
            assert len(tokens) == lengths[i]
            assert tokens == [tokenizer.decode([t]) for t in expected[i][: lengths[i]]] or \
                len(expected[i]) < lengths[i]
        assert engine.num_running == 0 and engine.num_free_slots == 3
        assert engine.stats["steps"] > max(lengths)  # prefills were chunked (8 tokens per step)
        assert any(packed)  # decode rows and prompt chunks shared steps, packed into one row


def test_every_row_gets_its_token_from_the_last_stage_and_no_logits_travel(checkpoint):
    """The last stage returns each row's token (8 bytes), not its logits (a row of vocabulary-sized
    float32): greedy rows their argmax, a sampled row its draw, with its log-probability and
    alternatives only for the row that asked; a seeded draw is the same beside others as alone."""
    from app import wire

    model_dir = checkpoint("llama")
    prompts = ["the city", "a quick brown fox", "stone garden at night"]
    expected = [greedy_text(model_dir, p, 12, exact_length=False) for p in prompts]
    sampled = {"prompt": "the", "temperature": 0.8, "top_p": 0.9, "seed": 7, "min_tokens": 12,
               "frequency_penalty": 0.5, "logit_bias": {"5": 3.0}, "logprobs": 2}
    with local_app(model_dir, [(0, 3), (3, 6)], max_batch_size=4) as (client, engine, servers):
        alone = complete(client, max_tokens=12, **sampled)["choices"][0]
        results, send = [], servers[-1]._send

        def record(address, message):
            if isinstance(message, wire.Result):
                results.append(message)
            return send(address, message)

        servers[-1]._send = record
        answers, counts = [None] * 4, [0] * 4

        def run(i):
            body = {"prompt": prompts[i], "temperature": 0} if i < 3 else sampled
            answer = complete(client, max_tokens=12, **body)
            answers[i], counts[i] = answer["choices"][0], answer["usage"]["completion_tokens"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [a["text"] for a in answers[:3]] == expected
        # the same draws beside others as alone (log-probabilities within a batch's rounding)
        assert answers[3]["text"] == alone["text"] and answers[3]["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        assert answers[3]["logprobs"]["token_logprobs"] == pytest.approx(alone["logprobs"]["token_logprobs"], abs=1e-4)
        assert all(r.logits is None and r.sampled is not None for r in results)
        assert sum((r.sampled.tokens >= 0).sum().item() for r in results) == sum(counts)  # each token, once
        assert sum(r.sampled.top_ids.numel() for r in results) == 2 * 12  # alternatives: the row that asked
        assert sum(r.sampled.logprobs.isfinite().sum().item() for r in results) == 12


def test_stream_matches_plain_and_reports_usage(checkpoint):
    model_dir = checkpoint("llama")
    with local_app(model_dir, THREE) as (client, _, _):
        plain = complete(client, prompt="the city of", max_tokens=10, temperature=0)
        chunks = stream(client, prompt="the city of", max_tokens=10, temperature=0,
                        stream_options={"include_usage": True})
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain["choices"][0]["text"]
        assert chunks[-1]["usage"] == plain["usage"] and chunks[-1]["choices"] == []
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_sampling_fields(checkpoint):
    model_dir = checkpoint("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with local_app(model_dir, THREE) as (client, _, _):
        greedy = complete(client, prompt="the", max_tokens=8, temperature=0)["choices"][0]["text"]
        assert complete(client, prompt="the", max_tokens=8, temperature=1.0, top_k=1)["choices"][0]["text"] == greedy
        seeded = [complete(client, prompt="the", max_tokens=8, temperature=1.0, seed=3)["choices"][0]["text"]
                  for _ in range(2)]
        assert seeded[0] == seeded[1]
        forced = tokenizer(" city").input_ids[0]
        body = complete(client, prompt="the", max_tokens=4, temperature=0, logit_bias={str(forced): 100})
        assert body["choices"][0]["text"] == tokenizer.decode([forced] * 4)
        # a presence penalty forbids repeating: with a forced token, the penalty cannot undo +100
        body = complete(client, prompt="the", max_tokens=4, temperature=0, logprobs=0,
                        logit_bias={str(forced): 5}, presence_penalty=2.0, frequency_penalty=2.0)
        assert len(body["choices"][0]["logprobs"]["tokens"]) == 4


def test_min_tokens_and_eos(checkpoint):
    model_dir = checkpoint("llama")
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    with local_app(model_dir, THREE) as (client, _, _):
        # EOS pushed to the top: it ends the text at once, unless min_tokens or ignore_eos hold it off
        bias = {str(eos): 100}
        body = complete(client, prompt="the", max_tokens=8, temperature=0, logit_bias=bias)
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 1
        body = complete(client, prompt="the", max_tokens=8, temperature=0, logit_bias=bias, min_tokens=5)
        assert body["usage"]["completion_tokens"] == 6
        body = complete(client, prompt="the", max_tokens=8, temperature=0, logit_bias=bias, ignore_eos=True)
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"


def test_echo_logprobs_and_max_tokens_zero(checkpoint):
    model_dir = checkpoint("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "music of the river"
    prompt_ids = tokenizer(prompt).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    logprobs = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0], dim=-1)
    expected = [logprobs[i, prompt_ids[i + 1]].item() for i in range(len(prompt_ids) - 1)]
    best = torch.topk(logprobs[:-1], 2)  # the two likeliest tokens at each prompt position after the first
    with local_app(model_dir, THREE, max_num_batched_tokens=3) as (client, _, servers):
        results, send = [], servers[-1]._send
        servers[-1]._send = lambda address, message: (results.append(message), send(address, message))[1]
        body = complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
        # scored on the last stage: each prompt token's log-probability and 2 alternatives, no logits
        assert all(r.logits is None for r in results) and len(results) > 1  # in chunks of 3 tokens
        assert sum(r.sampled.top_ids.numel() for r in results) == 2 * (len(prompt_ids) - 1)
        choice = body["choices"][0]
        assert choice["text"] == prompt and body["usage"]["completion_tokens"] == 0
        assert choice["logprobs"]["token_logprobs"][0] is None
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
        # Every echoed token but the first has its alternatives (as OpenAI and vLLM: the two best,
        # and the prompt's own token where it is not among them), as evaluation clients read them.
        tops = choice["logprobs"]["top_logprobs"]
        assert tops[0] is None and all(isinstance(top, dict) for top in tops[1:])
        for position, top in enumerate(tops[1:]):
            alternatives = list(zip(best.indices[position].tolist(), best.values[position].tolist()))
            if prompt_ids[position + 1] not in best.indices[position].tolist():
                alternatives.append((prompt_ids[position + 1], expected[position]))
            wanted = {}
            for token, value in alternatives:  # two tokens with one text: the second by its vocabulary string
                text = tokenizer.decode([token])
                wanted[text if text not in wanted else tokenizer.convert_ids_to_tokens(token)] = value
            assert top.keys() == wanted.keys()
            assert list(top.values()) == pytest.approx(list(wanted.values()), abs=1e-4)
        assert body["usage"]["prompt_tokens"] == len(prompt_ids)
        plain = complete(client, prompt=prompt, max_tokens=0, echo=True)
        assert plain["choices"][0]["text"] == prompt


def test_n_best_of_and_prompt_lists(checkpoint):
    model_dir = checkpoint("llama")
    with local_app(model_dir, THREE) as (client, _, _):
        body = complete(client, prompt=["the", "a city"], max_tokens=3, n=2, temperature=1.0, seed=1, logprobs=0)
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in body["choices"])
        body = complete(client, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
        assert len(body["choices"]) == 2 and body["usage"]["prompt_tokens"] == 5
        best = complete(client, prompt="the", max_tokens=4, n=1, best_of=3, temperature=1.0, seed=2, logprobs=0)
        assert len(best["choices"]) == 1


def test_errors_keep_the_server_serving(checkpoint):
    model_dir = checkpoint("llama")
    with local_app(model_dir, THREE, max_model_len=64) as (client, _, _):
        r = client.post("/v1/completions", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = client.post("/v1/completions", json={"model": "model", "prompt": [10**6]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = client.post("/v1/completions", json={"model": "model", "prompt": "the " * 10, "max_tokens": 60})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        r = client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = client.get("/v1/completions")
        assert r.status_code == 405
        assert complete(client, prompt="the", max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_overload_gives_503_with_retry_after(checkpoint):
    model_dir = checkpoint("llama")
    with local_app(model_dir, THREE, max_batch_size=1, max_queued_requests=0) as (client, engine, _):
        statuses = []

        def run():
            r = client.post("/v1/completions", json={"model": "model", "prompt": "the", "max_tokens": 40,
                                                     "ignore_eos": True})
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(s for s, _, _ in statuses)
        assert codes[0] == 200 and 503 in codes
        assert all(retry for s, retry, _ in statuses if s == 503)
        assert all(body["error"]["type"] for s, _, body in statuses if s == 503)


def test_client_disconnect_frees_the_slot(checkpoint):
    model_dir = checkpoint("llama")
    with local_app(model_dir, THREE, max_batch_size=2) as (client, engine, _):
        for _ in range(5):
            with client.stream("POST", "/v1/completions", json={"model": "model", "prompt": "the", "stream": True,
                                                                "max_tokens": 400, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        break  # leave after the first token
        for _ in range(100):
            if engine.num_running == 0:
                break
            threading.Event().wait(0.05)
        assert engine.num_running == 0 and engine.num_free_slots == 2


def test_64_concurrent_requests_bounded_by_the_limits(checkpoint):
    model_dir = checkpoint("llama")
    with local_app(model_dir, THREE, max_batch_size=16, max_model_len=128) as (client, engine, servers):
        seen_running, done = [], threading.Event()

        def watch():
            while not done.is_set():
                seen_running.append(engine.num_running)
                done.wait(0.01)

        results = [None] * 64

        def run(i):
            results[i] = complete(client, prompt="the " * (1 + i % 7), max_tokens=8 + i % 24, ignore_eos=True)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        watcher.join()
        assert [r["usage"]["completion_tokens"] for r in results] == [8 + i % 24 for i in range(64)]
        assert max(seen_running) <= 16 and engine.num_running == 0 and engine.num_free_slots == 16
        spec = ModelSpec.from_model_dir(model_dir, dtype="float32")
        for server in servers:  # the KV cache is the pool allocated at start, exactly what the planner counts
            cache = server.stage.cache
            assert cache.nbytes() == spec.stage_kv_bytes(cache.start, cache.end, cache.num_blocks * cache.block_size)


def test_a_pool_for_two_sequences_serves_four_by_preemption(checkpoint):
    """Four greedy requests at once, KV blocks for two: the scheduler pre-empts the latest admitted
    when a decode needs a block; it resumes by replay and every output equals transformers."""
    model_dir = checkpoint("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(f"request {i} asks about the river").input_ids for i in range(4)]
    expected = [reference_ids(model_dir, ids, 40) for ids in prompts]
    need = max(len(ids) for ids in prompts) + 40
    with local_app(model_dir, THREE, kv_tokens=2 * need, block_size=4) as (client, engine, _):
        results = [None] * 4

        def run(i):
            results[i] = complete(client, prompt=prompts[i], max_tokens=40, temperature=0, ignore_eos=True,
                                  logprobs=0)["choices"][0]["logprobs"]["tokens"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [[tokenizer.decode([t]) for t in ids] for ids in expected]
        assert engine.stats["preempted"] > 0
        # One that could never fit (more than the whole pool) gets 400 at once.
        r = client.post("/v1/completions", json={"model": "model", "prompt": prompts[0], "max_tokens": 2 * need})
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_cache_exceeded"


def test_mixed_quantization_plan_serves(checkpoint):
    """Stage 0 in nf4, stage 1 unquantized: served output equals the same stages chained by hand
    (tests/test_quantization.py checks those against transformers)."""
    from stages import Stage
    from tests.test_stages import greedy

    model_dir = checkpoint("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer("the quick brown fox").input_ids
    chained = greedy([Stage(model_dir, 0, 3, quantization="nf4"), Stage(model_dir, 3, 6)], prompt_ids, 12)
    with local_app(model_dir, [(0, 3), (3, 6)], quantizations=["nf4", "none"]) as (client, _, servers):
        body = complete(client, prompt=prompt_ids, max_tokens=12, temperature=0, ignore_eos=True)
        assert body["choices"][0]["text"] == tokenizer.decode(chained, clean_up_tokenization_spaces=False)
        assert servers[0].stage.weight_bytes() < servers[1].stage.weight_bytes()


def test_a_shared_prefix_is_computed_once(checkpoint):
    """Two prompts that start with the same 400 tokens: the second takes the first's full blocks from
    the prefix cache on every stage, computes only the rest, and answers as transformers does."""
    model_dir = checkpoint("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prefix = tokenizer(" ".join(["the river runs past the old stone garden"] * 50)).input_ids[:400]
    prompts = [prefix + tokenizer(" and the city").input_ids, prefix + tokenizer(" a quick fox").input_ids]
    with local_app(model_dir, THREE, block_size=16) as (client, engine, _):
        for ids in prompts:
            body = complete(client, prompt=ids, max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
            assert body["choices"][0]["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in
                                                                reference_ids(model_dir, ids, 8)]
        assert engine.scheduler.cached_tokens == 400 // 16 * 16  # the second took 25 full blocks
        blocks = [r["blocks"] for r in engine.replica_load()]
        assert all(b["cached"] >= 25 and b["used"] == 0 for b in blocks), blocks
    with local_app(model_dir, THREE, block_size=16, prefix_caching=False) as (client, engine, _):
        for ids in prompts:
            complete(client, prompt=ids, max_tokens=2)
        assert engine.scheduler.cached_tokens == 0
