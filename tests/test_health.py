"""A stage that cannot load says so, everywhere a user looks, and serves once it can (issue 12)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from transformers import AutoTokenizer

from app.health import health_body, stage_report, unavailable_reason
from tests.reference import greedy_text
from tests.serving import REPO, ServeRun, wait_healthy

PROMPT = "the quick brown fox"


def announced(stage: int, state: str, **extra) -> dict:
    return {"id": f"r{stage}{state}", "stage": stage, "state": state, "node": "10.0.0.5", "draining": False,
            "error": None, **extra}


def test_report_names_each_stage_state():
    report = stage_report(3, [announced(0, "ready"), announced(0, "failed", error="OSError: disk"),
                              announced(1, "starting")])
    assert [(s["name"], s["state"]) for s in report] == [("Stage0", "ready"), ("Stage1", "starting"),
                                                         ("Stage2", "missing")]
    assert report[0]["error"] == "OSError: disk" and len(report[0]["replicas"]) == 2
    assert unavailable_reason(report) == "Stage1 is starting: loading its blocks on 10.0.0.5"
    status, body = health_body(report, engine_alive=True, engine_restarts=0)
    assert status == 503 and body["status"] == "unavailable" and body["stages"] == report


def test_the_reason_given_is_the_most_telling_stage():
    report = stage_report(3, [announced(1, "starting"), announced(2, "failed", error="OSError: disk")])
    assert unavailable_reason(report) == "Stage2 failed to load: OSError: disk (it retries; see /health)"
    report = stage_report(2, [announced(1, "starting")])
    assert unavailable_reason(report).startswith("Stage1 is starting")  # before Stage0's plain absence


def test_draining_serves_and_a_failed_stage_names_its_cause():
    report = stage_report(2, [announced(0, "ready", draining=True), announced(1, "failed", error="KeyError: x")])
    assert report[0]["state"] == "draining"
    assert unavailable_reason(report) == "Stage1 failed to load: KeyError: x (it retries; see /health)"
    ok = stage_report(2, [announced(0, "ready", draining=True), announced(1, "ready")])
    assert unavailable_reason(ok) is None
    assert health_body(ok, True, 0)[0] == 200
    assert health_body(ok, False, 1)[0] == 503  # a dead engine loop is not healthy either


def test_truncated_checkpoint_fails_visibly_then_serves_when_fixed(checkpoint, tmp_path):
    model_dir = str(tmp_path / "llama-cut")
    shutil.copytree(checkpoint("llama"), model_dir)
    weights = f"{model_dir}/model.safetensors"
    with open(weights, "rb") as f:
        whole = f.read()
    with open(weights, "wb") as f:
        f.write(whole[: len(whole) * 2 // 3])  # the header is intact, the last tensors are not there
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(PROMPT).input_ids
    body = {"model": "llama-cut", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}

    began = time.monotonic()
    with ServeRun({"model": model_dir, "num_stages": 2, "max_model_len": 256}, healthy=False) as server:
        deadline = began + 60
        while time.monotonic() < deadline:
            health = server.get("/health")
            if any(stage["state"] == "failed" for stage in health["stages"]):
                break
            time.sleep(1)
        seen_s = time.monotonic() - began
        failed = [stage for stage in health["stages"] if stage["state"] == "failed"]
        assert failed and health["status"] == "unavailable", health
        assert failed[0]["error"]  # the cause, from the stage's own exception
        status, answer = server.post("/v1/completions", body)
        assert status == 503, answer
        message = answer["error"]["message"]
        # the stage it names failed (both stages read the cut file: either may be named)
        named = message.split(" ", 1)[0]
        assert message.startswith(f"{named} failed to load: "), message
        assert named in {s["name"] for s in server.get("/health")["stages"] if s["state"] == "failed"}
        assert answer["error"]["code"] == "stages_unavailable"
        while f"{failed[0]['name']} failed to load" not in server.log() and time.monotonic() < deadline + 15:
            time.sleep(1)  # Ray forwards the replicas' log lines to serve run's output a little later
        assert f"{failed[0]['name']} failed to load" in server.log()

        with open(weights, "wb") as f:
            f.write(whole)
        fixed = time.monotonic()
        wait_healthy(server.url, timeout=60)
        recovered_s = time.monotonic() - fixed
        status, answer = server.post("/v1/completions", body)
    assert status == 200, answer
    assert answer["choices"][0]["text"] == greedy_text(model_dir, ids, 12, exact_length=False)
    print(f"failure shown {seen_s:.0f} s after serve run started; served {recovered_s:.0f} s after the fix")


def test_the_actors_the_ingress_waits_for_at_start_import_neither_torch_nor_transformers():
    """A new worker process imports their modules before it serves: the registry's answer is
    what the ingress waits for before it can say it is ready (it was 4 s of imports more)."""
    code = ("import sys, app.registry, app.weights; heavy = {'torch', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
