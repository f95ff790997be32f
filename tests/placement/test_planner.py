"""The planner on tiny specs with exact plans, against brute force, and on time."""

import pickle
import random
import time

import pytest

import placement.search
from placement import GIB, ClusterSpec, InfeasiblePlanError, ModelSpec, plan
from tests.placement.helpers import TINY_LLAMA, assert_valid, naive_optimum, node


def gib_spec(blocks, embed=0, head=0, tied=0, kv_per_token=0) -> ModelSpec:
    """A float16 spec with sizes in GiB (so 2**29 parameters per GiB)."""
    return ModelSpec(
        block_bytes=tuple(int(b * GIB) for b in blocks),
        embed_bytes=int(embed * GIB),
        head_bytes=int(head * GIB),
        tied_bytes=int(tied * GIB),
        kv_bytes_per_token=(kv_per_token,) * len(blocks),
    )


def ranges(result):
    return [(s.start, s.end, s.node, s.gpu) for s in result.stages]


def gib_cluster(*nodes) -> ClusterSpec:
    """Nodes as (name, gpus, memory GiB, tflops)."""
    return ClusterSpec(tuple(node(name, gpus, gib * GIB, tf) for name, gpus, gib, tf in nodes))


def test_fast_big_device_first_slow_small_one_last():
    # 8 blocks of 1 GiB, embeddings 1 GiB, head 1 GiB. big: 8 GiB at 3 TFLOPS, small: 6 GiB at 1.
    # In units of a block's compute: big [0, 7) takes 7/3, small [7, 8) + head 2/1.
    # (small [0, 2) + big [2, 8) ties at 7/3; faster devices come first on ties.)
    spec = gib_spec([1] * 8, embed=1, head=1)
    cluster = gib_cluster(("small", 1, 6, 1), ("big", 1, 8, 3))
    result = plan(spec, cluster, reserve_fraction=0, kv_tokens=0)
    assert ranges(result) == [(0, 7, "big", 0), (7, 8, "small", 0)]
    assert [s.weight_bytes for s in result.stages] == [8 * GIB, 2 * GIB]
    assert result.bottleneck_s == pytest.approx(2 * 7 * 2**29 / 3e12)
    assert result.exact and result.bottleneck_stage == 0
    assert_valid(result, spec, cluster)


def test_a_device_that_cannot_help_is_left_out():
    # 4 blocks of 1 GiB: all on fast (4/10 of a block's time) beats giving slow one block (1/1)
    spec = gib_spec([1] * 4)
    result = plan(spec, gib_cluster(("fast", 1, 8, 10), ("slow", 1, 8, 1)), reserve_fraction=0)
    assert ranges(result) == [(0, 4, "fast", 0)]


def test_tied_embeddings_held_once_by_one_stage_twice_by_two():
    # 2 blocks of 1 GiB; embeddings 1 GiB tied to the head (head = the same 1 GiB matrix)
    spec = gib_spec([1, 1], embed=1, head=1, tied=1)
    one = plan(spec, gib_cluster(("a", 1, 3, 1)), reserve_fraction=0)
    assert ranges(one) == [(0, 2, "a", 0)] and one.stages[0].weight_bytes == 3 * GIB
    two = plan(spec, gib_cluster(("a", 2, 2.5, 1)), reserve_fraction=0)  # 2 GPUs of 2.5 GiB
    assert ranges(two) == [(0, 1, "a", 0), (1, 2, "a", 1)]
    assert two.total_weight_bytes == 4 * GIB  # the last stage holds its own copy


def test_gpu_then_cpu_node():
    # 8 blocks of 1 GiB; the GPU (4 GiB, 100 TFLOPS) takes 4, the CPU node (32 GiB RAM, 1) the rest
    spec = gib_spec([1] * 8)
    result = plan(spec, gib_cluster(("cpu", 0, 32, 1), ("gpu", 1, 4, 100)), reserve_fraction=0)
    assert ranges(result) == [(0, 4, "gpu", 0), (4, 8, "cpu", None)]
    assert result.to_dict()["stages"][1]["gpu"] is None


