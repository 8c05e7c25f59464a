/*
 * attn_cpu.c -- fast paged grouped-query attention on the CPU (Opt-GQA + Opt-Pa read path).
 *
 * Work items. A token attends to positions [lo, pos] (lo > 0 only with a sliding window). When
 * be->attn_partition = P > 0 and that range is longer than P, it is split into partitions of P
 * positions starting at lo (split-K, flash-decoding). One work item is (token, unit, partition):
 * a unit is a KV head with all group = n_heads / n_kv_heads query heads that share it (Opt-GQA:
 * ONE read of each K and V row serves the whole group), or, with be->attn_per_head (the ablation
 * baseline), a single query head that streams its KV head's rows by itself. Threads take items
 * from an atomic counter, so one decoding sequence with 8 KV heads at 16k context is 8 * 32 items
 * that both cores share, and a prefill token at position 300 next to a decode token at position 3
 * balances too.
 *
 * A partition produces, per query head, its max score m, its sum l of exp(s - m) and the
 * unnormalized accumulator acc = sum exp(s - m) * v. Partials go to the backend's attention
 * scratch; the thread that finishes a unit's LAST partition (an acq_rel counter per unit) merges
 * them with the log-sum-exp reduction: M = max m_p, out = sum_p e^(m_p - M) acc_p / sum_p
 * e^(m_p - M) l_p. An unsplit token writes acc / l directly. Split-K and single pass differ only
 * by f32 reassociation (the same scores; other rescale points of the online softmax).
 *
 * Scratch. The work plan ([n_tokens] item offsets, partition counts, partial slots) and the
 * partials ([split tokens][partitions][n_heads][head_dim + 16] f32 plus one counter per unit) live
 * in one buffer per backend that only grows. A batch whose partials would exceed ATTN_WAVE_BYTES
 * runs in several waves of whole tokens (one pool dispatch each), so the buffer is bounded by
 * n_tokens * 40 bytes + max(ATTN_WAVE_BYTES, one token's partials); steady-state decode allocates
 * nothing.
 *
 * Kernel (AVX-512, head_dim a multiple of 16 up to 256). Positions are processed in blocks of up
 * to ATTN_BLOCK rows that may span pages. Scores: each K row is converted in registers (F16 by
 * vcvtph2ps from memory; FP8 by three integer ops into an exactly scaled f32, see cvt16 and
 * FP8_PRE -- the FP8 -> f16 -> f32 route made FP8 slower than F16) and multiplied with the
 * group's query rows into one 16-lane partial per head; 16 such partials are reduced together by a transposing
 * tree (hsum16x16), so there is no horizontal sum per row. Then one online-softmax update per block
 * and head. Values: the accumulator tile (heads x columns) stays in registers across the block's V
 * rows, each V chunk converted once per tile. The FP8 per-row scales multiply the scores (K) and
 * the probabilities (V), never the rows. Every query head sees the same sequence of f32 operations
 * whether it is processed with its group or alone, so grouped and per-head reads give bit-identical
 * results. Other shapes and CPUs use the generic path (row buffer, dot, axpy), which computes the
 * same thing.
 *
 * Work per (KV head, position) at group G: 2 * G * head_dim / 16 FMAs against 2 * head_dim *
 * elem_bytes bytes, so on a CPU grouped attention with G >= 4 is bounded by FMA throughput before
 * DRAM bandwidth for 1-byte (FP8) rows (see dev/bench_attn.c).
 */
#include "cpu/ops_cpu.h"
#include "cpu/simd.h"

#include "dtype.h"
#include "util.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#define ATTN_BLOCK      64         // rows per online-softmax update (may span pages)
#define ATTN_MAX_HD     512
#define ATTN_MAX_G      64         // query heads per KV head
#define ATTN_MAX_ACC    8192       // group * head_dim
#define ATTN_FAST_MAX_HD 256       // fast kernel: head_dim % 16 == 0 and <= this
#define ATTN_PART_HDR   16         // floats before acc in a partial: m, l, padding to 64 bytes
#define ATTN_WAVE_BYTES (16u << 20) // partials per wave (soft: a wave holds at least one token)

#define AI static inline __attribute__((always_inline))

// One unit of one token over positions [lo, hi): writes m[gn], l[gn], acc[gn][hd] (unnormalized).
struct attn_ctx;
typedef void range_fn(const struct attn_ctx *a, int32_t t, int32_t kh, int32_t g0, int32_t gn, int32_t lo,
                      int32_t hi, float *m, float *l, float *acc);

