"""Choosing each row's next token from the last stage's logits, where the logits are.

The last stage samples, so that a step's answer is a token per row (and, where a row asked, its
log-probability and the best alternatives) instead of a row of vocabulary-sized logits. Small
functions in the manner of gpt-fast's `sample`: penalties, then temperature, top-k and top-p,
then one draw.

Two things make a row's draws the same wherever they happen (a replica replaced in the middle of
a stream replays it on another): its randomness comes from its seed and the number of tokens it
has generated (`draw_seed`), not from a generator's state; and the token history that penalties
need (`Sampler`'s per-sequence state) is rebuilt from what a step carries: the row's new tokens,
and its whole history where this stage may not know it (the first sampled step after a prefix
came from the cache, a replay, a pre-emption).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

# Below this temperature sampling is greedy, as in vLLM: dividing logits by 1e-40 overflows to
# inf, and softmax of that is NaN.
GREEDY_BELOW = 1e-5
# A row's token when it has none: its logits were not finite; it could not be sampled here (its
# history was lost, a bias names a token beyond the logits).
NOT_FINITE, FAILED = -1, -2
# The most alternatives a row may ask for: 20 log-probabilities (the API's limit), or a beam
# search's continuations (`app.beam.num_alternatives`).
MAX_TOP = 64
MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingSpec:
    """How one row picks its token (OpenAI's and vLLM's fields), as a step carries it.

    Attributes:
        key: the sequence's id for the penalties' history on this stage.
        seed: the sequence's seed (every sampled sequence has one; the ingress draws it when the
            request gives none).
        prompt_len: the prompt's tokens; those after it were generated.
        temperature, top_p, top_k: top_k 0 keeps every token.
        min_tokens, stop_token_ids: stop tokens are masked until min_tokens were generated.
        presence_penalty, frequency_penalty, repetition_penalty: as OpenAI and vLLM define them.
        logit_bias: (token id, value) pairs added to the logits.
        logprobs: alternatives to return (-1: no log-probability at all, 0: only the token's).
        ids: the row's new tokens in this step, where penalties need the history.
        history: the sequence's tokens before this step, where this stage may not know them.
    """

    key: int = 0
    seed: int = 0
    prompt_len: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int = -1
    ids: tuple[int, ...] | None = None
    history: tuple[int, ...] | None = None

    @property
    def penalized(self) -> bool:
        """The row's draws depend on the tokens before it."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def to_wire(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != f.default or f.name == "key"}

    @classmethod
    def from_wire(cls, value: object, num_new: int, vocab: int = 1 << 24) -> SamplingSpec:
        """Checks a spec that came over the wire.

        Raises:
            ValueError: a field is unknown, of the wrong type or out of range.
        """
        if not isinstance(value, dict) or not set(value) <= {f.name for f in fields(cls)}:
            raise ValueError("sampling: an object of known fields expected")
        v = {**{f.name: f.default for f in fields(cls)}, **value}
        num = (int, float)
        ok = (all(type(v[k]) is int for k in ("key", "seed", "prompt_len", "top_k", "min_tokens", "logprobs"))
              and all(type(v[k]) in num for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                                   "repetition_penalty"))
              and v["temperature"] >= 0 and 0 < v["top_p"] <= 1 and v["repetition_penalty"] > 0
              and v["top_k"] >= 0 and v["min_tokens"] >= 0 and -1 <= v["logprobs"] <= MAX_TOP and v["prompt_len"] >= 0
              and _ids(v["stop_token_ids"], vocab) and _ids(v["ids"], vocab, num_new) and _ids(v["history"], vocab)
              and isinstance(v["logit_bias"], (list, tuple))
              and all(isinstance(p, (list, tuple)) and len(p) == 2 and type(p[0]) is int and 0 <= p[0] < vocab
                      and type(p[1]) in num for p in v["logit_bias"]))
        if not ok:
            raise ValueError("sampling: a field is missing, of the wrong type or out of range")
        v["stop_token_ids"] = tuple(v["stop_token_ids"])
        v["logit_bias"] = tuple((int(i), float(b)) for i, b in v["logit_bias"])
        for k in ("ids", "history"):
            v[k] = None if v[k] is None else tuple(v[k])
        spec = cls(**v)
        if (spec.ids is not None) != spec.penalized:
            raise ValueError("sampling: a row's tokens come with penalties, and only with them")
        return spec


def _ids(value: object, vocab: int, length: int | None = None) -> bool:
    if value is None:
        return True
    return (isinstance(value, (list, tuple)) and (length is None or len(value) == length)
            and all(type(i) is int and 0 <= i < vocab for i in value))


