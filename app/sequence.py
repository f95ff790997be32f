"""What the engine schedules: its limits, the stage replicas, the sequences and the rows of a step.

Plain data: neither torch nor asyncio is imported (a sequence holds its client's queue, but
nothing here uses it), so the scheduler is plain Python too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from app.beam import BeamGroup
    from app.blocks import BlockTable
    from app.sampling import SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the scheduler.

    Attributes:
        max_batch_size: sequences open at once on a replica (its batch slots).
        max_model_len: longest sequence, prompt + output.
        max_num_batched_tokens: tokens per step (vLLM's name): a route's decode rows, then
            chunks of its prompts in what is left, so that a long prompt does not stall the
            sequences decoding around it.
        long_prefill_token_threshold: the tokens of a prompt's last chunk in a step that also
            carries decoding sequences (0: the budget), so that they are not stalled for long;
            its earlier chunks take as many tokens as cost the same (`attention_cost_tokens`).
        attention_cost_tokens: tokens of context whose attention costs a new token what its
            blocks' matrices cost it (0: chunks of `long_prefill_token_threshold` tokens).
        num_microbatches: steps in flight at once, each with its own share of the decoding
            sequences. Beyond those, steps of prompt chunks alone may follow each other down the
            pipeline, up to one per stage in flight (see `app.scheduler`).
        max_queued_requests: sequences waiting for a slot before new requests get a 503.
        step_timeout_s: a step that takes longer counts as failed (a hung stage).
        max_recoveries: consecutive failed attempts to reach the stages again (the `recover`
            callback raising) before every open sequence fails.
        max_step_failures: steps in a row that may fail for one sequence, each followed by a
            successful recovery and a replay, before that sequence fails (a step that fails every
            time: an out-of-memory on one stage, a bad tensor).
        prefix_caching: sequences whose prompts start alike share the KV blocks of that prefix.
        max_beam_width: the widest beam search a request may ask for (its `n`).
        max_loras: LoRA adapters in one step at most (vLLM's name); the rows of others wait.
    """

    max_batch_size: int = 16
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512
    long_prefill_token_threshold: int = 0
    attention_cost_tokens: int = 0
    num_microbatches: int = 1
    max_queued_requests: int = 256
    step_timeout_s: float = 60.0
    max_recoveries: int = 5
    max_step_failures: int = 3
    prefix_caching: bool = True
    max_beam_width: int = 8
    max_loras: int = 4

    @property
    def beam_width_cap(self) -> int:
        """The widest beam search a request may ask for: each beam takes a batch slot."""
        return min(self.max_beam_width, self.max_batch_size)


