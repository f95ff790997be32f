"""Which sequences go through the pipeline next: admission, the rows of each step, pre-emption.

Plain Python (no torch, no asyncio): running and waiting sequences, the replicas' free slots and
KV blocks and the steps already in flight in; a sequence admitted onto a route, or the rows of
the next steps, out. A sequence is admitted when every replica of its route has a batch slot and
blocks for all its tokens (those of a cached prefix are shared, not computed again). When a
decoding sequence needs a block and a replica has none free, the most recently admitted sequence
that is not in a step is pre-empted: its blocks are freed and it waits again, to resume by
replaying its prompt and tokens so far (vLLM's recompute pre-emption). A step carries a route's
decoding sequences (one token each, shared evenly between its micro-batches) and chunks of its
prompts (or replays after a failure) within `max_num_batched_tokens`, so that a long prompt
does not stall the sequences decoding around it (vLLM v1's chunked prefill); a prompt's next
chunk follows the one before down the pipeline, in a step of its own, before that one is back.
"""

from __future__ import annotations

from app.blocks import BlockTable
from app.replicas import ReplicaPool
from app.sequence import EngineConfig, Row, Sequence


class Scheduler:
    """Plans steps for the engine.

    Args:
        config: the engine's limits (`max_num_batched_tokens`, `num_microbatches`).
        num_stages: stages in the pipeline.
    """

    def __init__(self, config: EngineConfig, num_stages: int):
        self.config, self.num_stages = config, num_stages
        self._last_kind: dict[tuple[str, ...], str] = {}
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache instead of computed
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.preempted: list[Sequence] = []  # since the engine last looked

    def admit(self, waiting: list[Sequence], running: list[Sequence], pool: ReplicaPool) -> None:
        """Moves waiting sequences to `running`, first come first served, while every stage has a
        usable replica with a free slot and blocks for the sequence's tokens: each gets the replica
        with the most free slots. A beam search's sequences are admitted together, on one route
        (the first computes the prompt; the others wait for its first step, see `app.beam`)."""
        while waiting:
            route = [pool.best(stage) for stage in range(self.num_stages)]
            if None in route:
                return
            seq = waiting[0]
            route = tuple(route)
            group = seq.beam.seqs[1:] if seq.beam is not None else []
            if any(len(pool.free[r]) <= len(group) for r in route):
                return
            # Sequences that report prompt log-probabilities compute their whole prompt.
            tables, cached = (pool.match_prefix(route, seq.tokens, seq.salt) if not seq.prompt_logprobs
                              else ([BlockTable(salt=seq.salt) for _ in route], 0))
            seq.route, seq.tables, seq.slots = route, tables, [pool.take_slot(r) for r in route]
            if not pool.grow(seq, len(seq.tokens)):
                pool.release(seq)
                seq.route = seq.tables = seq.slots = None
                return
            waiting.pop(0)
            for other in group:
                other.route, other.tables = route, [BlockTable(salt=other.salt) for _ in route]
                other.slots, other.num_cached = [pool.take_slot(r) for r in route], 0
                running.append(other)
            seq.num_cached = cached
            self.cached_tokens += cached
            self.queried_tokens += len(seq.tokens) if pool.prefix_caching and not seq.prompt_logprobs else 0
            running.append(seq)

    def next_batches(self, running: list[Sequence], present: set[str], in_flight: list[tuple[tuple[str, ...], bool]],
                     waiting: list[Sequence], pool: ReplicaPool):
        """Yields (route, rows) for every route with room for another step in flight.

        A route has at most `num_microbatches` steps with decoding sequences in flight. Beside them, a
        prompt's next chunk does not wait for the one before to come back: it follows it down
        the pipeline (each stage computes a route's steps in the order they come) in a step of
        prompt chunks alone, so that the stages a step has left do not idle while the decoding
        sequences wait for it; up to one step per stage in flight. (Alone, a prompt's chunks
        take the budget and their stage's every core: on a node that stages share, two at once
        fight for the cores.)

        Args:
            running: the admitted sequences.
            present: ids of the replicas that can be reached now.
            in_flight: (route, whether it carries decoding sequences) of each step in flight.
            waiting: where pre-empted sequences go (first).
            pool: the replicas' slots and blocks.
        """
        by_route: dict[tuple[str, ...], list[Sequence]] = {}
        routes = {seq.route for seq in running}
        self._last_kind = {route: kind for route, kind in self._last_kind.items() if route in routes}
        for seq in running:
            if (seq.num_unscheduled > 0 and not seq.finished and not seq.parked and self._free(seq)
                    and all(replica_id in present for replica_id in seq.route)):
                by_route.setdefault(seq.route, []).append(seq)
        for route, ready in by_route.items():
            steps = sum(1 for r, _ in in_flight if r == route)
            decoding = sum(1 for r, decodes in in_flight if r == route and decodes)
            limit = max(self.config.num_microbatches, self.num_stages if self._decoding(route, running) else 0)
            while steps < limit:
                ready = [s for s in ready if s.num_unscheduled > 0 and s.route == route and self._free(s)]
                rows = self._next_batch(route, ready, running, decode=decoding < self.config.num_microbatches)
                kept: list[Row] = []
                for row in rows:  # a row pre-empted for an earlier one waits
                    if row.seq.route is not None and self._blocks_for(row, running, waiting, pool, kept):
                        kept.append(row)
                if not kept:
                    break
                for row in kept:  # claimed now: an abort before the step starts must keep the slot
                    row.seq.in_flight += 1
                    row.seq.num_computing += row.num_new
                steps, decoding = steps + 1, decoding + any(row.decode for row in kept)
                yield route, kept

    @staticmethod
    def _decoding(route: tuple[str, ...], running: list[Sequence]) -> bool:
        """Whether sequences decode on `route` (their next step waits for the route's others)."""
        return any(s.route == route and s.num_pending == 1 and not s.finished for s in running)

    @staticmethod
    def _free(seq: Sequence) -> bool:
        """Whether a step may carry `seq`: it is in none, or its prompt's chunks may follow one
        another (those of a sequence that wants every position's logits come back first)."""
        return not seq.in_flight or (seq.num_pending > 1 and not seq.needs_all_logits)

    def _blocks_for(self, row: Row, running: list[Sequence], waiting: list[Sequence], pool: ReplicaPool,
                    kept: list[Row]) -> bool:
        """Whether the row's sequence has blocks for its tokens on every replica of its route, and
        blocks of its own where it writes into blocks a beam shares (`row.copies`), pre-empting the
        most recently admitted sequences not in a step (nor kept for this one) until it does. A
        beam search is pre-empted whole, when none of its sequences is in a step or this one's
        group, and starts again from its prompt."""
        seq, taken = row.seq, {id(r.seq) for r in kept}
        mine = set(map(id, seq.beam.seqs)) if seq.beam is not None else {id(seq)}
        while not self._claim(row, pool):
            victims = [s for s in running if not s.in_flight and id(s) not in mine and s.route is not None
                       and id(s) not in taken and (s.beam is None or s.beam.idle()
                                                   and not taken & set(map(id, s.beam.seqs)))]
            if not victims:
                return False  # it waits for a step in flight to end
            victim = victims[-1]
            for other in victim.beam.seqs if victim.beam is not None else [victim]:
                if other in running:
                    running.remove(other)
                if other.route is not None:
                    pool.release(other)
                other.route = other.tables = other.slots = None
                other.num_cached = 0
            if victim.beam is not None:
                victim.beam.restart()
                victim = victim.beam.seqs[0]
            waiting.insert(0, victim)
            self.preempted.append(victim)
        return True

    def _within_loras(self, ready: list[Sequence]) -> list[Sequence]:
        """The sequences of `ready`, in order, whose LoRA adapters (or none) fit in one step:
        `max_loras` adapters at most; the others wait for a step with room."""
        adapters: set[int] = set()
        kept = []
        for seq in ready:
            if seq.adapter and seq.adapter not in adapters:
                if len(adapters) == self.config.max_loras:
                    continue
                adapters.add(seq.adapter)
            kept.append(seq)
        return kept

    @staticmethod
    def _claim(row: Row, pool: ReplicaPool) -> bool:
        """Blocks for the row's tokens, its own where they go into blocks a beam shares."""
        if not pool.grow(row.seq, row.start + row.num_new):
            return False
        row.copies = pool.unshare(row.seq, row.start, row.start + row.num_new)
        return row.copies is not None

    def _next_batch(self, route: tuple[str, ...], ready: list[Sequence], running: list[Sequence],
                    decode: bool = True) -> list[Row]:
        """The rows of the route's next step, vLLM v1's chunked prefill: its decoding sequences
        first (one token each; split evenly between the micro-batches), then chunks of waiting
        prompts in what is left of `max_num_batched_tokens`. The stages take such a step packed
        (every row's tokens in one row), so a decode row costs one token beside a chunk.
        Sequences that want logits at every prompt position (echo with log-probabilities) take
        steps of their own, padded, alternating with the others. `decode` False: prompt chunks
        only."""
        ready = self._within_loras(sorted(ready, key=lambda s: s.num_pending != 1))  # decode rows first
        echo = [s for s in ready if s.needs_all_logits] if decode else []  # never in flight here (`_free`)
        if echo and (len(echo) == len(ready) or self._last_kind.get(route) != "echo"):
            self._last_kind[route] = "echo"
            # Rows are padded to the widest: the step computes rows x widest positions, and that
            # (what the stages' working memory is planned for) stays within the budget.
            rows, width, budget = [], 0, self.config.max_num_batched_tokens
            for seq in echo:
                cap = budget // (len(rows) + 1)
                if width > cap or cap < 1:
                    break
                num_new = min(seq.num_pending, cap)
                rows.append(Row(seq, seq.num_cached, num_new))
                width = max(width, num_new)
            return rows
        if decode:
            self._last_kind[route] = "mixed"
        decoding = [s for s in ready if s.num_pending == 1 and not s.needs_all_logits] if decode else []
        on_route = sum(1 for s in running if s.route == route and not s.finished)
        share = -(-on_route // self.config.num_microbatches)
        rows = [Row(seq, seq.num_cached, 1, decode=True) for seq in decoding[:max(share, 1)]]
        budget = self.config.max_num_batched_tokens - len(rows)
        # Beside decoding sequences a prompt's chunk costs at most what its last chunk of
        # `long_prefill_token_threshold` tokens costs: they wait for this step (or, in a step of
        # prompt chunks alone, their next step waits behind it). Alone it takes the budget.
        capped = self.config.long_prefill_token_threshold > 0 and (bool(rows) or self._decoding(route, running))
        for seq in ready:
            if budget < 1:
                break
            if seq.num_pending > 1 and not seq.needs_all_logits:
                start = seq.num_cached + seq.num_computing
                cap = self._chunk_cap(seq, start) if capped else budget
                rows.append(Row(seq, start, min(seq.num_unscheduled, budget, cap)))
                budget -= rows[-1].num_new
        return rows

    def _chunk_cap(self, seq: Sequence, start: int) -> int:
        """The most of `seq`'s tokens from `start` a step beside decode rows carries: as many as cost
        what its last `long_prefill_token_threshold` would. A token costs its blocks' matrices
        plus attention to each token before it, `1 / attention_cost_tokens` of that each, so a
        chunk costs more the later it comes and the early ones can be larger (vLLM caps every
        chunk at the threshold: `attention_cost_tokens` 0)."""
        threshold, scale = self.config.long_prefill_token_threshold, self.config.attention_cost_tokens
        if not scale:
            return threshold
        end = len(seq.tokens)

        def cost(start: int, n: int) -> float:  # in tokens without context
            return n + (n * start + n * (n - 1) / 2) / scale

        allowed = cost(max(end - threshold, 0), threshold)
        # the largest n with cost(start, n) <= allowed: n^2 / 2C + n (1 + (start - 1/2) / C) = allowed
        a, b = 1 / (2 * scale), 1 + (start - 0.5) / scale
        return max(threshold, int((-b + (b * b + 4 * a * allowed) ** 0.5) / (2 * a)))
