"""How a lane of the paged decode kernel reads and turns a pool row, as CUDA source the
kernels include: HEADER (attention/cuda.py puts it before PARTIAL, cuda_source.py) holds
paged_row and its helpers, one source for float and quantized pools (KVFormat's layouts,
attention/kv_quant.py) chosen per pool by template constants (cuda_formats.pool_template);
TURN, the Hadamard butterfly over a row's dims as a warp's lanes hold them, which PARTIAL
turns q with and the quantizing writer (cuda_quantize.py) new rows."""

TURN = """
// Orthonormal Hadamard transform of one row (kv_quant.hadamard: Sylvester blocks of N,
// the largest power of two dividing D, down the diagonal) whose dims a warp's lanes hold
// as paged_dim lays them out (VL: PL consecutive dims a lane; else d = lane + 32 i). A
// butterfly over each bit of d below N: across lanes (a shuffle) for a bit of the lane's
// index, within a lane for a bit of the register's. The quantizing writer turns each new
// row this way (cuda_quantize.py); the decode kernel turns q, as keys are stored turned.
template <int D, int PL, int VL>
__device__ __forceinline__ void paged_turn(float (&x)[PL], int lane) {
  constexpr int N = D & -D;
  static_assert(!VL || (PL & (PL - 1)) == 0, "a lane's consecutive dims: a power of two");
#pragma unroll
  for (int p = 1; p < N; p <<= 1) {
    if (VL ? p >= PL : p < 32) {
      const int lp = VL ? p / PL : p;
#pragma unroll
      for (int i = 0; i < PL; ++i) {
        const float o = __shfl_xor_sync(0xffffffff, x[i], lp);
        x[i] = (lane & lp) ? o - x[i] : x[i] + o;
      }
    } else {
      const int q = VL ? p : p / 32;
#pragma unroll
      for (int i = 0; i < PL; ++i)
        if ((i & q) == 0) {
          const float a = x[i], b = x[i + q];
          x[i] = a + b;
          x[i + q] = a - b;
        }
    }
  }
  const float norm = 1.0f / sqrtf(static_cast<float>(N));
  for (int i = 0; i < PL; ++i) x[i] *= norm;
}
"""

