"""OpenAI completions over the engine: request -> sequences -> a response or an SSE stream."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from app.detokenizer import IncrementalDetokenizer, StopChecker
from app.engine import Engine, Sequence
from app.errors import BadRequest
from app.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                          CompletionStreamResponse, UsageInfo, random_id, resolve_max_tokens, validate_token_ids)
from app.sampling import SamplingParams


@dataclass
class ModelInfo:
    """What the HTTP layer knows of the served model."""

    name: str
    tokenizer: object
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ChoiceState:
    """Text assembly of one choice: detokenizer, stop strings, logprobs."""

    seq: Sequence
    detok: IncrementalDetokenizer
    stops: StopChecker
    text: str = ""
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    done: bool = False
    echoed: bool = False


class PipelineError(RuntimeError):
    """The stages failed and could not be recovered (503)."""


class SequenceFailed(RuntimeError):
    """One sequence of the request failed on its own: sampling, text, a step that kept failing (500)."""


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


def sampling_params(request: CompletionRequest, max_tokens: int, model: ModelInfo) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
        top_k=request.effective_top_k, min_tokens=request.min_tokens,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty, logit_bias=request.logit_bias_ids,
        seed=request.seed, logprobs=request.logprobs, rank_by_logprob=request.num_candidates > request.n,
        ignore_eos=request.ignore_eos,
        stop=tuple(request.stop_list), stop_token_ids=() if request.ignore_eos else model.eos_token_ids,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens)


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)


class Completion:
    """One completions request in flight: its sequences and the text of each choice."""

    def __init__(self, request: CompletionRequest, engine: Engine, model: ModelInfo):
        self.request, self.engine, self.model = request, engine, model
        self.id = random_id("cmpl")
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        prompts = tokenize_prompts(request, model)
        self.prompt_ids = prompts
        self.states: list[ChoiceState] = []
        want_prompt_logprobs = request.echo and request.logprobs is not None
        for p, ids in enumerate(prompts):
            max_tokens = resolve_max_tokens(len(ids), request.max_tokens, model.max_model_len)
            params = sampling_params(request, max_tokens, model)
            for i in range(request.num_candidates):
                generator = None
                if not params.greedy:
                    generator = torch.Generator()
                    generator.manual_seed(request.seed + i if request.seed is not None
                                          else int.from_bytes(random_id("s").encode()[-8:], "little"))
                seq = Sequence(ids, params, self.events, index=len(self.states), request_id=self.id,
                               prompt_logprobs=want_prompt_logprobs, generator=generator)
                self.states.append(ChoiceState(seq, IncrementalDetokenizer(model.tokenizer, ids,
                                                                           request.skip_special_tokens),
                                               StopChecker(params.stop, params.include_stop_str_in_output)))
        for state in self.states:
            if request.logprobs is not None:
                state.logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])

    def start(self) -> None:
        """Queues the sequences (an echo of max_tokens 0 without logprobs needs no compute)."""
        for state in self.states:
            seq = state.seq
            if seq.params.max_tokens == 0 and not seq.prompt_logprobs:
                seq.finish_reason = "length"
                self.events.put_nowait(("finished", seq, "length"))
            else:
                self.engine.add(seq)

    def abort(self) -> None:
        for state in self.states:
            self.engine.abort(state.seq)

    # ---- assembling text ----

    def _echo(self, state: ChoiceState) -> str:
        """The prompt text, and its tokens' logprobs, at the start of an echoed choice."""
        seq, tokenizer = state.seq, self.model.tokenizer
        text = tokenizer.decode(seq.prompt_ids, skip_special_tokens=self.request.skip_special_tokens,
                                clean_up_tokenization_spaces=False)
        if state.logprobs is not None:
            values = seq.prompt_logprob_values or [None] * len(seq.prompt_ids)
            for token, value in zip(seq.prompt_ids, values):
                self._add_logprob(state, token_text(tokenizer, token), value, None)
        return text

    def _add_logprob(self, state: ChoiceState, piece: str, value, top) -> None:
        lp = state.logprobs
        offset = (lp.text_offset[-1] + len(lp.tokens[-1])) if lp.tokens else 0
        lp.tokens.append(piece)
        lp.token_logprobs.append(value)
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)

    def on_event(self, kind: str, seq: Sequence, payload) -> str:
        """Applies one engine event to its choice; returns the new text it releases."""
        state = self.states[seq.index]
        if kind == "error":
            raise PipelineError(payload)
        if kind == "failed":
            raise SequenceFailed(payload)
        echo = ""
        if self.request.echo and not state.echoed:
            state.echoed = True  # prompt logprobs are complete once the first event arrives
            echo = self._echo(state)
        return echo + self._apply(state, kind, seq, payload)

    def _top_logprobs(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """{text: logprob} of the alternatives; two ids with the same text (e.g. partial UTF-8 bytes,
        both "\ufffd") are told apart by their vocabulary strings."""
        out: dict[str, float] = {}
        for token, value in top:
            key = token_text(self.model.tokenizer, token)
            if key in out:
                key = self.model.tokenizer.convert_ids_to_tokens(token)
            out[key] = value
        return out

    def _apply(self, state: ChoiceState, kind: str, seq: Sequence, payload) -> str:
        if kind == "token":
            choice = payload
            if state.logprobs is not None:
                top = self._top_logprobs(choice.top or [])
                self._add_logprob(state, token_text(self.model.tokenizer, choice.token), choice.logprob,
                                  top or None)
            if choice.token in seq.params.stop_token_ids and not seq.params.ignore_eos:
                return ""  # EOS ends the text; it is not part of it
            delta = state.stops.add(state.detok.add(choice.token))
            if state.stops.matched is not None:
                state.finish_reason, state.stop_reason, state.done = "stop", state.stops.matched, True
                self.engine.abort(seq, "stop")
            return delta
        # finished
        if state.done:
            return ""
        state.done = True
        state.finish_reason = payload
        if payload == "stop" and seq.output_ids and seq.output_ids[-1] in seq.params.stop_token_ids:
            state.stop_reason = None
        delta = state.stops.add(state.detok.flush(), final=True)
        if state.stops.matched is not None:
            state.finish_reason, state.stop_reason = "stop", state.stops.matched
        return delta

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(ids) for ids in self.prompt_ids)
        completion_tokens = sum(len(s.seq.output_ids) for s in self._returned())
        return UsageInfo.of(prompt_tokens, completion_tokens)

    def _returned(self) -> list[ChoiceState]:
        """The choices sent back: with best_of, the n best of each prompt by cumulative logprob."""
        n, k = self.request.n, self.request.num_candidates
        if k == n:
            return self.states
        picked = []
        for p in range(len(self.prompt_ids)):
            group = self.states[p * k:(p + 1) * k]
            picked += sorted(group, key=lambda s: -s.seq.cumulative_logprob)[:n]
        return picked

    # ---- results ----

    async def run(self) -> CompletionResponse:
        """Waits for every choice and returns the whole response."""
        while not all(s.done for s in self.states):
            kind, seq, payload = await self.events.get()
            self.states[seq.index].text += self.on_event(kind, seq, payload)
        choices = [CompletionChoice(index=i, text=state.text, logprobs=state.logprobs,
                                    finish_reason=state.finish_reason, stop_reason=state.stop_reason)
                   for i, state in enumerate(self._returned())]
        return CompletionResponse(id=self.id, created=self.created, model=self.model.name, choices=choices,
                                  usage=self.usage())

    async def stream(self):
        """Yields SSE lines: a chunk per released piece of text, then usage (if asked) and [DONE]."""
        while not all(s.done for s in self.states):
            kind, seq, payload = await self.events.get()
            state = self.states[seq.index]
            num_logprobs = len(state.logprobs.tokens) if state.logprobs is not None else 0
            text = self.on_event(kind, seq, payload)
            logprobs = None
            if state.logprobs is not None and len(state.logprobs.tokens) > num_logprobs:
                lp = state.logprobs
                logprobs = CompletionLogprobs(tokens=lp.tokens[num_logprobs:],
                                              token_logprobs=lp.token_logprobs[num_logprobs:],
                                              top_logprobs=lp.top_logprobs[num_logprobs:],
                                              text_offset=lp.text_offset[num_logprobs:])
            finish = state.finish_reason if state.done else None
            if not text and logprobs is None and finish is None:
                continue
            choice = CompletionChoice(index=seq.index, text=text, logprobs=logprobs, finish_reason=finish,
                                      stop_reason=state.stop_reason if finish else None)
            yield _sse(CompletionStreamResponse(id=self.id, created=self.created, model=self.model.name,
                                                choices=[choice]))
        if self.request.include_usage:
            yield _sse(CompletionStreamResponse(id=self.id, created=self.created, model=self.model.name,
                                                choices=[], usage=self.usage()))
        yield "data: [DONE]\n\n"


def _sse(chunk: CompletionStreamResponse) -> str:
    return f"data: {chunk.model_dump_json(exclude_unset=False)}\n\n"
