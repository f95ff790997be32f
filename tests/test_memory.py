"""Every stage holds only its own blocks: peak RSS per replica against a bare replica (issue 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_stage_replica_holds_only_its_share():
    out = subprocess.run([sys.executable, "load_tests/stage_memory.py", "--num-stages", "4", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["stages"]) == 4
    assert result["max_stage_share"] <= 0.5, result
    # Each stage carries ~50-70 MiB beyond its weights (first KV cache allocation, a prefill's
    # activations, packing for oneDNN): 4 stages measured 1.26-1.32x the model in 5 runs on
    # 2026-11-29 (transformers 5.24), where 1.3 had been the bound. A stage holding the whole model
    # would put the total past 2.
    assert result["total_share"] <= 1.4, result
    # each stage's weights are about a quarter of the model, not the model
    assert all(s["weight_bytes"] < 0.35 * result["model_bytes"] for s in result["stages"])
