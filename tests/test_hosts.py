"""Separate hosts (network and mount namespaces, see tests/hosts.py): placement by memory, a host
that restarts under its name, a standby replica on another host (issue 14)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml
from transformers import AutoTokenizer

from tests import hosts as hosts_module
from tests.checkpoints import build_llama_125m, corpus
from tests.reference import greedy_text
from tests.serving import post_json, wait_for

MIB = 2**20
PORT = 8000
# Ray notices a dead node in ~3 s, not ~30 s (the README says the same for real clusters).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                   "RAY_health_check_timeout_ms": "1000"}


def require_hosts() -> None:
    reason = hosts_module.available()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"separate-host tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def llama_125m():
    return build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))


class Served:
    """`serve run` inside the head host, HTTP on the head's bridge address."""

    def __init__(self, hosts: hosts_module.Hosts, args: dict, deployments: list[dict] | None = None):
        self.hosts = hosts
        self.url = f"http://{hosts.head.ip}:{PORT}"
        config = {"proxy_location": "HeadOnly", "http_options": {"host": "0.0.0.0", "port": PORT},
                  "applications": [{"name": "stagewise", "route_prefix": "/", "import_path": "app:build_app",
                                    "args": args, **({"deployments": deployments} if deployments else {})}]}
        self.config_path = os.path.join(hosts.dir, "serve_config.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.log_path = os.path.join(hosts.dir, "serve.log")

    def __enter__(self) -> "Served":
        self.log = open(self.log_path, "w")
        self.proc = self.hosts.popen(["python", "-m", "ray.serve.scripts", "run", self.config_path],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, open(self.log_path).read()[-4000:]
            if self.health(timeout=5)[0] == 200:
                self.model = self.get("/v1/models")["data"][0]["id"]
                return self
            time.sleep(0.5)
        raise TimeoutError(f"not healthy: {self.health()}\n{open(self.log_path).read()[-4000:]}")

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def get(self, path: str, timeout: float = 30) -> dict:
        return self.health(path, timeout)[1]

    def health(self, path: str = "/health", timeout: float = 30) -> tuple[int, dict | None]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, (json.load(e) if e.code == 503 else None)
        except OSError:
            return 0, None

    def health_post(self, body: dict, timeout: float = 60) -> tuple[int, dict]:
        """(status, body) of a completion, errors included."""
        return post_json(self.url + "/v1/completions", body, timeout)

    def post(self, body: dict, timeout: float = 300) -> dict:
        request = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.load(r)


class Streams:
    """Greedy streams in threads, recording each token's arrival time."""

    def __init__(self, served: Served, prompts: list[list[int]], max_tokens: int):
        self.texts = [""] * len(prompts)
        self.times: list[list[float]] = [[] for _ in prompts]
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(served, i, ids, max_tokens), daemon=True)
                        for i, ids in enumerate(prompts)]
        for thread in self.threads:
            thread.start()

    def _run(self, served: Served, i: int, ids: list[int], max_tokens: int) -> None:
        body = {"model": served.model, "prompt": ids, "max_tokens": max_tokens, "min_tokens": max_tokens,
                "temperature": 0, "stream": True}
        request = urllib.request.Request(served.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                for line in r:
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.errors.append(str(chunk["error"]))
                        return
                    self.texts[i] += chunk["choices"][0]["text"]
                    self.times[i].append(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(exc))

    def tokens_so_far(self) -> int:
        return sum(len(t) for t in self.times)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(600)

    def longest_stall(self) -> float:
        return max(max(b - a for a, b in zip(t, t[1:])) for t in self.times if len(t) > 1)


def prompts_of(model_dir: str, num: int) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(line).input_ids[:24] for line in corpus(num, seed=14)]


def differences(texts: list[str], expected: list[str]) -> list[str]:
    """Where each stream's text first differs from the expected one (tokens are `<...>` here)."""
    out = []
    for i, (text, want) in enumerate(zip(texts, expected)):
        if text != want:
            at = next((k for k, (a, b) in enumerate(zip(text, want)) if a != b), min(len(text), len(want)))
            out.append(f"stream {i}: {len(text)} vs {len(want)} characters, first difference at {at}: "
                       f"{text[max(0, at - 40):at + 40]!r} vs {want[max(0, at - 40):at + 40]!r}")
    return out


def half_model_memory(model_dir: str, args: dict) -> int:
    """A host's memory that holds half of the model as one stage (weights, KV pool and working
    memory, as the planner counts them for `args`) but not the whole model."""
    from app.builder import BuilderArgs, pool_tokens, step_tokens
    from placement import ModelSpec, split_even

    builder = BuilderArgs(**{k: v for k, v in args.items() if k != "model"})
    spec = ModelSpec.from_model_dir(model_dir, dtype=builder.dtype).with_step_tokens(step_tokens(builder))
    kv_tokens = pool_tokens(builder)
    half = max(spec.stage_bytes(start, end, kv_tokens) for start, end in split_even(spec, 2))
    memory = int(half / 0.95) + 8 * MIB  # the planner keeps 5% of a host free
    assert memory * 0.95 < spec.stage_bytes(0, spec.num_layers, kv_tokens), "the whole model would fit"
    return memory


