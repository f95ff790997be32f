"""`POST /v1/embeddings` (issue 20): all-MiniLM-L6-v2 split into stages, served by the same stage
servers and data plane as a decoder, against the same model in one process. In-process, no Ray."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from tests.local import local_app

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums.",
             "The girl is carrying a baby.", "A man is riding a horse.", "Someone in a gorilla costume is playing a set "
             "of drums."]
SPLITS = {2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}


def reference(model_dir: str, texts: list[str]) -> torch.Tensor:
    """The model in one process, pooled and normalised as sentence-transformers does."""
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("num_stages", [2, 3])
def test_embeddings_through_stages_equal_the_model_in_one_process(minilm, num_stages):
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    expected = reference(minilm, SENTENCES)
    with local_app(minilm, SPLITS[num_stages], name="all-MiniLM-L6-v2", max_batch_size=4) as (client, _, servers):
        r = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": SENTENCES})
        assert r.status_code == 200, r.text
        body = r.json()
        got = torch.tensor([d["embedding"] for d in body["data"]])
        assert [d["index"] for d in body["data"]] == list(range(len(SENTENCES)))
        assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
        cosine = F.cosine_similarity(got, expected)
        assert cosine.min() >= 0.9999, cosine
        assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
        tokens = sum(len(ids) for ids in tokenizer(SENTENCES).input_ids)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        assert servers[-1].load.steps == 2  # 6 texts in steps of at most 4
        # ranked as one expects: eating food is nearest eating bread, drums nearest the gorilla's
        similarity = got @ got.T
        assert similarity[0, 1] > max(similarity[0, 2:]) and similarity[2, 5] == max(similarity[2, [0, 1, 3, 4, 5]])
        # base64 (little-endian float32, as OpenAI's), token ids, and a single string
        encoded = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": SENTENCES[:2],
                                                       "encoding_format": "base64"}).json()["data"]
        decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in encoded]
        assert np.array_equal(np.stack(decoded), got[:2].numpy())
        ids = tokenizer(SENTENCES[:2]).input_ids
        by_ids = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ids}).json()["data"]
        assert F.cosine_similarity(torch.tensor([d["embedding"] for d in by_ids]), got[:2]).min() > 0.99999
        one = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": SENTENCES[2]}).json()
        assert len(one["data"]) == 1 and F.cosine_similarity(torch.tensor(one["data"][0]["embedding"]), got[2],
                                                              dim=0) > 0.99999


BAD = {
    "an input longer than max_seq_length": ({"input": "word " * 300}, "input", "256"),
    "dimensions": ({"input": "hi", "dimensions": 8}, "dimensions", "matryoshka"),
    "an empty string": ({"input": ""}, "input", "empty"),
    "an empty list": ({"input": []}, "input", "empty"),
    "a list with an empty string": ({"input": ["hi", ""]}, "input", "empty"),
    "an empty token list": ({"input": [[1, 2], []]}, "input", "empty"),
    "a token id beyond the vocabulary": ({"input": [10**6]}, "input", "vocabulary"),
    "an encoding format OpenAI does not have": ({"input": "hi", "encoding_format": "int8"}, "encoding_format", ""),
}


def test_bad_embedding_requests_get_400_and_generation_is_refused_on_an_encoder(minilm):
    with local_app(minilm, SPLITS[2], name="m") as (client, _, _):
        for name, (body, param, words) in BAD.items():
            r = client.post("/v1/embeddings", json={"model": "m", **body})
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == param and words in error["message"], (name, r.text)
        cut = client.post("/v1/embeddings", json={"model": "m", "input": "word " * 300, "truncate_prompt_tokens": 20})
        assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 20
        whole = client.post("/v1/embeddings", json={"model": "m", "input": "word " * 300, "truncate_prompt_tokens": -1})
        assert whole.status_code == 200 and whole.json()["usage"]["prompt_tokens"] == 256
        for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions",
                                                                  {"messages": [{"role": "user", "content": "hi"}]})):
            r = client.post(path, json={"model": "m", **body})
            assert r.status_code == 400 and "Embeddings" not in r.json()["error"]["message"], r.text
        assert client.post("/v1/embeddings", json={"model": "other", "input": "hi"}).status_code == 404
        assert client.post("/v1/embeddings", json={"model": "m", "input": "still serving"}).status_code == 200


def test_embeddings_sent_to_a_decoder_get_400(checkpoint):
    with local_app(checkpoint("llama"), [(0, 3), (3, 6)]) as (client, _, _):
        r = client.post("/v1/embeddings", json={"model": "model", "input": "hi"})
        assert r.status_code == 400 and "Embeddings API" in r.json()["error"]["message"], r.text


def test_serve_run_picks_the_encoder_path_and_the_openai_client_embeds(minilm):
    """`serve run app:build_app model=<MiniLM> num_stages=3`: the builder finds an encoder in the
    config, plans its layers by their bytes, and serves /v1/embeddings (the openai client asks for
    base64 and decodes it)."""
    import openai

    from tests.serving import ServeRun

    expected = reference(minilm, SENTENCES)
    with ServeRun({"model": minilm, "num_stages": 3, "served_model_name": "all-MiniLM-L6-v2"}) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == ["all-MiniLM-L6-v2"]
        answer = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES)
        got = torch.tensor([d.embedding for d in answer.data])
        assert F.cosine_similarity(got, expected).min() >= 0.9999
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(
            len(ids) for ids in AutoTokenizer.from_pretrained(minilm)(SENTENCES).input_ids)
        with pytest.raises(openai.BadRequestError, match="Completions"):
            client.completions.create(model="all-MiniLM-L6-v2", prompt="hi")
        health = server.get("/health")
        assert [s["state"] for s in health["stages"]] == ["ready"] * 3, health


def test_a_failed_embedding_step_is_sent_again_and_a_missing_stage_is_a_503(minilm):
    with local_app(minilm, SPLITS[2], name="m") as (client, engine, servers):
        last, calls = servers[-1].stage, []
        forward = last.forward

        def fail_once(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated failure of the last stage")
            return forward(*args)

        last.forward = fail_once
        r = client.post("/v1/embeddings", json={"model": "m", "input": SENTENCES[:2]})
        assert r.status_code == 200 and len(calls) == 2, r.text
        engine.set_replicas([r for r in engine.replicas.values() if r.stage == 0])  # the last stage is gone
        r = client.post("/v1/embeddings", json={"model": "m", "input": "hi"})
        assert r.status_code == 503 and "Stage1 has no replica" in r.json()["error"]["message"], r.text
