/*
 * matmul_cpu.c -- the fast CPU matmul: out[r][o] = sum_i x[r][i] * W[o][i] (+ bias[o]).
 *
 * With AVX-512 (F/BW/VL/VNNI/VBMI), decode (n_rows <= 8; F32 weights only at n_rows 1) and
 * prefill of Q8_0/Q4_0 weights use one row kernel (section "row kernel" below): each thread
 * walks contiguous chunks of weight rows, one row at a time, and dots each row with up to 8
 * rows of x, so a weight row is read once per 8 x rows. Decode is memory-bound and the kernel
 * only has to outrun DRAM (~47 GB/s per thread, i.e. ~12 bytes/cycle at ~4 GHz); prefill of
 * quantized weights cuts the weight rows into L2-sized chunks that every group of 8 x rows
 * passes over.
 *
 * Otherwise (float prefill, or no AVX-512) the matmul is blocked: the rows of x are cut into
 * panels of MM_PANEL rows and n_in into slices of MM_KB, and a register tile of 4 x-rows by 4
 * weight rows (16 accumulators) reads each weight vector once per 4 x-rows. A slice of an x
 * panel (64 rows x 1024 f32 = 256 KiB) stays in L2 while a thread walks its chunk of weight
 * rows.
 *
 * Work is split into chunks of output rows (x panels too for the tiles) handed out through an
 * atomic counter, so a thread slowed by another process does not hold the others back.
 *
 * Weight types:
 *   F32/F16/BF16: exact f32 math (F16 via vcvtph2ps, BF16 by a 16-bit shift), f32 accumulation.
 *   Q8_0/Q4_0:    x is quantized once per call to blocks of 32 int8 with an f32 scale
 *                 (d = amax/127, round to nearest even: ggml's q8_0 activations but with an f32
 *                 scale), and each block product is an exact int32 dot (AVX512-VNNI vpdpbusd,
 *                 or AVX2 maddubs) scaled by d_w * d_x in f32.
 *   NOTE: accuracy of the int8 activations: each x element moves by at most d_x/2 =
 *   amax(block)/254, so |err(out[o])| <= sum_blocks amax_x(block)/254 * sum_block |w|, i.e. a
 *   relative error of ~0.4% of sum|w*x| in the worst case and ~0.1-0.2% typically. This is
 *   well below the error of the 4-/8-bit weights themselves (llama.cpp makes the same trade).
 *   The reference (ops_cpu_ref.c) uses f32 math on dequantized weights; tests check that bound.
 *   (The row kernel's zero-point correction adds f32 rounding of ~2^-24 * 128 * sum|x_q| * d_w
 *   * d_x per block, < 1e-3 of that bound.)
 */
#include "cpu/ops_cpu.h"
#include "cpu/simd.h"

#include "dtype.h"
#include "util.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#define MM_R     4   // x rows per register tile
#define MM_C     4   // weight rows per register tile
#define MM_PANEL 64  // x rows per job (prefill)
#define MM_KB    1024 // n_in slice (prefill); multiple of 32

#define ALWAYS_INLINE static inline __attribute__((always_inline))

// Activations quantized to int8 blocks (for Q8_0 / Q4_0 weights).
struct q8x {
    float  d;
    int8_t qs[COOPT_QK];
};

struct mm_ctx {
    float                     *out;
    const float               *x;
    const struct q8x          *qx;      // [n_rows][n_in/32] for quantized weights
    const struct coopt_weight *w;
    int32_t                    n_rows;
    size_t                     row_bytes;
    int64_t                    panel, chunk, kb; // rows per panel, weight rows per chunk, n_in per slice
    int64_t                    n_panels, n_chunks;
    atomic_int_fast64_t        next;    // next job
};

// ---- f32 / f16 / bf16 weights ----

#if defined(__AVX512F__)

ALWAYS_INLINE __m512 load_w16(enum coopt_dtype T, const uint8_t *w, int64_t i) {
    switch (T) {
    case COOPT_DTYPE_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
    case COOPT_DTYPE_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i))), 16));
    default: return _mm512_loadu_ps((const float *)w + i);
    }
}
ALWAYS_INLINE __m512 load_w16_mask(enum coopt_dtype T, const uint8_t *w, int64_t i, __mmask16 m) {
    switch (T) {
    case COOPT_DTYPE_F16: return simd_load_f16((const uint16_t *)w + i, m);
    case COOPT_DTYPE_BF16: return simd_load_bf16((const uint16_t *)w + i, m);
    default: return simd_load_f32((const float *)w + i, m);
    }
}

