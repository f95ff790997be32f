"""Continuous batching: which sequences go through the pipeline at each step, and what comes out.

The engine keeps every open sequence's token ids. A sequence's *pending* tokens are those the
stages have not cached yet: the whole prompt at first, then the one token just sampled. Each
step takes the pending tokens of some sequences (prefill rows, chunked to a token budget, or
decode rows of one token), runs them through the stages as one batch and, for every row whose
tokens are now all cached, samples the next token. Because a sequence is just its token ids,
a stage that lost its cache is rebuilt by setting `num_cached = 0`: the same step logic replays
the prompt and the output so far, and greedy generation goes on exactly as before.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from dataclasses import dataclass, field

import torch

from app.metrics import IngressMetrics
from app.pipeline import StepFailed
from app.sampling import Choice, SamplingParams, sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the scheduler.

    Attributes:
        max_batch_size: sequences open at once (= KV cache slots per stage).
        max_model_len: longest sequence, prompt + output.
        max_prefill_tokens: prompt tokens per step; longer prompts are prefilled in chunks so
            that running decodes are not stalled for long.
        num_microbatches: steps in flight at once, each with its own share of the sequences.
        max_queued_requests: sequences waiting for a slot before new requests get a 503.
        step_timeout_s: a step that takes longer counts as failed (a hung stage).
        max_recoveries: consecutive failed recoveries before open sequences fail.
    """

    max_batch_size: int = 16
    max_model_len: int = 2048
    max_prefill_tokens: int = 512
    num_microbatches: int = 1
    max_queued_requests: int = 256
    step_timeout_s: float = 60.0
    max_recoveries: int = 5


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, its sampling parameters, and the tokens so far."""

    prompt_ids: list[int]
    params: SamplingParams
    events: asyncio.Queue
    index: int = 0
    prompt_logprobs: bool = False
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt_logprob_values: list[float | None] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    slot: int | None = None
    num_cached: int = 0
    in_flight: bool = False
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_all_logits(self) -> bool:
        return self.prompt_logprobs and self.num_cached < len(self.prompt_ids)


@dataclass
class Row:
    """One sequence's part of a step: `num_new` of its pending tokens from `start`."""

    seq: Sequence
    start: int
    num_new: int


class Overloaded(Exception):
    """The waiting queue is full."""


