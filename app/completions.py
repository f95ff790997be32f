"""`POST /v1/completions`: OpenAI's (legacy) completions, with vLLM's extras.

Follows OpenAI where its reference is explicit (``max_tokens`` defaults to 16, ``best_of``
cannot stream, ``logprobs`` returns the chosen token's log-probability beside the ``logprobs``
best, so up to ``logprobs + 1`` of them) and vLLM where it is silent (``max_tokens: 0``
allowed without ``echo``, ``logprobs`` up to 20, ``suffix`` rejected).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field, StrictBool, StrictInt, ValidationInfo, field_validator

from app.errors import BadRequest, parse_json_body
from app.generation import Generation, ModelInfo, TokenLogprob
from app.protocol import (MAX_LOGPROBS, MAX_N, SamplingRequest, UsageInfo, is_int, random_id, resolve_max_tokens,
                          validate_token_ids)
from app.serving import Serving, sse

Prompt = Union[str, list[str], list[int], list[list[int]]]

_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _check_ids(ids: list, where: str) -> None:
    for i, tok in enumerate(ids):
        if not is_int(tok):
            raise ValueError(f"prompt must be {_PROMPT_SHAPES}; {where}[{i}] is {tok!r}")
        if tok < 0:
            raise ValueError(f"token ids must be >= 0; {where}[{i}] is {tok}")


class CompletionRequest(SamplingRequest):
    """A ``POST /v1/completions`` body."""

    prompt: Prompt
    suffix: Optional[Any] = None
    best_of: Optional[StrictInt] = Field(None, ge=1, le=MAX_N)
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False

    @field_validator("echo", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("prompt", mode="plain")
    @classmethod
    def _check_prompt(cls, value: Any) -> Prompt:
        # One plain validator instead of a 4-way union: one clear message, and no
        # per-element error lists built for long token-id prompts.
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"prompt must be {_PROMPT_SHAPES}")
        if not value:
            raise ValueError("prompt must not be an empty list")
        if all(isinstance(item, str) for item in value):
            return value
        if isinstance(value[0], list):
            for i, ids in enumerate(value):
                if not isinstance(ids, list):
                    raise ValueError(f"prompt must be {_PROMPT_SHAPES}; prompt[{i}] is {ids!r}")
                if not ids:
                    raise ValueError(f"prompt[{i}] must not be an empty list of token ids")
                _check_ids(ids, f"prompt[{i}]")
            return value
        _check_ids(value, "prompt")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("suffix is not supported")
        return None

    @field_validator("best_of")
    @classmethod
    def _best_of_vs_n(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        n = info.data.get("n", 1)
        if value is not None and value < n:
            raise ValueError(f"best_of ({value}) must be >= n ({n})")
        if value is not None and value > n and info.data.get("stream"):
            raise ValueError("best_of > n cannot be streamed")
        return value

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch of prompts: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and is_int(self.prompt[0]):
            return [list(self.prompt)]
        return list(self.prompt)

    @property
    def num_candidates(self) -> int:
        """How many sequences to sample per prompt (``best_of``, else ``n``)."""
        return self.best_of if self.best_of is not None else self.n


class CompletionLogprobs(BaseModel):
    """Per-token log-probabilities of one choice (OpenAI's legacy shape)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One completion; also a streamed chunk's choice (then ``text`` is the delta)."""

    index: int
    text: str = ""
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    stop_reason: Optional[Union[int, str]] = None  # vLLM: the stop string or EOS id hit


class CompletionResponse(BaseModel):
    """A non-streamed ``/v1/completions`` answer."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One SSE chunk of a streamed answer; ``usage`` only on the final usage chunk."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Optional[UsageInfo] = None


def tokenize_prompts(request: CompletionRequest, model: ModelInfo) -> list[list[int]]:
    """Token ids of every prompt of the request, validated against the vocabulary."""
    prompts = []
    for prompt in request.prompts:
        if isinstance(prompt, str):
            ids = model.tokenizer(prompt, add_special_tokens=True).input_ids
        else:
            validate_token_ids(prompt, model.vocab_size)
            ids = list(prompt)
        if not ids:
            raise BadRequest("the prompt is empty (no tokens)", param="prompt")
        prompts.append(ids)
    if request.logit_bias_ids:
        validate_token_ids(list(request.logit_bias_ids), model.vocab_size, param="logit_bias")
    return prompts


def legacy_logprobs(entries: list[TokenLogprob], tokenizer, offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy shape of a run of tokens whose text starts at character `offset`.

    `top_logprobs` maps each alternative's text to its log-probability, the chosen token's
    included; two ids with the same text (e.g. partial UTF-8 bytes, both "\ufffd") are told
    apart by their vocabulary strings. The prompt's first token has none (null).
    """
    out = CompletionLogprobs()
    for entry in entries:
        out.tokens.append(entry.text)
        out.token_logprobs.append(entry.logprob)
        out.text_offset.append(offset)
        offset += len(entry.text)
        if entry.logprob is None:
            out.top_logprobs.append(None)
            continue
        alternatives = list(entry.top or [])
        if all(token != entry.token for token, _, _ in alternatives):
            alternatives.append((entry.token, entry.text, entry.logprob))
        top: dict[str, float] = {}
        for token, text, value in alternatives:
            top[text if text not in top else tokenizer.convert_ids_to_tokens(token)] = value
        out.top_logprobs.append(top)
    return out


def add_routes(app: FastAPI, serving: Serving) -> None:
    model = serving.model

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_json_body(request, CompletionRequest)
        adapter = serving.admit(body.model)
        body.check_beam_search(serving.engine.config.beam_width_cap, best_of=body.best_of is not None,
                               logprobs=body.logprobs is not None, echo=body.echo)
        prompts = tokenize_prompts(body, model)
        rank = body.num_candidates > body.n
        params = [body.sampling_params(resolve_max_tokens(len(ids), body.max_tokens, model.max_model_len),
                                       model.eos_token_ids, body.logprobs, rank) for ids in prompts]
        generation = Generation(serving.engine, model, prompts, params, body.num_candidates, body.n, body.seed,
                                echo=body.echo, id_prefix="cmpl", adapter=adapter)
        meta = generation.meta
        async def whole() -> dict:
            choices = [CompletionChoice(index=i, text=state.text, finish_reason=state.finish_reason,
                                        stop_reason=state.stop_reason,
                                        logprobs=None if body.logprobs is None
                                        else legacy_logprobs(state.logprobs, model.tokenizer))
                       for i, state in enumerate(await generation.run())]
            return CompletionResponse(**meta, choices=choices, usage=generation.usage()).model_dump()

        async def lines():
            offsets = [0] * len(generation.states)
            async for delta in generation.deltas():
                logprobs = None
                if body.logprobs is not None and delta.logprobs:
                    logprobs = legacy_logprobs(delta.logprobs, model.tokenizer, offsets[delta.index])
                offsets[delta.index] += sum(len(entry.text) for entry in delta.logprobs)
                choice = CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                                          finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
                yield sse(CompletionStreamResponse(**meta, choices=[choice]))
            if body.include_usage:
                yield sse(CompletionStreamResponse(**meta, usage=generation.usage()))
            yield "data: [DONE]\n\n"

        return await serving.answer(request, generation, body.stream, lines, whole)
