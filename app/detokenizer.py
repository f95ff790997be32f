"""Incremental detokenization and stop strings, so that streamed text never breaks a character."""

from __future__ import annotations

# Tokens of context decoded before the new ones: enough for tokenizers whose text for a token
# depends on its left neighbours (leading spaces, byte-fallback pieces).
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A delta is released only when it does not end in U+FFFD (an incomplete UTF-8 sequence of a
    multi-byte character split across tokens); `flush` releases whatever is left at the end.

    Args:
        tokenizer: a transformers tokenizer.
        prompt_ids: the prompt, used as left context for the first tokens.
        skip_special_tokens: leave special tokens out of the text.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Adds a token; returns the text it completes (possibly empty)."""
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Returns the text still held back (at the end of the sequence)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


class StopChecker:
    """Finds stop strings in the generated text and holds back what could begin one.

    Args:
        stop: the stop strings.
        include_stop: keep the stop string in the output.
    """

    def __init__(self, stop: tuple[str, ...], include_stop: bool = False):
        self.stop = stop
        self.include_stop = include_stop
        self.text = ""  # all output text so far, up to the stop
        self.sent = 0  # characters of `text` already released
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.matched: str | None = None

    def add(self, delta: str, final: bool = False) -> str:
        """Adds new text; returns what can be released now (after a match, nothing more)."""
        if self.matched is not None:
            return ""
        search_from = max(0, len(self.text) - self.hold)
        self.text += delta
        found = [(self.text.find(s, search_from), s) for s in self.stop]
        found = [(pos, s) for pos, s in found if pos >= 0]
        if found:
            pos, stop = min(found)
            self.matched = stop
            self.text = self.text[: pos + len(stop)] if self.include_stop else self.text[:pos]
            final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out
