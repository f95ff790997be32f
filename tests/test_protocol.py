"""Request validation and OpenAI-shaped errors, on a tiny app without Ray or a model."""

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from app.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    install_error_handlers,
    parse_json_body,
)
from app.completions import CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse
from app.protocol import (
    ModelCard,
    ModelList,
    UsageInfo,
    random_id,
    resolve_max_tokens,
    validate_token_ids,
)

VOCAB_SIZE = 100


def _build_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse_json_body(request, CompletionRequest, max_body_bytes=300_000)
        if req.model != "tiny":
            raise NotFound(f"The model '{req.model}' does not exist", "model", "model_not_found")
        for prompt in req.prompts:
            if isinstance(prompt, list):
                validate_token_ids(prompt, VOCAB_SIZE)
        validate_token_ids(req.logit_bias_ids, VOCAB_SIZE, param="logit_bias")
        return req.model_dump()

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id="tiny")]).model_dump()

    @app.get("/busy")
    async def busy():
        raise Overloaded("The request queue is full", retry_after=3)

    @app.get("/items/{item_id}")
    async def item(item_id: int):
        return {"item_id": item_id}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    return app


@pytest.fixture(scope="module")
def client():
    with TestClient(_build_app(), raise_server_exceptions=False) as c:
        yield c