class Engine:
    """Schedules sequences over a pipeline of stages.

    Args:
        pipeline: has `async step(inputs, slots, starts, num_new, all_logits=, timeout=)`.
        config: the scheduler's limits.
        recover: awaited after a failed step, before replaying (e.g. to find a restarted stage);
            raises if the stages cannot be reached.
        metrics: told what the scheduler does (e.g. `app.metrics.IngressMetrics`; None: nothing
            kept): `set_sequences`, `prompt_tokens`, `generated_tokens`, `first_token`,
            `time_per_output_token`, `recovery`.
    """

    def __init__(self, pipeline, config: EngineConfig, recover=None, metrics=None):
        self.pipeline = pipeline
        self.config = config
        self.recover = recover
        self.metrics = metrics if metrics is not None else IngressMetrics(enabled=False)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._free_slots = list(range(config.max_batch_size))
        self._wake = asyncio.Event()
        self._epoch = 0  # bumped by each recovery: results of older steps are dropped
        self._last_kind = "decode"
        self._task: asyncio.Task | None = None
        self.stats = {"steps": 0, "recoveries": 0, "tokens": 0}

    # ---- requests ----

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; raises `Overloaded` when the waiting queue is full."""
        if len(self.waiting) >= self.config.max_queued_requests + len(self._free_slots):
            raise Overloaded(f"{len(self.waiting)} sequences are waiting for a slot")
        self.waiting.append(seq)
        self.metrics.prompt_tokens(len(seq.prompt_ids))
        self._ensure_running()
        self._wake.set()

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Ends a sequence now (client gone, stop string found); frees its slot."""
        if seq.finished:
            return
        seq.finish_reason = reason
        self._observe_finished(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        self._wake.set()

    def _release(self, seq: Sequence) -> None:
        # A slot in use by a step in flight is freed when that step returns.
        if seq.slot is not None and not seq.in_flight:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = None
        if seq in self.running and not seq.in_flight:
            self.running.remove(seq)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    # ---- the loop ----

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        in_flight: set[asyncio.Task] = set()
        while True:
            self._admit()
            self.metrics.set_sequences(len(self.running), len(self.waiting))
            while len(in_flight) < self.config.num_microbatches:
                rows = self._next_batch()
                if not rows:
                    break
                for row in rows:  # claimed now: an abort before the task starts must keep the slot
                    row.seq.in_flight = True
                in_flight.add(asyncio.create_task(self._step(rows, self._epoch)))
            if not in_flight and not self.waiting and not self.running:
                return
            self._wake.clear()
            waiter = asyncio.create_task(self._wake.wait())
            done, _ = await asyncio.wait(in_flight | {waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for task in done & in_flight:
                in_flight.discard(task)
                failure = task.result()
                if failure is not None:
                    await asyncio.gather(*in_flight, return_exceptions=True)
                    in_flight.clear()
                    await self._recover(failure)

    def _admit(self) -> None:
        while self.waiting and self._free_slots:
            seq = self.waiting.pop(0)
            seq.slot = heapq.heappop(self._free_slots)
            self.running.append(seq)

    def _next_batch(self) -> list[Row]:
        ready = [s for s in self.running if not s.in_flight and not s.finished and s.num_pending > 0]
        prefill = [s for s in ready if s.num_pending > 1 or s.needs_all_logits]
        decode = [s for s in ready if s not in prefill]
        if prefill and (not decode or self._last_kind == "decode"):
            self._last_kind = "prefill"
            rows, budget = [], self.config.max_prefill_tokens
            for seq in prefill:
                if budget <= 0:
                    break
                num_new = min(seq.num_pending, budget)
                rows.append(Row(seq, seq.num_cached, num_new))
                budget -= num_new
            return rows
        if not decode:
            return []
        self._last_kind = "decode"
        # Split the running sequences evenly between the micro-batches.
        share = -(-len([s for s in self.running if not s.finished]) // self.config.num_microbatches)
        return [Row(seq, seq.num_cached, 1) for seq in decode[:max(share, 1)]]

    async def _step(self, rows: list[Row], epoch: int) -> Exception | None:
        width = max(row.num_new for row in rows)
        inputs = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            inputs[i, : row.num_new] = torch.tensor(row.seq.tokens[row.start:row.start + row.num_new])
        all_logits = any(row.seq.needs_all_logits for row in rows)
        try:
            logits = await self.pipeline.step(inputs, [r.seq.slot for r in rows], [r.start for r in rows],
                                              [r.num_new for r in rows], all_logits=all_logits,
                                              timeout=self.config.step_timeout_s)
        except StepFailed as exc:
            for row in rows:
                row.seq.in_flight = False
            return exc
        finally:
            self.stats["steps"] += 1
        if epoch == self._epoch:
            self._finish_step(rows, logits, all_logits)
        else:
            for row in rows:
                row.seq.in_flight = False
        return None

    def _finish_step(self, rows: list[Row], logits: torch.Tensor, all_logits: bool) -> None:
        sampling_rows, sampled = [], []
        for i, row in enumerate(rows):
            seq = row.seq
            seq.in_flight = False
            if seq.finished:
                self._release(seq)
                continue
            if all_logits and seq.needs_all_logits:
                self._record_prompt_logprobs(seq, row, logits[i])
            seq.num_cached = row.start + row.num_new
            if seq.num_pending == 0 and seq.params.max_tokens == 0:  # echo: the prompt scored, nothing more
                self._finish(seq, "length")
            elif seq.num_pending == 0:
                last = logits[i, row.num_new - 1] if all_logits else logits[i]
                sampling_rows.append(last)
                sampled.append(seq)
        if not sampled:
            return
        choices = sample(torch.stack(sampling_rows),
                         [(s.params, s.prompt_ids, s.output_ids, s.generator) for s in sampled])
        now = time.monotonic()
        for seq, choice in zip(sampled, choices):
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.metrics.first_token(now - seq.arrival)
            self._append(seq, choice)
        self.metrics.generated_tokens(len(sampled))

    def _record_prompt_logprobs(self, seq: Sequence, row: Row, logits: torch.Tensor) -> None:
        if not seq.prompt_logprob_values:
            seq.prompt_logprob_values.append(None)  # the first token has no context
        logprobs = torch.log_softmax(logits[: row.num_new], dim=-1)
        for offset in range(row.num_new):
            position = row.start + offset + 1
            if position < len(seq.prompt_ids) and len(seq.prompt_logprob_values) <= position:
                seq.prompt_logprob_values.append(float(logprobs[offset, seq.prompt_ids[position]]))

    def _append(self, seq: Sequence, choice: Choice) -> None:
        params = seq.params
        seq.output_ids.append(choice.token)
        if choice.logprob is not None:
            seq.cumulative_logprob += choice.logprob
        self.stats["tokens"] += 1
        reason = None
        if choice.token in params.stop_token_ids and len(seq.output_ids) >= params.min_tokens:
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_cached + 1 >= self.config.max_model_len:
            reason = "length"
        seq.events.put_nowait(("token", seq, choice))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._observe_finished(seq)
        self._release(seq)
        seq.events.put_nowait(("finished", seq, reason))

    def _observe_finished(self, seq: Sequence) -> None:
        if seq.first_token_at is not None and len(seq.output_ids) > 1:
            seconds = time.monotonic() - seq.first_token_at
            self.metrics.time_per_output_token(seconds / (len(seq.output_ids) - 1))

    async def _recover(self, failure: Exception) -> None:
        """Waits for the stages to be back, then replays every open sequence from its tokens."""
        self._epoch += 1
        self.metrics.recovery()
        for attempt in range(1, self.config.max_recoveries + 1):
            logger.warning("step failed (%s); recovering, attempt %d", failure, attempt)
            self.stats["recoveries"] += 1
            try:
                if self.recover is not None:
                    await self.recover()
                break
            except Exception as exc:  # noqa: BLE001 - any failure to reach the stages is retried
                failure = exc
                await asyncio.sleep(min(2 ** attempt, 10))
        else:
            self._fail_all(f"the pipeline is unavailable: {failure}")
            return
        for seq in self.running:
            seq.num_cached = 0  # the lost caches are rebuilt by prefilling prompt + output

    def _fail_all(self, message: str) -> None:
        for seq in list(self.running) + list(self.waiting):
            if not seq.finished:
                seq.finish_reason = "error"
                seq.events.put_nowait(("error", seq, message))
            seq.in_flight = False
            self._release(seq)
        self.waiting.clear()
