"""LoRA adapters per request: served beside the model, each request naming one (or the model) as
its `model`, rows of different adapters in one step, each answer equal to peft's `PeftModel`.
Through `serve run`: `tests/test_serve.py::test_lora_adapters_and_beams`."""

from __future__ import annotations

import threading

import pytest

from app.builder import BuilderArgs, lora_adapters
from tests.local import local_app
from tests.reference import greedy_text
from tests.test_lora_stages import build_adapter

# Longer than a KV block (16 tokens), so that the prefix cache would share its blocks.
PROMPT = "the city of Paris and the river and the stone garden at night with music of the pipeline stage"
TOKENS = 12


def two_adapters(model_dir: str, root) -> dict[str, str]:
    """Two random, non-zero adapters of the test Llama (ranks 4 and 8), name -> directory."""
    return {"sql": build_adapter(model_dir, str(root / "sql"), 1, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj"]),
            "poet": build_adapter(model_dir, str(root / "poet"), 2, r=8, lora_alpha=16,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])}


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, str]:
    return two_adapters(checkpoint("llama"), tmp_path_factory.mktemp("lora"))


def run_together(client, names: list[str]) -> list[str]:
    texts = [None] * len(names)

    def run(i):
        r = client.post("/v1/completions", json={"model": names[i], "prompt": PROMPT, "max_tokens": TOKENS,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        texts[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return texts


@pytest.mark.parametrize("max_loras", [2, 1])
def test_two_adapters_and_the_model_in_one_batch_equal_peft(checkpoint, adapters, max_loras):
    model_dir = checkpoint("llama")
    expected = {"model": greedy_text(model_dir, PROMPT, TOKENS)}
    expected.update({name: greedy_text(model_dir, PROMPT, TOKENS, adapter=path) for name, path in adapters.items()})
    assert len(set(expected.values())) == 3  # each adapter changes the answer
    with local_app(model_dir, [(0, 3), (3, 6)], max_batch_size=4, lora_modules=adapters, max_loras=max_loras) as (
            client, engine, _):
        listed = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [("model", None), ("sql", "model"), ("poet", "model")]
        assert client.get("/v1/models/poet").json()["root"] == adapters["poet"]
        tokenized = client.post("/tokenize", json={"model": "sql", "prompt": "the city"})
        assert tokenized.status_code == 200 and tokenized.json()["tokens"]  # an adapter shares the tokenizer
        for name in ("nope", "sql2"):
            r = client.post("/v1/completions", json={"model": name, "prompt": "the", "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        steps, send = [], engine.pipeline.step

        async def step(route, inputs, tables, starts, num_new, **kwargs):
            steps.append(kwargs.get("adapters") or (0,) * len(starts))
            return await send(route, inputs, tables, starts, num_new, **kwargs)

        engine.pipeline.step = step
        # one after another first: the prompt's cached blocks are the model's, not an adapter's
        names = ["model", "sql", "poet"]
        assert [run_together(client, [name])[0] for name in names] == [expected[n] for n in names]
        steps.clear()
        assert run_together(client, names) == [expected[n] for n in names]
        mixed = [set(adapters_) for adapters_ in steps if len(set(adapters_)) > 1]
        assert mixed  # rows of different adapters (or none) shared steps
        assert all(len(s - {0}) <= max_loras for s in map(set, steps))
        assert engine.num_running == 0


def test_what_the_server_refuses_at_start(checkpoint, adapters, tmp_path):
    import json
    import shutil

    model_dir = checkpoint("llama")
    args = BuilderArgs(model=model_dir, lora_modules=[f"sql={adapters['sql']}"])
    assert lora_adapters(args, model_dir, "llama", ["none", "none"], False) == {"sql": adapters["sql"]}
    both = BuilderArgs(model=model_dir, lora_modules=f"sql={adapters['sql']},poet={adapters['poet']}")
    assert lora_adapters(both, model_dir, "llama", ["none"], False) == adapters  # as `serve run` passes it
    with pytest.raises(ValueError, match="quantized"):
        lora_adapters(args, model_dir, "llama", ["int8", "none"], False)
    with pytest.raises(ValueError, match="encoder"):
        lora_adapters(args, model_dir, "llama", ["none"], True)
    with pytest.raises(ValueError, match="model's own name"):
        lora_adapters(BuilderArgs(model=model_dir, lora_modules={"llama": adapters["sql"]}), model_dir, "llama",
                      ["none"], False)
    with pytest.raises(ValueError, match="rank 8, above max_lora_rank"):
        lora_adapters(BuilderArgs(model=model_dir, lora_modules={"poet": adapters["poet"]}, max_lora_rank=4),
                      model_dir, "llama", ["none"], False)
    wrong = tmp_path / "wrong"
    shutil.copytree(adapters["sql"], wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 6}))
    with pytest.raises(ValueError, match="'wrong'"):
        lora_adapters(BuilderArgs(model=model_dir, lora_modules={"wrong": str(wrong)}), model_dir, "llama",
                      ["none"], False)

