"""LoRA adapters on stages: the rows of one step, each with its own adapter or none, match PEFT."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import Stage
from stages.lora import LoraLinear, Target, check_adapter
from tests.recording import record_reads

peft = pytest.importorskip("peft")

BLOCK = 4  # tokens per KV block
SPLIT = [(0, 3), (3, 6)]
PROMPTS = ("the quick brown fox jumps over the lazy dog", "music of the river", "a city in France and the stone garden")
NUM_TOKENS = 6
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adapter index (1, 2) -> PEFT options; index 0 is the base model.
ADAPTERS = {
    "attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2, 4]),
    "everywhere": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=True,
                       rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 4}),
}


def build_adapter(model_dir: str, path: str, seed: int, **options) -> str:
    """A random PEFT LoRA adapter (B not zero, so that it changes the output), saved to `path`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **options)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, str]:
    """adapter name -> directory, on the tiny Llama."""
    model_dir = checkpoint("llama")
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter(model_dir, str(root / name), seed, **options)
            for seed, (name, options) in enumerate(ADAPTERS.items(), start=1)}


def reference(model, prompt: list[int], num_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits (num_tokens, V) they were taken from, the prefix recomputed each time."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits.append(model(torch.tensor([ids])).logits[0, -1])
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], torch.stack(logits)


@pytest.fixture(scope="module")
def references(checkpoint, adapters) -> list[tuple[list[int], torch.Tensor]]:
    """Per adapter index (0: transformers alone, i: PEFT with the i-th adapter), per prompt."""
    model_dir = checkpoint("llama")
    prompts = [AutoTokenizer.from_pretrained(model_dir)(p).input_ids for p in PROMPTS]
    models = [AutoModelForCausalLM.from_pretrained(model_dir)]
    models += [peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), path)
               for path in adapters.values()]
    return [[reference(model.eval(), p, NUM_TOKENS) for p in prompts] for model in models]


def generate(stages: list[Stage], prompts: list[list[int]], row_adapters: list[int], packed: bool):
    """Greedy tokens and logits per row, all rows in every step (prefill, then decode steps)."""
    tables = [[slot * 16 + i for i in range(16)] for slot in range(len(prompts))]
    out, logits = [[] for _ in prompts], [[] for _ in prompts]
    rows = [list(p) for p in prompts]
    starts = [0] * len(prompts)
    for _ in range(NUM_TOKENS):
        num_new = [len(r) for r in rows]
        if packed:
            inputs = torch.tensor([[t for r in rows for t in r]])
        else:
            inputs = torch.tensor([r + [0] * (max(num_new) - len(r)) for r in rows])
        hidden = inputs
        for stage in stages:
            hidden = stage(hidden, tables, starts, num_new, adapters=row_adapters)
        for i in range(len(prompts)):
            logits[i].append(hidden[i])
            out[i].append(int(hidden[i].argmax()))
        starts = [s + n for s, n in zip(starts, num_new)]
        rows = [[o[-1]] for o in out]
    return out, [torch.stack(row) for row in logits]


@pytest.mark.parametrize("row_adapters", [[1, 2, 0], [2, 2, 2]], ids=["mixed", "one-adapter"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_rows_with_different_adapters_match_peft(checkpoint, adapters, references, packed, row_adapters):
    model_dir = checkpoint("llama")
    prompts = [AutoTokenizer.from_pretrained(model_dir)(p).input_ids for p in PROMPTS]
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK, lora_modules=adapters)
              for start, end in SPLIT]
    assert stages[0].lora_names == ("attention", "everywhere")
    out, logits = generate(stages, prompts, row_adapters, packed)
    for row, index in enumerate(row_adapters):
        expected_tokens, expected_logits = references[index][row]
        assert out[row] == expected_tokens
        torch.testing.assert_close(logits[row], expected_logits, rtol=1e-4, atol=1e-4)


def test_the_adapters_change_the_output(references):
    for index in (1, 2):
        for row in range(len(PROMPTS)):
            assert (references[index][row][1][0] - references[0][row][1][0]).abs().max() > 0.1


def test_check_adapter_reads_ranks_and_scalings_as_peft(checkpoint, adapters):
    plan = check_adapter(checkpoint("llama"), adapters["everywhere"])
    assert len(plan) == 6 * len(ALL_LINEAR)
    assert plan["model.layers.0.self_attn.q_proj"] == Target(8, 16 / math.sqrt(8))  # rsLoRA
    assert plan["model.layers.5.mlp.down_proj"] == Target(2, 16 / math.sqrt(2))  # rank_pattern
    assert plan["model.layers.3.self_attn.o_proj"] == Target(8, 4 / math.sqrt(8))  # alpha_pattern
    plan = check_adapter(checkpoint("llama"), adapters["attention"])
    assert sorted(plan) == [f"model.layers.{i}.self_attn.{m}" for i in (1, 2, 4) for m in ("q_proj", "v_proj")]
    assert set(plan.values()) == {Target(4, 2.0)}


@pytest.mark.parametrize("options", [
    dict(target_modules=r".*\.layers\.[24]\.(self_attn\.k_proj|mlp\.up_proj)"),
    dict(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]),
    dict(target_modules=["o_proj", "gate_proj"], layers_to_transform=[0, 5], layers_pattern="layers"),
    dict(target_modules=["o_proj"], layers_to_transform=3),
], ids=["regex", "all-linear-excluding", "layers-pattern", "one-layer"])
def test_adapters_target_the_layers_peft_targets(checkpoint, tmp_path, options):
    """PEFT saves weights for exactly the layers it targets: `check_adapter` must find the same."""
    model_dir = checkpoint("llama")
    path = build_adapter(model_dir, str(tmp_path / "adapter"), 0, r=2, **options)
    stored = {key.removeprefix("base_model.model.").rpartition(".lora_")[0]
              for key in load_file(os.path.join(path, "adapter_model.safetensors"))}
    assert stored and set(check_adapter(model_dir, path)) == stored


