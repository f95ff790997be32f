"""Byte counts from configs alone: tiny real architectures counted by hand."""

import json

import pytest

from placement import ModelSpec, PartTally
from tests.placement.helpers import TINY_LLAMA

# TINY_LLAMA: hidden 64, intermediate 128, 4 heads of 16, 2 KV heads, vocab 100, untied.
#   block: q 64x64 + k 32x64 + v 32x64 + o 64x64 = 12288, gate/up/down 3 x 128x64 = 24576,
#          two RMSNorms 128  -> 36992 params, 36864 of them in weight matrices (512 rows)
#   embed: 100x64 = 6400;  head: norm 64 + lm_head 100x64 = 6464
#   KV per token per block: K and V of 2 heads x 16 = 64 elements
TINY_GPT2 = {  # Conv1D layers, tied embeddings, learned positions
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "vocab_size": 100,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
TINY_MIXTRAL = {  # transformers 5 keeps the experts as 3-D parameters
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "vocab_size": 100,
}
TINY_QWEN2_MOE = {  # experts, a shared expert, attention biases
    "model_type": "qwen2_moe",
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 4,
    "vocab_size": 100,
}


def test_working_memory_is_the_largest_step_of_the_widest_block_and_the_logits_on_the_last_stage():
    from placement.model_spec import SCORES_COPIES, SCORES_TILE_BYTES, STAGE_RUNTIME_BYTES, WORK_SLACK

    spec = ModelSpec.from_config(TINY_LLAMA)
    # q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64 outputs, and the hidden state 3 times
    assert spec.block_act_numel == (512 + 3 * 64,) * 2 and spec.vocab_size == 100
    assert spec.stage_work_bytes(0, 2) == 0  # no step size: nothing planned
    step = spec.with_step_tokens(512)
    fixed = SCORES_COPIES * SCORES_TILE_BYTES + STAGE_RUNTIME_BYTES
    first = int(WORK_SLACK * 512 * 704 * 2) + fixed  # float16 activations
    assert step.stage_work_bytes(0, 1) == first
    assert step.stage_work_bytes(1, 2) == first + 512 * 100 * 4  # float32 logits of every token
    assert step.stage_bytes(1, 2, 10) == step.stage_weight_bytes(1, 2) + step.stage_kv_bytes(1, 2, 10) + first + 512 * 400
    assert step.with_options(dtype="float32").step_tokens == 512


def test_llama_bytes_per_dtype_and_quantization():
    spec = ModelSpec.from_config(TINY_LLAMA)  # float16 by default
    assert spec.num_layers == 2
    assert spec.block_bytes == (73984, 73984)  # 36992 params x 2 bytes
    assert spec.embed_bytes == 12800 and spec.head_bytes == 12928 and spec.tied_bytes == 0
    assert spec.kv_bytes_per_token == (128, 128)  # 64 elements x 2 bytes
    assert spec.block_params == (36992, 36992) and spec.num_params == 2 * 36992 + 6400 + 6464
    assert ModelSpec.from_config(TINY_LLAMA, dtype="float32").block_bytes == (147968, 147968)
    # int8: 36864 weights x 1 byte + 512 row scales x 4 bytes + 128 norm elements x 2 bytes
    int8 = ModelSpec.from_config(TINY_LLAMA, quantization="int8")
    assert int8.block_bytes == (36864 + 2048 + 256,) * 2
    # nf4: 36864 / 2 bytes + 576 blocks of 64 x 4 bytes + 7 code tables of 64 bytes + 256:
    # embeddings and head unchanged
    nf4 = ModelSpec.from_config(TINY_LLAMA, quantization="nf4")
    assert nf4.block_bytes == (18432 + 2304 + 7 * 64 + 256,) * 2
    assert (nf4.embed_bytes, nf4.head_bytes, nf4.kv_bytes_per_token) == (12800, 12928, (128, 128))
    assert nf4.block_params == spec.block_params  # compute does not shrink
    assert spec.with_options(quantization="nf4") == nf4
    assert nf4.with_options(quantization=None, dtype="float16") == spec
    assert ModelSpec.from_config(TINY_LLAMA, quantization="none").quantization is None


def test_gpt2_conv1d_and_tied_embeddings():
    # block: ln_1 64, c_attn 32x96 + 96, c_proj 32x32 + 32, ln_2 64, c_fc 32x128 + 128,
    #        mlp.c_proj 128x32 + 32 -> 12704 params; matrices 12288 with 96+32+128+32 = 288 rows
    # embed: wte 100x32 + wpe 64x32 = 5248; head: ln_f 64 + lm_head tied to wte 3200 = 3264
    spec = ModelSpec.from_config(TINY_GPT2)
    assert spec.block_bytes == (25408, 25408)
    assert (spec.embed_bytes, spec.head_bytes, spec.tied_bytes) == (10496, 6528, 6400)
    assert spec.stage_weight_bytes(0, 1) == 10496 + 25408  # stage 0: embeddings
    assert spec.stage_weight_bytes(1, 2) == 25408 + 6528  # last stage: its own copy of wte
    assert spec.total_weight_bytes == 10496 + 2 * 25408 + 6528 - 6400  # one stage: wte once
    assert spec.num_params == 5248 + 2 * 12704 + 64
    int8 = ModelSpec.from_config(TINY_GPT2, quantization="int8")
    assert int8.block_bytes == (12288 + 288 * 4 + 416 * 2,) * 2


def test_mixtral_expert_parameters_are_quantized():
    # block: attention 12288 (192 rows), router 4x64 = 256 (stays at dtype), norms 128,
    #        experts.gate_up_proj 4x256x64 = 65536 (1024 rows), down_proj 4x64x128 = 32768
    #        (256 rows) -> 110976 params, 110592 in matrices, 1472 rows, 1728 nf4 blocks,
    #        6 quantized tensors (q, k, v, o, gate_up_proj, down_proj)
    tallies = ModelSpec.from_config(TINY_MIXTRAL).tallies
    assert tallies.blocks[0] == PartTally(
        params=110976, float_numel=384, matrix_numel=110592, matrix_rows=1472, matrix_groups=1728,
        matrix_count=6
    )
    assert ModelSpec.from_config(TINY_MIXTRAL).block_bytes[0] == 221952
    assert ModelSpec.from_config(TINY_MIXTRAL, quantization="int8").block_bytes[0] == 117248
    assert ModelSpec.from_config(TINY_MIXTRAL, quantization="nf4").block_bytes[0] == 62976 + 6 * 64


def test_qwen2_moe_shared_expert_and_biases():
    # block: q/k/v/o 4096+2048+2048+4096 with biases 64+32+32, router 256, norms 128,
    #        experts gate_up 4x64x64 = 16384, down 4x64x32 = 8192,
    #        shared expert 3 x 64x64 = 12288, shared_expert_gate 1x64 (a Linear: quantized)
    block = ModelSpec.from_config(TINY_QWEN2_MOE).tallies.blocks[1]
    assert (block.params, block.float_numel, block.matrix_numel) == (49728, 512, 49216)
    assert block.matrix_rows == 192 + 256 + 256 + 192 + 1


def test_embedding_side_modules_go_to_stage_zero():
    # BLOOM: word_embeddings 100x64 + word_embeddings_layernorm 128 on stage 0; head: ln_f 128 +
    # the tied matrix. OPT: embed_tokens 100x32, embed_positions 2050x64, project_in 64x32 on
    # stage 0; project_out 32x64, final_layer_norm 128, the tied lm_head 100x32 on the last.
    bloom = ModelSpec.from_config({**TINY_GPT2, "model_type": "bloom", "n_embed": 64})
    assert (bloom.embed_params, bloom.head_params, bloom.tied_bytes) == (6528, 6528, 12800)
    opt = ModelSpec.from_config(
        {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128,
         "num_attention_heads": 4, "vocab_size": 100, "word_embed_proj_dim": 32}
    )  # fmt: skip
    assert (opt.embed_params, opt.head_params, opt.tied_bytes) == (136448, 5376, 6400)


def test_kv_fallbacks_head_dim_and_layer_types():
    gpt2 = ModelSpec.from_config(TINY_GPT2)  # no num_key_value_heads: every head is cached
    assert gpt2.kv_bytes_per_token == (2 * 4 * 8 * 2,) * 2
    wide = ModelSpec.from_config({**TINY_LLAMA, "head_dim": 32})  # explicit head_dim wins
    assert wide.kv_bytes_per_token == (2 * 2 * 32 * 2,) * 2
    assert wide.stage_kv_bytes(0, 2, kv_tokens=10) == 10 * 2 * 256
    hybrid = ModelSpec.from_config(  # linear-attention layers keep a state, not a KV cache
        {"model_type": "qwen3_next", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "vocab_size": 100, "num_experts": 4, "moe_intermediate_size": 32,
         "shared_expert_intermediate_size": 32, "linear_num_value_heads": 4,
         "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
    )  # fmt: skip
    assert hybrid.kv_bytes_per_token == (0, 0, 0, 2 * 2 * 16 * 2)


def test_from_model_dir_reads_only_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert ModelSpec.from_model_dir(tmp_path, "bfloat16") == ModelSpec.from_config(
        TINY_LLAMA, "bfloat16"
    )
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelSpec.from_model_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_type"):
        ModelSpec.from_config({"model_type": "no-such-model"})


def test_hand_written_spec_defaults_and_validation():
    # 3 blocks of 100 bytes in float16: 50 params each
    spec = ModelSpec((100, 100, 100), embed_bytes=40, head_bytes=60, kv_bytes_per_token=(8, 8, 8))
    assert spec.block_params == (50, 50, 50) and spec.head_params == 30
    assert spec.stage_weight_bytes(0, 3) == 400 and spec.stage_weight_bytes(1, 2) == 100
    assert spec.stage_params(2, 3) == 80 and spec.stage_params(0, 1) == 50  # lookups are free
    with pytest.raises(ValueError, match="with_options|tallies"):
        spec.with_options(quantization="int8")
    with pytest.raises(ValueError, match="one entry per block"):
        ModelSpec((100,), 0, 0, kv_bytes_per_token=(1, 2))
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec((100,), 0, 0, (0,), dtype="float8")
    with pytest.raises(ValueError, match="quantization"):
        ModelSpec((100,), 0, 0, (0,), quantization="int4")
    with pytest.raises(ValueError, match="tied_bytes"):
        ModelSpec((100,), 10, 10, (0,), tied_bytes=20)


@pytest.mark.parametrize(
    "config, blocks_prefix",
    [
        (TINY_LLAMA, "model.layers."),
        (TINY_GPT2, "transformer.h."),
        (TINY_MIXTRAL, "model.layers."),
        (TINY_QWEN2_MOE, "model.layers."),
        ({**TINY_GPT2, "model_type": "bloom", "n_embed": 64}, "transformer.h."),
    ],
)
def test_counts_equal_a_real_models_state_dict(config, blocks_prefix):
    """The meta-device count equals the bytes of a real (tiny, random) model's tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_config(config, dtype="bfloat16")
    model = AutoModelForCausalLM.from_config(spec_config(config)).to(torch.bfloat16)
    per_block, outside = [0] * spec.num_layers, 0
    for name, tensor in model.state_dict().items():  # tied: both names, as two stages hold it
        size = tensor.numel() * tensor.element_size()
        if name.startswith(blocks_prefix):
            per_block[int(name[len(blocks_prefix) :].split(".")[0])] += size
        else:
            outside += size
    assert tuple(per_block) == spec.block_bytes
    assert outside == spec.embed_bytes + spec.head_bytes


def spec_config(config):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