@dataclass(frozen=True)
class Replica:
    """One replica of a stage on the data plane.

    Attributes:
        id: unique among all replicas.
        stage: the stage's index in the pipeline.
        address: its data-plane address.
        num_slots: sequences it holds at once (its batch slots).
        num_blocks: its KV cache blocks.
        block_size: tokens per block.
        draining: going away: no new sequences, running ones move elsewhere.
    """

    id: str
    stage: int
    address: str
    num_slots: int
    draining: bool = False
    num_blocks: int = 1024
    block_size: int = 16


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, its sampling parameters, and the tokens so far."""

    prompt_ids: list[int]
    params: SamplingParams
    events: asyncio.Queue
    index: int = 0
    request_id: str = ""
    prompt_logprobs: bool = False
    seed: int = 0  # of its draws (see `stages.sampler.draw_seed`)
    key: int = 0  # its id on the last stage, whose sampler may keep its tokens (penalties need them)
    adapter: int = 0  # the LoRA adapter it runs with (its index among the served ones; 0: none)
    output_ids: list[int] = field(default_factory=list)
    prompt_logprob_values: list[tuple] = field(default_factory=list)  # (logprob, alternatives) per token
    cumulative_logprob: float = 0.0
    route: tuple[str, ...] | None = None  # replica ids, one per stage
    slots: list[int] | None = None  # the sequence's batch slot on each replica of its route
    tables: list[BlockTable] | None = None  # its KV cache blocks on each replica of its route
    num_cached: int = 0
    # (route, tokens) the last stage's sampler was last given for this sequence: it needs the
    # whole history again when that is not where this step starts
    sampler_has: tuple[tuple[str, ...], int] | None = None
    in_flight: int = 0  # steps in flight that carry it (several: chunks of its prompt, in order)
    num_computing: int = 0  # its tokens in those steps
    step_failures: int = 0  # steps in a row that failed with this sequence on them
    finish_reason: str | None = None
    beam: BeamGroup | None = None  # the beam search it runs a beam of (`app.beam`)
    parked: bool = False  # a beam slot waiting for the search's first step to give it a beam
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def salt(self) -> int | None:
        """Where its blocks' chain hashes start: blocks computed with an adapter are that adapter's."""
        return self.adapter or None

    @property
    def num_pending(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) - self.num_cached

    @property
    def num_unscheduled(self) -> int:
        """Pending tokens that no step in flight carries."""
        return self.num_pending - self.num_computing

    def left_step(self, start: int, num_new: int) -> bool:
        """A step that carried its tokens `[start, start + num_new)` is back (or given up on).
        Returns whether those before `start` are cached: a chunk of a prompt that followed a chunk
        whose step failed was computed without that chunk's keys and values."""
        self.in_flight -= 1
        self.num_computing -= num_new
        return start == self.num_cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_all_logits(self) -> bool:
        return self.prompt_logprobs and self.num_cached < len(self.prompt_ids)

    def append(self, token: int, logprob: float | None, max_model_len: int) -> str | None:
        """Adds a sampled token; returns why the sequence ends with it ("stop", "length") or None."""
        self.output_ids.append(token)
        if logprob is not None:
            self.cumulative_logprob += logprob
        params = self.params
        if token in params.stop_token_ids and len(self.output_ids) >= params.min_tokens:
            return "stop"
        if len(self.output_ids) >= params.max_tokens or self.num_cached + 1 >= max_model_len:
            return "length"
        return None


# What a step's row wants back from the last stage (`app.wire` carries it): nothing (a prompt
# chunk before the prompt's end), its greedy token (its argmax: 8 bytes instead of a row of
# vocabulary-sized float32 logits), or a token sampled by the row's `stages.sampler.SamplingSpec`.
WANT_NOTHING, WANT_TOKEN, WANT_SAMPLE = 0, 1, 2


@dataclass
class Row:
    """One sequence's part of a step: `num_new` of its pending tokens from `start`."""

    seq: Sequence
    start: int
    num_new: int
    copies: list[list[tuple[int, int]]] | None = None  # per stage, blocks to copy first (`BlockPool.unshare`)
    decode: bool = False  # one token of a decoding sequence (not a chunk of a prompt or a replay)

    @property
    def want(self) -> int:
        """What the row wants back: nothing until its sequence's pending tokens are all in, else
        its greedy token when that is all its sampling needs, else a token sampled by its spec."""
        params = self.seq.params
        if self.start + self.num_new < len(self.seq.tokens) or params.max_tokens == 0:
            return WANT_NOTHING
        return WANT_TOKEN if params.is_plain_greedy and not params.needs_logprob else WANT_SAMPLE


class Outbox:
    """The events for the clients' streams (tokens, ends, failures), in order.

    While held (from a step's result until the next steps are sent), events wait here: the
    streams' work (detokenizing, sending chunks) then runs after the next steps are on their way,
    not before, so that it is not on every step's critical path. Not held: delivered at once.
    """

    def __init__(self):
        self._held: list[tuple[Sequence, tuple]] | None = None

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def put(self, seq: Sequence, event: tuple) -> None:
        if self._held is None:
            seq.events.put_nowait(event)
        else:
            self._held.append((seq, event))

    def deliver(self) -> None:
        """Delivers what is held, in order, and stops holding."""
        held, self._held = self._held or [], None
        for seq, event in held:
            seq.events.put_nowait(event)


class Overloaded(Exception):
    """The waiting queue is full."""


class TooLong(Exception):
    """A sequence could never fit in a stage's KV cache."""
