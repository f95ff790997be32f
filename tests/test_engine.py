"""The engine's step loop with a stand-in pipeline: when steps go out and tokens reach streams."""

from __future__ import annotations

import asyncio

import torch

from app import wire
from app.engine import Engine
from app.sampling import SamplingParams
from app.sequence import EngineConfig, Replica, Sequence
from stages.sampler import Sampled


class Pipeline:
    """Answers each row of a step with the token 7 after 10 ms, logging each step as it is sent."""

    def __init__(self, log: list):
        self.log, self.sent = log, 0

    def watch(self, address, on_gone=None):
        pass

    async def step(self, route, inputs, tables, starts, num_new, **kwargs):
        self.sent += 1
        self.log.append(("step", self.sent))
        await asyncio.sleep(0.01)
        rows = len(starts)
        return wire.Result(self.sent, None, Sampled(torch.full((rows,), 7), torch.full((rows,), float("nan")),
                                                    torch.zeros(0, dtype=torch.long), torch.zeros(0)))


def test_a_step_s_tokens_reach_the_streams_once_the_next_step_is_sent():
    """Delivering a token to its stream is work on the ingress's event loop (detokenizing, the
    chunk sent to the client): it runs once the next step has gone, not before it, where every
    step would wait for it."""
    log: list = []

    async def generate():
        engine = Engine(Pipeline(log), EngineConfig(max_batch_size=2, max_model_len=64), num_stages=1)
        engine.set_replicas([Replica("a", 0, "127.0.0.1:1", 2, num_blocks=16, block_size=16)])
        events: asyncio.Queue = asyncio.Queue()
        seq = Sequence([1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0), events)
        engine.add(seq)
        while True:
            kind, _, _ = await asyncio.wait_for(events.get(), 10)
            log.append((kind, len(seq.output_ids)))
            if kind == "finished":
                return seq.output_ids

    assert asyncio.run(generate()) == [7] * 5
    tokens = [i for i, (kind, _) in enumerate(log) if kind == "token"]
    assert len(tokens) == 5 and log[-1][0] == "finished"
    for n, at in enumerate(tokens[:-1], start=1):  # the last token ends the sequence: no step follows it
        assert sum(kind == "step" for kind, _ in log[:at]) == n + 1, log