struct attn_ctx {
    float                       *out;
    const float                 *q;
    int32_t                      n_heads, group, hd;
    int32_t                      n_units, unit_heads; // units per token and query heads per unit
    const struct coopt_kv_cache *kv;
    int32_t                      layer;
    const struct coopt_batch    *b;
    float                        scale;
    int32_t                      part;                // partition length, 0 = none
    range_fn                    *range;
    // the plan, for the whole batch
    const int64_t *item_end; // [n_tokens] exclusive prefix sum of items
    const int32_t *n_parts;  // [n_tokens]
    const int64_t *pslot;    // [n_tokens] first partial slot (within the wave) of a split token, -1
    // the current wave: tokens [t0, t1), items [i0, i1)
    int32_t             t0, t1;
    int64_t             i0, i1;
    float              *partial; // [slots][n_heads][hd + ATTN_PART_HDR]
    atomic_int         *done;    // [slots / parts...] finished partitions per (split token, unit)
    const int64_t      *cslot;   // [n_tokens] first counter of a split token (within the wave)
    atomic_int_fast64_t next;
};

// First position a token attends to.
static int32_t range_lo(const struct coopt_batch *b, int32_t t) {
    return b->window > 0 ? COOPT_MAX(0, b->pos[t] - b->window + 1) : 0;
}

// ---- generic path (any head_dim, any CPU) ----

// Row factor that turns the values produced by load_row into real values (FP8 scale, and the
// 2^8 of the E4M3-as-f16 trick; see simd.h).
static float row_factor(const struct coopt_kv_layout *l, const uint8_t *scales, int32_t r) {
    if (!scales) return 1.0f;
    float s;
    memcpy(&s, scales + (size_t)r * sizeof(float), sizeof(s));
#if defined(__AVX512F__)
    if (l->dtype == COOPT_DTYPE_FP8_E4M3) s *= COOPT_FP8_E4M3_F16_FACTOR;
#endif
    return s;
}

// Converts one cached row (head_dim elements of the cache type at src) to f32 in dst, up to the
// factor of row_factor().
static void load_row(const struct coopt_kv_layout *l, const uint8_t *src, float *dst) {
    int32_t hd = l->head_dim;
#if defined(__AVX512F__)
    for (int32_t i = 0; i < hd; i += 16) {
        __mmask16 m = simd_mask16(hd - i);
        __m512    v;
        switch (l->dtype) {
        case COOPT_DTYPE_F16: v = simd_load_f16((const uint16_t *)src + i, m); break;
        case COOPT_DTYPE_BF16: v = simd_load_bf16((const uint16_t *)src + i, m); break;
        case COOPT_DTYPE_FP8_E4M3: v = simd_load_e4m3(src + i, m); break;
        case COOPT_DTYPE_FP8_E5M2: v = simd_load_e5m2(src + i, m); break;
        default: v = simd_load_f32((const float *)src + i, m); break;
        }
        _mm512_mask_storeu_ps(dst + i, m, v);
    }
#else
    coopt_dequant_row(l->dtype, src, dst, hd);
#endif
}