// out[r][c] (+)= x[r][k0:k1] . W[c][k0:k1] for an R x C tile.
ALWAYS_INLINE void tile_float(enum coopt_dtype T, int R, int C, const float *x, int64_t ldx, const uint8_t *w,
                              size_t ldw, int64_t k0, int64_t k1, float *out, int64_t ldo, bool accumulate) {
    __m512 acc[MM_R][MM_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t i = k0;
    for (; i + 16 <= k1; i += 16) {
        __m512 wv[MM_C];
        for (int c = 0; c < C; c++) wv[c] = load_w16(T, w + c * ldw, i);
        for (int r = 0; r < R; r++) {
            __m512 xv = _mm512_loadu_ps(x + r * ldx + i);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    if (i < k1) {
        __mmask16 m = simd_mask16(k1 - i);
        __m512    wv[MM_C];
        for (int c = 0; c < C; c++) wv[c] = load_w16_mask(T, w + c * ldw, i, m);
        for (int r = 0; r < R; r++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + r * ldx + i);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = _mm512_reduce_add_ps(acc[r][c]);
            out[r * ldo + c] = accumulate ? out[r * ldo + c] + s : s;
        }
}

#elif defined(__AVX2__)

ALWAYS_INLINE __m256 load_w8(enum coopt_dtype T, const uint8_t *w, int64_t i) {
    switch (T) {
    case COOPT_DTYPE_F16: return simd_load8_f16((const uint16_t *)w + i);
    case COOPT_DTYPE_BF16: return simd_load8_bf16((const uint16_t *)w + i);
    default: return _mm256_loadu_ps((const float *)w + i);
    }
}

ALWAYS_INLINE float load_w1(enum coopt_dtype T, const uint8_t *w, int64_t i) {
    switch (T) {
    case COOPT_DTYPE_F16: return _cvtsh_ss(((const uint16_t *)w)[i]);
    case COOPT_DTYPE_BF16: return coopt_bf16_to_f32(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i];
    }
}

ALWAYS_INLINE void tile_float(enum coopt_dtype T, int R, int C, const float *x, int64_t ldx, const uint8_t *w,
                              size_t ldw, int64_t k0, int64_t k1, float *out, int64_t ldo, bool accumulate) {
    __m256 acc[MM_R][MM_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    int64_t i = k0;
    for (; i + 8 <= k1; i += 8) {
        __m256 wv[MM_C];
        for (int c = 0; c < C; c++) wv[c] = load_w8(T, w + c * ldw, i);
        for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_loadu_ps(x + r * ldx + i);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = simd_hsum256(acc[r][c]);
            for (int64_t j = i; j < k1; j++) s += x[r * ldx + j] * load_w1(T, w + c * ldw, j);
            out[r * ldo + c] = accumulate ? out[r * ldo + c] + s : s;
        }
}

#else

ALWAYS_INLINE void tile_float(enum coopt_dtype T, int R, int C, const float *x, int64_t ldx, const uint8_t *w,
                              size_t ldw, int64_t k0, int64_t k1, float *out, int64_t ldo, bool accumulate) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            const uint8_t *wr = w + c * ldw;
            float          s  = 0;
            for (int64_t j = k0; j < k1; j++) {
                float wj = T == COOPT_DTYPE_F16    ? coopt_f16_to_f32(((const uint16_t *)wr)[j])
                           : T == COOPT_DTYPE_BF16 ? coopt_bf16_to_f32(((const uint16_t *)wr)[j])
                                                   : ((const float *)wr)[j];
                s += x[r * ldx + j] * wj;
            }
            out[r * ldo + c] = accumulate ? out[r * ldo + c] + s : s;
        }
}

#endif

// ---- Q8_0 / Q4_0 weights against int8 activations ----

// Quantizes n (multiple of 32) floats into q8x blocks.
static void quantize_q8x(const float *x, struct q8x *q, int64_t n) {
    for (int64_t b = 0; b < n / COOPT_QK; b++, x += COOPT_QK) {
#if defined(__AVX512F__)
        __m512 v0   = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        float  amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float  d    = amax / 127.0f;
        __m512 id   = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        __m512i i0  = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)); // MXCSR default: round to nearest even
        __m512i i1  = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        _mm_storeu_si128((__m128i *)q[b].qs, _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(q[b].qs + 16), _mm512_cvtsepi32_epi8(i1));
        q[b].d = d;
#else
        float amax = 0;
        for (int j = 0; j < COOPT_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d  = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < COOPT_QK; j++) q[b].qs[j] = (int8_t)nearbyintf(x[j] * id);
        q[b].d = d;
#endif
    }
}

#if defined(__AVX2__)

// 32 signed weights of block b as int8 (Q4_0: nibble - 8), and its scale.
ALWAYS_INLINE __m256i load_wq(enum coopt_dtype T, const uint8_t *w, int64_t b, float *d) {
    if (T == COOPT_DTYPE_Q8_0) {
        const struct coopt_block_q8_0 *blk = (const struct coopt_block_q8_0 *)w + b;
        *d                                 = _cvtsh_ss(blk->d);
        return _mm256_loadu_si256((const __m256i *)blk->qs);
    }
    const struct coopt_block_q4_0 *blk = (const struct coopt_block_q4_0 *)w + b;
    *d                                 = _cvtsh_ss(blk->d);
    __m128i q                          = _mm_loadu_si128((const __m128i *)blk->qs);
    __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0f));
    return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
}

// int32x8 partial sums of |w| * (x * sign(w)) = w * x.
ALWAYS_INLINE __m256i dot_i8(__m256i aw, __m256i sx) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
}

ALWAYS_INLINE void tile_quant(enum coopt_dtype T, int R, int C, const struct q8x *x, int64_t ldx, const uint8_t *w,
                              size_t ldw, int64_t b0, int64_t b1, float *out, int64_t ldo, bool accumulate) {
    __m256 acc[MM_R][MM_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        __m256i wq[MM_C], aw[MM_C];
        float   dw[MM_C];
        for (int c = 0; c < C; c++) {
            wq[c] = load_wq(T, w + c * ldw, b, &dw[c]);
            aw[c] = _mm256_abs_epi8(wq[c]);
        }
        for (int r = 0; r < R; r++) {
            const struct q8x *xb = x + r * ldx + b;
            __m256i           xq = _mm256_loadu_si256((const __m256i *)xb->qs);
            for (int c = 0; c < C; c++) {
                __m256i p = dot_i8(aw[c], _mm256_sign_epi8(xq, wq[c]));
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw[c] * xb->d), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s          = simd_hsum256(acc[r][c]);
            out[r * ldo + c] = accumulate ? out[r * ldo + c] + s : s;
        }
}

#else

ALWAYS_INLINE void tile_quant(enum coopt_dtype T, int R, int C, const struct q8x *x, int64_t ldx, const uint8_t *w,
                              size_t ldw, int64_t b0, int64_t b1, float *out, int64_t ldo, bool accumulate) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = 0;
            for (int64_t b = b0; b < b1; b++) {
                const struct q8x *xb  = x + r * ldx + b;
                int32_t           sum = 0;
                float             dw;
                if (T == COOPT_DTYPE_Q8_0) {
                    const struct coopt_block_q8_0 *blk = (const struct coopt_block_q8_0 *)(w + c * ldw) + b;
                    dw                                 = coopt_f16_to_f32(blk->d);
                    for (int j = 0; j < COOPT_QK; j++) sum += blk->qs[j] * xb->qs[j];
                } else {
                    const struct coopt_block_q4_0 *blk = (const struct coopt_block_q4_0 *)(w + c * ldw) + b;
                    dw                                 = coopt_f16_to_f32(blk->d);
                    for (int j = 0; j < COOPT_QK / 2; j++)
                        sum += ((blk->qs[j] & 15) - 8) * xb->qs[j] + ((blk->qs[j] >> 4) - 8) * xb->qs[j + 16];
                }
                s += (float)sum * (dw * xb->d);
            }
            out[r * ldo + c] = accumulate ? out[r * ldo + c] + s : s;
        }
}

#endif

// ---- row kernel (AVX-512): decode, and prefill of quantized weights ----
//
// One weight row at a time (one sequential stream for the hardware prefetcher, plus software
// prefetch MM_PF_DIST ahead) against R <= 8 rows of x. x is prepared once per call into the
// layout the inner loop wants:
//   Q8_0/Q4_0: int8 x (for Q4_0, each group of 4 blocks as the 64 values that pair with the low
//         nibbles, x[0..15] of each block, then the 64 that pair with the high nibbles), then
//         d_x per block, then cx = -128 * sum(x_q block) (Q8_0) or -8 * sum (Q4_0) per block.
//         vpdpbusd wants unsigned weights: Q8_0 uses w ^ 0x80 = w + 128, Q4_0 the raw nibbles
//         (w + 8); adding s * cx (s = d_w * d_x) removes the offset exactly.
//   BF16: x in f32, each 32 elements reordered evens then odds, so that w << 16 and
//         w & 0xffff0000 of 32 loaded bf16 are the matching f32 weights (exact, no rounding).
//   F32/F16: x as given.
// A step is 8 blocks: their bytes come in 3 (Q4_0) or 5 (Q8_0) loads, vpermt2b picks the qs of
// 2 (Q8_0) or 4 (Q4_0) blocks per vector, one or two vpermt2w the 8 f16 scales; the 8 products
// d_w * d_x are one 8-lane multiply, spread to the lanes of each dot vector with vpermps.
// Costs in the L2-resident benchmark (dev/bench_matmul.c, 1 thread, n_rows 1): ~1.1 cycles per
// Q4_0 block (18 bytes) and ~1.5 per Q8_0 block (34 bytes), i.e. 16-23 bytes/cycle, about twice
// what DRAM supplies per thread.