def test_reserve_and_kv_cache_take_memory():
    # 4 blocks of 1 GiB, 64 KiB of KV cache per token per block. fast: 4 GiB at 10, slow: 4 at 1.
    spec = gib_spec([1] * 4, kv_per_token=64 * 1024)
    cluster = gib_cluster(("fast", 1, 4, 10), ("slow", 1, 4, 1))
    # No reserve, no cache: everything fits on fast, the quickest plan.
    assert ranges(plan(spec, cluster, reserve_fraction=0, kv_tokens=0)) == [(0, 4, "fast", 0)]
    # 25 % reserve leaves 3 GiB; 4096 tokens cost 256 MiB per block: 1.25 GiB a block, 2 a device
    result = plan(spec, cluster, reserve_fraction=0.25, kv_tokens=4096)
    assert ranges(result) == [(0, 2, "fast", 0), (2, 4, "slow", 0)]
    assert [s.kv_bytes for s in result.stages] == [GIB // 2, GIB // 2]
    assert result.stages[0].memory_fraction == pytest.approx(2.5 / 4)


def test_too_little_memory_in_all():
    with pytest.raises(InfeasiblePlanError) as error:
        plan(gib_spec([1] * 4), gib_cluster(("a", 1, 2, 1)), reserve_fraction=0)
    message = str(error.value)
    assert "memory" in message and "need 4.0 GiB" in message and "has 2.0 GiB" in message
    assert "add about 2.0 GiB more" in message
    assert (error.value.needed_bytes, error.value.available_bytes) == (4 * GIB, 2 * GIB)


def test_one_block_larger_than_any_device():
    # 4 GiB in all on two 2 GiB devices, but block 1 alone is 3 GiB
    with pytest.raises(InfeasiblePlanError, match="Block 1 alone needs 3.0 GiB.*2.0 GiB usable"):
        plan(gib_spec([1, 3]), gib_cluster(("a", 2, 2, 1)), reserve_fraction=0)


def test_the_error_survives_pickling():
    error = InfeasiblePlanError("not enough memory", 10, 5, ["--quantization int8"])
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.needed_bytes, copy.available_bytes, copy.suggestions) == (
        "not enough memory", 10, 5, ("--quantization int8",)
    )


def test_no_devices():
    with pytest.raises(InfeasiblePlanError, match="0 device"):
        plan(gib_spec([1]), ClusterSpec(()))


def test_infeasible_names_the_quantization_that_fits():
    # TINY_LLAMA float16: 2 x 73984 + 12800 + 12928 = 173696 bytes; int8: 104064; nf4: 67712
    spec = ModelSpec.from_config(TINY_LLAMA)
    with pytest.raises(InfeasiblePlanError) as error:
        plan(spec, ClusterSpec((node("a", 1, 120_000, 1),)), reserve_fraction=0, kv_tokens=0)
    assert error.value.suggestions == ("--quantization int8", "--quantization nf4")
    with pytest.raises(InfeasiblePlanError) as error:
        plan(spec, ClusterSpec((node("a", 1, 80_000, 1),)), reserve_fraction=0, kv_tokens=0)
    assert error.value.suggestions == ("--quantization nf4",)
    assert "--quantization nf4 (0.0 GiB of weights)" in str(error.value)


def test_arguments_are_validated():
    cluster = gib_cluster(("a", 1, 8, 1))
    with pytest.raises(ValueError, match="reserve_fraction"):
        plan(gib_spec([1]), cluster, reserve_fraction=1.0)
    with pytest.raises(ValueError, match="kv_tokens"):
        plan(gib_spec([1]), cluster, kv_tokens=-1)


