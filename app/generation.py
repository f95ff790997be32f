"""The generation core every endpoint shares: token ids and sampling settings in, token events out.

An endpoint (completions, chat) turns its request into prompts (token ids) and `SamplingParams`,
starts a `Generation`, and formats what it yields: per choice, text deltas that never break a
character or cut into a stop string, each token's log-probability with its alternatives, the
finish reason, and the usage. The format of the answer is the endpoint's own business.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from app.beam import BeamGroup, BeamSearch
from app.detokenizer import IncrementalDetokenizer, StopChecker
from app.engine import Engine, Sequence
from app.protocol import UsageInfo, random_id
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
    task: str = "generate"  # or "embed": an encoder (`stages.encoder`), whose max_model_len is its longest input
    # LoRA adapters served beside the model: name -> directory; the i-th (from 1) is adapter i on the stages
    adapters: dict[str, str] = field(default_factory=dict)

    def adapter_index(self, name: str) -> int | None:
        """0 for the model's own name, i for its i-th adapter, None for a name it does not serve."""
        if name == self.name:
            return 0
        names = list(self.adapters)
        return names.index(name) + 1 if name in names else None


class PipelineError(RuntimeError):
    """The stages failed and could not be recovered (503)."""


class SequenceFailed(RuntimeError):
    """One sequence of the request failed on its own: sampling, text, a step that kept failing (500)."""


@dataclass
class TokenLogprob:
    """One token of a choice with its log-probability (None: the prompt's first token) and the most
    likely alternatives at its position, best first, as (token id, text, log-probability)."""

    token: int
    text: str
    logprob: float | None
    top: list[tuple[int, str, float]] | None = None