#define MM_DEC_MAX 8

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) &&          \
    defined(__AVX512VBMI__)
#define MM_DEC_AVX512 1

#ifndef MM_PF_DIST
#define MM_PF_DIST 1024 // software prefetch distance in bytes of the weight stream
#endif
// Float weights: prefetch distance and hint of the weight stream(s), and weight rows at once for
// one x row (MM_FC1) and for 2..4 x rows (MM_FC). Measured on the f16 LM head of tinyllama
// (2048 x 32000, 131 MB, 2 threads, 2026-11-22): 4 rows at once with T0 prefetch 1 KiB ahead
// streamed 53-61 GB/s, one row at a time (one sequential stream per thread) with NTA prefetch
// 4 KiB ahead 76-87 GB/s (dev/bench_matmul.c; 80-85 in decode, dev/prof_decode.c) -- the GPTQ
// kernel's finding (matmul_gptq.c) again.
#ifndef MM_FPF_DIST
#define MM_FPF_DIST 4096
#endif
#ifndef MM_FPF_HINT
#define MM_FPF_HINT _MM_HINT_NTA
#endif
#ifndef MM_FC1
#define MM_FC1 1
#endif
#ifndef MM_FC
#define MM_FC 4
#endif

struct dec_ctx {
    float                     *out;
    const float               *x;      // F32/F16: the caller's x
    const void                *xp;     // prepared x (Q8_0/Q4_0/BF16), x_stride bytes per row
    const struct coopt_weight *w;
    int32_t                    n_rows;
    size_t                     row_bytes, x_stride;
    bool                       add;    // out += result (fused residual add)
    int64_t                    chunk, n_chunks;
    atomic_int_fast64_t        next;
};

// out = v + bias, or out + (v + bias) when add: the order of the composed ops (matmul, bias, add).
ALWAYS_INLINE void dec_store(float *out, float v, const float *bias, bool add) {
    if (bias) v += *bias;
    *out = add ? *out + v : v;
}

// Q8_0/Q4_0 prepared row: [xq: nbp*32 int8][dx: nbp f32][cx: nbp f32], nbp = blocks rounded up
// to 8 (padding is zero); cx = -128 * sum(xq block) (Q8_0) or -8 * sum (Q4_0), exact in f32.
static size_t dec_q_stride(int64_t n_in) { return (size_t)((n_in / COOPT_QK + 7) / 8 * 8) * (COOPT_QK + 8); }

// One block of 32 floats -> 32 int8 (round to nearest even), returns d and the sum of the int8.
ALWAYS_INLINE __m256i dec_quant_block(const float *x, float *d_out, int32_t *sum_out) {
    __m512  v0   = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    float   amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float   d    = amax / 127.0f;
    __m512  id   = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m512i i0   = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)); // MXCSR default: round to nearest even
    __m512i i1   = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    *d_out       = d;
    *sum_out     = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    return _mm256_set_m128i(_mm512_cvtsepi32_epi8(i1), _mm512_cvtsepi32_epi8(i0));
}

static void dec_prep_quant(enum coopt_dtype T, const float *x, int64_t n_in, uint8_t *dst) {
    int64_t nb = n_in / COOPT_QK, nbp = (nb + 7) / 8 * 8;
    int8_t *xq = (int8_t *)dst;
    float  *dx = (float *)(dst + nbp * 32), *cx = dx + nbp;
    memset(dst, 0, (size_t)nbp * (COOPT_QK + 8));
    for (int64_t b = 0; b < nb; b++) {
        int32_t s;
        __m256i q = dec_quant_block(x + b * 32, &dx[b], &s);
        if (T == COOPT_DTYPE_Q8_0) {
            _mm256_storeu_si256((__m256i *)(xq + b * 32), q);
            cx[b] = (float)(-128 * s);
        } else {
            int64_t g = b / 4, k = b % 4;
            _mm_storeu_si128((__m128i *)(xq + g * 128 + k * 16), _mm256_castsi256_si128(q));
            _mm_storeu_si128((__m128i *)(xq + g * 128 + 64 + k * 16), _mm256_extracti128_si256(q, 1));
            cx[b] = (float)(-8 * s);
        }
    }
}

// BF16: rows padded to a multiple of 32 with zeros, each 32 reordered evens then odds.
static size_t dec_bf16_stride(int64_t n_in) { return (size_t)((n_in + 31) / 32 * 32) * sizeof(float); }

static void dec_prep_bf16(const float *x, int64_t n_in, uint8_t *dst) {
    float        *xp   = (float *)dst;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd  = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int64_t i = 0; i < n_in; i += 32) {
        __m512 v0 = _mm512_maskz_loadu_ps(simd_mask16(n_in - i), x + i);
        __m512 v1 = _mm512_maskz_loadu_ps(simd_mask16(n_in - i - 16 > 0 ? n_in - i - 16 : 0), x + i + 16);
        _mm512_storeu_ps(xp + i, _mm512_permutex2var_ps(v0, even, v1));
        _mm512_storeu_ps(xp + i + 16, _mm512_permutex2var_ps(v0, odd, v1));
    }
}

// Quantized weights in decode (n_rows <= MM_DEC_MAX, each weight read once per call): NTA
// prefetch further ahead. dev/bench_matmul.c, 2 threads, Q4_0 / Q8_0 at 1 row (mean of the 4
// shapes, 2026-11-22): T0 1 KiB 50-60 / 47-64 GB/s, T0 4 KiB 68-70 / 63-76, NTA 4 KiB 59-72 /
// 72-74, NTA 8 KiB 72-73 / 76-81. Prefill keeps T0: its weight chunks are re-read from L2 by
// every group of 8 x rows.
#ifndef MM_PF_DIST_DEC
#define MM_PF_DIST_DEC 8192
#endif
ALWAYS_INLINE void dec_prefetch(const uint8_t *p, bool stream) {
    if (stream) _mm_prefetch((const char *)p + MM_PF_DIST_DEC, _MM_HINT_NTA);
    else _mm_prefetch((const char *)p + MM_PF_DIST, _MM_HINT_T0);
}

