"""A completion's text as its tokens arrive: released only once final, cut before the first stop string.

Text is released when no later token can change it: a byte-level token may end inside a UTF-8 character (the
decode then ends in U+FFFD until the character completes), and the text's end may be the start of a stop string.
So the pieces streamed add up to exactly the text answered without streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

_PARTIAL = "\ufffd"  # what the byte-level decoder makes of an incomplete UTF-8 sequence


class TextStream:
    def __init__(self, detokenize: Callable[[list[int]], str], stops: list[str]) -> None:
        self.detokenize = detokenize
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""  # all of it so far, cut before a stop string once one appears
        self.sent = 0  # characters of self.text released
        self.finish_reason = "length"

    def run(self, tokens: Iterator[int]) -> Iterator[str]:
        """The new text as each token arrives (never empty); ends at a stop string or with the tokens."""
        for token in tokens:
            piece = self._push(token)
            if piece:
                yield piece
            if self.finish_reason == "stop":
                return
        rest, self.sent = self.text[self.sent :], len(self.text)
        if rest:
            yield rest

    def _push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.detokenize(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = self.text[:cut], "stop"
            ready = cut
        else:
            ready = len(self.text.rstrip(_PARTIAL))
            ready -= self._held(self.text[:ready])
        if ready <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : ready], ready
        return piece

    def _held(self, text: str) -> int:
        """The length of text's longest end that a stop string starts with."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
