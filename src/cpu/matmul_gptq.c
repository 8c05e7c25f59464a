/*
 * matmul_gptq.c -- CPU matmul with GPTQ 4-bit weights: out [n_rows][n_out] = x @ W^T.
 *
 * Activation precision: each call first quantizes x to int8 per block of 32 padded rows
 * (scale d = amax / 127, round to nearest even), applying the act-order permutation in the same
 * pass (the only gather, once per row and call). Then, per 16-column subtile and 32-row block,
 * integer dot products of the unsigned 4-bit weights with the int8 activations (VNNI vpdpbusd:
 * 4 u8 x s8 products per int32 lane) are scaled in f32:
 *     acc += (s * d_b) * dot_b                  per block    (s: f16 group scale of the column)
 *     acc -= (s * z) * S_g,  S_g = sum_b d_b * sum(xq_b)    per group  (z: zero point)
 * which equals sum_i s (q_i - z) xq_i d_b. The only approximation is the int8 rounding of x:
 * |error| <= sum_b d_b/2 * sum_{i in b} |W[o][i]|, i.e. about 0.4% of sum |W x| per output in
 * the worst case and ~0.1% typically (tests/test_gptq.c checks this bound). Measured on random
 * data, that is the same order as llama.cpp's Q8_0 activations for Q4_0 weights.
 *
 * Why this layout is fast: qw is [n_sub][k_pad/8][16] dwords, so one 64-byte load gives 8 rows
 * of 16 columns, two AND/shift ops split it into two vpdpbusd operands (rows 0,2,4,6 and
 * 1,3,5,7 -- the activations are stored in that order), and every activation dword is a
 * broadcast memory operand. Decode (1 row) walks its subtiles one after another, so each thread
 * reads ONE sequential weight stream (subtiles are contiguous), software-prefetched 8 KiB ahead:
 * measured at 2 threads from DRAM that streams faster than 4 interleaved subtile streams (as
 * the Q4_0 kernel found too). Prefill walks blocks of up to 8 rows per subtile, so each weight
 * tile is read once per 8 rows and stays in L2 across row blocks. Threads claim contiguous
 * chunks of subtiles from an atomic counter (~4 per thread). The activation row is quantized
 * with AVX-512 when compiled in (bit-identical to quantize_row, which the scalar isa uses).
 *
 * The scalar path does the identical arithmetic in the identical order (explicit fmaf), so the
 * SIMD paths are checked against it to f32 rounding; coopt_gptq_matmul_ref is the exact product.
 */
#include "cpu/threads.h"
#include "dtype.h"
#include "gptq.h"
#include "util.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GPTQ_HAVE_AVX512 1
#else
#define GPTQ_HAVE_AVX512 0
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define GPTQ_HAVE_AVX2 1
#else
#define GPTQ_HAVE_AVX2 0
#endif

#define SUB COOPT_GPTQ_SUB
#define BLK COOPT_GPTQ_BLK

// Quantized activations of the rows of one call, and how the call stores its outputs.
struct gptq_act {
    int8_t      *xq;   // [n_rows][k_pad] int8, rows of each octet in order 0,2,4,6,1,3,5,7
    float       *xd;   // [n_rows][nblk] scale of each 32-row block
    float       *S;    // [n_rows][n_groups] sum_b d_b * sum(xq in b) over the group's blocks
    int64_t      nblk;
    const float *bias; // [n_out] added to every output row, or NULL
    bool         add;  // out = out + (x·W + bias) (the residual add), else out = x·W + bias
};

// Stores one output value: v (+ bias), added to what out holds when a->add -- in the order the
// composed ops compute it (matmul, bias, then the residual add), so fused and composed agree.
static inline float store_val(const struct gptq_act *a, const float *dst, int64_t o, float v) {
    if (a->bias) v += a->bias[o];
    return a->add ? *dst + v : v;
}

