/*
 * kv_store.cuh -- the device half of the Opt-KV write path that rope_store.cu and the fused
 * decode attention (paged_attn.cu) share: RoPE parameters and the rotation of one pair, and the
 * conversion of up to two rows (a token's K and V of one head) to the cache type with their FP8
 * scales chosen exactly as the CPU reference chooses them (coopt_fp8_quant_row, dtype.h).
 *
 * Semantics are those of ops_cpu_ref.c: angle = (float)pos * inv_freq[i] in f32, then cosf/sinf;
 * rotation products rounded without FMA contraction (the CPU build is ISO C, -ffp-contract=off).
 */
#ifndef COOPT_CUDA_KV_STORE_CUH
#define COOPT_CUDA_KV_STORE_CUH

#include "cuda/common.cuh"
#include "cuda/kv_dev.cuh"

#define ROPE_MAX_HALF  128 // head_dim <= 256
#define KV_STORE_THREADS 128 // the block size kv_store_rows expects

struct rope_params {
    int32_t layout; // enum coopt_rope_layout
    int32_t head_dim;
    float   inv_freq[ROPE_MAX_HALF];
};

// Index pair (i0, i1) rotated by angle i of the layout.
__device__ __forceinline__ void rope_pair(const struct rope_params &p, int i, int *i0, int *i1) {
    if (p.layout == COOPT_ROPE_INTERLEAVED) {
        *i0 = 2 * i;
        *i1 = 2 * i + 1;
    } else {
        *i0 = i;
        *i1 = i + p.head_dim / 2;
    }
}