static float dot_f32(const float *a, const float *b, int32_t n) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int32_t i = 0; i < n; i += 16) {
        __mmask16 m = simd_mask16(n - i);
        acc         = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0;
    for (int32_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
#endif
}

// y += a * x
static void axpy_f32(float *y, float a, const float *x, int32_t n) {
#if defined(__AVX512F__)
    __m512 av = _mm512_set1_ps(a);
    for (int32_t i = 0; i < n; i += 16) {
        __mmask16 m = simd_mask16(n - i);
        _mm512_mask_storeu_ps(y + i, m,
                              _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
#else
    for (int32_t i = 0; i < n; i++) y[i] += a * x[i];
#endif
}

// y *= a
static void scale_f32(float *y, float a, int32_t n) {
    for (int32_t i = 0; i < n; i++) y[i] *= a;
}

// s[i] = exp(s[i] - mx); returns the sum.
static float exp_sum(float *s, int32_t n, float mx) {
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(mx);
    for (int32_t i = 0; i < n; i += 16) {
        __mmask16 m = simd_mask16(n - i);
        __m512    e = simd_exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), mv));
        _mm512_mask_storeu_ps(s + i, m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
#else
    float sum = 0;
    for (int32_t i = 0; i < n; i++) {
        s[i] = expf(s[i] - mx);
        sum += s[i];
    }
    return sum;
#endif
}

static void range_generic(const struct attn_ctx *a, int32_t t, int32_t kh, int32_t g0, int32_t gn, int32_t lo,
                          int32_t hi, float *m, float *lsum, float *acc) {
    const struct coopt_kv_layout *l    = &a->kv->layout;
    const struct coopt_batch     *b    = a->b;
    const int32_t                 hd   = l->head_dim, ps = l->page_size;
    const uint8_t                *pool = a->kv->pool;
    _Alignas(64) float sc[ATTN_MAX_G][ATTN_BLOCK];
    _Alignas(64) float row[ATTN_MAX_HD];
    const float *q = a->q + ((size_t)t * a->n_heads + (size_t)kh * a->group + g0) * hd; // [gn][hd]
    const int32_t s = b->tok_seq[t];
    for (int32_t p = lo; p < hi;) {
        int32_t page = b->block_tables[(size_t)s * b->max_blocks + p / ps];
        COOPT_ASSERT(page >= 0); // a released page inside the attended range is a scheduler bug
        int32_t        row0      = p % ps;
        int32_t        nr        = COOPT_MIN(COOPT_MIN(ps - row0, hi - p), ATTN_BLOCK);
        const uint8_t *kp        = pool + coopt_kv_offset(l, page, a->layer, 0, kh, row0);
        const uint8_t *vp        = pool + coopt_kv_offset(l, page, a->layer, 1, kh, row0);
        const uint8_t *ks        = l->has_scales ? pool + coopt_kv_scale_offset(l, page, a->layer, 0, kh, row0) : NULL;
        const uint8_t *vs        = l->has_scales ? pool + coopt_kv_scale_offset(l, page, a->layer, 1, kh, row0) : NULL;
        size_t         row_bytes = (size_t)hd * l->elem_bytes;
        for (int32_t r = 0; r < nr; r++) {
            load_row(l, kp + (size_t)r * row_bytes, row);
            float f = row_factor(l, ks, r) * a->scale;
            for (int32_t g = 0; g < gn; g++) sc[g][r] = dot_f32(q + (size_t)g * hd, row, hd) * f;
        }
        for (int32_t g = 0; g < gn; g++) {
            float cm = sc[g][0];
            for (int32_t r = 1; r < nr; r++) cm = fmaxf(cm, sc[g][r]);
            float mn = fmaxf(m[g], cm);
            if (m[g] != mn) {
                float alpha = expf(m[g] - mn); // 0 on the first block (m = -inf)
                lsum[g] *= alpha;
                scale_f32(acc + (size_t)g * hd, alpha, hd);
                m[g] = mn;
            }
            lsum[g] += exp_sum(sc[g], nr, mn);
        }
        for (int32_t r = 0; r < nr; r++) {
            load_row(l, vp + (size_t)r * row_bytes, row);
            float f = row_factor(l, vs, r);
            for (int32_t g = 0; g < gn; g++) axpy_f32(acc + (size_t)g * hd, sc[g][r] * f, row, hd);
        }
        p += nr;
    }
}

// ---- fast path (AVX-512, head_dim % 16 == 0) ----

#if defined(__AVX512F__)

AI size_t elem_size(enum coopt_dtype dt) {
    return dt == COOPT_DTYPE_F32 ? 4 : (dt == COOPT_DTYPE_F16 || dt == COOPT_DTYPE_BF16) ? 2 : 1;
}

// 16 cached elements at p -> f32 lanes. FP8 is decoded with integer ops only: the sign-extended
// byte shifted so that its exponent and mantissa bits land in the f32 exponent and mantissa
// fields is exactly the value times 2^-FP8_BIAS_SHIFT (E4M3: s.eeee.mmm -> s.0000eeee.mmm0...,
// bias 7 instead of 127, so 2^-120; E5M2: 2^-112). Subnormals come out as f32 denormals with the
// same factor, so the decoding is exact. The factor is folded into the query and the V weights
// (see fp8_pre), never into the rows.
AI __m512 cvt16(enum coopt_dtype dt, const uint8_t *p) {
    switch (dt) {
    case COOPT_DTYPE_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    case COOPT_DTYPE_BF16:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    case COOPT_DTYPE_FP8_E4M3: {
        __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
        return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(w, 20), _mm512_set1_epi32((int)0x87f00000u)));
    }
    case COOPT_DTYPE_FP8_E5M2: {
        __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
        return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(w, 21), _mm512_set1_epi32((int)0x8fe00000u)));
    }
    default: return _mm512_loadu_ps((const float *)p);
    }
}

// FP8 rows decode to value * 2^-shift (shift 120 for E4M3, 112 for E5M2). The query is scaled
// by 2^FP8_PRE and the V weights by 2^FP8_PRE, so products q*k and p*v are the true ones times
// 2^(FP8_PRE - shift) -- normal f32 unless |q k| or |p v| < 2^(-126 + shift - FP8_PRE) (< 2^-96:
// terms far below the f32 resolution of any sum they enter); the K row factor and the final
// accumulator multiply by 2^(shift - FP8_PRE). Needs |q| and the row scales below 2^(128 -
// FP8_PRE) = 2^38, checked on q.
#define FP8_PRE 90
AI int fp8_shift(enum coopt_dtype dt) { return dt == COOPT_DTYPE_FP8_E4M3 ? 120 : 112; }

// Lane i of the result = sum of the 16 lanes of v[i] (a transposing reduction tree).
AI __m512 hsum16x16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    // lane 4k + m of d holds v[4m + k]
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(idx, d);
}

