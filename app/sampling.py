"""Choosing the next token of each row from the last stage's logits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

# Below this temperature sampling is greedy, as in vLLM: dividing logits by 1e-40 overflows to
# inf, and softmax of that is NaN.
GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """A sequence cannot be sampled (its logits are not finite): that sequence fails, no other."""


NOT_FINITE = "the model's logits for this sequence are not finite (NaN or infinity)"


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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def needs_logprob(self) -> bool:
        """The sampled token's log-probability is wanted (reported, or for ranking)."""
        return self.logprobs is not None or self.rank_by_logprob

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
    """Picks a token from processed logits: argmax when greedy, else top-k/top-p sampling."""
    if params.greedy:
        return int(logits.argmax())
    # Extreme but valid settings (repetition_penalty 1e-300) can push a logit to +inf, and
    # softmax of that is NaN: the largest float keeps its meaning (this token, surely).
    logits = torch.nan_to_num(logits / params.temperature, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
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


def logprob_choice(logits: torch.Tensor, token: int, num_top: int | None, needed: bool = True) -> Choice:
    """The token's log-probability under the model's raw logits, with the `num_top` best (no
    alternatives when `num_top` is None; no log-probability either unless `needed`)."""
    if num_top is None and not needed:
        return Choice(token)
    logprobs = torch.log_softmax(logits, dim=-1)
    top = None if num_top is None else []
    if num_top:
        values, ids = torch.topk(logprobs, num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return Choice(token, float(logprobs[token]), top)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], start: int, num_top: int
                    ) -> list[tuple[float, list[tuple[int, float]] | None]]:
    """(log-probability, the `num_top` best alternatives or None) of each prompt token that the
    logits of positions `start, start + 1, ...` predict (those past the prompt's end are left out).

    Args:
        logits: (T, V) logits of T consecutive positions from `start`.
        prompt_ids: the prompt.
        start: the position of the first row of `logits`.
        num_top: alternatives to report (0: none).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for offset in range(min(len(logits), len(prompt_ids) - start - 1)):
        row, token = logprobs[offset], prompt_ids[start + offset + 1]
        top = None
        if num_top:
            values, ids = torch.topk(row, num_top)
            top = list(zip(ids.tolist(), values.tolist()))
        out.append((float(row[token]), top))
    return out


def extend_prompt_logprobs(values: list, logits: torch.Tensor, prompt_ids: list[int], start: int,
                           num_top: int) -> None:
    """Adds to `values` (a sequence's prompt log-probabilities so far, the first token's None
    included) those that `logits` of positions `start, start + 1, ...` give and it lacks (a
    replay computes them again)."""
    if not values:
        values.append((None, None))  # the first token has no context
    values += prompt_logprobs(logits, prompt_ids, start, num_top)[max(len(values) - start - 1, 0):]


def sample_one(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
               generator: torch.Generator | None) -> Choice:
    """Samples the next token of one row.

    Raises:
        SamplingError: the row's logits are not finite (a float16 overflow, a broken stage).
    """
    if not bool(torch.isfinite(logits).all()):
        raise SamplingError(NOT_FINITE)
    processed = logits if params.is_plain_greedy else process_logits(logits, params, prompt_ids, output_ids)
    token = sample_row(processed, params, generator)
    return logprob_choice(logits, token, params.logprobs, params.needs_logprob)


def sample(logits: torch.Tensor, rows: list[tuple[SamplingParams, list[int], list[int], torch.Generator | None]]
           ) -> list[Choice | Exception]:
    """Samples one token per row; one row's failure is its own.

    Args:
        logits: (B, V) float32 logits of the rows' last tokens.
        rows: per row (params, prompt ids, output ids so far, generator or None).

    Returns:
        Per row, a `Choice`, or the exception that row's sampling raised.
    """
    if all(params.is_plain_greedy and not params.needs_logprob for params, *_ in rows):
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        if all(finite):
            return [Choice(int(t)) for t in logits.argmax(dim=-1).tolist()]
    choices: list[Choice | Exception] = []
    for row_logits, row in zip(logits, rows):
        try:
            choices.append(sample_one(row_logits, *row))
        except Exception as exc:  # noqa: BLE001 - a barrier: the row fails, the batch goes on
            choices.append(exc)
    return choices


def choose(rows: list[tuple[torch.Tensor | int, SamplingParams, list[int], list[int], torch.Generator | None]]
           ) -> list[Choice | Exception]:
    """Per row, its next token: the one the last stage chose (an int; -1 where its logits were not
    finite), or one sampled here from its logits; one row's failure is its own.

    Args:
        rows: per row (the token or its (V,) logits, params, prompt ids, output ids, generator).
    """
    here = [i for i, row in enumerate(rows) if not isinstance(row[0], int)]
    sampled = iter(sample(torch.stack([rows[i][0] for i in here]), [rows[i][1:] for i in here]) if here else [])
    return [next(sampled) if not isinstance(row[0], int) else Choice(row[0]) if row[0] >= 0
            else SamplingError(NOT_FINITE) for row in rows]
