"""One command for a locust load test of stagewise, with replica memory watched throughout.

    python load_tests/run_locust.py [--users 16] [--spawn-rate 4] [--run-time 3m] [--num-stages 2]

Builds the 125M Llama (12 layers, hidden 768, vocab 32000, float32, random weights), serves it
through `serve run` on 127.0.0.1 (max_model_len 1024), warms it up with one request of each
kind, runs load_tests/locustfile.py headless against it, and prints: requests/s, p50/p99 latency
per request type, responses by HTTP status, and each replica's resident memory (VmRSS): idle
after the warm-up request, 30 s into the load (when every user has run and batches have been full:
the post-warm-up value), at its peak, at the end of the load and 30 s after it. Memory is "flat"
when the end of the load is within 10% of the value 30 s into the load.

Exits 1 when any response was a 5xx other than a deliberate overload 503 (with Retry-After), or
when any request failed its check in the locustfile (a wrong status or error object, a broken
stream, no response at all).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.checkpoints import build_llama_125m  # noqa: E402
from tests.serving import ServeRun  # noqa: E402

REPLICA_PATTERN = "ray::ServeReplica:stagewise:"
FLAT_TOLERANCE = 0.10
AFTER_LOAD_S = 30
SAMPLE_EVERY_S = 5
WARM_AFTER_S = 30
GREEDY_PROMPTS = ("The capital of France is", "Once upon a time", "Music from the mountain")
GREEDY_TOKENS = 24  # as in the locustfile


def descends_from(pid: str, root: int) -> bool:
    """Whether process `pid` is `root` or one of its descendants (Ray's workers are the raylet's,
    and the raylet is `serve run`'s, so another Ray on this machine is told apart)."""
    while pid not in ("0", "1"):
        if pid == str(root):
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = f.read().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            return False
    return False


def replica_rss(root: int) -> dict[str, float]:
    """The resident memory (MiB) of each stagewise replica process, by deployment name."""
    return {name: rss for name, (_, rss) in replicas(root).items()}


def replicas(root: int) -> dict[str, tuple[str, float]]:
    """(pid, resident memory in MiB) of each stagewise replica process, by deployment name.

    Args:
        root: the `serve run` process; replicas of any other Ray instance are left out.
    """
    pids = subprocess.run(["pgrep", "-f", REPLICA_PATTERN], capture_output=True, text=True).stdout.split()
    rss: dict[str, tuple[str, float]] = {}
    for pid in pids:
        if not descends_from(pid, root):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/status") as f:
                kib = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        except (OSError, AttributeError):
            continue  # gone, or not a process we can read
        # "ray::ServeReplica:stagewise:Ingress.handle_request" while a call runs: the name ends at the dot
        if REPLICA_PATTERN not in cmdline:
            continue
        name = cmdline.split(REPLICA_PATTERN, 1)[1].split()[0].split(".")[0]
        while name in rss:  # several replicas of one deployment
            name += "'"
        rss[name] = (pid, kib / 1024)
    return rss


def post(url: str, body: dict) -> None:
    """POSTs a completion and reads the whole answer (the warm-up)."""
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()


def greedy_references(model_dir: str) -> dict[str, str]:
    """transformers' greedy text for each of the locustfile's greedy prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = {}
    for prompt in GREEDY_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False)
        texts[prompt] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
    return texts


def warm_up(url: str, model: str) -> None:
    """One plain, one streamed and one long request, so that every block has run."""
    post(url, {"model": model, "prompt": "The capital of France is", "max_tokens": 16})
    post(url, {"model": model, "prompt": "Once upon a time", "max_tokens": 16, "stream": True})
    post(url, {"model": model, "prompt": " ".join(["the quick brown fox"] * 45), "max_tokens": 8})


def run_locust(server: ServeRun, args: argparse.Namespace, prefix: str,
               summary_path: str) -> tuple[int, list[dict]]:
    """Runs locust headless while sampling replica memory every few seconds.

    Args:
        server: the running server.
        args: the command line (users, spawn_rate, run_time).
        prefix: --csv prefix for locust's statistics.
        summary_path: where the locustfile writes its final statistics.

    Returns:
        Locust's exit status and the memory samples taken during the load.
    """
    command = [sys.executable, "-m", "locust", "-f", os.path.join(REPO, "load_tests", "locustfile.py"),
               "--headless", "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", args.run_time,
               "--host", server.url, "--csv", prefix, "--only-summary", "--stop-timeout", "30"]
    print("$", " ".join(command), flush=True)
    samples: list[dict] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            samples.append(replica_rss(server.proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(prefix + "_locust.log", "w") as log:
        rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, STAGEWISE_LOCUST_SUMMARY=summary_path)).returncode
    done.set()
    sampler.join()
    return rc, samples


def summarize(summary_path: str, memory: dict[str, dict[str, float]], replaced: list[str]) -> bool:
    """Prints the summary.

    Args:
        summary_path: the locustfile's final statistics and counts by status (JSON).
        memory: RSS (MiB) by moment ("idle", "warm", "peak", "end", "after") and replica.
        replaced: replicas whose process changed during the load.

    Returns:
        Whether the run passed: no unexpected 5xx, no failed checks (greedy output included), no
        request without a response, no replica replaced.
    """
    print("\n=== stagewise locust summary ===")
    if not os.path.exists(summary_path):
        print("locust wrote no statistics; see its log")
        return False
    with open(summary_path) as f:
        summary = json.load(f)
    total = summary["requests"][-1]
    print(f"requests: {total['count']}, failed checks: {total['failures']}, {total['rps']:.2f} requests/s")
    print(f"\n{'request type':<34} {'count':>6} {'fail':>5} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for row in summary["requests"]:
        print(f"{row['name']:<34} {row['count']:>6} {row['failures']:>5} {row['rps']:>6.2f} "
              f"{row['p50']:>7.0f} {row['p99']:>7.0f}")

    counts = summary["status"]
    print("\nresponses by status (0: no response; '503 overload': deliberate, with Retry-After):")
    print("  " + ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())))
    unexpected_5xx = sum(n for status, n in counts.items() if status.startswith("5") and "overload" not in status)
    print(f"  5xx other than overload 503: {unexpected_5xx}")
    for error in summary["errors"][:10]:
        print(f"  failed: {error['name']}: {error['occurrences']} x {error['error'][:160]}")

    print(f"\nreplica memory, RSS MiB (idle: after one warm-up request; warm: {WARM_AFTER_S} s into the load;"
          f"\nflat: end within {FLAT_TOLERANCE:.0%} of warm):")
    print(f"{'replica':<10} {'idle':>7} {'warm':>7} {'peak':>7} {'end':>7} {'+30 s':>7}  verdict")
    if not memory["idle"]:
        print(f"  no process matching {REPLICA_PATTERN!r} found under `serve run`")
    for name in sorted(memory["idle"]):
        idle, warm, peak, end, after = (memory[moment].get(name, float("nan")) for moment in
                                        ("idle", "warm", "peak", "end", "after"))
        change = (end - warm) / warm
        verdict = (f"{'flat' if abs(change) <= FLAT_TOLERANCE else 'NOT flat'} ({change:+.1%} vs warm, "
                   f"{(end - idle) / idle:+.1%} vs idle)")
        if end != end or warm != warm:  # NaN: the replica was gone
            verdict = "gone (restarted or died)"
        print(f"{name:<10} {idle:>7.1f} {warm:>7.1f} {peak:>7.1f} {end:>7.1f} {after:>7.1f}  {verdict}")

    print(f"\nreplicas replaced during the load: {', '.join(replaced) or 'none'}")
    passed = unexpected_5xx == 0 and total["failures"] == 0 and not counts.get("0") and not replaced
    print(f"\nresult: {'PASS' if passed else 'FAIL'}")
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16, help="concurrent locust users")
    parser.add_argument("--spawn-rate", type=float, default=4, help="users started per second")
    parser.add_argument("--run-time", default="3m", help="length of the load, as locust takes it (3m, 90s)")
    parser.add_argument("--num-stages", type=int, default=2, help="stage deployments")
    args = parser.parse_args()

    if subprocess.run(["pgrep", "-x", "raylet"], capture_output=True).returncode == 0:
        print("warning: another Ray is running on this machine; when either ends with `ray stop --force` "
              "(ServeRun does), the other dies with it", flush=True)
    model_dir = build_llama_125m(os.path.join(tempfile.gettempdir(), "stagewise-llama-125m"))
    out = tempfile.mkdtemp(prefix="stagewise-locust-")
    prefix, summary_path = os.path.join(out, "locust"), os.path.join(out, "summary.json")
    expected_path = os.path.join(out, "expected.json")
    with open(expected_path, "w") as f:
        json.dump(greedy_references(model_dir), f)
    os.environ["STAGEWISE_LOCUST_EXPECTED"] = expected_path
    # One replica per stage: a replica that goes away is a failure here, not a scale-down.
    with ServeRun({"model": model_dir, "num_stages": args.num_stages, "max_model_len": 1024,
                   "stage_autoscaling": None}) as server:
        print(f"serving {server.model} in {args.num_stages} stages at {server.url} (log: {server.log_path})",
              flush=True)
        warm_up(server.url, server.model)
        time.sleep(2)
        before = replicas(server.proc.pid)
        memory = {"idle": {name: rss for name, (_, rss) in before.items()}}
        rc, samples = run_locust(server, args, prefix, summary_path)
        after = replicas(server.proc.pid)
        replaced = [name for name, (pid, _) in before.items() if after.get(name, (None,))[0] != pid]
        memory["end"] = {name: rss for name, (_, rss) in after.items()}
        samples.append(memory["end"])
        memory["warm"] = samples[min(WARM_AFTER_S // SAMPLE_EVERY_S, len(samples)) - 1]
        memory["peak"] = {name: max(s.get(name, 0) for s in samples) for name in memory["idle"]}
        print(f"locust exited with {rc}; waiting {AFTER_LOAD_S} s for the after-load memory", flush=True)
        time.sleep(AFTER_LOAD_S)
        memory["after"] = replica_rss(server.proc.pid)
        if server.proc.poll() is not None:
            print(f"serve run exited during the test (status {server.proc.returncode}); see {server.log_path}")
    passed = summarize(summary_path, memory, replaced)
    print(f"(locust output and CSVs in {out})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
