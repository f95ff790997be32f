"""Incremental detokenization and stop strings."""

from __future__ import annotations

import pytest

from app.detokenizer import IncrementalDetokenizer, StopChecker
from tests.checkpoints import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("text", ["über café 北海道 🚀 the city", "🚀🛸 東京", "plain words only"])
def test_deltas_never_break_a_character(tokenizer, text):
    prompt = tokenizer("the").input_ids
    ids = tokenizer(text).input_ids
    assert len(ids) > 3
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)
    if any("\ufffd" in tokenizer.decode([t]) for t in ids):  # a character split over byte tokens...
        assert "" in deltas[:-1]  # ...was held back until complete


def test_stop_string_across_deltas():
    stops = StopChecker(("STOP",))
    released = [stops.add(d) for d in ("hello S", "TO", "P and more")]
    assert "".join(released) == "hello " and stops.matched == "STOP"
    assert stops.add("later") == ""


def test_stop_string_kept_when_asked_and_flushed_at_the_end():
    stops = StopChecker(("##",), include_stop=True)
    assert stops.add("a#") == "a"
    assert stops.add("#b") == "##" and stops.matched == "##"
    tail = StopChecker(("xyz",))
    assert tail.add("abcx") == "ab"
    assert tail.add("", final=True) == "cx"
    assert tail.matched is None
