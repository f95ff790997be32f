"""The scheduler and the replica bookkeeping on their own: plain Python, no stage, no event loop."""

from __future__ import annotations

import ast
import os

from app.replicas import ReplicaPool
from app.sampling import SamplingParams
from app.scheduler import Scheduler
from app.sequence import EngineConfig, Replica, Sequence

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "app")


def imported(module: str) -> set[str]:
    """Top-level packages a module imports at run time (`if TYPE_CHECKING:` blocks left out)."""
    tree = ast.parse(open(os.path.join(APP, module)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_scheduler_is_plain_python():
    for module in ("scheduler.py", "replicas.py", "sequence.py"):
        assert not imported(module) & {"torch", "asyncio", "ray"}, module


def seq(num_prompt: int) -> Sequence:
    return Sequence(list(range(1, num_prompt + 1)), SamplingParams(max_tokens=8), events=None)


def next_step(scheduler, running, present, waiting, pool):
    """The route's next step, with no other in flight (the generator is not resumed for more)."""
    return next(scheduler.next_batches(running, present, [], waiting, pool))


def complete(rows) -> None:
    """A step's rows come back: their tokens are cached."""
    for row in rows:
        row.seq.in_flight -= 1
        row.seq.num_computing -= row.num_new
        row.seq.num_cached = row.start + row.num_new


def pool_of(*replicas: Replica, drained=None, prefix_caching=True) -> ReplicaPool:
    pool = ReplicaPool(2, on_drained=drained, prefix_caching=prefix_caching)
    assert pool.set(list(replicas)) == list(replicas)  # all new: the engine watches them
    return pool


def test_admission_takes_the_replica_with_the_most_free_slots_and_stops_when_a_stage_is_full():
    pool = pool_of(Replica("a0", 0, "x:1", 2), Replica("b0", 0, "x:2", 3), Replica("a1", 1, "x:3", 2))
    scheduler = Scheduler(EngineConfig(), 2)
    waiting, running = [seq(3) for _ in range(4)], []
    scheduler.admit(waiting, running, pool)
    assert [s.route for s in running] == [("b0", "a1"), ("a0", "a1")]  # stage 1 holds two
    assert [s.slots for s in running] == [[0, 0], [0, 1]]
    assert len(waiting) == 2 and pool.num_free_slots == 0
    pool.free_slot("a1", 1)
    scheduler.admit(waiting, running, pool)
    assert running[-1].route == ("b0", "a1") and len(waiting) == 1


def test_a_step_carries_the_decoding_rows_then_prompt_chunks_within_the_budget():
    pool = pool_of(Replica("a0", 0, "x:1", 8), Replica("a1", 1, "x:2", 8))
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=5), 2)
    decoding, long = seq(3), seq(12)
    running, waiting = [], [decoding, long]
    scheduler.admit(waiting, running, pool)
    decoding.num_cached, decoding.output_ids = 3, [7]  # prefilled, one token sampled
    present = {"a0", "a1"}

    def step() -> list[tuple[int, int]]:
        route, rows = next_step(scheduler, running, present, waiting, pool)
        complete(rows)
        for row in rows:
            if row.seq is decoding:
                decoding.output_ids.append(7)
        return [(running.index(row.seq), row.num_new) for row in rows]

    # The decoding sequence gets its token every step; the prompt takes what is left of the 5.
    assert [step() for _ in range(4)] == [[(0, 1), (1, 4)]] * 3 + [[(0, 1)]]
    # Nothing is scheduled through a replica that cannot be reached.
    assert list(scheduler.next_batches(running, {"a0"}, [], waiting, pool)) == []


def decoding_beside_a_prompt():
    """Two stages, a budget of 16, threshold 4: a decoding sequence and a 30-token prompt admitted."""
    pool = pool_of(Replica("a0", 0, "x:1", 8), Replica("a1", 1, "x:2", 8))
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=16, long_prefill_token_threshold=4), 2)
    decoding, long = seq(3), seq(30)
    running, waiting = [], [decoding, long]
    scheduler.admit(waiting, running, pool)
    decoding.num_cached, decoding.output_ids = 3, [7]
    return pool, scheduler, decoding, long, running, waiting


