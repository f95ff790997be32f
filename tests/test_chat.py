"""Chat completions and the tokenizer endpoints, on the default model (SmolLM2-135M-Instruct) split
into two stages, against transformers and with the clients users bring: the `openai` client,
LangChain's `ChatOpenAI`, litellm. In-process (no Ray); `test_default_model` chats through Serve."""

from __future__ import annotations

import json
import time
import urllib.request

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app import default_model
from tests.local import local_app

NAME = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TALK = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a river in Europe."},
        {"role": "assistant", "content": "The Danube."},
        {"role": "user", "content": [{"type": "text", "text": "And one in Asia?"}]}]


@pytest.fixture(scope="module")
def smol():
    """(base URL, TestClient, engine, reference model, tokenizer) of the default model in 2 stages."""
    model_dir = default_model.default_model_dir()
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    half = reference.config.num_hidden_layers // 2
    with local_app(model_dir, [(0, half), (half, reference.config.num_hidden_layers)], name=NAME, http=True,
                   max_model_len=2048) as (url, engine, _):
        with httpx.Client(base_url=url, timeout=120) as client:
            yield url, client, engine, reference, tokenizer


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    """What transformers' chat template makes of the messages (text parts joined by newlines)."""
    messages = [dict(m, content="\n".join(p["text"] for p in m["content"])) if isinstance(m["content"], list) else m
                for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, **({"add_generation_prompt": True} | kwargs))
    return tokenizer(text, add_special_tokens=False).input_ids


def reference_answer(smol, messages, max_tokens: int, **kwargs) -> tuple[str, list[int]]:
    _, _, _, model, tokenizer = smol
    ids = template_ids(tokenizer, messages, **kwargs)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids):].tolist()
    return tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False), out


def test_greedy_chat_matches_transformers_plain_and_streamed(smol):
    client = openai.OpenAI(base_url=smol[0] + "/v1", api_key="unused")
    for messages in (FRANCE, TALK):
        expected, _ = reference_answer(smol, messages, 24)
        done = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_completion_tokens=24)
        assert done.choices[0].message.role == "assistant"
        assert done.choices[0].message.content == expected
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
    assert "Paris" in client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0,
                                                     max_tokens=24).choices[0].message.content


def test_sampling_n_seed_stop_and_budgets(smol):
    client = openai.OpenAI(base_url=smol[0] + "/v1", api_key="unused")
    first = client.chat.completions.create(model=NAME, messages=TALK, n=2, seed=11, temperature=1.0, max_tokens=10)
    again = client.chat.completions.create(model=NAME, messages=TALK, n=2, seed=11, temperature=1.0, max_tokens=10)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len(first.choices) == 2 and first.choices[0].message.content != first.choices[1].message.content

    full = client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    stop = text[text.index(" of"):][:3]
    cut = client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"

    # max_completion_tokens wins over max_tokens; with neither, the rest of the context.
    both = client.chat.completions.create(model=NAME, messages=FRANCE, max_completion_tokens=3, max_tokens=9,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 3 and both.choices[0].finish_reason == "length"
    neither = client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0)
    assert neither.choices[0].finish_reason == "stop" and neither.choices[0].message.content.startswith(text[:20])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "river " * 2100}])


def test_logprobs_are_transformers_own(smol):
    _, _, _, model, tokenizer = smol
    client = openai.OpenAI(base_url=smol[0] + "/v1", api_key="unused")
    done = client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0, max_tokens=6, logprobs=True,
                                          top_logprobs=3)
    ids = template_ids(tokenizer, FRANCE)
    _, out = reference_answer(smol, FRANCE, 6)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].float(), dim=-1)
    content = done.choices[0].logprobs.content
    assert [entry.token for entry in content] == [tokenizer.decode([t]) for t in out]
    for entry, token, row in zip(content, out, logprobs):
        assert entry.logprob == pytest.approx(row[token].item(), abs=2e-3)
        assert entry.bytes == list(entry.token.encode())
        best = torch.topk(row, 3)
        assert [top.token for top in entry.top_logprobs] == [tokenizer.decode([t]) for t in best.indices.tolist()]
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=2e-3)
    streamed = client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0, max_tokens=6,
                                              logprobs=True, stream=True)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]


