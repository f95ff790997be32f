"""The engine's step loop with a stand-in pipeline: when steps go out and tokens reach streams."""

from __future__ import annotations

import asyncio

import torch

from app import wire
from app.engine import Engine
from app.pipeline import StepFailed
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


class FailingChunk(Pipeline):
    """Fails the first step that carries a prompt's first chunk of 5 tokens, after 30 ms; answers
    the others after 20 ms with token 100 + their number. Keeps each step's (start, tokens) rows
    and how many steps were in flight at most."""

    def __init__(self):
        super().__init__([])
        self.rows, self.busy, self.overlapped, self.failed = [], 0, 0, None

    async def step(self, route, inputs, tables, starts, num_new, **kwargs):
        self.sent += 1
        number, rows = self.sent, list(zip(starts, num_new))
        self.rows.append(rows)
        self.busy += 1
        self.overlapped = max(self.overlapped, self.busy)
        fail = (0, 5) in rows and self.failed is None
        try:
            await asyncio.sleep(0.03 if fail else 0.02)
            if fail:
                self.failed = number
                raise StepFailed("the first stage failed")
        finally:
            self.busy -= 1
        return wire.Result(number, None, Sampled(torch.full((len(rows),), 100 + number),
                                                 torch.full((len(rows),), float("nan")),
                                                 torch.zeros(0, dtype=torch.long), torch.zeros(0)))


def test_a_chunk_whose_chunk_before_failed_is_not_taken_as_computed():
    """Beside a decoding sequence, a prompt's two chunks go down a 2-stage pipeline one after the
    other; the first fails. The second's result (here its last: a sampled token) was computed
    without the first's cache: it is dropped, and the prompt is replayed before its first token."""
    pipeline = FailingChunk()

    async def generate():
        engine = Engine(pipeline, EngineConfig(max_batch_size=2, max_model_len=64, max_num_batched_tokens=5),
                        num_stages=2)
        engine.set_replicas([Replica("a", 0, "127.0.0.1:1", 2, num_blocks=16, block_size=4),
                             Replica("b", 1, "127.0.0.1:2", 2, num_blocks=16, block_size=4)])
        decoding, long = (Sequence(prompt, SamplingParams(max_tokens=n, temperature=0.0), asyncio.Queue())
                          for prompt, n in (([1, 2], 30), (list(range(1, 9)), 2)))
        engine.add(decoding)
        await asyncio.wait_for(decoding.events.get(), 10)  # its first token: it decodes
        engine.add(long)
        while (await asyncio.wait_for(long.events.get(), 10))[0] != "finished":
            pass
        return long.output_ids

    output = asyncio.run(generate())
    failed = pipeline.failed
    assert (5, 3) in pipeline.rows[failed] and pipeline.overlapped == 2  # the next chunk was on its way
    assert (0, 5) in sum(pipeline.rows[failed + 1:], [])  # replayed from the start
    assert output[0] != 100 + failed + 1  # not the token of the chunk that followed the failed one