def test_beside_decode_rows_a_prompt_takes_at_most_the_threshold_and_alone_the_budget():
    pool, scheduler, decoding, long, running, waiting = decoding_beside_a_prompt()
    sizes = []
    for _ in range(4):
        _, rows = next_step(scheduler, running, {"a0", "a1"}, waiting, pool)
        sizes.append([row.num_new for row in rows])
        complete(rows)
        if decoding.num_pending == 0 and len(decoding.output_ids) < 2:
            decoding.output_ids.append(7)  # one more token, then it has finished
        elif decoding.num_pending == 0:
            decoding.finish_reason = "length"
    assert sizes == [[1, 4], [1, 4], [16], [6]]


def test_prompts_without_decode_rows_share_the_budget_uncapped():
    """The threshold is for steps that carry decoding sequences: a step of prompts alone fills the
    budget, the second prompt taking what the first left."""
    pool = pool_of(Replica("a0", 0, "x:1", 8), Replica("a1", 1, "x:2", 8))
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=16, long_prefill_token_threshold=4,
                                       attention_cost_tokens=16), 2)
    running, waiting = [], [seq(6), seq(30)]
    scheduler.admit(waiting, running, pool)
    _, rows = next_step(scheduler, running, {"a0", "a1"}, waiting, pool)
    assert [row.num_new for row in rows] == [6, 10]


def test_beside_decode_rows_early_chunks_take_as_many_tokens_as_cost_the_prompt_s_last():
    """A token costs 1 plus 1/16 for each token before it (`attention_cost_tokens` 16): the
    prompt's last chunk of 4 tokens (at 56 of 60) costs 4 + (4 x 56 + 6) / 16 = 18.4, and every
    chunk before it takes the most tokens that cost no more (13 at the start)."""
    pool = pool_of(Replica("a0", 0, "x:1", 8), Replica("a1", 1, "x:2", 8))
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=64, long_prefill_token_threshold=4,
                                       attention_cost_tokens=16), 2)
    decoding, long = Sequence([1, 2, 3], SamplingParams(max_tokens=100), events=None), seq(60)
    running, waiting = [], [decoding, long]
    scheduler.admit(waiting, running, pool)
    decoding.num_cached, decoding.output_ids = 3, [7]
    chunks = []
    while long.num_pending:
        _, rows = next_step(scheduler, running, {"a0", "a1"}, waiting, pool)
        assert [row.num_new for row in rows][0] == 1  # the decoding sequence's token comes first
        chunks += [(row.start, row.num_new) for row in rows if row.seq is long]
        complete(rows)
        decoding.output_ids.append(7)

    def cost(start, n):
        return n + (n * start + n * (n - 1) / 2) / 16

    assert chunks[0] == (0, 13) and sum(n for _, n in chunks) == 60
    for start, n in chunks[:-1]:  # each as large as the last chunk's cost allows; the last takes the rest
        assert cost(start, n) <= cost(56, 4) < cost(start, n + 1)
    assert [n for _, n in chunks] == sorted((n for _, n in chunks), reverse=True)
    assert chunks[-2][1] >= 4


def test_a_step_computes_at_most_the_budget_and_echo_steps_their_padding_included():
    """Mixed steps go packed (their tokens count once); steps of sequences that want every
    prompt position's logits go padded, and rows x widest stays within the budget (else a short
    prompt beside a long one would make the step, and the stages' working memory, far larger)."""
    pool = pool_of(Replica("a0", 0, "x:1", 8), Replica("a1", 1, "x:2", 8))
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=64), 2)
    running, waiting = [], [seq(60), seq(3), seq(3), seq(40), seq(30), seq(50), seq(2)]
    for s in waiting[4:]:
        s.prompt_logprobs = True
    scheduler.admit(waiting, running, pool)
    computed, kinds = [], set()
    while any(s.num_pending for s in running):
        _, rows = next_step(scheduler, running, {"a0", "a1"}, waiting, pool)
        echo = {row.seq.needs_all_logits for row in rows}
        assert len(echo) == 1  # echo rows never share a step with others
        kinds |= echo
        if echo == {True}:
            assert len(rows) * max(row.num_new for row in rows) <= 64
        else:
            assert sum(row.num_new for row in rows) <= 64
        complete(rows)
        computed += [row.num_new for row in rows]
    assert sum(computed) == 60 + 3 + 3 + 40 + 30 + 50 + 2 and kinds == {True, False}  # every token, once


