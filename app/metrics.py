"""What the stages and the ingress are doing: Prometheus metrics and a periodic log line.

Metrics are `ray.serve.metrics` objects, exported at Ray's Prometheus endpoint (each node's
metrics export port, `/metrics`) with Ray's `ray_` prefix; Serve adds the `deployment`,
`replica` and `application` tags. Ray is imported lazily and only inside a Serve replica: the
same objects made anywhere else (a unit test, the in-process app) record nothing, so
`stage_server`, `engine` and `api` never need Ray. They call a few plain methods per step, not
per sequence, so the hot path stays cheap.

Every `log_interval_s` while there is work, each replica also logs one line of what it did
(rates over the interval), through Serve's logger so that it shows in `serve run`'s output.
Ray estimates a histogram's `_sum` from its buckets' midpoints, so wherever a mean matters
(busy time, sequences per step, tokens) a counter gives the exact total.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

logger = logging.getLogger("ray.serve")

# Seconds: a decode step of a small model on one core takes ~1 ms, a long prefill of a large
# one tens of seconds.
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
# Ray drops a gauge whose value was not recorded again within two export intervals (20 s by
# default): the tick sets the gauges again, and writes the activity line when it is due.
TICK_S = 5.0


def _tagged(metric, tags: dict):
    """`metric` with default tag values (Serve's `set_default_tags` does not return the metric)."""
    metric.set_default_tags(dict(tags))
    return metric


def _in_replica() -> bool:
    """True inside a Serve replica, where metrics reach Ray's exporter."""
    if "ray" not in sys.modules:  # no Ray in this process: certainly no replica (and no import)
        return False
    try:
        from ray import serve

        serve.get_replica_context()
        return True
    except Exception:  # noqa: BLE001 - Ray without a replica context: not in a replica
        return False


class _Ticker:
    """Calls `tick()` every `interval_s` on a daemon thread until closed."""

    def __init__(self, tick, interval_s: float, name: str):
        self._tick, self._interval_s = tick, interval_s
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name=name).start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                logger.exception("metrics tick failed")

    def close(self) -> None:
        self._stop.set()


class _Window:
    """Differences of running totals over windows of `interval_s` (0: none), for activity lines."""

    def __init__(self, interval_s: float, zeros: tuple):
        self.interval_s, self._last, self._since = interval_s, zeros, time.monotonic()

    def advance(self, totals: tuple) -> tuple[float, tuple] | None:
        """(seconds, differences) since the last window once `interval_s` has passed, else None."""
        now = time.monotonic()
        if not self.interval_s or now - self._since < self.interval_s:
            return None
        deltas = tuple(a - b for a, b in zip(totals, self._last))
        seconds, self._since, self._last = now - self._since, now, totals
        return seconds, deltas