// Score partials of one K row for gb query heads: part[g] = 16-lane partial of q[g] . k.
// Two chains per head (even and odd chunks) halve the FMA latency per row; the same order for
// every gb, so grouped and per-head reads give bit-identical scores.
AI void k_row(enum coopt_dtype dt, int gb, int32_t nc, const uint8_t *k, const float *q, int32_t hd,
              __m512 *part) {
    __m512 a0[8], a1[8];
    for (int g = 0; g < gb; g++) a0[g] = a1[g] = _mm512_setzero_ps();
    int32_t c = 0;
    for (; c + 2 <= nc; c += 2) {
        __m512 k0 = cvt16(dt, k + (size_t)c * 16 * elem_size(dt));
        __m512 k1 = cvt16(dt, k + (size_t)(c + 1) * 16 * elem_size(dt));
        for (int g = 0; g < gb; g++) {
            a0[g] = _mm512_fmadd_ps(k0, _mm512_loadu_ps(q + (size_t)g * hd + c * 16), a0[g]);
            a1[g] = _mm512_fmadd_ps(k1, _mm512_loadu_ps(q + (size_t)g * hd + c * 16 + 16), a1[g]);
        }
    }
    if (c < nc) {
        __m512 k0 = cvt16(dt, k + (size_t)c * 16 * elem_size(dt));
        for (int g = 0; g < gb; g++) a0[g] = _mm512_fmadd_ps(k0, _mm512_loadu_ps(q + (size_t)g * hd + c * 16), a0[g]);
    }
    for (int g = 0; g < gb; g++) part[g * 16] = _mm512_add_ps(a0[g], a1[g]);
}

// acc[g][c0*16 .. (c0+tw)*16) += sum_r p[g][r] * v_r, for gb heads and tw 16-column chunks.
AI void v_tile(enum coopt_dtype dt, int gb, int tw, int32_t nr, const uint8_t *const *vrow, int32_t c0,
               const float (*p)[ATTN_BLOCK], float *acc, int32_t hd) {
    __m512 a[4][8];
    for (int g = 0; g < gb; g++)
        for (int j = 0; j < tw; j++) a[g][j] = _mm512_load_ps(acc + (size_t)g * hd + (c0 + j) * 16);
    for (int32_t r = 0; r < nr; r++) {
        __m512 v[8];
        for (int j = 0; j < tw; j++) v[j] = cvt16(dt, vrow[r] + (size_t)(c0 + j) * 16 * elem_size(dt));
        for (int g = 0; g < gb; g++) {
            __m512 pg = _mm512_set1_ps(p[g][r]);
            for (int j = 0; j < tw; j++) a[g][j] = _mm512_fmadd_ps(pg, v[j], a[g][j]);
        }
    }
    for (int g = 0; g < gb; g++)
        for (int j = 0; j < tw; j++) _mm512_store_ps(acc + (size_t)g * hd + (c0 + j) * 16, a[g][j]);
}

// All columns for gb (1, 2 or 4) heads: tiles of up to 16 / gb chunks (at most 8).
AI void v_heads(enum coopt_dtype dt, int gb, int32_t nr, const uint8_t *const *vrow, int32_t nc,
                const float (*p)[ATTN_BLOCK], float *acc, int32_t hd) {
    const int tmax = gb == 4 ? 4 : 8;
    int32_t   c    = 0;
    for (; c + tmax <= nc; c += tmax) v_tile(dt, gb, tmax, nr, vrow, c, p, acc, hd);
    if (nc - c >= 4 && tmax > 4) v_tile(dt, gb, 4, nr, vrow, c, p, acc, hd), c += 4;
    if (nc - c >= 2) v_tile(dt, gb, 2, nr, vrow, c, p, acc, hd), c += 2;
    if (nc - c >= 1) v_tile(dt, gb, 1, nr, vrow, c, p, acc, hd), c += 1;
}

// Requests the K and V rows (and FP8 scales) of positions [lo, hi) of KV head kh into the cache.
// A sequence's rows are contiguous only within a page (page_size rows of one (layer, K/V, head)),
// so without this the hardware prefetcher sees short runs and decode attention waits on DRAM
// latency run after run (dev/prof_decode.c, tinyllama at contexts 32-182: 333 -> 250 us of
// attention per token).
static void attn_prefetch_block(const struct attn_ctx *a, int32_t s, int32_t kh, int32_t lo, int32_t hi, size_t rb,
                                bool fp8) {
    const struct coopt_kv_layout *l    = &a->kv->layout;
    const struct coopt_batch     *b    = a->b;
    const uint8_t                *pool = a->kv->pool;
    const int32_t                 ps   = l->page_size;
    for (int32_t pos = lo; pos < hi;) {
        int32_t page = b->block_tables[(size_t)s * b->max_blocks + pos / ps];
        int32_t row = pos % ps, n = COOPT_MIN(ps - row, hi - pos);
        pos += n;
        if (page < 0) continue; // range_fast asserts on it
        for (int kv = 0; kv < 2; kv++) {
            const char *p0 = (const char *)pool + coopt_kv_offset(l, page, a->layer, kv, kh, row);
            for (size_t off = 0; off < (size_t)n * rb; off += 64) _mm_prefetch(p0 + off, _MM_HINT_T0);
            _mm_prefetch(p0 + (size_t)n * rb - 1, _MM_HINT_T0);
            if (fp8) {
                const char *sp = (const char *)pool + coopt_kv_scale_offset(l, page, a->layer, kv, kh, row);
                _mm_prefetch(sp, _MM_HINT_T0);
                _mm_prefetch(sp + (size_t)n * sizeof(float) - 1, _MM_HINT_T0);
            }
        }
    }
}