#define DEC_NACC 5 // accumulators per x row of dec_row_quant

// Byte mask of the first n (clamped to 0..64) bytes.
ALWAYS_INLINE __mmask64 dec_mask64(int64_t n) {
    return n >= 64 ? ~(__mmask64)0 : n <= 0 ? (__mmask64)0 : (((__mmask64)1 << n) - 1);
}

ALWAYS_INLINE __m512i dec_load64(const uint8_t *p, bool full, int64_t valid) {
    return full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(dec_mask64(valid), p);
}

// vpermt2b index: result byte i (0..63) = byte off + i + (i >= 32 ? 2 : 0) of the 128 bytes of the
// two tables (two Q8_0 blocks' qs, skipping the scale between them).
#define Q8IDX(o)                                                                                                   \
    _mm512_set_epi8(67 + o, 66 + o, 65 + o, 64 + o, 63 + o, 62 + o, 61 + o, 60 + o, 59 + o, 58 + o, 57 + o, 56 + o, \
                    55 + o, 54 + o, 53 + o, 52 + o, 51 + o, 50 + o, 49 + o, 48 + o, 47 + o, 46 + o, 45 + o, 44 + o, \
                    43 + o, 42 + o, 41 + o, 40 + o, 39 + o, 38 + o, 37 + o, 36 + o, 33 + o, 32 + o, 31 + o, 30 + o, \
                    29 + o, 28 + o, 27 + o, 26 + o, 25 + o, 24 + o, 23 + o, 22 + o, 21 + o, 20 + o, 19 + o, 18 + o, \
                    17 + o, 16 + o, 15 + o, 14 + o, 13 + o, 12 + o, 11 + o, 10 + o, 9 + o, 8 + o, 7 + o, 6 + o,    \
                    5 + o, 4 + o, 3 + o, 2 + o)
// Four Q4_0 blocks' qs (16 bytes each, 18 apart) starting at byte o + 2.
#define Q4IDX(o)                                                                                                   \
    _mm512_set_epi8(71 + o, 70 + o, 69 + o, 68 + o, 67 + o, 66 + o, 65 + o, 64 + o, 63 + o, 62 + o, 61 + o, 60 + o, \
                    59 + o, 58 + o, 57 + o, 56 + o, 53 + o, 52 + o, 51 + o, 50 + o, 49 + o, 48 + o, 47 + o, 46 + o, \
                    45 + o, 44 + o, 43 + o, 42 + o, 41 + o, 40 + o, 39 + o, 38 + o, 35 + o, 34 + o, 33 + o, 32 + o, \
                    31 + o, 30 + o, 29 + o, 28 + o, 27 + o, 26 + o, 25 + o, 24 + o, 23 + o, 22 + o, 21 + o, 20 + o, \
                    17 + o, 16 + o, 15 + o, 14 + o, 13 + o, 12 + o, 11 + o, 10 + o, 9 + o, 8 + o, 7 + o, 6 + o,    \
                    5 + o, 4 + o, 3 + o, 2 + o)

// One step of dec_row_quant: 8 blocks of weights at p (272 bytes for Q8_0, 144 for Q4_0; when
// !full only `valid` bytes are readable, the rest reads as 0) against x blocks [b, b + 8).
//   Q8_0: lines L0..L3 (+ 16 bytes L4) hold the 8 blocks; vector k (blocks 2k, 2k+1) is one
//         vpermt2b of L_k and L_k+1, the 8 scales two vpermt2w.
//   Q4_0: L0, L1 (+ 16 bytes L2); vector k (blocks 4k..4k+3) is one vpermt2b, the 8 scales one
//         vpermt2w.
// s = d_w * d_x for the 8 blocks (ymm) is expanded to the lanes of each dot vector with vpermps;
// the zero-point correction (cx) is one 8-lane FMA.
ALWAYS_INLINE void dec_step_quant(enum coopt_dtype T, int R, bool stream, const uint8_t *p, bool full, int64_t valid, int64_t b,
                                  const uint8_t *xp, size_t xs, int64_t nbp, __m512 acc[][DEC_NACC]) {
    // FMA chains per x row: 5 when R <= 2 (a step is shorter than 4 dependent FMAs), else 2.
    const int na = R <= 2 ? DEC_NACC : 2, ac = na == DEC_NACC ? 4 : 1; // ac: the accumulator of the cx FMA
    const bool q8 = T == COOPT_DTYPE_Q8_0;
    dec_prefetch(p, stream);
    dec_prefetch(p + 64, stream);
    dec_prefetch(p + 128, stream);
    if (q8) dec_prefetch(p + 192, stream);
    __m512i wv[4]; // unsigned weights: Q8_0 w + 128 (4 vectors); Q4_0 lo, hi nibbles of 2 vectors
    __m256  dw;
    if (q8) {
        __m512i l0 = dec_load64(p, full, valid), l1 = dec_load64(p + 64, full, valid - 64);
        __m512i l2 = dec_load64(p + 128, full, valid - 128), l3 = dec_load64(p + 192, full, valid - 192);
        __m512i l4 = _mm512_castsi128_si512(full ? _mm_loadu_si128((const __m128i *)(p + 256))
                                                 : _mm_maskz_loadu_epi8((__mmask16)dec_mask64(valid - 256), p + 256));
        const __m512i x80 = _mm512_set1_epi8((char)0x80);
        wv[0]             = _mm512_xor_si512(_mm512_permutex2var_epi8(l0, Q8IDX(0), l1), x80);
        wv[1]             = _mm512_xor_si512(_mm512_permutex2var_epi8(l1, Q8IDX(4), l2), x80);
        wv[2]             = _mm512_xor_si512(_mm512_permutex2var_epi8(l2, Q8IDX(8), l3), x80);
        wv[3]             = _mm512_xor_si512(_mm512_permutex2var_epi8(l3, Q8IDX(12), l4), x80);
        // scales at bytes 0, 34, 68, 102 (words 0, 17, 34, 51 of l0:l1) and 136.. (words 4, 21, 38, 55 of l2:l3)
        __m512i d01 = _mm512_permutex2var_epi16(
            l0, _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 51, 34, 17, 0),
            l1);
        __m512i d23 = _mm512_permutex2var_epi16(
            l2, _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 55, 38, 21, 4, 0, 0, 0, 0),
            l3);
        dw = _mm256_cvtph_ps(_mm_mask_mov_epi16(_mm512_castsi512_si128(d01), 0xf0, _mm512_castsi512_si128(d23)));
    } else {
        __m512i l0 = dec_load64(p, full, valid), l1 = dec_load64(p + 64, full, valid - 64);
        __m512i l2 = _mm512_castsi128_si512(full ? _mm_loadu_si128((const __m128i *)(p + 128))
                                                 : _mm_maskz_loadu_epi8((__mmask16)dec_mask64(valid - 128), p + 128));
        const __m512i m4 = _mm512_set1_epi8(0x0f);
        __m512i       q0 = _mm512_permutex2var_epi8(l0, Q4IDX(0), l1);
        __m512i       q1 = _mm512_permutex2var_epi8(l1, Q4IDX(8), l2);
        wv[0]            = _mm512_and_si512(q0, m4);
        wv[1]            = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
        wv[2]            = _mm512_and_si512(q1, m4);
        wv[3]            = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
        // scales at bytes 0, 18, .., 126: words 0, 9, 18, 27 of l0 and 36, 45, 54, 63 of l0:l1
        __m512i d = _mm512_permutex2var_epi16(
            l0, _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 63, 54, 45, 36, 27, 18, 9, 0),
            l1);
        dw = _mm256_cvtph_ps(_mm512_castsi512_si128(d));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const uint8_t *xr = xp + r * xs;
        const int8_t  *xq = (const int8_t *)xr + b * 32;
        const float   *dx = (const float *)(xr + nbp * 32) + b, *cx = dx + nbp;
        __m512         s  = _mm512_zextps256_ps512(_mm256_mul_ps(dw, _mm256_loadu_ps(dx)));
        acc[r][ac] = _mm512_fmadd_ps(s, _mm512_zextps256_ps512(_mm256_loadu_ps(cx)), acc[r][ac]);
        const __m512i z = _mm512_setzero_si512();
        if (q8) {
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                __m512i dot = _mm512_dpbusd_epi32(z, wv[k], _mm512_load_si512(xq + k * 64));
                __m512i e   = _mm512_set_epi32(2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1,
                                               2 * k + 1, 2 * k + 1, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k);
                const int a = k % na;
                acc[r][a]   = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(e, s), acc[r][a]);
            }
        } else {
#pragma GCC unroll 2
            for (int k = 0; k < 2; k++) {
                __m512i dot = _mm512_dpbusd_epi32(z, wv[2 * k], _mm512_load_si512(xq + k * 128));
                dot         = _mm512_dpbusd_epi32(dot, wv[2 * k + 1], _mm512_load_si512(xq + k * 128 + 64));
                const int c = 4 * k;
                __m512i   e = _mm512_set_epi32(c + 3, c + 3, c + 3, c + 3, c + 2, c + 2, c + 2, c + 2, c + 1, c + 1,
                                               c + 1, c + 1, c, c, c, c);
                acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(e, s), acc[r][k]);
            }
        }
    }
}

