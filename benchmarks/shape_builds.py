"""What a new shape costs the first time, op by op: each op run at several lengths never
seen before, timed at its first call and again at its second, on the device's MLX.

On MLX's CUDA build some ops build a kernel or a cuDNN graph per shape (SDPA keys its
cuDNN graphs by shapes and strides); a prompt of a new length then pays that build in
its prefill. Padded SDPA shapes (attention/chunk_shapes.py) reuse them.

    python benchmarks/shape_builds.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx
# isort: on

from nanovllm_mlx.attention.chunk_shapes import bucket


def first_and_again(fn: Callable[[], mx.array]) -> tuple[float, float]:
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return times[0], times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="301,517,777,1234,1501,1999")
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)
    lengths = [int(n) for n in args.lengths.split(",")]
    h, hkv, d, hidden, inter = 32, 8, 128, 4096, 14336
    w = mx.quantize((mx.random.normal((inter, hidden)) * 0.02).astype(dtype), 64, 4)
    norm_w = mx.ones((hidden,), dtype=dtype)
    mx.eval(w, norm_w)

    def sdpa(lq: int, lk: int) -> Callable[[], mx.array]:
        q = mx.random.normal((1, lq, h, d)).astype(dtype).transpose(0, 2, 1, 3)
        k = mx.random.normal((1, hkv, lk, d)).astype(dtype)
        mx.eval(q, k)
        return lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1, mask="causal")

    def tokens(m: int) -> mx.array:
        x = mx.random.normal((m, hidden)).astype(dtype)
        mx.eval(x)
        return x

    def matmul(m: int) -> Callable[[], mx.array]:
        x = tokens(m)
        return lambda: mx.quantized_matmul(x, *w, group_size=64, bits=4)

    def norm(m: int) -> Callable[[], mx.array]:
        x = tokens(m)
        return lambda: mx.fast.rms_norm(x, norm_w, 1e-5)

    def rope(m: int) -> Callable[[], mx.array]:
        x = tokens(m).reshape(1, m, h, d)
        return lambda: mx.fast.rope(x, d, traditional=False, base=5e5, scale=1.0, offset=3)

    ops: dict[str, Callable[[int, int], Callable[[], mx.array]]] = {
        "sdpa causal (L, L)": lambda n, salt: sdpa(n + salt, n + salt),
        "sdpa causal (L, L + 700)": lambda n, salt: sdpa(n + salt, n + salt + 700),
        "sdpa causal, padded (chunk_shapes)": lambda n, salt: sdpa(bucket(n), bucket(n)),
        "4-bit matmul, M = L": lambda n, salt: matmul(n + salt),
        "rms_norm, M = L": lambda n, salt: norm(n + salt),
        "rope, M = L": lambda n, salt: rope(n + salt),
    }
    print(mx.default_device(), args.dtype, "| first call / second call, ms, per new length")
    for salt, (name, make) in enumerate(ops.items()):
        runs = [first_and_again(make(n, salt)) for n in lengths]
        cells = "  ".join(f"{a:.1f}/{b:.1f}" for a, b in runs)
        extra = statistics.median(a - b for a, b in runs)
        print(f"  {name:<36} median extra {extra:8.1f} ms: {cells}", flush=True)


if __name__ == "__main__":
    main()
