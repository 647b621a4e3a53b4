"""numpy to MLX on the step path, without losing a Ctrl-C.

MLX 0.32's mx.array(<numpy array>) swallows a KeyboardInterrupt raised while it converts
(it tries one import path, takes the error for "not this path" and takes another): with
SIGINTs sent one at a time to a loop of such conversions, 17 of 200 never reached the
caller, and 0 of 200 through a memoryview, which takes the buffer protocol directly.
Every step converts a few arrays, so a user's Ctrl-C in LLM.generate was sometimes
ignored (the CLI also re-raises a press it recorded: cli/ui.py). The dtype and shape are
what mx.array gives a numpy array (float64 becomes float32).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def to_mx(a: np.ndarray) -> mx.array:
    return mx.array(memoryview(np.ascontiguousarray(a)))