def _post(client, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/completions", content=data, headers={"content-type": content_type})


def _assert_error(resp, status, error_type, param="any"):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == error_type
    if param != "any":
        assert err["param"] == param
    return err


def _req(**fields):
    return {"model": "tiny", "prompt": "Hello", **fields}


# (body, param named in the error): each is a distinct kind of client mistake.
MALFORMED = {
    "missing_model": ({"prompt": "hi"}, "model"),
    "missing_prompt": ({"model": "tiny"}, "prompt"),
    "model_not_str": (_req(model=5), "model"),
    "max_tokens_str": (_req(max_tokens="abc"), "max_tokens"),
    "max_tokens_bool": (_req(max_tokens=True), "max_tokens"),
    "max_tokens_float": (_req(max_tokens=1.5), "max_tokens"),
    "max_tokens_negative": (_req(max_tokens=-1), "max_tokens"),
    "temperature_high": (_req(temperature=2.5), "temperature"),
    "temperature_negative": (_req(temperature=-0.1), "temperature"),
    "temperature_str": (_req(temperature="hot"), "temperature"),
    "top_p_zero": (_req(top_p=0), "top_p"),
    "top_p_high": (_req(top_p=1.5), "top_p"),
    "top_k_below_minus_one": (_req(top_k=-2), "top_k"),
    "n_zero": (_req(n=0), "n"),
    "n_too_many": (_req(n=129), "n"),
    "logprobs_high": (_req(logprobs=21), "logprobs"),
    "logprobs_negative": (_req(logprobs=-1), "logprobs"),
    "presence_penalty_high": (_req(presence_penalty=2.1), "presence_penalty"),
    "frequency_penalty_low": (_req(frequency_penalty=-3), "frequency_penalty"),
    "repetition_penalty_zero": (_req(repetition_penalty=0), "repetition_penalty"),
    "best_of_below_n": (_req(n=3, best_of=2), "best_of"),
    "best_of_too_many": (_req(best_of=200), "best_of"),
    "best_of_streamed": (_req(n=1, best_of=2, stream=True), "best_of"),
    "stop_int": (_req(stop=5), "stop"),
    "stop_list_of_ints": (_req(stop=["a", 1]), "stop"),
    "stop_empty_string": (_req(stop=""), "stop"),
    "prompt_empty_list": (_req(prompt=[]), "prompt"),
    "prompt_negative_id": (_req(prompt=[1, -5]), "prompt"),
    "prompt_empty_inner_list": (_req(prompt=[[1, 2], []]), "prompt"),
    "prompt_mixed": (_req(prompt=[1, "a"]), "prompt"),
    "prompt_float_ids": (_req(prompt=[1.0, 2.0]), "prompt"),
    "prompt_dict": (_req(prompt={"text": "hi"}), "prompt"),
    "prompt_id_out_of_vocab": (_req(prompt=[1, VOCAB_SIZE]), "prompt"),
    "prompt_nested_id_out_of_vocab": (_req(prompt=[[1], [10**30]]), "prompt"),
    "logit_bias_non_int_key": (_req(logit_bias={"abc": 1}), "logit_bias"),
    "logit_bias_negative_key": (_req(logit_bias={"-1": 1}), "logit_bias"),
    "logit_bias_value_high": (_req(logit_bias={"5": 101}), "logit_bias"),
    "logit_bias_value_str": (_req(logit_bias={"5": "x"}), "logit_bias"),
    "logit_bias_not_object": (_req(logit_bias=[1, 2]), "logit_bias"),
    "logit_bias_out_of_vocab": (_req(logit_bias={str(VOCAB_SIZE): 1}), "logit_bias"),
    "stream_options_without_stream": (_req(stream_options={"include_usage": True}), "stream_options"),
    "stream_options_bad_type": (_req(stream=True, stream_options={"include_usage": "yes"}),
                                "stream_options.include_usage"),
    "stream_not_bool": (_req(stream="true"), "stream"),
    "echo_not_bool": (_req(echo=1), "echo"),
    "min_tokens_over_max": (_req(max_tokens=4, min_tokens=5), "min_tokens"),
    "min_tokens_negative": (_req(min_tokens=-1), "min_tokens"),
    "suffix": (_req(suffix="tail"), "suffix"),
    "seed_too_large": (_req(seed=2**64), "seed"),
    "seed_float": (_req(seed=1.5), "seed"),
    "user_not_str": (_req(user=123), "user"),
    "ignore_eos_not_bool": (_req(ignore_eos="no"), "ignore_eos"),
}


@pytest.mark.parametrize("body,param", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_is_400(client, body, param):
    err = _assert_error(_post(client, body), 400, "invalid_request_error", param)
    assert err["message"].startswith(param) or param in err["message"]


RAW = {
    "invalid_json": b'{"model": "tiny", "prompt": ',
    "trailing_garbage": b'{"model": "tiny", "prompt": "x"} extra',
    "empty_body": b"",
    "json_array": b'[{"model": "tiny"}]',
    "json_string": b'"hello"',
    "json_null": b"null",
    "nan_constant": b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
    "overflow_to_inf": b'{"model": "tiny", "prompt": "x", "temperature": 1e400}',
    "invalid_utf8": b'{"model": "tiny", "prompt": "\xff\xfe"}',
    "huge_integer": b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    "deep_nesting": b'{"model": "tiny", "prompt": "x", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
}


@pytest.mark.parametrize("raw", RAW.values(), ids=RAW.keys())
def test_undecodable_body_is_400(client, raw):
    _assert_error(_post(client, raw), 400, "invalid_request_error")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=latin-1", ""])
def test_non_json_content_type_is_415(client, content_type):
    err = _assert_error(_post(client, _req(), content_type), 415, "invalid_request_error")
    assert "application/json" in err["message"] or "UTF-8" in err["message"]
    assert err["code"] == "unsupported_media_type"


def test_body_over_limit_is_413(client):
    err = _assert_error(_post(client, _req(prompt="x" * 300_000)), 413, "invalid_request_error")
    assert err["code"] == "request_too_large"


def test_unknown_model_is_404(client):
    err = _assert_error(_post(client, _req(model="other")), 404, "not_found_error", "model")
    assert err["code"] == "model_not_found"


def test_unknown_path_is_404(client):
    err = _assert_error(client.get("/v1/nothing"), 404, "not_found_error")
    assert "/v1/nothing" in err["message"]


def test_wrong_method_is_405_with_allow(client):
    resp = client.get("/v1/completions")
    err = _assert_error(resp, 405, "invalid_request_error")
    assert err["code"] == "method_not_allowed"
    assert resp.headers["allow"] == "POST"


def test_framework_validation_error_is_400(client):
    _assert_error(client.get("/items/abc"), 400, "invalid_request_error", "item_id")


def test_overloaded_is_503_with_retry_after(client):
    resp = client.get("/busy")
    err = _assert_error(resp, 503, "service_unavailable_error")
    assert err["code"] == "overloaded"
    assert resp.headers["retry-after"] == "3"


def test_unexpected_error_is_500_without_details(client):
    resp = client.get("/boom")
    err = _assert_error(resp, 500, "internal_server_error")
    assert "secret" not in resp.text and "Traceback" not in resp.text
    assert err["param"] is None


@pytest.mark.parametrize("prompt,expected", [
    ("Hello", ["Hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
    ("", [""]),
])
def test_valid_prompt_forms_parse(client, prompt, expected):
    resp = _post(client, _req(prompt=prompt), "application/json; charset=utf-8")
    assert resp.status_code == 200, resp.text
    assert CompletionRequest.model_validate(resp.json()).prompts == expected


def test_defaults_nulls_and_unknown_fields(client):
    body = _req(temperature=None, n=None, stream=None, top_p=None, some_future_field={"x": 1})
    resp = _post(client, body)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert (got["max_tokens"], got["temperature"], got["top_p"], got["n"]) == (16, 1.0, 1.0, 1)
    assert got["stream"] is False and got["skip_special_tokens"] is True
    assert "some_future_field" not in got


def test_full_valid_request_parses():
    req = CompletionRequest.model_validate(_req(
        max_tokens=0, echo=True, temperature=0, top_p=0.9, top_k=0, n=2, best_of=2, stop=["\n", "."],
        seed=-7, logprobs=20, presence_penalty=-2, frequency_penalty=2, repetition_penalty=1.2,
        min_tokens=0, user="u", ignore_eos=True, stream=True, stream_options={"include_usage": True},
    ))
    assert req.max_tokens == 0 and req.effective_top_k is None and req.num_candidates == 2
    assert req.stop_list == ["\n", "."] and req.include_usage
    assert CompletionRequest.model_validate(_req(max_tokens=None)).max_tokens is None


def test_logit_bias_parses_to_int_keys():
    req = CompletionRequest.model_validate(_req(logit_bias={"5": 100, "0": -100, "42": 0.5}))
    assert req.logit_bias_ids == {5: 100.0, 0: -100.0, 42: 0.5}
    assert CompletionRequest.model_validate(_req()).logit_bias_ids == {}


def test_validate_token_ids_bounds():
    validate_token_ids([0, VOCAB_SIZE - 1], VOCAB_SIZE)
    for bad in ([VOCAB_SIZE], [-1], [[0], [True]]):
        with pytest.raises(BadRequest) as info:
            validate_token_ids(bad, VOCAB_SIZE)
        assert info.value.status_code == 400 and info.value.param == "prompt"


def test_resolve_max_tokens():
    assert resolve_max_tokens(10, 6, 16) == 6
    assert resolve_max_tokens(10, None, 16) == 6
    for max_tokens in (7, None):
        prompt_len = 10 if max_tokens else 16
        with pytest.raises(BadRequest) as info:
            resolve_max_tokens(prompt_len, max_tokens, 16)
        assert info.value.code == "context_length_exceeded"


def test_response_models_serialize():
    resp = CompletionResponse(model="tiny", choices=[CompletionChoice(index=0, text="hi",
                              finish_reason="length")], usage=UsageInfo.of(3, 2))
    data = json.loads(resp.model_dump_json())
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunk = CompletionStreamResponse(id=resp.id, model="tiny")
    assert chunk.usage is None and chunk.choices == []
    assert random_id("cmpl") != random_id("cmpl") and len(random_id("x")) == 34


def test_models_endpoint(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == "tiny"
    assert data["data"][0]["owned_by"] == "stagewise"
