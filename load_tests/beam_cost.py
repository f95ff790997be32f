"""What a beam costs against one greedy stream: beam search of 2, 4 and 8 beams on the default model.

    python load_tests/beam_cost.py [--rounds 3] [--tokens 16] [--widths 2 4 8]

Serves SmolLM2-135M-Instruct (the default model) in 2 stages in this process
(`tests.local.local_app`: the engine and stage servers as served, without Ray or HTTP), and
alternates, for each prompt of a round: one greedy completion of `--tokens` tokens (the
baseline), then each beam search (`use_beam_search`, `n` = width, `max_tokens` = `--tokens`).
The beams' requests run to the end their search chooses (end-of-sequence or the budget), so
their tokens are counted as generated: every beam's, every step. Prints, per width, the median
seconds per request, the beams' tokens per second, and the cost per beam: seconds per beam-token
against the greedy stream's seconds per token, and the request's time against `width` greedy
requests run one after another.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import default_model  # noqa: E402
from tests.local import local_app  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
           "The three primary colors are", "To make a cup of tea, first", "The best way to learn a language is"]


def timed(client, body: dict) -> tuple[float, int, int]:
    """(seconds, generated tokens, steps) of one request."""
    began = time.perf_counter()
    answer = client.post("/v1/completions", json=body).json()
    return time.perf_counter() - began, answer["usage"]["completion_tokens"], len(answer["choices"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    model_dir = default_model.default_model_dir()
    with local_app(model_dir, [(0, 15), (15, 30)], name="m", max_batch_size=max(args.widths),
                   max_model_len=256) as (client, engine, _):
        base = {"model": "m", "max_tokens": args.tokens}
        timed(client, {**base, "prompt": "warm up", "temperature": 0})
        greedy: list[float] = []  # seconds per token
        beams: dict[int, list[tuple[float, float]]] = {w: [] for w in args.widths}  # (seconds, per beam-token)
        for round_ in range(args.rounds):
            for i, prompt in enumerate(PROMPTS):
                # a new prompt per round: no round takes the last one's prefix from the cache
                prompt = f"{prompt}" if round_ == 0 else f"({round_}) {prompt}"
                seconds, tokens, _ = timed(client, {**base, "prompt": prompt, "temperature": 0, "ignore_eos": True})
                greedy.append(seconds / tokens)
                for width in args.widths:
                    body = {**base, "prompt": prompt, "n": width, "use_beam_search": True}
                    before = engine.stats["steps"]
                    seconds, _, _ = timed(client, body)
                    steps = engine.stats["steps"] - before  # the prompt's step, then one per token
                    beams[width].append((seconds, seconds / (width * max(steps - 1, 1) + 1)))
        per_token = statistics.median(greedy)
        print(f"greedy, 1 stream: {per_token * 1000:.1f} ms per token ({1 / per_token:.1f} tok/s), "
              f"{len(greedy)} requests of {args.tokens} tokens")
        print("| beams | s per request | beam-tokens/s | cost per beam-token vs a greedy token | "
              "request vs width greedy requests |")
        print("| --- | --- | --- | --- | --- |")
        for width, runs in beams.items():
            seconds = statistics.median(s for s, _ in runs)
            per_beam_token = statistics.median(b for _, b in runs)
            print(f"| {width} | {seconds:.2f} | {1 / per_beam_token:.1f} | {per_beam_token / per_token:.2f}x | "
                  f"{seconds / (width * per_token * args.tokens):.2f}x |")


if __name__ == "__main__":
    main()