@dataclass
class Delta:
    """What one engine event added to a choice: text, tokens' logprobs, and the finish when it ended."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class ChoiceState:
    """Text assembly of one choice: detokenizer, stop strings, logprobs."""

    seq: Sequence
    detok: IncrementalDetokenizer
    stops: StopChecker
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    done: bool = False
    echoed: bool = False


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)


class Generation:
    """The sequences of one request: `num_candidates` per prompt, each with its prompt's params.

    Args:
        engine: schedules the sequences.
        model: the served model.
        prompts: token ids of each prompt.
        params: the sampling parameters of each prompt (they differ only in `max_tokens`).
        num_candidates: sequences per prompt (`best_of`, else `n`); the `n` best by cumulative
            log-probability are returned when it is larger than `n`.
        n: choices returned per prompt.
        seed: makes sampling repeatable (candidate i of a prompt is seeded with `seed + i`).
        echo: each choice starts with its prompt's text (and, with logprobs, its tokens'
            log-probabilities: every one but the first, with their alternatives).
        id_prefix: of the request's id (`cmpl`, `chatcmpl`).
        adapter: the LoRA adapter its sequences run with (0: none; see `ModelInfo.adapters`).
    """

    def __init__(self, engine: Engine, model: ModelInfo, prompts: list[list[int]], params: list[SamplingParams],
                 num_candidates: int = 1, n: int = 1, seed: int | None = None, echo: bool = False,
                 id_prefix: str = "cmpl", adapter: int = 0):
        self.engine, self.model, self.prompt_ids = engine, model, prompts
        self.n, self.num_candidates, self.echo = n, num_candidates, echo
        self.id, self.created = random_id(id_prefix), int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        self.states: list[ChoiceState] = []
        for ids, prompt_params in zip(prompts, params):
            for i in range(num_candidates):
                # the last stage draws candidate i's tokens from seed + i (a random seed without one)
                seq = Sequence(ids, prompt_params, self.events, index=len(self.states), request_id=self.id,
                               prompt_logprobs=echo and prompt_params.logprobs is not None,
                               seed=seed + i if seed is not None else secrets.randbits(63), key=secrets.randbits(62),
                               adapter=adapter)
                detok = IncrementalDetokenizer(model.tokenizer, ids, prompt_params.skip_special_tokens)
                stops = StopChecker(prompt_params.stop, prompt_params.include_stop_str_in_output)
                self.states.append(ChoiceState(seq, detok, stops))
            if prompt_params.beam_width:  # the prompt's sequences are the beams of one search
                BeamGroup([state.seq for state in self.states[-num_candidates:]],
                          BeamSearch(num_candidates, prompt_params.max_tokens, prompt_params.stop_token_ids,
                                     prompt_params.length_penalty, prompt_params.early_stopping,
                                     prompt_params.min_tokens))

    def start(self) -> None:
        """Queues the sequences (an echo of max_tokens 0 without logprobs needs no compute).

        Raises:
            app.engine.Overloaded: too many sequences wait already (the caller aborts).
        """
        for state in self.states:
            seq = state.seq
            if seq.params.max_tokens == 0 and not seq.prompt_logprobs:
                seq.finish_reason = "length"
                self.events.put_nowait(("finished", seq, "length"))
            elif not seq.parked:  # a beam search's other sequences come in with its first
                self.engine.add(seq)

    def abort(self) -> None:
        """Ends every sequence still running (a no-op for those done)."""
        for state in self.states:
            self.engine.abort(state.seq)

    @property
    def done(self) -> bool:
        return all(state.done for state in self.states)

    async def deltas(self):
        """Yields a `Delta` per engine event that adds something (text, logprobs, a finish) until
        every choice is done.

        Raises:
            PipelineError: the stages failed for good.
            SequenceFailed: one of the request's sequences failed on its own.
        """
        while not self.done:
            kind, seq, payload = await self.events.get()
            state = self.states[seq.index]
            if kind == "error":
                raise PipelineError(payload)
            if kind == "failed":
                raise SequenceFailed(payload)
            delta, was_done = Delta(seq.index), state.done
            if self.echo and not state.echoed:
                state.echoed = True  # prompt logprobs are complete once the first event arrives
                self._echo(state, delta)
            self._apply(state, kind, payload, delta)
            state.text += delta.text
            state.logprobs += delta.logprobs
            if state.done and not was_done:
                delta.finish_reason, delta.stop_reason = state.finish_reason, state.stop_reason
            if delta.text or delta.logprobs or delta.finish_reason is not None:
                yield delta

    async def run(self) -> list[ChoiceState]:
        """Waits for every choice; returns those sent back (see `returned`)."""
        async for _ in self.deltas():
            pass
        return self.returned()

    def returned(self) -> list[ChoiceState]:
        """The choices sent back: with best_of, the n best of each prompt by cumulative logprob."""
        n, k = self.n, self.num_candidates
        if k == n:
            return self.states
        picked = []
        for p in range(len(self.prompt_ids)):
            group = self.states[p * k:(p + 1) * k]
            picked += sorted(group, key=lambda s: -s.seq.cumulative_logprob)[:n]
        return picked

    @property
    def meta(self) -> dict:
        """The fields every answer and chunk of this request carries: id, created, model."""
        return {"id": self.id, "created": self.created, "model": self.model.name}

    def usage(self) -> UsageInfo:
        """Prompt tokens, and completion tokens of the choices sent back."""
        return UsageInfo.of(sum(len(ids) for ids in self.prompt_ids),
                            sum(len(state.seq.output_ids) for state in self.returned()))

    # ---- assembling text ----

    def _logprob(self, token: int, value: float | None, top: list[tuple[int, float]] | None) -> TokenLogprob:
        tokenizer = self.model.tokenizer
        alternatives = None if top is None else [(t, token_text(tokenizer, t), v) for t, v in top]
        return TokenLogprob(token, token_text(tokenizer, token), value, alternatives)

    def _echo(self, state: ChoiceState, delta: Delta) -> None:
        """The prompt's text, and its tokens' logprobs, at the start of an echoed choice."""
        seq = state.seq
        delta.text = self.model.tokenizer.decode(seq.prompt_ids, skip_special_tokens=seq.params.skip_special_tokens,
                                                 clean_up_tokenization_spaces=False)
        if seq.params.logprobs is not None:
            values = seq.prompt_logprob_values or [(None, None)] * len(seq.prompt_ids)
            delta.logprobs = [self._logprob(token, value, top) for token, (value, top) in zip(seq.prompt_ids, values)]

    def _apply(self, state: ChoiceState, kind: str, payload, delta: Delta) -> None:
        seq = state.seq
        if kind == "token":
            choice = payload
            if seq.params.logprobs is not None:
                delta.logprobs.append(self._logprob(choice.token, choice.logprob, choice.top))
            if choice.token in seq.params.stop_token_ids and not seq.params.ignore_eos:
                return  # EOS ends the text; it is not part of it
            delta.text += state.stops.add(state.detok.add(choice.token))
            if state.stops.matched is not None:
                state.finish_reason, state.stop_reason, state.done = "stop", state.stops.matched, True
                self.engine.abort(seq, "stop")
            return
        # finished
        if state.done:
            return
        state.done = True
        state.finish_reason = payload
        if payload == "stop" and seq.output_ids and seq.output_ids[-1] in seq.params.stop_token_ids:
            state.stop_reason = None
        delta.text += state.stops.add(state.detok.flush(), final=True)
        if state.stops.matched is not None:
            state.finish_reason, state.stop_reason = "stop", state.stops.matched
