"""The KV cache blocks of one stage replica, as the scheduler keeps them: a fixed pool, block tables,
and automatic prefix caching (vLLM's design, in plain Python).

A replica's cache is `num_blocks` blocks of `block_size` tokens, allocated once when the stage
starts. A sequence holds a table of blocks per replica of its route, taken as its tokens arrive.
A block that a sequence has filled is keyed by the hash of its token chain (the hash of the block
before it and its own tokens), so that a later sequence whose prompt starts with the same tokens
takes the same blocks instead of computing them again (reference-counted). Freed blocks that hold
a cached prefix stay findable until the pool needs them; the least recently used go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


def chain_hashes(tokens: list[int], block_size: int, salt: int | None = None) -> list[int]:
    """The chain hash of every full block of `tokens` (a chain starting from `salt`)."""
    hashes, parent = [], salt
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        hashes.append(parent)
    return hashes


# A new run of a table starts among empty blocks only where at least this many lie together;
# else it evicts cached prefixes where free blocks do.
MIN_RUN = 8


@dataclass
class BlockTable:
    """One sequence's blocks on one replica: `blocks[i]` holds its tokens `i*block_size ...`."""

    blocks: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks registered in (or taken from) the prefix cache
    last_hash: int | None = None  # the chain hash of block `num_cached_blocks - 1`
    salt: int | None = None  # where its chain starts: a LoRA adapter's blocks hold other keys and values


