/*
 * ops_cpu_ref.c -- the scalar reference ops of the CPU backend: the definition of correct that
 * every fast path (CPU SIMD, CUDA) is tested against. Single-threaded, the simplest code that
 * computes the op: weights are dequantized with coopt_dequant_row and reductions accumulate in
 * double. Allocation inside ops is allowed here (tests only); it aborts on failure.
 *
 * Also here: the memory and KV-pool ops that both CPU tables share, the one K/V row conversion
 * (cpu_kv_store_row, where FP8 scales are computed) and the RoPE angle helpers.
 */
#include "cpu/ops_cpu.h"

#include "dtype.h"
#include "gptq.h"
#include "sampler.h"
#include "util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

// ---- memory ----

enum coopt_status cpu_alloc(struct coopt_backend *be, size_t n_bytes, void **out) {
    *out = coopt_aligned_alloc(n_bytes);
    return *out ? COOPT_OK : COOPT_ERR_NOMEM;
}

void cpu_free(struct coopt_backend *be, void *p) { coopt_aligned_free(p); }

void cpu_copy(struct coopt_backend *be, void *dst, const void *src, size_t n_bytes) {
    if (n_bytes) memcpy(dst, src, n_bytes);
}

void cpu_sync(struct coopt_backend *be) {}

void *cpu_scratch(struct coopt_backend *be, size_t n_bytes) {
    struct cpu_backend *cb = be->impl;
    if (cb->scratch_bytes < n_bytes) {
        coopt_aligned_free(cb->scratch);
        cb->scratch       = coopt_aligned_alloc(n_bytes);
        cb->scratch_bytes = cb->scratch ? n_bytes : 0;
        COOPT_ASSERT(cb->scratch != NULL);
    }
    return cb->scratch;
}

void cpu_destroy(struct coopt_backend *be) {
    if (!be) return;
    struct cpu_backend *cb = be->impl;
    if (cb) {
        coopt_threadpool_free(cb->tp);
        coopt_aligned_free(cb->scratch);
        coopt_aligned_free(cb->attn_scratch);
        coopt_aligned_free(cb->fused_tmp);
        free(cb);
    }
    free(be);
}

// ---- KV pool: reserved address space, committed lazily on first write ----

