"""Bytes per step on the last hop (last stage -> ingress): sampled tokens against every row's logits.

    python load_tests/last_hop.py [--streams 16] [--tokens 64] [--model DIR]

Builds the 125M Llama (as `benchmark.py`: vocabulary 32,000), serves it in 2 stages in this
process (`tests.local.local_app`, the engine and stage servers as served, without Ray), runs
`--streams` concurrent completions and records every `Result` the last stage sends at full batch
(every stream decoding), encoded as on the wire (`app.wire.encode`: frame head and header, then
the tensors):
  (1) greedy: each row gets its argmax token (`WANT_TOKEN`);
  (2) sampled (temperature 0.8, top_p 0.95, a seed): each row gets a token drawn on the last stage;
  (3) sampled, with `logprobs: 5`: the token's log-probability and 5 alternatives per row;
and, against them, the same steps' `Result` carrying every row's logits, as every step did before
sampling moved to the last stage (the ingress then sampled them). Prints the median bytes per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from app import wire  # noqa: E402
from load_tests.benchmark import prompts  # noqa: E402
from tests.checkpoints import build_llama_125m  # noqa: E402
from tests.local import local_app  # noqa: E402


def run(model_dir: str, batch: list[list[int]], tokens: int, sampling: dict) -> tuple[list[int], list[int]]:
    """Bytes of every result message at full batch, and of the same message with every row's
    (float32) logits instead."""
    with local_app(model_dir, [(0, 6), (6, 12)], max_batch_size=len(batch), max_model_len=256) as (client, _, servers):
        sizes, logits_sizes, send = [], [], servers[-1]._send
        vocab = servers[-1].stage.config.vocab_size

        def record(address, message):
            if isinstance(message, wire.Result) and message.sampled is not None and \
                    len(message.sampled.tokens) == len(batch):
                sizes.append(encoded(message))
                logits_sizes.append(encoded(wire.Result(message.step, torch.zeros(len(batch), vocab))))
            return send(address, message)

        servers[-1]._send = record
        texts = [""] * len(batch)

        def complete(i):
            body = {"model": "model", "prompt": batch[i], "max_tokens": tokens, "ignore_eos": True, **sampling}
            texts[i] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(texts), "a completion failed"
    return sizes, logits_sizes


def encoded(message: wire.Message) -> int:
    head, tensors = wire.encode(message)
    return len(head) + sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = args.model or build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    batch = prompts(AutoTokenizer.from_pretrained(model_dir), args.streams, 24)
    print(f"\n{args.streams} streams x {args.tokens} tokens, 2 stages; median bytes per step on the last hop at "
          f"full batch (the same steps with every row's logits, as before):")
    for name, sampling in (("greedy", {"temperature": 0}),
                           ("sampled", {"temperature": 0.8, "top_p": 0.95, "seed": 1}),
                           ("sampled, logprobs 5", {"temperature": 0.8, "top_p": 0.95, "seed": 1, "logprobs": 5})):
        now, before = run(model_dir, batch, args.tokens, sampling)
        print(f"  {name:20s} {statistics.median(now):>9,.0f}  ({statistics.median(before):,.0f}: "
              f"{statistics.median(before) / statistics.median(now):,.0f}x; {len(now)} steps)")


if __name__ == "__main__":
    main()
