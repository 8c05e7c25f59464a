/*
 * attn_cpu.c -- fast paged grouped-query attention on the CPU (Opt-GQA + Opt-Pa read path).
 *
 * One unit of work is a (token, KV head) pair: all group = n_heads / n_kv_heads query heads that
 * share the KV head are processed against ONE read of each K and V row. Rows are read straight
 * from the pages in the cache type (F32/F16/BF16/FP8) and converted in registers into a single
 * head_dim row buffer in L1 -- the cache is never dequantized into a copy. The softmax is online,
 * updated once per run of up to ATTN_CHUNK consecutive rows of one page: scores of the run for
 * all heads of the group, then one rescale of the running max/sum/accumulator per head, then the
 * V rows of the run. Everything is f32.
 *
 * Threads take (token, KV head) pairs from an atomic counter: a prefill token at position 300 and
 * a decode token at position 3 cost very different amounts. Splitting long contexts into
 * partitions (split-K) is future work (issue 3).
 */
#include "cpu/ops_cpu.h"
#include "cpu/simd.h"

#include "dtype.h"
#include "util.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#define ATTN_CHUNK     64   // rows per softmax update
#define ATTN_MAX_HD    512
#define ATTN_MAX_ACC   8192 // group * head_dim

struct attn_ctx {
    float                        *out;
    const float                  *q;
    int32_t                       n_heads, group;
    const struct coopt_kv_cache  *kv;
    int32_t                       layer;
    const struct coopt_batch     *b;
    float                         scale;
    atomic_int_fast64_t           next;
};

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

static void attn_pair(const struct attn_ctx *a, int32_t t, int32_t kh) {
    const struct coopt_kv_layout *l  = &a->kv->layout;
    const struct coopt_batch     *b  = a->b;
    const int32_t                 hd = l->head_dim, ps = l->page_size, G = a->group;
    const uint8_t                *pool = a->kv->pool;

    float m[64], lsum[64];
    _Alignas(64) float acc[ATTN_MAX_ACC];
    _Alignas(64) float sc[64][ATTN_CHUNK];
    _Alignas(64) float row[ATTN_MAX_HD];
    const float *q = a->q + ((size_t)t * a->n_heads + (size_t)kh * G) * hd; // [G][hd]
    for (int32_t g = 0; g < G; g++) {
        m[g]    = -INFINITY;
        lsum[g] = 0;
    }
    memset(acc, 0, (size_t)G * hd * sizeof(float));

    int32_t s   = b->tok_seq[t];
    int32_t pos = b->pos[t];
    int32_t p   = b->window > 0 ? COOPT_MAX(0, pos - b->window + 1) : 0;
    while (p <= pos) {
        int32_t page = b->block_tables[(size_t)s * b->max_blocks + p / ps];
        COOPT_ASSERT(page >= 0); // a released page inside the attended range is a scheduler bug
        int32_t row0 = p % ps;
        int32_t nr   = COOPT_MIN(COOPT_MIN(ps - row0, pos - p + 1), ATTN_CHUNK);
        const uint8_t *kp = pool + coopt_kv_offset(l, page, a->layer, 0, kh, row0);
        const uint8_t *vp = pool + coopt_kv_offset(l, page, a->layer, 1, kh, row0);
        const uint8_t *ks = l->has_scales ? pool + coopt_kv_scale_offset(l, page, a->layer, 0, kh, row0) : NULL;
        const uint8_t *vs = l->has_scales ? pool + coopt_kv_scale_offset(l, page, a->layer, 1, kh, row0) : NULL;
        size_t row_bytes = (size_t)hd * l->elem_bytes;

        for (int32_t r = 0; r < nr; r++) {
            load_row(l, kp + (size_t)r * row_bytes, row);
            float f = row_factor(l, ks, r) * a->scale;
            for (int32_t g = 0; g < G; g++) sc[g][r] = dot_f32(q + (size_t)g * hd, row, hd) * f;
        }
        for (int32_t g = 0; g < G; g++) {
            float cm = sc[g][0];
            for (int32_t r = 1; r < nr; r++) cm = fmaxf(cm, sc[g][r]);
            float mn = fmaxf(m[g], cm);
            if (m[g] != mn) {
                float alpha = expf(m[g] - mn); // 0 on the first chunk (m = -inf)
                lsum[g] *= alpha;
                float *ag = acc + (size_t)g * hd;
                for (int32_t i = 0; i < hd; i++) ag[i] *= alpha;
                m[g] = mn;
            }
            lsum[g] += exp_sum(sc[g], nr, mn);
        }
        for (int32_t r = 0; r < nr; r++) {
            load_row(l, vp + (size_t)r * row_bytes, row);
            float f = row_factor(l, vs, r);
            for (int32_t g = 0; g < G; g++) axpy_f32(acc + (size_t)g * hd, sc[g][r] * f, row, hd);
        }
        p += nr;
    }
    for (int32_t g = 0; g < G; g++) {
        float *o   = a->out + ((size_t)t * a->n_heads + (size_t)kh * G + g) * hd;
        float  inv = 1.0f / lsum[g];
        for (int32_t i = 0; i < hd; i++) o[i] = acc[(size_t)g * hd + i] * inv;
    }
}

static void attn_task(void *ctx, int32_t ith, int32_t nth) {
    struct attn_ctx *a       = ctx;
    int32_t          n_kv    = a->kv->layout.n_kv_heads;
    int64_t          n_pairs = (int64_t)a->b->n_tokens * n_kv;
    for (;;) {
        int64_t j = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (j >= n_pairs) break;
        attn_pair(a, (int32_t)(j / n_kv), (int32_t)(j % n_kv));
    }
}

void cpu_attention(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                   const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale) {
    struct cpu_backend           *cb = be->impl;
    const struct coopt_kv_layout *l  = &kv->layout;
    int32_t                       G  = n_heads / l->n_kv_heads;
    COOPT_ASSERT(G * l->n_kv_heads == n_heads && G <= 64 && layer >= 0 && layer < l->n_layers);
    COOPT_ASSERT(l->head_dim <= ATTN_MAX_HD && (int64_t)G * l->head_dim <= ATTN_MAX_ACC);
    struct attn_ctx a = {.out = out, .q = q, .n_heads = n_heads, .group = G, .kv = kv, .layer = layer, .b = b,
                         .scale = scale};
    atomic_init(&a.next, 0);
    if ((int64_t)b->n_tokens * l->n_kv_heads == 1) attn_task(&a, 0, 1);
    else coopt_threadpool_run(cb->tp, attn_task, &a);
}
