"""`POST /v1/embeddings`: OpenAI's embeddings, from an encoder split into stages (`stages.encoder`).

The stages are the same deployments and data plane as a decoder's: a step carries whole texts,
right-padded, from position 0 and without KV cache blocks; the last stage pools (and normalises,
as the checkpoint says) and returns one float32 vector per text where a decoder returns logits.
A request's inputs go in steps of up to `max_batch_size` texts within the step's token budget,
its steps in flight at once; a step that fails is sent again on the replicas found after the
stages are looked for again, as a decoder's sequences are replayed.

Follows OpenAI (``input`` as a string, a list of strings, token ids or lists of them; at most
2048 inputs; ``encoding_format`` ``float`` or ``base64``, little-endian float32) and vLLM where it
is silent (``truncate_prompt_tokens`` keeps the first tokens; ``dimensions`` is refused for models
without Matryoshka training, which none of the encoders served here claims).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import Counter
from typing import Any, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from app.errors import BadRequest, Unavailable, parse_json_body
from app.pipeline import PipelineClient, StepFailed, step_inputs
from app.protocol import is_int, validate_token_ids
from app.serving import Serving

logger = logging.getLogger(__name__)

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request
Input = Union[str, list[str], list[int], list[list[int]]]
_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


class EmbeddingRequest(BaseModel):
    """A ``POST /v1/embeddings`` body."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    input: Input
    encoding_format: Optional[Literal["float", "base64"]] = "float"
    dimensions: Optional[StrictInt] = Field(None, ge=1)
    user: Optional[StrictStr] = None
    truncate_prompt_tokens: Optional[StrictInt] = Field(None, ge=-1)

    @field_validator("input", mode="plain")
    @classmethod
    def _check_input(cls, value: Any) -> Input:
        items = [value] if isinstance(value, str) or (isinstance(value, list) and value and is_int(value[0])) \
            else value
        if not isinstance(items, list) or not items:
            raise ValueError(f"input must be {_SHAPES}, and not empty")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"input has {len(items)} items, more than {MAX_INPUTS}")
        for i, item in enumerate(items):
            if isinstance(item, str) and item == "" or isinstance(item, list) and not item:
                raise ValueError(f"input[{i}] is empty")
            if not isinstance(item, str) and not (isinstance(item, list) and all(is_int(t) and t >= 0 for t in item)):
                raise ValueError(f"input must be {_SHAPES}; input[{i}] is neither")
        return value

    @property
    def inputs(self) -> list[str | list[int]]:
        value = self.input
        return [value] if isinstance(value, str) or is_int(value[0]) else list(value)


