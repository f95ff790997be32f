"""`python -m placement plan`: plan a model onto a cluster and print the plan.

Exit status: 0 with a plan; 2 when the model does not fit (the message on stderr names the
memory needed and available, and what would fit); 1 when a file is missing or malformed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from placement.cluster import GIB, load_cluster
from placement.model_spec import DTYPE_BYTES, QUANTIZATIONS, ModelSpec, precision_label
from placement.planner import (
    DEFAULT_KV_TOKENS,
    DEFAULT_RESERVE_FRACTION,
    InfeasiblePlanError,
    Plan,
    plan,
)

EXIT_BAD_INPUT = 1
EXIT_INFEASIBLE = 2  # argparse also exits 2, on a malformed command line


def build_parser() -> argparse.ArgumentParser:
    """The command line: one `plan` subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m placement", description="Place a model's blocks on a cluster's devices."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser(
        "plan",
        help="plan block ranges and a device for each stage",
        description="Plan contiguous block ranges, one device each, so that the slowest stage "
        "(parameters / TFLOPS) is as fast as memory allows.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub.add_argument("--model", required=True, help="checkpoint directory with config.json")
    sub.add_argument(
        "--cluster", required=True, help="YAML: nodes: [{name, gpus, memory_gb, tflops}]"
    )
    sub.add_argument("--dtype", default="float16", choices=sorted(DTYPE_BYTES), help="dtype")
    sub.add_argument(
        "--quantization",
        default="none",
        choices=["none", *QUANTIZATIONS],
        help="bitsandbytes quantization of the blocks' weight matrices",
    )
    sub.add_argument("--json", action="store_true", help="print the plan as JSON")
    sub.add_argument(
        "--reserve-fraction",
        type=float,
        default=DEFAULT_RESERVE_FRACTION,
        help="share of each device's memory kept free (CUDA context, other processes, slack)",
    )
    sub.add_argument(
        "--kv-tokens",
        type=int,
        default=DEFAULT_KV_TOKENS,
        help="tokens of KV cache each stage keeps room for",
    )
    sub.add_argument(
        "--step-tokens",
        type=int,
        default=512,
        help="the most tokens a step carries (the server's max(max_num_batched_tokens, max_batch_size)): "
        "each stage's working memory is planned for it; 0 plans none",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: arguments without the program name; None reads sys.argv.

    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    try:
        cluster = load_cluster(args.cluster)
        spec = ModelSpec.from_model_dir(args.model, args.dtype, args.quantization)
        spec = spec.with_step_tokens(args.step_tokens)
        result = plan(
            spec, cluster, reserve_fraction=args.reserve_fraction, kv_tokens=args.kv_tokens
        )
    except InfeasiblePlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except (OSError, ValueError) as error:  # a missing file, a bad cluster or config
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        data = result.to_dict()
        data["model"] = str(args.model)
        print(json.dumps(data, indent=2))
    else:
        print(format_plan(result, Path(args.model).name))
    return 0


def format_plan(result: Plan, model_name: str = "") -> str:
    """A table a person reads: stage, blocks, device, weights, memory share, time share."""
    precision = precision_label(result.dtype, result.quantization)
    header = (
        f"{model_name or result.model_type}: {result.stages[-1].end} blocks, {precision}, "
        f"{result.num_stages} stage(s); reserve {result.reserve_fraction:.0%} of each device "
        f"+ KV cache of {result.kv_tokens} tokens + each stage's working memory"
    )
    total_time = sum(stage.time_s for stage in result.stages) or 1.0
    rows = [("stage", "blocks", "device", "weight GiB", "KV GiB", "work GiB", "memory", "time share")]
    for index, stage in enumerate(result.stages):
        mark = " *" if index == result.bottleneck_stage else ""
        rows.append(
            (
                str(index),
                f"{stage.start}-{stage.end - 1} ({stage.num_blocks})",
                stage.device,
                f"{stage.weight_bytes / GIB:.2f}",
                f"{stage.kv_bytes / GIB:.2f}",
                f"{stage.work_bytes / GIB:.2f}",
                f"{stage.memory_fraction:.0%} of {stage.memory_bytes / GIB:g} GiB",
                f"{stage.time_s / total_time:.0%}{mark}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [header, ""]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    kind = "optimal" if result.exact else "heuristic"
    lines += [
        "",
        f"weights {result.total_weight_bytes / GIB:.2f} GiB in all; bottleneck (*) "
        f"{result.bottleneck_s * 1e3:.3f} ms per token at peak TFLOPS ({kind})",
    ]
    return "\n".join(lines)
