"""The Serve deployment classes: plain classes, wrapped by the builder (`app.builder`).

`StageDeployment` holds one block range and serves it on the data plane; `Ingress` owns the
HTTP app, the tokenizer and the engine, and finds the stages' data-plane addresses through
ordinary Serve calls (`info`), again whenever a stage is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import torch

from app.api import create_app
from app.completions import ModelInfo
from app.engine import Engine, EngineConfig
from app.metrics import IngressMetrics, StageMetrics
from app.pipeline import PipelineClient
from app.stage_server import StageServer
from stages import Stage

logger = logging.getLogger("ray.serve")


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
        self.index = index
        self.stage = Stage(model_dir, start, end, dtype=dtype, device=device, num_slots=max_batch_size,
                           max_len=max_model_len, quantization=quantization)
        self.server = StageServer(self.stage, host=_node_ip(), num_threads=num_threads,
                                  parallel_min_tokens=parallel_min_tokens, metrics=StageMetrics(index))
        logger.info("Stage%d: %.1f MiB of weights loaded; data plane at %s", index,
                    self.stage.weight_bytes() / 2**20, self.server.address)

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

    def check_health(self) -> None:
        if not self.server.alive:
            raise RuntimeError("the stage's compute thread has stopped")

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
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
        from transformers import AutoConfig, AutoTokenizer

        self.stages = stages
        self.recover_timeout_s = recover_timeout_s
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.model = ModelInfo(name=served_name, tokenizer=tokenizer, vocab_size=config.vocab_size,
                               max_model_len=engine_config.max_model_len, eos_token_ids=eos_ids)
        self.pipeline = PipelineClient(host=_node_ip())
        self.metrics = IngressMetrics(served_name)
        self.engine = Engine(self.pipeline, engine_config, recover=self.find_stages, metrics=self.metrics)
        await self.find_stages()
        logger.info("Ingress: serving %s through %d stages: %s", served_name, len(stages), self.pipeline.route)

    async def find_stages(self) -> None:
        """Asks every stage (through Serve) where it listens; waits while one is being replaced."""
        deadline = time.monotonic() + self.recover_timeout_s
        while True:
            try:
                infos = await asyncio.wait_for(
                    asyncio.gather(*(stage.info.remote() for stage in self.stages)), timeout=5)
                self.pipeline.set_route([info["address"] for info in infos])
                return
            except Exception as exc:  # noqa: BLE001 - a replica being replaced fails in many ways
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stages unreachable for {self.recover_timeout_s:.0f} s: {exc}") from exc
                logger.warning("Ingress: waiting for the stages (%s)", exc)
                await asyncio.sleep(1.0)

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.model, metrics=self.metrics)