// Quantizes row x [n_in] (through w->perm) into xq [k_pad], xd [nblk], S [n_groups].
static void quantize_row(const struct coopt_gptq_weight *w, const float *x, int8_t *xq, float *xd, float *S) {
    for (int32_t g = 0; g < w->n_groups; g++) {
        float sg = 0.0f;
        for (int64_t b = w->grp_blk[g]; b < w->grp_blk[g + 1]; b++) {
            float v[BLK], amax = 0.0f;
            for (int k = 0; k < BLK; k++) {
                int64_t kk = b * BLK + k;
                int64_t i = w->perm ? w->perm[kk] : (kk < w->n_in ? kk : -1);
                v[k] = i >= 0 ? x[i] : 0.0f;
                amax = fmaxf(amax, fabsf(v[k]));
            }
            float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
            int   sum = 0;
            for (int k = 0; k < BLK; k++) {
                int q = (int)nearbyintf(v[k] * id);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
                int n = k & 7;
                xq[b * BLK + (k & ~7) + ((n & 1) ? 4 + n / 2 : n / 2)] = (int8_t)q;
                sum += q;
            }
            xd[b] = d;
            sg = fmaf(d, (float)sum, sg);
        }
        S[g] = sg;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// quantize_row with AVX-512, bit-identical: the same id = 127 / amax, product and round to
// nearest even (cvtps_epi32 under the default MXCSR), same clamp, same f32 order for S.
static void quantize_row_avx512(const struct coopt_gptq_weight *w, const float *x, int8_t *xq, float *xd, float *S) {
    // within each octet: rows 0,2,4,6 then 1,3,5,7
    const __m256i oct = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15, 0, 2, 4, 6, 1, 3, 5, 7,
                                         8, 10, 12, 14, 9, 11, 13, 15);
    const __m512i m127 = _mm512_set1_epi32(-127);
    for (int32_t g = 0; g < w->n_groups; g++) {
        float sg = 0.0f;
        for (int64_t b = w->grp_blk[g]; b < w->grp_blk[g + 1]; b++) {
            __m512 v0, v1;
            if (w->perm) {
                const __m512i p0 = _mm512_loadu_si512(w->perm + b * BLK), p1 = _mm512_loadu_si512(w->perm + b * BLK + 16);
                const __mmask16 k0 = _mm512_cmpge_epi32_mask(p0, _mm512_setzero_si512());
                const __mmask16 k1 = _mm512_cmpge_epi32_mask(p1, _mm512_setzero_si512());
                v0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k0, p0, x, 4);
                v1 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k1, p1, x, 4);
            } else {
                int64_t   k  = b * BLK, left = w->n_in - k;
                __mmask16 k0 = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
                __mmask16 k1 = left >= 32 ? 0xffff : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
                v0 = _mm512_maskz_loadu_ps(k0, x + k);
                v1 = _mm512_maskz_loadu_ps(k1, x + k + 16);
            }
            float   amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            float   d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
            __m512  vid = _mm512_set1_ps(id);
            __m512i i0 = _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)), m127);
            __m512i i1 = _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vid)), m127);
            // no lane exceeds 127 (|v * id| <= 127 (1 + 2^-22) rounds to 127), so the sum is of the stored values
            int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
            __m256i q   = _mm256_set_m128i(_mm512_cvtsepi32_epi8(i1), _mm512_cvtsepi32_epi8(i0));
            _mm256_storeu_si256((__m256i *)(xq + b * BLK), _mm256_shuffle_epi8(q, oct));
            xd[b] = d;
            sg    = fmaf(d, (float)sum, sg);
        }
        S[g] = sg;
    }
}
#endif

// ---- scalar path ----