__device__ __forceinline__ void rope_rotate(float x0, float x1, float c, float s, float *y0, float *y1) {
    *y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    *y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// (host) The kernel parameters of a RoPE table; aborts on a head_dim the kernels do not handle
// (model loading rejects those first).
static inline struct rope_params rope_params_make(const struct coopt_rope *rope) {
    struct rope_params p;
    if (rope->head_dim <= 0 || rope->head_dim > 2 * ROPE_MAX_HALF || rope->head_dim % 2) {
        coopt_log_error("cuda rope: head_dim %d not supported (even, <= %d)", rope->head_dim, 2 * ROPE_MAX_HALF);
        COOPT_ASSERT(!"unsupported head_dim for RoPE");
    }
    p.layout   = (int32_t)rope->layout;
    p.head_dim = rope->head_dim;
    for (int i = 0; i < ROPE_MAX_HALF; i++) p.inv_freq[i] = i < rope->head_dim / 2 ? rope->inv_freq[i] : 0.0f;
    return p;
}

static __constant__ float c_fp8_scale_steps[16] = COOPT_FP8_SCALE_STEPS_INIT;

// The FP8 scale search of kv_store_rows: thread tid takes candidate tid / COOPT_FP8_ERR_WAYS and
// that candidate's partial error tid % COOPT_FP8_ERR_WAYS (dtype.h), so the block's threads cover
// the 16 candidates exactly.
static_assert(KV_STORE_THREADS == 16 * COOPT_FP8_ERR_WAYS, "one thread per (candidate, partial error)");

// This thread's candidate step of the FP8 scale search (1 without a search; see kv_store_rows). A
// __constant__ read indexed per thread that misses the constant cache sits on the store's critical
// path, so callers load it early (the decode attention before its wait for the kernel before).
__device__ __forceinline__ float kv_store_step(int32_t scale_search) {
    return scale_search > 1 ? c_fp8_scale_steps[threadIdx.x / COOPT_FP8_ERR_WAYS % 16] : 1.0f;
}

// Element i of a cache row of type KT (dst) set to v, rounded as dtype.c rounds it; returns the
// element as load_elem<KT> reads it back.
template <int KT> __device__ __forceinline__ float store_elem_back(uint8_t *dst, int i, float v) {
    if constexpr (KT == COOPT_DTYPE_F32) {
        ((float *)dst)[i] = v;
        return v;
    } else if constexpr (KT == COOPT_DTYPE_F16) {
        const uint16_t h = __half_as_ushort(__float2half_rn(v));
        ((uint16_t *)dst)[i] = h;
        return f16_bits_to_f32(h);
    } else if constexpr (KT == COOPT_DTYPE_BF16) {
        const uint16_t h = __bfloat16_as_ushort(__float2bfloat16_rn(v));
        ((uint16_t *)dst)[i] = h;
        return bf16_bits_to_f32(h);
    } else if constexpr (KT == COOPT_DTYPE_FP8_E4M3) {
        const uint8_t q = f32_to_fp8_e4m3(v);
        dst[i]          = q;
        return fp8_e4m3_to_f32(q);
    } else {
        static_assert(KT == COOPT_DTYPE_FP8_E5M2, "store_elem_back: not a KV type");
        const uint8_t q = f32_to_fp8_e5m2(v);
        dst[i]          = q;
        return fp8_e5m2_to_f32(q);
    }
}

// Shared memory kv_store_rows needs (FP8 with a search: each warp's best candidate per row).
struct kv_store_smem {
    float err[4][2];
    int   k[4][2];
};

// Stores rows r < nr (1 or 2) of hd floats, rows + r * hd in shared memory, at dst[r] in the cache
// type KT, with the FP8 scale at sdst[r]. All KV_STORE_THREADS threads of the block call it (it
// has a barrier); the rows must be complete (a barrier after writing them, which also orders
// consecutive calls' uses of sm).
// FP8: coopt_fp8_quant_row (dtype.c) with S = L.scale_search candidate scales per row (1 or 16).
// Every warp takes the rows' maxima itself (no barrier). With a search, thread tid sums candidate
// k = tid / 8's squared errors over elements tid % 8, + 8, ... in element order (the CPU's partial
// sum j; same operations and rounding, no FMA), three xor shuffles combine the 8 partials in the
// CPU's pairwise order (each add's operands commute exactly), so the chosen scale is
// bit-identical; two more shuffles and one barrier take each row's smallest error, ties to the
// smallest k, NaN errors never chosen (as the CPU's strict < from infinity). An all-zero or
// non-finite row stores scale 0 and zeros. (One warp per row walking it was a long dependent
// chain, 15-24 us per layer at decode; then a block-wide error table summed by one thread per
// candidate, 128 adds in a chain and four barriers on the decode attention's critical path.)
// step: kv_store_step(scale_search) of this thread (FP8 only).
// back != NULL: row r's elements as a reader of the cache dequantizes them (the stored element
// as load_elem reads it, times the stored scale) go to back + r * hd (back may be rows: each
// thread overwrites what it read), with no read of the cache.
template <int KT>
__device__ void kv_store_rows(const float *rows, int nr, int32_t hd, uint8_t *const *dst, float *const *sdst,
                              int32_t scale_search, float step, kv_store_smem &sm, float *back = nullptr) {
    constexpr bool FP8 = KT == COOPT_DTYPE_FP8_E4M3 || KT == COOPT_DTYPE_FP8_E5M2;
    const int      tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if constexpr (FP8) {
        constexpr bool E4 = KT == COOPT_DTYPE_FP8_E4M3;
        constexpr int  W  = COOPT_FP8_ERR_WAYS;
        float          base[2], scale[2];
        bool           zero[2], search = false;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float amax = 0.0f;
            if (r < nr)
                for (int i = lane; i < hd; i += WARP_SIZE) amax = fmaxf(amax, fabsf(rows[r * hd + i]));
            amax     = warp_max(amax);
            zero[r]  = !(amax > 0.0f) || !isfinite(amax);
            base[r]  = amax / (E4 ? 448.0f : 57344.0f);
            scale[r] = zero[r] ? 0.0f : base[r];
            search   = search || (r < nr && !zero[r]);
        }
        if (search && scale_search > 1) { // (uniform: every warp sees the same maxima)
            const int k = tid / W, j = tid % W;
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float err = 0.0f;
                if (r < nr) {
                    const float sc = __fmul_rn(base[r], step), inv = __frcp_rn(sc); // (candidate k)
                    for (int i = j; i < hd; i += W) {
                        const float   x  = rows[r * hd + i];
                        const uint8_t cq = E4 ? f32_to_fp8_e4m3(__fmul_rn(x, inv)) : f32_to_fp8_e5m2(__fmul_rn(x, inv));
                        const float   d  = __fsub_rn(__fmul_rn(E4 ? fp8_e4m3_to_f32(cq) : fp8_e5m2_to_f32(cq), sc), x);
                        err              = __fadd_rn(err, __fmul_rn(d, d));
                    }
                }
#pragma unroll
                for (int o = 1; o < W; o <<= 1) err = __fadd_rn(err, __shfl_xor_sync(0xffffffffu, err, o));
                if (isnan(err)) err = INFINITY;
                int best = k;
#pragma unroll
                for (int o = W; o < WARP_SIZE; o <<= 1) { // the warp's WARP_SIZE / W candidates
                    const float oe = __shfl_xor_sync(0xffffffffu, err, o);
                    const int   ob = __shfl_xor_sync(0xffffffffu, best, o);
                    if (oe < err || (oe == err && ob < best)) err = oe, best = ob;
                }
                if (lane == 0) sm.err[warp][r] = err, sm.k[warp][r] = best;
            }
            __syncthreads();
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float be = sm.err[0][r];
                int   bk = sm.k[0][r];
#pragma unroll
                for (int w = 1; w < KV_STORE_THREADS / WARP_SIZE; w++) // (warps in k order: ties stay)
                    if (sm.err[w][r] < be) be = sm.err[w][r], bk = sm.k[w][r];
                if (!zero[r]) scale[r] = __fmul_rn(base[r], c_fp8_scale_steps[bk]);
            }
        } else if (back) {
            __syncthreads(); // (back may overwrite rows, which other warps' maxima read)
        }
#pragma unroll
        for (int r = 0; r < 2; r++)
            if (r < nr) {
                const float s  = scale[r];
                const float is = s == 0.0f ? 0.0f : __frcp_rn(s);
                if (tid == 0) *sdst[r] = s;
                for (int i = tid; i < hd; i += KV_STORE_THREADS) {
                    const float y = store_elem_back<KT>(dst[r], i, zero[r] ? 0.0f : __fmul_rn(rows[r * hd + i], is));
                    if (back) back[r * hd + i] = y * s;
                }
            }
    } else {
        (void)sdst, (void)scale_search, (void)step, (void)sm, (void)warp, (void)lane;
        for (int r = 0; r < nr; r++)
            for (int i = tid; i < hd; i += KV_STORE_THREADS) {
                const float y = store_elem_back<KT>(dst[r], i, rows[r * hd + i]);
                if (back) back[r * hd + i] = y;
            }
    }
}

#endif // COOPT_CUDA_KV_STORE_CUH
