"""The stage server's compute thread: its priority on the host (`stage_nice`)."""

from __future__ import annotations

import logging
import os
import time

from app import stage_server
from app.stage_server import StageServer


def nice_of(server: StageServer, wait_s: float = 5.0) -> int:
    """The compute thread's nice value, once it has had time to set it."""
    tid, began = server._worker.native_id, time.monotonic()
    while os.getpriority(os.PRIO_PROCESS, tid) == os.getpriority(os.PRIO_PROCESS, 0) and \
            time.monotonic() - began < wait_s:
        time.sleep(0.01)
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_the_compute_thread_runs_at_the_stage_s_nice_value_and_the_rest_of_the_process_does_not():
    own = os.getpriority(os.PRIO_PROCESS, 0)
    server = StageServer(None, b"secret", nice=min(own + 3, 19))
    try:
        assert nice_of(server) == min(own + 3, 19)
        assert os.getpriority(os.PRIO_PROCESS, 0) == own
    finally:
        server.close()


def test_a_nice_value_the_host_refuses_leaves_the_stage_computing_and_says_so(monkeypatch, caplog):
    def refuse(which, who, value):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(stage_server.os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger="app.stage_server"):
        server = StageServer(None, b"secret", nice=-10)
        try:
            began = time.monotonic()
            while "nice value" not in caplog.text and time.monotonic() - began < 5:
                time.sleep(0.01)
            assert server.alive
        finally:
            server.close()
    assert "cannot set the compute thread's nice value to -10" in caplog.text