def answer_sizes(specs: tuple[SamplingSpec | None, ...], scoring: tuple = ()) -> tuple[int, int]:
    """How many log-probabilities and alternatives a step's answer (`Sampler.answer`) holds: one
    log-probability per row, then one per scored target; each sampled row's `logprobs`
    alternatives, then `num_top` per scored target.

    Args:
        specs: per row, its `SamplingSpec` or None.
        scoring: per row None or (num_top, targets).
    """
    scored = [entry for entry in scoring if entry is not None]
    return (len(specs) + sum(len(targets) for _, targets in scored),
            sum(max(spec.logprobs, 0) for spec in specs if spec is not None)
            + sum(num_top * len(targets) for num_top, targets in scored))


class Sampled(NamedTuple):
    """A step's sampled rows, as the last stage returns them.

    tokens: (B,) int64, each sampled row's token (`NOT_FINITE`, `FAILED`: none; -1 also for
        rows that wanted nothing); logprobs: (B,) float32, the token's log-probability where the
        row asked (else NaN); top_ids and top_logprobs: (S,) each row's `logprobs` best
        alternatives, one row after another.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def draw_seed(seed: int, num_generated: int) -> int:
    """The seed of a row's draw of its token number `num_generated` (splitmix64's finalizer)."""
    x = (seed + (num_generated + 1) * 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def apply_penalties(logits: torch.Tensor, spec: SamplingSpec, tokens: torch.Tensor | None, num_generated: int
                    ) -> torch.Tensor:
    """Bias, penalties and min_tokens applied to one row's logits (a new tensor).

    Args:
        tokens: the sequence's tokens so far (prompt, then generated), where penalties need them.
    """
    logits = logits.clone()
    if spec.logit_bias:
        ids, bias = zip(*spec.logit_bias)
        logits[list(ids)] += torch.tensor(bias, dtype=logits.dtype)
    if tokens is not None and spec.repetition_penalty != 1:
        seen = tokens.unique()
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / spec.repetition_penalty, values * spec.repetition_penalty)
    if tokens is not None and num_generated and (spec.presence_penalty or spec.frequency_penalty):
        ids, counts = tokens[spec.prompt_len:].unique(return_counts=True)
        logits[ids] -= spec.frequency_penalty * counts.to(logits.dtype) + spec.presence_penalty
    if num_generated < spec.min_tokens and spec.stop_token_ids:
        logits[list(spec.stop_token_ids)] = float("-inf")
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (the smallest set whose mass reaches it)."""
    # Extreme but valid settings (repetition_penalty 1e-300) can push a logit to +inf, and
    # softmax of that is NaN: the largest float keeps its meaning (this token, surely).
    logits = torch.nan_to_num(logits / temperature, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        sorted_probs[(sorted_probs.cumsum(0) - sorted_probs) >= top_p] = 0.0  # the first token stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample_token(logits: torch.Tensor, spec: SamplingSpec, tokens: torch.Tensor | None, num_generated: int) -> int:
    """One row's token from its raw logits."""
    if spec.logit_bias or spec.penalized or num_generated < spec.min_tokens:
        logits = apply_penalties(logits, spec, tokens, num_generated)
    if spec.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = logits_to_probs(logits, spec.temperature, spec.top_k, spec.top_p)
    generator = torch.Generator().manual_seed(draw_seed(spec.seed, num_generated))
    return int(torch.multinomial(probs, 1, generator=generator))


def score(logits: torch.Tensor, targets: tuple[int, ...], num_top: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """The log-probability of each of `targets` under the logits of the positions before it (a
    prompt's tokens, for echo), and the `num_top` best alternatives at each position.

    Args:
        logits: (T, V) logits of consecutive positions; position t predicts `targets[t]`.
        targets: at most T token ids.

    Returns:
        (len(targets),) float32 log-probabilities, and (len(targets) * num_top,) ids and
        float32 log-probabilities of the alternatives, position after position.
    """
    logprobs = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
    values, ids = torch.topk(logprobs, num_top, dim=-1)
    return logprobs.gather(1, torch.tensor(targets).view(-1, 1)).view(-1), ids.reshape(-1), values.reshape(-1)


class Sampler:
    """A last stage's sampling, with the token history of the sequences that penalties need.

    Args:
        max_histories: sequences whose history is kept (least recently sampled dropped first; a
            dropped one that samples again without its history gets `FAILED`). Only sequences
            with penalties have one, 8 bytes a token: 1,024 of 4,096 tokens are 32 MiB at most,
            and a replica holds `max_batch_size` sequences at once (16 by default).
    """

    def __init__(self, max_histories: int = 1024):
        self.max_histories = max_histories
        self._histories: OrderedDict[int, array] = OrderedDict()

    def sample(self, logits: torch.Tensor, want: tuple[int, ...], specs: tuple[SamplingSpec | None, ...],
               starts: tuple[int, ...], num_new: tuple[int, ...]) -> Sampled:
        """Each row's token: the argmax of a greedy row (want 1), a draw by its spec (want 2).

        Args:
            logits: (B, V) each row's last position's logits.
            want: per row, 0 (nothing), 1 (its greedy token) or 2 (sampled by its spec).
        """
        best, argmax = logits.max(dim=-1)  # NaN and infinities show in a row's max or min: one pass each
        finite = torch.isfinite(best) & torch.isfinite(logits.amin(dim=-1))
        tokens = torch.where(finite, argmax, NOT_FINITE)
        tokens = torch.where(torch.tensor(want, dtype=torch.long) == 1, tokens, NOT_FINITE)
        logprobs = torch.full((len(want),), float("nan"))
        top_ids, top_logprobs = [], []
        for i, spec in enumerate(specs):
            if want[i] != 2 or spec is None:
                continue
            top = max(spec.logprobs, 0)
            try:
                history = self._history(spec, starts[i], num_new[i])
                if finite[i] and history is not FAILED:
                    tokens[i] = sample_token(logits[i], spec, history, starts[i] + num_new[i] - spec.prompt_len)
                else:
                    tokens[i] = NOT_FINITE if not finite[i] else FAILED
            except (IndexError, RuntimeError):  # a bias beyond the logits: this row fails, not the step
                tokens[i] = FAILED
            if tokens[i] >= 0 and spec.logprobs >= 0:
                row = torch.log_softmax(logits[i].float(), dim=-1)
                logprobs[i] = row[tokens[i]]
                values, ids = torch.topk(row, top)
                top_ids.append(ids)
                top_logprobs.append(values)
            else:
                top_ids.append(torch.zeros(top, dtype=torch.long))
                top_logprobs.append(torch.zeros(top))
        cat = (lambda parts, dtype: torch.cat(parts) if parts else torch.zeros(0, dtype=dtype))
        return Sampled(tokens, logprobs, cat(top_ids, torch.long), cat(top_logprobs, torch.float32))

    def answer(self, out: torch.Tensor, want: tuple[int, ...], specs: tuple[SamplingSpec | None, ...],
               starts: tuple[int, ...], num_new: tuple[int, ...], scoring: tuple = ()) -> Sampled:
        """A step's answer: each row's token (`sample`) from its last position's logits, then, for
        each row that scores its prompt (`scoring`: per row None or (num_top, targets), with `out`
        the logits of every position), its targets' log-probabilities and alternatives, appended
        after the rows' (in `logprobs`, `top_ids` and `top_logprobs`).

        Args:
            out: (B, V), or (B, T, V) logits of every position.
        """
        last = out[torch.arange(out.shape[0]), torch.tensor(num_new) - 1] if out.dim() == 3 else out
        sampled = self.sample(last, want, specs, starts, num_new)
        scored = [score(out[i], targets, num_top) for i, entry in enumerate(scoring) if entry is not None
                  for num_top, targets in [entry]]
        if not scored:
            return sampled
        logprobs, ids, values = zip(*scored)
        return Sampled(sampled.tokens, torch.cat([sampled.logprobs, *logprobs]),
                       torch.cat([sampled.top_ids, *ids]), torch.cat([sampled.top_logprobs, *values]))

    def _history(self, spec: SamplingSpec, start: int, num_new: int) -> torch.Tensor | None | int:
        """The row's tokens so far with this step's (None when its draws need none; `FAILED`
        when this stage does not know the tokens before `start`)."""
        if spec.ids is None:
            return None
        tokens = self._histories.pop(spec.key, None)
        if spec.history is not None or start == 0:
            tokens = array("q", spec.history or ())
        if tokens is None or len(tokens) < start:
            return FAILED
        del tokens[start:]  # a step that failed after this stage saw it is sent again
        tokens.extend(spec.ids)
        self._histories[spec.key] = tokens
        while len(self._histories) > self.max_histories:
            self._histories.popitem(last=False)
        return torch.frombuffer(tokens, dtype=torch.int64).clone() if tokens else torch.zeros(0, dtype=torch.long)
