"""Continuous batching: which sequences go through the pipeline at each step, and what comes out.

The engine keeps every open sequence's token ids. A sequence's *pending* tokens are those the
stages have not cached yet: the whole prompt at first, then the one token just sampled. Each
step takes the pending tokens of some sequences (decode rows of one token, and chunks of
prompts within a token budget), runs them through the stages as one batch (packed into one row
when their lengths differ) and, for every row whose tokens are now all cached, samples the
next token. Because a sequence is just its token ids,
a stage that lost its cache is rebuilt by setting `num_cached = 0`: the same step logic replays
the prompt and the output so far, and greedy generation goes on exactly as before.

A stage may have several replicas, each with its own batch slots and KV cache blocks (see
`app.scheduler` for admission and pre-emption, `app.blocks` for the blocks and prefix caching).
A sequence is routed through one replica of every stage (its *route*) and keeps it (session
affinity); new sequences go to the replicas with the most free slots; sequences of one route are
batched together. When a replica drains (scale-down) or disappears, its sequences move to another
replica of that stage by the same replay, and a drained replica is told when it holds none.
"""

from __future__ import annotations

import asyncio
import logging
import time

from app import wire
from app.metrics import IngressMetrics
from app.step import build_step
from app.pipeline import StepFailed
from app.replicas import ReplicaPool
from app.sampling import Choice, choices, extend_prompt_logprobs, scored_prompts
from app.scheduler import Scheduler
from app.sequence import EngineConfig, Outbox, Overloaded, Replica, Row, Sequence, TooLong

__all__ = ["Engine", "EngineConfig", "Overloaded", "Replica", "Row", "Sequence", "TooLong"]

logger = logging.getLogger(__name__)

# The loop is restarted after an unexpected exception (its open sequences fail); more restarts
# than this within a minute and the engine reports itself dead (the ingress's health check fails).
MAX_RESTARTS_PER_MINUTE = 5


