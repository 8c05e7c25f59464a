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
#define ROPE_ERR_CHUNK 128 // elements per round of the FP8 scale search
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

// This thread's candidate step of the FP8 scale search (candidate threadIdx.x % scale_search; see
// kv_store_rows). A __constant__ read indexed per thread that misses the constant cache sits on
// the store's critical path, so callers load it early (the decode attention before its wait for the
// kernel before).
__device__ __forceinline__ float kv_store_step(int32_t scale_search) {
    return c_fp8_scale_steps[threadIdx.x % (uint32_t)scale_search];
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

// Shared memory kv_store_rows needs (FP8: the error table of two rows and the reductions).
struct kv_store_smem {
    float e[2][16][ROPE_ERR_CHUNK + 1]; // rows padded: thread k's walk is conflict-free
    float red[4][2];
    float scale[2];
};

// Stores rows r < nr (1 or 2) of hd floats, rows + r * hd in shared memory, at dst[r] in the cache
// type KT, with the FP8 scale at sdst[r]. All KV_STORE_THREADS threads of the block call it (it
// has barriers); the rows must be complete (a barrier after writing them).
// FP8: coopt_fp8_quant_row (dtype.c) with S = L.scale_search candidate scales per row. The squared
// errors of all (row, candidate, element) triples are independent: the block computes them in
// parallel, a chunk of ROPE_ERR_CHUNK elements at a time, into shared memory (thread: candidate
// tid % S, elements tid / S, + 128 / S, ...; its scales and reciprocals computed once); then
// thread 16 r + k (k < S) adds row r's candidate k errors in element order (same operations,
// order and rounding as the CPU, no FMA, so the chosen scale is bit-identical), and warp 0 takes
// each row's smallest error, ties to the smallest k. An all-zero row stores scale 0 and zeros.
// (One warp per row walking it was a long dependent chain: 15-24 us per layer at decode.)
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
        float amax[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; r++)
            if (r < nr) {
                for (int i = tid; i < hd; i += KV_STORE_THREADS) amax[r] = fmaxf(amax[r], fabsf(rows[r * hd + i]));
                amax[r] = warp_max(amax[r]);
                if (lane == 0) sm.red[warp][r] = amax[r];
            }
        __syncthreads();
        float base[2], sc[2], inv[2];
        bool  any = false;
        const int S = scale_search, kk = tid % S, st = KV_STORE_THREADS / S;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            amax[r] = r < nr ? fmaxf(fmaxf(sm.red[0][r], sm.red[1][r]), fmaxf(sm.red[2][r], sm.red[3][r])) : 0.0f;
            base[r] = amax[r] / (KT == COOPT_DTYPE_FP8_E4M3 ? 448.0f : 57344.0f);
            sc[r]   = __fmul_rn(base[r], step); // (c_fp8_scale_steps[kk])
            inv[r]  = __frcp_rn(sc[r]);
            any     = any || amax[r] > 0.0f;
        }
        if (any) { // (uniform: every thread sees the same maxima)
            const int kr = tid & 15, rr = tid >> 4; // the (row, candidate) thread tid < 32 sums
            float     err = rr < nr && kr < S ? 0.0f : INFINITY;
            for (int c0 = 0; c0 < hd; c0 += ROPE_ERR_CHUNK) {
                const int n = min(ROPE_ERR_CHUNK, hd - c0);
#pragma unroll
                for (int r = 0; r < 2; r++)
                    if (r < nr)
                        for (int i = tid / S; i < n; i += st) {
                            const float   x  = rows[r * hd + c0 + i];
                            const uint8_t cq = KT == COOPT_DTYPE_FP8_E4M3 ? f32_to_fp8_e4m3(__fmul_rn(x, inv[r]))
                                                                          : f32_to_fp8_e5m2(__fmul_rn(x, inv[r]));
                            const float d = __fsub_rn(
                                __fmul_rn(KT == COOPT_DTYPE_FP8_E4M3 ? fp8_e4m3_to_f32(cq) : fp8_e5m2_to_f32(cq), sc[r]), x);
                            sm.e[r][kk][i] = __fmul_rn(d, d);
                        }
                __syncthreads();
                if (tid < 32 && rr < nr && kr < S) {
#pragma unroll 16
                    for (int i = 0; i < n; i++) err = __fadd_rn(err, sm.e[rr][kr][i]); // loads run ahead of the chain
                }
                __syncthreads();
            }
            if (warp == 0) { // each 16-lane half: one row's candidates
                int best = kr;
                for (int o = 8; o > 0; o >>= 1) {
                    const float oe = __shfl_xor_sync(0xffffffffu, err, o);
                    const int   ob = __shfl_xor_sync(0xffffffffu, best, o);
                    if (oe < err || (oe == err && ob < best)) err = oe, best = ob;
                }
                if (kr == 0 && rr < nr) sm.scale[rr] = __fmul_rn(base[rr], c_fp8_scale_steps[best]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int r = 0; r < 2; r++)
            if (r < nr) {
                const float s  = amax[r] > 0.0f ? sm.scale[r] : base[r];
                const float is = s == 0.0f ? 0.0f : __frcp_rn(s);
                if (tid == 0) *sdst[r] = s;
                for (int i = tid; i < hd; i += KV_STORE_THREADS) {
                    const float y = store_elem_back<KT>(dst[r], i, __fmul_rn(rows[r * hd + i], is));
                    if (back) back[r * hd + i] = y * s;
                }
            }
    } else {
        (void)sdst, (void)scale_search, (void)step, (void)sm;
        for (int r = 0; r < nr; r++)
            for (int i = tid; i < hd; i += KV_STORE_THREADS) {
                const float y = store_elem_back<KT>(dst[r], i, rows[r * hd + i]);
                if (back) back[r * hd + i] = y;
            }
    }
}

#endif // COOPT_CUDA_KV_STORE_CUH