// out[r * ldo] = W row . x row r, r < R, for one quantized weight row of nb blocks (stored by dec_store).
ALWAYS_INLINE void dec_row_quant(enum coopt_dtype T, int R, bool stream, const uint8_t *w, int64_t nb, const uint8_t *xp,
                                 size_t xs, float *out, int64_t ldo, const float *bias, bool add) {
    const int64_t nbp = (nb + 7) / 8 * 8;
    const int64_t sb  = T == COOPT_DTYPE_Q8_0 ? 8 * 34 : 8 * 18; // bytes per step of 8 blocks
    __m512        acc[MM_DEC_MAX][DEC_NACC];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int a = 0; a < DEC_NACC; a++) acc[r][a] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) dec_step_quant(T, R, stream, w + b / 8 * sb, true, 0, b, xp, xs, nbp, acc);
    if (b < nb) dec_step_quant(T, R, stream, w + b / 8 * sb, false, (nb - b) * (sb / 8), b, xp, xs, nbp, acc);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        __m512 t = _mm512_add_ps(acc[r][0], acc[r][1]);
        if (R <= 2) t = _mm512_add_ps(_mm512_add_ps(t, acc[r][2]), _mm512_add_ps(acc[r][3], acc[r][4]));
        dec_store(&out[r * ldo], _mm512_reduce_add_ps(t), bias, add);
    }
}

// One step of dec_row_float: weights [i, i + 32) of C rows at w (ws bytes apart) into
// acc[r][c][0..1] (masked to n_in when !full).
ALWAYS_INLINE void dec_step_float(enum coopt_dtype T, int R, int C, const uint8_t *w, size_t ws, int64_t i,
                                  bool full, int64_t n_in, const float *x, size_t xs, __m512 acc[][4][2]) {
    const int64_t eb = T == COOPT_DTYPE_F32 ? 4 : 2; // bytes per weight
    __mmask16     m0 = 0xffff, m1 = 0xffff;
    if (!full) {
        m0 = simd_mask16(n_in - i);
        m1 = simd_mask16(n_in - i - 16 > 0 ? n_in - i - 16 : 0);
    }
    __m512 w0[4], w1[4];
#pragma GCC unroll 4
    for (int c = 0; c < C; c++) {
        const uint8_t *p = w + c * ws + i * eb;
        _mm_prefetch((const char *)p + MM_FPF_DIST, MM_FPF_HINT);
        if (eb == 4) _mm_prefetch((const char *)p + 64 + MM_FPF_DIST, MM_FPF_HINT);
        switch (T) {
        case COOPT_DTYPE_F32:
            w0[c] = full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m0, p);
            w1[c] = full ? _mm512_loadu_ps(p + 64) : _mm512_maskz_loadu_ps(m1, p + 64);
            break;
        case COOPT_DTYPE_F16:
            w0[c] = full ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p))
                         : simd_load_f16((const uint16_t *)p, m0);
            w1[c] = full ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)))
                         : simd_load_f16((const uint16_t *)(p + 32), m1);
            break;
        default: {
            // two 32-byte loads: measured faster than one line-splitting 64-byte load when streaming from DRAM
            __m512i v = full ? _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
                                                  _mm256_loadu_si256((const __m256i *)(p + 32)), 1)
                             : _mm512_maskz_loadu_epi16(((__mmask32)m1 << 16) | m0, p);
            w0[c]     = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            w1[c]     = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
        }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const float *xr = (const float *)((const uint8_t *)x + r * xs) + i;
        __m512       x0, x1;
        if (full || T == COOPT_DTYPE_BF16) { // prepared BF16 x is zero-padded
            x0 = _mm512_loadu_ps(xr);
            x1 = _mm512_loadu_ps(xr + 16);
        } else {
            x0 = _mm512_maskz_loadu_ps(m0, xr);
            x1 = _mm512_maskz_loadu_ps(m1, xr + 16);
        }
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) {
            const int a  = R * C >= 8 ? 0 : 1; // enough independent chains: one accumulator each
            acc[r][c][0] = _mm512_fmadd_ps(w0[c], x0, acc[r][c][0]);
            acc[r][c][a] = _mm512_fmadd_ps(w1[c], x1, acc[r][c][a]);
        }
    }
}

