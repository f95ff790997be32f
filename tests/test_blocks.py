"""The KV block pool of a replica as the scheduler keeps it: plain Python."""

from __future__ import annotations

from app.blocks import BlockPool, BlockTable, chain_hashes


def test_blocks_are_taken_as_tokens_arrive_and_never_beyond_the_pool():
    pool = BlockPool(num_blocks=4, block_size=4)
    a, b = BlockTable(), BlockTable()
    assert pool.grow(a, 5) and len(a.blocks) == 2  # 5 tokens: 2 blocks
    assert pool.grow(a, 8) and len(a.blocks) == 2  # still fit
    assert pool.grow(a, 9) and len(a.blocks) == 3
    assert not pool.grow(b, 8) and b.blocks == []  # 2 needed, 1 free: nothing taken
    assert pool.grow(b, 4) and pool.num_free == 0
    pool.release(a)
    assert a.blocks == [] and pool.num_free == 3 and pool.num_used == 1


def test_a_shared_prefix_is_computed_once_and_freed_blocks_stay_findable_until_needed():
    pool = BlockPool(num_blocks=6, block_size=4)
    system = list(range(100, 110))  # 10 tokens: 2 full blocks and 2 more tokens
    first, second = BlockTable(), BlockTable()
    assert pool.match(system + [1, 2, 3], first) == 0
    assert pool.grow(first, 13)
    pool.cache_full_blocks(first, system + [1, 2, 3])
    assert pool.num_cached == 3  # 12 of its 13 tokens fill 3 blocks
    # Another request with the same system prompt takes its 2 full blocks.
    assert pool.match(system + [7, 8], second) == 8
    assert second.blocks == first.blocks[:2]
    assert pool.grow(second, 12) and len(second.blocks) == 3 and second.blocks[2] != first.blocks[2]
    pool.release(first)
    pool.release(second)
    assert pool.num_free == 6 and pool.num_cached == 3
    third = BlockTable()
    assert pool.match(system + [1, 2, 3, 4], third) == 12  # still cached after both left
    assert pool.hits == 5 and pool.queries == 8  # 3 + 2 + 3 full blocks looked for


def test_a_prompt_cached_whole_recomputes_its_last_block_and_eviction_is_least_recently_used():
    pool = BlockPool(num_blocks=3, block_size=2)
    tokens = [1, 2, 3, 4]
    a = BlockTable()
    pool.grow(a, 4)
    pool.cache_full_blocks(a, tokens)
    pool.release(a)
    b = BlockTable()
    assert pool.match(tokens, b) == 2  # the last token's logits are needed: its block is computed again
    pool.release(b)
    # Three blocks to take: the cached ones go, the last-freed (least useful: a prefix's tail) first.
    c = BlockTable()
    assert pool.grow(c, 6) and pool.num_cached == 0
    assert pool.match(tokens, BlockTable()) == 0


def runs(table: BlockTable) -> int:
    """Runs of consecutive blocks in `table` (attention reads each as one piece)."""
    return 1 + sum(1 for a, b in zip(table.blocks, table.blocks[1:]) if b != a + 1)


def test_sequences_that_grow_together_each_keep_one_run_of_blocks():
    # 16 sequences decoding side by side take a block each in turn; taken from the front of the
    # free list, every block of a sequence was its own run, and attention copied whole contexts.
    pool = BlockPool(num_blocks=1024, block_size=16, prefix_caching=False)
    tables = [BlockTable() for _ in range(16)]
    for table in tables:
        assert pool.grow(table, 200)
    for tokens in range(201, 1013, 7):
        for table in tables:
            assert pool.grow(table, tokens)
    assert [runs(table) for table in tables] == [1] * 16
    # one that leaves makes room for a newcomer, in one run where the space allows
    pool.release(tables[3])
    newcomer = BlockTable()
    assert pool.grow(newcomer, 500) and runs(newcomer) == 1


def test_a_cached_prefix_is_evicted_only_where_no_stretch_of_empty_blocks_is_left():
    pool = BlockPool(num_blocks=12, block_size=2)
    a = BlockTable()
    pool.grow(a, 4)
    pool.cache_full_blocks(a, [1, 2, 3, 4])
    pool.release(a)  # blocks 0 and 1 free, holding a cached prefix
    b = BlockTable()
    assert pool.grow(b, 16) and b.blocks == list(range(3, 11)) and pool.num_cached == 2
    assert pool.grow(b, 20) and runs(b) == 2 and pool.num_cached == 1  # block 2 alone is no run


def test_blocks_freed_with_old_prefixes_are_still_handed_out_in_runs():
    # Every free block holds an old prefix, least recently used in an interleaved order: taking them
    # in that order gave sequences that grow together a run per block.
    pool = BlockPool(num_blocks=256, block_size=16)
    old = [BlockTable() for _ in range(16)]
    for tokens in range(16, 257, 16):
        for table in old:
            pool.grow(table, tokens)
    for index, table in enumerate(old):
        pool.cache_full_blocks(table, [index] * 256)
        pool.release(table)
    assert pool.num_cached == 256 and pool.num_free == 256
    tables = [BlockTable() for _ in range(16)]
    for tokens in range(24, 257, 8):
        for table in tables:
            assert pool.grow(table, tokens)
    assert max(runs(table) for table in tables) <= 2, [runs(table) for table in tables]


def test_without_prefix_caching_nothing_is_shared():
    pool = BlockPool(num_blocks=4, block_size=2, prefix_caching=False)
    a, b = BlockTable(), BlockTable()
    pool.grow(a, 4)
    pool.cache_full_blocks(a, [1, 2, 3, 4])
    assert pool.num_cached == 0 and pool.match([1, 2, 3, 4, 5], b) == 0


def test_chain_hashes_depend_on_everything_before():
    assert chain_hashes([1, 2, 3, 4, 5], 2)[1] != chain_hashes([9, 9, 3, 4], 2)[1]
    assert len(chain_hashes([1, 2, 3], 2)) == 1
