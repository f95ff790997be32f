"""Sampling on the last stage (issue 19): draws that depend only on the seed and the token's
number, penalties whose token history the last stage keeps and rebuilds, alternatives only for
the rows that asked. Pure PyTorch, then through the engine in one process (no Ray)."""

from __future__ import annotations

import math
import time

import torch

from stages.sampler import FAILED, NOT_FINITE, Sampler, SamplingSpec
from tests.local import local_app

TWO = [(0, 3), (3, 6)]
PENALIZED = {"temperature": 0.9, "seed": 5, "frequency_penalty": 0.8, "presence_penalty": 0.4,
             "repetition_penalty": 1.3, "max_tokens": 16, "min_tokens": 16}


def logits(rows: int, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))


def test_a_draw_depends_on_the_seed_and_the_token_number_not_on_the_batch():
    spec = SamplingSpec(seed=11, prompt_len=4)
    row = logits(1)
    alone = Sampler().sample(row, (2,), (spec,), (0,), (4,)).tokens
    beside = Sampler().sample(torch.cat([logits(3), row]), (1, 0, 2, 2), (None, None, spec, spec), (0, 0, 0, 0),
                              (1, 1, 1, 4)).tokens
    assert beside[3] == alone[0]
    draws = [int(Sampler().sample(row, (2,), (SamplingSpec(seed=11, prompt_len=4 - k),), (0,), (4,)).tokens[0])
             for k in range(40)]  # the same logits at 40 token numbers: not one draw repeated
    assert len(set(draws)) > 5


def test_penalties_history_is_kept_rebuilt_from_a_replay_and_sent_where_missing():
    vocab, prompt = 50, [3, 4, 5]
    base = SamplingSpec(key=1, seed=2, prompt_len=3, repetition_penalty=1.5, frequency_penalty=1.0)
    kept, tokens, starts = Sampler(), list(prompt), 0
    for step in range(6):  # step by step, the stage keeping the history
        row = logits(1, vocab) + step
        spec = SamplingSpec(**{**base.__dict__, "ids": tuple(tokens[starts:])})
        token = int(kept.sample(row, (2,), (spec,), (starts,), (len(tokens) - starts,)).tokens[0])
        starts = len(tokens)
        tokens.append(token)
    # a replica that never saw the sequence: the whole history in one spec gives the same draw
    history = SamplingSpec(**{**base.__dict__, "ids": (tokens[-2],), "history": tuple(tokens[:-2])})
    fresh = Sampler().sample(logits(1, vocab) + 5, (2,), (history,), (len(tokens) - 2,), (1,)).tokens
    assert int(fresh[0]) == tokens[-1]
    # ... and without it, the row fails alone (its neighbour, greedy, is answered)
    lost = SamplingSpec(**{**base.__dict__, "ids": (tokens[-2],)})
    out = Sampler().sample(logits(2, vocab), (2, 1), (lost, None), (len(tokens) - 2, 0), (1, 1)).tokens
    assert int(out[0]) == FAILED and int(out[1]) == int(logits(2, vocab)[1].argmax())
    # a step sent again (it failed after this stage saw it) does not count its tokens twice
    again = Sampler()
    for _ in range(3):
        again.sample(logits(1, vocab), (2,), (SamplingSpec(**{**base.__dict__, "ids": tuple(prompt)}),), (0,), (3,))
    retry = SamplingSpec(**{**base.__dict__, "ids": (7, 7)})
    twice = [again.sample(logits(1, vocab), (2,), (retry,), (3,), (2,)) for _ in range(2)]
    assert list(again._histories[1]) == prompt + [7, 7] and twice[0].tokens.tolist() == twice[1].tokens.tolist()


def test_log_probabilities_and_alternatives_only_for_the_rows_that_asked():
    rows = logits(3)
    rows[2, 0] = math.nan
    specs = (SamplingSpec(seed=1, logprobs=3), SamplingSpec(seed=1), SamplingSpec(seed=1, logprobs=2))
    out = Sampler().sample(rows, (2, 2, 2), specs, (0, 0, 0), (1, 1, 1))
    assert out.top_ids.shape == (5,) and out.tokens[2] == NOT_FINITE
    expected = torch.log_softmax(rows[0], dim=-1)
    assert out.logprobs[0] == expected[out.tokens[0]] and out.logprobs[1:].isnan().all()
    assert out.top_ids[:3].tolist() == expected.topk(3).indices.tolist()
    bias = Sampler().sample(logits(1), (2,), (SamplingSpec(logit_bias=((10**6, 1.0),)),), (0,), (1,))
    assert int(bias.tokens[0]) == FAILED  # a bias beyond the vocabulary: that row, not the step


def test_a_prompt_is_scored_after_the_rows_own_answers():
    out = logits(6).view(2, 3, 50)  # 2 rows of 3 positions
    spec = SamplingSpec(seed=1, logprobs=1)
    answer = Sampler().answer(out, (2, 0), (spec, None), (0, 0), (3, 2), scoring=(None, (2, (7, 8))))
    expected = torch.log_softmax(out[1, :2], dim=-1)
    assert answer.logprobs.shape == (2 + 2,) and answer.top_ids.shape == (1 + 2 * 2,)
    assert answer.logprobs[2:].tolist() == [expected[0, 7].item(), expected[1, 8].item()]
    assert answer.top_ids[1:].tolist() == expected.topk(2).indices.reshape(-1).tolist()
    assert int(answer.tokens[0]) >= 0 and int(answer.tokens[1]) == NOT_FINITE  # row 1 wanted no token


def test_seeded_penalized_sampling_is_the_same_after_a_replay_and_from_a_cached_prefix(checkpoint):
    """The last stage loses its histories and a step fails: the sequence is replayed and draws the
    same tokens; a prompt whose prefix is cached samples from a history sent with its step."""
    model_dir = checkpoint("llama")
    prompt = "the city of stone gardens and quiet rivers at night, under the old bridge by the sea"
    body = {"model": "model", "prompt": prompt, **PENALIZED}
    with local_app(model_dir, TWO) as (client, engine, servers):
        first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        last = servers[-1]
        cached_before = engine.scheduler.cached_tokens
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first
        assert engine.scheduler.cached_tokens > cached_before  # the second started after its cached prefix
        forward, calls = last.stage.forward, []

        def fail_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 6:  # mid-stream: the stage forgets every history, and the step fails
                last.sampler = Sampler()
                raise RuntimeError("simulated failure of the last stage")
            return forward(*args, **kwargs)

        last.stage.forward = fail_once
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first
        assert engine.stats["recoveries"] >= 1


def test_a_last_stage_whose_sampling_fails_reports_the_step_at_once(checkpoint):
    """Not a silent step that the ingress waits out (`step_timeout_s`): an error, a replay, the answer."""
    with local_app(checkpoint("llama"), TWO, step_timeout_s=30) as (client, engine, servers):
        sampler, answer = servers[-1].sampler, servers[-1].sampler.answer
        calls = []

        def fail_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated sampling failure")
            return answer(*args, **kwargs)

        sampler.answer = fail_once
        began = time.monotonic()
        r = client.post("/v1/completions", json={"model": "model", "prompt": "the city", "max_tokens": 4,
                                                 "temperature": 0.7, "seed": 1})
        assert r.status_code == 200 and time.monotonic() - began < 15, r.text
        assert engine.stats["recoveries"] >= 1
