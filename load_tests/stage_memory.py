"""Peak resident memory of each stage replica, over a bare Serve replica with the same imports.

    python load_tests/stage_memory.py [--model DIR] [--num-stages 4] [--load 64] [--json]

Builds the 125M Llama (12 layers, hidden 768, vocab 32000, float32, sharded safetensors) unless
--model is given, serves it in N stages in a local Ray cluster, and compares each stage
replica's VmHWM with that of a bare replica that imported torch, transformers (with the Llama
modelling code), safetensors and fastapi: what a stage adds is what it loaded. With --load N it
first serves N concurrent greedy requests with long prompts and outputs, checks each against
transformers, and sets each stage's peak beside what the plan gives it: weights, KV pool and
working memory (`ModelSpec.stage_work_bytes`, for the largest step; each stage runs such a step
at start and reports what it took, `work_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Bare:
    """A Serve replica with the stage's imports and nothing loaded."""

    def __init__(self):
        import fastapi  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401

    def info(self) -> dict:
        from app.deployments import process_memory

        return process_memory()


LOAD_PROMPT, LOAD_TOKENS = 200, 64


def load_prompts(num: int) -> list[list[int]]:
    """`num` distinct prompts of LOAD_PROMPT token ids."""
    import random

    rng = random.Random(0)
    return [[rng.randrange(100, 30000) for _ in range(LOAD_PROMPT)] for _ in range(num)]


def serve_load(url: str, model: str, prompts: list[list[int]]) -> list[list[str]]:
    """Sends every prompt at once (greedy, LOAD_TOKENS each); returns each answer's tokens."""
    from concurrent.futures import ThreadPoolExecutor

    def one(ids):
        body = {"model": model, "prompt": ids, "max_tokens": LOAD_TOKENS, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(request, timeout=900))["choices"][0]["logprobs"]["tokens"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def reference(model_dir: str, prompts: list[list[int]]) -> list[list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    out = []
    for ids in prompts:
        tokens = model.generate(torch.tensor([ids]), max_new_tokens=LOAD_TOKENS, min_new_tokens=LOAD_TOKENS,
                                do_sample=False)[0, len(ids):].tolist()
        out.append([tokenizer.decode([t]) for t in tokens])
    return out


def measure(model_dir: str, num_stages: int, quantization: str = "none", load: int = 0) -> dict:
    import ray
    from ray import serve

    from app import build_app
    from placement import ModelSpec

    from tests.serving import free_port, wait_healthy

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": model_dir, "num_stages": num_stages, "max_model_len": 512,
                             "quantization": quantization}),
                  name="stagewise", route_prefix="/")
        wait_healthy(f"http://127.0.0.1:{port}", timeout=300)
        # Serve a request first: weights are resident once every block has run.
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", headers={
            "Content-Type": "application/json"}, data=json.dumps({"model": os.path.basename(model_dir),
                                                                  "prompt": "the city", "max_tokens": 4}).encode())
        try:
            urllib.request.urlopen(request, timeout=120).read()
        except urllib.error.HTTPError as exc:  # say what the server said
            raise SystemExit(f"the first request got {exc.code}: {exc.read().decode(errors='replace')}") from exc
        answers = serve_load(f"http://127.0.0.1:{port}", os.path.basename(model_dir), load_prompts(load)) if load else []
        serve.run(serve.deployment(Bare, ray_actor_options={"num_cpus": 0}).bind(), name="bare",
                  route_prefix="/bare")
        bare = serve.get_deployment_handle("Bare", app_name="bare").info.remote().result()
        stages = [serve.get_deployment_handle(f"Stage{i}", app_name="stagewise").info.remote().result()
                  for i in range(num_stages)]
    finally:
        serve.shutdown()
        ray.shutdown()
    # shares are of the unquantized float32 model: what a stage would hold without quantization
    spec = ModelSpec.from_model_dir(model_dir, dtype="float32")
    model_bytes = spec.total_weight_bytes
    over = [s["peak_rss_bytes"] - bare["peak_rss_bytes"] for s in stages]
    from app.builder import BuilderArgs, pool_tokens, step_tokens

    kv_tokens = pool_tokens(BuilderArgs())
    spec = spec.with_step_tokens(step_tokens(BuilderArgs()))
    result = {"model_bytes": model_bytes, "bare_peak_rss_bytes": bare["peak_rss_bytes"],
              "stages": [{"index": s["index"], "blocks": [s["start"], s["end"]], "weight_bytes": s["weight_bytes"],
                          "planned_bytes": spec.stage_bytes(s["start"], s["end"], kv_tokens),
                          "planned_work_bytes": spec.stage_work_bytes(s["start"], s["end"]),
                          "work_bytes": s.get("work_bytes"), "load_peak_rss_bytes": s.get("load_peak_rss_bytes"),
                          "rss_bytes": s.get("rss_bytes"),
                          "kv_pool_bytes": s.get("kv_cache_bytes"),
                          "peak_rss_bytes": s["peak_rss_bytes"], "over_bare_bytes": o} for s, o in zip(stages, over)],
              "max_stage_share": max(over) / model_bytes, "total_share": sum(over) / model_bytes}
    if load:
        expected = reference(model_dir, load_prompts(load))
        result["load"] = {"requests": load, "exact": sum(a == e for a, e in zip(answers, expected))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--num-stages", type=int, default=4)
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "nf4"])
    parser.add_argument("--load", type=int, default=0, help="concurrent long greedy requests to serve first")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    model_dir = args.model
    if model_dir is None:
        from tests.checkpoints import build_llama_125m

        model_dir = build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    result = measure(model_dir, args.num_stages, args.quantization, args.load)
    if args.json:
        print(json.dumps(result))
        return
    mib = 2**20
    print(f"{args.quantization}: float32 model {result['model_bytes'] / mib:.0f} MiB; bare replica peak {result['bare_peak_rss_bytes'] / mib:.0f} MiB")
    for s in result["stages"]:
        print(f"Stage{s['index']} blocks {s['blocks']}: weights {s['weight_bytes'] / mib:.0f} MiB, "
              f"KV pool {s['kv_pool_bytes'] / mib:.0f} MiB, working memory {s['work_bytes'] / mib:.0f} MiB at start "
              f"({s['planned_work_bytes'] / mib:.0f} planned), planned in all {s['planned_bytes'] / mib:.0f} MiB, "
              f"peak over bare {s['over_bare_bytes'] / mib:.0f} MiB ({s['over_bare_bytes'] / result['model_bytes']:.2f}x "
              f"model, {s['over_bare_bytes'] / s['planned_bytes']:.2f}x planned)")
    if "load" in result:
        print(f"{result['load']['requests']} concurrent requests of {LOAD_PROMPT} + {LOAD_TOKENS} tokens: "
              f"{result['load']['exact']} equal to transformers")
    print(f"largest stage {result['max_stage_share']:.2f}x model, all stages {result['total_share']:.2f}x model")


if __name__ == "__main__":
    main()