def test_micro_batches_share_the_decoding_sequences_of_a_route():
    pool = pool_of(Replica("a0", 0, "x:1", 8), Replica("a1", 1, "x:2", 8))
    scheduler = Scheduler(EngineConfig(num_microbatches=2), 2)
    running, waiting = [], [seq(2) for _ in range(5)]
    scheduler.admit(waiting, running, pool)
    for s in running:
        s.num_cached, s.output_ids = 2, [9]
    batches = list(scheduler.next_batches(running, {"a0", "a1"}, [], waiting, pool))
    assert [len(rows) for _, rows in batches] == [3, 2]
    assert all(s.in_flight for s in running)  # claimed until their step returns
    assert list(scheduler.next_batches(running, {"a0", "a1"}, [(("a0", "a1"), True)] * 2, waiting, pool)) == []


def test_a_draining_replica_is_released_once_it_holds_nothing_and_a_gone_one_forgotten():
    released = []
    pool = pool_of(Replica("a0", 0, "x:1", 2), Replica("a1", 1, "x:2", 2), drained=released.append)
    slot = pool.take_slot("a1")
    pool.set([Replica("a0", 0, "x:1", 2), Replica("a1", 1, "x:2", 2, draining=True)])
    assert released == [] and pool.best(1) is None and not pool.available()
    pool.free_slot("a1", slot)
    pool.tidy()
    assert [r.id for r in released] == ["a1"]
    pool.drop("a0")
    pool.tidy()
    assert "a0" not in pool.replicas and "a0" not in pool.free  # it held nothing
    assert pool.set([Replica("a0", 0, "x:1", 2)]) == []  # a gone replica does not come back


def test_a_sequence_is_admitted_when_its_blocks_fit_and_the_latest_is_preempted_for_a_decode():
    # 4 blocks of 4 tokens per replica: two 6-token prompts take 2 blocks each.
    pool = pool_of(Replica("a0", 0, "x:1", 8, num_blocks=4, block_size=4),
                   Replica("a1", 1, "x:2", 8, num_blocks=4, block_size=4), prefix_caching=False)
    scheduler = Scheduler(EngineConfig(), 2)
    first, second, third = seq(6), seq(6), seq(6)
    waiting, running = [first, second, third], []
    scheduler.admit(waiting, running, pool)
    assert running == [first, second] and waiting == [third]  # no blocks left for the third
    for s in running:
        s.num_cached, s.output_ids = 6, [5, 5, 5]  # 9 tokens: a third block each to go on
    _, rows = next_step(scheduler, running, {"a0", "a1"}, waiting, pool)
    # The first needs a block: the latest admitted (the second) gives its blocks up and waits first.
    assert [row.seq for row in rows] == [first] and scheduler.preempted == [second]
    assert waiting == [second, third] and second.route is None and second.num_cached == 0
    assert len(first.tables[0].blocks) == 3 and pool.blocks["a0"].num_free == 1


