"""End to end: `serve run` with 3 stage deployments, against transformers and the openai client."""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serving import ServeRun

PROMPTS = ["the quick brown fox jumps over", "music of the river in Paris"]


def expected_text(model_dir: str, prompt: str, max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream_text(server: ServeRun, body: dict) -> tuple[str, list[dict], list[float]]:
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(dict(body, stream=True)).encode(),
                                     headers={"Content-Type": "application/json"})
    chunks, times, began = [], [], time.monotonic()
    with urllib.request.urlopen(request, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            times.append(time.monotonic() - began)
            if line == "data: [DONE]":
                break
            chunks.append(json.loads(line[6:]))
    assert line == "data: [DONE]"
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks, times


# Every architecture is checked in one process (`test_api`); through `serve run`, two in the
# default suite and the other two with `-m slow` (each start is about 30 s).
# The llama application also serves two LoRA adapters (`server.adapters`: name -> directory).
@pytest.fixture(scope="module", params=["llama", "gpt2", pytest.param("qwen2", marks=pytest.mark.slow),
                                        pytest.param("mistral", marks=pytest.mark.slow)])
def served(request, checkpoint, tmp_path_factory):
    from tests.test_lora import two_adapters

    model_dir = checkpoint(request.param)
    args = {"model": model_dir, "num_stages": 3, "max_model_len": 512}
    adapters = two_adapters(model_dir, tmp_path_factory.mktemp("lora")) if request.param == "llama" else {}
    if adapters:  # vLLM's 'name=path' form
        args.update(lora_modules=[f"{name}={path}" for name, path in adapters.items()], max_loras=2)
    with ServeRun(args) as server:
        server.adapters = adapters
        yield request.param, model_dir, server


def test_greedy_matches_transformers_plain_and_streamed(served):
    arch, model_dir, server = served
    assert server.model == arch  # the directory's base name
    for prompt in PROMPTS:
        expected = expected_text(model_dir, prompt, 16)
        status, body = server.post("/v1/completions", {"model": arch, "prompt": prompt, "max_tokens": 16,
                                                       "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["text"] == expected
        text, _, _ = stream_text(server, {"model": arch, "prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert text == expected


def test_openai_client(served):
    arch, model_dir, server = served
    if arch != "llama":
        pytest.skip("the client is exercised once, on llama")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["llama", "sql", "poet"]  # the model, then its adapters

    done = client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert done.choices[0].text == expected_text(model_dir, PROMPTS[0], 16)
    assert done.usage.completion_tokens == 16 or done.choices[0].finish_reason == "stop"

    chunks = list(client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens

    first = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=12, n=2, seed=7, temperature=1.0)
    again = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=12, n=2, seed=7, temperature=1.0)
    assert len(first.choices) == 2
    assert [c.text for c in first.choices] == [c.text for c in again.choices]

    echoed = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=4, echo=True, logprobs=3,
                                       temperature=0)
    choice = echoed.choices[0]
    assert choice.text.startswith(PROMPTS[1])
    num_prompt = echoed.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == num_prompt + 4
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    assert all(len(t) == 3 for t in choice.logprobs.top_logprobs[num_prompt:])

    full = done.choices[0].text
    stop = full[4:7]
    cut = client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_first_chunk_arrives_long_before_the_last(served):
    arch, _, server = served
    if arch != "llama":
        pytest.skip("timed once, on llama")
    _, chunks, times = stream_text(server, {"model": arch, "prompt": PROMPTS[0], "max_tokens": 200,
                                            "ignore_eos": True, "temperature": 0})
    assert len(chunks) > 50
    assert times[0] < 0.2 * times[-1], (times[0], times[-1])


def test_lora_adapters_and_beams(served):
    """Through `serve run`: an adapter answering as peft does while the model answers beside it, 404
    for a name not served, and a beam search with an adapter (`tests/test_lora.py` and
    `tests/test_beam.py` check both in process)."""
    import threading

    from tests.reference import greedy_text
    from tests.test_lora import PROMPT, TOKENS

    arch, model_dir, server = served
    if not server.adapters:
        pytest.skip("adapters are served with llama")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    expected = [greedy_text(model_dir, PROMPT, TOKENS, adapter=server.adapters["poet"]),
                greedy_text(model_dir, PROMPT, TOKENS)]
    texts = [None, None]

    def run(i, name):
        texts[i] = client.completions.create(model=name, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

    threads = [threading.Thread(target=run, args=(i, name)) for i, name in enumerate(["poet", arch])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert texts == expected
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="prose", prompt="the", max_tokens=2)
    beams = client.completions.create(model="sql", prompt=PROMPT, max_tokens=4, n=3,
                                      extra_body={"use_beam_search": True})
    assert len(beams.choices) == 3 and len({c.text for c in beams.choices}) == 3
