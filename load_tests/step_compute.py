"""Compute of one decode step, in-process: a stage with packed layers, one with nn.Linear, transformers.

    python load_tests/step_compute.py [--threads 1] [--batch 1 16] [--model DIR]

Builds the 125M Llama (as load_tests/benchmark.py does), loads all its blocks as one `Stage`
twice, with its linear layers packed for oneDNN (the default on the CPU) and with plain
`nn.Linear`, and times decode steps at each batch size against a transformers forward with its
own cache, in the same run. Prints milliseconds per step (median) and the ratios.
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

PROMPT, STEPS = 24, 24


def time_stage(stage: Stage, batch: int) -> float:
    slots, one = torch.arange(batch), torch.ones(batch, dtype=torch.long)
    stage(torch.randint(100, 30000, (batch, PROMPT)), slots, torch.zeros(batch, dtype=torch.long),
          torch.full((batch,), PROMPT))
    times = []
    for i in range(STEPS):
        began = time.perf_counter()
        stage(torch.randint(100, 30000, (batch, 1)), slots, torch.full((batch,), PROMPT + i), one)
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])


@torch.inference_mode()
def time_transformers(model, batch: int) -> float:
    cache = DynamicCache(config=model.config)
    out = model(torch.randint(100, 30000, (batch, PROMPT)), past_key_values=cache, use_cache=True)
    times = []
    for _ in range(STEPS):
        began = time.perf_counter()
        out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    num_layers = AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers
    packed = Stage(model_dir, 0, num_layers, num_slots=max(args.batch), max_len=256)
    with mock.patch("stages.stage.can_pack", lambda device, dtype: False):
        plain = Stage(model_dir, 0, num_layers, num_slots=max(args.batch), max_len=256)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(f"decode step, whole model, {args.threads} thread(s), median of {STEPS - 2}:")
    for batch in args.batch:
        p, n, hf = time_stage(packed, batch), time_stage(plain, batch), time_transformers(model, batch)
        print(f"batch {batch:3d}: packed {p * 1e3:6.1f} ms, nn.Linear {n * 1e3:6.1f} ms, "
              f"transformers {hf * 1e3:6.1f} ms; packed is {n / p:.2f}x nn.Linear, {hf / p:.2f}x transformers")


if __name__ == "__main__":
    main()
