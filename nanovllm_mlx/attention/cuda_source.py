"""The CUDA source of the paged decode kernel (attention/cuda.py builds and launches it):
PARTIAL attends one partition of a sequence's context for a group of query heads that
share a KV head; MERGE combines the partitions by their log-sum-exp. PARTIAL reads pool
rows with cuda_rows.HEADER's paged_row, chosen per pool by template constants
(cuda_formats.pool_template): KT the pool's element type, KB its code bits (0: float
values), KA affine (a bias after the scales), KG the values a scale covers; VT/VB/VA/VG
likewise for V. VL picks which dimensions a lane holds (paged_dim), KS how many keys a
warp reads side by side. RQ turns q in PARTIAL and RO the output in MERGE for pools
stored turned by the Hadamard transform (cuda_rows.TURN)."""

PARTIAL = """
    const float NEG_INF = -__int_as_float(0x7f800000);
    // KS keys side by side in a warp (VL only): a row's dims over LK = 32 / KS lanes, PL
    // consecutive ones each (16-byte loads of a float16 row at head_dim 128), each group
    // of LK lanes (`sub`) with its own keys and softmax state, merged as if another warp:
    // a key's dot product is reduced over LK lanes, and one shuffle serves KS keys.
    static_assert(KS == 1 || (VL && D % (32 / KS) == 0), "keys side by side need VL");
    constexpr int LK = 32 / KS, PL = VL ? D / LK : (D + 31) / 32, VW = WARPS * KS;
    // One thread block serves GB query heads that share a KV head (grouped-query
    // attention): each key and value row is read once for all of them, where a block per
    // query head read it G times (4x at Llama 3's 32/8 heads).
    const int part = blockIdx.x, h0 = blockIdx.y * GB, b = blockIdx.z;
    const int n_heads = gridDim.y * GB, n_parts = gridDim.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LK, sl = lane % LK, vw = warp * KS + sub;
    const int ctx = context_lens[b];
    // params[0]: the tokens a partition attends, or 0 where the launch knew only the
    // block tables' capacity (a compiled step, traced once per power-of-two width, of at
    // most COMPILE_MAX_BATCH rows): the batch's longest span, read here, is then split
    // over the partitions, so none is left empty while the others each take twice the
    // keys in turn. A span never reaches past the tables, whatever a length says.
    int part_size = params[0];
    if (part_size == 0) {
        int longest = 1;
        for (int i = 0; i < gridDim.z; ++i) {
            const int c = min(context_lens[i], block_tables_shape[1] * BS);
            longest = max(longest, params[1] > 0 ? min(c, params[1]) : c);
        }
        part_size = (longest + n_parts - 1) / n_parts;
    }
    // A sliding-window layer (params[1] = W > 0) reads only keys [ctx - W, ctx); the
    // partitions tile that span, so blocks before it (maybe freed) are never touched.
    const int lo = params[1] > 0 ? max(0, ctx - params[1]) : 0;
    const int start = lo + part * part_size;
    const int end = min(start + part_size, ctx);
    const int nb = block_tables_shape[1];
    const long slots = k_pool_shape[1];
    const int kvh = h0 / G;
    // Scores in base 2 (exp2f is one instruction); the merge works in the same base.
    const float sc = scale[0] * 1.4426950408889634f;
    const KT* k_base = k_pool + (long)kvh * slots * paged_row_width<D, KB>();
    const VT* v_base = v_pool + (long)kvh * slots * paged_row_width<D, VB>();
    // A float pool's scales input is a placeholder that is never read.
    const __nv_bfloat16* ks_base =
        k_scales + (long)kvh * slots * paged_scale_width<D, KB, KA, KG>();
    const __nv_bfloat16* vs_base =
        v_scales + (long)kvh * slots * paged_scale_width<D, VB, VA, VG>();
    const int* table = block_tables + (long)b * nb;
    float qv[GB][PL], acc[GB][PL], m[GB], l[GB];
    for (int g = 0; g < GB; ++g) {
        // q may be a strided view (GPT-2 slices it out of the fused qkv projection).
        const T* q_row = q + (long)b * q_strides[0] + (long)(h0 + g) * q_strides[1];
        for (int i = 0; i < PL; ++i) {
            const int d = paged_dim<PL, VL>(sl, i);
            qv[g][i] = d < D ? static_cast<float>(q_row[d * q_strides[2]]) * sc : 0.f;
            acc[g][i] = 0.f;
        }
        m[g] = NEG_INF;
        l[g] = 0.f;
    }
    // RQ: keys stored turned (kv_quant's rotating formats) meet q turned here, in
    // registers, rather than by a [D, D] product and its launch before the kernel.
    if constexpr (RQ)
        for (int g = 0; g < GB; ++g) paged_turn<D, PL, VL>(qv[g], sl);
    // Each warp takes U x KS consecutive keys at a time (neighbouring rows of one block),
    // its groups of LK lanes side by side.
    for (int t0 = start + warp * U * KS; t0 < end; t0 += WARPS * U * KS) {
        float kr[U][PL], vr[U][PL], s[U][GB];
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * KS + sub;
            const long slot = t < end ? (long)table[t / BS] * BS + (t % BS) : 0;
            paged_row<D, PL, VL, KB, KA, KG>(kr[u], k_base, ks_base, slot, sl, t < end);
            // EV: the value rows are loaded with the keys, so a warp waits on memory once
            // an iteration, not again after its scores' reduction.
            if (EV) paged_row<D, PL, VL, VB, VA, VG>(vr[u], v_base, vs_base, slot, sl, t < end);
        }
        for (int u = 0; u < U; ++u)
            for (int g = 0; g < GB; ++g) {
                float x = 0.f;
                for (int i = 0; i < PL; ++i) x += qv[g][i] * kr[u][i];
                s[u][g] = x;
            }
        for (int o = LK / 2; o > 0; o >>= 1)
            for (int u = 0; u < U; ++u)
                for (int g = 0; g < GB; ++g) s[u][g] += __shfl_xor_sync(0xffffffff, s[u][g], o);
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * KS + sub;
            if (t >= end) break;
            if (!EV) {
                const long slot = (long)table[t / BS] * BS + (t % BS);
                paged_row<D, PL, VL, VB, VA, VG>(vr[u], v_base, vs_base, slot, sl, true);
            }
            for (int g = 0; g < GB; ++g) {
                const float m_new = fmaxf(m[g], s[u][g]);
                const float c = exp2f(m[g] - m_new), p = exp2f(s[u][g] - m_new);
                l[g] = l[g] * c + p;
                for (int i = 0; i < PL; ++i) acc[g][i] = acc[g][i] * c + p * vr[u][i];
                m[g] = m_new;
            }
        }
    }
    __shared__ float s_m[VW][GB], s_l[VW][GB], s_acc[VW][GB][D];
    for (int g = 0; g < GB; ++g) {
        if (sl == 0) { s_m[vw][g] = m[g]; s_l[vw][g] = l[g]; }
        for (int i = 0; i < PL; ++i) {
            const int d = paged_dim<PL, VL>(sl, i);
            if (d < D) s_acc[vw][g][d] = acc[g][i];
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < GB * D; j += blockDim.x) {
        const int g = j / D, d = j % D;
        float m_all = NEG_INF;
        for (int w = 0; w < VW; ++w) m_all = fmaxf(m_all, s_m[w][g]);
        float l_all = 0.f, o = 0.f;
        for (int w = 0; w < VW; ++w) {
            if (s_m[w][g] == NEG_INF) continue;
            const float e = exp2f(s_m[w][g] - m_all);
            l_all += s_l[w][g] * e;
            o += s_acc[w][g][d] * e;
        }
        const long row = ((long)b * n_heads + h0 + g) * n_parts + part;
        part_out[row * D + d] = o;
        if (d == 0) { part_m[row] = m_all; part_l[row] = l_all; }
    }
"""

