"""The search for the smallest bottleneck: which devices take part, and in what order.

The bottleneck of a plan is its slowest stage's time per token. Whether a bottleneck `limit` can
be met is monotone in `limit`, and the optimum is the time of some block range on some device,
so a binary search over those candidate times finds it exactly, given an exact feasibility test.

Feasibility for one `limit`: for a device at block `start`, `reach(start)` is the furthest end its
memory and `limit` allow; it never decreases with `start`, so in a fixed order of devices the best
is to let each take as far as it can reach (a later start never helps the rest). Over orders, a
dynamic program keeps, for each multiset of devices used, the furthest block they can reach.
Devices with the same memory and speed are interchangeable, so the multiset is a count per
device kind: 10 distinct devices make 1024 states, 64 GPUs of two kinds only 33 * 33. Beyond
`MAX_STATES`, a few fixed orders are tried instead (`exact` is then False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from placement.model_spec import ModelSpec

MAX_STATES = 4096  # above this many device multisets, fall back to fixed orders


@dataclass(frozen=True)
class DeviceKind:
    """Devices that are interchangeable for the planner: same usable memory and speed."""

    capacity_bytes: int  # memory for weights and KV cache, after the reserve fraction
    tflops: float
    count: int


@dataclass(frozen=True)
class SearchResult:
    """The smallest bottleneck found and one order of device kinds that meets it."""

    bottleneck_s: float
    kinds: tuple[int, ...]  # index into the kinds, one per stage, in pipeline order
    exact: bool  # True: proven optimal; False: best of the fixed orders tried


def stage_seconds(spec: ModelSpec, start: int, end: int, tflops: float) -> float:
    """Compute time per token of blocks [start, end) at peak `tflops` (2 flops per parameter)."""
    return 2.0 * spec.stage_params(start, end) / (tflops * 1e12)


def fits(spec: ModelSpec, start: int, end: int, capacity_bytes: int, kv_tokens: int) -> bool:
    """Whether blocks [start, end), with the KV cache of `kv_tokens` and their working memory,
    fit in `capacity_bytes`."""
    return spec.stage_bytes(start, end, kv_tokens) <= capacity_bytes


def search(spec: ModelSpec, kinds: tuple[DeviceKind, ...], kv_tokens: int) -> SearchResult | None:
    """The smallest bottleneck over device subsets and orders.

    Args:
        spec: the model.
        kinds: the devices, grouped into kinds; earlier kinds are preferred on ties.
        kv_tokens: tokens of KV cache each stage keeps room for.

    Returns:
        The result, or None if the model does not fit in memory at all.
    """
    exact = _is_exact(kinds)
    check = _check_exact if exact else _check_orders
    if check(spec, kinds, kv_tokens, math.inf) is None:
        return None
    candidates = _candidate_times(spec, kinds)
    low, high = 0, len(candidates) - 1  # the largest candidate is always enough
    while low < high:
        middle = (low + high) // 2
        if check(spec, kinds, kv_tokens, candidates[middle]) is None:
            low = middle + 1
        else:
            high = middle
    order = check(spec, kinds, kv_tokens, candidates[low])
    assert order is not None
    return SearchResult(candidates[low], order, exact)


def fits_in_memory(spec: ModelSpec, kinds: tuple[DeviceKind, ...], kv_tokens: int) -> bool:
    """Whether some plan fits in memory, however slow."""
    check = _check_exact if _is_exact(kinds) else _check_orders
    return check(spec, kinds, kv_tokens, math.inf) is not None


def _is_exact(kinds: tuple[DeviceKind, ...]) -> bool:
    return math.prod(kind.count + 1 for kind in kinds) <= MAX_STATES


def _candidate_times(spec: ModelSpec, kinds: tuple[DeviceKind, ...]) -> list[float]:
    speeds = sorted({kind.tflops for kind in kinds})
    layers = spec.num_layers
    times = {
        stage_seconds(spec, start, end, tflops)
        for tflops in speeds
        for start in range(layers)
        for end in range(start + 1, layers + 1)
    }
    return sorted(times)


def _reach(spec: ModelSpec, kind: DeviceKind, kv_tokens: int, limit: float) -> list[int]:
    """reach[start]: the furthest end blocks [start, end) on `kind` allow; `start` if none."""
    layers = spec.num_layers
    reach = []
    end = 0
    for start in range(layers):
        end = max(end, start)
        while end < layers and (
            fits(spec, start, end + 1, kind.capacity_bytes, kv_tokens)
            and stage_seconds(spec, start, end + 1, kind.tflops) <= limit
        ):
            end += 1
        reach.append(end)
    return reach


def _check_exact(
    spec: ModelSpec, kinds: tuple[DeviceKind, ...], kv_tokens: int, limit: float
) -> tuple[int, ...] | None:
    """The fewest-stage order of kinds that covers every block within `limit`, or None.

    Among orders with the fewest stages, the one using the earliest kinds most is taken.
    """
    layers = spec.num_layers
    reaches = [_reach(spec, kind, kv_tokens, limit) for kind in kinds]
    radix = [1]
    for kind in kinds:
        radix.append(radix[-1] * (kind.count + 1))
    best = [-1] * radix[-1]  # state (counts used per kind, mixed radix) -> furthest block
    parent: list[tuple[int, int] | None] = [None] * radix[-1]
    best[0] = 0
    done = []
    for state in range(radix[-1]):
        start = best[state]
        if start < 0:
            continue
        if start == layers:
            done.append(state)
            continue
        for index, kind in enumerate(kinds):
            if (state // radix[index]) % (kind.count + 1) == kind.count:
                continue
            end = reaches[index][start]
            following = state + radix[index]
            if end > start and end > best[following]:
                best[following] = end
                parent[following] = (state, index)
    if not done:
        return None

    def preference(state: int) -> tuple:
        used = [(state // radix[i]) % (kind.count + 1) for i, kind in enumerate(kinds)]
        return (sum(used), [-count for count in used])

    state = min(done, key=preference)
    order = []
    while parent[state] is not None:
        state, index = parent[state]
        order.append(index)
    return tuple(reversed(order))


def _check_orders(
    spec: ModelSpec, kinds: tuple[DeviceKind, ...], kv_tokens: int, limit: float
) -> tuple[int, ...] | None:
    """Heuristic for large clusters: each of a few fixed device orders, devices skipped when
    they add nothing; the order with the fewest stages that covers every block, or None."""
    layers = spec.num_layers
    reaches = [_reach(spec, kind, kv_tokens, limit) for kind in kinds]
    orders = (
        sorted(range(len(kinds)), key=lambda i: (-kinds[i].tflops, -kinds[i].capacity_bytes)),
        sorted(range(len(kinds)), key=lambda i: (-kinds[i].capacity_bytes, -kinds[i].tflops)),
        sorted(range(len(kinds)), key=lambda i: kinds[i].capacity_bytes / kinds[i].tflops),
        sorted(range(len(kinds)), key=lambda i: (kinds[i].tflops, kinds[i].capacity_bytes)),
        sorted(range(len(kinds)), key=lambda i: (kinds[i].capacity_bytes, kinds[i].tflops)),
    )
    found = []
    for kind_order in orders:
        start, used = 0, []
        for index in kind_order:
            for _ in range(kinds[index].count):
                if start == layers:
                    break
                end = reaches[index][start]
                if end > start:
                    used.append(index)
                    start = end
        if start == layers:
            found.append(tuple(used))
    return min(found, key=len) if found else None
