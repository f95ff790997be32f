"""The stage server's compute thread: its priority on the host while it computes (`stage_nice`)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

from app import stage_server, wire
from app.stage_server import StageServer


class NiceRecorder:
    """A stand-in stage that records the nice value each step ran at, and of the threads each started."""

    def __init__(self):
        self.seen: list[tuple[int, int, int]] = []  # (tokens, the compute thread's, a thread it starts)
        self.done = threading.Event()

    def __call__(self, inputs, tables, starts, num_new, **_):
        started = []
        thread = threading.Thread(target=lambda: started.append(os.getpriority(os.PRIO_PROCESS, 0)))
        thread.start()
        thread.join()
        self.seen.append((sum(num_new), os.getpriority(os.PRIO_PROCESS, 0), started[0]))
        self.done.set()
        return torch.zeros(1, 4)


def run_steps(server: StageServer, stage: NiceRecorder, tokens: list[int]) -> None:
    for i, n in enumerate(tokens):  # straight to the compute thread: the data plane's checks are not at issue
        stage.done.clear()
        step = wire.Step(i, ("127.0.0.1:9",), (((0,),),), (0,), (n,), False, torch.zeros(1, n, dtype=torch.long))
        server._inbox.put((step, None, time.monotonic()))
        assert stage.done.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="going back to a lower nice value after a prefill needs CAP_SYS_NICE")
def test_a_large_step_and_the_threads_it_starts_run_at_the_stage_s_nice_value_a_decode_step_at_its_own():
    own = os.getpriority(os.PRIO_PROCESS, 0)
    stage = NiceRecorder()
    server = StageServer(stage, b"secret", parallel_min_tokens=8, nice=min(own + 3, 19))
    try:
        run_steps(server, stage, [1, 64, 1, 8, 7])
    finally:
        server.close()
    high = min(own + 3, 19)
    assert stage.seen == [(1, own, own), (64, high, high), (1, own, own), (8, high, high), (7, own, own)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == own


def test_a_nice_value_the_host_refuses_leaves_the_stage_computing_at_its_own_and_says_so_once(monkeypatch, caplog):
    def refuse(which, who, value):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(stage_server.os, "setpriority", refuse)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    stage = NiceRecorder()
    with caplog.at_level(logging.WARNING, logger="app.stage_server"):
        server = StageServer(stage, b"secret", parallel_min_tokens=8, nice=-10)
        try:
            run_steps(server, stage, [64, 1, 64])
            assert server.alive
        finally:
            server.close()
    assert [nice for _, nice, _ in stage.seen] == [own] * 3
    assert caplog.text.count("cannot set the compute thread's nice value to -10") == 1