def test_a_stage_reads_only_its_own_blocks_adapter_weights(checkpoint, adapters, monkeypatch):
    opened = record_reads(monkeypatch)
    stage = Stage(checkpoint("llama"), 3, 6, lora_modules=adapters)
    read = opened["adapter_model.safetensors"]
    assert read and all(key.startswith(("base_model.model.model.layers.3.", "base_model.model.model.layers.4.",
                                        "base_model.model.model.layers.5.")) for key in read)
    # "everywhere": 7 layers in each of 3 blocks; "attention": q and v of block 4 only.
    assert len(read) == 2 * (3 * 7 + 2)
    wrapped = {name: module for name, module in stage.named_modules() if isinstance(module, LoraLinear)}
    assert len(wrapped) == 3 * 7
    assert sorted(wrapped["blocks.1.self_attn.q_proj"].scaling) == [1, 2]  # block 4
    assert sorted(wrapped["blocks.0.self_attn.q_proj"].scaling) == [2]


def test_base_rows_on_a_stage_with_adapters_are_the_base_model(checkpoint, adapters):
    model_dir = checkpoint("llama")
    hidden = torch.randn(1, 5, 64)
    plain, with_lora = Stage(model_dir, 3, 6), Stage(model_dir, 3, 6, lora_modules=adapters)
    args = ([[0, 1]], [0], [5])
    expected = plain(hidden, *args)
    assert torch.equal(with_lora(hidden, *args), expected)
    assert torch.equal(with_lora(hidden, *args, adapters=[0]), expected)
    assert not torch.allclose(with_lora(hidden, *args, adapters=[2]), expected)
    with pytest.raises(ValueError, match="names none of the stage's 2 LoRA adapters"):
        with_lora(hidden, *args, adapters=[3])
    with pytest.raises(ValueError, match="1 adapter indices for a step of 2 rows"):
        with_lora(torch.randn(2, 1, 64), [[0], [1]], [0, 0], [1, 1], adapters=[1])


def _edit_config(path: str, **fields) -> None:
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    config.update(fields)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def _edit_tensors(path: str, edit) -> None:
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


A = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"
BAD_ADAPTERS = {  # edit of the "attention" adapter -> the message
    "missing module": (lambda d: _edit_config(d, target_modules=["q_proj", "qkv_proj"]),
                       "target module 'qkv_proj' is not a module of the base model"),
    "rank": (lambda d: _edit_config(d, r=8),
             "lora_A \\(4, 64\\) and lora_B \\(64, 4\\), which do not fit its rank r=8"),
    "hidden size": (lambda d: _edit_tensors(d, lambda t: t.update({A: t[A][:, :32].contiguous()})),
                    "lora_A \\(4, 32\\) and lora_B \\(64, 4\\), but the base layer maps 64 features to 64"),
    "missing B": (lambda d: _edit_tensors(d, lambda t: t.pop(B)), "model.layers.2.self_attn.q_proj has no lora_B"),
    "head": (lambda d: _edit_config(d, target_modules=["q_proj", "lm_head"]), "targets lm_head, outside the blocks"),
    "embeddings": (lambda d: _edit_config(d, target_modules="model.embed_tokens"), "targets model.embed_tokens"),
    "untargeted weights": (lambda d: _edit_config(d, target_modules=["v_proj"]),
                           "holds weights for model.layers.1.self_attn.q_proj, which its config does not target"),
    "dora": (lambda d: _edit_config(d, use_dora=True), "not supported: DoRA"),
    "bias": (lambda d: _edit_config(d, bias="all"), "trained biases"),
    "bin": (lambda d: os.rename(os.path.join(d, "adapter_model.safetensors"), os.path.join(d, "adapter_model.bin")),
            "convert it to safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_with_what_does_not_fit(checkpoint, adapters, tmp_path, case):
    edit, message = BAD_ADAPTERS[case]
    path = shutil.copytree(adapters["attention"], tmp_path / "bad")
    edit(str(path))
    with pytest.raises(ValueError, match=f"LoRA adapter 'bad'.*{message}"):
        check_adapter(checkpoint("llama"), str(path), name="bad")


def test_a_stage_refuses_a_bad_adapter_before_reading_weights(checkpoint, adapters, tmp_path, monkeypatch):
    path = shutil.copytree(adapters["attention"], tmp_path / "bad")
    _edit_config(str(path), r=8)
    opened = record_reads(monkeypatch)
    with pytest.raises(ValueError, match="LoRA adapter 'bad'.*r=8"):
        Stage(checkpoint("llama"), 0, 3, lora_modules={"good": adapters["everywhere"], "bad": str(path)})
    assert not opened


def test_quantized_stages_refuse_adapters(checkpoint, adapters):
    with pytest.raises(ValueError, match="LoRA adapters are not supported on quantized stages"):
        Stage(checkpoint("llama"), 3, 6, quantization="int8", lora_modules=adapters)


def test_stages_do_not_import_peft():
    code = "import sys, stages.lora, stages.stage; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
