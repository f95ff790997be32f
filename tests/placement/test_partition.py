"""split_even: a fixed number of stages, balanced by bytes."""

import pytest

from placement import ModelSpec, split_even
from placement.partition import best_split


def uniform(num_layers: int, embed_bytes: int = 0, head_bytes: int = 0) -> ModelSpec:
    return ModelSpec((100,) * num_layers, embed_bytes, head_bytes, (0,) * num_layers)


def test_uniform_blocks_split_evenly():
    assert split_even(uniform(8), 2) == [(0, 4), (4, 8)]
    assert split_even(uniform(8), 1) == [(0, 8)]
    assert split_even(uniform(3), 3) == [(0, 1), (1, 2), (2, 3)]
    # 10 blocks in 4 stages: 3 blocks at most, and the rest spread, not 3-3-3-1
    assert sorted(end - start for start, end in split_even(uniform(10), 4)) == [2, 2, 3, 3]


def test_embeddings_and_head_take_room():
    # blocks 100 bytes each; embeddings 250 bytes on stage 0, head 50 on the last:
    # [0, 3) holds 550, [3, 8) holds 550
    assert split_even(uniform(8, embed_bytes=250, head_bytes=50), 2) == [(0, 3), (3, 8)]
    # a big head (400 bytes): stage 0 [0, 6) = 600, stage 1 [6, 8) = 600
    assert split_even(uniform(8, head_bytes=400), 2) == [(0, 6), (6, 8)]


@pytest.mark.parametrize("num_stages", [0, 9, -1, 2.0, True])
def test_num_stages_is_validated(num_stages):
    with pytest.raises(ValueError, match="num_stages"):
        split_even(uniform(8), num_stages)


def test_best_split_respects_impossible_ranges():
    # stage 1 cannot hold block 0..2's range: only the split at 3 is left
    def cost(stage, start, end):
        if stage == 1 and start < 3:
            return None
        return float(end - start)

    assert best_split(4, 2, cost) == ([0, 3, 4], 3.0)
    assert best_split(4, 2, lambda *_: None) is None
    assert best_split(4, 5, cost) is None
