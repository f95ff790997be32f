"""Throughput benchmark: stagewise through `serve run` against transformers, in the same run.

    python load_tests/benchmark.py [--num-stages 2] [--rounds 3] [--extra key=value ...]

Builds the 125M Llama (12 layers, hidden 768, intermediate 2048, 12 heads, 4 KV heads, vocab
32000, float32, random weights), serves it through `serve run`, and in alternating rounds
compares, end to end over HTTP at the client:
  (a) one stream of 64 tokens (ignore_eos) against transformers `generate()` at batch 1;
  (b) 16 concurrent streams of 64 tokens against a transformers static batch of the same 16
      prompts, left-padded;
  (c) time to first token for a 256-token prompt against `generate(max_new_tokens=1)`.
Prompts of (a) and (b) are 24 tokens. Every round takes prompts of its own, so that the server's
prefix cache does not answer a later round from an earlier one's blocks. The baseline runs warm, with torch's default threads,
while the server is idle. Prints each round's ratios, then the median of the rounds and their ratios (>1: stagewise faster),
and how many of the machine's cores were busy while (b) streamed, and each Serve process's share (from /proc).
Each stage has one replica (`stage_autoscaling: null`; `--extra` can change any builder arg).

Then, unless `--no-ceiling`, what the compute alone allows on this machine, measured in the same
process once the server has stopped (`load_tests/step_compute.py`'s timings): a decode step of
the whole model as one stage, on the threads a stage gives a step of that size, at batch 1 and 16
(a route's stages compute one after the other, so a token costs the whole model), as tokens/s
against transformers' medians above; and the 256-token prefill in two stages against
`generate(max_new_tokens=1)`, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from app.builder import BuilderArgs  # noqa: E402
from load_tests.step_compute import decode_stage, time_prefill, time_stage, time_transformers  # noqa: E402
from tests.checkpoints import build_llama_125m, corpus  # noqa: E402
from tests.serving import ServeRun  # noqa: E402

NEW_TOKENS = 64
PROMPT_TOKENS = 24
LONG_PROMPT_TOKENS = 256
NUM_STREAMS = 16


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of exactly `length` token ids."""
    out, lines = [], iter(corpus(4000, seed=1))
    while len(out) < count:
        ids: list[int] = []
        while len(ids) < length:
            ids += tokenizer(" " + next(lines)).input_ids
        out.append(ids[:length])
    return out


