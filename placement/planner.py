"""The planner: block ranges and a device for each stage, the slowest stage as fast as can be.

A plan is a sequence of stages, each a contiguous half-open block range `[start, end)` on one
device, covering every block once and in order. Its bottleneck is the largest stage time per
token (stage parameters / device TFLOPS); the plan minimises it subject to every device's memory:
weights, plus the KV cache of `kv_tokens` tokens for its blocks, plus the working memory of its
largest step (`ModelSpec.stage_work_bytes`, when the spec has `step_tokens`), within the device's
memory less `reserve_fraction` of it (CUDA context, other processes, slack). Among optimal plans it takes
the fewest stages (fewer hops), then spreads the blocks so stage times are as even as possible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from placement.cluster import GIB, ClusterSpec, DeviceSpec
from placement.model_spec import ModelSpec, precision_label
from placement.partition import best_split
from placement.search import DeviceKind, fits, fits_in_memory, search, stage_seconds

DEFAULT_RESERVE_FRACTION = 0.05  # of each device: CUDA context, other processes, slack
DEFAULT_KV_TOKENS = 4096  # KV cache each stage keeps room for, for its own blocks
_MAX_REBALANCE_WORK = 2_000_000  # stages * layers**2 above which the greedy split is kept


class InfeasiblePlanError(ValueError):
    """The model does not fit in the cluster's memory; the message says by how much."""

    def __init__(self, message: str, needed_bytes: int, available_bytes: int, suggestions=()):
        super().__init__(message)
        self.needed_bytes = needed_bytes  # weights + KV cache, in one copy
        self.available_bytes = available_bytes  # all devices' memory after the reserve
        self.suggestions = tuple(suggestions)  # e.g. ("--quantization int8", ...)

    def __reduce__(self):  # keeps the fields when pickled, e.g. across Ray processes
        args = (str(self), self.needed_bytes, self.available_bytes, self.suggestions)
        return (type(self), args)


@dataclass(frozen=True)
class StageSpec:
    """One stage of a plan: blocks `[start, end)` on one device."""

    start: int
    end: int  # exclusive
    node: str
    gpu: int | None  # index on its node; None on a CPU-only node
    weight_bytes: int  # weights held, embeddings (stage 0) and head (last stage) included
    kv_bytes: int  # KV cache of the planned number of tokens for these blocks
    memory_bytes: int  # the device's whole memory
    params: int  # parameters multiplied per token (embedding lookups left out)
    tflops: float
    time_s: float  # compute time per token at peak TFLOPS
    work_bytes: int = 0  # working memory of its largest step (`ModelSpec.stage_work_bytes`)

    @property
    def num_blocks(self) -> int:
        """Blocks in this stage."""
        return self.end - self.start

    @property
    def device(self) -> str:
        """`node:gpuN` or `node:cpu`."""
        return f"{self.node}:cpu" if self.gpu is None else f"{self.node}:gpu{self.gpu}"

    @property
    def memory_fraction(self) -> float:
        """Share of the device's memory the weights, KV cache and working memory take."""
        return (self.weight_bytes + self.kv_bytes + self.work_bytes) / self.memory_bytes


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order, and how the plan was made."""

    stages: tuple[StageSpec, ...]
    bottleneck_s: float  # the slowest stage's time per token
    exact: bool  # True: proven optimal bottleneck; False: best of the heuristic orders tried
    dtype: str
    quantization: str | None
    reserve_fraction: float
    kv_tokens: int
    model_type: str = ""

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stages)

    @property
    def total_weight_bytes(self) -> int:
        """Weights over all stages (a tied head counted on its own stage)."""
        return sum(stage.weight_bytes for stage in self.stages)

    @property
    def bottleneck_stage(self) -> int:
        """Index of the slowest stage (the first, on ties)."""
        times = [stage.time_s for stage in self.stages]
        return times.index(max(times))

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data: per stage its fields, device and shares."""
        total_time = sum(stage.time_s for stage in self.stages)
        stages = []
        for stage in self.stages:
            entry = asdict(stage)
            entry.update(
                num_blocks=stage.num_blocks,
                device=stage.device,
                memory_fraction=stage.memory_fraction,
                time_share=stage.time_s / total_time if total_time else 0.0,
            )
            stages.append(entry)
        return {
            "stages": stages,
            "num_stages": self.num_stages,
            "num_layers": self.stages[-1].end,
            "bottleneck_s": self.bottleneck_s,
            "bottleneck_stage": self.bottleneck_stage,
            "total_weight_bytes": self.total_weight_bytes,
            "total_kv_bytes": sum(stage.kv_bytes for stage in self.stages),
            "total_work_bytes": sum(stage.work_bytes for stage in self.stages),
            "exact": self.exact,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "reserve_fraction": self.reserve_fraction,
            "kv_tokens": self.kv_tokens,
        }


