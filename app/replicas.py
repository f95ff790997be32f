"""The stage replicas the engine can route through, and the KV cache slots free on each.

A replica that leaves (gone, or no longer listed) is forgotten once no sequence holds a slot on it;
a draining one gets no new sequence and is released (`on_drained`) once it holds none.
"""

from __future__ import annotations

import heapq

from app.sequence import Replica


class ReplicaPool:
    """Replicas of every stage and their free slots.

    Args:
        num_stages: stages in the pipeline.
        on_drained: called with a draining `Replica` once it holds no sequence.
    """

    def __init__(self, num_stages: int, on_drained=None):
        self.num_stages, self.on_drained = num_stages, on_drained
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

    def tidy(self) -> None:
        """Forgets replicas that left and hold nothing; releases drained ones."""
        for replica_id in list(self.free):
            if replica_id not in self.replicas and len(self.free[replica_id]) == self._num_slots[replica_id]:
                del self.free[replica_id], self._num_slots[replica_id]
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
                 "waiting": 0.0 if r.draining else num_waiting / usable[r.stage]}
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
