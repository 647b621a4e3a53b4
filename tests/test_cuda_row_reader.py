"""The CUDA decode kernel's row reader (attention/cuda_rows.py's HEADER, paged_row)
compiled for the host with g++ (tests/cuda_host.py's PRELUDE) and checked against
kv_quant.dequantize: the dequantizing arithmetic of the kernel (row and scale offsets,
nibble order, bias index, group index) tested without a GPU. The whole kernel against
the gather path: tests/test_cuda_kernel_host.py (on the host), tests/test_cuda_kv_quant.py
(on a GPU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cuda_host import PRELUDE
from helpers import KV_FORMATS

from nanovllm_mlx.attention.cuda_rows import HEADER
from nanovllm_mlx.attention.kv_quant import dequantize, quantize, resolve

HOST_CASE = """
template <int D, int VL, int BITS, bool AFF, int GS, typename P>
void read_rows(const char* codes_path, const char* scales_path, int slots, const char* out_path) {
  constexpr int PL = (D + 31) / 32;
  constexpr int W = paged_row_width<D, BITS>(), SW = paged_scale_width<D, BITS, AFF, GS>();
  std::vector<P> codes(size_t(slots) * W);
  std::vector<__nv_bfloat16> scales(size_t(slots) * SW + 1);
  FILE* f = std::fopen(codes_path, "rb");
  std::fread(codes.data(), sizeof(P), codes.size(), f);
  std::fclose(f);
  if (SW) {
    f = std::fopen(scales_path, "rb");
    std::fread(scales.data(), 2, size_t(slots) * SW, f);
    std::fclose(f);
  }
  std::vector<float> out(size_t(slots) * D, -1e30f);
  for (int slot = 0; slot < slots; ++slot)
    for (int lane = 0; lane < 32; ++lane) {
      float r[PL], none[PL];
      paged_row<D, PL, VL, BITS, AFF, GS>(r, codes.data(), scales.data(), slot, lane, true);
      paged_row<D, PL, VL, BITS, AFF, GS>(none, codes.data(), scales.data(), slot, lane, false);
      for (int i = 0; i < PL; ++i) {
        if (none[i] != 0.f) std::printf("invalid row read %f\\n", none[i]);
        const int d = paged_dim<PL, VL>(lane, i);
        if (d < D) out[size_t(slot) * D + d] = r[i];
      }
    }
  f = std::fopen(out_path, "wb");
  std::fwrite(out.data(), 4, out.size(), f);
  std::fclose(f);
}
"""

# (format, head_dim, VL): a lane's values 32 apart, and consecutive (one word a lane)
# where head_dim is a multiple of 32.
FORMATS = ("int8", "int4", "a8", "s4", "s8", "float32", "float16")
ROW_CASES = [(f, d, 0) for f in FORMATS for d in (64, 80, 128)]
ROW_CASES += [(f, d, 1) for f in FORMATS for d in (32, 64, 128, 256)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_the_kernels_row_reader_dequantizes_as_kv_quant_does(tmp_path: Path):
    """cuda_rows.HEADER's paged_row, compiled for the host, reads every lane's values of
    rows that kv_quant.quantize wrote: each equals dequantize's (rows left turned, as the
    kernel reads them), and a row past the partition's end reads as zeros; lane-strided
    and, with VL, a lane's consecutive values loaded as one word."""
    rng = np.random.default_rng(4)
    calls, wants = [], []
    for n, (name, d, vl) in enumerate(ROW_CASES):
        fmt = KV_FORMATS[name] if name in KV_FORMATS else resolve(name, mx.float32)
        x = rng.standard_normal((9, d)).astype(np.float32) * np.array([1e-3, 1, 50] * 3)[:, None]
        if fmt.quantized:
            codes, scales = quantize(mx.array(x), fmt)
            want = dequantize(codes, scales, fmt, mx.float32, rotated=True)
            (tmp_path / f"s{n}").write_bytes(np.array(scales.view(mx.uint16)).tobytes())
            c_type = "int8_t" if codes.dtype == mx.int8 else "uint8_t"
            params = f"{fmt.bits}, {str(fmt.affine).lower()}, {fmt.group_size(d)}, {c_type}"
        else:
            codes = want = mx.array(x).astype(fmt.dtype)
            params = f"0, false, {d}, {'float' if fmt.dtype == mx.float32 else '__half'}"
        (tmp_path / f"c{n}").write_bytes(np.array(codes).tobytes())
        calls.append(
            f'read_rows<{d}, {vl}, {params}>("{tmp_path}/c{n}", "{tmp_path}/s{n}", 9, '
            f'"{tmp_path}/o{n}");'
        )
        wants.append(np.array(want.astype(mx.float32)))
    main = "int main() {\n" + "\n".join(calls) + "\nreturn 0;\n}\n"
    (tmp_path / "rows.cpp").write_text(PRELUDE + HEADER + HOST_CASE + main)
    build = subprocess.run(
        [
            "g++",
            "-std=c++20",
            "-O1",
            "-pthread",
            "-o",
            str(tmp_path / "rows"),
            str(tmp_path / "rows.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    done = subprocess.run([str(tmp_path / "rows")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    for n, want in enumerate(wants):
        got = np.fromfile(tmp_path / f"o{n}", dtype=np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30, err_msg=str(ROW_CASES[n]))
