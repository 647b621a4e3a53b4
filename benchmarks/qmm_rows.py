"""A 4-bit quantized matmul's time by the number of rows it multiplies (a decode batch's
sequences), on Llama 3 8B's projections: what a batch of 2-64 decoding sequences costs
per step against one, in MLX itself, for our engine and mlx-lm alike.

Also, for each M, the same product as M one-row products (M x the weight reads): where
that is faster, MLX's kernel for small M is the bottleneck, not the bytes; and below 8
rows, MLX's product with x padded to 8 rows (its tiled matmul's threshold on CUDA). On MLX's CUDA
build, our own kernel (models/cuda_qmv.py) beside MLX's, up to its MAX_ROWS rows, with
the largest difference from MLX's result; and for one and eight rows, each projection
alone, ours with 1, 2 and 4 weight rows a warp and 1 or 2 steps in flight.

    python benchmarks/qmm_rows.py --rows 1,2,4,8,16,32,64 --dtype float16 [--joined]
"""

from __future__ import annotations

import argparse
import time

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx

# isort: on
from nanovllm_mlx.attention.cuda import on_gpu
from nanovllm_mlx.models import cuda_qmv

# (name, out features, in features): one Llama 3 8B layer's projections, unfused as both
# engines run them.
SHAPES = [
    ("q", 4096, 4096),
    ("k", 1024, 4096),
    ("v", 1024, 4096),
    ("o", 4096, 4096),
    ("gate", 14336, 4096),
    ("up", 14336, 4096),
    ("down", 4096, 14336),
]
# --joined: as the engine runs them on GPUs (models/fusion.py joins q/k/v and gate/up).
JOINED = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def timed(fn, repeats: int) -> float:
    """Median ms of fn() evaluated, after two warm-up calls."""
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def inputs(m: int, shapes: list, dtype: mx.Dtype) -> dict[str, mx.array]:
    """m rows of x for each projection, evaluated."""
    xs = {name: (mx.random.normal((m, k)) * 0.1).astype(dtype) for name, _, k in shapes}
    mx.eval(xs)
    return xs


