"""Locust load on a running stagewise server: plain, streamed, long and invalid completions.

    locust -f load_tests/locustfile.py --headless -u 16 -r 4 --run-time 3m --host http://127.0.0.1:8000

Only 127.0.0.1 and localhost are accepted as the host. The model id comes from `GET /v1/models`.
Every request type is reported under its own name:

  - ``plain``: a short prompt, max_tokens 16-32, temperature 0 or 0.8.
  - ``stream``: the same, streamed with ``stream_options.include_usage``; the SSE is read to the
    end (its latency is the whole stream, not the first byte) and must end with ``data: [DONE]``.
  - ``long``: a prompt of about 300 tokens, max_tokens 8.
  - ``invalid <kind>``: a malformed request that must get its 4xx and OpenAI's error object
    ``{"error": {"message", "type", "param", "code"}}``; success when it does, failure otherwise.
  - ``hostile <kind>``: a valid request with extreme numbers (a temperature of 1e-40, a top_p of
    1e-9, a repetition penalty of 1e-300, 300 logit biases of +-100, best_of 16 at temperature
    2, the largest seed): it must get a 200 like any other valid request, and stall nobody.
  - ``greedy``: temperature 0, 24 tokens, one of the prompts of ``$STAGEWISE_LOCUST_EXPECTED`` (a
    JSON object prompt -> text that the runner computed with transformers); its text must equal
    that one, so that the hostile requests around it are seen to change nothing of it. Without
    the file this request type is not sent.
  - ``overload 503 (<type>)``: a 503 with ``Retry-After``, the server's deliberate answer to a
    full queue; counted apart from the type it was meant to be, and not a failure.

Counts by HTTP status are printed when locust quits, and written with the final statistics as
JSON to the file named by ``$STAGEWISE_LOCUST_SUMMARY`` when it is set (the runner,
run_locust.py, reads them there).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import time
from urllib.parse import urlparse

import gevent
from locust import HttpUser, between, events, task
from locust.exception import StopUser

ALLOWED_HOSTS = ("127.0.0.1", "localhost")
ERROR_FIELDS = {"message", "type", "param", "code"}
WORDS = ("the quick brown fox jumps over the lazy dog while a river runs past the old stone garden near "
         "the city and people say that music from the mountain can be heard when the cloud is low").split()
SHORT_PROMPTS = ("The capital of France is", "Once upon a time", "The river runs past the",
                 "A quick brown fox", "Music from the mountain", "In the old stone garden")

# Each kind of invalid request: (status wanted, body, content type). A dict body is sent as JSON
# with the model added; "{model}" in a string body, "{len}" (max_model_len + 1) and "{ids}" (more
# token ids than the context holds) are filled in per user.
INVALID = {
    "bad json": (400, '{"model": "{model}", "prompt": "hi", ', "application/json"),
    "prompt wrong type": (400, {"prompt": {"text": "hi"}, "max_tokens": 4}, None),
    "max_tokens wrong type": (400, {"prompt": "hi", "max_tokens": "four"}, None),
    "temperature wrong type": (400, {"prompt": "hi", "max_tokens": 4, "temperature": [1]}, None),
    "unknown model": (404, {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, None),
    "max_tokens negative": (400, {"prompt": "hi", "max_tokens": -1}, None),
    "max_tokens over context": (400, {"prompt": "hi", "max_tokens": "{len}"}, None),
    "prompt over context": (400, {"prompt": "{ids}", "max_tokens": 1}, None),
    "not json content type": (415, "model={model}&prompt=hi", "application/x-www-form-urlencoded"),
}

# Valid requests with extreme numbers: each must be answered 200 (issue 13's findings).
HOSTILE = {
    "tiny temperature": {"temperature": 1e-40},
    "tiny top_p": {"temperature": 1.0, "top_p": 1e-9},
    "tiny repetition penalty": {"temperature": 1.5, "repetition_penalty": 1e-300},
    "huge repetition penalty": {"temperature": 1.0, "repetition_penalty": 1e300},
    "extreme penalties": {"temperature": 2.0, "presence_penalty": 2.0, "frequency_penalty": -2.0},
    "many logit biases": {"temperature": 2.0, "logit_bias": "{biases}"},
    "best_of 16": {"temperature": 2.0, "n": 1, "best_of": 16},
    "largest seed": {"temperature": 1.0, "seed": 2**63 - 1, "top_k": 1},
}
GREEDY_TOKENS = 24

status_counts: collections.Counter = collections.Counter()
locust_environment = None


def load_expected() -> dict[str, str]:
    path = os.environ.get("STAGEWISE_LOCUST_EXPECTED")
    if not path:
        return {}
    with open(path) as f:
        return json.load(f)


EXPECTED = load_expected()


def check_host(host: str | None) -> None:
    """Refuses any host but the local machine.

    Args:
        host: the base URL given with --host (or in the web UI).

    Raises:
        ValueError: the host is missing or not 127.0.0.1 / localhost.
    """
    name = urlparse(host or "").hostname
    if name not in ALLOWED_HOSTS:
        raise ValueError(f"locustfile: refusing host {host!r}: this load test runs only against "
                         f"http://127.0.0.1:PORT or http://localhost:PORT")


@events.init.add_listener
def on_init(environment, **_kwargs) -> None:
    """Checks --host as soon as locust has parsed it, before any user starts."""
    global locust_environment
    locust_environment = environment
    if environment.host is not None:
        try:
            check_host(environment.host)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None


@events.request.add_listener
def on_request(name, response, exception, **_kwargs) -> None:
    """Counts every response by HTTP status (0: no response at all)."""
    status = getattr(response, "status_code", 0) or 0
    status_counts[f"{status} overload" if name.startswith("overload 503") else str(status)] += 1


@events.quit.add_listener
def on_quit(**_kwargs) -> None:
    """Prints the counts by status; writes them and the final statistics where the runner wants them.

    Locust's CSV files are written every few seconds and may miss the last requests; this is
    written once every user has stopped.
    """
    print("responses by status:", json.dumps(dict(sorted(status_counts.items()))))
    path = os.environ.get("STAGEWISE_LOCUST_SUMMARY")
    if not path or locust_environment is None:
        return
    stats = locust_environment.stats
    rows = [{"name": entry.name, "count": entry.num_requests, "failures": entry.num_failures,
             "rps": entry.total_rps, "p50": entry.get_response_time_percentile(0.5),
             "p99": entry.get_response_time_percentile(0.99)}
            for entry in sorted(stats.entries.values(), key=lambda entry: entry.name) + [stats.total]]
    errors = [{"name": error.name, "error": str(error.error), "occurrences": error.occurrences}
              for error in stats.errors.values()]
    with open(path, "w") as f:
        json.dump({"status": status_counts, "requests": rows, "errors": errors}, f, indent=1)


def error_object_problem(response) -> str | None:
    """Why `response` is not OpenAI's error object, or None when it is one."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"status {response.status_code}, body is not {{'error': ...}}: {response.text[:200]!r}"
    if not isinstance(error, dict) or set(error) != ERROR_FIELDS:
        return f"status {response.status_code}, error fields {sorted(error) if isinstance(error, dict) else error}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return f"status {response.status_code}, message/type not strings: {error}"
    return None