class Embedder:
    """Runs texts through the encoder's stages, batched into steps.

    Args:
        replicas: returns the stage replicas that serve now (`app.sequence.Replica`, e.g. the
            engine's `replicas.values()`).
        num_stages: stages in the pipeline.
        pipeline: the data plane.
        max_batch_size: texts per step.
        max_num_batched_tokens: tokens per step, padding included (a text longer than that
            goes alone).
        step_timeout_s: a step that takes longer counts as failed.
        max_step_failures: attempts of one step, each after `recover`.
        recover: awaited after a failed step: looks for the stages again (None: nothing).
    """

    def __init__(self, replicas, num_stages: int, pipeline: PipelineClient, max_batch_size: int,
                 max_num_batched_tokens: int, step_timeout_s: float = 60.0, max_step_failures: int = 3, recover=None):
        self.replicas, self.num_stages, self.pipeline, self.recover = replicas, num_stages, pipeline, recover
        self.max_batch_size, self.max_num_batched_tokens = max_batch_size, max_num_batched_tokens
        self.step_timeout_s, self.max_step_failures = step_timeout_s, max_step_failures
        self.in_flight: Counter[str] = Counter()  # steps in flight per replica id

    async def embed(self, texts: list[list[int]]) -> torch.Tensor:
        """(N, H) float32: one vector per text (token ids), in order.

        Raises:
            StepFailed: a step failed `max_step_failures` times.
        """
        parts = await asyncio.gather(*(self._step(batch) for batch in self.batches(texts)))
        return torch.cat(parts)

    def batches(self, texts: list[list[int]]) -> list[list[list[int]]]:
        """Consecutive texts, each batch at most `max_batch_size` of them and, padded to its
        longest, within the token budget."""
        out: list[list[list[int]]] = []
        for text in texts:
            batch = out[-1] if out else None
            if batch is None or len(batch) == self.max_batch_size or \
                    (len(batch) + 1) * max(len(text), *map(len, batch)) > self.max_num_batched_tokens:
                out.append([text])
            else:
                batch.append(text)
        return out

    def _route(self) -> list | None:
        """A replica per stage, the least busy of each (None: a stage has none)."""
        by_stage: dict[int, list] = {}
        for replica in self.replicas():
            if not replica.draining:
                by_stage.setdefault(replica.stage, []).append(replica)
        if sorted(by_stage) != list(range(self.num_stages)):
            return None
        return [min(by_stage[stage], key=lambda r: self.in_flight[r.id]) for stage in sorted(by_stage)]

    async def _step(self, batch: list[list[int]]) -> torch.Tensor:
        inputs = step_inputs(batch, packed=False)  # whole texts, right-padded
        failure = "no replica of every stage is ready"
        for attempt in range(self.max_step_failures):
            route = self._route()
            if route is not None:
                ids = [replica.id for replica in route]
                self.in_flight.update(ids)
                try:
                    result = await self.pipeline.step(
                        [replica.address for replica in route], inputs, [[[] for _ in batch] for _ in route],
                        [0] * len(batch), [len(text) for text in batch], timeout=self.step_timeout_s)
                    return result.logits
                except StepFailed as exc:
                    failure = str(exc)
                    logger.warning("embedding step failed (%s); attempt %d of %d", exc, attempt + 1,
                                   self.max_step_failures)
                finally:
                    self.in_flight.subtract(ids)
            if self.recover is not None:
                await self.recover()
        raise StepFailed(failure)


def tokenize_inputs(body: EmbeddingRequest, serving: Serving) -> list[list[int]]:
    """Token ids of each input, within the model's `max_model_len` (its `max_seq_length`) unless
    `truncate_prompt_tokens` cuts them (-1: to that length).

    Raises:
        BadRequest: an input is too long, or names a token id outside the vocabulary.
    """
    model = serving.model
    limit = body.truncate_prompt_tokens
    if limit is not None and (limit == -1 or limit > model.max_model_len):
        limit = model.max_model_len
    out = []
    for i, item in enumerate(body.inputs):
        if isinstance(item, str):
            ids = model.tokenizer(item, truncation=limit is not None, max_length=limit).input_ids
        else:
            validate_token_ids(item, model.vocab_size, param="input")
            ids = list(item[:limit])
        if len(ids) > model.max_model_len:
            raise BadRequest(f"input[{i}] has {len(ids)} tokens, more than this model's maximum input length of "
                             f"{model.max_model_len}; shorten it, or set truncate_prompt_tokens",
                             param="input", code="input_too_long")
        out.append(ids)
    return out


def add_routes(app: FastAPI, serving: Serving) -> None:
    model = serving.model

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await parse_json_body(request, EmbeddingRequest)
        serving.admit(body.model, task="embed")
        if body.dimensions is not None:
            raise BadRequest(f"Model {model.name} does not support matryoshka representation, changing output "
                             "dimensions will lead to poor results.", param="dimensions")
        texts = tokenize_inputs(body, serving)
        try:
            vectors = await serving.embedder.embed(texts)
        except StepFailed as exc:
            raise Unavailable(f"the stages could not embed the input: {exc}") from None
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                 if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        tokens = sum(map(len, texts))
        return {"object": "list", "data": data, "model": model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