static void kernel_scalar(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r0, int64_t nr,
                          int64_t t_lo, int64_t t_hi, float *out) {
    const int64_t n_oct = w->k_pad / 8, G = w->n_groups;
    for (int64_t r = r0; r < r0 + nr; r++) {
        const int8_t *xq = a->xq + r * w->k_pad;
        const float  *xd = a->xd + r * a->nblk, *S = a->S + r * G;
        for (int64_t t = t_lo; t < t_hi; t++) {
            const uint32_t *qw = w->qw + t * n_oct * SUB;
            for (int j = 0; j < SUB; j++) {
                int64_t o = t * SUB + j;
                if (o >= w->n_out) break;
                float acc = 0.0f;
                for (int64_t g = 0; g < G; g++) {
                    float s = coopt_f16_to_f32(w->scale[(t * G + g) * SUB + j]);
                    float z = (float)w->zero[(t * G + g) * SUB + j];
                    for (int64_t b = w->grp_blk[g]; b < w->grp_blk[g + 1]; b++) {
                        int32_t dot = 0;
                        for (int oc = 0; oc < 4; oc++) {
                            uint32_t      dw = qw[(b * 4 + oc) * SUB + j];
                            const int8_t *xo = xq + b * BLK + oc * 8;
                            for (int n = 0; n < 4; n++) {
                                dot += (int32_t)((dw >> (8 * n)) & 15u) * xo[n];
                                dot += (int32_t)((dw >> (8 * n + 4)) & 15u) * xo[4 + n];
                            }
                        }
                        acc = fmaf((float)dot, s * xd[b], acc);
                    }
                    acc = fmaf(-(s * z), S[g], acc);
                }
                out[r * w->n_out + o] = store_val(a, &out[r * w->n_out + o], o, acc);
            }
        }
    }
}

// ---- AVX-512 VNNI path ----

// Software prefetch distance (bytes) of the single decode weight stream of k512_dec1 (PF_DIST4:
// each of the 4 streams of the 2-row kernel). Measured at 2 threads from DRAM (dev/bench_gptq.c):
// 2 KiB 65-73 GB/s, 4 KiB 70-84, 8 KiB 73-83, 12 KiB 68-78 (with T0 hints; NTA keeps 8 KiB best).
#ifndef GPTQ_PF_DIST
#define GPTQ_PF_DIST 8192
#endif
#define GPTQ_PF_DIST4 1024
// Decode weights are read once per call: prefetching them non-temporally measured 5-10% faster
// at 2 threads from DRAM than into all cache levels (T0), and T1 was no better than T0.
#ifndef GPTQ_HINT
#define GPTQ_HINT _MM_HINT_NTA
#endif

#if GPTQ_HAVE_AVX512
// Stores the 16 outputs [o, o + 16) of one row (left: outputs that exist from o), as store_val.
static inline __attribute__((always_inline)) void store512(const struct gptq_act *a, float *dst, int64_t o,
                                                           int64_t left, __m512 v) {
    const __mmask16 m = left >= SUB ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    if (a->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, a->bias + o));
    if (a->add) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), v);
    _mm512_mask_storeu_ps(dst, m, v);
}

// NC subtiles x R rows starting at subtile t0 and row r0. NC * R <= 8 keeps everything in the
// 32 zmm registers (R*NC int + R*NC f32 accumulators, NC scales, 2*NC unpacked weights).
static inline __attribute__((always_inline)) void k512(const struct coopt_gptq_weight *w,
                                                       const struct gptq_act *a, int64_t r0, int64_t t0,
                                                       float *out, const int R, const int NC) {
    const int64_t   n_oct = w->k_pad / 8, G = w->n_groups, kp = w->k_pad;
    const __m512i   m4 = _mm512_set1_epi8(0x0f);
    const uint32_t *qw[4];
    __m512          acc[8][4];
    for (int c = 0; c < NC; c++) qw[c] = w->qw + (t0 + c) * n_oct * SUB;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 s[4];
        for (int c = 0; c < NC; c++)
            s[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->scale + ((t0 + c) * G + g) * SUB)));
        for (int64_t b = w->grp_blk[g]; b < w->grp_blk[g + 1]; b++) {
            __m512i ia[8][4];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < NC; c++) ia[r][c] = _mm512_setzero_si512();
            for (int oc = 0; oc < 4; oc++) {
                __m512i lo[4], hi[4];
                for (int c = 0; c < NC; c++) {
                    if (R <= 2) _mm_prefetch((const char *)(qw[c] + (b * 4 + oc) * SUB) + GPTQ_PF_DIST4, _MM_HINT_T0);
                    __m512i v = _mm512_loadu_si512(qw[c] + (b * 4 + oc) * SUB);
                    lo[c] = _mm512_and_si512(v, m4);
                    hi[c] = _mm512_and_si512(_mm512_srli_epi32(v, 4), m4);
                }
                for (int r = 0; r < R; r++) {
                    const int8_t *xo = a->xq + (r0 + r) * kp + b * BLK + oc * 8;
                    int32_t       xl, xh;
                    memcpy(&xl, xo, 4);
                    memcpy(&xh, xo + 4, 4);
                    __m512i vl = _mm512_set1_epi32(xl), vh = _mm512_set1_epi32(xh);
                    for (int c = 0; c < NC; c++) {
                        ia[r][c] = _mm512_dpbusd_epi32(ia[r][c], lo[c], vl);
                        ia[r][c] = _mm512_dpbusd_epi32(ia[r][c], hi[c], vh);
                    }
                }
            }
            for (int r = 0; r < R; r++) {
                __m512 d = _mm512_set1_ps(a->xd[(r0 + r) * a->nblk + b]);
                for (int c = 0; c < NC; c++)
                    acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][c]), _mm512_mul_ps(s[c], d), acc[r][c]);
            }
        }
        for (int c = 0; c < NC; c++) {
            __m128i zb = _mm_loadu_si128((const __m128i *)(w->zero + ((t0 + c) * G + g) * SUB));
            __m512  sz = _mm512_mul_ps(s[c], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)));
            for (int r = 0; r < R; r++)
                acc[r][c] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(a->S[(r0 + r) * G + g]), acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < NC; c++) {
            int64_t o = (t0 + c) * SUB;
            store512(a, out + (r0 + r) * w->n_out + o, o, w->n_out - o, acc[r][c]);
        }
    }
}

