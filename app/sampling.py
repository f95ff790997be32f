"""The ingress's side of sampling: the request's parameters, what the last stage is told to do
with them (`spec`), what it returned (`choices`), and the prompt's log-probabilities for echo.

The sampling itself happens on the last stage (`stages.sampler`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import TYPE_CHECKING

from app.beam import num_alternatives
from stages.sampler import FAILED, GREEDY_BELOW, Sampled, SamplingSpec, answer_sizes

if TYPE_CHECKING:
    from app.sequence import Sequence


class SamplingError(ValueError):
    """A sequence cannot be sampled (its logits are not finite): that sequence fails, no other."""


NOT_FINITE = "the model's logits for this sequence are not finite (NaN or infinity)"
NOT_SAMPLED = "the last stage could not sample this sequence (its token history was lost)"


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens (OpenAI's and vLLM's request fields).

    Attributes:
        max_tokens: tokens to generate at most.
        temperature: 0 (anything below `GREEDY_BELOW`) is greedy.
        top_p: nucleus mass kept (1 = all).
        top_k: tokens kept (None = all).
        min_tokens: EOS and stop token ids are masked until this many tokens exist.
        presence_penalty: subtracted once from every token already generated.
        frequency_penalty: subtracted per occurrence of a token already generated.
        repetition_penalty: vLLM's multiplicative penalty on prompt and output tokens (1 = off).
        logit_bias: token id -> value added to its logit.
        seed: makes sampling repeatable.
        logprobs: alternatives to report per token (None = no logprobs).
        rank_by_logprob: the sampled token's log-probability is needed even without `logprobs`
            (`best_of` ranks its candidates by their cumulative log-probability).
        ignore_eos: keep generating after EOS.
        stop: strings that end the generation (cut from the text).
        stop_token_ids: token ids that end it (EOS included unless ignore_eos).
        include_stop_str_in_output: keep the stop string in the text.
        skip_special_tokens: leave special tokens out of the text.
        beam_width: > 0: the request's `n` sequences are the beams of one beam search
            (`app.beam`), which ranks its continuations by their log-probabilities.
        length_penalty, early_stopping: the beam search's (see `app.beam.BeamSearch`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None
    rank_by_logprob: bool = False
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    beam_width: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def needs_logprob(self) -> bool:
        """The sampled token's log-probability is wanted (reported, or for ranking)."""
        return self.logprobs is not None or self.rank_by_logprob or self.beam_width > 0

    @property
    def num_top(self) -> int:
        """The most likely tokens the last stage returns besides the sampled one."""
        if self.beam_width:
            return num_alternatives(self.beam_width, len(self.stop_token_ids))
        return self.logprobs or 0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: one argmax does it."""
        return (self.greedy and not self.logit_bias and self.presence_penalty == 0
                and self.frequency_penalty == 0 and self.repetition_penalty == 1 and self.min_tokens == 0)


@dataclass
class Choice:
    """One sampled token and, when asked, its log-probability and the top alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def scored_prompts(sampled: Sampled, specs: tuple, scoring: tuple) -> dict[int, list[tuple[float, list | None]]]:
    """Per row that scored its prompt (`scoring`), (log-probability, alternatives or None) of each
    token its positions predicted, from the last stage's answer (after the rows' own entries)."""
    at, top_at = answer_sizes(specs)  # where the rows' own entries end
    out = {}
    for i, entry in enumerate(scoring):
        if entry is None:
            continue
        num_top, targets = entry
        values = sampled.logprobs[at:at + len(targets)].tolist()
        ids = sampled.top_ids[top_at:top_at + num_top * len(targets)].view(-1, num_top).tolist() if num_top else None
        tops = sampled.top_logprobs[top_at:top_at + num_top * len(targets)].view(-1, num_top).tolist() \
            if num_top else None
        out[i] = [(value, list(zip(ids[t], tops[t])) if num_top else None) for t, value in enumerate(values)]
        at, top_at = at + len(targets), top_at + num_top * len(targets)
    return out


def extend_prompt_logprobs(values: list, scored: list[tuple[float, list | None]], start: int) -> None:
    """Adds to `values` (a sequence's prompt log-probabilities so far, the first token's None
    included) those that positions `start, start + 1, ...` scored and it lacks (a replay scores
    them again)."""
    if not values:
        values.append((None, None))  # the first token has no context
    values += scored[max(len(values) - start - 1, 0):]


def sampling_spec(seq: Sequence, start: int, num_new: int, route: tuple[str, ...]) -> SamplingSpec:
    """How the last stage samples the step's row of `seq` (`num_new` tokens from `start`), with the
    tokens its penalties need: the row's own, and the ones before where the last stage may not
    have them (`seq.sampler_has` says what it was given last)."""
    params = seq.params
    spec = SamplingSpec(key=seq.key, seed=seq.seed, prompt_len=len(seq.prompt_ids), temperature=params.temperature,
                        top_p=params.top_p, top_k=params.top_k or 0, min_tokens=params.min_tokens,
                        stop_token_ids=params.stop_token_ids, presence_penalty=params.presence_penalty,
                        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
                        logit_bias=tuple(params.logit_bias.items()),
                        logprobs=-1 if not params.needs_logprob else params.num_top)
    if not spec.penalized:
        return spec
    tokens = seq.tokens
    history = tuple(tokens[:start]) if start and seq.sampler_has != (route, start) else None
    return replace(spec, ids=tuple(tokens[start:start + num_new]), history=history)


def choices(sampled: Sampled, specs: list[SamplingSpec | None], rows: list[tuple[int, SamplingParams]]
            ) -> list[Choice | Exception]:
    """The `Choice` of each of `rows` ((index into the step, its params)) from what the last stage
    sampled for a step whose rows sample as `specs` say; one row's failure is its own."""
    offsets = list(accumulate((max(spec.logprobs, 0) if spec else 0 for spec in specs), initial=0))
    out: list[Choice | Exception] = []
    for i, params in rows:
        token, num_top = int(sampled.tokens[i]), specs[i].logprobs if specs[i] else -1
        if token < 0:
            out.append(SamplingError(NOT_SAMPLED if token == FAILED else NOT_FINITE))
        elif num_top < 0:
            out.append(Choice(token))
        else:
            at = offsets[i]
            top = list(zip(sampled.top_ids[at:at + num_top].tolist(), sampled.top_logprobs[at:at + num_top].tolist()))
            out.append(Choice(token, float(sampled.logprobs[i]), None if params.logprobs is None and not
                              params.beam_width else top))
    return out
