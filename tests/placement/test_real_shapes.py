"""Real architectures from their configs alone, on clusters people actually have.

For each: the counted weights match the true parameter count (within 3 %, or 15 % when
quantized: scales, and embeddings and head kept at the dtype, add to the nominal byte per
weight), every device stays within its memory, and the bottleneck is within 1.25x of an
exhaustive search (it is in fact equal: the planner is exact at this size).
"""

import pytest

from placement import GIB, ClusterSpec, InfeasiblePlanError, plan
from tests.placement.helpers import assert_valid, branch_and_bound_optimum


def llama_params(vocab, hidden, inter, layers, heads, kv_heads, experts=1) -> int:
    """Parameters of a Llama/Mixtral decoder, by formula: untied embeddings and LM head."""
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * inter * experts + (hidden * experts if experts > 1 else 0)  # + router
    return 2 * vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden


def bloom_params(vocab, hidden, layers) -> int:
    """BLOOM: tied embeddings with a layer norm, biases everywhere, 4x MLP."""
    block = (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden)  # qkv, dense
    block += (4 * hidden * hidden + 4 * hidden) + (4 * hidden * hidden + hidden) + 4 * hidden
    return vocab * hidden + 2 * hidden + layers * block + 2 * hidden


LLAMA_2_70B_PARAMS = llama_params(32000, 8192, 28672, 80, 64, 8)
BLOOM_176B_PARAMS = bloom_params(250880, 14336, 70)
MIXTRAL_8X7B_PARAMS = llama_params(32000, 4096, 14336, 32, 32, 8, experts=8)
LLAMA_3_8B_PARAMS = llama_params(128256, 4096, 14336, 32, 32, 8)


@pytest.mark.parametrize(
    "formula, published",
    [
        (LLAMA_2_70B_PARAMS, 68.98e9),
        (BLOOM_176B_PARAMS, 176.25e9),
        (MIXTRAL_8X7B_PARAMS, 46.70e9),
        (LLAMA_3_8B_PARAMS, 8.03e9),
    ],
)
def test_formulas_match_published_counts(formula, published):
    assert formula == pytest.approx(published, rel=1e-3)


def check_plan(spec, cluster, true_params, bytes_per_param, tolerance):
    result = plan(spec, cluster)
    assert_valid(result, spec, cluster)
    assert result.total_weight_bytes == pytest.approx(true_params * bytes_per_param, rel=tolerance)
    best = branch_and_bound_optimum(spec, cluster, result.reserve_fraction, result.kv_tokens)
    assert result.bottleneck_s <= 1.25 * best
    assert result.bottleneck_s == pytest.approx(best, rel=1e-9)
    return result


def test_llama_2_70b_float16_on_mixed_gpus(llama_2_70b):
    assert llama_2_70b.num_params == LLAMA_2_70B_PARAMS
    cluster = ClusterSpec.from_dicts(
        [
            {"name": "a100", "gpus": 1, "memory_gb": 80, "tflops": 312},
            {"name": "rtx4090-a", "gpus": 1, "memory_gb": 24, "tflops": 165},
            {"name": "rtx4090-b", "gpus": 1, "memory_gb": 24, "tflops": 165},
            {"name": "t4", "gpus": 1, "memory_gb": 16, "tflops": 65},
            {"name": "dual-3090", "gpus": 2, "memory_gb": 24, "tflops": 71},
        ]
    )
    result = check_plan(llama_2_70b, cluster, LLAMA_2_70B_PARAMS, 2, 0.03)
    assert result.num_stages == 6  # 128 GiB of weights: every device is needed
    assert result.stages[0].node == "a100"  # the fastest device takes the embeddings


def test_bloom_176b_refused_in_float16_fits_in_int8(bloom_176b):
    assert bloom_176b.num_params == BLOOM_176B_PARAMS
    cluster = ClusterSpec.from_dicts([{"name": "dgx", "gpus": 3, "memory_gb": 80, "tflops": 312}])
    with pytest.raises(InfeasiblePlanError) as error:
        plan(bloom_176b, cluster)
    message = str(error.value)
    assert "not enough memory" in message and "240.0 GiB on 3 device(s)" in message
    assert "328.3 GiB" in message  # 176.25e9 parameters x 2 bytes
    assert error.value.suggestions == ("--quantization int8", "--quantization nf4")
    int8 = bloom_176b.with_options(quantization="int8")
    result = check_plan(int8, cluster, BLOOM_176B_PARAMS, 1, 0.15)
    assert result.num_stages == 3


def test_mixtral_8x7b_nf4_on_two_12gb_and_a_laptop(mixtral_8x7b_nf4):
    assert mixtral_8x7b_nf4.num_params == MIXTRAL_8X7B_PARAMS
    cluster = ClusterSpec.from_dicts(
        [
            {"name": "desktop-a", "gpus": 1, "memory_gb": 12, "tflops": 51},
            {"name": "desktop-b", "gpus": 1, "memory_gb": 12, "tflops": 51},
            {"name": "laptop", "gpus": 1, "memory_gb": 8, "tflops": 30},
        ]
    )
    result = check_plan(mixtral_8x7b_nf4, cluster, MIXTRAL_8X7B_PARAMS, 0.5, 0.15)
    assert result.num_stages == 3
    assert result.total_weight_bytes / GIB == pytest.approx(24.5, abs=0.5)


def test_llama_3_8b_bfloat16_on_two_cpu_nodes(llama_3_8b):
    assert llama_3_8b.num_params == LLAMA_3_8B_PARAMS
    cluster = ClusterSpec.from_dicts(
        [
            {"name": "cpu-big", "gpus": 0, "memory_gb": 32, "tflops": 2.0},
            {"name": "cpu-small", "gpus": 0, "memory_gb": 16, "tflops": 1.0},
        ]
    )
    result = check_plan(llama_3_8b, cluster, LLAMA_3_8B_PARAMS, 2, 0.03)
    assert [stage.gpu for stage in result.stages] == [None, None]
    # twice as fast, the big node takes about two thirds of the compute
    assert result.stages[0].node == "cpu-big" and 18 <= result.stages[0].num_blocks <= 24