def plan(
    spec: ModelSpec,
    cluster: ClusterSpec,
    *,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
    kv_tokens: int = DEFAULT_KV_TOKENS,
) -> Plan:
    """Places the model's blocks on the cluster's devices, minimising the bottleneck.

    Args:
        spec: the model.
        cluster: the devices.
        reserve_fraction: share of each device's memory kept free for activations and slack.
        kv_tokens: tokens of KV cache each stage keeps room for.

    Returns:
        The plan.

    Raises:
        InfeasiblePlanError: if the model does not fit in the cluster's memory.
    """
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    if isinstance(kv_tokens, bool) or not isinstance(kv_tokens, int) or kv_tokens < 0:
        raise ValueError(f"kv_tokens must be an integer >= 0, got {kv_tokens!r}")
    kinds, members = _group_devices(cluster, reserve_fraction)
    result = search(spec, kinds, kv_tokens)
    if result is None:
        raise explain_infeasible(spec, cluster, reserve_fraction, kv_tokens)
    bounds = _boundaries(spec, [kinds[i] for i in result.kinds], kv_tokens, result.bottleneck_s)
    unused = {index: list(devices) for index, devices in enumerate(members)}
    stages = []
    for position, kind_index in enumerate(result.kinds):
        device = unused[kind_index].pop(0)
        start, end = bounds[position], bounds[position + 1]
        stages.append(_stage(spec, device, start, end, kv_tokens))
    return Plan(
        stages=tuple(stages),
        bottleneck_s=max(stage.time_s for stage in stages),
        exact=result.exact,
        dtype=spec.dtype,
        quantization=spec.quantization,
        reserve_fraction=reserve_fraction,
        kv_tokens=kv_tokens,
        model_type=spec.model_type,
    )


def capacity_bytes(device: DeviceSpec, reserve_fraction: float) -> int:
    """Memory of `device` that weights and KV cache may use."""
    return int(device.memory_bytes * (1.0 - reserve_fraction))


def _group_devices(
    cluster: ClusterSpec, reserve_fraction: float
) -> tuple[tuple[DeviceKind, ...], list[list[DeviceSpec]]]:
    """Kinds of interchangeable devices, fastest (then largest) first, and their devices.

    Faster kinds come first so that ties between equally good plans go to faster devices; the
    devices of a kind keep the cluster's (name-sorted) order.
    """
    groups: dict[tuple[int, float], list[DeviceSpec]] = {}
    for device in cluster.devices:
        key = (capacity_bytes(device, reserve_fraction), device.tflops)
        groups.setdefault(key, []).append(device)
    keys = sorted(groups, key=lambda key: (-key[1], -key[0]))
    kinds = tuple(DeviceKind(key[0], key[1], len(groups[key])) for key in keys)
    return kinds, [groups[key] for key in keys]


def _boundaries(
    spec: ModelSpec, kinds: list[DeviceKind], kv_tokens: int, bottleneck_s: float
) -> list[int]:
    """Split points for stages on `kinds` in order: exact and evened out when affordable,
    else each stage as far as it reaches."""

    def cost(index: int, start: int, end: int) -> float | None:
        kind = kinds[index]
        if not fits(spec, start, end, kind.capacity_bytes, kv_tokens):
            return None
        return stage_seconds(spec, start, end, kind.tflops)

    if len(kinds) * spec.num_layers**2 <= _MAX_REBALANCE_WORK:
        result = best_split(spec.num_layers, len(kinds), cost)
        assert result is not None and result[1] <= bottleneck_s
        return result[0]
    bounds = [0]
    for index in range(len(kinds)):
        end = bounds[-1] + 1
        while end < spec.num_layers:
            time_s = cost(index, bounds[-1], end + 1)
            if time_s is None or time_s > bottleneck_s:
                break
            end += 1
        bounds.append(end)
    assert bounds[-1] == spec.num_layers  # the search met the bottleneck this very way
    return bounds


