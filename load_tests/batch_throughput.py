"""Offline batch mode: throughput with R replicas of the whole pipeline against one.

    python load_tests/batch_throughput.py [--lines 200] [--tokens 32] [--replicas 2] [--num-stages 2] [--model DIR]

Builds the 125M Llama (as `benchmark.py`), writes `--lines` greedy completion requests (24-token
prompts from the test corpus, `--tokens` tokens each, ignore_eos) and runs `python -m app.batch`
on them twice, each in a fresh local Ray cluster: with 1 replica, then with `--replicas`. Prints
each run's own summary (completion tokens per second, from its first request to its last; the
pipelines' load is not counted), the ratio, and whether both runs wrote the same answers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.checkpoints import build_llama_125m, corpus  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(model_dir: str, inputs: str, output: str, replicas: int, num_stages: int) -> tuple[float, list[dict]]:
    """tokens/s of one batch run, and its output lines."""
    out = subprocess.run([sys.executable, "-m", "app.batch", "--model", model_dir, "--input", inputs, "--output",
                          output, "--replicas", str(replicas), "--num-stages", str(num_stages)], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    summary = [line for line in out.stdout.splitlines() if "tokens/s" in line]
    if out.returncode != 0 or not summary:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    print(f"  {summary[-1]}")
    return float(re.search(r"([0-9.]+) tokens/s", summary[-1]).group(1)), [json.loads(line) for line in open(output)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-stages", type=int, default=2)
    args = parser.parse_args()
    model_dir = args.model or build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    work = tempfile.mkdtemp(prefix="stagewise-batch-")
    inputs = os.path.join(work, "prompts.jsonl")
    with open(inputs, "w") as f:
        for text in corpus(args.lines, seed=5):
            f.write(json.dumps({"prompt": text, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}) + "\n")
    print(f"{args.lines} requests of {args.tokens} tokens, pipelines of {args.num_stages} stages:")
    one, one_lines = run(model_dir, inputs, os.path.join(work, "one.jsonl"), 1, args.num_stages)
    many, many_lines = run(model_dir, inputs, os.path.join(work, "many.jsonl"), args.replicas, args.num_stages)
    same = [a["response"]["choices"] for a in one_lines] == [a["response"]["choices"] for a in many_lines]
    print(f"{args.replicas} replicas / 1: {many / one:.2f}x; the same answers: {same}")


if __name__ == "__main__":
    main()
