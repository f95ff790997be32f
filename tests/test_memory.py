"""Every stage holds only its own blocks (issue 3), and no more than its plan gives it (issue 18):
peak RSS per replica against a bare replica with the same imports."""

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
    # each stage's weights are about a quarter of the model, not the model
    assert all(s["weight_bytes"] < 0.35 * result["model_bytes"] for s in result["stages"])
    # and its whole life's peak (the load, then the largest steps, which it runs at start) is
    # within what the plan gives it: weights, KV pool and working memory
    for stage in result["stages"]:
        assert stage["work_bytes"] > 0, stage
        assert stage["over_bare_bytes"] <= stage["planned_bytes"], stage
