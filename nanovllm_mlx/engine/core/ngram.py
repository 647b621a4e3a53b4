"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of a
sequence's last n tokens (n from max_n down to min_n), in its prompt or its output.
Plain Python.

The index maps every n-gram of the sequence (for each n in [min_n, max_n]) to where it
last ended, and grows by the tokens added since the last lookup, so that a lookup costs
a few dict reads whatever the context length. Only tokens that are already followed by
another are indexed: the sequence's own last n-gram must not match itself.
"""

from __future__ import annotations


class NgramIndex:
    __slots__ = ("min_n", "max_n", "ends", "indexed")

    def __init__(self, min_n: int, max_n: int):
        self.min_n = min_n
        self.max_n = max_n
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token
        self.indexed = 0  # n-grams ending before this index are in `ends`

    def _extend(self, tokens: list[int]) -> None:
        ends = self.ends
        for end in range(self.indexed, len(tokens) - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                ends[tuple(tokens[end - n + 1 : end + 1])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens to follow `tokens` (the whole sequence so far: the index only
        ever grows, so it must be the same sequence each call, one step longer or more):
        the continuation of the longest matching n-gram, its latest occurrence. A match
        that ends p tokens before the end says the text repeats with period p, so a
        continuation that reaches the end goes on with its own first tokens (a loop of 3
        tokens gets drafts of k, not of 2)."""
        if k < 1:
            return []
        self._extend(tokens)
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            end = self.ends.get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                draft = tokens[end + 1 : end + 1 + k]
                while len(draft) < k:
                    draft.append(draft[len(draft) - (len(tokens) - end - 1)])
                return draft
        return []
