"""`python -m placement plan`, and what importing placement loads."""

import json
import subprocess
import sys

import pytest

from placement import GIB
from placement.cli import main
from tests.placement.helpers import TINY_LLAMA

# TINY_LLAMA in float16: embeddings 12800 bytes, blocks 73984 each, head 12928 (173696 in all).
# "gpu" (100000 bytes, 10 TFLOPS) holds one block with the embeddings or with the head; "box"
# (a CPU node, 1 GiB, 1 TFLOPS) holds anything. Cheapest: box [0, 1), gpu [1, 2) + head, since
# the head's multiply goes to the fast device and the free embedding lookup to the slow one.
CLUSTER = f"""
nodes:
  - {{name: gpu, gpus: 1, memory_gb: {100_000 / GIB!r}, tflops: 10}}
  - {{name: box, gpus: 0, memory_gb: 1, tflops: 1}}
"""
EXACT = ["--reserve-fraction", "0", "--kv-tokens", "0", "--step-tokens", "0"]


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    return ["--model", str(model), "--cluster", str(cluster)]


def test_json_plan(files, capsys):
    assert main(["plan", *files, "--json", *EXACT]) == 0
    data = json.loads(capsys.readouterr().out)
    keys = ("start", "end", "node", "gpu", "weight_bytes")
    stages = [tuple(stage[key] for key in keys) for stage in data["stages"]]
    assert stages == [(0, 1, "box", None, 12800 + 73984), (1, 2, "gpu", 0, 73984 + 12928)]
    assert data["num_stages"] == 2 and data["num_layers"] == 2 and data["exact"] is True
    assert data["bottleneck_stage"] == 0 and data["bottleneck_s"] == 2 * 36992 / 1e12
    assert data["dtype"] == "float16" and data["quantization"] is None
    assert data["total_weight_bytes"] == 173696


def test_table_plan(files, capsys):
    assert main(["plan", *files, *EXACT, "--quantization", "int8"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama: 2 blocks, int8 blocks, float16 elsewhere, 2 stage(s)" in out
    header = next(line for line in out.splitlines() if line.startswith("stage"))
    for column in ("blocks", "device", "weight GiB", "memory", "time share"):
        assert column in header
    assert "box:cpu" in out and "gpu:gpu0" in out and "(optimal)" in out


def test_help_shows_the_reserve_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.05)" in out and "(default: 4096)" in out and "(default: float16)" in out


def test_bad_input_exits_1(files, tmp_path, capsys):
    assert main(["plan", files[0], files[1], "--cluster", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml" in capsys.readouterr().err


def test_infeasible_exits_2_naming_memory(files, tmp_path):
    # without the CPU node, 173696 bytes in float16 do not fit in gpu's 100000; nf4 would
    # (25728 + 2 x 20992 = 67712), with --kv-tokens 0 (4096 tokens take 512 KiB a block)
    cluster = tmp_path / "gpu-only.yaml"
    cluster.write_text(CLUSTER.split("  - {name: box")[0])
    process = subprocess.run(
        [sys.executable, "-m", "placement", "plan", files[0], files[1], "--cluster", str(cluster),
         "--json", "--kv-tokens", "0", "--step-tokens", "0"],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 2, process.stderr
    assert process.stdout == ""
    assert "not enough memory" in process.stderr and "KV cache for 0 tokens" in process.stderr
    assert "GiB on 1 device(s)" in process.stderr
    assert "It would fit with --quantization nf4" in process.stderr


def test_import_loads_neither_ray_nor_torch():
    code = """
import sys
import placement, placement.cli, placement.planner, placement.search, placement.partition
HEAVY = ("ray", "torch", "transformers")
heavy = lambda: sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
assert heavy() == [], heavy()
spec = placement.ModelSpec((100, 100), 10, 10, (1, 1))
placement.plan(spec, placement.ClusterSpec.from_dicts(
    [{"name": "a", "gpus": 1, "memory_gb": 1, "tflops": 1}]))
assert heavy() == [], heavy()
placement.ModelSpec.from_config(%r)
assert "torch" in sys.modules and not any(m.split(".")[0] == "ray" for m in sys.modules)
""" % (TINY_LLAMA,)
    process = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr
