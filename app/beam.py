"""Beam search, as transformers' `generate(num_beams=...)` runs it, over the engine's sequences.

`BeamSearch` is the search alone (plain Python): each step it takes every running beam's most
likely next tokens (the last stage returns them, best first) and keeps the `width` best
continuations, moving those that end (an end-of-sequence token, or the token budget reached) to
the finished hypotheses, scored by their log-probability over their length to the power
`length_penalty`. It follows transformers' `_beam_search` step for step (its top-K of
`max(2, 1 + EOS ids) * width` continuations, only the best `width` of them may finish, its early
stop heuristic), so that its beams are transformers' beams.

`BeamGroup` binds a search to the `width` sequences of one request: slot i of the group runs beam
i. After a step, a slot whose beam continues another slot's takes a fork of that slot's KV blocks
(`app.blocks.BlockPool.fork`: shared, and copied block by block only where the two write
differently), so no beam computes its prompt again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.blocks import BlockTable

if TYPE_CHECKING:
    from app.replicas import ReplicaPool
    from app.sampling import Choice
    from app.sequence import Sequence


@dataclass
class Beam:
    """A running beam: its tokens after the prompt and their summed log-probability."""

    tokens: list[int] = field(default_factory=list)
    score: float = 0.0


@dataclass
class Hypothesis:
    """A finished beam: its tokens (the end-of-sequence token included) and its score (summed
    log-probability over its length to the power `length_penalty`)."""

    tokens: list[int]
    score: float
    ended: bool  # by an end-of-sequence token (else by the token budget)


def num_alternatives(width: int, num_eos: int) -> int:
    """Continuations a beam's row must return: transformers keeps the best `max(2, 1 + EOS ids) *
    width` of every beam's, and EOS ids masked before `min_tokens` may take that many places."""
    return max(2, 1 + num_eos) * width + num_eos


class BeamSearch:
    """transformers' beam search (one prompt), step by step.

    Args:
        width: beams kept (`num_beams`), and hypotheses returned.
        max_tokens: tokens a beam generates at most (`max_new_tokens`).
        eos_token_ids: the tokens that end a beam (empty: none does).
        length_penalty: a hypothesis scores its log-probability / length ** length_penalty.
        early_stopping: True: stop once `width` hypotheses are finished; False: also when no
            running beam can beat the worst of them at its current length; "never": only when
            none could at any length (transformers' three settings).
        min_tokens: end-of-sequence tokens are masked until this many tokens exist.
    """

    def __init__(self, width: int, max_tokens: int, eos_token_ids: tuple[int, ...] = (),
                 length_penalty: float = 1.0, early_stopping: bool | str = False, min_tokens: int = 0):
        if width < 1 or max_tokens < 1:
            raise ValueError("beam search needs a width and a token budget of at least 1")
        self.options = (width, max_tokens, eos_token_ids, length_penalty, early_stopping, min_tokens)
        self.width, self.max_tokens, self.eos = width, max_tokens, frozenset(eos_token_ids)
        self.length_penalty, self.early_stopping, self.min_tokens = length_penalty, early_stopping, min_tokens
        self.keep = max(2, 1 + len(self.eos)) * width
        self.running = [Beam()]  # transformers starts with `width` equal beams, all but one at -1e9
        self.finished: list[Hypothesis] = []  # best first, at most `width`
        self.improvable = True
        self.done = False

    def step(self, tops: list[list[tuple[int, float]]]) -> list[tuple[int, int]]:
        """One step: `tops[i]` holds running beam i's most likely next tokens as (token,
        log-probability), best first (at least `num_alternatives`). Returns the new running beams
        as (the beam each continues, its token), best first; none once the search is done."""
        length = len(self.running[0].tokens) + 1  # of every continuation
        candidates = sorted(((beam.score + logprob, i, token) for i, beam in enumerate(self.running)
                             for token, logprob in tops[i][:self.keep + len(self.eos)]
                             if not (token in self.eos and length - 1 < self.min_tokens)),
                            key=lambda c: -c[0])[:self.keep]
        at_limit = length >= self.max_tokens
        ends = [at_limit or token in self.eos for _, _, token in candidates]
        # only the best `width` continuations may finish; the others are there to continue
        full = len(self.finished) == self.width and self.early_stopping is True
        if self.improvable and not full:
            for (score, i, token), end in zip(candidates[:self.width], ends):
                if end:
                    tokens = self.running[i].tokens + [token]
                    self.finished.append(Hypothesis(tokens, score / length ** self.length_penalty,
                                                    token in self.eos))
            self.finished = sorted(self.finished, key=lambda h: -h.score)[:self.width]
        picks = [(i, token, score) for (score, i, token), end in zip(candidates, ends) if not end][:self.width]
        self.running = [Beam(self.running[i].tokens + [token], score) for i, token, score in picks]
        self._check_improvable(length)
        self.done = (at_limit or not self.improvable or not self.running
                     or (self.early_stopping is True and len(self.finished) == self.width))
        return [] if self.done else [(i, token) for i, token, _ in picks]

    def _check_improvable(self, length: int) -> None:
        """transformers' heuristic: can the best running beam still beat the worst finished one?"""
        if len(self.finished) < self.width or not self.running:
            return
        best_length = self.max_tokens if self.early_stopping == "never" and self.length_penalty > 0 else length
        best = self.running[0].score / best_length ** self.length_penalty
        self.improvable = self.improvable and best > self.finished[-1].score

    def best(self) -> list[Hypothesis]:
        """The finished hypotheses, best first (when done), `width` of them: running beams, scored
        as if they ended now, fill the places no hypothesis took."""
        running = [Hypothesis(beam.tokens, beam.score / max(len(beam.tokens), 1) ** self.length_penalty, False)
                   for beam in self.running]
        return (self.finished + sorted(running, key=lambda h: -h.score))[:self.width]


class BeamGroup:
    """The sequences of one beam search request: slot i runs running beam i.

    Slot 0 computes the prompt; the others wait (`Sequence.parked`) until the first step's
    continuations give them a beam. Each step the group waits for every running slot's next
    tokens, then asks the search which continue (`advance`).
    """

    def __init__(self, seqs: list[Sequence], search: BeamSearch):
        self.seqs, self.search = seqs, search
        self.reports: dict[int, list[tuple[int, float]]] = {}  # slot -> its best next tokens
        for seq in seqs:
            seq.beam = self
        for seq in seqs[1:]:
            seq.parked = True

    @property
    def width(self) -> int:
        return len(self.seqs)

    def kv_tokens(self, block_size: int) -> int:
        """The KV cache the search may take at most: the prompt once, and each beam's tokens after
        it plus the partly filled block it copies when it forks."""
        seq = self.seqs[0]
        return len(seq.prompt_ids) + self.width * (self.search.max_tokens + block_size)

    def idle(self) -> bool:
        """No sequence of the group is in a step."""
        return not any(seq.in_flight for seq in self.seqs)

    def restart(self) -> None:
        """Back to the prompt, after the scheduler pre-empted the group (took its blocks and
        slots): the search starts again from its first step, and ends as it would have."""
        self.search, self.reports = BeamSearch(*self.search.options), {}
        for i, seq in enumerate(self.seqs):
            seq.output_ids, seq.parked = [], i > 0

    def report(self, seq: Sequence, choice: Choice) -> bool:
        """A slot's next tokens; whether every running slot has reported."""
        self.reports[self.seqs.index(seq)] = list(choice.top or [])
        return len(self.reports) == len(self.search.running)

    def advance(self, pool: ReplicaPool, finish, emit) -> None:
        """The step every running slot reported for: each slot continues the beam the search
        picked for it (`continue_beams`); once the search is done, slot i gets the i-th best
        hypothesis as its output, its tokens as events (`emit(seq, event)`), and `finish(seq, reason)`."""
        from app.sampling import Choice  # app.sampling imports this module

        tops = [self.reports[i] for i in range(len(self.search.running))]
        self.reports.clear()
        picks = self.search.step(tops)
        if not self.search.done:
            self.continue_beams(picks, pool)
            return
        for seq, hypothesis in zip(self.seqs, self.search.best()):
            seq.output_ids = list(hypothesis.tokens)
            for token in hypothesis.tokens:
                emit(seq, ("token", seq, Choice(token)))
            finish(seq, "stop" if hypothesis.ended else "length")

    def continue_beams(self, picks: list[tuple[int, int]], pool: ReplicaPool) -> None:
        """Slot i takes the tokens of the beam `picks[i]` continues, plus its token, and a fork of
        that beam's KV blocks (on a route of its own, after a move: empty blocks, and a replay)."""
        parents = [(self.seqs[i], list(self.seqs[i].output_ids), self.seqs[i].num_cached) for i, _ in picks]
        tables = [pool.fork(parent) if parent.route == seq.route else None
                  for seq, (parent, _, _) in zip(self.seqs, parents)]
        for seq, table, (_, output, cached), (_, token) in zip(self.seqs, tables, parents, picks):
            pool.release(seq, slots=False)
            seq.tables = table or [BlockTable(salt=seq.salt) for _ in seq.route]
            seq.output_ids, seq.num_cached, seq.parked = output + [token], cached if table else 0, False