def two_small_hosts(memory_bytes: int, env: dict | None = None) -> hosts_module.Hosts:
    """Host a (head) and host b, each declared with `memory_bytes` (see `half_model_memory`)."""
    hosts = hosts_module.Hosts(env={**FAST_NODE_DEATH, **(env or {})}).__enter__()
    try:
        hosts.add("a", memory_bytes=memory_bytes, num_cpus=2, head=True)
        hosts.add("b", memory_bytes=memory_bytes, num_cpus=2)
    except BaseException:
        hosts.__exit__(None, None, None)
        raise
    return hosts


@pytest.mark.slow  # 90 s; the default suite keeps its 20 minutes
def test_auto_splits_a_model_no_host_holds_and_survives_a_host_restart(llama_125m):
    """num_stages auto over two hosts, greedy as transformers; then host b is SIGKILLed mid-generation
    and back 5 s later: the streams finish as an undisturbed run of them does, token for token."""
    require_hosts()
    prompts = prompts_of(llama_125m, 4)
    expected = greedy_text(llama_125m, prompts[0], 160)
    args = {"model": llama_125m, "num_stages": "auto", "max_model_len": 512, "max_batch_size": 8,
            "plan_kv_tokens": 2048, "stage_autoscaling": None}
    hosts = two_small_hosts(half_model_memory(llama_125m, args))
    try:
        with Served(hosts, args) as served:
            health = served.get("/health")
            assert [(s["name"], s["node"]) for s in health["stages"]] == [("Stage0", "a"), ("Stage1", "b")] or \
                [(s["name"], s["node"]) for s in health["stages"]] == [("Stage0", "b"), ("Stage1", "a")], health
            b_stage = next(s["name"] for s in health["stages"] if s["node"] == "b")
            plain = served.post({"model": served.model, "prompt": prompts[0], "max_tokens": 160,
                                 "min_tokens": 160, "temperature": 0})
            assert plain["choices"][0]["text"] == expected
            streamed = Streams(served, prompts[:1], 160)
            streamed.join()
            assert streamed.texts == [expected] and not streamed.errors
            undisturbed = Streams(served, prompts, 160)
            undisturbed.join()
            assert not undisturbed.errors, undisturbed.errors

            streams = Streams(served, prompts, 160)
            wait_for(lambda: streams.tokens_so_far() >= 4 * 20, timeout=120, period=0.2)
            hosts.kill("b")
            killed = time.monotonic()
            time.sleep(5)
            hosts.start("b")
            back = time.monotonic()
            streams.join()
            served_again = wait_for(lambda: served.health(timeout=5)[0] == 200, timeout=60, period=0.2)
            assert not streams.errors, streams.errors
            assert streams.texts == undisturbed.texts, differences(streams.texts, undisturbed.texts)
            stall = streams.longest_stall()
            print(f"\n{b_stage} on host b: killed, back {back - killed:.0f} s later; streams finished "
                  f"token-identical; longest stall {stall:.1f} s ({stall - (back - killed):.1f} s after the "
                  f"host was back); healthy {served_again:.0f} s after the streams ended")
            assert stall - (back - killed) < 60
    finally:
        hosts.__exit__(None, None, None)


@pytest.mark.slow  # 90 s; the default suite keeps its 20 minutes (one replica moving its streams is
# in the default suite in one process, `test_replicas`, and on one host, `test_failover`)
def test_a_standby_replica_on_another_host_takes_over_at_once(llama_125m):
    """Stage1 has a replica on each host; one is SIGKILLed mid-stream; its streams move to the other."""
    require_hosts()
    prompts = prompts_of(llama_125m, 4)
    hosts = hosts_module.Hosts(env=FAST_NODE_DEATH).__enter__()
    try:
        hosts.add("a", memory_bytes=2048 * MIB, num_cpus=2, head=True)
        hosts.add("b", memory_bytes=2048 * MIB, num_cpus=2)
        standby = {"name": "Stage1", "max_replicas_per_node": 1, "autoscaling_config": {
            "min_replicas": 2, "max_replicas": 2, "policy": {"policy_function": "app.autoscaling:StagePolicy"}}}
        with Served(hosts, {"model": llama_125m, "num_stages": 2, "max_model_len": 512, "max_batch_size": 8},
                    deployments=[standby]) as served:
            wait_for(lambda: [len(s["replicas"]) for s in served.get("/health")["stages"]] == [1, 2], 120, 1)
            nodes = sorted(r["node"] for r in served.get("/health")["stages"][1]["replicas"])
            assert nodes == ["a", "b"], nodes
            undisturbed = Streams(served, prompts, 120)
            undisturbed.join()
            streams = Streams(served, prompts, 120)
            wait_for(lambda: streams.tokens_so_far() >= 4 * 20, timeout=120, period=0.2)
            victim = [pid for pid in hosts.pids("b") if b"ServeReplica:stagewise:Stage1" in
                      open(f"/proc/{pid}/cmdline", "rb").read()]
            assert len(victim) == 1
            os.kill(victim[0], signal.SIGKILL)
            streams.join()
            assert not streams.errors and not undisturbed.errors, streams.errors + undisturbed.errors
            assert streams.texts == undisturbed.texts
            stall = streams.longest_stall()
            print(f"\nStage1's replica on host b SIGKILLed: streams continued on host a; longest stall {stall:.2f} s")
            assert stall < 2.0
    finally:
        hosts.__exit__(None, None, None)