// Decode, one x row: subtiles [t_lo, t_hi) one after another, i.e. a single sequential stream of
// weights per thread (plus the scale and zero streams, 1/32 and 1/64 of its rate at group 128),
// prefetched GPTQ_PF_DIST ahead. Two int32 chains per block (low and high nibbles).
static void k512_dec1(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r, int64_t t_lo,
                      int64_t t_hi, float *out) {
    const int64_t n_oct = w->k_pad / 8, G = w->n_groups;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const int8_t *xq = a->xq + r * w->k_pad;
    const float  *xd = a->xd + r * a->nblk, *S = a->S + r * G;
    out += r * w->n_out;
    {
        // The first GPTQ_PF_DIST bytes of the run are not covered by the in-loop prefetch: request
        // them all at once instead of letting the hardware prefetcher ramp up (a chunk is short).
        const char *p0 = (const char *)(w->qw + t_lo * n_oct * SUB), *p1 = (const char *)(w->qw + t_hi * n_oct * SUB);
        for (const char *p = p0; p < p1 && p < p0 + GPTQ_PF_DIST; p += 64) _mm_prefetch(p, GPTQ_HINT);
        _mm_prefetch((const char *)(w->scale + t_lo * G * SUB), _MM_HINT_T0);
        _mm_prefetch((const char *)(w->scale + t_lo * G * SUB) + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)(w->scale + t_lo * G * SUB) + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)(w->scale + t_lo * G * SUB) + 192, _MM_HINT_T0);
        _mm_prefetch((const char *)(w->zero + t_lo * G * SUB), _MM_HINT_T0);
        _mm_prefetch((const char *)(w->zero + t_lo * G * SUB) + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)(w->zero + t_lo * G * SUB) + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)(w->zero + t_lo * G * SUB) + 192, _MM_HINT_T0);
    }
    for (int64_t t = t_lo; t < t_hi; t++) {
        const uint32_t *qw = w->qw + t * n_oct * SUB;
        const uint16_t *sc = w->scale + t * G * SUB;
        const uint8_t  *zp = w->zero + t * G * SUB;
        __m512          acc = _mm512_setzero_ps(), accz = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            _mm_prefetch((const char *)(sc + g * SUB) + 256, _MM_HINT_T0);
            _mm_prefetch((const char *)(zp + g * SUB) + 256, _MM_HINT_T0);
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * SUB)));
            for (int64_t b = w->grp_blk[g]; b < w->grp_blk[g + 1]; b++) {
                const uint32_t *q  = qw + b * 4 * SUB;
                const int8_t   *xb = xq + b * BLK;
                __m512i         i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int oc = 0; oc < 4; oc++) {
                    _mm_prefetch((const char *)(q + oc * SUB) + GPTQ_PF_DIST, GPTQ_HINT);
                    __m512i v = _mm512_loadu_si512(q + oc * SUB);
                    int32_t xl, xh;
                    memcpy(&xl, xb + oc * 8, 4);
                    memcpy(&xh, xb + oc * 8 + 4, 4);
                    i0 = _mm512_dpbusd_epi32(i0, _mm512_and_si512(v, m4), _mm512_set1_epi32(xl));
                    i1 = _mm512_dpbusd_epi32(i1, _mm512_and_si512(_mm512_srli_epi32(v, 4), m4), _mm512_set1_epi32(xh));
                }
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)),
                                      _mm512_mul_ps(s, _mm512_set1_ps(xd[b])), acc);
            }
            __m128i zb = _mm_loadu_si128((const __m128i *)(zp + g * SUB));
            __m512  sz = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)));
            accz = _mm512_fmadd_ps(sz, _mm512_set1_ps(S[g]), accz);
        }
        acc = _mm512_sub_ps(acc, accz);
        store512(a, out + t * SUB, t * SUB, w->n_out - t * SUB, acc);
    }
}

