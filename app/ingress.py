"""The ingress's Serve deployment: a plain class, wrapped by the builder (`app.builder`).

`Ingress` owns the HTTP app, the tokenizer and the engine (an encoder's embedder); it finds the
stage replicas (`app.deployments.StageDeployment`) through its registry (`app.registry`), again
whenever one is added, replaced or drained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from app import wire
from app.api import create_app
from app.deployments import _node_ip
from app.embeddings import Embedder
from app.engine import Engine, EngineConfig, Replica
from app.generation import ModelInfo
from app.health import stage_report, unavailable_reason
from app.metrics import IngressMetrics
from app.pipeline import PipelineClient
from app.registry import Registry, registry_name
from app.rehome import Placed, Rehomer
from app.weights import WeightServer, weights_name
from stages.encoder import is_encoder

logger = logging.getLogger("ray.serve")


class Ingress:
    """The HTTP ingress: OpenAI API, tokenizer, scheduler; drives the stages over the data plane.

    Args:
        stages: handles of the stage deployments, in pipeline order.
        model_dir: checkpoint directory (for the tokenizer and config).
        served_name: the model id clients ask for.
        engine_config: scheduler limits.
        recover_timeout_s: how long to wait for a replaced stage before failing its sequences.
        api_keys: keys clients must send (none: no authentication); see `app.api.RequireApiKey`.
        limits: what a data-plane message may be (`app.wire.Limits`).
        placed: the planned stages (`app.rehome.Placed`), to move when their node is gone for good;
            None: the stages are not pinned (Ray re-places them itself).
        node_grace_period_s: how long a planned stage's node may be gone before the stage moves.
        reserve_fraction: the share of a node's memory the planner keeps free.
        lora_modules: the LoRA adapters the stages hold, name -> directory, in their order.
    """

    async def __init__(self, stages: list, model_dir: str, served_name: str, engine_config: EngineConfig,
                       recover_timeout_s: float = 120.0, api_keys: tuple[str, ...] = (),
                       limits: wire.Limits = wire.Limits(), placed: list[Placed] | None = None,
                       node_grace_period_s: float = 30.0, reserve_fraction: float = 0.05,
                       lora_modules: dict[str, str] | None = None):
        from ray import serve
        from transformers import AutoConfig, AutoTokenizer

        self.num_stages = len(stages)
        self.recover_timeout_s = recover_timeout_s
        self.api_keys = tuple(api_keys)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.model = ModelInfo(name=served_name, tokenizer=tokenizer, vocab_size=config.vocab_size,
                               max_model_len=engine_config.max_model_len, eos_token_ids=eos_ids,
                               task="embed" if is_encoder(config) else "generate", adapters=dict(lora_modules or {}))
        self.app_name = serve.get_replica_context().app_name
        self.metrics = IngressMetrics(served_name)
        # The data plane's secret: made here, handed to the stages only through the registry (Ray).
        self.pipeline = PipelineClient(os.urandom(32), host=_node_ip(), limits=limits, on_refused=self.metrics.refused)
        self.registry = self._make_registry()
        # Stages on nodes without the checkpoint fetch their tensors from this node.
        self.weights = self._on_this_node(WeightServer, weights_name(self.app_name)).remote(model_dir)
        self.engine = Engine(self.pipeline, engine_config, len(stages), recover=self.find_stages,
                             on_drained=lambda replica: self.pipeline.release(replica.address),
                             metrics=self.metrics)
        # an encoder's texts go through the same replicas, found and recovered the same way
        self.embedder = Embedder(lambda: self.engine.replicas.values(), len(stages), self.pipeline,
                                 engine_config.max_batch_size,
                                 engine_config.max_num_batched_tokens, engine_config.step_timeout_s,
                                 engine_config.max_step_failures, recover=self.find_stages) \
            if self.model.task == "embed" else None
        self._app = None  # the ASGI app, built once for HTTP and `request` alike
        self.announced: list[dict] = []  # what the stage replicas said last, loading or failed ones too
        self.rehomer = (Rehomer(self.app_name, placed, node_grace_period_s, reserve_fraction)
                        if placed else None)
        # Ready at once, without waiting for the stages: /health and the 503s say what they do.
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
        logger.info("Ingress: %s through %d stages; waiting for them to load", served_name, len(stages))

    @staticmethod
    def _on_this_node(cls, name: str):
        """A named actor class owned by this replica (it dies with it, and the next ingress makes a
        new one) and on this replica's node, so that no other node's loss takes it away."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return ray.remote(cls).options(name=name, num_cpus=0, get_if_exists=True, scheduling_strategy=here)

    def _make_registry(self):
        return self._on_this_node(Registry, registry_name(self.app_name)).remote(self.pipeline.secret,
                                                                                self.pipeline.reply_address)

    async def refresh(self) -> None:
        """Tells the engine which stage replicas serve now (those loaded and not seen to die)."""
        import ray

        try:
            found = await asyncio.wait_for(self.registry.replicas.remote(), timeout=5)
        except ray.exceptions.ActorDiedError:
            self.registry = self._make_registry()  # the stages announce themselves to it within a second
            raise
        self.announced = [r for r in found if not self.engine.gone(r["id"])]
        self.engine.set_replicas([Replica(r["id"], r["stage"], r["address"], r["num_slots"], r["draining"],
                                          r["num_blocks"], r["block_size"])
                                  for r in self.announced if r.get("state") == "ready"])

    async def _refresh_forever(self, period_s: float = 0.5) -> None:
        known, ready_once = None, False
        while True:
            try:
                await self.refresh()
                load = self.engine.replica_load()
                self.metrics.set_blocks(load)
                await asyncio.to_thread(self._tell_demand, load)
                report = stage_report(self.num_stages, self.announced, problems=self.problems())
                if self.rehomer is not None:
                    await asyncio.to_thread(self.rehomer.check, report)
                now = [(s["name"], s["state"], s["node"], s["error"]) for s in report]
                if now != known:
                    logger.info("Ingress: stages %s", "; ".join(
                        f"{name} {'failed to load' if state == 'failed' else state}" + (f" on {node}" if node else "")
                        + (f": {error}" if error else "") for name, state, node, error in now))
                    known = now
                if not ready_once and unavailable_reason(report) is None:
                    ready_once = True
                    self._say_ready()
            except Exception as exc:  # noqa: BLE001 - keep refreshing; steps fail on their own
                logger.warning("Ingress: cannot read the stage registry: %s", exc)
            await asyncio.sleep(period_s)

    def _say_ready(self) -> None:
        """The line a user waits for: the application answers, with what, where."""
        where = ", ".join(f"Stage{r['stage']} blocks [{r['start']}, {r['end']}) on {r['node']}"
                          for r in sorted(self.announced, key=lambda r: (r["stage"], r["id"]))
                          if r.get("state") == "ready")
        url = ""
        try:
            from ray.serve.context import _get_global_client  # the root URL is not in a public API

            url = f" at {_get_global_client().root_url.rstrip('/')}/v1"
        except Exception:  # noqa: BLE001 - the line is still useful without the URL
            pass
        logger.info("stagewise: %s is ready%s (%s)", self.model.name, url, where)

    def _tell_demand(self, replicas: list[dict]) -> None:
        """Tells each stage replica its demand, for its autoscaling metrics."""
        for replica in replicas:
            self.pipeline.notify(replica["address"], wire.Demand(replica["sequences"], replica["waiting"]))

    async def find_stages(self) -> None:
        """Waits until every stage has a replica that takes sequences (one being replaced, say)."""
        deadline, said = time.monotonic() + self.recover_timeout_s, None
        while True:
            try:
                await self.refresh()
                if self.engine.available():
                    return
                problem = (unavailable_reason(stage_report(self.num_stages, self.announced, problems=self.problems()))
                           or "a stage has no replica that takes sequences")
            except Exception as exc:  # noqa: BLE001 - a registry read can time out under load
                problem = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"stages unreachable for {self.recover_timeout_s:.0f} s: {problem}")
            if problem != said:
                logger.info("Ingress: waiting for the stages (%s)", problem)
                said = problem
            await asyncio.sleep(0.5)

    def problems(self) -> dict[str, str]:
        """Stages that cannot come back, and why (their node is gone for good and none other has room)."""
        if self.rehomer is None:
            return {}
        return {name: problem for name in self.rehomer.stages if (problem := self.rehomer.problem(name))}

    def check_health(self) -> None:
        """Serve's health check: fails only when the engine loop keeps failing. Never because a stage
        is missing: this replica holds the token history that replaying a stage needs."""
        if not self.engine.alive:
            raise RuntimeError(f"the engine loop failed {self.engine.restarts} times, too often to go on")

    def __serve_build_asgi_app__(self):
        if self._app is None:
            self._app = create_app(self.engine, self.model, metrics=self.metrics, announced=lambda: self.announced,
                                   problems=self.problems, api_keys=self.api_keys, embedder=self.embedder)
        return self._app

    async def ready(self) -> bool:
        """Whether every stage has a replica that takes sequences (for `app.batch`)."""
        return self.engine.available()

    async def request(self, path: str, body: dict) -> tuple[int, dict]:
        """One request through this replica's own app, in this process, as an HTTP request would
        go (validation, errors, answers): its status and JSON body. For callers holding a Serve
        deployment handle (`app.batch`); `model` defaults to the served one."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_keys[0]}"} if self.api_keys else {}
        transport = httpx.ASGITransport(app=self.__serve_build_asgi_app__())
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=None) as client:
            r = await client.post(path, json={"model": self.model.name, **body}, headers=headers)
        return r.status_code, r.json()