HEADER = (
    TURN
    + """
// Elements of one pool row, and of its scales row (bfloat16; affine: [scales, biases]).
template <int D, int BITS>
__host__ __device__ constexpr int paged_row_width() {
  return BITS == 0 ? D : D * BITS / 8;
}
template <int D, int BITS, bool AFF, int GS>
__host__ __device__ constexpr int paged_scale_width() {
  return BITS == 0 ? 0 : (D / GS) * (AFF ? 2 : 1);
}

// The dimension a lane's i-th value of a row is: d = lane + 32 i (a warp's 32 lanes read
// 32 consecutive elements at a time, one element each), or with VL d = PL lane + i (a
// lane's PL values are consecutive: one 8-byte load of a float16 row at head_dim 128
// instead of four 2-byte ones; or one 16-byte load where the row is spread over 16 lanes,
// PARTIAL's KS = 2, and `lane` is the lane's index among them).
template <int PL, int VL>
__device__ __forceinline__ int paged_dim(int lane, int i) {
  return VL ? PL * lane + i : lane + 32 * i;
}

// N consecutive elements from src, in one load where N elements make a 4-, 8- or 16-byte
// word (src is then aligned to it: rows start at multiples of their width).
template <int BYTES> struct paged_word { using type = unsigned char; };
template <> struct paged_word<2> { using type = unsigned short; };
template <> struct paged_word<4> { using type = unsigned int; };
template <> struct paged_word<8> { using type = uint2; };
template <> struct paged_word<16> { using type = uint4; };
template <typename P, int N>
__device__ __forceinline__ void paged_load(P (&dst)[N], const P* src) {
  constexpr int BYTES = static_cast<int>(sizeof(P)) * N;
  if constexpr (BYTES == 2 || BYTES == 4 || BYTES == 8 || BYTES == 16) {
    using W = typename paged_word<BYTES>::type;
    const W w = *reinterpret_cast<const W*>(src);
    const P* e = reinterpret_cast<const P*>(&w);
    for (int j = 0; j < N; ++j) dst[j] = e[j];
  } else {
    for (int j = 0; j < N; ++j) dst[j] = src[j];
  }
}

// Byte k of w as the float 2^23 + byte (its bits under the exponent of 2^23).
__device__ __forceinline__ float paged_splice(unsigned w, int k) {
  return __int_as_float(static_cast<int>(__byte_perm(w, 0x4B000000u, 0x7650u + k)));
}

// The code of dimension d of a quantized row, as a float (int8: the byte; int4: its
// nibble, two a byte, low nibble first; symmetric nibbles are offset by 8).
template <int BITS, bool AFF, typename P>
__device__ __forceinline__ float paged_code(P byte, int d) {
  if constexpr (BITS == 8) {
    return static_cast<float>(byte);  // int8_t (symmetric) or uint8_t (affine)
  } else {
    const int pair = static_cast<int>(byte);
    const int nib = (d & 1) ? (pair >> 4) & 15 : pair & 15;
    return static_cast<float>(AFF ? nib : nib - 8);
  }
}

// The values of one pool row that this lane holds (paged_dim), as floats: a float pool's
// elements, or codes dequantized in registers with their scale (and bias). Lane-strided,
// the codes are read at the same d as a float row, so a warp's loads stay coalesced (32
// consecutive bytes of an int8 row, 16 of an int4 row, whose lanes share bytes); with VL
// a lane loads its PL codes as one word.
template <int D, int PL, int VL, int BITS, bool AFF, int GS, typename P>
__device__ __forceinline__ void paged_row(
    float (&out)[PL], const P* pool, const __nv_bfloat16* scales, long slot, int lane,
    bool valid) {
  const P* row = pool + slot * paged_row_width<D, BITS>();
  static_assert(!VL || (D % PL == 0 && D / PL <= 32), "consecutive lanes' values tile the row");
  if constexpr (BITS == 0) {
    if constexpr (VL) {
      P e[PL];
      if (valid) paged_load<P, PL>(e, row + PL * lane);
      for (int i = 0; i < PL; ++i) out[i] = valid ? static_cast<float>(e[i]) : 0.f;
    } else {
      for (int i = 0; i < PL; ++i) {
        const int d = lane + 32 * i;
        out[i] = (valid && d < D) ? static_cast<float>(row[d]) : 0.f;
      }
    }
  } else {
    static_assert(BITS == 8 || BITS == 4, "codes are 8 or 4 bits");
    static_assert(D % GS == 0, "a scale group divides head_dim");
    constexpr int NG = D / GS;
    const __nv_bfloat16* srow = scales + slot * paged_scale_width<D, BITS, AFF, GS>();
    for (int i = 0; i < PL; ++i) out[i] = 0.f;
    // Rows past the partition's end read nothing; the others' scale loads are then
    // straight-line code, and the lanes' shared ones are loaded once.
    if (!valid) return;
    // A lane's own codes as one word where they fill whole bytes (VL: int8, or int4 at
    // an even PL); otherwise byte by byte at each d.
    constexpr int NB = BITS == 8 ? PL : PL / 2;
    constexpr bool WORD = VL && (BITS == 8 || PL % 2 == 0);
    // Codes in whole 32-bit words (VL, 4 bytes or more a lane) are spliced into floats:
    // a byte permute puts each code under the exponent of 2^23 (0x4B0000cc is 2^23 + cc)
    // and one add takes the 2^23 and the code's offset off, exactly. An int-to-float
    // conversion (I2F) runs at a quarter of a permute's or an add's rate (16 a clock an SM
    // on an H100), and each key past 8k cost an int8 pool 2.6x float16's time for half
    // the bytes (attention_layouts.py, RESULTS.md v19). v21's A/B on the GPU stayed
    // within its noise (RESULTS.md v21); its GPU cases pass.
    constexpr bool SPLICE = WORD && NB % 4 == 0 && !(BITS == 8 && AFF);
    float c[PL];
    if constexpr (SPLICE) {
      unsigned w[NB / 4];
      paged_load<unsigned, NB / 4>(w, reinterpret_cast<const unsigned*>(row + NB * lane));
      // int8's signed bytes flipped to byte + 128; int4's nibbles, low (even d) then high.
      constexpr float OFF = 8388608.f + (BITS == 8 ? 128.f : AFF ? 0.f : 8.f);
      for (int j = 0; j < NB / 4; ++j) {
        const unsigned lo = BITS == 8 ? w[j] ^ 0x80808080u : w[j] & 0x0F0F0F0Fu;
        const unsigned hi = (w[j] >> 4) & 0x0F0F0F0Fu;
        for (int k = 0; k < 4; ++k) {
          const float a = paged_splice(lo, k) - OFF;
          if constexpr (BITS == 8) {
            c[4 * j + k] = a;
          } else {
            c[8 * j + 2 * k] = a;
            c[8 * j + 2 * k + 1] = paged_splice(hi, k) - OFF;
          }
        }
      }
    } else {
      P bytes[NB > 0 ? NB : 1];
      if constexpr (WORD) paged_load<P, NB>(bytes, row + NB * lane);
      for (int i = 0; i < PL; ++i) {
        const int d = paged_dim<PL, VL>(lane, i);
        P byte;
        if constexpr (WORD) byte = bytes[BITS == 8 ? i : i / 2];
        else byte = d < D ? row[BITS == 8 ? d : d >> 1] : P(0);
        c[i] = paged_code<BITS, AFF>(byte, d);
      }
    }
    if constexpr (VL && GS % PL == 0) {
      // A lane's PL consecutive values lie in one scale group: its scale (and bias) are
      // loaded once a row, not once a value.
      const int g = PL * lane / GS;
      const float s = __bfloat162float(srow[g]);
      const float z = AFF ? __bfloat162float(srow[NG + g]) : 0.f;
      for (int i = 0; i < PL; ++i) out[i] = AFF ? c[i] * s + z : c[i] * s;
    } else {
      for (int i = 0; i < PL; ++i) {
        const int d = paged_dim<PL, VL>(lane, i);
        if (d >= D) continue;
        // Lane-strided, groups of a multiple of 32 values: the 32 lanes of step i share
        // one scale, a compile-time index (one broadcast load a row for int8's one scale).
        const int g = (!VL && GS % 32 == 0) ? 32 * i / GS : d / GS;
        const float s = __bfloat162float(srow[g]);
        if constexpr (AFF) out[i] = c[i] * s + __bfloat162float(srow[NG + g]);
        else out[i] = c[i] * s;
      }
    }
  }
}
"""
)