#define K512_FN(R, NC)                                                                             \
    static void k512_##R##_##NC(const struct coopt_gptq_weight *w, const struct gptq_act *a,      \
                                int64_t r0, int64_t t0, float *out) {                              \
        k512(w, a, r0, t0, out, R, NC);                                                            \
    }
K512_FN(1, 1) K512_FN(2, 1) K512_FN(2, 4) K512_FN(3, 1) K512_FN(3, 2)
K512_FN(4, 1) K512_FN(4, 2) K512_FN(5, 1) K512_FN(6, 1) K512_FN(7, 1) K512_FN(8, 1)

typedef void k_fn(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r0, int64_t t0, float *out);

// Rows [r0, r0+nr) (nr <= 8) over subtiles [t_lo, t_hi): the widest kernel, then single subtiles.
static void run512(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r0, int nr,
                   int64_t t_lo, int64_t t_hi, float *out) {
    if (nr == 1) {
        k512_dec1(w, a, r0, t_lo, t_hi, out);
        return;
    }
    static k_fn *const wide[9] = {NULL, k512_1_1, k512_2_4, k512_3_2, k512_4_2, k512_5_1, k512_6_1, k512_7_1, k512_8_1};
    static k_fn *const one[9] = {NULL, k512_1_1, k512_2_1, k512_3_1, k512_4_1, k512_5_1, k512_6_1, k512_7_1, k512_8_1};
    static const int   nc[9] = {0, 1, 4, 2, 2, 1, 1, 1, 1};
    int64_t            t = t_lo;
    for (; t + nc[nr] <= t_hi; t += nc[nr]) wide[nr](w, a, r0, t, out);
    for (; t < t_hi; t++) one[nr](w, a, r0, t, out);
}
#endif

// ---- AVX2 path (AVX-VNNI when compiled in, else vpmaddubsw + vpmaddwd) ----

