"""Several replicas of a stage, in-process: sticky routes, spreading, draining and removal by replay."""

from __future__ import annotations

import asyncio

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from app.engine import Engine, EngineConfig, Replica, Sequence
from app.pipeline import PipelineClient
from app.sampling import SamplingParams
from app.stage_server import StageServer
from stages import Stage

PROMPTS = [[5, 17, 99, 3], [42, 8], [7, 7, 7, 100, 250, 31], [1, 2, 3, 4, 5], [300, 12, 9], [66, 77]]
MAX_TOKENS = 24


def reference(model_dir: str) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    for ids in PROMPTS:
        generated = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                   min_new_tokens=MAX_TOKENS)
        out.append(generated[0, len(ids):].tolist())
    return out


SECRET = b"the application's data-plane secret"


class Cluster:
    """Stage 0 with one replica, stage 1 with two, each a stage server in this process."""

    def __init__(self, model_dir: str, num_slots: int = 4):
        self.num_slots = num_slots
        self.secret = SECRET
        self.servers = {
            "a": StageServer(Stage(model_dir, 0, 3, num_blocks=num_slots * 8), SECRET),
            "b1": StageServer(Stage(model_dir, 3, 6, num_blocks=num_slots * 8), SECRET),
            "b2": StageServer(Stage(model_dir, 3, 6, num_blocks=num_slots * 8), SECRET),
        }
        self.draining: set[str] = set()
        self.present = set(self.servers)

    def replicas(self) -> list[Replica]:
        return [Replica(rid, 0 if rid == "a" else 1, self.servers[rid].address, self.num_slots,
                        draining=rid in self.draining, num_blocks=self.num_slots * 8, block_size=16)
                for rid in sorted(self.present)]

    def close(self):
        for server in self.servers.values():
            server.close()


async def generate(engine: Engine, eos: int, on_token=None) -> tuple[list[list[int]], list[Sequence]]:
    queue: asyncio.Queue = asyncio.Queue()
    # EOS masked until the last token, as generate(min_new_tokens=...) does
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, min_tokens=MAX_TOKENS, stop_token_ids=(eos,))
    seqs = [Sequence(list(ids), params, queue, index=i) for i, ids in enumerate(PROMPTS)]
    for seq in seqs:
        engine.add(seq)
    finished = 0
    while finished < len(seqs):
        kind, seq, _ = await asyncio.wait_for(queue.get(), timeout=60)
        assert kind in ("token", "finished"), kind
        if kind == "finished":
            finished += 1
        elif on_token is not None:
            on_token(seq)
    return [seq.output_ids for seq in seqs], seqs


def run(model_dir: str, cluster: Cluster, pipeline: PipelineClient, engine: Engine, on_token):
    """Generates every prompt through `engine`, then closes the pipeline and the stage servers."""
    try:
        return asyncio.run(generate(engine, AutoConfig.from_pretrained(model_dir).eos_token_id, on_token))
    finally:
        pipeline.close()
        cluster.close()


def test_routes_spread_stick_and_drain(checkpoint):
    model_dir = checkpoint("llama")
    expected = reference(model_dir)
    cluster = Cluster(model_dir)
    pipeline = PipelineClient(SECRET)
    drained = []
    engine = Engine(pipeline, EngineConfig(max_batch_size=4, max_model_len=128), num_stages=2,
                    on_drained=lambda replica: (drained.append(replica.id), pipeline.release(replica.address)))
    engine.set_replicas(cluster.replicas())
    routes: dict[int, list] = {}  # each sequence's routes, in the order seen

    def on_token(seq):
        if seq.route is not None and seq.route not in routes.setdefault(seq.index, []):
            routes[seq.index].append(seq.route)
        if len(seq.output_ids) == 8 and seq.route is not None and seq.route[1] == "b1" \
                and "b1" not in cluster.draining:
            cluster.draining.add("b1")  # scale-down of b1 while its sequences are mid-stream
            engine.set_replicas(cluster.replicas())

    outputs, seqs = run(model_dir, cluster, pipeline, engine, on_token)
    assert outputs == expected
    # New sequences were spread over both replicas of stage 1 (4 slots each, 6 sequences).
    assert {seen[0][1] for seen in routes.values()} == {"b1", "b2"}
    # Sticky: a sequence changed route only when b1 drained, and then onto b2.
    for seen in routes.values():
        assert seen in ([("a", "b1")], [("a", "b2")], [("a", "b1"), ("a", "b2")])
    assert engine.stats["moved"] >= 1 and drained == ["b1"]
    assert cluster.servers["b1"].released.is_set()
    assert engine.num_running == 0


def test_a_replica_that_disappears_loses_no_token(checkpoint):
    model_dir = checkpoint("llama")
    expected = reference(model_dir)
    cluster = Cluster(model_dir, num_slots=6)
    pipeline = PipelineClient(SECRET)
    engine = Engine(pipeline, EngineConfig(max_batch_size=6, max_model_len=128), num_stages=2)
    engine.set_replicas(cluster.replicas())
    removed = []

    def on_token(seq):
        if len(seq.output_ids) == 10 and not removed:
            removed.append(seq.route[1])
            cluster.present.discard(seq.route[1])  # gone from the registry
            engine.set_replicas(cluster.replicas())

    outputs, seqs = run(model_dir, cluster, pipeline, engine, on_token)
    assert outputs == expected
    assert engine.stats["moved"] >= 1 and all(seq.route is None for seq in seqs)
    assert removed[0] not in engine.pool.free  # forgotten once nothing held a slot there