def random_case(rng: random.Random):
    num_layers = rng.randint(1, 6)
    spec = ModelSpec(
        block_bytes=tuple(rng.choice([100, 200, 300, 500]) for _ in range(num_layers)),
        embed_bytes=(embed := rng.choice([0, 100, 400])),
        head_bytes=(head := embed if rng.random() < 0.3 else rng.choice([0, 100, 400])),
        tied_bytes=embed if head == embed and rng.random() < 0.5 else 0,
        kv_bytes_per_token=tuple(rng.choice([0, 1, 2]) for _ in range(num_layers)),
    )
    nodes, num_devices = [], 0
    for index in range(rng.randint(1, 3)):
        gpus = min(rng.choice([0, 1, 1, 2]), 4 - num_devices)
        num_devices += max(gpus, 1)
        memory_bytes, tflops = rng.choice([300, 600, 900, 1500]), rng.choice([1, 2, 3, 5])
        nodes.append(node(f"n{index}", gpus, memory_bytes, tflops))
        if num_devices >= 4:
            break
    return spec, ClusterSpec(tuple(nodes)), rng.choice([0.0, 0.1]), rng.choice([0, 10])


def test_matches_brute_force_on_small_random_clusters():
    rng = random.Random(1234)
    feasible = 0
    for _ in range(150):
        spec, cluster, reserve_fraction, kv_tokens = random_case(rng)
        best, fewest = naive_optimum(spec, cluster, reserve_fraction, kv_tokens)
        try:
            result = plan(spec, cluster, reserve_fraction=reserve_fraction, kv_tokens=kv_tokens)
        except InfeasiblePlanError:
            assert best == float("inf")
            continue
        feasible += 1
        assert_valid(result, spec, cluster)
        assert result.exact
        assert result.bottleneck_s == pytest.approx(best, rel=1e-9)
        assert result.num_stages == fewest  # the fewest stages among optimal plans
    assert feasible > 75  # the cases exercise the search, not only the error


def test_heuristic_beyond_the_exact_search_stays_close(monkeypatch):
    monkeypatch.setattr(placement.search, "MAX_STATES", 0)  # as for a cluster of many kinds
    rng = random.Random(99)
    for _ in range(60):
        spec, cluster, reserve_fraction, kv_tokens = random_case(rng)
        best, _ = naive_optimum(spec, cluster, reserve_fraction, kv_tokens)
        try:
            result = plan(spec, cluster, reserve_fraction=reserve_fraction, kv_tokens=kv_tokens)
        except InfeasiblePlanError:
            continue
        assert not result.exact
        assert_valid(result, spec, cluster)
        assert result.bottleneck_s <= 1.25 * best * (1 + 1e-9)


def test_same_cluster_listed_in_any_order_gives_the_same_plan():
    rng = random.Random(7)
    spec = gib_spec([rng.choice([1, 2]) for _ in range(12)], embed=1, head=1)
    nodes = [
        {"name": f"n{i}", "gpus": rng.choice([0, 1, 2]), "memory_gb": rng.choice([4, 8, 8, 16]),
         "tflops": rng.choice([10, 10, 30])}
        for i in range(5)
    ]  # fmt: skip
    first = plan(spec, ClusterSpec.from_dicts(nodes))
    for _ in range(3):
        rng.shuffle(nodes)
        assert plan(spec, ClusterSpec.from_dicts(nodes)) == first


def test_ten_heterogeneous_devices_within_a_second(llama_2_70b):
    nodes = [
        {"name": f"gpu{i}", "gpus": 1, "memory_gb": 8 + 8 * i, "tflops": 20.0 + 31 * i}
        for i in range(9)
    ] + [{"name": "cpu", "gpus": 0, "memory_gb": 512, "tflops": 2.0}]
    cluster = ClusterSpec.from_dicts(nodes)
    started = time.perf_counter()
    result = plan(llama_2_70b, cluster)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"planning took {elapsed:.2f} s"
    assert result.exact and result.num_stages >= 2
    assert_valid(result, llama_2_70b, cluster)


def test_many_devices_of_few_kinds_stay_exact_and_fast(llama_2_70b):
    # 64 GPUs of two kinds: 33 x 33 multisets, not 2**64 subsets
    nodes = [
        {"name": f"n{i}", "gpus": 8, "memory_gb": [24, 80][i % 2], "tflops": [100, 300][i % 2]}
        for i in range(8)
    ]
    cluster = ClusterSpec.from_dicts(nodes)
    started = time.perf_counter()
    result = plan(llama_2_70b, cluster)
    assert time.perf_counter() - started < 2.0
    assert result.exact
    assert_valid(result, llama_2_70b, cluster)