#if GPTQ_HAVE_AVX2
static inline __m256i dot_u4s8(__m256i acc, __m256i lo, __m256i xl, __m256i hi, __m256i xh) {
#if defined(__AVXVNNI__)
    acc = _mm256_dpbusd_avx_epi32(acc, lo, xl);
    return _mm256_dpbusd_avx_epi32(acc, hi, xh);
#else
    // u4 * s8 pair sums: |2 * 2 * 15 * 127| = 7620 cannot saturate int16
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

// One subtile (2 ymm halves) x R rows.
static inline __attribute__((always_inline)) void k256(const struct coopt_gptq_weight *w,
                                                       const struct gptq_act *a, int64_t r0, int64_t t0,
                                                       float *out, const int R) {
    const int64_t   n_oct = w->k_pad / 8, G = w->n_groups, kp = w->k_pad;
    const __m256i   m4 = _mm256_set1_epi8(0x0f);
    const uint32_t *qw = w->qw + t0 * n_oct * SUB;
    __m256          acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint16_t *sp = w->scale + (t0 * G + g) * SUB;
        __m256          s[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sp)),
                                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sp + 8)))};
        for (int64_t b = w->grp_blk[g]; b < w->grp_blk[g + 1]; b++) {
            __m256i ia[4][2];
            for (int r = 0; r < R; r++) ia[r][0] = ia[r][1] = _mm256_setzero_si256();
            for (int oc = 0; oc < 4; oc++) {
                __m256i lo[2], hi[2];
                for (int h = 0; h < 2; h++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(qw + (b * 4 + oc) * SUB + h * 8));
                    lo[h] = _mm256_and_si256(v, m4);
                    hi[h] = _mm256_and_si256(_mm256_srli_epi32(v, 4), m4);
                }
                for (int r = 0; r < R; r++) {
                    const int8_t *xo = a->xq + (r0 + r) * kp + b * BLK + oc * 8;
                    int32_t       xl, xh;
                    memcpy(&xl, xo, 4);
                    memcpy(&xh, xo + 4, 4);
                    __m256i vl = _mm256_set1_epi32(xl), vh = _mm256_set1_epi32(xh);
                    for (int h = 0; h < 2; h++) ia[r][h] = dot_u4s8(ia[r][h], lo[h], vl, hi[h], vh);
                }
            }
            for (int r = 0; r < R; r++) {
                __m256 d = _mm256_set1_ps(a->xd[(r0 + r) * a->nblk + b]);
                for (int h = 0; h < 2; h++)
                    acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r][h]), _mm256_mul_ps(s[h], d), acc[r][h]);
            }
        }
        const uint8_t *zp = w->zero + (t0 * G + g) * SUB;
        for (int h = 0; h < 2; h++) {
            __m128i zb = _mm_loadl_epi64((const __m128i *)(zp + h * 8));
            __m256  sz = _mm256_mul_ps(s[h], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(zb)));
            for (int r = 0; r < R; r++)
                acc[r][h] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(a->S[(r0 + r) * G + g]), acc[r][h]);
        }
    }
    for (int r = 0; r < R; r++) {
        int64_t o = t0 * SUB, left = w->n_out - o;
        float  *dst = out + (r0 + r) * w->n_out + o;
        if (left >= SUB && !a->bias && !a->add) {
            _mm256_storeu_ps(dst, acc[r][0]);
            _mm256_storeu_ps(dst + 8, acc[r][1]);
        } else {
            float tmp[SUB];
            _mm256_storeu_ps(tmp, acc[r][0]);
            _mm256_storeu_ps(tmp + 8, acc[r][1]);
            for (int64_t j = 0; j < COOPT_MIN(left, (int64_t)SUB); j++) dst[j] = store_val(a, &dst[j], o + j, tmp[j]);
        }
    }
}

static void k256_1(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r0, int64_t t0, float *out) { k256(w, a, r0, t0, out, 1); }
static void k256_2(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r0, int64_t t0, float *out) { k256(w, a, r0, t0, out, 2); }
static void k256_3(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r0, int64_t t0, float *out) { k256(w, a, r0, t0, out, 3); }
static void k256_4(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r0, int64_t t0, float *out) { k256(w, a, r0, t0, out, 4); }

static void run256(const struct coopt_gptq_weight *w, const struct gptq_act *a, int64_t r0, int nr,
                   int64_t t_lo, int64_t t_hi, float *out) {
    static void (*const fns[5])(const struct coopt_gptq_weight *, const struct gptq_act *, int64_t, int64_t, float *) = {
        NULL, k256_1, k256_2, k256_3, k256_4};
    for (int64_t t = t_lo; t < t_hi; t++) {
        int done = 0;
        while (done < nr) {
            int n = COOPT_MIN(4, nr - done);
            fns[n](w, a, r0 + done, t, out);
            done += n;
        }
    }
}
#endif

// ---- dispatch ----

bool coopt_gptq_isa_available(enum coopt_gptq_isa isa) {
    switch (isa) {
    case COOPT_GPTQ_ISA_AUTO:
    case COOPT_GPTQ_ISA_SCALAR: return true;
    case COOPT_GPTQ_ISA_AVX2: return GPTQ_HAVE_AVX2;
    case COOPT_GPTQ_ISA_AVX512VNNI: return GPTQ_HAVE_AVX512;
    }
    return false;
}

