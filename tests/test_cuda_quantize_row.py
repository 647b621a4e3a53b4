"""The quantizing write kernel (attention/cuda_quantize.py) run on the host through
write_in_place (tests/cuda_host.py: g++, warps as 32 threads whose shuffles meet at a
barrier) against kv_quant.quantize on the CPU: the Hadamard butterfly across lanes and
registers, the group reductions, the scales' outward bfloat16 rounding, the codes'
rounding, clipping and nibble packing, and the grid, rows, strided inputs, K and V pools
and their scales. On a GPU, written in place into MLX's pools:
tests/test_quantized_in_place.py."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from cuda_host import on_the_host
from helpers import A8, S4, S8

from nanovllm_mlx.attention import cuda_quantize
from nanovllm_mlx.attention.cuda_write import write_in_place
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import INT4, INT8, KVFormat, dequantize, resolve
from nanovllm_mlx.attention.metadata import PoolLayout

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")

UNTURNED = KVFormat("int8-unturned", bits=8)
F16 = resolve("auto", mx.float16)

# (K format, V format, head_dim): int8 and int4 at Llama's 128, 64, Gemma 3's 256, 80
# (lanes past the row, a 16-wide Hadamard block), 96 (int4's group of 64 does not divide
# it: one group) and 16 (half a warp); the other layouts; a float pool beside a quantized one.
CASES = [(INT8, INT4, d) for d in (16, 64, 80, 96, 128, 256)]
CASES += [(A8, S4, d) for d in (64, 80, 128)] + [(S8, UNTURNED, d) for d in (64, 80, 128)]
CASES += [(INT4, INT8, 80), (A8, F16, 64)]


def _bits(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


@pytest.mark.parametrize("k_fmt,v_fmt,d", CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_the_kernel_writes_what_kv_quant_writes(
    monkeypatch: pytest.MonkeyPatch, k_fmt: KVFormat, v_fmt: KVFormat, d: int
):
    with on_the_host(monkeypatch, cuda_quantize._kernel):
        rng = np.random.default_rng(6)
        n_kv, blocks, bs, t = 3, 16, 8, 10
        rows = PoolLayout(n_kv, blocks, bs).write_rows(rng.permutation(blocks * bs)[:t])
        # Tokens of three magnitudes, a few large channels (what the turn is for), a zero
        # token; K and V strided views of one fused projection.
        x = rng.standard_normal((t, n_kv, 3 * d)).astype(np.float32)
        x *= np.array([1e-3, 1, 50] * 3 + [0])[:, None, None]
        x[..., rng.random(3 * d) < 0.05] *= 20
        fused = mx.array(x)
        k, v = (fused[..., i * d : (i + 1) * d] for i in (0, 1))
        mine, theirs = (KVCache.allocate((k_fmt, v_fmt), n_kv, blocks * bs, d, bs) for _ in "ab")
        write_in_place(mine, k, v, rows)
        mx.eval(mine.written)
        # The kernel's inputs: k, v, rows, then the pools and scales it writes in place.
        k_pool, v_pool, k_scales, v_scales = cuda_quantize._kernel().inputs_after[3:]
        with mx.stream(mx.cpu):
            theirs.write(k, v, rows)
            mx.eval(theirs.arrays())
        written = np.zeros(n_kv * blocks * bs, dtype=bool)
        written[np.array(rows)] = True
        sides = [(k_fmt, k_pool, k_scales, theirs.k, theirs.k_scales)]
        sides += [(v_fmt, v_pool, v_scales, theirs.v, theirs.v_scales)]
        for fmt, got_pool, got_scales, want_pool, want_scales in sides:
            got_pool = got_pool.reshape(written.size, -1)
            want = _bits(want_pool).reshape(written.size, -1)
            assert (got_pool[~written] == want[~written]).all(), fmt.name  # untouched
            if not fmt.quantized:
                np.testing.assert_array_equal(got_pool, want)
                continue
            # The butterfly's sums round apart from MLX's product in the last bits: a
            # scale may differ by bfloat16's last bit and a code by one, each row staying
            # within a step of kv_quant's.
            got_scales = got_scales.reshape(written.size, -1)
            want_s = _bits(want_scales).reshape(written.size, -1)
            assert (got_scales[~written] == want_s[~written]).all(), fmt.name
            same_codes = (got_pool[written] == want[written]).mean()
            same_scales = (got_scales[written] == want_s[written]).mean()
            assert same_codes > 0.98 and same_scales > 0.9, (fmt.name, same_codes, same_scales)
            codes = [mx.array(c[written]) for c in (got_pool, want)]
            scales = [mx.array(s_[written]).view(mx.bfloat16) for s_ in (got_scales, want_s)]
            got, want_rows = (
                np.array(dequantize(c, s_, fmt, mx.float32, rotated=True))
                for c, s_ in zip(codes, scales)
            )
            n_scales = scales[1].shape[-1] // (2 if fmt.affine else 1)
            step = np.array(scales[1][:, :n_scales].astype(mx.float32)).max(-1, keepdims=True)
            bound = np.broadcast_to(1.01 * step + 1e-30, got.shape)
            np.testing.assert_array_less(np.abs(got - want_rows), bound, err_msg=fmt.name)