AI void range_fast(enum coopt_dtype dt, const struct attn_ctx *a, int32_t t, int32_t kh, int32_t g0, int32_t gn,
                   int32_t lo, int32_t hi, float *m, float *lsum, float *acc) {
    const struct coopt_kv_layout *l    = &a->kv->layout;
    const struct coopt_batch     *b    = a->b;
    const int32_t                 hd   = l->head_dim, ps = l->page_size, nc = hd / 16;
    const uint8_t                *pool = a->kv->pool;
    const size_t                  rb   = (size_t)hd * elem_size(dt);
    const bool                    fp8  = dt == COOPT_DTYPE_FP8_E4M3 || dt == COOPT_DTYPE_FP8_E5M2;
    const float                   pre  = fp8 ? ldexpf(1.0f, FP8_PRE) : 1.0f;                 // q and V weights
    const float                   post = fp8 ? ldexpf(1.0f, fp8_shift(dt) - FP8_PRE) : 1.0f; // K factor, acc
    const float                  *q    = a->q + ((size_t)t * a->n_heads + (size_t)kh * a->group + g0) * hd;
    const int32_t                 s    = b->tok_seq[t];

    _Alignas(64) float qs[ATTN_MAX_ACC]; // FP8: q * 2^FP8_PRE
    if (fp8) {
        // vector max (a scalar fmaxf loop is a libm call per element, ~2 us per call at G 8,
        // hd 64); a NaN in q is ignored as fmaxf would: vmaxps returns its second operand
        __m512 qm = _mm512_setzero_ps(), pv = _mm512_set1_ps(pre);
        for (int32_t i = 0; i < gn * hd; i += 16) { // gn * hd is a multiple of 16 (hd is)
            __m512 v = _mm512_loadu_ps(q + i);
            _mm512_store_ps(qs + i, _mm512_mul_ps(v, pv));
            qm = _mm512_max_ps(_mm512_abs_ps(v), qm);
        }
        float qmax = _mm512_reduce_max_ps(qm);
        COOPT_ASSERT(!(qmax >= 0x1p37f)); // see FP8_PRE
        q = qs;
    }

    _Alignas(64) float   sc[ATTN_MAX_G][ATTN_BLOCK]; // scores, then probabilities times the V factor
    _Alignas(64) __m512  part[ATTN_MAX_G * 16];      // [g][16 rows] score partials
    _Alignas(64) float   kf[ATTN_BLOCK], vf[ATTN_BLOCK];
    const uint8_t       *krow[ATTN_BLOCK], *vrow[ATTN_BLOCK];

    attn_prefetch_block(a, s, kh, lo, COOPT_MIN(hi, lo + ATTN_BLOCK), rb, fp8);
    for (int32_t p = lo; p < hi;) {
        const int32_t nr = COOPT_MIN(ATTN_BLOCK, hi - p);
        // the next block's rows are requested now and arrive while this block is computed
        if (p + nr < hi) attn_prefetch_block(a, s, kh, p + nr, COOPT_MIN(hi, p + nr + ATTN_BLOCK), rb, fp8);
        // row pointers and factors of the block, page by page
        for (int32_t r = 0; r < nr;) {
            int32_t pos  = p + r;
            int32_t page = b->block_tables[(size_t)s * b->max_blocks + pos / ps];
            COOPT_ASSERT(page >= 0); // a released page inside the attended range is a scheduler bug
            int32_t        row = pos % ps, n = COOPT_MIN(ps - row, nr - r);
            const uint8_t *kp  = pool + coopt_kv_offset(l, page, a->layer, 0, kh, row);
            const uint8_t *vp  = pool + coopt_kv_offset(l, page, a->layer, 1, kh, row);
            if (fp8) {
                const float *ks = (const float *)(pool + coopt_kv_scale_offset(l, page, a->layer, 0, kh, row));
                const float *vs = (const float *)(pool + coopt_kv_scale_offset(l, page, a->layer, 1, kh, row));
                for (int32_t i = 0; i < n; i++) kf[r + i] = ks[i] * post * a->scale, vf[r + i] = vs[i] * pre;
            } else {
                for (int32_t i = 0; i < n; i++) kf[r + i] = a->scale, vf[r + i] = 1.0f;
            }
            for (int32_t i = 0; i < n; i++) krow[r + i] = kp + (size_t)i * rb, vrow[r + i] = vp + (size_t)i * rb;
            r += n;
        }
        for (int32_t r = nr; r < ((nr + 15) & ~15); r++) kf[r] = vf[r] = 0; // lanes past the block
        // scores: 16 rows at a time, reduced together
        for (int32_t r0 = 0; r0 < nr; r0 += 16) {
            const int32_t n16 = COOPT_MIN(16, nr - r0);
            for (int32_t r = 0; r < n16; r++) {
                const uint8_t *k = krow[r0 + r];
                int32_t        g = 0;
                for (; g + 8 <= gn; g += 8) k_row(dt, 8, nc, k, q + (size_t)g * hd, hd, part + g * 16 + r);
                switch (gn - g) {
                case 7: k_row(dt, 7, nc, k, q + (size_t)g * hd, hd, part + g * 16 + r); break;
                case 6: k_row(dt, 6, nc, k, q + (size_t)g * hd, hd, part + g * 16 + r); break;
                case 5: k_row(dt, 5, nc, k, q + (size_t)g * hd, hd, part + g * 16 + r); break;
                case 4: k_row(dt, 4, nc, k, q + (size_t)g * hd, hd, part + g * 16 + r); break;
                case 3: k_row(dt, 3, nc, k, q + (size_t)g * hd, hd, part + g * 16 + r); break;
                case 2: k_row(dt, 2, nc, k, q + (size_t)g * hd, hd, part + g * 16 + r); break;
                case 1: k_row(dt, 1, nc, k, q + (size_t)g * hd, hd, part + g * 16 + r); break;
                default: break;
                }
            }
            for (int32_t r = n16; r < 16; r++)
                for (int32_t g = 0; g < gn; g++) part[g * 16 + r] = _mm512_setzero_ps();
            const __m512 f = _mm512_loadu_ps(kf + r0);
            for (int32_t g = 0; g < gn; g++) _mm512_store_ps(sc[g] + r0, _mm512_mul_ps(hsum16x16(part + g * 16), f));
        }
        // online softmax update, once per block and head
        for (int32_t g = 0; g < gn; g++) {
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int32_t r = 0; r < nr; r += 16) mx = _mm512_mask_max_ps(mx, simd_mask16(nr - r), mx, _mm512_load_ps(sc[g] + r));
            float mn = fmaxf(m[g], _mm512_reduce_max_ps(mx));
            if (m[g] != mn) {
                float alpha = expf(m[g] - mn); // 0 on the first block (m = -inf)
                lsum[g] *= alpha;
                __m512 av = _mm512_set1_ps(alpha);
                float *ag = acc + (size_t)g * hd;
                for (int32_t i = 0; i < hd; i += 16) _mm512_store_ps(ag + i, _mm512_mul_ps(_mm512_load_ps(ag + i), av));
                m[g] = mn;
            }
            __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(mn);
            for (int32_t r = 0; r < nr; r += 16) {
                __mmask16 mk = simd_mask16(nr - r);
                __m512    e  = _mm512_maskz_mov_ps(mk, simd_exp_ps(_mm512_sub_ps(_mm512_load_ps(sc[g] + r), mv)));
                sum          = _mm512_add_ps(sum, e);
                _mm512_store_ps(sc[g] + r, _mm512_mul_ps(e, _mm512_loadu_ps(vf + r)));
            }
            lsum[g] += _mm512_reduce_add_ps(sum);
        }
        // values: accumulator tiles in registers across the block
        int32_t g = 0;
        for (; g + 4 <= gn; g += 4) v_heads(dt, 4, nr, vrow, nc, (const float(*)[ATTN_BLOCK])(sc + g), acc + (size_t)g * hd, hd);
        if (gn - g >= 2) v_heads(dt, 2, nr, vrow, nc, (const float(*)[ATTN_BLOCK])(sc + g), acc + (size_t)g * hd, hd), g += 2;
        if (gn - g >= 1) v_heads(dt, 1, nr, vrow, nc, (const float(*)[ATTN_BLOCK])(sc + g), acc + (size_t)g * hd, hd), g += 1;
        p += nr;
    }
    if (fp8) scale_f32(acc, post, gn * hd);
}

