"""Decode attention read for a batch, by KV pool layout and read path (ms per layer).

Variants, all over the same random pools and scattered block tables:
  token-major gather+sdpa   pools [slots, H, D], gather by block table, masked SDPA (v0.1)
  head-major gather+matmul  pools [H, slots, D], gather, matmuls (the CPU path)
  head-major gather+sdpa    pools [H, slots, D], gather, masked SDPA (GPU prefill path)
  cuda kernel               reads the pools through the block table (CUDA decode path):
                            a thread block per group of query heads sharing a KV head
  cuda kernel, head blocks  the same kernel with a thread block per query head (before
                            round three: each KV row read once per query head)
  cuda kernel, unroll 1/4   one or four keys in flight a warp, not two
  cuda kernel, values after scores   value rows loaded after the scores' reduction (before
                            round three's v12), not with the keys
  cuda kernel, vector loads  a lane's values of a row consecutive, loaded as one word
                            (8 bytes of a float16 row at head_dim 128), not 32 apart;
                            "lane-strided loads" is the other way, whatever the default
  cuda kernel, one key / two keys   one key a warp at a time (before v19), or two side by
                            side over 16 lanes each (16-byte loads at head_dim 128)
  cuda kernel, N blocks     partitions sized for N thread blocks in all, not 512
  contiguous slice+sdpa     SDPA straight over a slice of the head-major pool, as a
                            sequence whose blocks are contiguous could be read (no gather)
  gather only               the token-major gather alone
  head-major slot gather    head-major K gather slot by slot (the read before v0.3)
  head-major block gather   head-major K gather block by block (the read now)
  dense (mlx-lm)            SDPA over a contiguous [B, H, L, D] cache, no paging
  cuda kernel, int8 KV      the kernel over quantized pools (--kv-formats; issue 26),
                            dequantizing in registers, q and output turned around it
  gather+sdpa, int8 KV      the gather path over the same pools (their route before)

    python benchmarks/attention_layouts.py 1x512 32x1024 128x1024 --dtype float16
    python benchmarks/attention_layouts.py 1x8192 --heads 32 --kv-heads 8 --dim 128 \
        --layers 32 --dtype float16      (Llama 3 8B's attention)
    python benchmarks/attention_layouts.py 1x8192 8x2048 --heads 32 --kv-heads 8 --dim 128 \
        --layers 32 --dtype float16 --kv-formats int8,int4   (quantized pools beside float16)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx
# isort: on

from nanovllm_mlx.attention import cuda as cuda_attention
from nanovllm_mlx.attention import cuda_decode
from nanovllm_mlx.attention.attend import gathered_attention
from nanovllm_mlx.attention.kv_cache import read_blocks
from nanovllm_mlx.attention.kv_quant import QUANTIZED
from nanovllm_mlx.attention.metadata import KVCache, PoolLayout


def bench(fn, layers: int) -> float:
    mx.eval(fn())
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        mx.eval(fn())
        samples.append((time.perf_counter() - t0) / layers * 1e3)
    return sorted(samples)[3]


def quantized_caches(
    name: str, layers: int, hkv: int, slots: int, d: int, bs: int
) -> list[KVCache]:
    """Pools of a quantized format (kv_quant.QUANTIZED), every slot written."""
    fmt = QUANTIZED[name]
    rows = PoolLayout(hkv, slots // bs, bs).write_rows(np.arange(slots))
    caches = []
    for _ in range(layers):
        c = KVCache.allocate((fmt, fmt), hkv, slots, d, bs)
        c.write(mx.random.normal((slots, hkv, d)), mx.random.normal((slots, hkv, d)), rows)
        mx.eval(c.arrays())
        caches.append(c)
    return caches


def measure(
    b: int,
    ctx: int,
    h: int,
    hkv: int,
    d: int,
    dtype: mx.Dtype,
    layers: int,
    kv_formats: tuple[str, ...] = (),
) -> dict[str, float]:
    """h query heads over hkv KV heads (grouped-query attention when hkv < h)."""
    bs, scale = 16, d**-0.5
    nb = -(-ctx // bs)
    n = b * nb + 8
    tables = mx.random.permutation(n)[: b * nb].reshape(b, nb).astype(mx.int32)
    slots = (tables[:, :, None] * bs + mx.arange(bs)[None, None]).reshape(b, nb * bs)
    context = mx.full((b,), ctx, dtype=mx.int32)
    mask = mx.arange(nb * bs)[None, None, :] < context[:, None, None]  # [B, 1, L]
    q = mx.random.normal((b, h, d)).astype(dtype)
    token_major = [mx.random.normal((n * bs, hkv, d)).astype(dtype) for _ in range(layers)]
    head_major = [
        KVCache(*(mx.random.normal((hkv, n * bs, d)).astype(dtype),) * 2, bs) for _ in range(layers)
    ]
    dense = [mx.random.normal((b, hkv, nb * bs, d)).astype(dtype) for _ in range(layers)]
    rows = PoolLayout(hkv, n, bs).block_rows(np.array(tables))
    mx.eval(tables, slots, rows, mask, q, token_major, [(c.k, c.v) for c in head_major], dense)

    def token_gather(p: mx.array) -> mx.array:
        blocks = p.reshape(n, bs, hkv, d)[tables]
        return blocks.reshape(b, nb * bs, hkv, d).transpose(0, 2, 1, 3)

    def token_sdpa() -> list[mx.array]:
        return [
            mx.fast.scaled_dot_product_attention(
                q[:, :, None], token_gather(p), token_gather(p), scale=scale, mask=mask[:, None]
            )
            for p in token_major
        ]

    fused = mx.default_device() != mx.cpu  # as attention.select_backend decides

    def head_path() -> list[mx.array]:
        return [
            gathered_attention(q[:, None], c, rows, mask, scale, fused=fused) for c in head_major
        ]

    def head_matmul() -> list[mx.array]:
        with mx.stream(mx.default_device()):
            return head_path()

    def kernel(
        group: int | None = None,
        unroll: int = cuda_decode.UNROLL,
        early: bool = True,
        caches: list[KVCache] = head_major,
        vector: bool | None = None,
        blocks: int = cuda_decode.TARGET_BLOCKS,
        keys: int | None = None,
    ) -> list[mx.array]:
        args = (tables, context, bs, scale, ctx)
        return [
            cuda_decode.paged_decode(
                q,
                c.k,
                c.v,
                *args,
                group=group,
                unroll=unroll,
                early_values=early,
                vector_loads=vector,
                target_blocks=blocks,
                keys=keys,
                k_scales=c.k_scales,
                v_scales=c.v_scales,
                formats=c.formats,
            )
            for c in caches
        ]

    def contiguous_slice() -> list[mx.array]:
        # Sequence i's keys as rows [i * L, (i + 1) * L) of every head: a strided view of
        # the pool, [1, Hkv, L, D] per sequence.
        length = nb * bs
        return [
            mx.concatenate(
                [
                    mx.fast.scaled_dot_product_attention(
                        q[i : i + 1, :, None],
                        c.k[None, :, i * length : i * length + ctx],
                        c.v[None, :, i * length : i * length + ctx],
                        scale=scale,
                    )
                    for i in range(b)
                ]
            )
            for c in head_major
        ]

    def dense_sdpa() -> list[mx.array]:
        return [
            mx.fast.scaled_dot_product_attention(q[:, :, None], k, k, scale=scale) for k in dense
        ]

    variants = {
        "token-major gather+sdpa": token_sdpa,
        "head-major gather+" + ("matmul" if mx.default_device() == mx.cpu else "sdpa"): head_matmul,
        "gather only": lambda: [token_gather(p) for p in token_major],
        "head-major slot gather": lambda: [mx.take(c.k, slots, axis=1) for c in head_major],
        "head-major block gather": lambda: [read_blocks(c.k, rows, b, bs) for c in head_major],
        "dense (mlx-lm)": dense_sdpa,
        "contiguous slice+sdpa": contiguous_slice,
    }
    if cuda_attention.available():
        variants["cuda kernel"] = kernel
        variants["cuda kernel, unroll 1"] = lambda: kernel(unroll=1)
        variants["cuda kernel, unroll 4"] = lambda: kernel(unroll=4)
        variants["cuda kernel, values after scores"] = lambda: kernel(early=False)
        variants["cuda kernel, head blocks"] = lambda: kernel(group=1, unroll=1)
        variants["cuda kernel, vector loads"] = lambda: kernel(vector=True)
        variants["cuda kernel, lane-strided loads"] = lambda: kernel(vector=False)
        variants["cuda kernel, one key"] = lambda: kernel(vector=True, keys=1)
        variants["cuda kernel, two keys"] = lambda: kernel(vector=True, keys=2)
        variants["cuda kernel, two keys, unroll 1"] = lambda: kernel(vector=True, keys=2, unroll=1)
        for blocks in (1024, 2048):
            variants[f"cuda kernel, {blocks} blocks"] = lambda blocks=blocks: kernel(blocks=blocks)
            variants[f"cuda kernel, vector loads, {blocks} blocks"] = lambda blocks=blocks: kernel(
                vector=True, blocks=blocks
            )
    for name in kv_formats:
        caches = quantized_caches(name, layers, hkv, n * bs, d, bs)

        def quantized_kernel(caches: list[KVCache] = caches) -> list[mx.array]:
            return kernel(caches=caches)

        def quantized_vector(caches: list[KVCache] = caches) -> list[mx.array]:
            return kernel(caches=caches, vector=True, keys=1)

        def quantized_strided(caches: list[KVCache] = caches) -> list[mx.array]:
            return kernel(caches=caches, vector=False)

        def quantized_gather(caches: list[KVCache] = caches) -> list[mx.array]:
            return [
                gathered_attention(q[:, None], c, rows, mask, scale, fused=fused) for c in caches
            ]

        if cuda_attention.available():
            variants[f"cuda kernel, {name} KV"] = quantized_kernel
            variants[f"cuda kernel, one key, {name} KV"] = quantized_vector
            variants[f"cuda kernel, lane-strided, {name} KV"] = quantized_strided
        variants[f"gather+{'sdpa' if fused else 'matmul'}, {name} KV"] = quantized_gather
    return {name: bench(fn, layers) for name, fn in variants.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("shapes", nargs="+", help="BATCHxCONTEXT")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--kv-formats", default="", help="quantized pools to read too, e.g. int8,int4")
    args = ap.parse_args()
    kv_formats = tuple(f for f in args.kv_formats.split(",") if f)
    unknown = [f for f in kv_formats if f not in QUANTIZED]
    if unknown:
        ap.error(f"--kv-formats: unknown {unknown}; choose from {sorted(QUANTIZED)}")
    for spec in args.shapes:
        b, ctx = (int(x) for x in spec.split("x"))
        hkv = args.kv_heads or args.heads
        res = measure(
            b, ctx, args.heads, hkv, args.dim, getattr(mx, args.dtype), args.layers, kv_formats
        )
        cells = ", ".join(f"{k} {v:.3f}" for k, v in res.items())
        print(f"B={b} ctx={ctx} H={args.heads}/{hkv} {args.dtype}: {cells}", flush=True)


if __name__ == "__main__":
    main()