class BlockPool:
    """Free, used and cached blocks of one replica.

    Args:
        num_blocks: blocks in the replica's cache.
        block_size: tokens per block.
        prefix_caching: key full blocks by their token chain and share them.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a pool needs at least one block of at least one token")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        # Free blocks, least recently used first: a cached one is evicted only when needed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hits = self.queries = 0  # prefix cache: blocks found / blocks looked for

    @property
    def num_free(self) -> int:
        """Blocks that can be taken now (cached ones included: they are evicted when taken)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    @property
    def num_cached(self) -> int:
        """Blocks that hold a cached prefix, used or free."""
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match(self, tokens: list[int], table: BlockTable) -> int:
        """Takes the cached blocks that `tokens` starts with into an empty `table`; returns the
        tokens they hold. At least the last token is always left to compute (its logits are
        needed), so a prompt cached whole gives up its last block."""
        if not self.prefix_caching or table.blocks:
            return 0
        hashes = chain_hashes(tokens[:-1], self.block_size, table.salt)
        self.queries += len(hashes)
        for chain in hashes:
            block = self._by_hash.get(chain)
            if block is None:
                break
            self._take(block)
            table.blocks.append(block)
            table.last_hash = chain
        table.num_cached_blocks = len(table.blocks)
        self.hits += len(table.blocks)
        return len(table.blocks) * self.block_size

    def truncate(self, table: BlockTable, num_blocks: int) -> None:
        """Gives back the blocks of `table` past the first `num_blocks` (those hold no token yet, or
        cached ones another replica of the route lacks)."""
        extra = BlockTable(table.blocks[num_blocks:])
        del table.blocks[num_blocks:]
        if table.num_cached_blocks > num_blocks:
            table.num_cached_blocks = num_blocks
            table.last_hash = self._hash_of[table.blocks[-1]] if table.blocks else None
        self.release(extra)

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Adds blocks to `table` until it holds `num_tokens`; False (nothing taken) when the pool
        has too few free blocks."""
        needed = self.blocks_for(num_tokens) - len(table.blocks)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        for _ in range(needed):
            table.blocks.append(self._take_free(table.blocks[-1] if table.blocks else None, needed))
            needed -= 1
        return True

    def _take_free(self, last: int | None, needed: int) -> int:
        """Takes the free block a table ending at `last` that needs `needed` more gets next
        (`_next_block`), evicting the prefix it held."""
        block = self._next_block(last, needed)
        self._evict(block)
        self._take(block)
        return block

    def _next_block(self, last: int | None, needed: int) -> int:
        """The block a table ending at `last` takes next. Attention reads a run of consecutive
        blocks as one piece (and copies a row of many runs), so a table continues into the block
        after its last where that one is empty; otherwise it starts a new run in the longest
        stretch of empty blocks, if that is at least `MIN_RUN` long: at its start
        when nothing comes before, else where the stretch left after `needed` blocks splits
        evenly between the table before (which may still grow) and this one. Blocks that hold a
        cached prefix are evicted only when the empty ones are used up or scattered, by the same
        rules over every free block (a pool whose free blocks all hold old prefixes, least
        recently used first, would hand out blocks in the order they were freed: interleaved)."""
        for usable in (self._empty, self._is_free):
            if last is not None and usable(last + 1):
                return last + 1
            start, length = self._longest_stretch(usable)
            if length >= MIN_RUN or (length and usable == self._is_free):
                return start if start == 0 else start + max(0, length - needed) // 2
        return next(iter(self._free))

    def _longest_stretch(self, usable) -> tuple[int, int]:
        """(start, length) of the longest stretch of consecutive `usable` blocks, the first of
        equals; (0, 0) when there is none."""
        best, start = (0, 0), None
        for block in range(self.num_blocks + 1):
            if usable(block):
                start = block if start is None else start
            elif start is not None:
                best, start = max(best, (block - start, -start)), None
        return -best[1], best[0]

    def _empty(self, block: int) -> bool:
        """Free and holding no cached prefix."""
        return self._is_free(block) and self._hash_of[block] is None

    def _is_free(self, block: int) -> bool:
        return block < self.num_blocks and block in self._free

    def cache_full_blocks(self, table: BlockTable, tokens: list[int]) -> None:
        """Registers the blocks of `table` that `tokens` (all computed) have filled since the last
        call, by chain hash."""
        if not self.prefix_caching:
            return
        size, full = self.block_size, min(len(tokens) // self.block_size, len(table.blocks))
        for index in range(table.num_cached_blocks, full):
            parent = table.last_hash if index else table.salt
            chain = hash((parent, tuple(tokens[index * size:(index + 1) * size])))
            block = table.blocks[index]
            if chain not in self._by_hash and self._hash_of[block] is None:
                self._by_hash[chain], self._hash_of[block] = block, chain
            table.last_hash = chain  # an equal block cached already: this one stays private
        table.num_cached_blocks = max(table.num_cached_blocks, full)

    def fork(self, table: BlockTable) -> BlockTable:
        """A second table of the same blocks (a beam continuing another): each is shared until
        one of the two writes into it (`unshare`)."""
        for block in table.blocks:
            self._take(block)
        return BlockTable(list(table.blocks), table.num_cached_blocks, table.last_hash, table.salt)

    def unshare(self, table: BlockTable, start: int, end: int) -> list[tuple[int, int]] | None:
        """Copy-on-write before `table` writes tokens `start .. end`: each block of that span that
        another table shares (a fork's, not a cached prefix's, which holds the same tokens) is
        replaced by a new block; returns the (source, copy) pairs the stage copies first, or None
        (nothing changed) when the pool has too few free blocks."""
        size = self.block_size
        shared = [index for index in range(start // size, min(-(-end // size), len(table.blocks)))
                  if self._refs[table.blocks[index]] > 1 and self._hash_of[table.blocks[index]] is None]
        if len(shared) > len(self._free):
            return None
        copies = []
        for index in shared:
            source, block = table.blocks[index], self._take_free(table.blocks[index - 1] if index else None, 1)
            self._refs[source] -= 1
            table.blocks[index] = block
            copies.append((source, block))
        return copies

    def release(self, table: BlockTable) -> None:
        """Gives back every block of `table` (last block first, so that a prefix's head is evicted
        last) and empties it."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None  # most recently used: evicted last
        table.blocks.clear()
        table.num_cached_blocks, table.last_hash = 0, None

    def _take(self, block: int) -> None:
        self._refs[block] += 1
        self._free.pop(block, None)

    def _evict(self, block: int) -> None:
        chain = self._hash_of[block]
        if chain is not None:
            del self._by_hash[chain]
            self._hash_of[block] = None
