"""The stage's Serve deployment: a plain class, wrapped by the builder (`app.builder`).

`StageDeployment` holds one block range and serves it on the data plane; the ingress
(`app.ingress`) owns the HTTP app, the tokenizer and the engine. Every stage replica announces
its data-plane address to the ingress's registry (`app.registry`), so the ingress can reach each
replica of each stage, again whenever one is added, replaced or drained.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from app import wire
from app.metrics import StageMetrics
from app.registry import Announcer
from app.stage_server import StageServer
from app.weights import local_checkpoint
from stages import Stage
from stages.encoder import EncoderStage

logger = logging.getLogger("ray.serve")

LOAD_RETRY_S = 10.0  # a stage whose load failed tries again this often
DRAIN_TIMEOUT_S = 20.0  # a draining stage replica waits this long at most for its sequences to move
QUIET_S = 3.0  # ... or until no step has reached it for this long (the ingress is gone or idle)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _node_name() -> str:
    """This node's name as the planner knows it: its `stagewise/name` label, else its address."""
    import ray

    from app.cluster import NAME_LABEL

    label = ray.get_runtime_context().get_node_labels().get(NAME_LABEL)
    return label[0] if isinstance(label, list) and label else (label or _node_ip())


def process_memory() -> dict:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), in bytes (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[{"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes"}[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def warm_up(stage: Stage, step_tokens: int, max_rows: int) -> dict:
    """Runs `Stage.warm_up` and measures what it took: the resident peak of the load before it
    (`load_peak_rss_bytes`) and the working memory of the largest steps over what the stage
    holds (`work_bytes`, from Linux's peak, reset for it; absent where it cannot be reset)."""
    before = process_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the resident memory now
    except OSError:
        stage.warm_up(step_tokens, max_rows)
        return {"load_peak_rss_bytes": before.get("peak_rss_bytes", 0)}
    began = time.monotonic()
    stage.warm_up(step_tokens, max_rows)
    work = process_memory().get("peak_rss_bytes", 0) - before.get("rss_bytes", 0)
    logger.info("Stage [%d, %d): the largest steps (%d tokens, %d rows) took %.1f MiB of working memory (%.1f s)",
                stage.start, stage.end, step_tokens, max_rows, work / 2**20, time.monotonic() - began)
    return {"load_peak_rss_bytes": before.get("peak_rss_bytes", 0), "work_bytes": work}


class StageDeployment:
    """One block range `[start, end)` on one replica.

    The replica is up at once and loads its blocks in a thread: Serve sees a healthy replica
    whatever the load does. A load that fails (a bad or truncated checkpoint, a missing tensor,
    an unsupported architecture, too little memory) is logged, announced with its cause (the
    ingress shows it in `/health` and in every request's 503) and tried again every
    `LOAD_RETRY_S`, so a fixed checkpoint serves without a restart. Serve's default (raise in
    the constructor) would replace the replica in a loop that tells the user nothing.

    Args:
        model_dir: checkpoint directory (present on the replica's node).
        index: the stage's position in the pipeline.
        start: first block.
        end: one past the last block.
        dtype: weights and activations dtype.
        max_batch_size: sequences open at once (batch slots).
        num_blocks: KV cache blocks (the pool, allocated once at start; see `placement.kv_pool_blocks`).
        block_size: tokens per KV cache block.
        num_threads: torch threads for large steps (None: torch's default).
        parallel_min_tokens: steps with fewer tokens run on one thread (see `StageServer`).
        step_tokens: the most tokens a step carries (`Stage.warm_up` runs such a step at start).
        quantization: "none", "int8" or "nf4" (bitsandbytes) for this stage's blocks.
        limits: what a data-plane message may be (`app.wire.Limits`).
        encoder: the checkpoint is a sentence encoder (`stages.encoder.EncoderStage`, layers
            instead of blocks, no KV cache).
        lora_modules: LoRA adapters, name -> directory (readable on this node), in the order the
            ingress numbers them (`stages.lora`).
    """

    def __init__(self, model_dir: str, index: int, start: int, end: int, *, dtype: str = "float32",
                 max_batch_size: int = 16, num_blocks: int = 256, block_size: int = 16, num_threads: int | None = None,
                 parallel_min_tokens: int = 64, step_tokens: int = 512, quantization: str = "none",
                 limits: wire.Limits = wire.Limits(), encoder: bool = False, lora_modules: dict | None = None):
        from ray import serve

        if num_threads:
            torch.set_num_threads(num_threads)
        if quantization != "none":
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every int8 forward
        self.index, self.num_slots, self.limits = index, max_batch_size, limits
        self.stage = self.server = None
        self._stats_at, self._stats_queued_s = time.monotonic(), 0.0
        self._closed = threading.Event()
        context = serve.get_replica_context()
        self.app_name, self.fetched_bytes = context.app_name, 0
        self.step_tokens, self.memory = step_tokens, {}
        self.announcer = Announcer(context.app_name, {
            "id": context.replica_id.unique_id, "stage": index, "start": start, "end": end, "node": _node_name(),
            "state": "starting", "error": None, "address": None, "num_slots": max_batch_size, "draining": False,
            "num_blocks": num_blocks, "block_size": block_size})
        load = dict(model_dir=model_dir, start=start, end=end, dtype=dtype) if encoder else \
            dict(model_dir=model_dir, start=start, end=end, dtype=dtype, num_blocks=num_blocks, block_size=block_size,
                 quantization=quantization, lora_modules=lora_modules or None)
        self.stage_class = EncoderStage if encoder else Stage
        threading.Thread(target=self._load_until_loaded, args=(load, num_threads, parallel_min_tokens),
                         daemon=True, name="stagewise-load").start()

    def _load_until_loaded(self, load: dict, num_threads: int | None, parallel_min_tokens: int) -> None:
        import ray

        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        name = f"Stage{self.index}"
        while not self._closed.is_set():
            logger.info("%s: loading blocks [%d, %d) of %s on %s (%s, %s, %d threads)", name, load["start"],
                        load["end"], load["model_dir"], device, load["dtype"], load.get("quantization", "none"),
                        torch.get_num_threads())
            try:
                model_dir, self.fetched_bytes = local_checkpoint(load["model_dir"], load["start"], load["end"],
                                                                 self.app_name, name)
                stage = self.stage_class(model_dir, load["start"], load["end"], device=device,
                                         **{k: v for k, v in load.items() if k not in ("model_dir", "start", "end")})
                self.memory = warm_up(stage, self.step_tokens, self.num_slots)
            except Exception as exc:  # noqa: BLE001 - whatever the cause, say it and try again later
                cause = f"{type(exc).__name__}: {exc}"
                logger.error("%s failed to load: %s (trying again in %.0f s)", name, cause, LOAD_RETRY_S,
                             exc_info=True)
                self.announcer.update(state="failed", error=cause)
                self._closed.wait(LOAD_RETRY_S)
                continue
            announcer = self.announcer
            self.server = StageServer(stage, lambda: announcer.secret, host=_node_ip(), num_threads=num_threads,
                                      parallel_min_tokens=parallel_min_tokens, metrics=StageMetrics(self.index),
                                      known_addresses=announcer.known, limits=self.limits)
            self.stage = stage
            logger.info("%s: %.1f MiB of weights loaded; data plane at %s", name, stage.weight_bytes() / 2**20,
                        self.server.address)
            self.announcer.update(state="ready", error=None, address=self.server.address)
            return

    def info(self) -> dict:
        """Where this replica listens, and what it holds (`state` alone until it has loaded)."""
        if self.stage is None:
            return {"index": self.index, "state": self.announcer.replica["state"],
                    "error": self.announcer.replica["error"]}
        memory = process_memory()
        return {"index": self.index, "address": self.server.address, "fetched_bytes": self.fetched_bytes,
                "start": self.stage.start,
                "end": self.stage.end, "pid": os.getpid(), "weight_bytes": self.stage.weight_bytes(),
                "kv_cache_bytes": self.stage.cache.nbytes() if self.stage.cache is not None else 0,
                "device": str(self.stage.device), "quantization": self.stage.quantization or "none",
                **self.memory, **memory,
                "peak_rss_bytes": max(memory.get("peak_rss_bytes", 0), self.memory.get("load_peak_rss_bytes", 0))}

    def load(self) -> dict:
        """What the stage has done so far (steps, rows, busy seconds, queue)."""
        load = self.server.load
        return {"steps": load.steps, "rows": load.rows, "tokens": load.tokens, "busy_s": load.busy_s,
                "queued": load.queued, "uptime_s": time.monotonic() - load.started}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics (see `app.autoscaling`). The hot path does not go
        through Serve, so Serve's own count of ongoing requests would always be 0.

        `queued_steps`: steps waiting at this replica for the one it computes, on average since
        the last call. `slot_demand`: the sequences it holds plus its share of those waiting at
        the ingress, over its KV cache slots (as the ingress last said).
        """
        if self.server is None:
            return {"queued_steps": 0.0, "slot_demand": 0.0}
        load, now = self.server.load, time.monotonic()
        queued_s = load.ongoing_s - load.busy_s  # from arrival to done, less the compute
        window = max(now - self._stats_at, 1e-3)
        queued = max(queued_s - self._stats_queued_s, 0.0) / window
        self._stats_at, self._stats_queued_s = now, queued_s
        demand = self.server.demand
        return {"queued_steps": queued,
                "slot_demand": (demand["sequences"] + demand["waiting"]) / self.num_slots}

    def check_health(self) -> None:
        # A stage still loading, or whose load failed, is healthy to Serve: replacing it would
        # only load again. It says what is wrong through the registry instead.
        if self.server is not None and not self.server.alive:
            raise RuntimeError("the stage's compute thread has stopped")

    def __del__(self):
        """Serve's graceful shutdown (scale-down, redeploy): drain before going.

        The replica tells the ingress it is draining; the ingress moves its sequences to
        another replica of this stage (by replay) and says when none is left. Without an
        ingress, or when no step comes for `QUIET_S`, there is nothing to wait for.
        """
        if hasattr(self, "_closed"):
            self._closed.set()  # a load that is retrying stops
        server, announcer = getattr(self, "server", None), getattr(self, "announcer", None)
        self.server = self.announcer = None
        if server is None:
            if announcer is not None:
                announcer.close()
            return
        if announcer is not None:
            began = time.monotonic()
            heard = announcer.drain()
            while heard and not server.released.wait(0.1):
                now = time.monotonic()
                if now - began > DRAIN_TIMEOUT_S or now - server.load.last_step_at > QUIET_S:
                    break
            logger.info("Stage%d: %s after %.1f s", self.index, "drained" if server.released.is_set() else
                        "stopping without a drain (no ingress, or no step for a while)", time.monotonic() - began)
            announcer.close()
        server.close()
