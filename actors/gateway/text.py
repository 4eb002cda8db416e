"""Token ids to streamed text, with stop sequences decided on the text (Generate's detokenisation)."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Token ids to streamed text: each token carries the text that became final with it.

    Text that could still be the start of a stop sequence, or half a multi-byte character, is held
    back until the next token decides it, so a client never receives part of a stop sequence. A
    token whose text leaves something held is itself held until the next one (or the end), so that
    the end can hand out what is still held with it; every other token goes out at once (a stream's
    first token the moment it is made, not with the second).
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.stopped = False
        self._sent = 0
        self._text = ""
        self._last: list[Any] | None = None  # [token, text] not yet handed out

    def push(self, token: int) -> list[tuple[int, str]]:
        self.tokens.append(token)
        self._text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [self._text.find(s) for s in self.stops if s in self._text]
        if hits:
            safe, self.stopped = min(hits), True
        elif self._text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            safe = self._sent
        else:
            safe = len(self._text) - self._held(self._text)
        safe = max(safe, self._sent)
        out = [tuple(self._last)] if self._last is not None else []
        self._last = [token, self._text[self._sent : safe]]
        self._sent = safe
        if self.stopped or safe == len(self._text):  # nothing held: the token's text is final
            out.append(tuple(self._last))
            self._last = None
        return out

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop sequence."""
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)

    def finish(self) -> list[tuple[int, str]]:
        """What is still held, with the last token (the sequence ended without a stop)."""
        if self._last is None:
            return []
        token, piece = self._last
        self._last = None
        if not self.stopped:
            piece += self._text[self._sent :].rstrip("\ufffd")
            self._sent = len(self._text)
        return [(token, piece)]