MERGE = """
    const float NEG_INF = -__int_as_float(0x7f800000);
    const int d = threadIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int n_parts = part_m_shape[2];
    const long base = ((long)b * gridDim.y + h) * n_parts;
    // The partitions' maxima and weights pass through shared memory, D partitions at a
    // time, one load a thread: each thread looping over all of them waited on every load
    // in turn (13.5 us a layer after 8k tokens over 64 partitions, on an H100: half of
    // what the partial kernel took). A tree in shared memory finds the largest maximum.
    __shared__ float s_w[D], s_l[D];
    float top = NEG_INF;
    for (int p = d; p < n_parts; p += D) top = fmaxf(top, part_m[base + p]);
    s_w[d] = top;
    __syncthreads();
    int top_half = 1;  // the largest power of two below D
    while (2 * top_half < D) top_half *= 2;
    for (int half = top_half; half > 0; half >>= 1) {
        if (d < half && d + half < D) s_w[d] = fmaxf(s_w[d], s_w[d + half]);
        __syncthreads();
    }
    const float m_all = s_w[0];
    float l_all = 0.f, o = 0.f;
    for (int p0 = 0; p0 < n_parts; p0 += D) {
        float w = 0.f, wl = 0.f;
        const float mp = p0 + d < n_parts ? part_m[base + p0 + d] : NEG_INF;
        if (mp != NEG_INF) {  // a partition without keys adds nothing
            w = exp2f(mp - m_all);
            wl = w * part_l[base + p0 + d];
        }
        __syncthreads();  // everyone is past the maximum and the chunk before
        s_w[d] = w;
        s_l[d] = wl;
        __syncthreads();
        const int n = min(D, n_parts - p0);
        #pragma unroll 8
        for (int j = 0; j < n; ++j) {
            l_all += s_l[j];
            o += part_out[(base + p0 + j) * D + d] * s_w[j];
        }
    }
    float r = o / l_all;
    // RO: values stored turned give a turned output, turned back here by the same
    // butterfly as paged_turn, across the block's D threads through shared memory.
    if constexpr (RO) {
        __shared__ float row[D];
        constexpr int N = D & -D;
        for (int p = 1; p < N; p <<= 1) {
            row[d] = r;
            __syncthreads();
            const float o2 = row[d ^ p];
            r = (d & p) ? o2 - r : r + o2;
            __syncthreads();
        }
        r *= 1.0f / sqrtf(static_cast<float>(N));
    }
    out[((long)b * gridDim.y + h) * D + d] = static_cast<T>(r);
"""
