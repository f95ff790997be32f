"""Quantized stages (int8, nf4) and mixture-of-experts checkpoints, against transformers.

Dense models: N quantized stages must equal transformers loaded in one process with the same
`BitsAndBytesConfig`, token for token (one sequence at a time: int8's outlier columns depend on
the batch). Experts, which transformers does not quantize, are checked against transformers with
each expert's matrix put through the same bitsandbytes round trip, and their agreement with the
unquantized experts is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from placement import ModelSpec
from stages import Stage
from stages.loading import weight_map
from tests.checkpoints import build_llama_125m
from tests.recording import record_reads
from tests.test_stages import BLOCK, PROMPT, SPLITS, contiguous, greedy, step

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny mixtures of experts, 6 blocks like the dense ones (see tests/checkpoints.py).
MOE = {
    "mixtral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, num_local_experts=4,
                    num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, num_experts=4,
                      num_experts_per_tok=2, tie_word_embeddings=False),
}


def bnb_config(quantization: str, **kwargs) -> BitsAndBytesConfig:
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **kwargs)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=False, **kwargs)


def reference_model(model_dir: str, quantization: str, *, round_trip_experts: bool = False, **kwargs):
    """transformers with a BitsAndBytesConfig; experts optionally through bitsandbytes' round trip."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(quantization, **kwargs),
                                                 experts_implementation="eager")
    for module in model.modules():
        # bitsandbytes 0.50's CPU nf4 repacking asserts 32-row blocks and crashes on Qwen2-MoE's
        # 1-row shared_expert_gate; the stage sends such layers down the generic path, so must this.
        if type(module).__name__ == "Linear4bit" and module.out_features % 32:
            module.support_avx512bf16_for_cpu = False
    if round_trip_experts:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 3:
                    param.copy_(torch.stack([round_trip(param[e], quantization) for e in range(len(param))]))
    return model


def round_trip(weight: torch.Tensor, quantization: str) -> torch.Tensor:
    """One expert's matrix quantized and dequantized by bitsandbytes, as a stage stores it."""
    import bitsandbytes.functional as F

    if quantization == "nf4":
        return F.dequantize_4bit(*F.quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4"))
    data, scale, _ = F.int8_vectorwise_quant(weight.to(torch.float16))
    return F.int8_vectorwise_dequant(data, scale).to(weight.dtype)


def generate(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt_ids):].tolist(), [logits[0].float() for logits in out.logits]


def teacher_forced(stages: list[Stage], prompt_ids: list[int], tokens: list[int], slot: int) -> list[torch.Tensor]:
    """The stages' logits at each step when fed `tokens` (not their own choices), in the blocks of `slot`."""
    blocks = contiguous(slot)
    logits = [step(stages, torch.tensor([prompt_ids]), [blocks(len(prompt_ids))], [0], [len(prompt_ids)])[0]]
    for i, token in enumerate(tokens[:-1]):
        length = len(prompt_ids) + i + 1
        logits.append(step(stages, torch.tensor([[token]]), [blocks(length)], [length - 1], [1])[0])
    return logits


def prompt_ids(model_dir: str) -> list[int]:
    return AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_quantized_stages_match_transformers_bitsandbytes(checkpoint, arch, quantization, num_stages):
    model_dir = checkpoint(arch)
    ids = prompt_ids(model_dir)
    expected, _ = generate(reference_model(model_dir, quantization), ids, 16)
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK, quantization=quantization)
              for start, end in SPLITS[num_stages]]
    assert greedy(stages, ids, 16) == expected


@pytest.mark.parametrize("first, second", [("nf4", None), (None, "nf4"), ("int8", "nf4")])
def test_mixed_plan_matches_transformers_quantizing_the_same_blocks(checkpoint, first, second):
    """Stage 0 and stage 1 quantized differently; the reference quantizes the same blocks the same way."""
    model_dir = checkpoint("llama")
    ids = prompt_ids(model_dir)
    stages = [Stage(model_dir, 0, 3, num_blocks=64, block_size=BLOCK, quantization=first),
              Stage(model_dir, 3, 6, num_blocks=64, block_size=BLOCK, quantization=second)]
    # transformers skips the blocks of the float stage; lm_head must be named: it is the default skip.
    float_blocks = range(0, 3) if first is None else range(3, 6) if second is None else []
    skip = [f"model.layers.{i}" for i in float_blocks] + ["lm_head"]
    reference = reference_model(model_dir, second or first, llm_int8_skip_modules=skip)
    if first and second:  # one BitsAndBytesConfig cannot mix: blocks 0-2 from a second model
        other = reference_model(model_dir, first)
        for i in range(3):
            reference.model.layers[i] = other.model.layers[i]
    expected, _ = generate(reference, ids, 16)
    assert greedy(stages, ids, 16) == expected


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("arch", sorted(MOE))
def test_moe_checkpoints_stored_per_expert_load_and_match_transformers(checkpoint, arch, num_stages):
    """transformers saves experts one matrix each and merges them on load; so does a stage."""
    model_dir = checkpoint(arch, **MOE[arch])
    assert any(".experts.0." in name for name in weight_map(model_dir))  # stored per expert
    ids = prompt_ids(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    expected = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK) for start, end in SPLITS[num_stages]]
    assert greedy(stages, ids, 32) == expected[0, len(ids):].tolist()


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("arch", sorted(MOE))
def test_quantized_experts(checkpoint, arch, quantization):
    """Exact against transformers with round-tripped experts; agreement with float experts shown."""
    model_dir = checkpoint(arch, **MOE[arch])
    ids = prompt_ids(model_dir)
    exact_tokens, exact_logits = generate(reference_model(model_dir, quantization, round_trip_experts=True), ids, 32)
    float_tokens, float_logits = generate(reference_model(model_dir, quantization), ids, 32)
    for num_stages in (2, 3):
        stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK, quantization=quantization)
                  for start, end in SPLITS[num_stages]]
        assert greedy(stages, ids, 32, contiguous(0)) == exact_tokens
        ours = teacher_forced(stages, ids, exact_tokens, slot=1)
        exact_diff = max(float((a - b).abs().max()) for a, b in zip(ours, exact_logits))
        assert exact_diff <= 1e-4
    ours = teacher_forced(stages, ids, float_tokens, slot=2)
    agree = sum(int(a.argmax()) == t for a, t in zip(ours, float_tokens)) / len(float_tokens)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, float_logits))
    spread = max(float(b.max() - b.min()) for b in float_logits)
    print(f"{arch} {quantization}: vs transformers' float experts, argmax agreement {agree:.0%}, "
          f"max logit difference {diff:.3f} (logit range {spread:.2f}); vs round-tripped {exact_diff:.1e}")
    assert agree >= (0.75 if quantization == "int8" else 0.25)  # random tiny models: flat, close logits
    assert diff < 0.5 * spread


