"""Metrics end to end: `serve run` a 2-stage app, send a few requests, scrape Ray's Prometheus endpoint."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from fastapi.testclient import TestClient
from transformers import AutoConfig, AutoTokenizer

from app.api import create_app
from app.generation import ModelInfo
from app.engine import Engine, EngineConfig
from app.metrics import IngressMetrics, StageMetrics
from app.pipeline import PipelineClient
from app.stage_server import StageServer
from stages import Stage
from tests.local import replicas_of
from tests.serving import ServeRun, free_port
from tests.test_serve import stream_text

STAGE_LINE = r"Stage[01]: [\d.]+ steps/s, [\d.]+ tokens/s, [\d.]+ sequences per step, busy \d+%"
INGRESS_LINE = r"Ingress: \d+ requests done, prompt [\d.]+ tokens/s, generation [\d.]+ tokens/s"
SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def parse(text: str) -> list[tuple[str, dict, float]]:
    """Prometheus text format -> [(name, labels, value)] (comments dropped)."""
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples.append((name, dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or "")), float(value)))
    return samples


def total(samples, name: str, **labels) -> float | None:
    """Sum of the samples called `name` whose labels include `labels`; None if there is none."""
    values = [v for n, l, v in samples if n == name and all(l.get(k) == w for k, w in labels.items())]
    return sum(values) if values else None


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """Ray's Prometheus endpoint's samples ([] while it is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return parse(r.read().decode())
    except OSError:
        return []


def test_objects_outside_a_replica_record_nothing():
    # What the in-process app and unit tests get: no Ray metric is created, every call is a no-op.
    stage, ingress = StageMetrics(0), IngressMetrics("m")
    assert not stage.enabled and not ingress.enabled
    stage.observe_step(rows=2, tokens=2, seconds=0.01, queued=0)
    stage.step_failed()
    ingress.request_finished(200)
    ingress.set_sequences(1, 0)
    ingress.first_token(0.1)
    ingress.time_per_output_token(0.01)


class Recorder:
    """Stands in for StageMetrics / IngressMetrics: keeps every call."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))

    def of(self, name: str) -> list[tuple]:
        return [call[1:] for call in self.calls if call[0] == name]


def test_hooks_in_process(checkpoint):
    # The same hooks as in Serve, without Ray: what the stages, engine and app report, and when.
    model_dir = checkpoint("llama")
    config = EngineConfig(max_model_len=256)
    stage_metrics = [Recorder(), Recorder()]
    secret = b"the application's data-plane secret"
    servers = [StageServer(Stage(model_dir, start, end, num_blocks=64), secret,
                           metrics=m) for (start, end), m in zip([(0, 3), (3, 6)], stage_metrics)]
    pipeline = PipelineClient(secret)
    ingress = Recorder()
    engine = Engine(pipeline, config, len(servers), metrics=ingress)
    engine.set_replicas(replicas_of(servers, config.max_batch_size))
    hf_config = AutoConfig.from_pretrained(model_dir)
    info = ModelInfo(name="model", tokenizer=AutoTokenizer.from_pretrained(model_dir),
                     vocab_size=hf_config.vocab_size, max_model_len=256, eos_token_ids=(hf_config.eos_token_id,))
    body = {"model": "model", "prompt": "the quick brown fox", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    try:
        with TestClient(create_app(engine, info, metrics=ingress)) as client:
            assert client.post("/v1/completions", json=body).status_code == 200
            assert client.post("/v1/completions", json=dict(body, stream=True)).status_code == 200
            assert client.post("/v1/completions", json=dict(body, max_tokens=-1)).status_code == 400
            assert client.post("/v1/completions", json=dict(body, model="other")).status_code == 404
            chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}]}
            assert client.post("/v1/chat/completions", json=chat).status_code == 400  # no chat template
            assert client.get("/v1/models").status_code == 200  # not a completion: not counted
    finally:
        pipeline.close()
        for server in servers:
            server.close()

    assert sorted(ingress.of("request_finished")) == [(200, "completions"), (200, "completions"),
                                                      (400, "chat"), (400, "completions"), (404, "completions")]
    assert sum(n for n, in ingress.of("generated_tokens")) == 2 * 6
    num_prompt = sum(n for n, in ingress.of("prompt_tokens"))
    assert len(ingress.of("first_token")) == 2 and len(ingress.of("time_per_output_token")) == 2
    assert all(0 < s < 30 for s, in ingress.of("first_token") + ingress.of("time_per_output_token"))
    assert ingress.of("set_sequences")[-1] == (0, 0)
    # both prompts were looked up in the prefix cache; shorter than a block, neither was found
    assert sum(q for q, _ in ingress.of("prefix_cache")) == num_prompt
    assert sum(h for _, h in ingress.of("prefix_cache")) == 0
    assert max(r for r, _ in ingress.of("set_sequences")) == 1
    for metrics in stage_metrics:
        steps = metrics.of("observe_step")  # (rows, tokens, seconds, queued)
        assert len(steps) == 2 * 6  # 2 prefills and 5 decodes of each sequence, one at a time
        assert sum(rows for rows, _, _, _ in steps) == len(steps)
        assert sum(tokens for _, tokens, _, _ in steps) == num_prompt + 2 * 5
        assert all(seconds > 0 and queued >= 0 for _, _, seconds, queued in steps)


@pytest.fixture(scope="module")
def served(checkpoint):
    port = free_port()
    with ServeRun({"model": checkpoint("llama"), "num_stages": 2, "max_model_len": 256},
                  metrics_export_port=port) as server:
        yield server, port


def test_metrics_scraped_after_a_few_requests(served):
    server, port = served
    body = {"model": server.model, "prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    for _ in range(2):
        status, response = server.post("/v1/completions", body)
        assert status == 200, response
    text, chunks, _ = stream_text(server, body)
    assert chunks
    status, _ = server.post("/v1/completions", dict(body, max_tokens=-1))
    assert status == 400

    # Ray exports what replicas record every few seconds; the replicas log their activity every 10 s.
    deadline, samples = time.monotonic() + 90, []
    while time.monotonic() < deadline:
        samples = scrape(port)
        if (total(samples, "ray_stagewise_requests_total", status="200") == 3
                and total(samples, "ray_stagewise_requests_total", status="400") == 1
                and total(samples, "ray_stagewise_time_per_output_token_seconds_count") == 3
                # each replica exports on its own: wait for both stages' last steps too
                and all(total(samples, "ray_stagewise_stage_sequences_total", stage=stage) == 3 * 8
                        for stage in ("0", "1"))
                and re.search(STAGE_LINE, server.log()) and re.search(INGRESS_LINE, server.log())):
            break
        time.sleep(2)
    names = sorted({n for n, _, _ in samples if "stagewise" in n})
    assert total(samples, "ray_stagewise_requests_total", status="200") == 3, names
    assert total(samples, "ray_stagewise_requests_total", status="400") == 1
    assert {l.get("model") for n, l, _ in samples if n == "ray_stagewise_requests_total"} == {server.model}

    prompt_tokens = total(samples, "ray_stagewise_prompt_tokens_total")
    assert prompt_tokens % 3 == 0 and prompt_tokens >= 3  # the same prompt, 3 times
    assert total(samples, "ray_stagewise_generation_tokens_total") == 3 * 8
    assert total(samples, "ray_stagewise_prefix_cache_queries_total") == prompt_tokens
    for stage in ("0", "1"):
        # Each sequence: one prefill, then 7 decodes (the 8th token is sampled, never fed back);
        # sequences may share steps, so there are 8 to 24 steps of 1 to 3 sequences.
        steps = total(samples, "ray_stagewise_stage_forward_seconds_count", stage=stage)
        assert 8 <= steps <= 24, (stage, steps)
        assert 1 <= total(samples, "ray_stagewise_stage_forward_seconds_count", stage=stage, kind="prefill") <= 3
        assert 7 <= total(samples, "ray_stagewise_stage_forward_seconds_count", stage=stage, kind="decode") <= 21
        assert total(samples, "ray_stagewise_stage_batch_size_count", stage=stage) == steps
        assert total(samples, "ray_stagewise_stage_sequences_total", stage=stage) == 3 * 8
        assert total(samples, "ray_stagewise_stage_tokens_total", stage=stage) == prompt_tokens + 3 * 7
        assert 0 < total(samples, "ray_stagewise_stage_busy_seconds_total", stage=stage) < 30
        assert total(samples, "ray_stagewise_stage_queue_depth", stage=stage) == 0
    # Serve's own tags come with ours: which deployment and replica recorded what.
    deployments = {l.get("deployment") for n, l, _ in samples if n == "ray_stagewise_stage_tokens_total"}
    assert deployments == {"Stage0", "Stage1"}

    # Histogram sums are Ray's estimates from bucket midpoints: only their counts are exact.
    assert total(samples, "ray_stagewise_time_to_first_token_seconds_count") == 3
    assert 0 < total(samples, "ray_stagewise_time_to_first_token_seconds_sum") < 30
    assert total(samples, "ray_stagewise_time_per_output_token_seconds_count") == 3
    assert 0 < total(samples, "ray_stagewise_time_per_output_token_seconds_sum") < 30
    # Nothing runs or waits once every request is answered.
    assert total(samples, "ray_stagewise_running_sequences") == 0
    assert total(samples, "ray_stagewise_waiting_sequences") == 0

    # What the replicas log while they serve (Ray forwards replicas' logs to `serve run` with a delay).
    log = server.log()
    assert re.search(STAGE_LINE, log) and re.search(INGRESS_LINE, log), log[-3000:]