// Float weights: C rows at w (ws bytes apart) at once (each x vector load serves C weight rows)
// with 2 accumulators per (x row, weight row), 1 when R * C >= 8.
ALWAYS_INLINE void dec_row_float(enum coopt_dtype T, int R, int C, const uint8_t *w, size_t ws, int64_t n_in,
                                 const float *x, size_t xs, float *out, int64_t ldo, const float *bias, bool add) {
    __m512 acc[MM_DEC_MAX][4][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) acc[r][c][0] = acc[r][c][1] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n_in; i += 32) dec_step_float(T, R, C, w, ws, i, true, n_in, x, xs, acc);
    if (i < n_in) dec_step_float(T, R, C, w, ws, i, false, n_in, x, xs, acc);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++)
            dec_store(&out[r * ldo + c],
                      _mm512_reduce_add_ps(R * C >= 8 ? acc[r][c][0] : _mm512_add_ps(acc[r][c][0], acc[r][c][1])),
                      bias ? bias + c : NULL, add);
}

// x rows [r0, r0 + R) against weight rows [o0, o1).
ALWAYS_INLINE void dec_rows(enum coopt_dtype T, int R, const struct dec_ctx *dc, int64_t r0, int64_t o0, int64_t o1) {
    const struct coopt_weight *w     = dc->w;
    const int64_t              ldo   = w->n_out;
    const uint8_t             *base  = (const uint8_t *)w->data;
    const bool                 plain = T == COOPT_DTYPE_F32 || T == COOPT_DTYPE_F16; // x used as given
    const uint8_t *xp  = (const uint8_t *)(plain ? (const void *)dc->x : dc->xp) + (size_t)r0 * dc->x_stride;
    float         *out = dc->out + (size_t)r0 * (size_t)ldo;
    const size_t   rb  = dc->row_bytes;
    const float   *bias = w->bias;
    const bool     add  = dc->add;
    if (T == COOPT_DTYPE_Q8_0 || T == COOPT_DTYPE_Q4_0) {
        for (int64_t o = o0; o < o1; o++)
            dec_row_quant(T, R, dc->n_rows <= MM_DEC_MAX, base + (size_t)o * rb, w->n_in / COOPT_QK, xp, dc->x_stride, out + o, ldo,
                          bias ? bias + o : NULL, add);
        return;
    }
    // weight rows at once for 2+ x rows (each x vector load serves C weight rows); one row at a
    // time for one x row (a single stream per thread, see MM_FC1)
    const int C = R == 1 ? MM_FC1 : R <= 4 ? MM_FC : 2;
    int64_t   o = o0;
    for (; o + C <= o1; o += C)
        dec_row_float(T, R, C, base + (size_t)o * rb, rb, w->n_in, (const float *)xp, dc->x_stride, out + o, ldo,
                      bias ? bias + o : NULL, add);
    for (; o < o1; o++)
        dec_row_float(T, R, 1, base + (size_t)o * rb, rb, w->n_in, (const float *)xp, dc->x_stride, out + o, ldo,
                      bias ? bias + o : NULL, add);
}

// All x rows, in groups of MM_DEC_MAX, against weight rows [o0, o1) (which stay in L2 between groups).
#define DEC_FN(name, T)                                                                                            \
    static void name(const struct dec_ctx *dc, int64_t o0, int64_t o1) {                                           \
        for (int64_t r0 = 0; r0 < dc->n_rows; r0 += MM_DEC_MAX) {                                                  \
            switch (COOPT_MIN(MM_DEC_MAX, dc->n_rows - r0)) {                                                      \
            case 1: dec_rows(T, 1, dc, r0, o0, o1); break;                                                         \
            case 2: dec_rows(T, 2, dc, r0, o0, o1); break;                                                         \
            case 3: dec_rows(T, 3, dc, r0, o0, o1); break;                                                         \
            case 4: dec_rows(T, 4, dc, r0, o0, o1); break;                                                         \
            case 5: dec_rows(T, 5, dc, r0, o0, o1); break;                                                         \
            case 6: dec_rows(T, 6, dc, r0, o0, o1); break;                                                         \
            case 7: dec_rows(T, 7, dc, r0, o0, o1); break;                                                         \
            default: dec_rows(T, 8, dc, r0, o0, o1); break;                                                        \
            }                                                                                                      \
        }                                                                                                          \
    }
_Static_assert(MM_DEC_MAX == 8, "DEC_FN dispatches 1..8 rows");
DEC_FN(dec_f32, COOPT_DTYPE_F32)
DEC_FN(dec_f16, COOPT_DTYPE_F16)
DEC_FN(dec_bf16, COOPT_DTYPE_BF16)
DEC_FN(dec_q8_0, COOPT_DTYPE_Q8_0)
DEC_FN(dec_q4_0, COOPT_DTYPE_Q4_0)

typedef void dec_fn(const struct dec_ctx *, int64_t, int64_t);

static dec_fn *dec_fn_of(enum coopt_dtype t) {
    switch (t) {
    case COOPT_DTYPE_F32: return dec_f32;
    case COOPT_DTYPE_F16: return dec_f16;
    case COOPT_DTYPE_BF16: return dec_bf16;
    case COOPT_DTYPE_Q8_0: return dec_q8_0;
    default: return dec_q4_0;
    }
}

static void dec_task(void *ctx, int32_t ith, int32_t nth) {
    struct dec_ctx *dc = ctx;
    dec_fn         *fn = dec_fn_of(dc->w->dtype);
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&dc->next, 1, memory_order_relaxed);
        if (c >= dc->n_chunks) break;
        int64_t o0 = c * dc->chunk;
        fn(dc, o0, COOPT_MIN(dc->w->n_out, o0 + dc->chunk));
    }
}

// Bytes per prepared x row (0: the kernels read x as given).
static size_t dec_x_stride(const struct coopt_weight *w) {
    switch (w->dtype) {
    case COOPT_DTYPE_Q8_0:
    case COOPT_DTYPE_Q4_0: return dec_q_stride(w->n_in);
    case COOPT_DTYPE_BF16: return dec_bf16_stride(w->n_in);
    default: return 0;
    }
}

static void dec_prep_rows(const struct coopt_weight *w, const float *x, int64_t r_lo, int64_t r_hi, uint8_t *xp) {
    size_t xs = dec_x_stride(w);
    for (int64_t r = r_lo; r < r_hi; r++) {
        const float *xr = x + (size_t)r * (size_t)w->n_in;
        uint8_t     *dr = xp + (size_t)r * xs;
        if (w->dtype == COOPT_DTYPE_BF16) dec_prep_bf16(xr, w->n_in, dr);
        else dec_prep_quant(w->dtype, xr, w->n_in, dr);
    }
}

struct dec_prep_ctx {
    const struct dec_ctx *dc;
    uint8_t              *xp;
};

