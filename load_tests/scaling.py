"""What a second replica of a stage buys: throughput with 1 or 2 replicas per stage, same run.

    python load_tests/scaling.py [--rounds 3] [--streams 16 32]

Serves the 125M Llama (as `benchmark.py`) in 2 stages with fixed replica counts per stage
(`deployments:` overrides of the stages' autoscaling, min = max), and for each count drives N
concurrent streams of 64 tokens (`ignore_eos`) and prints tokens/s at the client (median of
the rounds). With more streams than one replica's KV slots (`max_batch_size`, 16), requests
queue at the ingress until a second replica adds slots.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoTokenizer  # noqa: E402

from load_tests.benchmark import PROMPT_TOKENS, prompts, server_concurrent  # noqa: E402
from tests.checkpoints import build_llama_125m  # noqa: E402
from tests.serving import ServeRun  # noqa: E402

LAYOUTS = [(1, 1), (1, 2), (2, 2)]


def fixed(stage: str, replicas: int) -> dict:
    return {"name": stage, "autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas,
                                                  "policy": {"policy_function": "app.autoscaling:StagePolicy"}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()
    model_dir = build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = prompts(tokenizer, max(args.streams), PROMPT_TOKENS)
    results = {}
    for layout in LAYOUTS:
        overrides = [fixed(f"Stage{i}", n) for i, n in enumerate(layout)]
        with ServeRun({"model": model_dir, "num_stages": 2, "max_model_len": 1024}, deployments=overrides) as server:
            import time

            while server.replicas_per_stage() != list(layout):
                time.sleep(1)
            server_concurrent(server.url, server.model, batch[:16])  # warm
            for streams in args.streams:
                rates = [server_concurrent(server.url, server.model, batch[:streams]) for _ in range(args.rounds)]
                results[layout, streams] = statistics.median(rates)
                print(f"replicas {layout}, {streams} streams: {results[layout, streams]:.1f} tok/s "
                      f"(rounds {', '.join(f'{r:.1f}' for r in rates)})", flush=True)
    print("\nreplicas (Stage0, Stage1) | " + " | ".join(f"{s} streams" for s in args.streams))
    for layout in LAYOUTS:
        base = [results[(1, 1), s] for s in args.streams]
        cells = [f"{results[layout, s]:.1f} tok/s ({results[layout, s] / b:.2f}x)" for s, b in zip(args.streams, base)]
        print(f"{layout} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
