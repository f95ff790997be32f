"""Decode step against where the KV blocks lie: the pool's placement, against handing blocks out in
free-list order.

    python load_tests/block_layout.py [--threads 1] [--batch 16] [--context 1000] [--model DIR]

Builds the 125M Llama (as load_tests/benchmark.py does) and loads all its blocks as one `Stage`.
`--batch` sequences grow side by side in an `app.blocks.BlockPool`, as the scheduler grows them
(prefill 250 tokens a row at a time, then decode), and the decode step is timed (median) with
their tables: (1) as the pool places blocks; (2) taken from the front of the free list, as the
pool first did (sequences that grow together then interleave). Prints the runs of consecutive
blocks per row, the bytes attention copies per step (a row of more than `MAX_RUNS` runs is
copied into one piece) and the step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from app.blocks import BlockPool, BlockTable  # noqa: E402
from stages import Stage  # noqa: E402
from stages.kv_cache import MAX_RUNS  # noqa: E402
from tests.checkpoints import build_llama_125m  # noqa: E402

STEPS, BLOCK, CHUNK = 12, 16, 250


class FreeListOrder(BlockPool):
    """The pool as first built: the next block is the front of the free list."""

    def _next_block(self, last, needed):
        return next(iter(self._free))


def runs(blocks: list[int]) -> int:
    return 1 + sum(1 for a, b in zip(blocks, blocks[1:]) if b != a + 1)


def time_layout(stage: Stage, pool: BlockPool, batch: int, context: int) -> tuple[float, list[int], int]:
    """(median decode step s, runs per row, bytes attention copies per step)."""
    tables = [BlockTable() for _ in range(batch)]

    def grown(tokens: int) -> list[list[int]]:
        for table in tables:
            assert pool.grow(table, tokens)
        return [list(table.blocks) for table in tables]

    for start in range(0, context, CHUNK):
        width = min(CHUNK, context - start)
        stage(torch.randint(100, 30000, (batch, width)), grown(start + width), [start] * batch, [width] * batch)
    times = []
    for i in range(STEPS):
        began = time.perf_counter()
        stage(torch.randint(100, 30000, (batch, 1)), grown(context + i + 1), [context + i] * batch, [1] * batch)
        times.append(time.perf_counter() - began)
    row_runs = [runs(table.blocks) for table in tables]
    per_token = 2 * stage.cache.nbytes() // (2 * stage.cache.num_blocks * BLOCK)  # K and V, every block
    copied = sum(context * per_token for r in row_runs if r > MAX_RUNS)
    return statistics.median(times[2:]), row_runs, copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build the 125M Llama)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    num_blocks = int(1.25 * args.batch * -(-(args.context + STEPS + 1) // BLOCK))
    stage = Stage(model_dir, 0, 12, num_blocks=num_blocks, block_size=BLOCK)
    print(f"decode step, whole model, {args.threads} thread(s), batch {args.batch}, {args.context} tokens of "
          f"context, a pool of {num_blocks} blocks, median of {STEPS - 2}:")
    for name, pool in (("pool placement", BlockPool(num_blocks, BLOCK, prefix_caching=False)),
                       ("free-list order", FreeListOrder(num_blocks, BLOCK, prefix_caching=False))):
        seconds, row_runs, copied = time_layout(stage, pool, args.batch, args.context)
        print(f"{name:16s}: {max(row_runs)} runs per row at most, {copied / 2**20:.0f} MiB copied per step, "
              f"{seconds * 1e3:.1f} ms per step")


if __name__ == "__main__":
    main()