#define RANGE_FAST(name, dt)                                                                                         \
    static void name(const struct attn_ctx *a, int32_t t, int32_t kh, int32_t g0, int32_t gn, int32_t lo, int32_t hi, \
                     float *m, float *l, float *acc) {                                                               \
        range_fast(dt, a, t, kh, g0, gn, lo, hi, m, l, acc);                                                         \
    }
RANGE_FAST(range_f32, COOPT_DTYPE_F32)
RANGE_FAST(range_f16, COOPT_DTYPE_F16)
RANGE_FAST(range_bf16, COOPT_DTYPE_BF16)
RANGE_FAST(range_e4m3, COOPT_DTYPE_FP8_E4M3)
RANGE_FAST(range_e5m2, COOPT_DTYPE_FP8_E5M2)

#endif // __AVX512F__

static range_fn *range_select(const struct coopt_kv_layout *l) {
#if defined(__AVX512F__)
    if (l->head_dim % 16 == 0 && l->head_dim <= ATTN_FAST_MAX_HD) {
        switch (l->dtype) {
        case COOPT_DTYPE_F32: return range_f32;
        case COOPT_DTYPE_F16: return range_f16;
        case COOPT_DTYPE_BF16: return range_bf16;
        case COOPT_DTYPE_FP8_E4M3: return range_e4m3;
        case COOPT_DTYPE_FP8_E5M2: return range_e5m2;
        default: break;
        }
    }
#endif
    return range_generic;
}

