"""Continuous batching: which sequences go through the pipeline at each step, and what comes out.

The engine keeps every open sequence's token ids. A sequence's *pending* tokens are those the
stages have not cached yet: the whole prompt at first, then the one token just sampled. Each
step takes the pending tokens of some sequences (prefill rows, chunked to a token budget, or
decode rows of one token), runs them through the stages as one batch and, for every row whose
tokens are now all cached, samples the next token. Because a sequence is just its token ids,
a stage that lost its cache is rebuilt by setting `num_cached = 0`: the same step logic replays
the prompt and the output so far, and greedy generation goes on exactly as before.

A stage may have several replicas, each with its own KV cache slots. A sequence is routed
through one replica of every stage (its *route*) and keeps it (session affinity); new
sequences go to the replicas with the most free slots; sequences of one route are batched
together. When a replica drains (scale-down) or disappears, its sequences move to another
replica of that stage by the same replay, and a drained replica is told when it holds none.
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

# The loop is restarted after an unexpected exception (its open sequences fail); more restarts
# than this within a minute and the engine reports itself dead (the ingress's health check fails).
MAX_RESTARTS_PER_MINUTE = 5


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
        max_recoveries: consecutive failed attempts to reach the stages again (the `recover`
            callback raising) before every open sequence fails.
        max_step_failures: steps in a row that may fail for one sequence, each followed by a
            successful recovery and a replay, before that sequence fails (a step that fails every
            time: an out-of-memory on one stage, a bad tensor).
    """

    max_batch_size: int = 16
    max_model_len: int = 2048
    max_prefill_tokens: int = 512
    num_microbatches: int = 1
    max_queued_requests: int = 256
    step_timeout_s: float = 60.0
    max_recoveries: int = 5
    max_step_failures: int = 3


