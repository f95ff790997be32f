"""Offline batch mode: a JSONL file of requests through R replicas of the whole pipeline.

    python -m app.batch --model DIR --input prompts.jsonl --output out.jsonl [--replicas R] [--num-stages N]

Each input line is a completions or chat request body without `model` (chat when it has
`messages`); each output line is `{"line": i, "response": {...}}` with the input's 0-based line
number, or `{"line": i, "error": {...}}` (OpenAI's error object, with the HTTP status it would have
had) for a request that fails; the run goes on. The output is in input order.

Data parallel over whole pipelines, as Accelerate's `split_between_processes` is over devices: R
Serve applications (`stagewise-batch-0` ...), each the application `serve run` would deploy
(`app.builder.build_app`: its own ingress and N stages), on the Ray cluster (`RAY_ADDRESS`, else
a local one). Requests go through deployment handles (no HTTP): each application's ingress runs
them through its own app in its own process (`Ingress.request`), so every check, error and answer
is the server's. Each replica has up to `max_batch_size` requests in flight.

Every finished line is appended to `<output>.journal` at once (one write, flushed): after a crash
or Ctrl-C a rerun with the same arguments resumes from it, and no line is computed twice or lost.
The output is written from the journal when every line is done (atomically), then the journal
goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time

from tqdm import tqdm

logger = logging.getLogger(__name__)

APP_PREFIX = "stagewise-batch"


def read_requests(path: str) -> list[dict | str]:
    """Each line's request body, or why it is not one (an error for that line)."""
    out: list[dict | str] = []
    with open(path) as f:
        for number, line in enumerate(f):
            try:
                body = json.loads(line)
            except ValueError as exc:
                out.append(f"line {number} is not JSON: {exc}")
                continue
            if not isinstance(body, dict):
                out.append(f"line {number} is not a JSON object")
            elif body.get("stream"):
                out.append("stream is not supported in batch mode (each line gets its whole answer)")
            else:
                out.append(body)
    return out


def read_done(output: str, journal: str) -> dict[int, dict]:
    """The lines already answered: in the output (a finished run) and in the journal (a run cut
    short; a line cut in the middle of its write is dropped, and the journal cut back to the last
    whole line)."""
    done: dict[int, dict] = {}
    for path in (output, journal):
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        whole = data[:data.rfind(b"\n") + 1]
        if path == journal and len(whole) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(whole))
        for line in whole.splitlines():
            entry = json.loads(line)
            done[entry["line"]] = entry
    return done


class Journal:
    """Appends finished lines, each in one write, flushed to the OS before the next is taken."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def add(self, entry: dict) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def deploy(args: argparse.Namespace) -> list:
    """R applications of the whole pipeline; their ingresses' handles once every stage serves."""
    import ray
    from ray import serve

    from app.builder import BuilderArgs, build_app

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING, log_to_driver=False)
    builder_args = BuilderArgs(model=args.model, num_stages=args.num_stages, **json.loads(args.builder_args))
    # All at once: Serve starts every application's replicas together rather than one after another.
    handles = serve.run_many([serve.RunTarget(build_app(builder_args), name=f"{APP_PREFIX}-{r}", route_prefix=None)
                              for r in range(args.replicas)])
    deadline = time.monotonic() + args.load_timeout
    for handle in handles:
        while not handle.ready.remote().result():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stages did not load within {args.load_timeout:.0f} s")
            time.sleep(1)
    return handles


async def run_lines(handles: list, requests: list[dict | str], pending: list[int], journal: Journal,
                    in_flight: int) -> dict[str, int]:
    """Answers the `pending` lines through the handles, `in_flight` at once per handle; returns counts."""
    queue: asyncio.Queue = asyncio.Queue()
    for number in pending:
        queue.put_nowait(number)
    counts = {"lines": 0, "errors": 0, "completion_tokens": 0}
    bar = tqdm(total=len(pending), unit="line", desc="batch")

    async def worker(handle) -> None:
        while not queue.empty():
            number = queue.get_nowait()
            body = requests[number]
            if isinstance(body, str):
                entry = {"line": number, "error": {"message": body, "type": "invalid_request_error", "status": 400}}
            else:
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                status, answer = await handle.request.remote(path, body)
                entry = ({"line": number, "response": answer} if status == 200 else
                         {"line": number, "error": {**answer.get("error", answer), "status": status}})
            journal.add(entry)
            counts["lines"] += 1
            counts["errors"] += "error" in entry
            counts["completion_tokens"] += (entry.get("response", {}).get("usage") or {}).get("completion_tokens", 0)
            bar.update(1)

    await asyncio.gather(*(worker(handle) for handle in handles for _ in range(in_flight)))
    bar.close()
    return counts


def write_output(output: str, done: dict[int, dict], num_lines: int) -> None:
    with open(output + ".part", "w") as f:
        for number in range(num_lines):
            f.write(json.dumps(done[number]) + "\n")
    os.replace(output + ".part", output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--input", required=True, help="JSONL: one completions or chat request body per line")
    parser.add_argument("--output", required=True, help="JSONL: {'line', 'response' or 'error'} per input line")
    parser.add_argument("--replicas", type=int, default=1, help="whole pipelines, each its own Serve application")
    parser.add_argument("--num-stages", type=int, default=2, help="stages of each pipeline")
    parser.add_argument("--in-flight", type=int, default=16, help="requests in flight per replica")
    parser.add_argument("--builder-args", default="{}", help="more builder arguments, as JSON (see the README)")
    parser.add_argument("--load-timeout", type=float, default=600, help="seconds to wait for the stages to load")
    args = parser.parse_args(argv)
    requests = read_requests(args.input)
    journal_path = args.output + ".journal"
    done = read_done(args.output, journal_path)
    pending = [number for number in range(len(requests)) if number not in done]
    print(f"{len(requests)} lines: {len(requests) - len(pending)} already answered, {len(pending)} to go")
    counts, elapsed = {"lines": 0, "errors": 0, "completion_tokens": 0}, 0.0
    if pending:
        handles = deploy(args)
        journal = Journal(journal_path)
        began = time.monotonic()
        try:
            counts = asyncio.run(run_lines(handles, requests, pending, journal, args.in_flight))
        finally:
            elapsed = time.monotonic() - began
            journal.close()
            from ray import serve

            for r in range(args.replicas):
                serve.delete(f"{APP_PREFIX}-{r}")
    done = read_done(args.output, journal_path)
    write_output(args.output, done, len(requests))
    if os.path.exists(journal_path):
        os.remove(journal_path)
    print(f"{counts['lines']} lines answered in {elapsed:.1f} s with {args.replicas} replica(s) of "
          f"{args.num_stages} stages ({counts['errors']} errors): {counts['completion_tokens']} completion tokens, "
          f"{counts['completion_tokens'] / max(elapsed, 1e-9):.1f} tokens/s; output in {args.output}")


if __name__ == "__main__":
    main()