def test_a_cached_prefix_is_taken_not_computed_and_only_where_every_stage_has_it():
    pool = pool_of(Replica("a0", 0, "x:1", 8, num_blocks=16, block_size=4),
                   Replica("a1", 1, "x:2", 8, num_blocks=16, block_size=4))
    scheduler = Scheduler(EngineConfig(), 2)
    first = seq(10)
    running, waiting = [], [first]
    scheduler.admit(waiting, running, pool)
    first.num_cached = 10
    pool.cache_computed(first)  # its first two blocks are full: cached on both replicas
    second = Sequence(first.prompt_ids[:9] + [77, 78], SamplingParams(), events=None)
    waiting.append(second)
    scheduler.admit(waiting, running, pool)
    assert second.num_cached == 8 and scheduler.cached_tokens == 8  # two blocks shared, 3 tokens to compute
    assert second.tables[0].blocks[:2] == first.tables[0].blocks[:2]
    echo = Sequence(list(first.prompt_ids), SamplingParams(logprobs=1), events=None, prompt_logprobs=True)
    waiting.append(echo)
    scheduler.admit(waiting, running, pool)
    assert echo.num_cached == 0  # its prompt's log-probabilities are computed, not taken


def test_the_old_name_of_the_step_budget_gets_a_clear_error():
    import pydantic
    import pytest

    from app.builder import BuilderArgs

    with pytest.raises(pydantic.ValidationError, match="max_prefill_tokens is now max_num_batched_tokens"):
        BuilderArgs(max_prefill_tokens=256)
    assert BuilderArgs(max_num_batched_tokens=256).long_prefill_token_threshold == 24


def test_the_cost_of_attention_in_tokens_comes_from_the_model(tmp_path):
    """A block's parameters (2 FLOPs each a token) over a query's 4 x heads x head_dim FLOPs per
    token of context; a sliding window (attention stops growing) chunks by tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from app.builder import attention_cost_tokens
    from tests.checkpoints import build_checkpoint

    for arch, expected in (("llama", None), ("mistral", 0)):
        model_dir = build_checkpoint(arch, str(tmp_path / arch))
        config = AutoConfig.from_pretrained(model_dir)
        if expected is None:
            block = AutoModelForCausalLM.from_pretrained(model_dir).model.layers[0]
            expected = round(sum(p.numel() for p in block.parameters()) / (2 * config.hidden_size))
            assert expected > 0
        assert attention_cost_tokens(model_dir, config) == expected


def test_a_prompt_s_next_chunk_follows_the_one_before_down_the_pipeline():
    """With 2 stages, beside decoding sequences, a prompt's next chunk goes out in a step of its
    own while the one before is on its way (the first stage would idle otherwise): contiguous,
    capped, at most one step per stage in flight, the decode rows only in the first."""
    pool, scheduler, decoding, long, running, waiting = decoding_beside_a_prompt()
    route = decoding.route
    first, second = list(scheduler.next_batches(running, {"a0", "a1"}, [], waiting, pool))
    assert [(r.seq, r.start, r.num_new, r.decode) for r in first[1]] == [(decoding, 3, 1, True), (long, 0, 4, False)]
    assert [(r.seq, r.start, r.num_new, r.decode) for r in second[1]] == [(long, 4, 4, False)]
    assert long.in_flight == 2 and long.num_computing == 8 and long.num_unscheduled == 22
    complete(first[1])  # the first comes back; the second is still on its way
    decoding.output_ids.append(7)
    [(_, rows)] = list(scheduler.next_batches(running, {"a0", "a1"}, [(route, False)], waiting, pool))
    assert [(r.seq, r.start, r.num_new) for r in rows] == [(decoding, 4, 1), (long, 8, 4)]
    # Alone, its chunks take the budget and the stages, one at a time; one stage: one step at a time.
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=16, long_prefill_token_threshold=4), 2)
    running, waiting = [], [seq(40)]
    scheduler.admit(waiting, running, pool)
    assert [[(r.start, r.num_new) for r in rows] for _, rows in
            scheduler.next_batches(running, {"a0", "a1"}, [], waiting, pool)] == [[(0, 16)]]
    one = ReplicaPool(1)
    one.set([Replica("a0", 0, "x:1", 8)])
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=16), 1)
    running, waiting = [], [seq(40)]
    scheduler.admit(waiting, running, one)
    assert len(list(scheduler.next_batches(running, {"a0"}, [], waiting, one))) == 1
