"""Configs, cluster helpers and brute-force planners shared by the placement tests.

Real architectures' published `config.json` values, written as dicts: there is no hub here.
"""

import itertools
import math

from placement import GIB, ClusterSpec, ModelSpec, NodeSpec

LLAMA_2_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
BLOOM_176B = {
    "model_type": "bloom",
    "n_embed": 14336,
    "n_layer": 70,
    "n_head": 112,
    "vocab_size": 250880,
    "layer_norm_epsilon": 1e-5,
}
MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
}
LLAMA_3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
# A Llama small enough to count by hand (see test_model_spec.py for its sizes).
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "tie_word_embeddings": False,
}


def node(name: str, gpus: int, memory_bytes: float, tflops: float) -> NodeSpec:
    """A node whose memory is given in bytes (exact: GiB is a power of two)."""
    return NodeSpec(name, gpus, memory_bytes / GIB, tflops)


def stage_time(spec: ModelSpec, start: int, end: int, tflops: float) -> float:
    """The planner's cost model, written out again: 2 flops per multiplied parameter."""
    return 2.0 * spec.stage_params(start, end) / (tflops * 1e12)


def stage_need(spec: ModelSpec, start: int, end: int, kv_tokens: int) -> int:
    return spec.stage_weight_bytes(start, end) + spec.stage_kv_bytes(start, end, kv_tokens)


def usable(memory_bytes: int, reserve_fraction: float) -> int:
    return int(memory_bytes * (1.0 - reserve_fraction))


def naive_optimum(spec: ModelSpec, cluster: ClusterSpec, reserve_fraction=0.0, kv_tokens=0):
    """Every ordered choice of distinct devices times every split: (bottleneck, fewest stages).

    Returns (math.inf, None) when nothing fits. Only for a handful of devices and blocks.
    """
    devices = cluster.devices
    layers = spec.num_layers
    best, stages = math.inf, None
    for count in range(1, min(len(devices), layers) + 1):
        for order in itertools.permutations(devices, count):
            for cuts in itertools.combinations(range(1, layers), count - 1):
                bounds = (0, *cuts, layers)
                worst = 0.0
                for device, start, end in zip(order, bounds, bounds[1:]):
                    need = stage_need(spec, start, end, kv_tokens)
                    if need > usable(device.memory_bytes, reserve_fraction):
                        worst = math.inf
                        break
                    worst = max(worst, stage_time(spec, start, end, device.tflops))
                if worst == math.inf:
                    continue
                if worst < best * (1 - 1e-12):
                    best, stages = worst, count
                elif worst <= best * (1 + 1e-12) and count < stages:
                    stages = count
    return best, stages


def branch_and_bound_optimum(spec: ModelSpec, cluster: ClusterSpec, reserve_fraction, kv_tokens):
    """The smallest bottleneck over every sequence of distinct devices and every split.

    Exhaustive over device sequences (devices of equal memory and speed enumerated once), with
    an exact dynamic program over split points along each sequence, cut off where a prefix is
    already no better than the best plan found. For real shapes on a few devices.
    """
    layers = spec.num_layers
    counts: dict = {}
    for device in cluster.devices:
        key = (usable(device.memory_bytes, reserve_fraction), device.tflops)
        counts[key] = counts.get(key, 0) + 1
    options = {}  # kind -> start -> [(end, time)] of the ranges that fit
    for capacity, tflops in counts:
        table = []
        for start in range(layers):
            table.append(
                [
                    (end, stage_time(spec, start, end, tflops))
                    for end in range(start + 1, layers + 1)
                    if stage_need(spec, start, end, kv_tokens) <= capacity
                ]
            )
        options[(capacity, tflops)] = table
    best = [math.inf]

    def extend(reached: dict, left: dict) -> None:
        if layers in reached:
            best[0] = min(best[0], reached[layers])
        for kind, number in left.items():
            if number == 0:
                continue
            following: dict = {}
            for start, value in reached.items():
                if start == layers or value >= best[0]:
                    continue
                for end, time_s in options[kind][start]:
                    worst = max(value, time_s)
                    if worst < best[0] and worst < following.get(end, math.inf):
                        following[end] = worst
            if following:
                extend(following, {**left, kind: number - 1})

    extend({0: 0.0}, counts)
    return best[0]


def assert_valid(result, spec: ModelSpec, cluster: ClusterSpec) -> None:
    """Blocks covered once, in order; every device within its memory and used once."""
    bounds = [stage.start for stage in result.stages] + [result.stages[-1].end]
    assert bounds[0] == 0 and bounds[-1] == spec.num_layers
    assert all(stage.end > stage.start for stage in result.stages)
    assert all(a.end == b.start for a, b in zip(result.stages, result.stages[1:]))
    devices = {(d.node, d.gpu): d for d in cluster.devices}
    used = [(stage.node, stage.gpu) for stage in result.stages]
    assert len(set(used)) == len(used) and set(used) <= set(devices)
    for stage in result.stages:
        device = devices[(stage.node, stage.gpu)]
        assert stage.weight_bytes == spec.stage_weight_bytes(stage.start, stage.end)
        assert stage.memory_bytes == device.memory_bytes
        need = stage.weight_bytes + stage.kv_bytes
        assert need <= usable(device.memory_bytes, result.reserve_fraction)
    assert result.bottleneck_s == max(stage.time_s for stage in result.stages)