def stream_request(url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """One streamed completion; returns (seconds to first token, seconds in all, tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - began
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - began, tokens


def server_single(url, model, prompt) -> float:
    _, seconds, tokens = stream_request(url, model, prompt, NEW_TOKENS)
    assert tokens == NEW_TOKENS
    return tokens / seconds


def server_concurrent(url, model, batch) -> float:
    results = [None] * len(batch)

    def run(i):
        results[i] = stream_request(url, model, batch[i], NEW_TOKENS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    assert all(r[2] == NEW_TOKENS for r in results)
    return sum(r[2] for r in results) / seconds


def server_ttft(url, model, prompt) -> float:
    first, _, _ = stream_request(url, model, prompt, 1)
    return first


def cpu_times() -> tuple[float, float, dict[str, float]]:
    """(wall seconds, the machine's busy CPU seconds, CPU seconds of each Serve process by role),
    from /proc (all zero where there is none)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy, roles = 0.0, {}
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / ticks
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                command = open(f"/proc/{pid}/cmdline").read()
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            role = re.match(r"ray::(?:ServeReplica:[^:]+:(\w+)|(ProxyActor))", command)  # a deployment's replica
            if role:
                name = role[1] or role[2]
                roles[name] = roles.get(name, 0.0) + (int(stat[11]) + int(stat[12])) / ticks
    except OSError:
        pass
    return time.monotonic(), busy, roles


def cpu_shares(before, after) -> dict[str, float]:
    """Cores each role kept busy between two `cpu_times()`, and the whole machine's ("busy")."""
    wall = max(after[0] - before[0], 1e-9)
    shares = {role: (after[2][role] - before[2].get(role, 0.0)) / wall for role in after[2]}
    return {"busy": (after[1] - before[1]) / wall, **shares}


def hf_generate(model, tokenizer, batch: list[list[int]], new_tokens: int) -> float:
    """Seconds for transformers to generate `new_tokens` for the left-padded batch."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    began = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad)
    return time.perf_counter() - began


def ceiling(model_dir: str, model, builder: dict) -> dict[str, float]:
    """Median seconds of what bounds (a), (b) and (c): a decode step of the whole model as one stage
    and transformers' at batch 1 and `NUM_STREAMS` (after `PROMPT_TOKENS` of context), and the
    prefill of `LONG_PROMPT_TOKENS` in two stages and transformers'."""
    threads = torch.get_num_threads()
    args = BuilderArgs(**builder)
    stage_threads = args.stage_num_threads or os.cpu_count() or 1
    stage = decode_stage(model_dir, model.config.num_hidden_layers, NUM_STREAMS, PROMPT_TOKENS)
    steps = {}
    for batch in (1, NUM_STREAMS):
        torch.set_num_threads(stage_threads if batch >= args.stage_parallel_min_tokens else 1)
        steps[f"stage_step_{batch}"] = time_stage(stage, batch, PROMPT_TOKENS)
        torch.set_num_threads(threads)
        steps[f"hf_step_{batch}"] = time_transformers(model, batch, PROMPT_TOKENS)
    del stage
    torch.set_num_threads(stage_threads)
    steps["stage_prefill"], steps["hf_prefill"], _ = time_prefill(model_dir, model, LONG_PROMPT_TOKENS)
    torch.set_num_threads(threads)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extra", nargs="*", default=[], help="more builder args, key=value")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("--no-ceiling", action="store_true", help="skip measuring what the compute alone allows")
    args = parser.parse_args()
    model_dir = args.model or build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # round r (0 warms up) takes shorts[r] and longs[r]: fresh prompts, none cached by an earlier round
    shorts = prompts(tokenizer, NUM_STREAMS * (args.rounds + 1) + args.rounds + 1, PROMPT_TOKENS)
    shorts = [shorts[r * (NUM_STREAMS + 1):(r + 1) * (NUM_STREAMS + 1)] for r in range(args.rounds + 1)]
    longs = prompts(tokenizer, args.rounds + 1, LONG_PROMPT_TOKENS)
    # One replica per stage: this measures the pipeline, not the autoscaler (load_tests/scaling.py does).
    builder = {"model": model_dir, "num_stages": args.num_stages, "max_model_len": 1024, "stage_autoscaling": None}
    builder.update(dict(kv.split("=", 1) for kv in args.extra))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_generate(model, tokenizer, shorts[0][:1], 4)  # warm
    hf_generate(model, tokenizer, shorts[0][1:], 4)
    results: dict[str, list[float]] = {k: [] for k in ("hf_single", "sw_single", "hf_batch", "sw_batch",
                                                       "hf_ttft", "sw_ttft")}
    shares: list[dict[str, float]] = []  # cores busy while the server streams (b), by process
    with ServeRun(builder) as server:
        url, name = server.url, server.model
        server_single(url, name, shorts[0][0])  # warm
        server_concurrent(url, name, shorts[0][1:])
        server_ttft(url, name, longs[0])
        for round_ in range(args.rounds):
            single, short, long = shorts[round_ + 1][0], shorts[round_ + 1][1:], longs[round_ + 1]
            results["hf_single"].append(NEW_TOKENS / hf_generate(model, tokenizer, [single], NEW_TOKENS))
            results["sw_single"].append(server_single(url, name, single))
            results["hf_batch"].append(NUM_STREAMS * NEW_TOKENS / hf_generate(model, tokenizer, short, NEW_TOKENS))
            began = cpu_times()
            results["sw_batch"].append(server_concurrent(url, name, short))
            shares.append(cpu_shares(began, cpu_times()))
            results["hf_ttft"].append(hf_generate(model, tokenizer, [long], 1))
            results["sw_ttft"].append(server_ttft(url, name, long))
            last = {k: v[-1] for k, v in results.items()}
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in last.items())
                  + f"; ratios (a) {last['sw_single'] / last['hf_single']:.2f}x (b) {last['sw_batch'] / last['hf_batch']:.2f}x"
                  f" (c) {last['hf_ttft'] / last['sw_ttft']:.2f}x", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nstagewise, {args.num_stages} stages via serve run, vs transformers generate() "
          f"(median of {args.rounds} rounds, torch threads {torch.get_num_threads()}):")
    print(f"(a) 1 stream x {NEW_TOKENS} tokens:   stagewise {med['sw_single']:7.1f} tok/s, "
          f"transformers {med['hf_single']:7.1f} tok/s, ratio {med['sw_single'] / med['hf_single']:.2f}x")
    print(f"(b) {NUM_STREAMS} streams x {NEW_TOKENS} tokens: stagewise {med['sw_batch']:7.1f} tok/s, "
          f"transformers {med['hf_batch']:7.1f} tok/s, ratio {med['sw_batch'] / med['hf_batch']:.2f}x")
    print(f"(c) TTFT, {LONG_PROMPT_TOKENS}-token prompt: stagewise {med['sw_ttft'] * 1000:7.1f} ms,  "
          f"transformers {med['hf_ttft'] * 1000:7.1f} ms,  ratio {med['hf_ttft'] / med['sw_ttft']:.2f}x")
    cores = {k: statistics.median(r.get(k, 0.0) for r in shares) for k in shares[0]}
    print(f"    while (b) streamed: {cores.pop('busy'):.2f} of {os.cpu_count()} cores busy; "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cores.items())))
    steps = {} if args.no_ceiling else ceiling(model_dir, model, builder)
    if steps:
        batch = NUM_STREAMS
        rate_a, rate_b = 1 / steps["stage_step_1"], batch / steps[f"stage_step_{batch}"]
        print(f"compute alone, in this process once the server stopped (a stage's threads for each step, "
              f"transformers' {torch.get_num_threads()}):\n"
              f"    decode step of the whole model at batch 1: {steps['stage_step_1'] * 1e3:.1f} ms, {rate_a:.1f} tok/s "
              f"(transformers' step {steps['hf_step_1'] * 1e3:.1f} ms): allows (a) {rate_a / med['hf_single']:.2f}x\n"
              f"    at batch {batch}: {steps[f'stage_step_{batch}'] * 1e3:.1f} ms, {rate_b:.1f} tok/s (transformers' step "
              f"{steps[f'hf_step_{batch}'] * 1e3:.1f} ms): allows (b) {rate_b / med['hf_batch']:.2f}x\n"
              f"    {LONG_PROMPT_TOKENS}-token prefill in two stages: {steps['stage_prefill'] * 1e3:.1f} ms, "
              f"transformers {steps['hf_prefill'] * 1e3:.1f} ms: allows (c) {steps['hf_prefill'] / steps['stage_prefill']:.2f}x")
    if args.json:
        print(json.dumps({"median": med, "rounds": results, "builder": builder, "cores": shares, "ceiling": steps}))


if __name__ == "__main__":
    main()