enum coopt_status cpu_kv_pool_init(struct coopt_backend *be, size_t n_bytes, void **out) {
    *out    = NULL;
    void *p = mmap(NULL, n_bytes ? n_bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return coopt_fail(COOPT_ERR_NOMEM, "KV pool: cannot reserve %zu bytes", n_bytes);
    *out = p;
    return COOPT_OK;
}

void cpu_kv_pool_free(struct coopt_backend *be, void *pool, size_t n_bytes) {
    if (pool) munmap(pool, n_bytes ? n_bytes : 1);
}

void cpu_kv_pool_release(struct coopt_backend *be, void *pool, size_t off, size_t n_bytes) {
    // Only whole OS pages inside [off, off + n) can be dropped: the edges may share an OS page
    // with a neighbouring KV page that is still live. Dropped pages read back as zeros.
    size_t    os_page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo      = ((uintptr_t)pool + off + os_page - 1) & ~(uintptr_t)(os_page - 1);
    uintptr_t hi      = ((uintptr_t)pool + off + n_bytes) & ~(uintptr_t)(os_page - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

void cpu_kv_page_copy(struct coopt_backend *be, void *pool, size_t page_bytes, int32_t dst, int32_t src) {
    uint8_t *p = pool;
    memcpy(p + (size_t)dst * page_bytes, p + (size_t)src * page_bytes, page_bytes);
}

// ---- K/V row conversion and RoPE (shared by both tables) ----

float cpu_kv_fp8_max(enum coopt_dtype t) {
    switch (t) {
    case COOPT_DTYPE_FP8_E4M3: return 448.0f;
    case COOPT_DTYPE_FP8_E5M2: return 57344.0f;
    default: return 0.0f;
    }
}

void cpu_kv_store_row(const struct coopt_kv_layout *l, int32_t kv, const float *x, void *dst, void *scale) {
    int32_t n = l->head_dim;
    if (!l->has_scales) {
        coopt_quant_row(l->dtype, x, dst, n);
        return;
    }
    float s = coopt_fp8_quant_row(l->dtype, x, dst, n, l->scale_search);
    (void)kv;
    memcpy(scale, &s, sizeof(s));
}

void cpu_kv_offsets_update(struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, const float *k,
                           const struct coopt_rope *rope) {
    const struct coopt_kv_layout *l = &kv->layout;
    if (!kv->k_offset || !b->seq_ids || !l->has_scales) return;
    bool any_first = false;
    for (int32_t t = 0; t < b->n_tokens && !any_first; t++) any_first = b->pos[t] == 0;
    if (!any_first) return;
    int32_t hd = l->head_dim, nkv = l->n_kv_heads;
    float   cs[512], tmp[512];
    COOPT_ASSERT(hd <= 512); // coopt_model_finish caps head_dim at 512
    for (int32_t s = 0; s < b->n_seqs; s++) {
        bool first = false;
        for (int32_t t = 0; t < b->n_tokens && !first; t++) first = b->tok_seq[t] == s && b->pos[t] == 0;
        if (!first) continue;
        for (int32_t h = 0; h < nkv; h++) {
            float  *c   = kv->k_offset + coopt_kv_koff_index(l, b->seq_ids[s], layer, h);
            int32_t cnt = 0;
            memset(c, 0, (size_t)hd * sizeof(float));
            for (int32_t t = 0; t < b->n_tokens; t++) {
                if (b->tok_seq[t] != s) continue;
                memcpy(tmp, k + ((size_t)t * nkv + h) * hd, (size_t)hd * sizeof(float));
                cpu_rope_angles(rope, b->pos[t], cs);
                cpu_rope_apply(rope, cs, tmp);
                for (int32_t i = 0; i < hd; i++) c[i] += tmp[i];
                cnt++;
            }
            for (int32_t i = 0; i < hd; i++) c[i] /= (float)cnt;
        }
    }
}

const float *cpu_kv_offset_row(const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, int32_t t,
                               int32_t h) {
    if (!kv->k_offset || !b->seq_ids || !kv->layout.has_scales) return NULL;
    return kv->k_offset + coopt_kv_koff_index(&kv->layout, b->seq_ids[b->tok_seq[t]], layer, h);
}

void cpu_rope_angles(const struct coopt_rope *rope, int32_t pos, float *cs) {
    for (int32_t i = 0; i < rope->head_dim / 2; i++) {
        float a       = (float)pos * rope->inv_freq[i]; // f32, as HF computes position * inv_freq
        cs[2 * i]     = cosf(a);
        cs[2 * i + 1] = sinf(a);
    }
}

void cpu_rope_apply(const struct coopt_rope *rope, const float *cs, float *x) {
    int32_t half = rope->head_dim / 2;
    for (int32_t i = 0; i < half; i++) {
        float c = cs[2 * i], s = cs[2 * i + 1];
        if (rope->layout == COOPT_ROPE_INTERLEAVED) {
            float x0 = x[2 * i], x1 = x[2 * i + 1];
            x[2 * i]     = x0 * c - x1 * s;
            x[2 * i + 1] = x0 * s + x1 * c;
        } else {
            float x0 = x[i], x1 = x[i + half];
            x[i]        = x0 * c - x1 * s;
            x[i + half] = x1 * c + x0 * s;
        }
    }
}

// ---- reference ops ----

static void *xmalloc(size_t n) {
    void *p = coopt_malloc(n ? n : 1);
    COOPT_ASSERT(p != NULL);
    return p;
}

static void embed_ref(struct coopt_backend *be, float *out, const struct coopt_weight *table, const int32_t *tokens,
                      int32_t n) {
    size_t row_bytes = coopt_dtype_row_bytes(table->dtype, table->n_in);
    COOPT_ASSERT(row_bytes > 0);
    for (int32_t t = 0; t < n; t++) {
        COOPT_ASSERT(tokens[t] >= 0 && tokens[t] < table->n_out);
        const uint8_t *row = (const uint8_t *)table->data + (size_t)tokens[t] * row_bytes;
        coopt_dequant_row(table->dtype, row, out + (size_t)t * (size_t)table->n_in, table->n_in);
    }
}

static void rmsnorm_ref(struct coopt_backend *be, float *out, const float *x, const float *w, int32_t n_rows,
                        int32_t dim, float eps) {
    for (int32_t r = 0; r < n_rows; r++) {
        const float *xr = x + (size_t)r * (size_t)dim;
        float       *o  = out + (size_t)r * (size_t)dim;
        double       ss = 0;
        for (int32_t i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
        for (int32_t i = 0; i < dim; i++) o[i] = (xr[i] * inv) * w[i];
    }
}

static void matmul_ref(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                       int32_t n_rows) {
    if (w->dtype == COOPT_DTYPE_Q4_GPTQ) {
        coopt_gptq_matmul_ref(out, x, w->gptq, n_rows);
        if (w->bias)
            for (int32_t r = 0; r < n_rows; r++)
                for (int64_t o = 0; o < w->n_out; o++) out[(size_t)r * (size_t)w->n_out + (size_t)o] += w->bias[o];
        return;
    }
    size_t row_bytes = coopt_dtype_row_bytes(w->dtype, w->n_in);
    COOPT_ASSERT(row_bytes > 0);
    float *wrow = xmalloc((size_t)w->n_in * sizeof(float));
    for (int64_t o = 0; o < w->n_out; o++) {
        coopt_dequant_row(w->dtype, (const uint8_t *)w->data + (size_t)o * row_bytes, wrow, w->n_in);
        for (int32_t r = 0; r < n_rows; r++) {
            const float *xr  = x + (size_t)r * (size_t)w->n_in;
            double       acc = 0;
            for (int64_t i = 0; i < w->n_in; i++) acc += (double)xr[i] * wrow[i];
            if (w->bias) acc += w->bias[o];
            out[(size_t)r * (size_t)w->n_out + (size_t)o] = (float)acc;
        }
    }
    free(wrow);
}

static void rope_ref(struct coopt_backend *be, float *q, int32_t n_heads, const int32_t *pos, int32_t n,
                     const struct coopt_rope *rope) {
    int32_t hd = rope->head_dim;
    float  *cs = xmalloc((size_t)hd * sizeof(float));
    for (int32_t t = 0; t < n; t++) {
        cpu_rope_angles(rope, pos[t], cs);
        for (int32_t h = 0; h < n_heads; h++) cpu_rope_apply(rope, cs, q + ((size_t)t * n_heads + h) * hd);
    }
    free(cs);
}

static void rope_store_ref(struct coopt_backend *be, float *q, const float *k, const float *v, int32_t n_heads,
                           struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                           const struct coopt_rope *rope) {
    const struct coopt_kv_layout *l   = &kv->layout;
    int32_t                       hd  = l->head_dim;
    int32_t                       nkv = l->n_kv_heads;
    COOPT_ASSERT(rope->head_dim == hd && layer >= 0 && layer < l->n_layers);
    rope_ref(be, q, n_heads, b->pos, b->n_tokens, rope);
    cpu_kv_offsets_update(kv, layer, b, k, rope);
    float *cs  = xmalloc((size_t)hd * sizeof(float));
    float *tmp = xmalloc((size_t)hd * sizeof(float));
    for (int32_t t = 0; t < b->n_tokens; t++) {
        int64_t page = b->slots[t] / l->page_size;
        int32_t row  = (int32_t)(b->slots[t] % l->page_size);
        cpu_rope_angles(rope, b->pos[t], cs);
        for (int32_t h = 0; h < nkv; h++) {
            for (int kvi = 0; kvi < 2; kvi++) {
                const float *src = (kvi == 0 ? k : v) + ((size_t)t * nkv + h) * hd;
                memcpy(tmp, src, (size_t)hd * sizeof(float));
                if (kvi == 0) {
                    cpu_rope_apply(rope, cs, tmp);
                    const float *c = cpu_kv_offset_row(kv, layer, b, t, h);
                    if (c)
                        for (int32_t i = 0; i < hd; i++) tmp[i] -= c[i];
                }
                void *scale = l->has_scales ? kv->pool + coopt_kv_scale_offset(l, page, layer, kvi, h, row) : NULL;
                cpu_kv_store_row(l, kvi, tmp, kv->pool + coopt_kv_offset(l, page, layer, kvi, h, row), scale);
            }
        }
    }
    free(tmp);
    free(cs);
}

// Reads one cached row (page, layer, kvi, head, row) as f32, scale applied.
static void kv_load_row_ref(const struct coopt_kv_cache *kv, int64_t page, int32_t layer, int kvi, int32_t h,
                            int32_t row, float *dst) {
    const struct coopt_kv_layout *l = &kv->layout;
    coopt_dequant_row(l->dtype, kv->pool + coopt_kv_offset(l, page, layer, kvi, h, row), dst, l->head_dim);
    if (l->has_scales) {
        float s;
        memcpy(&s, kv->pool + coopt_kv_scale_offset(l, page, layer, kvi, h, row), sizeof(s));
        for (int32_t i = 0; i < l->head_dim; i++) dst[i] *= s;
    }
}

static void attention_ref(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                          const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale) {
    const struct coopt_kv_layout *l     = &kv->layout;
    int32_t                       hd    = l->head_dim;
    int32_t                       ps    = l->page_size;
    int32_t                       group = n_heads / l->n_kv_heads;
    COOPT_ASSERT(group * l->n_kv_heads == n_heads && layer >= 0 && layer < l->n_layers);
    float  *krow = xmalloc((size_t)hd * sizeof(float));
    double *acc  = xmalloc((size_t)hd * sizeof(double));
    for (int32_t t = 0; t < b->n_tokens; t++) {
        int32_t s   = b->tok_seq[t];
        int32_t pos = b->pos[t];
        int32_t lo  = b->window > 0 ? COOPT_MAX(0, pos - b->window + 1) : 0;
        int32_t n   = pos - lo + 1;
        float  *sc  = xmalloc((size_t)n * sizeof(float));
        for (int32_t h = 0; h < n_heads; h++) {
            const float *qh = q + ((size_t)t * n_heads + h) * hd;
            int32_t      kh = h / group;
            float        mx = -INFINITY;
            for (int32_t p = lo; p <= pos; p++) {
                int32_t page = b->block_tables[(size_t)s * b->max_blocks + p / ps];
                COOPT_ASSERT(page >= 0);
                kv_load_row_ref(kv, page, layer, 0, kh, p % ps, krow);
                double d = 0;
                for (int32_t i = 0; i < hd; i++) d += (double)qh[i] * krow[i];
                sc[p - lo] = (float)(d * scale);
                mx         = fmaxf(mx, sc[p - lo]);
            }
            double sum = 0;
            for (int32_t j = 0; j < n; j++) sum += exp((double)sc[j] - mx);
            for (int32_t i = 0; i < hd; i++) acc[i] = 0;
            for (int32_t p = lo; p <= pos; p++) {
                int32_t page = b->block_tables[(size_t)s * b->max_blocks + p / ps];
                kv_load_row_ref(kv, page, layer, 1, kh, p % ps, krow);
                double w = exp((double)sc[p - lo] - mx) / sum;
                for (int32_t i = 0; i < hd; i++) acc[i] += w * krow[i];
            }
            float *o = out + ((size_t)t * n_heads + h) * hd;
            for (int32_t i = 0; i < hd; i++) o[i] = (float)acc[i];
        }
        free(sc);
    }
    free(acc);
    free(krow);
}

static void silu_mul_ref(struct coopt_backend *be, float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i]  = g / (1.0f + expf(-g)) * up[i];
    }
}

static void add_ref(struct coopt_backend *be, float *out, const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

static void get_rows_ref(struct coopt_backend *be, float *out, const float *x, const int32_t *rows, int32_t n,
                         int32_t dim) {
    for (int32_t j = 0; j < n; j++)
        memmove(out + (size_t)j * dim, x + (size_t)rows[j] * dim, (size_t)dim * sizeof(float));
}

// The host sampler's own code (coopt_pick_row), so the two agree by construction.
void cpu_sample(struct coopt_backend *be, int32_t *out, void *out_host, const float *x, int32_t n_rows, int32_t n,
                struct pick_state *ps, uint8_t *scratch) {
    (void)be, (void)scratch;
    for (int32_t r = 0; r < n_rows; r++) {
        if (ps[r].p.top_k <= 0) continue;
        const int32_t t = coopt_pick_row(x + (size_t)r * (size_t)n, n, &ps[r]);
        out[r]          = t;
        if (out_host) {
            uint8_t *h = (uint8_t *)out_host + (size_t)r * PICK_RESULT_BYTES;
            memcpy(h, &t, sizeof(t));
            memcpy(h + 8, ps[r].rng, sizeof(ps[r].rng));
        }
    }
}

void cpu_argmax(struct coopt_backend *be, int32_t *out, int32_t *out_host, const float *x, int32_t n_rows, int32_t n) {
    (void)be;
    for (int32_t r = 0; r < n_rows; r++) {
        const float *row  = x + (size_t)r * (size_t)n;
        int32_t      best = 0;
        float        bl   = -INFINITY;
        for (int32_t i = 0; i < n; i++)
            if (row[i] > bl) best = i, bl = row[i]; // NaN and -inf never compare greater
        out[r] = best;
        if (out_host) out_host[r] = best;
    }
}

const struct coopt_ops coopt_cpu_ref_ops = {
    .name            = "cpu-ref",
    .alloc           = cpu_alloc,
    .free            = cpu_free,
    .upload          = cpu_copy,
    .download        = cpu_copy,
    .sync            = cpu_sync,
    .embed           = embed_ref,
    .rmsnorm         = rmsnorm_ref,
    .matmul          = matmul_ref,
    .rope            = rope_ref,
    .rope_store      = rope_store_ref,
    .attention       = attention_ref,
    .silu_mul        = silu_mul_ref,
    .add             = add_ref,
    .get_rows        = get_rows_ref,
    .argmax          = cpu_argmax,
    .sample          = cpu_sample,
    .kv_pool_init    = cpu_kv_pool_init,
    .kv_pool_free    = cpu_kv_pool_free,
    .kv_pool_release = cpu_kv_pool_release,
    .kv_page_copy    = cpu_kv_page_copy,
    .destroy         = cpu_destroy,
};
