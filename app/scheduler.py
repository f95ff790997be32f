"""Which sequences go through the pipeline next: admission and the rows of each step.

Plain Python (no torch, no asyncio): running and waiting sequences, the replicas' free slots and
the steps already in flight in; a sequence admitted onto a route, or the rows of the next steps,
out. Prefill rows (a prompt, or a replay after a failure, chunked to `max_prefill_tokens`) and
decode rows (one token each) alternate per route, so that a long prompt does not stall the
decoding sequences for long, and the decoding sequences of a route are shared evenly between its
micro-batches.
"""

from __future__ import annotations

from app.replicas import ReplicaPool
from app.sequence import EngineConfig, Row, Sequence


class Scheduler:
    """Plans steps for the engine.

    Args:
        config: the engine's limits (`max_prefill_tokens`, `num_microbatches`).
        num_stages: stages in the pipeline.
    """

    def __init__(self, config: EngineConfig, num_stages: int):
        self.config, self.num_stages = config, num_stages
        self._last_kind: dict[tuple[str, ...], str] = {}

    def admit(self, waiting: list[Sequence], running: list[Sequence], pool: ReplicaPool) -> None:
        """Moves waiting sequences to `running`, first come first served, while every stage has a
        usable replica with a free slot: each gets the replica with the most free slots."""
        while waiting:
            route = [pool.best(stage) for stage in range(self.num_stages)]
            if None in route:
                return
            seq = waiting.pop(0)
            seq.route = tuple(route)
            seq.slots = [pool.take_slot(replica_id) for replica_id in route]
            running.append(seq)

    def next_batches(self, running: list[Sequence], present: set[str], busy: dict[tuple[str, ...], int]):
        """Yields (route, rows) for every route with room for another step in flight.

        Args:
            running: the admitted sequences.
            present: ids of the replicas that can be reached now.
            busy: steps in flight per route.
        """
        by_route: dict[tuple[str, ...], list[Sequence]] = {}
        routes = {seq.route for seq in running}
        self._last_kind = {route: kind for route, kind in self._last_kind.items() if route in routes}
        for seq in running:
            if (not seq.in_flight and not seq.finished and seq.num_pending > 0
                    and all(replica_id in present for replica_id in seq.route)):
                by_route.setdefault(seq.route, []).append(seq)
        for route, ready in by_route.items():
            for _ in range(busy.get(route, 0), self.config.num_microbatches):
                rows = self._next_batch(route, [s for s in ready if not s.in_flight], running)
                if not rows:
                    break
                for row in rows:  # claimed now: an abort before the step starts must keep the slot
                    row.seq.in_flight = True
                yield route, rows

    def _next_batch(self, route: tuple[str, ...], ready: list[Sequence], running: list[Sequence]) -> list[Row]:
        prefill = [s for s in ready if s.num_pending > 1 or s.needs_all_logits]
        decode = [s for s in ready if s not in prefill]
        if prefill and (not decode or self._last_kind.get(route, "decode") == "decode"):
            self._last_kind[route] = "prefill"
            rows, budget = [], self.config.max_prefill_tokens
            for seq in prefill:
                if budget <= 0:
                    break
                num_new = min(seq.num_pending, budget)
                rows.append(Row(seq, seq.num_cached, num_new))
                budget -= num_new
            return rows
        if not decode:
            return []
        self._last_kind[route] = "decode"
        # Split the route's running sequences evenly between the micro-batches.
        on_route = sum(1 for s in running if s.route == route and not s.finished)
        share = -(-on_route // self.config.num_microbatches)
        return [Row(seq, seq.num_cached, 1) for seq in decode[:max(share, 1)]]
