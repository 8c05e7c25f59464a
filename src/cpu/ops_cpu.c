/*
 * ops_cpu.c -- the fast CPU ops table and coopt_cpu_backend_init().
 *
 * Element-wise ops split their range over the thread pool when it is large enough to pay for a
 * dispatch (~1-2 us) and use AVX-512 where it matters; the matmuls live in matmul_fused.c
 * (plain and fused, over the kernels of matmul_cpu.c and matmul_gptq.c), attention in
 * attn_cpu.c. The memory and KV-pool ops are shared with the reference table
 * (ops_cpu_ref.c), as are the K/V row conversion and the RoPE angle computation, so the fused
 * write path stores bit-identical cache contents in both tables.
 */
#include "cpu/ops_cpu.h"
#include "cpu/simd.h"

#include "dtype.h"
#include "util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PAR_MIN_ELEMS    (1 << 15) // element-wise ops below this run on the calling thread
#define ATTN_ROPE_MAX_HD 512       // largest head_dim of rope / rope_store

static struct coopt_threadpool *pool_of(struct coopt_backend *be) { return ((struct cpu_backend *)be->impl)->tp; }

// Runs fn over the pool, or on the calling thread when the work is small.
static void par_run(struct coopt_backend *be, coopt_task_fn *fn, void *ctx, int64_t work) {
    if (work < PAR_MIN_ELEMS) fn(ctx, 0, 1);
    else coopt_threadpool_run(pool_of(be), fn, ctx);
}

// ---- embed ----

struct embed_ctx {
    float                     *out;
    const struct coopt_weight *table;
    const int32_t             *tokens;
    int32_t                    n;
};

static void embed_task(void *ctx, int32_t ith, int32_t nth) {
    struct embed_ctx          *c     = ctx;
    const struct coopt_weight *w     = c->table;
    size_t                     rb    = coopt_dtype_row_bytes(w->dtype, w->n_in);
    int64_t                    lo, hi;
    coopt_split_range(c->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const uint8_t *src = (const uint8_t *)w->data + (size_t)c->tokens[t] * rb;
        float         *dst = c->out + (size_t)t * (size_t)w->n_in;
#if defined(__AVX512F__)
        if (w->dtype == COOPT_DTYPE_F16 || w->dtype == COOPT_DTYPE_BF16) {
            for (int64_t i = 0; i < w->n_in; i += 16) {
                __mmask16 m = simd_mask16(w->n_in - i);
                __m512    v = w->dtype == COOPT_DTYPE_F16 ? simd_load_f16((const uint16_t *)src + i, m)
                                                          : simd_load_bf16((const uint16_t *)src + i, m);
                _mm512_mask_storeu_ps(dst + i, m, v);
            }
            continue;
        }
#endif
        coopt_dequant_row(w->dtype, src, dst, w->n_in);
    }
}

static void embed_fast(struct coopt_backend *be, float *out, const struct coopt_weight *table, const int32_t *tokens,
                       int32_t n) {
    COOPT_ASSERT(coopt_dtype_row_bytes(table->dtype, table->n_in) > 0);
    for (int32_t t = 0; t < n; t++) COOPT_ASSERT(tokens[t] >= 0 && tokens[t] < table->n_out);
    struct embed_ctx c = {out, table, tokens, n};
    par_run(be, embed_task, &c, (int64_t)n * table->n_in);
}

// ---- rmsnorm ----

struct rmsnorm_ctx {
    float       *out;
    const float *x, *w;
    int32_t      n_rows, dim;
    float        eps;
};

