"""numpy to MLX on the step path keeps every Ctrl-C (nanovllm_mlx/interop.py)."""

from __future__ import annotations

import signal
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

from nanovllm_mlx.interop import to_mx


@pytest.mark.skipif(sys.platform == "win32", reason="pthread_kill")
def test_no_ctrl_c_is_lost_while_converting():
    """SIGINTs sent one at a time into a loop of conversions: each must reach the loop as
    a KeyboardInterrupt. mx.array(<numpy array>) lost 17 of 200 this way (MLX 0.32)."""
    rows = np.arange(64, dtype=np.int32)
    sent, lost = 200, 0
    caught = threading.Event()
    done = threading.Event()
    go = threading.Event()
    main = threading.main_thread().ident
    assert threading.current_thread().ident == main

    def sender() -> None:
        nonlocal lost
        go.wait()
        for _ in range(sent):
            caught.clear()
            signal.pthread_kill(main, signal.SIGINT)
            if not caught.wait(0.5):
                lost += 1
        done.set()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    received = 0
    try:
        go.set()
        while True:
            try:
                while not done.is_set():
                    for _ in range(200):
                        to_mx(rows)
                break
            except KeyboardInterrupt:
                received += 1
                caught.set()
    finally:
        thread.join(30)
        signal.signal(signal.SIGINT, previous)
    assert (lost, received) == (0, sent)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_]
)
def test_dtype_shape_and_values_are_mx_arrays(dtype):
    a = (np.arange(12) % 3).astype(dtype).reshape(3, 4)
    for source in (a, a.T, a[:, ::2], np.zeros((0, 4), dtype=dtype)):
        want, got = mx.array(source), to_mx(source)
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert got.tolist() == want.tolist()
