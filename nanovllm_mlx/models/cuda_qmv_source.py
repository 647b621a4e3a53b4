"""The CUDA source of models/cuda_qmv.py's kernel (its layout and arithmetic are described
there): the helpers MLX puts before the kernel (HEADER) and the kernel's body (SOURCE)."""

# Integer tricks shared by the float16 and bfloat16 paths: a pair of 16-bit values is a
# uint32 here, and only three operations know its type (fma2, sub2, sum2).
HEADER = """
template <typename To, typename From>
__device__ __forceinline__ To qmv_bits(From f) {  // registers renamed, no code (NVRTC has
  static_assert(sizeof(To) == sizeof(From), "a pair is 4 bytes");  // no memcpy builtin)
  return *reinterpret_cast<const To*>(&f);
}
__device__ __forceinline__ float qmv_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float qmv_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void qmv_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void qmv_store(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}
// The code c in a pair's low bits, OR this, is 1024 + c (float16) or 128 + c (bfloat16).
__device__ __forceinline__ uint32_t qmv_magic(__half) { return 0x64006400u; }
__device__ __forceinline__ uint32_t qmv_magic(__nv_bfloat16) { return 0x43004300u; }
__device__ __forceinline__ uint32_t qmv_fma2(uint32_t a, uint32_t b, uint32_t c, __half) {
  return qmv_bits<uint32_t>(
      __hfma2(qmv_bits<__half2>(a), qmv_bits<__half2>(b), qmv_bits<__half2>(c)));
}
__device__ __forceinline__ uint32_t qmv_fma2(
    uint32_t a, uint32_t b, uint32_t c, __nv_bfloat16) {
  return qmv_bits<uint32_t>(__hfma2(
      qmv_bits<__nv_bfloat162>(a), qmv_bits<__nv_bfloat162>(b), qmv_bits<__nv_bfloat162>(c)));
}
__device__ __forceinline__ uint32_t qmv_sub2(uint32_t a, uint32_t b, __half) {
  return qmv_bits<uint32_t>(__hsub2(qmv_bits<__half2>(a), qmv_bits<__half2>(b)));
}
__device__ __forceinline__ uint32_t qmv_sub2(uint32_t a, uint32_t b, __nv_bfloat16) {
  return qmv_bits<uint32_t>(
      __hsub2(qmv_bits<__nv_bfloat162>(a), qmv_bits<__nv_bfloat162>(b)));
}
__device__ __forceinline__ float qmv_sum2(uint32_t a, __half) {
  const float2 f = __half22float2(qmv_bits<__half2>(a));
  return f.x + f.y;
}
__device__ __forceinline__ float qmv_sum2(uint32_t a, __nv_bfloat16) {
  const float2 f = __bfloat1622float2(qmv_bits<__nv_bfloat162>(a));
  return f.x + f.y;
}
"""

# A warp per R rows of the weight (output features), a lane per 32 input features of a
# step (one uint4 of codes per row); the x rows are read as four uint4 each. Pair k of a
# code word holds codes k and k + 4 (MLX packs code i at bits 4i), so x's values are
# paired alike with byte permutes. bfloat16 keeps 8 bits of precision: its pairs are
# summed into float32 after every word (4 products), float16's after a step's 16.
SOURCE = """
    constexpr uint32_t LOW4 = 0x000F000Fu;
    const T tag{};
    const uint32_t magic = qmv_magic(tag);
    const int lane = threadIdx.x & 31;
    const long row0 = ((long)blockIdx.x * WARPS + (threadIdx.x >> 5)) * R;
    const int n_out = w_shape[0];
    const int k_in = x_shape[1];
    if (row0 >= n_out) return;
    const int steps = k_in / 32, groups = k_in / G;
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    float acc[R][M];
    #pragma unroll
    for (int r = 0; r < R; ++r)
      #pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
    for (int c0 = lane; c0 < steps; c0 += 32 * U) {
      // Every load of U steps first (U x R x 16 bytes of codes in flight a lane), then
      // the arithmetic; a step past the row reads the row's last one and is not counted.
      uint4 codes[U][R];
      float scale[U][R], bias[U][R];
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = min(c0 + 32 * u, steps - 1);
        #pragma unroll
        for (int r = 0; r < R; ++r) {
          const long n = row0 + r < n_out ? row0 + r : n_out - 1;
          codes[u][r] = w4[n * steps + c];
          scale[u][r] = qmv_float(scales[n * groups + c * 32 / G]);
          bias[u][r] = qmv_float(biases[n * groups + c * 32 / G]);
        }
      }
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (c >= steps) break;
        // The R rows' codes as value pairs, once a step for all M rows of x. (nvcc already
        // hoisted them out of the loop over x's rows when they were written inside it:
        // the same registers either way, tools/check_cuda_source.py; written so to say it.)
        uint32_t q[R][16];
        #pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint4 cw = codes[u][r];
          const uint32_t words[4] = {cw.x, cw.y, cw.z, cw.w};
          #pragma unroll
          for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int k = 0; k < 4; ++k)
              q[r][4 * j + k] = qmv_sub2(((words[j] >> (4 * k)) & LOW4) | magic, magic, tag);
        }
        #pragma unroll
        for (int m = 0; m < M; ++m) {
          uint32_t xw[16];
          #pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint4 v = x4[((long)m * k_in + c * 32) / 8 + i];
            xw[4 * i] = v.x; xw[4 * i + 1] = v.y; xw[4 * i + 2] = v.z; xw[4 * i + 3] = v.w;
          }
          uint32_t xp[16];  // pair 4j + k: x[8j + k], x[8j + k + 4]
          float xsum = 0.0f;
          #pragma unroll
          for (int j = 0; j < 4; ++j) {
            xp[4 * j] = __byte_perm(xw[4 * j], xw[4 * j + 2], 0x5410);
            xp[4 * j + 1] = __byte_perm(xw[4 * j], xw[4 * j + 2], 0x7632);
            xp[4 * j + 2] = __byte_perm(xw[4 * j + 1], xw[4 * j + 3], 0x5410);
            xp[4 * j + 3] = __byte_perm(xw[4 * j + 1], xw[4 * j + 3], 0x7632);
            #pragma unroll
            for (int i = 0; i < 4; ++i) xsum += qmv_sum2(xw[4 * j + i], tag);
          }
          #pragma unroll
          for (int r = 0; r < R; ++r) {
            float dot = 0.0f;
            uint32_t pair = 0u;
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
              #pragma unroll
              for (int k = 0; k < 4; ++k)
                pair = qmv_fma2(xp[4 * j + k], q[r][4 * j + k], pair, tag);
              if (FLUSH_WORDS == 1 || j == 3) {
                dot += qmv_sum2(pair, tag);
                pair = 0u;
              }
            }
            acc[r][m] += scale[u][r] * dot + bias[u][r] * xsum;
          }
        }
      }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r)
      #pragma unroll
      for (int m = 0; m < M; ++m) {
        float v = acc[r][m];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0 && row0 + r < n_out) qmv_store(out + (long)m * n_out + row0 + r, v);
      }
"""