def test_continue_final_message_and_template_kwargs(smol):
    _, client, _, _, _ = smol
    messages = FRANCE + [{"role": "assistant", "content": "The capital of France is"}]
    expected, _ = reference_answer(smol, messages, 5, add_generation_prompt=False, continue_final_message=True)
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "temperature": 0,
                                                  "max_tokens": 5, "add_generation_prompt": False,
                                                  "continue_final_message": True})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": FRANCE, "max_tokens": 2,
                                                  "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200  # extra template variables reach the template (this one ignores them)


BAD = {
    "empty messages": ({"messages": []}, "messages"),
    "messages not a list": ({"messages": "hello"}, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    "tool role": ({"messages": FRANCE + [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages"),
    "function role": ({"messages": [{"role": "function", "name": "f", "content": "42"}]}, "messages"),
    "tools": ({"messages": FRANCE, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "image part": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
    "content not text": ({"messages": [{"role": "user", "content": 42}]}, "messages"),
    "top_logprobs without logprobs": ({"messages": FRANCE, "top_logprobs": 2}, "top_logprobs"),
    "top_logprobs over 20": ({"messages": FRANCE, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "json response_format": ({"messages": FRANCE, "response_format": {"type": "json_object"}}, "response_format"),
    "request's own template": ({"messages": FRANCE, "chat_template": "{{ messages }}"}, "chat_template"),
    "reserved template argument": ({"messages": FRANCE, "chat_template_kwargs": {"tokenize": True}},
                                   "chat_template_kwargs"),
    "continue without an assistant message": ({"messages": FRANCE, "continue_final_message": True,
                                               "add_generation_prompt": False}, "continue_final_message"),
    "negative max_completion_tokens": ({"messages": FRANCE, "max_completion_tokens": -1}, "max_completion_tokens"),
    "min_tokens over the budget": ({"messages": FRANCE, "max_completion_tokens": 2, "min_tokens": 3}, "min_tokens"),
    "stream_options without stream": ({"messages": FRANCE, "stream_options": {"include_usage": True}},
                                      "stream_options"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_chat_requests_get_400(smol, case):
    _, client, engine, _, _ = smol
    fields, param = BAD[case]
    r = client.post("/v1/chat/completions", json={"model": NAME, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert engine.num_running == 0


def test_a_model_without_a_chat_template_gets_400(checkpoint):
    with local_app(checkpoint("llama"), [(0, 3), (3, 6)]) as (client, _, _):
        r = client.post("/v1/chat/completions", json={"model": "model", "messages": FRANCE})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert client.post("/v1/completions", json={"model": "model", "prompt": "the", "max_tokens": 2}).status_code == 200


def test_langchain_and_litellm(smol, monkeypatch):
    url = smol[0] + "/v1"
    expected, _ = reference_answer(smol, FRANCE, 16)
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=NAME, base_url=url, api_key="unused", temperature=0, max_tokens=16)
    assert chat.invoke(FRANCE[0]["content"]).content == expected
    assert "".join(chunk.content for chunk in chat.stream(FRANCE[0]["content"])) == expected

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of prices from the internet
    import litellm

    answer = litellm.completion(model=f"openai/{NAME}", api_base=url, api_key="unused", messages=FRANCE,
                                temperature=0, max_tokens=16)
    assert answer.choices[0].message.content == expected
    chunks = litellm.completion(model=f"openai/{NAME}", api_base=url, api_key="unused", messages=FRANCE,
                                temperature=0, max_tokens=16, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_tokenizer_endpoints(smol):
    _, client, _, _, tokenizer = smol
    r = client.post("/tokenize", json={"model": NAME, "prompt": "The capital of France"})
    assert r.json() == {"count": 4, "max_model_len": 2048, "token_strs": None,
                        "tokens": tokenizer("The capital of France").input_ids}
    r = client.post("/tokenize", json={"messages": TALK, "return_token_strs": True}).json()
    assert r["tokens"] == template_ids(tokenizer, TALK) and r["count"] == len(r["tokens"])
    assert r["token_strs"] == tokenizer.convert_ids_to_tokens(r["tokens"])
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == tokenizer.decode(r["tokens"])
    for path, body, param in [("/tokenize", {"prompt": "x", "messages": FRANCE}, None),
                              ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                              ("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {"tokens": [[1, 2]]}, "tokens")]:
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)
    assert client.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/version").json()["version"]


def test_a_stream_the_client_leaves_frees_its_sequence(smol):
    url, _, engine, _, _ = smol
    body = {"model": NAME, "messages": FRANCE, "max_tokens": 400, "stream": True, "ignore_eos": True}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        for _ in range(4):
            r.readline()
        assert engine.num_running == 1
    deadline = time.monotonic() + 10
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.num_running == 0
