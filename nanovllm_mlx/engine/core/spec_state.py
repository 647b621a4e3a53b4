"""One sequence's speculation state, apart from the proposer (engine/core/speculation.py)
so that a Sequence can hold one without importing it."""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm_mlx.engine.core.ngram import NgramIndex

INITIAL_RATE = 0.6  # before a sequence's first draft: a match found is likely good


@dataclass(slots=True)
class SpecState:
    """One sequence's proposer: its n-gram index (None: a draft model proposes) and its
    acceptance so far."""

    index: NgramIndex | None
    rate: float = INITIAL_RATE  # running share of its draft tokens accepted
    skip: int = 0  # steps left before it probes again (its drafts do not pay)
    probes: int = 0  # probes in a row of which nothing was accepted
    matched: bool = False  # its last lookup found a draft
    # A draft model: leading tokens of the sequence whose K/V its pool holds, as the
    # sequence's tokens are now (engine/runner/draft_runner.py writes it; the speculator
    # cuts it back to what a verification kept).
    drafted: int = 0