@dataclass(frozen=True)
class Replica:
    """One replica of a stage on the data plane.

    Attributes:
        id: unique among all replicas.
        stage: the stage's index in the pipeline.
        address: its data-plane address.
        num_slots: its KV cache slots (sequences it can hold).
        draining: going away: no new sequences, running ones move elsewhere.
    """

    id: str
    stage: int
    address: str
    num_slots: int
    draining: bool = False


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, its sampling parameters, and the tokens so far."""

    prompt_ids: list[int]
    params: SamplingParams
    events: asyncio.Queue
    index: int = 0
    request_id: str = ""
    prompt_logprobs: bool = False
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt_logprob_values: list[tuple] = field(default_factory=list)  # (logprob, alternatives) per token
    cumulative_logprob: float = 0.0
    route: tuple[str, ...] | None = None  # replica ids, one per stage
    slots: list[int] | None = None  # the sequence's KV cache slot on each replica of its route
    num_cached: int = 0
    in_flight: bool = False
    step_failures: int = 0  # steps in a row that failed with this sequence on them
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
    """Schedules sequences over a pipeline of stages, each with one or more replicas.

    Args:
        pipeline: has `async step(route, inputs, slots, starts, num_new, all_logits=, timeout=)`
            and `watch(address, on_gone)` (e.g. `app.pipeline.PipelineClient`).
        config: the scheduler's limits.
        num_stages: stages in the pipeline.
        recover: awaited after a failed step, before replaying (e.g. to find a restarted stage
            and call `set_replicas`); raises if the stages cannot be reached.
        on_drained: called with a draining `Replica` once it holds no sequence.
        metrics: told what the scheduler does (e.g. `app.metrics.IngressMetrics`; None: nothing
            kept): `set_sequences`, `prompt_tokens`, `generated_tokens`, `first_token`,
            `time_per_output_token`, `recovery`.
    """

    def __init__(self, pipeline, config: EngineConfig, num_stages: int, recover=None, on_drained=None,
                 metrics=None):
        self.pipeline = pipeline
        self.config = config
        self.num_stages = num_stages
        self.recover = recover
        self.on_drained = on_drained
        self.metrics = metrics if metrics is not None else IngressMetrics(enabled=False)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.replicas: dict[str, Replica] = {}
        self._free: dict[str, list[int]] = {}  # free slots of every replica a sequence may still hold
        self._num_slots: dict[str, int] = {}
        self._gone: set[str] = set()  # replicas whose process went away
        self._released: set[str] = set()  # draining replicas told they hold nothing
        self._wake = asyncio.Event()
        self._epoch = 0  # bumped by each recovery: results of older steps are dropped
        self._last_kind: dict[tuple[str, ...], str] = {}
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = {"steps": 0, "recoveries": 0, "tokens": 0, "moved": 0}
        self.restarts = 0  # times the loop failed (an unexpected exception) and was started again
        self._restart_times: list[float] = []
        self._in_flight: dict[asyncio.Task, tuple[str, ...]] = {}
        self._failures = 0  # steps in a row that failed, whatever their sequences: the backoff

    # ---- replicas ----

    def set_replicas(self, replicas: list[Replica]) -> None:
        """The replicas there are now (all stages). Sequences on one that is missing or draining
        move to another replica of its stage; a new one gets new sequences."""
        self.replicas = {r.id: r for r in replicas if r.id not in self._gone}
        for replica in self.replicas.values():
            if replica.id not in self._free:
                self._free[replica.id] = list(range(replica.num_slots))
                self._num_slots[replica.id] = replica.num_slots
                self.pipeline.watch(replica.address, lambda rid=replica.id: self._on_gone(rid))
        self._forget_unused()
        self._release_drained()
        self._wake.set()
        if self.waiting or self.running:
            self._ensure_running()

    def _on_gone(self, replica_id: str) -> None:
        """From the pipeline's watch thread: a replica's process has gone away."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._drop_replica, replica_id)
        else:
            self._drop_replica(replica_id)

    def _drop_replica(self, replica_id: str) -> None:
        self._gone.add(replica_id)
        self.replicas.pop(replica_id, None)
        self._wake.set()

    def _forget_unused(self) -> None:
        for replica_id in list(self._free):
            if replica_id not in self.replicas and len(self._free[replica_id]) == self._num_slots[replica_id]:
                del self._free[replica_id], self._num_slots[replica_id]

    def _release_drained(self) -> None:
        for replica in self.replicas.values():
            if (replica.draining and replica.id not in self._released
                    and len(self._free[replica.id]) == replica.num_slots):
                self._released.add(replica.id)
                if self.on_drained is not None:
                    self.on_drained(replica)

    def _usable(self, replica_id: str) -> bool:
        replica = self.replicas.get(replica_id)
        return replica is not None and not replica.draining

    def _best_replica(self, stage: int) -> str | None:
        """The usable replica of `stage` with the most free slots."""
        best = None
        for replica in self.replicas.values():
            if replica.stage == stage and not replica.draining and self._free[replica.id]:
                if best is None or len(self._free[replica.id]) > len(self._free[best]):
                    best = replica.id
        return best

    def replica_load(self) -> list[dict]:
        """Each known replica, the sequences it holds, and its share of those waiting for a slot."""
        usable = [0] * self.num_stages
        for replica in self.replicas.values():
            usable[replica.stage] += not replica.draining
        return [{"id": r.id, "stage": r.stage, "address": r.address, "draining": r.draining,
                 "sequences": r.num_slots - len(self._free[r.id]),
                 "waiting": 0.0 if r.draining else len(self.waiting) / usable[r.stage]}
                for r in sorted(self.replicas.values(), key=lambda r: (r.stage, r.id))]

    def available(self) -> bool:
        """Every stage has a replica that takes sequences."""
        stages = {r.stage for r in self.replicas.values() if not r.draining}
        return len(stages) == self.num_stages

    # ---- requests ----

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; raises `Overloaded` when the waiting queue is full."""
        if len(self.waiting) >= self.config.max_queued_requests + self.num_free_slots:
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
        # Slots in use by a step in flight are freed when that step returns.
        if seq.in_flight:
            return
        if seq.route is not None:
            for replica_id, slot in zip(seq.route, seq.slots):
                self._free_slot(replica_id, slot)
            seq.route = seq.slots = None
        if seq in self.running:
            self.running.remove(seq)
        self._forget_unused()
        self._release_drained()

    def _free_slot(self, replica_id: str, slot: int) -> None:
        if replica_id in self._free:
            heapq.heappush(self._free[replica_id], slot)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_free_slots(self) -> int:
        """Sequences that could start now: the free slots of the tightest stage."""
        free = [0] * self.num_stages
        for replica in self.replicas.values():
            if not replica.draining:
                free[replica.stage] += len(self._free[replica.id])
        return min(free)

    # ---- the loop ----

    @property
    def alive(self) -> bool:
        """The scheduling loop can run: it has not failed more than `MAX_RESTARTS_PER_MINUTE`
        times in the last minute."""
        now = time.monotonic()
        return sum(now - at < 60 for at in self._restart_times) <= MAX_RESTARTS_PER_MINUTE

    def gone(self, replica_id: str) -> bool:
        """Whether a replica's process was seen to go away."""
        return replica_id in self._gone

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        """The loop, behind a barrier: an unexpected exception fails the open sequences (they
        get errors, not silence), is logged and counted, and the loop starts again."""
        try:
            await self._loop_steps()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the barrier
            logger.exception("the engine loop failed; its open sequences fail, and it starts again")
            self.restarts += 1
            self._restart_times = [at for at in self._restart_times if time.monotonic() - at < 60]
            self._restart_times.append(time.monotonic())
            for task in self._in_flight:
                task.cancel()
            self._in_flight.clear()
            for seq in list(self.running) + list(self.waiting):
                seq.in_flight = False
                self._fail(seq, f"the engine failed: {exc!r}", "engine")
            self._task = None
            if self.waiting or self.running:
                self._ensure_running()

    async def _loop_steps(self) -> None:
        in_flight = self._in_flight
        while True:
            self._admit()
            self._move_off_unusable()
            self.metrics.set_sequences(len(self.running), len(self.waiting))
            busy: dict[tuple[str, ...], int] = {}
            for route in in_flight.values():
                busy[route] = busy.get(route, 0) + 1
            for route, rows in self._next_batches(busy):
                in_flight[asyncio.create_task(self._step(route, rows, self._epoch))] = route
            if not in_flight and not self.waiting and not self.running:
                return
            self._wake.clear()
            waiter = asyncio.create_task(self._wake.wait())
            done, _ = await asyncio.wait(set(in_flight) | {waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for task in done & set(in_flight):
                del in_flight[task]
                failure, rows = task.result()
                if failure is not None:
                    await asyncio.gather(*in_flight, return_exceptions=True)
                    in_flight.clear()
                    await self._recover(failure, rows)

    def _admit(self) -> None:
        while self.waiting:
            route = [self._best_replica(stage) for stage in range(self.num_stages)]
            if None in route:
                return
            seq = self.waiting.pop(0)
            seq.route = tuple(route)
            seq.slots = [heapq.heappop(self._free[replica_id]) for replica_id in route]
            self.running.append(seq)

    def _move_off_unusable(self) -> None:
        """Moves sequences off replicas that are gone or draining, where another replica of the
        stage has room; the new route's caches are rebuilt by replay."""
        for seq in self.running:
            if seq.in_flight or seq.finished or seq.route is None:
                continue
            route, slots = list(seq.route), list(seq.slots)
            for stage, replica_id in enumerate(route):
                if self._usable(replica_id):
                    continue
                other = self._best_replica(stage)
                if other is None:
                    continue  # a draining replica goes on serving it; a gone one is waited for
                self._free_slot(replica_id, slots[stage])
                route[stage], slots[stage] = other, heapq.heappop(self._free[other])
            if tuple(route) != seq.route:
                seq.route, seq.slots, seq.num_cached = tuple(route), slots, 0
                self.stats["moved"] += 1
        self._forget_unused()
        self._release_drained()

    def _next_batches(self, busy: dict[tuple[str, ...], int]):
        """Yields (route, rows) for every route with room for another step in flight."""
        by_route: dict[tuple[str, ...], list[Sequence]] = {}
        routes = {seq.route for seq in self.running}
        self._last_kind = {route: kind for route, kind in self._last_kind.items() if route in routes}
        for seq in self.running:
            if (not seq.in_flight and not seq.finished and seq.num_pending > 0
                    and all(replica_id in self.replicas for replica_id in seq.route)):
                by_route.setdefault(seq.route, []).append(seq)
        for route, ready in by_route.items():
            for _ in range(busy.get(route, 0), self.config.num_microbatches):
                rows = self._next_batch(route, [s for s in ready if not s.in_flight])
                if not rows:
                    break
                for row in rows:  # claimed now: an abort before the task starts must keep the slot
                    row.seq.in_flight = True
                yield route, rows

    def _next_batch(self, route: tuple[str, ...], ready: list[Sequence]) -> list[Row]:
        prefill = [s for s in ready if s.num_pending > 1 or s.needs_all_logits]
        decode = [s for s in ready if s not in prefill]
        if prefill and (not decode or self._last_kind.get(route, "decode") == "decode"):
            self._last_kind[route] = "prefill"
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
        self._last_kind[route] = "decode"
        # Split the route's running sequences evenly between the micro-batches.
        on_route = sum(1 for s in self.running if s.route == route and not s.finished)
        share = -(-on_route // self.config.num_microbatches)
        return [Row(seq, seq.num_cached, 1) for seq in decode[:max(share, 1)]]

    async def _step(self, route: tuple[str, ...], rows: list[Row], epoch: int
                    ) -> tuple[Exception | None, list[Row]]:
        width = max(row.num_new for row in rows)
        inputs = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            inputs[i, : row.num_new] = torch.tensor(row.seq.tokens[row.start:row.start + row.num_new])
        all_logits = any(row.seq.needs_all_logits for row in rows)
        slots = [[row.seq.slots[stage] for row in rows] for stage in range(len(route))]
        try:
            addresses = [self.replicas[replica_id].address for replica_id in route]
            logits = await self.pipeline.step(addresses, inputs, slots, [r.start for r in rows],
                                              [r.num_new for r in rows], all_logits=all_logits,
                                              timeout=self.config.step_timeout_s)
        except (StepFailed, KeyError) as exc:
            for row in rows:
                row.seq.in_flight = False
                if row.seq.finished:
                    self._release(row.seq)
            return (exc if isinstance(exc, StepFailed) else StepFailed(f"replica {exc} went away")), rows
        finally:
            self.stats["steps"] += 1
        self._failures = 0
        for row in rows:
            row.seq.step_failures = 0
        if epoch == self._epoch:
            self._finish_step(rows, logits, all_logits)
        else:
            for row in rows:
                row.seq.in_flight = False
                if row.seq.finished:
                    self._release(row.seq)
        return None, rows

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
            if isinstance(choice, Exception):
                self._fail(seq, f"sampling failed: {choice}", "sampling")
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.metrics.first_token(now - seq.arrival)
            self._append(seq, choice)
        self.metrics.generated_tokens(sum(not isinstance(c, Exception) for c in choices))

    def _record_prompt_logprobs(self, seq: Sequence, row: Row, logits: torch.Tensor) -> None:
        """(log-probability, alternatives) of each prompt token after the first, as the request's
        `logprobs` asks (the first token has no context: (None, None))."""
        if not seq.prompt_logprob_values:
            seq.prompt_logprob_values.append((None, None))
        num_top = seq.params.logprobs or 0
        logprobs = torch.log_softmax(logits[: row.num_new], dim=-1)
        for offset in range(row.num_new):
            position = row.start + offset + 1
            if position < len(seq.prompt_ids) and len(seq.prompt_logprob_values) <= position:
                top = None
                if num_top:
                    values, ids = torch.topk(logprobs[offset], num_top)
                    top = list(zip(ids.tolist(), values.tolist()))
                seq.prompt_logprob_values.append((float(logprobs[offset, seq.prompt_ids[position]]), top))

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

    def _fail(self, seq: Sequence, message: str, reason: str) -> None:
        """Ends one sequence with an error of its own (its client gets a 500 naming the cause)."""
        if seq.finished:
            return
        logger.warning("request %s: sequence %d failed (%s): %s", seq.request_id or "-", seq.index, reason, message)
        self.metrics.sequence_failed(reason)
        seq.finish_reason = "error"
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.events.put_nowait(("failed", seq, message))
        self._wake.set()

    async def _recover(self, failure: Exception, rows: list[Row]) -> None:
        """Fails the sequences whose steps keep failing, backs off, waits for the stages to be
        back, then replays every open sequence from its tokens."""
        self._epoch += 1
        self._failures += 1
        self.metrics.recovery()
        limit = self.config.max_step_failures
        for seq in {id(row.seq): row.seq for row in rows}.values():
            seq.step_failures += 1
            if seq.step_failures >= limit:
                self._fail(seq, f"its step failed {limit} times in a row: {failure}", "step")
        # Doubling from 0.1 s to 5 s: a step that fails at once is not replayed thousands of times.
        await asyncio.sleep(min(0.1 * 2 ** (self._failures - 1), 5.0))
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
        self._move_off_unusable()

    def _fail_all(self, message: str) -> None:
        for seq in list(self.running) + list(self.waiting):
            if not seq.finished:
                seq.finish_reason = "error"
                seq.events.put_nowait(("error", seq, message))
            seq.in_flight = False
            self._release(seq)
        self.waiting.clear()