@pytest.mark.parametrize("quantization", [None, "int8", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_weight_bytes_match_the_planner(checkpoint, arch, quantization):
    model_dir = checkpoint(arch, **MOE.get(arch, {}))
    spec = ModelSpec.from_model_dir(model_dir, dtype="float32", quantization=quantization)
    for start, end in [(0, 3), (3, 6), (0, 6), (2, 4)]:
        stage = Stage(model_dir, start, end, quantization=quantization)
        # Rotary frequencies are recomputed, not loaded: the planner leaves them out.
        rotary = sum(b.numel() * b.element_size() for b in stage.rotary.buffers()) if stage.rotary else 0
        held = stage.weight_bytes() - rotary
        planned = spec.stage_weight_bytes(start, end)
        assert held == planned, (start, end, held, planned)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_moe_stage_reads_only_its_own_tensors(checkpoint, monkeypatch, quantization):
    model_dir = checkpoint("mixtral", max_shard_size="100KB", **MOE["mixtral"])
    opened = record_reads(monkeypatch)
    Stage(model_dir, 2, 4, quantization=quantization)
    read = [key for keys in opened.values() for key in keys]
    assert read and all(key.startswith(("model.layers.2.", "model.layers.3.")) for key in read)
    assert len(read) == len(set(read))  # each stored tensor read once
    assert sum(".experts." in key for key in read) == 2 * 4 * 3  # blocks x experts x (w1, w2, w3)


def test_bitsandbytes_is_imported_only_when_quantizing(checkpoint):
    model_dir = checkpoint("llama")
    code = ("import sys, stages\nfrom stages import Stage\nStage(sys.argv[1], 0, 3)\n"
            "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported'\n"
            "Stage(sys.argv[1], 0, 3, quantization='nf4')\nassert 'bitsandbytes' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code, model_dir], check=True, cwd=REPO,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))


PEAK_SCRIPT = """
import json, sys
import torch, bitsandbytes, transformers.models.llama.modeling_llama  # the libraries: not the stage's
from stages import Stage
from tests.test_stages import step

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

model_dir, quantization, start, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = peak()
stage = Stage(model_dir, start, end, quantization=None if quantization == "none" else quantization,
              num_blocks=4, block_size=16)
with torch.no_grad():  # float weights kept from the checkpoint's memory map become resident
    for tensor in [*stage.parameters(), *stage.buffers()]:
        if tensor.is_floating_point() and not tensor.is_mkldnn:  # packed ones are copies, resident
            tensor.sum()
loaded = peak()
inputs = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]) if start == 0 else torch.randn(1, 8, stage.config.hidden_size)
step([stage], inputs, [[0]], [0], [8])
print(json.dumps({"load_peak": loaded - base, "step_peak": peak() - base, "weight_bytes": stage.weight_bytes()}))
"""


@pytest.fixture(scope="module")
def llama_125m(tmp_path_factory):
    return build_llama_125m(str(tmp_path_factory.mktemp("llama125m") / "llama-125m"))


def test_quantizing_while_loading_keeps_the_peak_low(llama_125m):
    """Peak RSS of building one stage of the 125M Llama, over a process with the same imports."""
    result = {}
    for quantization in ("none", "int8", "nf4"):
        for start, end in ((0, 6), (6, 12)):
            out = subprocess.run([sys.executable, "-W", "ignore", "-c", PEAK_SCRIPT, llama_125m, quantization,
                                  str(start), str(end)], cwd=REPO, capture_output=True, text=True, timeout=300,
                                 env=dict(os.environ, HF_HUB_OFFLINE="1"))
            assert out.returncode == 0, out.stderr[-3000:]
            result[quantization, start] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    for (quantization, start), r in sorted(result.items()):
        print(f"{quantization:>4} [{start}, {start + 6}): weights {r['weight_bytes'] / mib:.0f} MiB, "
              f"load peak {r['load_peak'] / mib:.0f} MiB, after one step {r['step_peak'] / mib:.0f} MiB")
    for start in (0, 6):
        share = result["none", start]["weight_bytes"]  # the float32 stage's weights
        nf4, int8 = result["nf4", start], result["int8", start]
        assert result["none", start]["load_peak"] >= 0.9 * share  # the measure sees the weights
        assert nf4["load_peak"] < 0.6 * share and nf4["load_peak"] < 1.3 * nf4["weight_bytes"]
        assert int8["load_peak"] < 0.7 * share and int8["load_peak"] < 1.3 * int8["weight_bytes"]
