"""Stop strings: where the text a sequence generates first contains one of them, and what text is safe to emit.

Owns `StopMatcher`. Fed a sequence's text piece by piece, it returns the text that can go to the client and says
when a stop string has appeared. Text that may be the beginning of a stop string is held back until the next
pieces show whether it is; a completed stop string and everything after it is never emitted.

Cost: O(new text) per piece (amortised), whatever the length of the stop strings or of the text so far. Each stop
string keeps a Knuth-Morris-Pratt automaton whose state is the length of the string's longest prefix that ends the
text so far, so no character is looked at twice; the held text is exactly the longest such prefix (at most the
longest stop string less one character).
"""

from __future__ import annotations


def _prefix_function(pattern: str) -> list[int]:
    """failure[i] = length of the longest proper prefix of pattern[:i + 1] that is also its suffix."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self.stops = list(stops)
        self._failure = [_prefix_function(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop string: its longest prefix that ends the text so far
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def push(self, text: str) -> tuple[str, bool]:
        """Feed the next piece of text. Returns (text to emit now, whether a stop string completed).

        After a completion the returned text ends where that stop string begins; the matcher is then done."""
        pending = self.held + text
        offset = len(self.held)
        for i, char in enumerate(text):
            completed = 0
            for j, stop in enumerate(self.stops):
                k, failure = self._matched[j], self._failure[j]
                while k and stop[k] != char:
                    k = failure[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    if k > completed:  # several end here: the longest begins first
                        completed, self.matched = k, stop
                    k = failure[k - 1]
                self._matched[j] = k
            if completed:
                self.held = ""
                return pending[: offset + i + 1 - completed], True
        hold = max(self._matched, default=0)
        cut = len(pending) - hold
        self.held = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        """Generation ended without a stop string: the held text is ordinary text after all."""
        held, self.held = self.held, ""
        self._matched = [0] * len(self.stops)
        return held
