"""The GPU path at the `stages/` level (no Ray): two chained stages on CUDA against transformers.

Marked `gpu`: `python -m pytest -m gpu` runs them, and they skip where CUDA is missing. They need
torch, transformers and bitsandbytes only. The builder's `num_gpus` is checked on the CPU below.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import Stage
from tests.test_quantization import bnb_config
from tests.test_stages import BLOCK, PROMPT, SPLITS, greedy


def on_cuda(test):
    """Marks a test `gpu` (deselected by default) and skips it where CUDA is missing."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def reference(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@on_cuda
def test_half_precision_stages_on_cuda_match_transformers(checkpoint, arch, dtype):
    model_dir = checkpoint(arch)
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa").to("cuda")
    expected = reference(model, ids, 16)
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK, dtype=dtype, device="cuda") for start, end in SPLITS[2]]
    assert all(p.device.type == "cuda" for stage in stages for p in stage.parameters())
    assert greedy(stages, ids, 16) == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@on_cuda
def test_quantized_stages_on_cuda_match_bitsandbytes(checkpoint, arch, quantization):
    model_dir = checkpoint(arch)
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(quantization),
                                                 device_map="cuda")
    expected = reference(model, ids, 16)
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK, device="cuda", quantization=quantization)
              for start, end in SPLITS[2]]
    assert greedy(stages, ids, 16) == expected


@pytest.mark.parametrize("given, gpus_in_cluster, expected", [(1, 0, 1.0), (None, 4, 1.0), (None, 1, 0.5),
                                                             (None, 0, 0.0), (0.25, 8, 0.25)])
def test_builder_gives_each_stage_its_gpus(checkpoint, monkeypatch, given, gpus_in_cluster, expected):
    """CPU test: the stages' `ray_actor_options` carry `num_gpus` (given, or shared out of the cluster's)."""
    import ray

    from app import build_app

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": float(gpus_in_cluster)})
    args = {"model": checkpoint("llama"), "num_stages": 2}
    if given is not None:
        args["stage_num_gpus"] = given
    stages = build_app(args)._bound_deployment.init_args[0]
    assert [s._bound_deployment.ray_actor_options["num_gpus"] for s in stages] == [expected, expected]
