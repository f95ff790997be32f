"""Splitting a model's blocks into contiguous stages, for a fixed sequence of stages.

`best_split` is exact dynamic programming over split points: first the smallest possible
largest stage cost, then, among the splits that reach it, the one with the smallest sum of
squared costs, which spreads the rest evenly instead of loading the first stages to the brim.
`split_even` uses it to balance stage bytes when the number of stages is given.
"""

from __future__ import annotations

from typing import Callable, Optional

from placement.model_spec import ModelSpec

# cost(stage_index, start, end) -> the cost of blocks [start, end) as that stage, None if they
# cannot be that stage (too big for its memory, say).
StageCost = Callable[[int, int, int], Optional[float]]


def best_split(num_layers: int, num_stages: int, cost: StageCost) -> tuple[list[int], float] | None:
    """Exact split of `num_layers` blocks into `num_stages` non-empty contiguous stages.

    Minimises the largest stage cost, then the sum of squared stage costs; ties go to the
    earliest split point, so the result is deterministic. O(num_stages * num_layers**2) calls.

    Args:
        num_layers: number of blocks.
        num_stages: number of stages, 1..num_layers.
        cost: see `StageCost`.

    Returns:
        (boundaries, bottleneck): `boundaries` has `num_stages + 1` entries from 0 to
        `num_layers`, stage i holds `[boundaries[i], boundaries[i + 1])`; None if no split fits.
    """
    if not 1 <= num_stages <= num_layers:
        return None
    table = _cost_table(num_layers, num_stages, cost)
    bottleneck = _min_max(num_layers, num_stages, table)
    if bottleneck is None:
        return None
    return _min_squares(num_layers, num_stages, table, bottleneck), bottleneck


def split_even(spec: ModelSpec, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous half-open block ranges balancing the bytes each stage holds.

    Stage 0 holds the embeddings and the last stage the head, so they get fewer blocks when
    those are large. Memory is not checked: this is for a fixed number of stages.

    Args:
        spec: the model.
        num_stages: how many stages, 1..spec.num_layers.

    Returns:
        `num_stages` ranges `(start, end)` covering `0..spec.num_layers` in order.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int):
        raise ValueError(f"num_stages must be an integer, got {num_stages!r}")
    if not 1 <= num_stages <= spec.num_layers:
        raise ValueError(f"num_stages must be in 1..{spec.num_layers}, got {num_stages}")
    result = best_split(
        spec.num_layers, num_stages, lambda _, start, end: spec.stage_weight_bytes(start, end)
    )
    assert result is not None  # without memory limits every split fits
    bounds = result[0]
    return [(bounds[i], bounds[i + 1]) for i in range(num_stages)]


def _cost_table(num_layers: int, num_stages: int, cost: StageCost) -> list[dict]:
    """table[i][(start, end)]: cost of blocks [start, end) as stage i, for the ranges it can hold.

    Stage i starts at block i or later and leaves a block for each later stage.
    """
    table = []
    for i in range(num_stages):
        last_end = num_layers - (num_stages - 1 - i)
        entries = {}
        for start in range(i, last_end):
            for end in range(start + 1, last_end + 1):
                if i == 0 and start != 0:
                    break
                if i == num_stages - 1 and end != num_layers:
                    continue
                value = cost(i, start, end)
                if value is not None:
                    entries[(start, end)] = value
        table.append(entries)
    return table


def _min_max(num_layers: int, num_stages: int, table: list[dict]) -> float | None:
    best = {0: 0.0}  # end of the stages so far -> their smallest largest cost
    for i in range(num_stages):
        nxt: dict[int, float] = {}
        for (start, end), value in table[i].items():
            if start in best:
                candidate = max(best[start], value)
                if end not in nxt or candidate < nxt[end]:
                    nxt[end] = candidate
        best = nxt
    return best.get(num_layers)


def _min_squares(num_layers: int, num_stages: int, table: list[dict], limit: float) -> list[int]:
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, (0,))}
    for i in range(num_stages):
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for (start, end), value in table[i].items():
            if start in best and value <= limit:
                squares, bounds = best[start]
                candidate = (squares + value * value, bounds + (end,))
                if end not in nxt or candidate[0] < nxt[end][0]:
                    nxt[end] = candidate
        best = nxt
    return list(best[num_layers][1])