def mlx_products(xs: dict, weights: dict, shapes: list, args: argparse.Namespace) -> list:
    """MLX's 4-bit matmul of every projection, args.layers times over."""
    return [
        mx.quantized_matmul(xs[name], *weights[name], group_size=args.group_size, bits=args.bits)
        for _ in range(args.layers)
        for name, _, _ in shapes
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32, help="products chained per timing")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--joined", action="store_true", help="the engine's joined projections")
    args = ap.parse_args()
    shapes = JOINED if args.joined else SHAPES
    dtype = getattr(mx, args.dtype)
    weights = {}
    for name, n, k in shapes:
        w = (mx.random.normal((n, k)) * 0.02).astype(dtype)
        weights[name] = mx.quantize(w, group_size=args.group_size, bits=args.bits)
    mx.eval(weights)
    total = sum(w.nbytes + s.nbytes + b.nbytes for w, s, b in weights.values())
    print(f"{mx.default_device()}, {args.dtype}, {args.bits}-bit, group {args.group_size}")
    ours = on_gpu() and args.bits == 4
    print(
        f"{'rows':>5} {'one product ms':>15} {'GB/s':>7} {'x one row':>10} {'rows apart ms':>14}"
        f" {'padded to 8':>12}"
        + (f" {'ours ms':>8} {'GB/s':>7} {'vs MLX':>7} {'max |diff|':>10}" if ours else "")
    )
    base = None
    mlx_ms: dict[int, float] = {}  # MLX's 4-bit matmul, ms a layer, by rows
    rows = [int(r) for r in args.rows.split(",") if r]
    for m in rows:
        xs = inputs(m, shapes, dtype)

        def together(xs: dict = xs) -> list[mx.array]:
            return mlx_products(xs, weights, shapes, args)

        def apart(xs: dict = xs, m: int = m) -> list[mx.array]:
            return [
                mx.quantized_matmul(
                    xs[name][i : i + 1], *weights[name], group_size=args.group_size, bits=args.bits
                )
                for _ in range(args.layers)
                for name, _, _ in shapes
                for i in range(m)
            ]

        def padded(xs: dict = xs, m: int = m) -> list[mx.array]:
            return [
                mx.quantized_matmul(
                    mx.pad(xs[name], [(0, 8 - m), (0, 0)]),
                    *weights[name],
                    group_size=args.group_size,
                    bits=args.bits,
                )[:m]
                for _ in range(args.layers)
                for name, _, _ in shapes
            ]

        def our_kernel(xs: dict = xs) -> list[mx.array]:
            return [
                cuda_qmv.qmv(xs[name], *weights[name], group_size=args.group_size)
                for _ in range(args.layers)
                for name, _, _ in shapes
            ]

        ms = mlx_ms[m] = timed(together, args.repeats) / args.layers
        base = base or ms
        rows_apart = timed(apart, args.repeats) / args.layers if m <= 8 else float("nan")
        to_8 = timed(padded, args.repeats) / args.layers if m < 8 else float("nan")
        line = f"{m:>5} {ms:>15.4f} {total / ms / 1e6:>7.0f} {ms / base:>10.2f} {rows_apart:>14.4f}"
        line += f" {to_8:>12.4f}"
        if ours and m <= cuda_qmv.MAX_ROWS:
            mine = timed(our_kernel, args.repeats) / args.layers
            diff = max(
                mx.abs(a - b).max().item()
                for a, b in zip(our_kernel()[: len(shapes)], together()[: len(shapes)])
            )
            line += f" {mine:>8.4f} {total / mine / 1e6:>7.0f} {ms / mine:>6.2f}x {diff:>10.4f}"
        print(line)
    dense_rows = [m for m in rows if m >= 64]
    if dense_rows:
        # Prompt chunks: MLX's 4-bit matmul against dequantizing the weights and the dense
        # matmul (models/cuda_qmv.DENSE_ROWS), a layer's joined products, ms a layer.
        print(
            f"{'rows':>5} {'4-bit matmul ms':>16} {'TFLOP/s':>8} {'dequantized+dense ms':>21}"
            f" {'TFLOP/s':>8} {'ratio':>6}"
        )
        flops_row = 2 * sum(n * k for _, n, k in shapes)
        for m in dense_rows:
            xs = inputs(m, shapes, dtype)

            def dequantized(xs: dict = xs) -> list[mx.array]:
                out = []
                for _ in range(args.layers):
                    for name, _, _ in shapes:
                        w = mx.dequantize(
                            *weights[name], group_size=args.group_size, bits=args.bits
                        )
                        out.append(xs[name] @ w.T)
                return out

            q_ms = mlx_ms[m]  # timed above, the same products
            d_ms = timed(dequantized, args.repeats) / args.layers
            tf = flops_row * m / 1e9
            print(
                f"{m:>5} {q_ms:>16.4f} {tf / q_ms:>8.1f} {d_ms:>21.4f} {tf / d_ms:>8.1f}"
                f" {q_ms / d_ms:>5.2f}x"
            )
    if not ours:
        return
    variants = [(r, u) for r in (1, 2, 4, 8) for u in (1, 2)]
    for m in sorted({1, 4, 8} & set(rows)):
        print(f"{m} row(s), each projection alone (ms; GB/s of weights):")
        print(
            f"{'name':>5} {'MLX':>16}" + "".join(f" {f'ours R={r} U={u}':>16}" for r, u in variants)
        )
        for name, _, k in shapes:
            x = (mx.random.normal((m, k)) * 0.1).astype(dtype)
            w, sc, bi = weights[name]
            size = w.nbytes + sc.nbytes + bi.nbytes

            def mlx_one(x: mx.array = x, name: str = name) -> list[mx.array]:
                args_ = weights[name]
                return [
                    mx.quantized_matmul(x, *args_, group_size=args.group_size, bits=args.bits)
                    for _ in range(args.layers)
                ]

            cells = [timed(mlx_one, args.repeats) / args.layers]
            for r, u in variants:

                def ours_one(
                    x: mx.array = x, name: str = name, r: int = r, u: int = u
                ) -> list[mx.array]:
                    return [
                        cuda_qmv.qmv(
                            x, *weights[name], group_size=args.group_size, rows=r, in_flight=u
                        )
                        for _ in range(args.layers)
                    ]

                cells.append(timed(ours_one, args.repeats) / args.layers)
            print(f"{name:>5}" + "".join(f" {c:>8.4f} {size / c / 1e6:>7.0f}" for c in cells))


if __name__ == "__main__":
    main()