static float sum_sq(const float *x, int32_t n) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int32_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
        a0        = _mm512_fmadd_ps(v0, v0, a0);
        a1        = _mm512_fmadd_ps(v1, v1, a1);
    }
    for (; i < n; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(simd_mask16(n - i), x + i);
        a0       = _mm512_fmadd_ps(v, v, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    // 8 interleaved partial sums: close to pairwise accuracy, and vectorizable
    float s[8] = {0};
    int32_t i  = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += x[i + j] * x[i + j];
    for (; i < n; i++) s[0] += x[i] * x[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
#endif
}

static void rmsnorm_task(void *ctx, int32_t ith, int32_t nth) {
    struct rmsnorm_ctx *c = ctx;
    int64_t             lo, hi;
    coopt_split_range(c->n_rows, ith, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        const float *x   = c->x + (size_t)r * (size_t)c->dim;
        float       *o   = c->out + (size_t)r * (size_t)c->dim;
        float        inv = 1.0f / sqrtf(sum_sq(x, c->dim) / (float)c->dim + c->eps);
        for (int32_t i = 0; i < c->dim; i++) o[i] = (x[i] * inv) * c->w[i];
    }
}

static void rmsnorm_fast(struct coopt_backend *be, float *out, const float *x, const float *w, int32_t n_rows,
                         int32_t dim, float eps) {
    struct rmsnorm_ctx c = {out, x, w, n_rows, dim, eps};
    par_run(be, rmsnorm_task, &c, n_rows > 1 ? (int64_t)n_rows * dim : 0);
}

// ---- rope, rope_store ----

struct rope_ctx {
    float                        *q;
    const float                  *k, *v;
    int32_t                       n_heads;
    const int32_t                *pos;
    int32_t                       n;
    const struct coopt_rope      *rope;
    struct coopt_kv_cache        *kv; // NULL: rope only
    int32_t                       layer;
    const int64_t                *slots;
    const struct coopt_batch     *b;
};

static void rope_task(void *ctx, int32_t ith, int32_t nth) {
    struct rope_ctx *c  = ctx;
    int32_t          hd = c->rope->head_dim;
    float            cs[ATTN_ROPE_MAX_HD], tmp[ATTN_ROPE_MAX_HD];
    int64_t          lo, hi;
    coopt_split_range(c->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        cpu_rope_angles(c->rope, c->pos[t], cs);
        for (int32_t h = 0; h < c->n_heads; h++) cpu_rope_apply(c->rope, cs, c->q + ((size_t)t * c->n_heads + h) * hd);
        if (!c->kv) continue;
        const struct coopt_kv_layout *l    = &c->kv->layout;
        int64_t                       page = c->slots[t] / l->page_size;
        int32_t                       row  = (int32_t)(c->slots[t] % l->page_size);
        for (int32_t h = 0; h < l->n_kv_heads; h++) {
            for (int kvi = 0; kvi < 2; kvi++) {
                const float *src = (kvi == 0 ? c->k : c->v) + ((size_t)t * l->n_kv_heads + h) * hd;
                if (kvi == 0) {
                    memcpy(tmp, src, (size_t)hd * sizeof(float));
                    cpu_rope_apply(c->rope, cs, tmp);
                    const float *koff = cpu_kv_offset_row(c->kv, c->layer, c->b, (int32_t)t, h);
                    if (koff)
                        for (int32_t i = 0; i < hd; i++) tmp[i] -= koff[i];
                    src = tmp;
                }
                uint8_t *pool  = c->kv->pool;
                void    *scale = l->has_scales ? pool + coopt_kv_scale_offset(l, page, c->layer, kvi, h, row) : NULL;
                cpu_kv_store_row(l, kvi, src, pool + coopt_kv_offset(l, page, c->layer, kvi, h, row), scale);
            }
        }
    }
}

static void rope_fast(struct coopt_backend *be, float *q, int32_t n_heads, const int32_t *pos, int32_t n,
                      const struct coopt_rope *rope) {
    COOPT_ASSERT(rope->head_dim % 2 == 0 && rope->head_dim <= ATTN_ROPE_MAX_HD);
    struct rope_ctx c = {.q = q, .n_heads = n_heads, .pos = pos, .n = n, .rope = rope};
    par_run(be, rope_task, &c, n > 1 ? (int64_t)n * n_heads * rope->head_dim : 0);
}

static void rope_store_fast(struct coopt_backend *be, float *q, const float *k, const float *v, int32_t n_heads,
                            struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                            const struct coopt_rope *rope) {
    const struct coopt_kv_layout *l = &kv->layout;
    COOPT_ASSERT(rope->head_dim == l->head_dim && rope->head_dim % 2 == 0 && rope->head_dim <= ATTN_ROPE_MAX_HD);
    COOPT_ASSERT(layer >= 0 && layer < l->n_layers);
    struct rope_ctx c = {.q       = q,
                         .k       = k,
                         .v       = v,
                         .n_heads = n_heads,
                         .pos     = b->pos,
                         .n       = b->n_tokens,
                         .rope    = rope,
                         .kv      = kv,
                         .layer   = layer,
                         .slots   = b->slots,
                         .b       = b};
    cpu_kv_offsets_update(kv, layer, b, k, rope);
    par_run(be, rope_task, &c, b->n_tokens > 1 ? (int64_t)b->n_tokens * (n_heads + 2 * l->n_kv_heads) * l->head_dim : 0);
}

// ---- element-wise ----

struct ew_ctx {
    float       *out;
    const float *a, *b;
    int64_t      n;
};

// Every element goes through the same operations wherever a range starts or ends (the tail
// is a masked vector), so any split of a silu_mul gives bit-identical results.
void cpu_silu_mul(float *out, const float *gate, const float *up, int64_t n) {
#if defined(__AVX512F__)
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = simd_mask16(n - i);
        __m512    g = _mm512_maskz_loadu_ps(m, gate + i), u = _mm512_maskz_loadu_ps(m, up + i);
        __m512    e = simd_exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_mask_storeu_ps(out + i, m,
                              _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u));
    }
#else
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i]  = g / (1.0f + expf(-g)) * up[i];
    }