def _stage(spec: ModelSpec, device: DeviceSpec, start: int, end: int, kv_tokens: int) -> StageSpec:
    return StageSpec(
        start=start,
        end=end,
        node=device.node,
        gpu=device.gpu,
        weight_bytes=spec.stage_weight_bytes(start, end),
        kv_bytes=spec.stage_kv_bytes(start, end, kv_tokens),
        work_bytes=spec.stage_work_bytes(start, end),
        memory_bytes=device.memory_bytes,
        params=spec.stage_params(start, end),
        tflops=device.tflops,
        time_s=stage_seconds(spec, start, end, device.tflops),
    )


def explain_infeasible(
    spec: ModelSpec, cluster: ClusterSpec, reserve_fraction: float, kv_tokens: int
) -> InfeasiblePlanError:
    """The error for a model that does not fit: what it needs, what there is, what would fit."""
    weights = spec.total_weight_bytes
    kv_bytes = spec.stage_kv_bytes(0, spec.num_layers, kv_tokens)
    devices = cluster.devices
    usable = sum(capacity_bytes(device, reserve_fraction) for device in devices)
    precision = precision_label(spec.dtype, spec.quantization)
    message = (
        f"not enough memory: the model's weights ({precision}) need {_gib(weights)} GiB, plus "
        f"{_gib(kv_bytes)} GiB of KV cache for {kv_tokens} tokens: {_gib(weights + kv_bytes)} GiB; "
        f"the cluster has {_gib(cluster.memory_bytes)} GiB on {len(devices)} device(s), "
        f"{_gib(usable)} GiB after reserving {reserve_fraction:.0%} of each."
    )
    largest = max((capacity_bytes(device, reserve_fraction) for device in devices), default=0)
    widest = max(
        range(spec.num_layers),
        key=lambda i: spec.stage_bytes(i, i + 1, kv_tokens),
    )
    widest_bytes = spec.stage_bytes(widest, widest + 1, kv_tokens)
    if widest_bytes > largest:
        message += (
            f" Block {widest} alone needs {_gib(widest_bytes)} GiB but the largest device has "
            f"{_gib(largest)} GiB usable."
        )
    suggestions = _fitting_alternatives(spec, cluster, reserve_fraction, kv_tokens)
    if suggestions:
        options = " or ".join(f"{flags} ({note})" for flags, note in suggestions)
        message += f" It would fit with {options}."
    else:
        missing = weights + kv_bytes - usable
        more = f"about {_gib(missing)} GiB more" if missing > 0 else "larger devices or more"
        message += f" To fit, add {more} device memory (or lower --kv-tokens/--step-tokens/--reserve-fraction)."
    flags = [flag for flag, _ in suggestions]
    return InfeasiblePlanError(message, weights + kv_bytes, usable, flags)


def _fitting_alternatives(
    spec: ModelSpec, cluster: ClusterSpec, reserve_fraction: float, kv_tokens: int
) -> list[tuple[str, str]]:
    """Smaller dtypes and quantizations that would fit, as (flags, weights note)."""
    if spec.tallies is None:
        return []
    dtypes = [spec.dtype] + (["float16"] if spec.dtype == "float32" else [])
    order = [None, "int8", "nf4"]
    quantizations = order[order.index(spec.quantization) :]
    kinds, _ = _group_devices(cluster, reserve_fraction)
    found = []
    for dtype in dtypes:
        for quantization in quantizations:
            if (dtype, quantization) == (spec.dtype, spec.quantization):
                continue
            other = spec.with_options(dtype=dtype, quantization=quantization)
            if fits_in_memory(other, kinds, kv_tokens):
                flags = [f"--dtype {dtype}"] if dtype != spec.dtype else []
                flags += [f"--quantization {quantization}"] if quantization else []
                note = f"{_gib(other.total_weight_bytes)} GiB of weights"
                found.append((" ".join(flags), note))
    return found


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f}"
