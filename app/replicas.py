"""The stage replicas the engine can route through, the batch slots free on each, and each one's
KV cache blocks (`app.blocks.BlockPool`).

A replica that leaves (gone, or no longer listed) is forgotten once no sequence holds a slot on it;
a draining one gets no new sequence and is released (`on_drained`) once it holds none.
"""

from __future__ import annotations

import heapq

from app.blocks import BlockPool, BlockTable
from app.sequence import Replica, Sequence


class ReplicaPool:
    """Replicas of every stage and their free slots.

    Args:
        num_stages: stages in the pipeline.
        on_drained: called with a draining `Replica` once it holds no sequence.
        prefix_caching: share the KV blocks of equal prompt prefixes (see `app.blocks`).
    """

    def __init__(self, num_stages: int, on_drained=None, prefix_caching: bool = True):
        self.num_stages, self.on_drained, self.prefix_caching = num_stages, on_drained, prefix_caching
        self.blocks: dict[str, BlockPool] = {}
        self.replicas: dict[str, Replica] = {}
        self.free: dict[str, list[int]] = {}  # free slots of every replica a sequence may still hold
        self._num_slots: dict[str, int] = {}
        self.gone: set[str] = set()  # replicas whose process went away
        self._released: set[str] = set()  # draining replicas told they hold nothing

    def set(self, replicas: list[Replica]) -> list[Replica]:
        """The replicas there are now; returns the new ones (to watch)."""
        self.replicas = {r.id: r for r in replicas if r.id not in self.gone}
        new = []
        for replica in self.replicas.values():
            if replica.id not in self.free:
                self.free[replica.id] = list(range(replica.num_slots))
                self._num_slots[replica.id] = replica.num_slots
                self.blocks[replica.id] = BlockPool(replica.num_blocks, replica.block_size, self.prefix_caching)
                new.append(replica)
        self.tidy()
        return new

    def drop(self, replica_id: str) -> None:
        """A replica's process went away."""
        self.gone.add(replica_id)
        self.replicas.pop(replica_id, None)

    def take_slot(self, replica_id: str) -> int:
        return heapq.heappop(self.free[replica_id])

    def free_slot(self, replica_id: str, slot: int) -> None:
        if replica_id in self.free:
            heapq.heappush(self.free[replica_id], slot)

    def release(self, seq: Sequence, stage: int | None = None, slots: bool = True) -> None:
        """Gives back a sequence's slot and blocks on every replica of its route (or one stage's;
        its blocks only, without `slots`)."""
        stages = range(len(seq.route)) if stage is None else [stage]
        for i in stages:
            replica_id = seq.route[i]
            if slots:
                self.free_slot(replica_id, seq.slots[i])
            if replica_id in self.blocks:
                self.blocks[replica_id].release(seq.tables[i])

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Gives the sequence blocks for `num_tokens` on every replica of its route; False when one
        has too few free (blocks taken on the others stay with the sequence)."""
        return all([self.blocks[r].grow(table, num_tokens) for r, table in zip(seq.route, seq.tables)])

    def fork(self, seq: Sequence) -> list[BlockTable]:
        """Tables sharing every block of the sequence's on its route (see `BlockPool.fork`)."""
        return [self.blocks[r].fork(table) for r, table in zip(seq.route, seq.tables)]

    def unshare(self, seq: Sequence, start: int, end: int) -> list[list[tuple[int, int]]] | None:
        """Copy-on-write on every replica of the route before the sequence writes tokens `start ..
        end`: per stage, the (source, copy) block pairs to copy first; None when a replica has
        too few free blocks (the blocks unshared on the others stay unshared)."""
        copies = [self.blocks[r].unshare(table, start, end) for r, table in zip(seq.route, seq.tables)]
        return None if None in copies else copies

    def cache_computed(self, seq: Sequence) -> None:
        """Registers the blocks its computed tokens have filled, for sequences with the same prefix."""
        tokens = seq.tokens[:seq.num_cached]
        for replica_id, table in zip(seq.route, seq.tables):
            if replica_id in self.blocks:
                self.blocks[replica_id].cache_full_blocks(table, tokens)

    def match_prefix(self, route: tuple[str, ...], tokens: list[int], salt: int | None = None
                     ) -> tuple[list[BlockTable], int]:
        """New block tables on `route` (chains from `salt`) holding the longest cached prefix of
        `tokens` that every replica of the route has; (tables, the tokens they hold)."""
        tables = [BlockTable(salt=salt) for _ in route]
        matched = [self.blocks[r].match(tokens, table) for r, table in zip(route, tables)]
        cached = min(matched)
        for replica_id, table in zip(route, tables):
            self.blocks[replica_id].truncate(table, cached // self.blocks[replica_id].block_size)
        return tables, cached

    def move(self, seq: Sequence) -> bool:
        """Moves the sequence off the replicas of its route that are gone or draining, to another
        replica of the stage with a slot and blocks for its tokens; whether it moved."""
        moved = False
        for stage, replica_id in enumerate(seq.route):
            if self.usable(replica_id):
                continue
            other = self.best(stage)
            table = BlockTable(salt=seq.salt)
            if other is None or not self.blocks[other].grow(table, len(seq.tokens)):
                continue  # a draining replica goes on serving it; a gone one is waited for
            self.release(seq, stage)
            route = list(seq.route)
            route[stage], seq.slots[stage], seq.tables[stage] = other, self.take_slot(other), table
            seq.route, moved = tuple(route), True
        return moved

    def max_sequence_tokens(self) -> int:
        """The longest sequence every stage could hold (in its largest usable replica's pool)."""
        best = [0] * self.num_stages
        for replica in self.replicas.values():
            if not replica.draining:
                best[replica.stage] = max(best[replica.stage], self.blocks[replica.id].tokens)
        return min(best)

    def tidy(self) -> None:
        """Forgets replicas that left and hold nothing; releases drained ones."""
        for replica_id in list(self.free):
            if replica_id not in self.replicas and len(self.free[replica_id]) == self._num_slots[replica_id]:
                del self.free[replica_id], self._num_slots[replica_id], self.blocks[replica_id]
        for replica in self.replicas.values():
            if (replica.draining and replica.id not in self._released
                    and len(self.free[replica.id]) == replica.num_slots):
                self._released.add(replica.id)
                if self.on_drained is not None:
                    self.on_drained(replica)

    def usable(self, replica_id: str) -> bool:
        replica = self.replicas.get(replica_id)
        return replica is not None and not replica.draining

    def best(self, stage: int) -> str | None:
        """The usable replica of `stage` with the most free slots."""
        best = None
        for replica in self.replicas.values():
            if replica.stage == stage and not replica.draining and self.free[replica.id]:
                if best is None or len(self.free[replica.id]) > len(self.free[best]):
                    best = replica.id
        return best

    def load(self, num_waiting: int) -> list[dict]:
        """Each known replica, the sequences it holds, and its share of those waiting for a slot."""
        usable = [0] * self.num_stages
        for replica in self.replicas.values():
            usable[replica.stage] += not replica.draining
        return [{"id": r.id, "stage": r.stage, "address": r.address, "draining": r.draining,
                 "sequences": r.num_slots - len(self.free[r.id]),
                 "waiting": 0.0 if r.draining else num_waiting / usable[r.stage],
                 "blocks": {"used": self.blocks[r.id].num_used, "free": self.blocks[r.id].num_free,
                            "cached": self.blocks[r.id].num_cached, "total": self.blocks[r.id].num_blocks}}
                for r in sorted(self.replicas.values(), key=lambda r: (r.stage, r.id))]

    def available(self) -> bool:
        """Every stage has a replica that takes sequences."""
        return len({r.stage for r in self.replicas.values() if not r.draining}) == self.num_stages

    @property
    def num_free_slots(self) -> int:
        """Sequences that could start now: the free slots of the tightest stage."""
        free = [0] * self.num_stages
        for replica in self.replicas.values():
            if not replica.draining:
                free[replica.stage] += len(self.free[replica.id])
        return min(free)
