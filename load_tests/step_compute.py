"""Compute of one decode step, in-process: a stage with packed layers, one with nn.Linear, transformers.

    python load_tests/step_compute.py [--threads 1] [--batch 1 16] [--model DIR] [--prefill 256]

Builds the 125M Llama (as load_tests/benchmark.py does), loads all its blocks as one `Stage`
twice, with its linear layers packed for oneDNN (the default on the CPU) and with plain
`nn.Linear`, and times decode steps at each batch size against a transformers forward with its
own cache, in the same run. Prints milliseconds per step (median) and the ratios. With `--prefill N`
it times instead an N-token prompt's prefill through the model in two stages (each half of the
blocks, packed), against transformers `generate(max_new_tokens=1)`, alternating, and the rate
of the linear layers' arithmetic it reached (what bounds a prefill).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from stages import Stage  # noqa: E402
from tests.checkpoints import build_llama_125m  # noqa: E402

PROMPT, STEPS, BLOCK = 24, 24, 16
PREFILL_ROUNDS = 7


def decode_stage(model_dir: str, num_layers: int, max_batch: int, context: int = PROMPT) -> Stage:
    """The whole model as one stage, its KV pool enough for `time_stage` at up to `max_batch` rows."""
    return Stage(model_dir, 0, num_layers, num_blocks=max_batch * -(-(context + STEPS) // BLOCK), block_size=BLOCK)


def time_stage(stage: Stage, batch: int, prompt: int = PROMPT) -> float:
    """Median decode step of `batch` rows after a `prompt`-token prefill, each row's blocks one run."""
    per_row = -(-(prompt + STEPS) // BLOCK)
    tables = [[b * per_row + i for i in range(per_row)] for b in range(batch)]
    for start in range(0, prompt, 256):  # prefill in chunks, as the engine does
        width = min(256, prompt - start)
        stage(torch.randint(100, 30000, (batch, width)), tables, [start] * batch, [width] * batch)
    times = []
    for i in range(STEPS):
        began = time.perf_counter()
        stage(torch.randint(100, 30000, (batch, 1)), tables, [prompt + i] * batch, [1] * batch)
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])


@torch.inference_mode()
def time_transformers(model, batch: int, prompt: int = PROMPT) -> float:
    cache = DynamicCache(config=model.config)
    out = model(torch.randint(100, 30000, (batch, prompt)), past_key_values=cache, use_cache=True)
    times = []
    for _ in range(STEPS):
        began = time.perf_counter()
        out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])


def time_prefill(model_dir: str, model, tokens: int, rounds: int = PREFILL_ROUNDS) -> tuple[float, float, float]:
    """Median seconds of a `tokens`-token prefill through the model in two packed stages and of
    transformers `generate(max_new_tokens=1)`, alternating, and the stages' linear layers' GFLOP/s."""
    num_layers, num_blocks = model.config.num_hidden_layers, -(-tokens // BLOCK)
    halves = [Stage(model_dir, start, end, num_blocks=num_blocks, block_size=BLOCK)
              for start, end in ((0, num_layers // 2), (num_layers // 2, num_layers))]
    table = [list(range(num_blocks))]
    stages, hf = [], []
    for _ in range(rounds + 2):  # two to warm up
        ids = torch.randint(100, 30000, (1, tokens))
        began = time.perf_counter()
        halves[1](halves[0](ids, table, [0], [tokens]), table, [0], [tokens])
        stages.append(time.perf_counter() - began)
        with torch.inference_mode():
            began = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
            hf.append(time.perf_counter() - began)
    s, h = statistics.median(stages[2:]), statistics.median(hf[2:])
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return s, h, 2 * linear * tokens / s / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--context", type=int, default=PROMPT, help="tokens each row holds before decoding")
    parser.add_argument("--prefill", type=int, help="time a prompt of this many tokens instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    if args.prefill:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        s, h, gflops = time_prefill(model_dir, model, args.prefill)
        print(f"{args.prefill}-token prefill, {args.threads} thread(s), median of {PREFILL_ROUNDS}: two packed stages "
              f"{s * 1e3:.1f} ms ({gflops:.0f} GFLOP/s in the blocks' linear layers), "
              f"transformers generate(max_new_tokens=1) {h * 1e3:.1f} ms; ratio {h / s:.2f}x")
        return
    num_layers = AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers
    packed = decode_stage(model_dir, num_layers, max(args.batch), args.context)
    with mock.patch("stages.stage.can_pack", lambda device, dtype: False):
        plain = decode_stage(model_dir, num_layers, max(args.batch), args.context)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(f"decode step, whole model, {args.threads} thread(s), {args.context} tokens of context, "
          f"median of {STEPS - 2}:")
    for batch in args.batch:
        p, n = time_stage(packed, batch, args.context), time_stage(plain, batch, args.context)
        hf = time_transformers(model, batch, args.context)
        print(f"batch {batch:3d}: packed {p * 1e3:6.1f} ms, nn.Linear {n * 1e3:6.1f} ms, "
              f"transformers {hf * 1e3:6.1f} ms; packed is {n / p:.2f}x nn.Linear, {hf / p:.2f}x transformers")


if __name__ == "__main__":
    main()
