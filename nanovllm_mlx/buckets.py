"""The batch sizes compiled and built code is keyed on, one decision for every user: the
engine pads decode batches to them (engine/runner/step_inputs.py) and warms them up at
start-up, and our 4-bit product (models/cuda_qmv.py) pads its rows to them, so that a
mixed step sampling 3, 5, 6 or 7 rows never builds a kernel of its own (NVRTC, ~2 s on
an H100). Here rather than in the runner so that a model module need not import the
engine."""

from __future__ import annotations


def bucket(n: int) -> int:
    """The next power of two: a few dozen traces cover every batch size and context a
    server sees, and padding a decode batch costs little (its matmuls are bound by
    reading the weights, not by the rows)."""
    return 1 << max(n - 1, 0).bit_length()