class StageMetrics:
    """Per-stage metrics, recorded by the stage's compute thread once per step.

    Args:
        stage_index: the stage's position in the pipeline (the `stage` tag).
        log_interval_s: seconds between activity lines (0: no log).
        enabled: record to Ray (default: only inside a Serve replica).
    """

    def __init__(self, stage_index: int, log_interval_s: float = 10.0, enabled: bool | None = None):
        self.stage_index = stage_index
        self.enabled = _in_replica() if enabled is None else enabled
        # Running totals, written only by the compute thread; the log thread reports differences.
        self._steps = self._rows = self._tokens = 0
        self._busy_s, self._queued = 0.0, 0
        self._window, self._ticker = _Window(log_interval_s, (0, 0, 0, 0.0)), None
        if not self.enabled:
            return
        from ray.serve import metrics

        tags = {"stage": str(stage_index)}
        self._forward = _tagged(metrics.Histogram(
            "stagewise_stage_forward_seconds", "Time of one step's forward through the stage's blocks.",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("stage", "kind")), tags)
        self._batch = _tagged(metrics.Histogram(
            "stagewise_stage_batch_size", "Sequences (rows) in one step through the stage.",
            boundaries=BATCH_BUCKETS, tag_keys=("stage",)), tags)
        self._queue = _tagged(metrics.Gauge(
            "stagewise_stage_queue_depth", "Steps waiting for the stage when its last step ended.",
            tag_keys=("stage",)), tags)
        self._queue.set(0)
        self._token_count = _tagged(metrics.Counter(
            "stagewise_stage_tokens", "Tokens computed by the stage (prompt and generated); rate() is tokens/s.",
            tag_keys=("stage",)), tags)
        self._busy = _tagged(metrics.Counter(
            "stagewise_stage_busy_seconds", "Seconds spent in forwards; rate() is the stage's utilisation.",
            tag_keys=("stage",)), tags)
        self._sequence_count = _tagged(metrics.Counter(
            "stagewise_stage_sequences", "Rows (one per sequence) of the steps; over steps, the mean batch size.",
            tag_keys=("stage",)), tags)
        self._errors = _tagged(metrics.Counter(
            "stagewise_stage_step_errors", "Steps whose forward failed on the stage.",
            tag_keys=("stage",)), tags)
        self._refused = _refused_counter(f"Stage{stage_index}")
        self._ticker = _Ticker(self._tick, TICK_S, f"stagewise-stage{stage_index}-metrics")

    def observe_step(self, rows: int, tokens: int, seconds: float, queued: int) -> None:
        """One step done: `rows` sequences, `tokens` tokens in `seconds`; `queued` steps wait."""
        if not self.enabled:
            return
        self._steps, self._rows, self._tokens = self._steps + 1, self._rows + rows, self._tokens + tokens
        self._busy_s, self._queued = self._busy_s + seconds, queued
        self._forward.observe(seconds, {"kind": "decode" if tokens == rows else "prefill"})
        self._batch.observe(rows)
        self._queue.set(queued)
        self._token_count.inc(tokens)
        self._sequence_count.inc(rows)
        if seconds > 0:
            self._busy.inc(seconds)

    def step_failed(self) -> None:
        if self.enabled:
            self._errors.inc()

    def refused(self, reason: str) -> None:
        """A data-plane connection was refused: `reason` "handshake" or "message"."""
        if self.enabled:
            self._refused.inc(tags={"reason": reason})

    def _tick(self) -> None:
        self._queue.set(self._queued)
        window = self._window.advance((self._steps, self._rows, self._tokens, self._busy_s))
        if window is None:
            return
        seconds, (steps, rows, tokens, busy_s) = window
        if steps:
            logger.info("Stage%d: %.1f steps/s, %.1f tokens/s, %.1f sequences per step, busy %.0f%%, %d queued",
                        self.stage_index, steps / seconds, tokens / seconds, rows / steps,
                        100 * busy_s / seconds, self._queued)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.close()


def _refused_counter(process: str):
    from ray.serve import metrics

    return _tagged(metrics.Counter(
        "stagewise_data_plane_refused", "Data-plane connections refused (a failed handshake, a message "
        "that breaks the format or names a stranger), by process and reason.",
        tag_keys=("process", "reason")), {"process": process})