def is_overload(response) -> bool:
    """A 503 with Retry-After: the server refusing work on purpose, not failing."""
    return response.status_code == 503 and "Retry-After" in response.headers


class CompletionsUser(HttpUser):
    """A client of /v1/completions with a weighted mix of request types."""

    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        """Checks the host (a web UI user may change it) and learns the model id and context length."""
        try:
            check_host(self.host)
        except ValueError as exc:
            logging.error("%s", exc)
            self.environment.process_exit_code = 2
            gevent.spawn(self.environment.runner.quit)
            raise StopUser() from None
        with self.client.get("/v1/models", name="models", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                raise StopUser()
            card = response.json()["data"][0]
        self.model = card["id"]
        self.max_model_len = card.get("max_model_len") or 4096

    def body(self, max_tokens: int, prompt: str | None = None, **extra) -> dict:
        """A completion request for the served model."""
        return {"model": self.model, "prompt": prompt or random.choice(SHORT_PROMPTS), "max_tokens": max_tokens,
                "temperature": random.choice((0.0, 0.8)), **extra}

    def post_completion(self, name: str, body: dict) -> None:
        """POSTs a non-streamed completion and checks it has choices and usage."""
        with self.client.post("/v1/completions", json=body, name=name, catch_response=True) as response:
            if is_overload(response):
                response.request_meta["name"] = f"overload 503 ({name})"
                response.success()
            elif response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            else:
                data = response.json()
                if not data.get("choices") or not data.get("usage"):
                    response.failure(f"no choices or usage: {response.text[:200]}")

    @task(6)
    def plain(self) -> None:
        """A short prompt, 16-32 tokens."""
        self.post_completion("plain", self.body(random.randint(16, 32)))

    @task(4)
    def stream(self) -> None:
        """A streamed completion, read to `data: [DONE]`; its latency is the whole stream."""
        body = self.body(random.randint(16, 32), stream=True, stream_options={"include_usage": True})
        began = time.perf_counter()
        with self.client.post("/v1/completions", json=body, name="stream", stream=True,
                              catch_response=True) as response:
            if is_overload(response):
                response.request_meta["name"] = "overload 503 (stream)"
                response.success()
                return
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            lines, size = [], 0
            try:
                for line in response.iter_lines(decode_unicode=True):
                    size += len(line) + 1
                    if line:
                        lines.append(line)
                chunks = [json.loads(line[6:]) for line in lines[:-1] if line.startswith("data: ")]
            except Exception as exc:  # a connection dropped mid-stream, or a chunk that is not JSON
                response.failure(f"stream broke after {len(lines)} lines: {exc!r}")
                return
            response.request_meta["response_time"] = (time.perf_counter() - began) * 1000
            response.request_meta["response_length"] = size
            errors = [chunk for chunk in chunks if "error" in chunk]
            if not lines or lines[-1] != "data: [DONE]":
                response.failure(f"stream does not end with 'data: [DONE]': {lines[-1:]}")
            elif errors:
                response.failure(f"error in stream: {errors[0]}")
            elif not any(chunk.get("usage") for chunk in chunks):
                response.failure("stream has no usage chunk")

    @task(2)
    def long(self) -> None:
        """A prompt of about 300 tokens, 8 new tokens."""
        prompt = " ".join(random.choice(WORDS) for _ in range(180))
        self.post_completion("long", self.body(8, prompt=prompt))

    @task(2)
    def hostile(self) -> None:
        """A valid request with extreme numbers: a 200, like any other."""
        kind = random.choice(list(HOSTILE))
        body = self.body(8, **HOSTILE[kind])
        if body.get("logit_bias") == "{biases}":
            body["logit_bias"] = {str(i): random.choice((-100.0, 100.0)) for i in random.sample(range(1, 1000), 300)}
        self.post_completion(f"hostile {kind}", body)

    @task(2)
    def greedy(self) -> None:
        """Temperature 0 on a fixed prompt: exactly the text transformers gives."""
        if not EXPECTED:
            return
        prompt = random.choice(sorted(EXPECTED))
        body = self.body(GREEDY_TOKENS, prompt=prompt, temperature=0.0, min_tokens=GREEDY_TOKENS)
        with self.client.post("/v1/completions", json=body, name="greedy", catch_response=True) as response:
            if is_overload(response):
                response.request_meta["name"] = "overload 503 (greedy)"
                response.success()
            elif response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            elif response.json()["choices"][0]["text"] != EXPECTED[prompt]:
                response.failure(f"greedy output changed: {response.json()['choices'][0]['text']!r} "
                                 f"!= {EXPECTED[prompt]!r}")

    @task(2)
    def invalid(self) -> None:
        """One malformed request, which must get its 4xx and the error object."""
        kind = random.choice(list(INVALID))
        status, body, content_type = INVALID[kind]
        if isinstance(body, dict):
            body = {"model": self.model, **body}
            if body.get("max_tokens") == "{len}":
                body["max_tokens"] = self.max_model_len + 1
            if body.get("prompt") == "{ids}":
                body["prompt"] = [random.randint(1, 100) for _ in range(self.max_model_len + 8)]
            data, content_type = json.dumps(body), "application/json"
        else:
            data = body.replace("{model}", self.model)
        with self.client.post("/v1/completions", data=data, headers={"Content-Type": content_type},
                              name=f"invalid {kind}", catch_response=True) as response:
            if is_overload(response):
                response.request_meta["name"] = f"overload 503 (invalid {kind})"
                response.success()
            elif response.status_code != status:
                response.failure(f"status {response.status_code}, wanted {status}: {response.text[:200]}")
            elif problem := error_object_problem(response):
                response.failure(problem)
            else:
                response.success()
