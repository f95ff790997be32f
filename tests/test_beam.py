"""Beam search: the search's rules (plain Python), the blocks its beams share, and its beams through
2 stages of the default model against transformers' `generate(num_beams=...)`."""

from __future__ import annotations

import pytest

from app.beam import BeamSearch, num_alternatives
from app.blocks import BlockPool, BlockTable
from app.pipeline import StepFailed
from tests.local import local_app

EOS = 9


def test_an_end_of_sequence_in_the_best_continuations_finishes_a_hypothesis():
    search = BeamSearch(width=2, max_tokens=8, eos_token_ids=(EOS,))
    assert search.keep == 4 and num_alternatives(2, 1) == 5
    picks = search.step([[(5, -0.1), (EOS, -0.5), (6, -1.0), (7, -2.0), (8, -3.0)]])
    assert picks == [(0, 5), (0, 6)]  # the two best that go on, both from the only beam
    assert [(h.tokens, h.score, h.ended) for h in search.finished] == [([EOS], -0.5, True)]
    # an end-of-sequence outside the best `width` continuations does not finish anything
    picks = search.step([[(7, -0.1), (8, -0.2), (EOS, -5.0)], [(EOS, -0.3), (1, -0.4), (2, -0.5)]])
    assert picks == [(0, 7), (0, 8)] and len(search.finished) == 1


def test_the_search_stops_when_no_running_beam_can_beat_the_finished_ones():
    search = BeamSearch(width=1, max_tokens=8, eos_token_ids=(EOS,))
    assert search.step([[(EOS, -0.2), (5, -0.3)]]) == []  # -0.3 cannot beat -0.2 any more
    assert search.done and [h.tokens for h in search.best()] == [[EOS]]
    go_on = BeamSearch(width=1, max_tokens=8, eos_token_ids=(EOS,), early_stopping="never", length_penalty=2.0)
    assert go_on.step([[(EOS, -0.2), (5, -0.3)]]) == [(0, 5)]  # -0.3 / 8**2 at the longest could


def test_the_token_budget_ends_every_beam_and_length_penalty_ranks_them():
    search = BeamSearch(width=2, max_tokens=2, eos_token_ids=(EOS,), length_penalty=1.0)
    search.step([[(EOS, -0.5), (5, -0.6), (6, -0.7), (7, -3.0), (8, -4.0)]])
    assert search.step([[(1, -0.5), (2, -0.6)], [(3, -0.1), (4, -2.0)]]) == [] and search.done
    # [6, 3] scores -0.8 / 2 and beats [EOS] at -0.5 / 1, which beats [5, 1] at -1.1 / 2
    assert [(h.tokens, h.score) for h in search.best()] == [([6, 3], pytest.approx(-0.4)), ([EOS], -0.5)]


def test_min_tokens_masks_the_end_of_sequence():
    search = BeamSearch(width=1, max_tokens=4, eos_token_ids=(EOS,), min_tokens=2)
    assert search.step([[(EOS, -0.1), (5, -0.2), (6, -0.3)]]) == [(0, 5)] and not search.finished


def test_a_fork_shares_blocks_until_one_side_writes_into_them():
    pool = BlockPool(num_blocks=8, block_size=4)
    parent = BlockTable()
    assert pool.grow(parent, 6)  # 6 tokens: a full block and a half-full one
    child = pool.fork(parent)
    assert child.blocks == parent.blocks and pool.num_free == 6
    shared = parent.blocks[1]
    assert pool.unshare(parent, 6, 7) == [(shared, parent.blocks[1])]  # the stage copies it, then writes
    assert parent.blocks[0] == child.blocks[0] and parent.blocks[1] != shared == child.blocks[1]
    assert pool.unshare(child, 6, 7) == []  # the half-full block is its own again
    assert pool.unshare(child, 4, 8) == [] and pool.num_free == 5
    pool.release(parent)
    pool.release(child)
    assert pool.num_free == 8


def test_copy_on_write_waits_for_free_blocks():
    pool = BlockPool(num_blocks=2, block_size=4)
    parent = BlockTable()
    assert pool.grow(parent, 6)
    child = pool.fork(parent)
    assert pool.unshare(child, 6, 7) is None and child.blocks == parent.blocks  # nothing changed


def beam_reference(model, ids: list[int], width: int) -> list[list[int]]:
    """transformers' beams for `ids`, best first, without the end-of-sequence token and padding."""
    import torch

    out = model.generate(torch.tensor([ids]), num_beams=width, num_return_sequences=width, do_sample=False,
                         length_penalty=1.0, early_stopping=False, max_new_tokens=16)
    eos = model.generation_config.eos_token_id
    beams = []
    for row in out[:, len(ids):].tolist():
        beams.append(row[:row.index(eos)] if eos in row else row)
    return beams


