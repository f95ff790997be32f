"""Time to first token with a shared 1,000-token prefix, with prefix caching on and off.

    python load_tests/prefix_cache.py

Serves the default model (SmolLM2-135M-Instruct) in two stages in-process (the whole app over
HTTP, no Ray: `tests/local.py`), sends a long system prompt followed by one question, then the same
system prompt followed by another, and prints each request's time to first token and how many
prompt tokens the second took from the prefix cache; then the same without prefix caching, in the
same run, as the baseline.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoConfig  # noqa: E402

from app import default_model  # noqa: E402
from tests.local import local_app  # noqa: E402

NAME = "SmolLM2-135M-Instruct"
SYSTEM = " ".join(f"Rule {i}: answer politely, briefly and truthfully about rivers, cities and music." for i in range(52))


def first_token_s(url: str, question: str, system: str = SYSTEM) -> float:
    body = {"model": NAME, "max_tokens": 4, "temperature": 0, "stream": True,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as r:
        for line in r:
            chunk = json.loads(line[6:]) if line.startswith(b"data: {") else {}
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                return time.perf_counter() - began
    raise RuntimeError("no token came back")


def main() -> None:
    model_dir = default_model.default_model_dir()
    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    for caching in (True, False):
        with local_app(model_dir, [(0, layers // 2), (layers // 2, layers)], name=NAME, http=True,
                       max_model_len=2048, kv_tokens=4096, prefix_caching=caching) as (url, engine, _):
            first_token_s(url, "Warm up?", system="Be brief.")  # a process's first steps pay for allocations
            engine.scheduler.cached_tokens = 0
            first = first_token_s(url, "Name a long river.")
            second = first_token_s(url, "Name a big city.")
            tokens = engine.scheduler.cached_tokens
            print(f"prefix caching {'on ' if caching else 'off'}: first request {first * 1e3:6.0f} ms to its first "
                  f"token, second {second * 1e3:6.0f} ms ({first / second:.1f}x); prompt tokens taken from the "
                  f"cache: {tokens} ({tokens // 16} blocks)")


if __name__ == "__main__":
    main()
