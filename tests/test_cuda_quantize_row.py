"""The quantizing write kernel (attention/cuda_quantize.py) on the host, against
kv_quant.quantize: its row quantizer (put_row) compiled with g++ under a warp emulated by
32 threads whose shuffles meet at a barrier (tests/cuda_host.py's PRELUDE: the Hadamard
butterfly across lanes and registers, the group reductions, the scales' outward bfloat16
rounding, the codes' rounding, clipping and nibble packing), then the whole kernel
through write_in_place (cuda_host.HostKernel: its grid, rows, strided inputs, K and V
pools and their scales). On a GPU, written in place into MLX's pools:
tests/test_quantized_in_place.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cuda_host import PRELUDE, HostKernel
from helpers import A8, KV_FORMATS, S4

from nanovllm_mlx.attention import cuda_quantize
from nanovllm_mlx.attention.cuda_write import write_in_place
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import INT4, INT8, KVFormat, dequantize, quantize, resolve
from nanovllm_mlx.attention.metadata import PoolLayout

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")

FORMATS = {**KV_FORMATS, "int8-unturned": KVFormat("int8-unturned", bits=8)}

HOST_CASE = """
template <int D, int BITS, bool AFF, int GS, bool ROT, typename P>
void quantize_rows(const char* src_path, int rows, const char* codes_path,
                   const char* scales_path) {
  constexpr int CW = D * BITS / 8, SW = (D / GS) * (AFF ? 2 : 1);
  std::vector<float> src(size_t(rows) * D);
  FILE* f = std::fopen(src_path, "rb");
  std::fread(src.data(), 4, src.size(), f);
  std::fclose(f);
  std::vector<P> codes(size_t(rows) * CW);
  std::vector<__nv_bfloat16> scales(size_t(rows) * SW);
  for (int r = 0; r < rows; ++r) {
    std::barrier<> sync(32);
    warp_barriers = {&sync};
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < 32; ++lane)
      lanes.emplace_back([&, lane] {
        warp_of_thread = 0;
        lane_of_thread = lane;
        put_row<D, BITS, AFF, GS, ROT>(src.data() + size_t(r) * D, 1L, codes.data(),
                                       scales.data(), long(r), lane);
      });
    for (auto& t : lanes) t.join();
  }
  f = std::fopen(codes_path, "wb");
  std::fwrite(codes.data(), sizeof(P), codes.size(), f);
  std::fclose(f);
  f = std::fopen(scales_path, "wb");
  std::fwrite(scales.data(), 2, scales.size(), f);
  std::fclose(f);
}
"""

# (format, head_dim): Llama's 128, 64, Gemma 3's 256, 80 (lanes past the row, a 16-wide
# Hadamard block), 96 (int4's group of 64 does not divide it: one group), 16 (half a warp).
CASES = [(f, d) for f in ("int8", "int4") for d in (16, 64, 80, 96, 128, 256)]
CASES += [(f, d) for f in ("a8", "s4", "s8", "int8-unturned") for d in (64, 80, 128)]


def _template(fmt: KVFormat, d: int, codes: mx.array) -> str:
    c_type = "int8_t" if codes.dtype == mx.int8 else "uint8_t"
    flags = f"{str(fmt.affine).lower()}, {fmt.group_size(d)}, {str(fmt.rotate).lower()}"
    return f"{d}, {fmt.bits}, {flags}, {c_type}"


def test_the_kernels_row_quantizer_writes_what_kv_quant_writes(tmp_path: Path):
    rng = np.random.default_rng(5)
    calls, wants = [], []
    for n, (name, d) in enumerate(CASES):
        fmt = FORMATS[name]
        # Rows of three magnitudes, a few large channels (what the turn is for), a zero row.
        x = rng.standard_normal((10, d)).astype(np.float32)
        x *= np.array([1e-3, 1, 50] * 3 + [0])[:, None]
        x[:, rng.random(d) < 0.05] *= 20
        codes, scales = quantize(mx.array(x), fmt)
        x.tofile(tmp_path / f"x{n}")
        calls.append(
            f'quantize_rows<{_template(fmt, d, codes)}>("{tmp_path}/x{n}", {len(x)}, '
            f'"{tmp_path}/c{n}", "{tmp_path}/s{n}");'
        )
        wants.append((fmt, codes, scales))
    main = "int main() {\n" + "\n".join(calls) + "\nreturn 0;\n}\n"
    header = cuda_quantize.HEADER.replace("OUTWARD", cuda_quantize.OUTWARD_LITERAL)
    (tmp_path / "q.cpp").write_text(PRELUDE + header + HOST_CASE + main)
    flags = ["-std=c++20", "-O1", "-pthread"]
    build = subprocess.run(
        ["g++", *flags, "-o", str(tmp_path / "q"), str(tmp_path / "q.cpp")],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    done = subprocess.run([str(tmp_path / "q")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    for n, (fmt, codes, scales) in enumerate(wants):
        case = str(CASES[n])
        got_codes = mx.array(np.fromfile(tmp_path / f"c{n}", dtype=np.dtype(str(codes.dtype)[9:])))
        got_scales = mx.array(np.fromfile(tmp_path / f"s{n}", dtype=np.uint16)).view(mx.bfloat16)
        got_codes = got_codes.reshape(codes.shape)
        got_scales = got_scales.reshape(scales.shape)
        # The butterfly's sums round apart from MLX's product in the last bits: a scale
        # may differ by bfloat16's last bit and a code by one, each row staying within a
        # step of kv_quant's.
        same_codes = np.array(mx.equal(got_codes, codes)).mean()
        same_scales = np.array(mx.equal(got_scales, scales)).mean()
        assert same_codes > 0.98 and same_scales > 0.9, (case, same_codes, same_scales)
        got = np.array(dequantize(got_codes, got_scales, fmt, mx.float32, rotated=True))
        want = np.array(dequantize(codes, scales, fmt, mx.float32, rotated=True))
        n_scales = scales.shape[-1] // (2 if fmt.affine else 1)
        step = np.array(scales[:, :n_scales].astype(mx.float32)).max(axis=-1, keepdims=True)
        bound = np.broadcast_to(1.01 * step + 1e-30, got.shape)
        np.testing.assert_array_less(np.abs(got - want), bound, err_msg=case)


@pytest.mark.parametrize(
    "k_fmt,v_fmt,d",
    [(INT8, INT4, 128), (INT4, INT8, 80), (A8, resolve("auto", mx.float16), 64), (S4, A8, 96)],
    ids=lambda c: getattr(c, "name", str(c)),
)
def test_the_whole_kernel_writes_the_rows_the_scatter_writes(
    monkeypatch: pytest.MonkeyPatch, k_fmt: KVFormat, v_fmt: KVFormat, d: int
):
    monkeypatch.setattr(mx.fast, "cuda_kernel", HostKernel, raising=False)
    cuda_quantize._kernel.cache_clear()
    try:
        rng = np.random.default_rng(6)
        n_kv, blocks, bs, t = 3, 16, 8, 11
        rows = PoolLayout(n_kv, blocks, bs).write_rows(rng.permutation(blocks * bs)[:t])
        fused = mx.array(rng.standard_normal((t, n_kv, 3 * d)).astype(np.float32))
        k, v = (fused[..., i * d : (i + 1) * d].astype(mx.float16) for i in (0, 1))  # strided
        mine, theirs = (KVCache.allocate((k_fmt, v_fmt), n_kv, blocks * bs, d, bs) for _ in "ab")
        write_in_place(mine, k, v, rows)
        mx.eval(mine.written)
        kernel = cuda_quantize._kernel()
        # The kernel's inputs: k, v, rows, then the pools and scales it writes in place.
        after = kernel.inputs_after[3:]
        theirs.write(k, v, rows)
        for name, got in zip(["k", "v", "k_scales", "v_scales"], after):
            want = getattr(theirs, name)
            if want is None:
                continue
            want_bits = np.array(want.view(mx.uint16) if want.dtype == mx.bfloat16 else want)
            written = np.zeros(n_kv * blocks * bs, dtype=bool)
            written[np.array(rows)] = True
            got = got.reshape(written.size, -1)
            want_bits = want_bits.reshape(written.size, -1)
            # The written rows: codes off by one where the butterfly's sums round apart.
            same = (got[written] == want_bits[written]).mean()
            assert same > 0.98, (name, same)
            assert (got[~written] == want_bits[~written]).all(), name  # the rest untouched
    finally:
        cuda_quantize._kernel.cache_clear()
