"""The Serve deployment classes: plain classes, wrapped by the builder (`app.builder`).

`StageDeployment` holds one block range and serves it on the data plane; `Ingress` owns the
HTTP app, the tokenizer and the engine. Every stage replica announces its data-plane address
to the ingress's registry (`app.registry`), so the ingress can reach each replica of each stage,
again whenever one is added, replaced or drained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import torch

from app.api import create_app
from app.completions import ModelInfo
from app.engine import Engine, EngineConfig, Replica
from app.metrics import IngressMetrics, StageMetrics
from app.pipeline import PipelineClient
from app.registry import Announcer, Registry, registry_name
from app.stage_server import StageServer
from stages import Stage

logger = logging.getLogger("ray.serve")

DRAIN_TIMEOUT_S = 20.0  # a draining stage replica waits this long at most for its sequences to move
QUIET_S = 3.0  # ... or until no step has reached it for this long (the ingress is gone or idle)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


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


class StageDeployment:
    """One block range `[start, end)` on one replica.

    Args:
        model_dir: checkpoint directory (present on the replica's node).
        index: the stage's position in the pipeline.
        start: first block.
        end: one past the last block.
        dtype: weights and activations dtype.
        max_batch_size: KV cache slots (sequences open at once).
        max_model_len: longest sequence.
        num_threads: torch threads for large steps (None: torch's default).
        parallel_min_tokens: steps with fewer tokens run on one thread (see `StageServer`).
        quantization: "none", "int8" or "nf4" (bitsandbytes) for this stage's blocks.
    """

    def __init__(self, model_dir: str, index: int, start: int, end: int, *, dtype: str = "float32",
                 max_batch_size: int = 16, max_model_len: int = 2048, num_threads: int | None = None,
                 parallel_min_tokens: int = 64, quantization: str = "none"):
        import ray

        if num_threads:
            torch.set_num_threads(num_threads)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        logger.info("Stage%d: loading blocks [%d, %d) of %s on %s (%s, %s, %d threads)", index, start, end,
                    model_dir, device, dtype, quantization, torch.get_num_threads())
        if quantization != "none":
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every int8 forward
        self.index, self.num_slots = index, max_batch_size
        self.stage = Stage(model_dir, start, end, dtype=dtype, device=device, num_slots=max_batch_size,
                           max_len=max_model_len, quantization=quantization)
        self.server = StageServer(self.stage, host=_node_ip(), num_threads=num_threads,
                                  parallel_min_tokens=parallel_min_tokens, metrics=StageMetrics(index))
        logger.info("Stage%d: %.1f MiB of weights loaded; data plane at %s", index,
                    self.stage.weight_bytes() / 2**20, self.server.address)
        self._stats_at, self._stats_ongoing_s = time.monotonic(), 0.0
        self.announcer = None
        from ray import serve

        context = serve.get_replica_context()
        self.announcer = Announcer(context.app_name, {
            "id": context.replica_id.unique_id, "stage": index, "address": self.server.address,
            "num_slots": max_batch_size, "draining": False})

    def info(self) -> dict:
        """Where this replica listens, and what it holds."""
        return {"index": self.index, "address": self.server.address, "start": self.stage.start,
                "end": self.stage.end, "pid": os.getpid(), "weight_bytes": self.stage.weight_bytes(),
                "device": str(self.stage.device), "quantization": self.stage.quantization or "none",
                **process_memory()}

    def load(self) -> dict:
        """What the stage has done so far (steps, rows, busy seconds, queue)."""
        load = self.server.load
        return {"steps": load.steps, "rows": load.rows, "tokens": load.tokens, "busy_s": load.busy_s,
                "queued": load.queued, "uptime_s": time.monotonic() - load.started}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics (see `app.autoscaling`). The hot path does not go
        through Serve, so Serve's own count of ongoing requests would always be 0.

        `ongoing_steps`: steps this replica was computing or holding queued, on average since
        the last call. `slot_demand`: the sequences it holds plus its share of those waiting at
        the ingress, over its KV cache slots (as the ingress last said).
        """
        now, ongoing_s = time.monotonic(), self.server.load.ongoing_s
        window = max(now - self._stats_at, 1e-3)
        ongoing = (ongoing_s - self._stats_ongoing_s) / window
        self._stats_at, self._stats_ongoing_s = now, ongoing_s
        demand = self.server.demand
        return {"ongoing_steps": ongoing,
                "slot_demand": (demand["sequences"] + demand["waiting"]) / self.num_slots}

    def check_health(self) -> None:
        if not self.server.alive:
            raise RuntimeError("the stage's compute thread has stopped")

    def __del__(self):
        """Serve's graceful shutdown (scale-down, redeploy): drain before going.

        The replica tells the ingress it is draining; the ingress moves its sequences to
        another replica of this stage (by replay) and says when none is left. Without an
        ingress, or when no step comes for `QUIET_S`, there is nothing to wait for.
        """
        server, announcer = getattr(self, "server", None), getattr(self, "announcer", None)
        self.server = self.announcer = None
        if server is None:
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


class Ingress:
    """The HTTP ingress: OpenAI API, tokenizer, scheduler; drives the stages over the data plane.

    Args:
        stages: handles of the stage deployments, in pipeline order.
        model_dir: checkpoint directory (for the tokenizer and config).
        served_name: the model id clients ask for.
        engine_config: scheduler limits.
        recover_timeout_s: how long to wait for a replaced stage before failing its sequences.
    """

    async def __init__(self, stages: list, model_dir: str, served_name: str, engine_config: EngineConfig,
                       recover_timeout_s: float = 120.0):
        import ray
        from ray import serve
        from transformers import AutoConfig, AutoTokenizer

        self.num_stages = len(stages)
        self.recover_timeout_s = recover_timeout_s
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.model = ModelInfo(name=served_name, tokenizer=tokenizer, vocab_size=config.vocab_size,
                               max_model_len=engine_config.max_model_len, eos_token_ids=eos_ids)
        # Owned by this replica: it dies with it, and the next ingress makes a new one.
        self.registry = ray.remote(Registry).options(
            name=registry_name(serve.get_replica_context().app_name), num_cpus=0, get_if_exists=True).remote()
        self.pipeline = PipelineClient(host=_node_ip())
        self.metrics = IngressMetrics(served_name)
        self.engine = Engine(self.pipeline, engine_config, len(stages), recover=self.find_stages,
                             on_drained=lambda replica: self.pipeline.release(replica.address),
                             metrics=self.metrics)
        await self.find_stages()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
        logger.info("Ingress: serving %s through %d stages: %s", served_name, len(stages),
                    sorted((r.stage, r.address) for r in self.engine.replicas.values()))

    async def refresh(self) -> None:
        """Tells the engine which stage replicas there are now."""
        found = await asyncio.wait_for(self.registry.replicas.remote(), timeout=5)
        self.engine.set_replicas([Replica(**replica) for replica in found])

    async def _refresh_forever(self, period_s: float = 0.5) -> None:
        known = None
        while True:
            try:
                await self.refresh()
                await asyncio.to_thread(self._tell_demand, self.engine.replica_load())
                now = sorted((r.stage, r.address, r.draining) for r in self.engine.replicas.values())
                if now != known:
                    logger.info("Ingress: stage replicas (stage, address, draining): %s", now)
                    known = now
            except Exception as exc:  # noqa: BLE001 - keep refreshing; steps fail on their own
                logger.warning("Ingress: cannot read the stage registry: %s", exc)
            await asyncio.sleep(period_s)

    def _tell_demand(self, replicas: list[dict]) -> None:
        """Tells each stage replica its demand, for its autoscaling metrics."""
        for replica in replicas:
            self.pipeline.notify(replica["address"], {"kind": "demand", "sequences": replica["sequences"],
                                                      "waiting": replica["waiting"]})

    async def find_stages(self) -> None:
        """Waits until every stage has a replica that takes sequences (one being replaced, say)."""
        deadline = time.monotonic() + self.recover_timeout_s
        while True:
            try:
                await self.refresh()
                if self.engine.available():
                    return
                problem = "a stage has no replica yet"
            except Exception as exc:  # noqa: BLE001 - a registry read can time out under load
                problem = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"stages unreachable for {self.recover_timeout_s:.0f} s: {problem}")
            logger.info("Ingress: waiting for the stages (%s)", problem)
            await asyncio.sleep(0.5)

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.model, metrics=self.metrics)
