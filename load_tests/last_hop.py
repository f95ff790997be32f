"""Bytes per step on the last hop (last stage -> ingress), greedy rows' tokens against their logits.

    python load_tests/last_hop.py [--streams 16] [--tokens 64] [--model DIR]

Builds the 125M Llama (as `benchmark.py`: vocabulary 32,000), serves it in 2 stages in this
process (`tests.local.local_app`, the engine and stage servers as served, without Ray), runs
`--streams` concurrent greedy completions twice and records every `Result` the last stage sends,
encoded as on the wire (`app.wire.encode`: frame head and header, then the tensors):
  (1) as served: each greedy row gets its argmax token (`WANT_TOKEN`), computed on the last stage;
  (2) every row wanting its logits, as every step did before (the ingress then sampled them).
Prints bytes per step at full batch (every stream decoding) and in all, and checks that both runs
produced the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoTokenizer  # noqa: E402

from app import wire  # noqa: E402
from app.sequence import WANT_LOGITS, Row  # noqa: E402
from load_tests.benchmark import prompts  # noqa: E402
from tests.checkpoints import build_llama_125m  # noqa: E402
from tests.local import local_app  # noqa: E402


def run(model_dir: str, batch: list[list[int]], tokens: int) -> tuple[list[int], list[str]]:
    """Bytes of every result message at full batch, and the completions."""
    with local_app(model_dir, [(0, 6), (6, 12)], max_batch_size=len(batch), max_model_len=256) as (client, _, servers):
        sizes, send = [], servers[-1]._send

        def record(address, message):
            if isinstance(message, wire.Result) and message.tokens is not None and len(message.tokens) == len(batch):
                head, tensors = wire.encode(message)
                sizes.append(len(head) + sum(t.numel() * t.element_size() for t in tensors))
            return send(address, message)

        servers[-1]._send = record
        texts = [""] * len(batch)

        def complete(i):
            body = {"model": "model", "prompt": batch[i], "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            texts[i] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return sizes, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = args.model or build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    batch = prompts(AutoTokenizer.from_pretrained(model_dir), args.streams, 24)
    now, texts = run(model_dir, batch, args.tokens)
    with mock.patch.object(Row, "want", property(lambda row: WANT_LOGITS)):
        before, texts_before = run(model_dir, batch, args.tokens)
    assert texts == texts_before, "the two runs' tokens differ"
    print(f"\n{args.streams} greedy streams x {args.tokens} tokens, 2 stages; result messages at full batch "
          f"({len(now)} and {len(before)} steps), bytes per step on the last hop:")
    print(f"  greedy tokens from the last stage: {statistics.median(now):,.0f}")
    print(f"  every row's logits (as before):    {statistics.median(before):,.0f}  "
          f"({statistics.median(before) / statistics.median(now):,.0f}x)")


if __name__ == "__main__":
    main()