static void dec_prep_task(void *ctx, int32_t ith, int32_t nth) {
    struct dec_prep_ctx *pc = ctx;
    int64_t              lo, hi;
    coopt_split_range(pc->dc->n_rows, ith, nth, &lo, &hi);
    dec_prep_rows(pc->dc->w, pc->dc->x, lo, hi, pc->xp);
}

// Weight rows per chunk of work: decode, contiguous chunks, ~4 per thread: long sequential
// streams, yet a thread slowed by another process does not hold the call back by more than a
// quarter of its share. More rows: chunks of <= 128 KiB of weights, which stay in L2 while every
// group of x rows passes.
static int64_t dec_chunk(const struct coopt_weight *w, int32_t n_rows, int32_t nth) {
    size_t  row_bytes = coopt_dtype_row_bytes(w->dtype, w->n_in);
    int64_t per       = (w->n_out + 4 * nth - 1) / (4 * nth);
    if (n_rows > MM_DEC_MAX) per = COOPT_MIN(per, COOPT_MAX((int64_t)1, (int64_t)((128u << 10) / row_bytes)));
    return COOPT_MAX((int64_t)(n_rows > MM_DEC_MAX ? 8 : 16), per);
}

// The AVX-512 matmul for any n_rows: x rows in groups of up to 8 share each weight row read.
static void cpu_matmul_avx512(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                              int32_t n_rows) {
    struct cpu_backend *cb  = be->impl;
    int32_t             nth = coopt_threadpool_n_threads(cb->tp);
    struct dec_ctx      dc  = {.out = out, .x = x, .w = w, .n_rows = n_rows, .x_stride = (size_t)w->n_in * sizeof(float)};
    dc.row_bytes            = coopt_dtype_row_bytes(w->dtype, w->n_in);
    if (dec_x_stride(w) > 0) {
        dc.x_stride = dec_x_stride(w);
        struct dec_prep_ctx pc = {.dc = &dc, .xp = cpu_scratch(be, dc.x_stride * (size_t)n_rows)};
        if (n_rows >= 4 * nth) coopt_threadpool_run(cb->tp, dec_prep_task, &pc);
        else dec_prep_task(&pc, 0, 1);
        dc.xp = pc.xp;
    }
    dc.chunk    = dec_chunk(w, n_rows, nth);
    dc.n_chunks = (w->n_out + dc.chunk - 1) / dc.chunk;
    atomic_init(&dc.next, 0);
    if (dc.n_chunks == 1 || nth == 1) dec_task(&dc, 0, 1);
    else coopt_threadpool_run(cb->tp, dec_task, &dc);
}

// ---- the row kernel as building blocks of the fused ops (ops_cpu.h) ----

bool cpu_mm_rows_ok(const struct coopt_weight *w, int32_t n_rows) {
    // the choice cpu_matmul makes (F32 weights with 2..8 rows measured faster with the tiles)
    bool quant_w = w->dtype == COOPT_DTYPE_Q8_0 || w->dtype == COOPT_DTYPE_Q4_0;
    return quant_w || n_rows == 1 || (n_rows <= MM_DEC_MAX && w->dtype != COOPT_DTYPE_F32);
}

size_t cpu_mm_rows_prep_bytes(const struct coopt_weight *w, int32_t n_rows) { return dec_x_stride(w) * (size_t)n_rows; }

bool cpu_mm_rows_prep_shared(const struct coopt_weight *a, const struct coopt_weight *b) {
    return a->dtype == b->dtype && a->n_in == b->n_in;
}

void cpu_mm_rows_prep(const struct coopt_weight *w, const float *x, int32_t r_lo, int32_t r_hi, void *xp) {
    dec_prep_rows(w, x, r_lo, r_hi, xp);
}

void cpu_mm_rows_run(const struct coopt_weight *w, const float *x, const void *xp, int32_t n_rows, int64_t o0,
                     int64_t o1, float *out, bool add) {
    struct dec_ctx dc = {.out = out, .x = x, .xp = xp, .w = w, .n_rows = n_rows, .add = add};
    dc.row_bytes      = coopt_dtype_row_bytes(w->dtype, w->n_in);
    dc.x_stride       = dec_x_stride(w) > 0 ? dec_x_stride(w) : (size_t)w->n_in * sizeof(float);
    dec_fn_of(w->dtype)(&dc, o0, o1);
}

int64_t cpu_mm_rows_chunk(const struct coopt_weight *w, int32_t n_rows, int32_t nth) { return dec_chunk(w, n_rows, nth); }

#else

bool cpu_mm_rows_ok(const struct coopt_weight *w, int32_t n_rows) { return false; }
size_t cpu_mm_rows_prep_bytes(const struct coopt_weight *w, int32_t n_rows) { return 0; }
bool cpu_mm_rows_prep_shared(const struct coopt_weight *a, const struct coopt_weight *b) { return false; }
void cpu_mm_rows_prep(const struct coopt_weight *w, const float *x, int32_t r_lo, int32_t r_hi, void *xp) {
    coopt_abort(__FILE__, __LINE__, "cpu_mm_rows_prep: no row kernel in this build");
}
void cpu_mm_rows_run(const struct coopt_weight *w, const float *x, const void *xp, int32_t n_rows, int64_t o0,
                     int64_t o1, float *out, bool add) {
    coopt_abort(__FILE__, __LINE__, "cpu_mm_rows_run: no row kernel in this build");
}
int64_t cpu_mm_rows_chunk(const struct coopt_weight *w, int32_t n_rows, int32_t nth) { return 1; }

#endif // MM_DEC_AVX512

// ---- job loop (prefill, and decode without AVX-512) ----