// ---- work items, partials and the merge ----

// Log-sum-exp merge of the n_parts partials of query heads [h0, h0 + n) of token t into out.
static void merge_heads(const struct attn_ctx *a, int32_t t, int32_t h0, int32_t n) {
    const int32_t hd = a->hd, np = a->n_parts[t];
    const size_t  stride = (size_t)hd + ATTN_PART_HDR, per_part = (size_t)a->n_heads * stride;
    const float  *base   = a->partial + (size_t)a->pslot[t] * per_part;
    for (int32_t h = h0; h < h0 + n; h++) {
        float mx = -INFINITY;
        for (int32_t p = 0; p < np; p++) mx = fmaxf(mx, base[p * per_part + h * stride]);
        float *o = a->out + ((size_t)t * a->n_heads + h) * hd;
        float  l = 0;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int32_t p = 0; p < np; p++) {
            const float *pp = base + p * per_part + h * stride;
            float        w  = expf(pp[0] - mx);
            l += w * pp[1];
            axpy_f32(o, w, pp + ATTN_PART_HDR, hd);
        }
        scale_f32(o, 1.0f / l, hd);
    }
}

static void run_item(struct attn_ctx *a, int64_t j) {
    // token of item j: the first t in [t0, t1) with item_end[t] > j
    int32_t lo_t = a->t0, hi_t = a->t1 - 1;
    while (lo_t < hi_t) {
        int32_t mid = (lo_t + hi_t) / 2;
        if (a->item_end[mid] > j) hi_t = mid;
        else lo_t = mid + 1;
    }
    const int32_t t     = lo_t;
    const int64_t first = t > 0 ? a->item_end[t - 1] : 0;
    const int32_t np    = a->n_parts[t];
    const int32_t u     = (int32_t)((j - first) / np), part = (int32_t)((j - first) % np);
    const int32_t G = a->group, gn = a->unit_heads;
    const int32_t kh = a->unit_heads == G ? u : u / G, g0 = a->unit_heads == G ? 0 : u % G;
    const int32_t lo = range_lo(a->b, t), pos = a->b->pos[t];
    const int32_t plo = np > 1 ? lo + part * a->part : lo;
    const int32_t phi = np > 1 ? COOPT_MIN(plo + a->part, pos + 1) : pos + 1;
    const int32_t hd  = a->hd;

    float              m[ATTN_MAX_G], l[ATTN_MAX_G];
    _Alignas(64) float acc[ATTN_MAX_ACC];
    for (int32_t g = 0; g < gn; g++) m[g] = -INFINITY, l[g] = 0;
    memset(acc, 0, (size_t)gn * hd * sizeof(float));
    a->range(a, t, kh, g0, gn, plo, phi, m, l, acc);

    const int32_t h0 = kh * G + g0;
    if (np == 1) {
        for (int32_t g = 0; g < gn; g++) {
            float *o = a->out + ((size_t)t * a->n_heads + h0 + g) * hd;
            memcpy(o, acc + (size_t)g * hd, (size_t)hd * sizeof(float));
            scale_f32(o, 1.0f / l[g], hd);
        }
        return;
    }
    const size_t stride = (size_t)hd + ATTN_PART_HDR;
    float       *pp     = a->partial + ((size_t)(a->pslot[t] + part) * a->n_heads + h0) * stride;
    for (int32_t g = 0; g < gn; g++, pp += stride) {
        pp[0] = m[g], pp[1] = l[g];
        memcpy(pp + ATTN_PART_HDR, acc + (size_t)g * hd, (size_t)hd * sizeof(float));
    }
    // the last partition of this unit to finish merges (acq_rel: sees every other partial)
    if (atomic_fetch_add_explicit(&a->done[a->cslot[t] + u], 1, memory_order_acq_rel) == np - 1)
        merge_heads(a, t, h0, gn);
}

static void attn_task(void *ctx, int32_t ith, int32_t nth) {
    struct attn_ctx *a = ctx;
    for (;;) {
        int64_t j = a->i0 + atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (j >= a->i1) break;
        run_item(a, j);
    }
}