static enum coopt_gptq_isa isa_resolve(enum coopt_gptq_isa isa) {
    if (isa == COOPT_GPTQ_ISA_AUTO || !coopt_gptq_isa_available(isa))
        isa = GPTQ_HAVE_AVX512 ? COOPT_GPTQ_ISA_AVX512VNNI : GPTQ_HAVE_AVX2 ? COOPT_GPTQ_ISA_AVX2 : COOPT_GPTQ_ISA_SCALAR;
    return isa;
}

// Prepared activations of n_rows rows in one buffer: xq [n_rows][k_pad], xd [n_rows][nblk], S [n_rows][n_groups].
size_t coopt_gptq_act_bytes(const struct coopt_gptq_weight *w, int32_t n_rows) {
    size_t bytes = (size_t)n_rows * ((size_t)w->k_pad + 4 * (size_t)(w->k_pad / BLK) + 4 * (size_t)w->n_groups);
    return (bytes + 63) & ~(size_t)63;
}

static struct gptq_act act_view(const struct coopt_gptq_weight *w, const void *buf, int32_t n_rows) {
    struct gptq_act a = {0};
    a.nblk            = w->k_pad / BLK;
    a.xq              = (int8_t *)buf;
    a.xd              = (float *)((char *)buf + (size_t)n_rows * (size_t)w->k_pad);
    a.S               = a.xd + (size_t)n_rows * (size_t)a.nblk;
    return a;
}

bool coopt_gptq_act_shared(const struct coopt_gptq_weight *a, const struct coopt_gptq_weight *b) {
    if (a == b) return true;
    if (a->perm || b->perm) return false; // act-order: each weight has its own row order
    return a->n_in == b->n_in && a->k_pad == b->k_pad && a->n_groups == b->n_groups &&
           memcmp(a->grp_blk, b->grp_blk, ((size_t)a->n_groups + 1) * sizeof(*a->grp_blk)) == 0;
}

void coopt_gptq_act_prepare(const struct coopt_gptq_weight *w, const float *x, int32_t n_rows, int32_t r_lo,
                            int32_t r_hi, void *buf, enum coopt_gptq_isa isa) {
    isa                = isa_resolve(isa);
    struct gptq_act a  = act_view(w, buf, n_rows);
    void (*quant)(const struct coopt_gptq_weight *, const float *, int8_t *, float *, float *) = quantize_row;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    if (isa != COOPT_GPTQ_ISA_SCALAR) quant = quantize_row_avx512; // the scalar isa keeps checking quantize_row
#endif
    for (int64_t r = r_lo; r < r_hi; r++)
        quant(w, x + r * w->n_in, a.xq + r * w->k_pad, a.xd + r * a.nblk, a.S + r * w->n_groups);
}

#define ROW_BLOCK 8 // rows per weight-tile pass in prefill

void coopt_gptq_run(const struct coopt_gptq_weight *w, const void *act, int32_t n_rows, int64_t t_lo, int64_t t_hi,
                    float *out, const float *bias, bool add, enum coopt_gptq_isa isa) {
    isa               = isa_resolve(isa);
    struct gptq_act a = act_view(w, act, n_rows);
    a.bias            = bias;
    a.add             = add;
    // Subtile panels of a few subtiles outermost so their weights stay in L2 over all row blocks.
    const int64_t panel = n_rows > ROW_BLOCK ? 4 : t_hi - t_lo;
    for (int64_t p = t_lo; p < t_hi; p += panel) {
        int64_t p_hi = COOPT_MIN(t_hi, p + panel);
        for (int64_t r0 = 0; r0 < n_rows; r0 += ROW_BLOCK) {
            int nr = (int)COOPT_MIN(ROW_BLOCK, n_rows - r0);
            switch (isa) {
#if GPTQ_HAVE_AVX512
            case COOPT_GPTQ_ISA_AVX512VNNI: run512(w, &a, r0, nr, p, p_hi, out); break;
#endif
#if GPTQ_HAVE_AVX2
            case COOPT_GPTQ_ISA_AVX2: run256(w, &a, r0, nr, p, p_hi, out); break;
#endif
            default: kernel_scalar(w, &a, r0, nr, p, p_hi, out); break;
            }
        }
    }
}

