"""Mixed load: how much a long prompt's prefill stalls the streams decoding around it.

    python load_tests/mixed_load.py [--num-stages 2] [--streams 8] [--long-tokens 1500] [--extra key=value ...]

Builds the 125M Llama (as `benchmark.py`), serves it through `serve run` with one replica per
stage, and measures at the client, over HTTP:
  (1) the long prompt's time to first token alone (idle server, `max_tokens` 1);
  (2) `--streams` greedy streams of 96 tokens (24-token prompts, ignore_eos); once every stream
      has its 8th token, the long prompt (another one, so the prefix cache cannot answer it)
      arrives. Printed: the streams' median inter-token gap over the whole run, their longest gap
      that overlaps the long prompt's wait for its first token, the ratio of the two, their
      median gaps during that wait and clear of it, and the long prompt's time to first token
      under load against alone.
The issue's targets: longest gap during the prefill at most 3x the median; TTFT under load
within 1.5x of alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoTokenizer  # noqa: E402

from load_tests.benchmark import prompts  # noqa: E402
from tests.checkpoints import build_llama_125m  # noqa: E402
from tests.serving import ServeRun  # noqa: E402

STREAM_TOKENS = 96
PROMPT_TOKENS = 24


def stream_times(url: str, model: str, prompt: list[int], max_tokens: int,
                 arrivals: list[float] | None = None) -> tuple[float, list[float]]:
    """One streamed greedy completion: (time sent, arrival time of every token chunk), the times
    appended to `arrivals` as they come."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    sent, arrivals = time.perf_counter(), [] if arrivals is None else arrivals
    with urllib.request.urlopen(request, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
            if choices and (choices[0]["text"] or choices[0]["finish_reason"] is None):  # not the closing chunk
                arrivals.append(time.perf_counter())
    return sent, arrivals


def run_mixed(url: str, model: str, streams: list[list[int]], long: list[int]) -> dict:
    """The streams, with `long` sent once each has 8 tokens; the gaps and the long prompt's TTFT."""
    results: list[list[float]] = [[] for _ in streams]
    threads = [threading.Thread(target=stream_times, args=(url, model, prompt, STREAM_TOKENS, results[i]))
               for i, prompt in enumerate(streams)]
    for t in threads:
        t.start()
    deadline = time.perf_counter() + 300
    while min(len(times) for times in results) < 8:
        if time.perf_counter() > deadline or not all(t.is_alive() for t in threads):
            raise RuntimeError("the streams did not start decoding")
        time.sleep(0.01)
    sent, arrivals = stream_times(url, model, long, 1)
    first = arrivals[0]
    for t in threads:
        t.join()
    gaps, during, outside = [], [], []
    for times in results:
        assert len(times) >= STREAM_TOKENS - 1, len(times)  # a token may end with the closing chunk
        for a, b in zip(times, times[1:]):
            gaps.append(b - a)
            # gaps that overlap the long prompt's wait for its first token, and those clear of it
            (during if b > sent and a < first else outside).append(b - a)
    median = statistics.median
    return {"median_gap_s": median(gaps), "max_gap_during_s": max(during, default=0.0),
            "median_gap_during_s": median(during) if during else 0.0,
            "median_gap_outside_s": median(outside) if outside else 0.0, "ttft_s": first - sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=1500)
    parser.add_argument("--extra", nargs="*", default=[], help="more builder args, key=value")
    args = parser.parse_args()
    model_dir = args.model or build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    short = prompts(tokenizer, 2 * args.streams, PROMPT_TOKENS)
    longs = prompts(tokenizer, 3, args.long_tokens)
    builder = {"model": model_dir, "num_stages": args.num_stages, "max_model_len": 2048, "stage_autoscaling": None,
               "plan_kv_tokens": 8192}
    builder.update(dict(kv.split("=", 1) for kv in args.extra))
    with ServeRun(builder) as server:
        url, name = server.url, server.model
        run_mixed(url, name, short[args.streams:], longs[0])  # warm: every step shape once
        sent, arrivals = stream_times(url, name, longs[1], 1)
        alone = arrivals[0] - sent
        mixed = run_mixed(url, name, short[:args.streams], longs[2])
    ratio = mixed["max_gap_during_s"] / mixed["median_gap_s"]
    clear = mixed["max_gap_during_s"] / mixed["median_gap_outside_s"]
    print(f"\n{args.streams} streams x {STREAM_TOKENS} tokens, a {args.long_tokens}-token prompt arriving "
          f"({args.num_stages} stages, {json.dumps({k: v for k, v in builder.items() if k != 'model'})}):")
    print(f"streams' median inter-token gap {mixed['median_gap_s'] * 1e3:.0f} ms; longest gap during the long "
          f"prefill {mixed['max_gap_during_s'] * 1e3:.0f} ms: {ratio:.1f}x the median (target <= 3x); their median "
          f"gap during it {mixed['median_gap_during_s'] * 1e3:.0f} ms, clear of it "
          f"{mixed['median_gap_outside_s'] * 1e3:.0f} ms (the longest is {clear:.1f}x that)")
    print(f"long prompt's TTFT alone {alone * 1e3:.0f} ms, under load {mixed['ttft_s'] * 1e3:.0f} ms: "
          f"{mixed['ttft_s'] / alone:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
