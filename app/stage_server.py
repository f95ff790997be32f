"""Serves one `Stage` on the data plane: receive a step, compute, pass it on along its route."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from app.transport import Connections, listen, serve_connections

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

    A step message's header: `{"kind": "step", "step": id, "slots", "starts", "num_new",
    "all_logits", "route": [next hops..., reply address]}` with one tensor, the stage's input;
    `slots` holds each row's cache slot for this stage and every next one (a list per stage).
    The output goes to `route[0]` with `route[1:]` and `slots[1:]`; the last stage's output
    (logits) goes to the reply address as `{"kind": "result", "step": id}`. A failure is sent
    to the reply address as `{"kind": "error", "step": id, "message"}` so that nobody waits
    forever. `{"kind": "released"}` from the ingress says that this replica, draining, holds no
    sequence any more (`released` is set); `{"kind": "demand", "sequences", "waiting"}` says how
    many sequences it holds and its share of those waiting for a slot (kept in `demand`).

    Args:
        stage: the `stages.Stage` to serve.
        host: address to listen on.
        num_threads: torch threads for a large step (None: leave torch's setting alone).
        parallel_min_tokens: steps with fewer tokens than this run on one thread. Decode steps
            are memory-bound, too short to pay for waking a thread pool, and an idle pool that
            spins steals the core the next stage needs: on 2 cores, 2 stages of the 125M Llama
            took 43 ms per token on 1 thread but 124 ms on 2 for one stream, and 89-98 ms on 1
            thread against 80-1500 ms (erratic) on 2 for a batch of 16. Prefill is compute-bound
            and gains from every core.
        metrics: has `observe_step(rows, tokens, seconds, queued)` and `step_failed()`, called by
            the compute thread once per step (e.g. `app.metrics.StageMetrics`; None: none kept).
    """

    def __init__(self, stage, host: str = "127.0.0.1", num_threads: int | None = None,
                 parallel_min_tokens: int = 64, metrics=None):
        self.stage = stage
        self.metrics = metrics
        self.num_threads, self.parallel_min_tokens = num_threads, parallel_min_tokens
        self.load = StageLoad()
        self.released = threading.Event()
        self.demand = {"sequences": 0, "waiting": 0.0}
        self._inbox: queue.Queue = queue.Queue()
        self._out = Connections()
        self._server, self.address = listen(host)
        serve_connections(self._server, self._on_message)
        self._worker = threading.Thread(target=self._run, daemon=True, name="stagewise-stage")
        self._worker.start()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def _on_message(self, header: dict, tensors: list[torch.Tensor]) -> None:
        if header.get("kind") == "released":
            self.released.set()
            return
        if header.get("kind") == "demand":
            self.demand = {"sequences": header["sequences"], "waiting": header["waiting"]}
            return
        self.load.queued += 1
        self._inbox.put((header, tensors, time.monotonic()))

    def _run(self) -> None:
        while True:
            header, tensors, arrived = self._inbox.get()
            self.load.queued -= 1
            if header is None:
                return
            route, slots = header["route"], header["slots"]
            began = time.monotonic()
            num_rows, num_tokens = len(slots[0]), sum(header["num_new"])
            if self.num_threads:
                threads = self.num_threads if num_tokens >= self.parallel_min_tokens else 1
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
            try:
                out = self.stage(tensors[0], torch.tensor(slots[0]), torch.tensor(header["starts"]),
                                 torch.tensor(header["num_new"]), all_logits=header.get("all_logits", False))
            except Exception as exc:  # a bad step must not kill the stage: report it to the ingress
                logger.exception("step %s failed", header.get("step"))
                if self.metrics is not None:
                    self.metrics.step_failed()
                self._send(route[-1], {"kind": "error", "step": header["step"], "message": str(exc)})
                continue
            done = time.monotonic()
            elapsed = done - began
            load = self.load
            load.steps, load.rows, load.tokens = load.steps + 1, load.rows + num_rows, load.tokens + num_tokens
            load.busy_s += elapsed
            load.ongoing_s += done - arrived
            load.last_step_at = done
            if len(route) > 1:
                sent = self._send(route[0], dict(header, route=route[1:], slots=slots[1:]), [out])
            else:
                sent = self._send(route[0], {"kind": "result", "step": header["step"]}, [out])
            if not sent and len(route) > 1:
                # The next stage is gone: tell the ingress now rather than let it time out.
                self._send(route[-1], {"kind": "error", "step": header["step"],
                                       "message": f"stage at {route[0]} unreachable"})
            if self.metrics is not None:  # after sending: the next stage need not wait for it
                self.metrics.observe_step(num_rows, num_tokens, elapsed, load.queued)

    def _send(self, address: str, header: dict, tensors=()) -> bool:
        try:
            self._out.send(address, header, tensors)
            return True
        except OSError as exc:
            logger.warning("cannot reach %s: %s", address, exc)
            return False

    def close(self) -> None:
        self._server.close()
        self._inbox.put((None, None, None))
        self._out.close()
