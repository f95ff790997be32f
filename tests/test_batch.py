"""Offline batch mode (issue 20): a JSONL file through whole pipelines, resumable after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


from app.batch import Journal, read_done, read_requests, write_output
from tests.checkpoints import corpus
from tests.local import local_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_journal_drops_a_line_cut_in_its_write_and_the_output_is_in_input_order(tmp_path):
    journal_path, output = str(tmp_path / "out.jsonl.journal"), str(tmp_path / "out.jsonl")
    journal = Journal(journal_path)
    for number in (2, 0):
        journal.add({"line": number, "response": {"n": number}})
    journal.close()
    with open(journal_path, "a") as f:
        f.write('{"line": 1, "resp')  # killed in the middle of a write
    done = read_done(output, journal_path)
    assert sorted(done) == [0, 2] and open(journal_path).read().endswith("}\n")
    done[1] = {"line": 1, "error": {"message": "x", "status": 400}}
    write_output(output, done, 3)
    assert [json.loads(line)["line"] for line in open(output)] == [0, 1, 2]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"prompt": "a"}\nnot json\n[1]\n{"prompt": "b", "stream": true}\n')
    assert [isinstance(r, dict) for r in read_requests(str(inputs))] == [True, False, False, False]


def stop_ray() -> None:
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def run_batch(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.batch", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_batch_killed_halfway_resumes_without_a_line_missing_or_repeated(checkpoint, tmp_path):
    """200 requests (completions; chat, which this model refuses: it has no chat template; one
    invalid) through 2 replicas of a 2-stage pipeline; SIGKILL once half the lines are in the
    journal; the rerun answers the rest; every answer and error is the served API's (the same app
    in one process, greedy)."""
    model_dir = checkpoint("llama")
    lines = [{"prompt": text, "max_tokens": 16, "temperature": 0} for text in corpus(180, seed=3)]
    lines += [{"messages": [{"role": "user", "content": text}], "max_tokens": 16, "temperature": 0}
              for text in corpus(19, seed=4)]
    lines.insert(100, {"prompt": "x", "max_tokens": -1})  # a bad request: its error, and the run goes on
    inputs, output = tmp_path / "prompts.jsonl", str(tmp_path / "out.jsonl")
    inputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)  # each run starts its own local cluster, which the kill takes down
    args = ["--model", model_dir, "--input", str(inputs), "--output", output, "--replicas", "2",
            "--num-stages", "2", "--in-flight", "4", "--builder-args", json.dumps({"max_model_len": 256})]
    journal = output + ".journal"
    try:
        first = run_batch(args, env)
        deadline = time.monotonic() + 300
        while not (os.path.exists(journal) and sum(1 for _ in open(journal)) >= 100):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        first.wait()
        killed_at = sum(1 for _ in open(journal))
        assert 100 <= killed_at < len(lines) and not os.path.exists(output)
        stop_ray()
        second = run_batch(args, env)
        log = second.communicate(timeout=300)[0]
        assert second.returncode == 0, log
        assert f"{len(lines) - killed_at} to go" in log
    finally:
        stop_ray()
    answers = [json.loads(line) for line in open(output)]
    assert [a["line"] for a in answers] == list(range(len(lines))) and not os.path.exists(journal)
    assert answers[100]["error"]["status"] == 400 and answers[100]["error"]["param"] == "max_tokens"
    with local_app(model_dir, [(0, 3), (3, 6)], max_model_len=256) as (client, _, _):
        for number in range(0, len(lines), 7):
            body = dict(lines[number], model="model")
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = client.post(path, json=body)
            if r.status_code != 200:  # the bad line, and chat on a model without a chat template
                error = {**r.json()["error"], "status": r.status_code}
                assert answers[number]["error"] == {**error, "message": error["message"].replace("`model`", "`llama`")}
                continue
            got, expected = answers[number]["response"], r.json()
            assert got["choices"] == expected["choices"] and got["usage"] == expected["usage"], number