// Grows the attention scratch to n_bytes (asserts on allocation failure, like cpu_scratch).
static void *attn_scratch(struct cpu_backend *cb, size_t n_bytes) {
    if (cb->attn_scratch_bytes < n_bytes) {
        coopt_aligned_free(cb->attn_scratch);
        cb->attn_scratch       = coopt_aligned_alloc(n_bytes);
        cb->attn_scratch_bytes = cb->attn_scratch ? n_bytes : 0;
        COOPT_ASSERT(cb->attn_scratch != NULL);
    }
    return cb->attn_scratch;
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

void cpu_attention(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                   const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale) {
    struct cpu_backend           *cb = be->impl;
    const struct coopt_kv_layout *l  = &kv->layout;
    const int32_t                 nt = b->n_tokens, G = n_heads / l->n_kv_heads, hd = l->head_dim;
    COOPT_ASSERT(G * l->n_kv_heads == n_heads && G <= ATTN_MAX_G && layer >= 0 && layer < l->n_layers);
    COOPT_ASSERT(hd <= ATTN_MAX_HD && (int64_t)G * hd <= ATTN_MAX_ACC && be->attn_partition >= 0);
    if (nt <= 0) return;
    const int32_t n_units = be->attn_per_head ? n_heads : l->n_kv_heads;
    const int32_t P       = be->attn_partition;

    // plan: partitions per token, then waves whose partials fit ATTN_WAVE_BYTES
    const size_t part_bytes = (size_t)n_heads * ((size_t)hd + ATTN_PART_HDR) * sizeof(float); // one partition
    const size_t meta_bytes = align64((size_t)nt * sizeof(int64_t)) * 3 + align64((size_t)nt * sizeof(int32_t));
    size_t       wave_max   = 0, wave = 0;
    for (int32_t t = 0; t < nt; t++) {
        int32_t n  = b->pos[t] - range_lo(b, t) + 1;
        int32_t np = P > 0 && n > P ? (n + P - 1) / P : 1;
        size_t  tb = np > 1 ? (size_t)np * part_bytes + (size_t)n_units * sizeof(atomic_int) : 0;
        if (wave > 0 && wave + tb > ATTN_WAVE_BYTES) wave = 0;
        wave += tb;
        wave_max = COOPT_MAX(wave_max, wave);
    }
    // layout: item_end, pslot, cslot (int64), n_parts (int32), then partials, then counters
    size_t   cnt_max = wave_max / sizeof(atomic_int) + 1; // counters never outnumber the wave's bytes / 4
    uint8_t *sp      = attn_scratch(cb, meta_bytes + align64(wave_max) + cnt_max * sizeof(atomic_int));
    int64_t *item_end = (int64_t *)sp;
    int64_t *pslot    = (int64_t *)(sp + align64((size_t)nt * sizeof(int64_t)));
    int64_t *cslot    = (int64_t *)(sp + 2 * align64((size_t)nt * sizeof(int64_t)));
    int32_t *n_parts  = (int32_t *)(sp + 3 * align64((size_t)nt * sizeof(int64_t)));
    float   *partial  = (float *)(sp + meta_bytes);
    atomic_int *done  = (atomic_int *)(sp + meta_bytes + align64(wave_max));

    struct attn_ctx a = {.out = out, .q = q, .n_heads = n_heads, .group = G, .hd = hd, .n_units = n_units,
                         .unit_heads = be->attn_per_head ? 1 : G, .kv = kv, .layer = layer, .b = b,
                         .scale = scale, .part = P, .range = range_select(l), .item_end = item_end,
                         .n_parts = n_parts, .pslot = pslot, .partial = partial, .done = done, .cslot = cslot};
    int64_t items = 0;
    for (int32_t t = 0; t < nt; t++) {
        int32_t n  = b->pos[t] - range_lo(b, t) + 1;
        n_parts[t] = P > 0 && n > P ? (n + P - 1) / P : 1;
        items += (int64_t)n_units * n_parts[t];
        item_end[t] = items;
    }
    for (int32_t t0 = 0; t0 < nt;) {
        // the wave [t0, t1): slots for split tokens until the partials would not fit
        int64_t slots = 0, counters = 0;
        size_t  bytes = 0;
        int32_t t1    = t0;
        for (; t1 < nt; t1++) {
            size_t tb = n_parts[t1] > 1 ? (size_t)n_parts[t1] * part_bytes + (size_t)n_units * sizeof(atomic_int) : 0;
            if (t1 > t0 && bytes + tb > ATTN_WAVE_BYTES) break;
            bytes += tb;
            pslot[t1] = cslot[t1] = -1;
            if (n_parts[t1] > 1) {
                pslot[t1] = slots, cslot[t1] = counters;
                slots += n_parts[t1], counters += n_units;
            }
        }
        COOPT_ASSERT((size_t)slots * part_bytes <= wave_max && (size_t)counters <= cnt_max);
        for (int64_t i = 0; i < counters; i++) atomic_init(&done[i], 0);
        a.t0 = t0, a.t1 = t1;
        a.i0 = t0 > 0 ? item_end[t0 - 1] : 0, a.i1 = item_end[t1 - 1];
        atomic_init(&a.next, 0);
        if (a.i1 - a.i0 == 1) attn_task(&a, 0, 1);
        else coopt_threadpool_run(cb->tp, attn_task, &a);
        t0 = t1;
    }
}