class Engine:
    """Schedules sequences over a pipeline of stages, each with one or more replicas.

    Args:
        pipeline: has `async step(route, inputs, tables, starts, num_new, all_logits=, timeout=)`
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
        self.metrics = metrics if metrics is not None else IngressMetrics(enabled=False)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.pool = ReplicaPool(num_stages, on_drained, config.prefix_caching)
        self.scheduler = Scheduler(config, num_stages)
        self._wake = asyncio.Event()
        self.outbox = Outbox()  # held from a step's result until the next steps are sent
        self._epoch = 0  # bumped by each recovery: results of older steps are dropped
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = {"steps": 0, "recoveries": 0, "tokens": 0, "moved": 0, "preempted": 0}
        self.restarts = 0  # times the loop failed (an unexpected exception) and was started again
        self._restart_times: list[float] = []
        self._in_flight: dict[asyncio.Task, tuple[tuple[str, ...], bool]] = {}  # (route, has decode rows)
        self._failures = 0  # steps in a row that failed, whatever their sequences: the backoff

    # ---- replicas ----

    @property
    def replicas(self) -> dict[str, Replica]:
        """The replicas that can be routed through now, by id."""
        return self.pool.replicas

    def set_replicas(self, replicas: list[Replica]) -> None:
        """The replicas there are now (all stages). Sequences on one that is missing or draining
        move to another replica of its stage; a new one gets new sequences."""
        for replica in self.pool.set(replicas):
            self.pipeline.watch(replica.address, lambda rid=replica.id: self._on_gone(rid))
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
        self.pool.drop(replica_id)
        self._wake.set()

    def replica_load(self) -> list[dict]:
        """Each known replica, the sequences it holds, and its share of those waiting for a slot."""
        return self.pool.load(len(self.waiting))

    def available(self) -> bool:
        """Every stage has a replica that takes sequences."""
        return self.pool.available()

    # ---- requests ----

    def add(self, seq: Sequence) -> None:
        """Queues a sequence.

        Raises:
            Overloaded: the waiting queue is full.
            TooLong: its prompt and `max_tokens` (a beam search: each beam's) need more KV cache
                than a stage holds.
        """
        need = len(seq.prompt_ids) + seq.params.max_tokens if seq.beam is None else \
            seq.beam.kv_tokens(max((r.block_size for r in self.replicas.values()), default=16))
        if self.pool.available() and need > self.pool.max_sequence_tokens():
            what = "the prompt and max_tokens" if seq.beam is None else \
                f"the prompt and {seq.beam.width} beams of max_tokens ({seq.params.max_tokens}) each"
            raise TooLong(f"{what} need {need} tokens of KV cache; a stage of this deployment holds "
                          f"{self.pool.max_sequence_tokens()}")
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
            self.pool.release(seq)
            seq.route = seq.slots = seq.tables = None
        if seq in self.running:
            self.running.remove(seq)
        self.pool.tidy()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_free_slots(self) -> int:
        """Sequences that could start now: the free slots of the tightest stage."""
        return self.pool.num_free_slots

    # ---- the loop ----

    @property
    def alive(self) -> bool:
        """The scheduling loop can run: it has not failed more than `MAX_RESTARTS_PER_MINUTE`
        times in the last minute."""
        now = time.monotonic()
        return sum(now - at < 60 for at in self._restart_times) <= MAX_RESTARTS_PER_MINUTE

    def gone(self, replica_id: str) -> bool:
        """Whether a replica's process was seen to go away."""
        return replica_id in self.pool.gone

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
            self.outbox.deliver()
            self.restarts += 1
            self._restart_times = [at for at in self._restart_times if time.monotonic() - at < 60]
            self._restart_times.append(time.monotonic())
            for task in self._in_flight:
                task.cancel()
            self._in_flight.clear()
            for seq in list(self.running) + list(self.waiting):
                seq.in_flight = seq.num_computing = 0
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
            for route, rows in self.scheduler.next_batches(self.running, set(self.replicas), list(in_flight.values()),
                                                           self.waiting, self.pool):
                in_flight[asyncio.create_task(self._step(route, rows, self._epoch))] = \
                    (route, any(row.decode for row in rows))
            self.outbox.deliver()  # the new steps' tasks run first: they send before the streams work
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
                    self.outbox.deliver()
                    await self._recover(failure, rows)

    def _admit(self) -> None:
        queried, cached = self.scheduler.queried_tokens, self.scheduler.cached_tokens
        self.scheduler.admit(self.waiting, self.running, self.pool)
        self.metrics.prefix_cache(self.scheduler.queried_tokens - queried, self.scheduler.cached_tokens - cached)
        for seq in self.scheduler.preempted:
            logger.info("request %s: sequence %d pre-empted (no free KV cache block); it resumes by replay",
                        seq.request_id or "-", seq.index)
            self.stats["preempted"] += 1
            self.metrics.preempted()
        self.scheduler.preempted.clear()

    def _move_off_unusable(self) -> None:
        """Moves sequences off replicas that are gone or draining, where another replica of the
        stage has room; the new route's caches are rebuilt by replay."""
        for seq in self.running:
            if not seq.in_flight and not seq.finished and seq.route is not None and self.pool.move(seq):
                seq.num_cached = 0
                self.stats["moved"] += 1
        self.pool.tidy()

    async def _step(self, route: tuple[str, ...], rows: list[Row], epoch: int
                    ) -> tuple[Exception | None, list[Row]]:
        step = build_step(rows, route)
        try:
            addresses = [self.replicas[replica_id].address for replica_id in route]
            result = await self.pipeline.step(addresses, **step.kwargs(), timeout=self.config.step_timeout_s)
        except (StepFailed, KeyError) as exc:
            self._drop_rows(rows)
            return (exc if isinstance(exc, StepFailed) else StepFailed(f"replica {exc} went away")), rows
        finally:
            self.stats["steps"] += 1
        self._failures = 0
        for row in rows:
            row.seq.step_failures = 0
        if epoch == self._epoch:
            self._finish_step(rows, result, step.sampling, step.scoring, route)
        else:
            self._drop_rows(rows)
        return None, rows

    def _drop_rows(self, rows: list[Row]) -> None:
        """A step's rows, whose results are not used: free again, released where finished."""
        for row in rows:
            row.seq.left_step(row.start, row.num_new)
            if row.seq.finished:
                self._release(row.seq)

    def _finish_step(self, rows: list[Row], result: wire.Result, specs: tuple, scoring: tuple,
                     route: tuple[str, ...]) -> None:
        self.outbox.hold()
        sampled: list[tuple[int, Sequence]] = []  # the rows whose sequences get their next token
        scored = scored_prompts(result.sampled, specs, scoring)
        for i, row in enumerate(rows):
            seq = row.seq
            if not seq.left_step(row.start, row.num_new) and not seq.finished:  # computed without the chunk before
                continue
            if specs[i] is not None and specs[i].ids is not None:
                seq.sampler_has = (route, row.start + row.num_new)
            if seq.finished:
                self._release(seq)
                continue
            if i in scored:
                extend_prompt_logprobs(seq.prompt_logprob_values, scored[i], row.start)
            seq.num_cached = row.start + row.num_new
            self.pool.cache_computed(seq)
            if seq.num_pending == 0 and seq.params.max_tokens == 0:  # echo: the prompt scored, nothing more
                self._finish(seq, "length")
            elif seq.num_pending == 0:
                sampled.append((i, seq))
        chosen = list(zip([seq for _, seq in sampled],
                          choices(result.sampled, specs, [(i, seq.params) for i, seq in sampled])))
        now = time.monotonic()
        for seq, choice in chosen:
            if isinstance(choice, Exception):
                self._fail(seq, f"sampling failed: {choice}", "sampling")
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.metrics.first_token(now - seq.arrival)
            if seq.beam is None:
                self._append(seq, choice)
            elif seq.beam.report(seq, choice):  # every beam has its next tokens: the search picks
                seq.beam.advance(self.pool, self._finish, self.outbox.put)
                self._wake.set()
        self.metrics.generated_tokens(sum(not isinstance(c, Exception) for _, c in chosen))

    def _append(self, seq: Sequence, choice: Choice) -> None:
        reason = seq.append(choice.token, choice.logprob, self.config.max_model_len)
        self.stats["tokens"] += 1
        self.outbox.put(seq, ("token", seq, choice))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._observe_finished(seq)
        self._release(seq)
        self.outbox.put(seq, ("finished", seq, reason))

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
        self.outbox.put(seq, ("failed", seq, message))
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
                self.outbox.put(seq, ("error", seq, message))
            seq.in_flight = seq.num_computing = 0
            self._release(seq)
        self.waiting.clear()
