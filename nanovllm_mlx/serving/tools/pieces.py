"""What a choice's output text splits into: answer text, reasoning text and tool calls.

Streaming and whole responses are both built from these pieces, produced by the same
parsers, so a stream's deltas always concatenate to the whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON object, as OpenAI's function.arguments


Piece = Content | Reasoning | Call


def holdback(text: str, marker: str) -> int:
    """How many characters at the end of text could begin marker: they wait for more text
    before they can be shown (a marker split over tokens must not leak its first half)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