// One job: x rows [r0, r1) against weight rows [o0, o1), all of n_in, sliced by kb.
ALWAYS_INLINE void mm_job(enum coopt_dtype T, const struct mm_ctx *mc, int64_t r0, int64_t r1, int64_t o0,
                          int64_t o1) {
    const struct coopt_weight *w     = mc->w;
    const bool                 quant = T == COOPT_DTYPE_Q8_0 || T == COOPT_DTYPE_Q4_0;
    const int64_t              n_in = w->n_in, n_out = w->n_out;
    const int64_t              nb   = n_in / COOPT_QK; // q8x blocks per x row
    for (int64_t k0 = 0; k0 < n_in; k0 += mc->kb) {
        int64_t k1 = COOPT_MIN(n_in, k0 + mc->kb);
        for (int64_t o = o0; o < o1; o += MM_C) {
            int            C  = (int)COOPT_MIN(MM_C, o1 - o);
            const uint8_t *wp = (const uint8_t *)w->data + (size_t)o * mc->row_bytes;
            for (int64_t r = r0; r < r1; r += MM_R) {
                int    R  = (int)COOPT_MIN(MM_R, r1 - r);
                float *op = mc->out + (size_t)r * (size_t)n_out + (size_t)o;
                bool   ac = k0 > 0;
#define MM_TILE(R_, C_)                                                                                            \
    if (quant)                                                                                                     \
        tile_quant(T, R_, C_, mc->qx + (size_t)r * (size_t)nb, nb, wp, mc->row_bytes, k0 / COOPT_QK,               \
                   k1 / COOPT_QK, op, n_out, ac);                                                                  \
    else                                                                                                           \
        tile_float(T, R_, C_, mc->x + (size_t)r * (size_t)n_in, n_in, wp, mc->row_bytes, k0, k1, op, n_out, ac);   \
    break
                switch ((R - 1) * MM_C + (C - 1)) {
                case 0: MM_TILE(1, 1);
                case 1: MM_TILE(1, 2);
                case 2: MM_TILE(1, 3);
                case 3: MM_TILE(1, 4);
                case 4: MM_TILE(2, 1);
                case 5: MM_TILE(2, 2);
                case 6: MM_TILE(2, 3);
                case 7: MM_TILE(2, 4);
                case 8: MM_TILE(3, 1);
                case 9: MM_TILE(3, 2);
                case 10: MM_TILE(3, 3);
                case 11: MM_TILE(3, 4);
                case 12: MM_TILE(4, 1);
                case 13: MM_TILE(4, 2);
                case 14: MM_TILE(4, 3);
                default: MM_TILE(4, 4);
                }
#undef MM_TILE
            }
        }
    }
    if (w->bias) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t o = o0; o < o1; o++) mc->out[(size_t)r * (size_t)n_out + (size_t)o] += w->bias[o];
    }
}

#define MM_JOB_FN(name, T)                                                                                         \
    static void name(const struct mm_ctx *mc, int64_t r0, int64_t r1, int64_t o0, int64_t o1) {                   \
        mm_job(T, mc, r0, r1, o0, o1);                                                                             \
    }
MM_JOB_FN(mm_job_f32, COOPT_DTYPE_F32)
MM_JOB_FN(mm_job_f16, COOPT_DTYPE_F16)
MM_JOB_FN(mm_job_bf16, COOPT_DTYPE_BF16)
MM_JOB_FN(mm_job_q8_0, COOPT_DTYPE_Q8_0)
MM_JOB_FN(mm_job_q4_0, COOPT_DTYPE_Q4_0)

static void mm_task(void *ctx, int32_t ith, int32_t nth) {
    struct mm_ctx *mc = ctx;
    void (*job)(const struct mm_ctx *, int64_t, int64_t, int64_t, int64_t);
    switch (mc->w->dtype) {
    case COOPT_DTYPE_F32: job = mm_job_f32; break;
    case COOPT_DTYPE_F16: job = mm_job_f16; break;
    case COOPT_DTYPE_BF16: job = mm_job_bf16; break;
    case COOPT_DTYPE_Q8_0: job = mm_job_q8_0; break;
    default: job = mm_job_q4_0; break;
    }
    int64_t n_jobs = mc->n_panels * mc->n_chunks;
    for (;;) {
        int64_t j = atomic_fetch_add_explicit(&mc->next, 1, memory_order_relaxed);
        if (j >= n_jobs) break;
        int64_t p = j / mc->n_chunks, c = j % mc->n_chunks;
        int64_t r0 = p * mc->panel, o0 = c * mc->chunk;
        job(mc, r0, COOPT_MIN(mc->n_rows, r0 + mc->panel), o0, COOPT_MIN(mc->w->n_out, o0 + mc->chunk));
    }
}

struct q8x_ctx {
    const float *x;
    struct q8x  *q;
    int32_t      n_rows;
    int64_t      n_in;
};

static void q8x_task(void *ctx, int32_t ith, int32_t nth) {
    struct q8x_ctx *c = ctx;
    int64_t         lo, hi;
    coopt_split_range(c->n_rows, ith, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++)
        quantize_q8x(c->x + (size_t)r * (size_t)c->n_in, c->q + (size_t)r * (size_t)(c->n_in / COOPT_QK), c->n_in);
}

void cpu_matmul(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                int32_t n_rows) {
    struct cpu_backend *cb = be->impl;
    COOPT_ASSERT(w->dtype == COOPT_DTYPE_F32 || w->dtype == COOPT_DTYPE_F16 || w->dtype == COOPT_DTYPE_BF16 ||
                 w->dtype == COOPT_DTYPE_Q8_0 || w->dtype == COOPT_DTYPE_Q4_0);
    COOPT_ASSERT(n_rows >= 0 && w->n_in > 0 && w->n_out > 0);
    if (n_rows == 0) return;
#if defined(MM_DEC_AVX512)
    // Prefill of quantized weights also takes this path (int8 x of 8 rows fits L1); float x of 8
    // rows does not, so float prefill stays with the k-sliced tiles below.
    // F32 weights with 2..8 rows measured faster with the tiles (x rows of 16 KiB per 4096 f32).
    if (cpu_mm_rows_ok(w, n_rows)) {
        cpu_matmul_avx512(be, out, x, w, n_rows);
        return;
    }
#endif
    bool quant = w->dtype == COOPT_DTYPE_Q8_0 || w->dtype == COOPT_DTYPE_Q4_0;
    COOPT_ASSERT(!quant || w->n_in % COOPT_QK == 0);

    struct mm_ctx mc = {.out = out, .x = x, .w = w, .n_rows = n_rows};
    mc.row_bytes     = coopt_dtype_row_bytes(w->dtype, w->n_in);
    int32_t nth      = coopt_threadpool_n_threads(cb->tp);
    if (quant) {
        size_t bytes = (size_t)n_rows * (size_t)(w->n_in / COOPT_QK) * sizeof(struct q8x);
        struct q8x_ctx qc = {.x = x, .q = cpu_scratch(be, bytes), .n_rows = n_rows, .n_in = w->n_in};
        if (n_rows >= 4 * nth) coopt_threadpool_run(cb->tp, q8x_task, &qc);
        else q8x_task(&qc, 0, 1);
        mc.qx = qc.q;
    }
    if (n_rows <= MM_R) {
        // decode: one pass over the weights; chunks small enough to balance threads
        mc.panel = n_rows;
        mc.kb    = w->n_in;
        mc.chunk = 16;
    } else {
        mc.panel = MM_PANEL;
        mc.kb    = MM_KB;
        mc.chunk = 32;
    }
    mc.n_panels = (n_rows + mc.panel - 1) / mc.panel;
    mc.n_chunks = (w->n_out + mc.chunk - 1) / mc.chunk;
    atomic_init(&mc.next, 0);
    if (mc.n_panels * mc.n_chunks == 1) mm_task(&mc, 0, 1);
    else coopt_threadpool_run(cb->tp, mm_task, &mc);
}