int64_t coopt_gptq_chunk(const struct coopt_gptq_weight *w, int32_t nth) {
    // ~4 chunks per thread, each a multiple of 4 subtiles (the widest kernel's width)
    return COOPT_MAX((int64_t)4, (w->n_sub + 4 * nth - 1) / (4 * nth) + 3) / 4 * 4;
}

struct gptq_task {
    const struct coopt_gptq_weight *w;
    const void                     *act;
    float                          *out;
    int32_t                         n_rows;
    enum coopt_gptq_isa             isa;
    int64_t                         chunk, n_chunks; // subtiles per claimed chunk, chunk count
    atomic_int_fast64_t             next;            // next chunk to claim
};

// Threads claim contiguous chunks of subtiles from an atomic counter, so a thread slowed by
// another process does not hold the call back by more than one chunk.
static void gptq_task_fn(void *ctx, int32_t ith, int32_t nth) {
    (void)ith, (void)nth;
    struct gptq_task *k = ctx;
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&k->next, 1, memory_order_relaxed);
        if (c >= k->n_chunks) break;
        int64_t t0 = c * k->chunk;
        coopt_gptq_run(k->w, k->act, k->n_rows, t0, COOPT_MIN(k->w->n_sub, t0 + k->chunk), k->out, NULL, false, k->isa);
    }
}

enum coopt_status coopt_gptq_matmul_cpu_isa(struct coopt_threadpool *tp, float *out, const float *x,
                                            const struct coopt_gptq_weight *w, int32_t n_rows,
                                            enum coopt_gptq_isa isa) {
    if (n_rows <= 0) return COOPT_OK;
    isa = isa_resolve(isa);
    // Scratch: a stack buffer covers decode of every model we target; prefill allocates (its cost
    // is amortized over n_rows * n_out * n_in work).
    size_t need = coopt_gptq_act_bytes(w, n_rows);
    _Alignas(64) unsigned char stack[32768];
    unsigned char *buf = need <= sizeof(stack) ? stack : coopt_malloc(need);
    if (!buf) return COOPT_ERR_NOMEM;
    coopt_gptq_act_prepare(w, x, n_rows, 0, n_rows, buf, isa);
    int32_t          nth  = tp ? coopt_threadpool_n_threads(tp) : 1;
    struct gptq_task task = {w, buf, out, n_rows, isa, coopt_gptq_chunk(w, nth), 0, 0};
    task.n_chunks         = (w->n_sub + task.chunk - 1) / task.chunk;
    atomic_init(&task.next, 0);
    if (tp && nth > 1 && task.n_chunks > 1)
        coopt_threadpool_run(tp, gptq_task_fn, &task);
    else
        gptq_task_fn(&task, 0, 1);
    if (buf != stack) free(buf);
    return COOPT_OK;
}

enum coopt_status coopt_gptq_matmul_cpu(struct coopt_threadpool *tp, float *out, const float *x,
                                        const struct coopt_gptq_weight *w, int32_t n_rows) {
    return coopt_gptq_matmul_cpu_isa(tp, out, x, w, n_rows, COOPT_GPTQ_ISA_AUTO);
}

void coopt_gptq_matmul_ref(float *out, const float *x, const struct coopt_gptq_weight *w, int32_t n_rows) {
    float *wd = coopt_malloc((size_t)w->n_out * (size_t)w->n_in * sizeof(float));
    COOPT_ASSERT(wd); // reference for tests only
    coopt_gptq_dequant_ref(w, wd);
    for (int32_t r = 0; r < n_rows; r++) {
        for (int64_t o = 0; o < w->n_out; o++) {
            double acc = 0.0;
            for (int64_t i = 0; i < w->n_in; i++) acc += (double)wd[o * w->n_in + i] * x[(int64_t)r * w->n_in + i];
            out[(int64_t)r * w->n_out + o] = (float)acc;
        }
    }
    free(wd);
}
