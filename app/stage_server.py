"""Serves one `Stage` on the data plane: receive a step, compute, pass it on along its route."""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from app import wire
from app.transport import Connections, listen, serve_connections
from stages.sampler import Sampler
from stages.stage import is_packed


def _libc_malloc_trim():
    """glibc's `malloc_trim`, or None (another libc, another system)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_malloc_trim()
logger = logging.getLogger(__name__)


@dataclass
class StageLoad:
    """What a stage has done, for metrics and autoscaling (read from any thread)."""

    steps: int = 0
    rows: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    queued: int = 0
    ongoing_s: float = 0.0  # summed over steps: from arrival (so queueing counts) to done
    started: float = field(default_factory=time.monotonic)
    last_step_at: float = field(default_factory=time.monotonic)


class StageServer:
    """Listens for steps, runs them through the stage one at a time, forwards the results.

    Messages are `app.wire`'s, on connections that proved they know the application's secret. A
    `Step` carries the stage's input and, per stage from this one on, each row's KV cache blocks; its
    output goes to `route[0]` with `route[1:]` and `tables[1:]`; the last stage's output (logits)
    goes to the reply address as a `Result`. A failure is sent to the reply address as an `Error`
    so that nobody waits forever. `Released` from the ingress says that this replica, draining,
    holds no sequence any more (`released` is set); `Demand` says how many sequences it holds and
    its share of those waiting for a slot (kept in `demand`). A step whose route names an address
    that is not one of the application's, or whose blocks are not this stage's, is refused.

    Args:
        stage: the `stages.Stage` to serve.
        secret: the application's secret, or a callable returning it (None until it is known).
        host: address to listen on.
        num_threads: torch threads for a large step (None: leave torch's setting alone).
        parallel_min_tokens: steps with fewer tokens than this run on one thread. Decode steps
            are memory-bound, too short to pay for waking a thread pool, and an idle pool that
            spins steals the core the next stage needs: on 2 cores, 2 stages of the 125M Llama
            took 43 ms per token on 1 thread but 124 ms on 2 for one stream, and 89-98 ms on 1
            thread against 80-1500 ms (erratic) on 2 for a batch of 16. Prefill is compute-bound
            and gains from every core.
        metrics: has `observe_step(rows, tokens, seconds, queued)`, `step_failed()` and
            `refused(reason)` (e.g. `app.metrics.StageMetrics`; None: none kept).
        known_addresses: `known(addresses) -> bool`, whether every address is one of the
            application's processes (stage replicas, the ingress; e.g. `Announcer.known`); None:
            routes are not checked (a pipeline in one process).
        limits: what a message may be (`app.wire.Limits`).
    """

    def __init__(self, stage, secret, host: str = "127.0.0.1", num_threads: int | None = None,
                 parallel_min_tokens: int = 64, metrics=None, known_addresses=None,
                 limits: wire.Limits = wire.Limits()):
        self.stage = stage
        self.sampler = Sampler()  # the last stage's, with the token histories penalties need
        self.metrics = metrics
        self.num_threads, self.parallel_min_tokens = num_threads, parallel_min_tokens
        self.load = StageLoad()
        self.released = threading.Event()
        self.demand = {"sequences": 0, "waiting": 0.0}
        self._inbox: queue.Queue = queue.Queue()
        self._known = known_addresses
        self._out = Connections(secret)
        self._server, self.address = listen(host)
        serve_connections(self._server, self._on_message, secret, limits, on_refused=self._refused)
        self._worker = threading.Thread(target=self._run, daemon=True, name="stagewise-stage")
        self._worker.start()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refused(reason)

    def _on_message(self, message: wire.Message) -> None:
        """From a connection's thread: checks what the format cannot, then queues a step."""
        if isinstance(message, wire.Released):
            self.released.set()
            return
        if isinstance(message, wire.Demand):
            self.demand = {"sequences": message.sequences, "waiting": message.waiting}
            return
        if not isinstance(message, wire.Step):
            raise wire.WireError(f"a stage takes no {message.kind} message")
        if self._known is not None and not self._known(message.route):
            raise wire.WireError(f"step {message.step}: its route names an address that is not the application's")
        if self.stage.is_first != (message.inputs.dim() == 2):
            raise wire.WireError(f"step {message.step}: {'token ids' if self.stage.is_first else 'hidden states'} "
                                 "expected")
        try:  # built here, once: the tables are checked before anything is computed
            rows = self.stage.rows([list(t) for t in message.tables[0]], list(message.starts),
                                   list(message.num_new), message.inputs.shape[1],
                                   is_packed(message.inputs, message.num_new))
        except ValueError as exc:
            raise wire.WireError(f"step {message.step}: {exc}") from None
        if message.adapters and max(message.adapters) > len(getattr(self.stage, "lora_names", ())):
            raise wire.WireError(f"step {message.step}: a row asks for a LoRA adapter this stage does not hold")
        if message.copies and not self.stage.cache.can_copy(message.copies[0]):
            raise wire.WireError(f"step {message.step}: its block copies are not within this stage's pool, or "
                                 "copy into a block twice or into a block they copy")
        self.load.queued += 1
        self._inbox.put((message, rows, time.monotonic()))

    def _run(self) -> None:
        while True:
            step, rows, arrived = self._inbox.get()
            self.load.queued -= 1
            if step is None:
                return
            try:
                self._compute(step, rows, arrived)
            except Exception:  # noqa: BLE001 - the compute thread never dies of one step
                logger.exception("step %s could not be handled", step.step)

    def _compute(self, step: wire.Step, rows, arrived: float) -> None:
        route, tables = step.route, step.tables
        began = time.monotonic()
        num_rows, num_tokens = len(step.starts), sum(step.num_new)
        if self.num_threads:
            threads = self.num_threads if num_tokens >= self.parallel_min_tokens else 1
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        try:
            if getattr(self.stage, "is_encoder", False):  # whole texts: `rows` is their attention mask
                out = self.stage(step.inputs, rows)
            else:
                if step.copies:
                    self.stage.cache.copy_blocks(step.copies[0])
                out = self.stage(step.inputs, [list(t) for t in tables[0]], list(step.starts), list(step.num_new),
                                 all_logits=step.all_logits, rows=rows, adapters=list(step.adapters) or None)
            answer = result(step, out, self.sampler) if len(route) == 1 else None  # the last stage's tokens
        except Exception as exc:  # a bad step must not kill the stage: report it to the ingress
            logger.exception("step %s failed", step.step)
            if self.metrics is not None:
                self.metrics.step_failed()
            self._send(route[-1], wire.Error(step.step, str(exc)))
            return
        done = time.monotonic()
        elapsed = done - began
        load = self.load
        load.steps, load.rows, load.tokens = load.steps + 1, load.rows + num_rows, load.tokens + num_tokens
        load.busy_s += elapsed
        load.ongoing_s += done - arrived
        load.last_step_at = done
        if len(route) > 1:
            sent = self._send(route[0], wire.Step(step.step, route[1:], tables[1:], step.starts, step.num_new,
                                                  step.all_logits, out, step.want, step.sampling, step.scoring,
                                                  step.copies[1:], step.adapters))
        else:
            sent = self._send(route[0], answer)
        if not sent and len(route) > 1:
            # The next stage is gone: tell the ingress now rather than let it time out.
            self._send(route[-1], wire.Error(step.step, f"stage at {route[0]} unreachable"))
        if self.metrics is not None:  # after sending: the next stage need not wait for it
            self.metrics.observe_step(num_rows, num_tokens, elapsed, load.queued)
        if num_tokens >= self.parallel_min_tokens and _malloc_trim is not None:
            # A large step's activations were freed into the heap, in pieces that the decode
            # steps' smaller ones fragment: give the free pages back, or the stage holds more
            # than its planned working memory after a while (measured: 40-100 MiB more under load).
            _malloc_trim(0)

    def _send(self, address: str, message: wire.Message) -> bool:
        try:
            self._out.send(address, message)
            return True
        except OSError as exc:
            logger.warning("cannot reach %s: %s", address, exc)
            return False

    def close(self) -> None:
        self._server.close()
        self._inbox.put((None, None, None))
        self._out.close()


def result(step: wire.Step, out: torch.Tensor, sampler: Sampler) -> wire.Result:
    """The last stage's answer to `step`: every row's logits, or, when the step says what each
    row wants, each row's token (its argmax, or sampled by its spec: the failures of one row are
    its own), and the log-probabilities of the prompt tokens of the rows that score them."""
    if not step.want:
        return wire.Result(step.step, out)
    return wire.Result(step.step, None, sampler.answer(out, step.want, step.sampling, step.starts, step.num_new,
                                                       step.scoring))