class IngressMetrics:
    """Ingress metrics: requests, latency as a client sees it, the scheduler's queues.

    Args:
        model_name: the served model's id (the `model` tag).
        log_interval_s: seconds between activity lines (0: no log).
        enabled: record to Ray (default: only inside a Serve replica).
    """

    def __init__(self, model_name: str = "", log_interval_s: float = 10.0, enabled: bool | None = None):
        self.enabled = _in_replica() if enabled is None else enabled
        # Running totals, written on the event loop; the log thread reports differences.
        self._requests = self._prompt = self._generated = 0
        self._running = self._waiting = 0
        self._window, self._ticker = _Window(log_interval_s, (0, 0, 0)), None
        if not self.enabled:
            return
        from ray.serve import metrics

        def tagged(metric):
            return _tagged(metric, {"model": model_name})

        self._request_count = tagged(metrics.Counter(
            "stagewise_requests", "Completions and chat requests answered, by endpoint and HTTP status.",
            tag_keys=("model", "endpoint", "status")))
        self._ttft = tagged(metrics.Histogram(
            "stagewise_time_to_first_token_seconds", "From a sequence's arrival to its first token.",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("model",)))
        self._tpot = tagged(metrics.Histogram(
            "stagewise_time_per_output_token_seconds",
            "Mean time between a finished sequence's output tokens, after the first.",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("model",)))
        self._prompt_tokens = tagged(metrics.Counter(
            "stagewise_prompt_tokens", "Prompt tokens of the sequences admitted; rate() is tokens/s.",
            tag_keys=("model",)))
        self._generation_tokens = tagged(metrics.Counter(
            "stagewise_generation_tokens", "Tokens sampled; rate() is tokens/s.", tag_keys=("model",)))
        self._running_gauge = tagged(metrics.Gauge(
            "stagewise_running_sequences", "Sequences holding a KV cache slot.", tag_keys=("model",)))
        self._waiting_gauge = tagged(metrics.Gauge(
            "stagewise_waiting_sequences", "Sequences waiting for a slot.", tag_keys=("model",)))
        self._recoveries = tagged(metrics.Counter(
            "stagewise_recoveries", "Failed steps after which the open sequences were replayed.",
            tag_keys=("model",)))
        self._sequence_errors = tagged(metrics.Counter(
            "stagewise_sequence_errors", "Sequences ended by an error of their own (sampling, text, a step that "
            "kept failing), by reason.", tag_keys=("model", "reason")))
        self._blocks = tagged(metrics.Gauge(
            "stagewise_kv_blocks", "KV cache blocks of each stage: used, free (cached ones included) and cached "
            "(holding a prefix later prompts can share).", tag_keys=("model", "stage", "kind")))
        self._preemptions = tagged(metrics.Counter(
            "stagewise_preemptions", "Sequences pre-empted for want of a free KV cache block (they resume by "
            "replay).", tag_keys=("model",)))
        # vLLM's pair: the hit rate is hits / queries, over any window
        self._prefix_queries = tagged(metrics.Counter(
            "stagewise_prefix_cache_queries", "Prompt tokens looked up in the prefix cache (replays included).",
            tag_keys=("model",)))
        self._prefix_hits = tagged(metrics.Counter(
            "stagewise_prefix_cache_hits", "Prompt tokens found in the prefix cache, not computed.", tag_keys=("model",)))
        self._refused = _refused_counter("Ingress")
        self._running_gauge.set(0)  # present from the start, not only once something ran
        self._waiting_gauge.set(0)
        self._ticker = _Ticker(self._tick, TICK_S, "stagewise-ingress-metrics")

    def request_finished(self, status: int, endpoint: str = "completions") -> None:
        """A request to `endpoint` (completions, chat) was answered with HTTP `status` (counted
        when its body ends)."""
        if self.enabled:
            self._requests += 1
            self._request_count.inc(tags={"endpoint": endpoint, "status": str(status)})

    def prompt_tokens(self, num: int) -> None:
        if self.enabled and num > 0:
            self._prompt += num
            self._prompt_tokens.inc(num)

    def generated_tokens(self, num: int) -> None:
        if self.enabled and num > 0:
            self._generated += num
            self._generation_tokens.inc(num)

    def first_token(self, seconds: float) -> None:
        if self.enabled:
            self._ttft.observe(seconds)

    def time_per_output_token(self, seconds: float) -> None:
        if self.enabled:
            self._tpot.observe(seconds)

    def set_sequences(self, running: int, waiting: int) -> None:
        if self.enabled and (running, waiting) != (self._running, self._waiting):
            self._running, self._waiting = running, waiting
            self._running_gauge.set(running)
            self._waiting_gauge.set(waiting)

    def set_blocks(self, replicas: list[dict]) -> None:
        """KV cache blocks of each stage (its replicas summed): used, free and cached (`replicas`:
        the engine's `replica_load()`)."""
        if not self.enabled:
            return
        totals: dict[tuple[str, str], int] = {}
        for replica in replicas:
            for kind in ("used", "free", "cached"):
                key = (f"Stage{replica['stage']}", kind)
                totals[key] = totals.get(key, 0) + replica["blocks"][kind]
        for (stage, kind), value in totals.items():
            self._blocks.set(value, tags={"stage": stage, "kind": kind})

    def prefix_cache(self, queried: int, hits: int) -> None:
        """Prompt tokens looked up in the prefix cache, and those found."""
        if self.enabled and queried > 0:
            self._prefix_queries.inc(queried)
            if hits > 0:
                self._prefix_hits.inc(hits)

    def recovery(self) -> None:
        if self.enabled:
            self._recoveries.inc()

    def refused(self, reason: str) -> None:
        """A data-plane connection to the ingress was refused: "handshake" or "message"."""
        if self.enabled:
            self._refused.inc(tags={"reason": reason})

    def preempted(self) -> None:
        """A sequence gave up its KV cache blocks to another and waits to resume by replay."""
        if self.enabled:
            self._preemptions.inc()

    def sequence_failed(self, reason: str) -> None:
        """A sequence ended with an error of its own; `reason`: sampling, step, text or engine."""
        if self.enabled:
            self._sequence_errors.inc(tags={"reason": reason})

    def _tick(self) -> None:
        self._running_gauge.set(self._running)
        self._waiting_gauge.set(self._waiting)
        window = self._window.advance((self._requests, self._prompt, self._generated))
        if window is None:
            return
        seconds, (requests, prompt, generated) = window
        if requests or generated or self._running or self._waiting:
            logger.info("Ingress: %d requests done, prompt %.1f tokens/s, generation %.1f tokens/s, "
                        "%d sequences running, %d waiting", requests, prompt / seconds, generated / seconds,
                        self._running, self._waiting)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.close()