#endif
}

static void silu_mul_task(void *ctx, int32_t ith, int32_t nth) {
    struct ew_ctx *c = ctx;
    int64_t        lo, hi;
    coopt_split_range(c->n, ith, nth, &lo, &hi);
    cpu_silu_mul(c->out + lo, c->a + lo, c->b + lo, hi - lo);
}

static void silu_mul_fast(struct coopt_backend *be, float *out, const float *gate, const float *up, int64_t n) {
    struct ew_ctx c = {out, gate, up, n};
    par_run(be, silu_mul_task, &c, n);
}

static void add_task(void *ctx, int32_t ith, int32_t nth) {
    struct ew_ctx *c = ctx;
    int64_t        lo, hi;
    coopt_split_range(c->n, ith, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) c->out[i] = c->a[i] + c->b[i];
}

static void add_fast(struct coopt_backend *be, float *out, const float *a, const float *b, int64_t n) {
    struct ew_ctx c = {out, a, b, n};
    par_run(be, add_task, &c, n);
}

static void get_rows_fast(struct coopt_backend *be, float *out, const float *x, const int32_t *rows, int32_t n,
                          int32_t dim) {
    // Rows are copied in order and rows[j] >= j when out aliases x (ascending out_rows), so an
    // in-place gather never overwrites a row it still needs.
    for (int32_t j = 0; j < n; j++)
        memmove(out + (size_t)j * dim, x + (size_t)rows[j] * dim, (size_t)dim * sizeof(float));
}

const struct coopt_ops coopt_cpu_fast_ops = {
    .name            = "cpu",
    .alloc           = cpu_alloc,
    .free            = cpu_free,
    .upload          = cpu_copy,
    .download        = cpu_copy,
    .sync            = cpu_sync,
    .embed           = embed_fast,
    .rmsnorm         = rmsnorm_fast,
    .matmul          = cpu_matmul_fused,
    .rope            = rope_fast,
    .rope_store      = rope_store_fast,
    .attention       = cpu_attention,
    .silu_mul        = silu_mul_fast,
    .add             = add_fast,
    .get_rows        = get_rows_fast,
    .argmax          = cpu_argmax,
    .sample          = cpu_sample,
    .matmul_multi    = cpu_matmul_multi,
    .matmul_swiglu   = cpu_matmul_swiglu,
    .matmul_add      = cpu_matmul_add,
    .kv_pool_init    = cpu_kv_pool_init,
    .kv_pool_free    = cpu_kv_pool_free,
    .kv_pool_release = cpu_kv_pool_release,
    .kv_page_copy    = cpu_kv_page_copy,
    .destroy         = cpu_destroy,
};

enum coopt_status coopt_cpu_backend_init(int32_t n_threads, bool ref, struct coopt_backend **out) {
    *out                   = NULL;
    struct coopt_backend *be = coopt_calloc(1, sizeof(*be));
    struct cpu_backend   *cb = coopt_calloc(1, sizeof(*cb));
    if (!be || !cb) {
        free(be);
        free(cb);
        return COOPT_ERR_NOMEM;
    }
    be->impl      = cb;
    be->ops       = ref ? &coopt_cpu_ref_ops : &coopt_cpu_fast_ops;
    be->n_threads = 1;
    be->attn_partition = 512; // the context overrides it from its parameters
    if (!ref) {
        enum coopt_status st = coopt_threadpool_init(n_threads, &cb->tp);
        if (st != COOPT_OK) {
            cpu_destroy(be);
            return st;
        }
        be->n_threads = coopt_threadpool_n_threads(cb->tp);
    }
    *out = be;
    return COOPT_OK;
}
