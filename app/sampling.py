"""Choosing the next token of each row from the last stage's logits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens (OpenAI's and vLLM's request fields).

    Attributes:
        max_tokens: tokens to generate at most.
        temperature: 0 is greedy.
        top_p: nucleus mass kept (1 = all).
        top_k: tokens kept (None = all).
        min_tokens: EOS and stop token ids are masked until this many tokens exist.
        presence_penalty: subtracted once from every token already generated.
        frequency_penalty: subtracted per occurrence of a token already generated.
        repetition_penalty: vLLM's multiplicative penalty on prompt and output tokens (1 = off).
        logit_bias: token id -> value added to its logit.
        seed: makes sampling repeatable.
        logprobs: alternatives to report per token (None = no logprobs).
        ignore_eos: keep generating after EOS.
        stop: strings that end the generation (cut from the text).
        stop_token_ids: token ids that end it (EOS included unless ignore_eos).
        include_stop_str_in_output: keep the stop string in the text.
        skip_special_tokens: leave special tokens out of the text.
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
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: one argmax does it."""
        return (self.temperature == 0 and not self.logit_bias and self.presence_penalty == 0
                and self.frequency_penalty == 0 and self.repetition_penalty == 1 and self.min_tokens == 0)


@dataclass
class Choice:
    """One sampled token and, when asked, its log-probability and the top alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                   output_ids: list[int]) -> torch.Tensor:
    """Applies bias, penalties and min_tokens to one row of logits (returns a new tensor)."""
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias))
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = Counter(output_ids)
        ids = torch.tensor(list(counts))
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits[ids] -= params.frequency_penalty * freq + params.presence_penalty
    if len(output_ids) < params.min_tokens and params.stop_token_ids:
        logits[list(params.stop_token_ids)] = float("-inf")
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Picks a token from processed logits: argmax at temperature 0, else top-k/top-p sampling."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprob_choice(logits: torch.Tensor, token: int, num_top: int | None) -> Choice:
    """The token's log-probability under the model's raw logits, with the `num_top` best."""
    if num_top is None:
        return Choice(token)
    logprobs = torch.log_softmax(logits, dim=-1)
    top = []
    if num_top > 0:
        values, ids = torch.topk(logprobs, num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return Choice(token, float(logprobs[token]), top)


def sample(logits: torch.Tensor, rows: list[tuple[SamplingParams, list[int], list[int], torch.Generator | None]]
           ) -> list[Choice]:
    """Samples one token per row.

    Args:
        logits: (B, V) float32 logits of the rows' last tokens.
        rows: per row (params, prompt ids, output ids so far, generator or None).

    Returns:
        A `Choice` per row.
    """
    if all(params.is_plain_greedy and params.logprobs is None for params, *_ in rows):
        return [Choice(int(t)) for t in logits.argmax(dim=-1).tolist()]
    choices = []
    for row_logits, (params, prompt_ids, output_ids, generator) in zip(logits, rows):
        processed = row_logits if params.is_plain_greedy else process_logits(row_logits, params, prompt_ids,
                                                                              output_ids)
        token = sample_row(processed, params, generator)
        choices.append(logprob_choice(row_logits, token, params.logprobs))
    return choices