def test_beams_through_two_stages_equal_transformers_on_the_default_model():
    """The default model (trained: a random one's near-uniform logits make beams fragile), 2 and 4
    beams, a completion and a chat whose beams end; the prompt is computed once and shared."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app import default_model

    model_dir = default_model.default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chat = [{"role": "user", "content": "Say hi."}]
    prompts = {"completions": "Once upon a time, there was a", "chat": chat}
    with local_app(model_dir, [(0, 15), (15, 30)], name="m", max_batch_size=8, max_model_len=256) as (
            client, engine, _):
        steps, send = [], engine.pipeline.step

        async def step(route, inputs, tables, starts, num_new, **kwargs):
            steps.append((list(num_new), kwargs.get("copies")))
            if len(steps) == 7 and failing:
                raise StepFailed("injected: a stage went away mid-search")
            return await send(route, inputs, tables, starts, num_new, **kwargs)

        engine.pipeline.step = step
        for width in (2, 4):
            for endpoint, prompt in prompts.items():
                failing = width == 4 and endpoint == "completions"  # one failed step: replayed
                steps.clear()
                body = {"model": "m", "n": width, "max_tokens": 16, "use_beam_search": True}
                if endpoint == "chat":
                    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                    ids = tokenizer(text, add_special_tokens=False).input_ids
                    answer = client.post("/v1/chat/completions", json={**body, "messages": prompt}).json()
                    texts = [c["message"]["content"] for c in answer["choices"]]
                else:
                    ids = tokenizer(prompt).input_ids
                    answer = client.post("/v1/completions", json={**body, "prompt": prompt}).json()
                    texts = [c["text"] for c in answer["choices"]]
                expected = beam_reference(model, ids, width)
                assert texts == [tokenizer.decode(beam, skip_special_tokens=True) for beam in expected], endpoint
                reasons = [c["finish_reason"] for c in answer["choices"]]
                assert reasons == ["stop" if len(beam) < 16 else "length" for beam in expected]
                assert answer["usage"]["completion_tokens"] == sum(min(len(b) + 1, 16) for b in expected)
                if not failing:  # the prompt once (what the prefix cache lacks), then a token per beam and step
                    assert len(steps[0][0]) == 1 and all(n == [1] * width for n, _ in steps[1:])
                    assert any(copies and copies[0] for _, copies in steps)  # shared blocks were copied first
            assert engine.num_running == 0
        assert engine.stats["recoveries"] == 1 and engine.num_free_slots == 8  # the injected failure, replayed
        assert all(r["blocks"]["used"] == 0 for r in engine.replica_load())


def test_what_beam_search_refuses(checkpoint):
    model_dir = checkpoint("llama")
    with local_app(model_dir, [(0, 3), (3, 6)], max_batch_size=4, max_beam_width=8) as (client, engine, _):
        base = {"model": "model", "prompt": "the city", "use_beam_search": True, "n": 2, "max_tokens": 4}
        refused = {"stream": {"stream": True}, "temperature": {"temperature": 0.7}, "best_of": {"best_of": 3},
                   "n": {"n": 5}, "logprobs": {"logprobs": 1}, "echo": {"echo": True},
                   "frequency_penalty": {"frequency_penalty": 0.5}, "logit_bias": {"logit_bias": {"5": 1.0}}}
        for param, extra in refused.items():
            r = client.post("/v1/completions", json={**base, **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
        chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "use_beam_search": True,
                "stream": True}
        assert client.post("/v1/chat/completions", json=chat).status_code == 400
        ok = client.post("/v1/completions", json={**base, "temperature": 0, "stop": ["zzz"],
                                                  "prompt": ["the city", "a river"]})  # a search per prompt
        assert ok.status_code == 200 and [c["index"] for c in ok.json()["choices"]] == [0, 1, 2, 3]
        too_long = client.post("/v1/completions", json={**base, "max_tokens": None, "n": 4})  # 4 x 509 tokens
        assert too_long.status_code == 400 and "4 beams of max_tokens" in too_long.json()["error"]["message"]
        assert engine.num_running == 0


def test_beam_searches_that_outgrow_the_kv_pool_are_preempted_whole_and_start_again():
    """Three searches of 4 beams whose blocks do not fit the pool together (before, their beams
    waited for one another's blocks for ever): a search is pre-empted whole (never a beam of it
    alone) and searches again from its prompt; each ends with transformers' beams. A search that
    could never fit gets 400."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app import default_model

    model_dir = default_model.default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = ["Once upon a time, there was a", "The three primary colors are", "To make a cup of tea, first"]
    expected = [[tokenizer.decode(b, skip_special_tokens=True) for b in beam_reference(model, tokenizer(p).input_ids, 4)]
                for p in prompts]
    with local_app(model_dir, [(0, 15), (15, 30)], name="m", max_batch_size=12, max_model_len=256,
                   kv_tokens=160) as (client, engine, _):
        texts = [None] * len(prompts)

        def run(i):
            body = {"model": "m", "prompt": prompts[i], "n": 4, "max_tokens": 16, "use_beam_search": True}
            texts[i] = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]

        import threading

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)  # beams that wait for one another's blocks would wait for ever
        assert texts == expected
        assert engine.stats["preempted"] >= 1
        too_long = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "n": 8, "max_tokens": 64,
                                                         "use_beam_search": True})
        assert too_long.status_code == 400, too_long.text
        assert engine.num_running == 0 and all(r["blocks"]["used"] == 0 for r in engine.replica_load())
