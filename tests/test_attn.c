/*
 * test_attn.c -- the fast CPU attention (attn_cpu.c) with split-K partitions and the per-head
 * ablation against the scalar reference (ops_cpu_ref.c), and against itself.
 *
 * Every case builds a paged cache by hand (random rows written with cpu_kv_store_row, pages in
 * a scrambled order), runs the reference once, then the fast backend with 1 and 2 threads,
 * partitions off / 512 / 100 / 37 and grouped / per-head reads.
 *
 * Tolerances, and why:
 *   fast vs reference: 2e-5 abs + 1e-4 rel (as tests/test_ops.c: f32 online softmax with a
 *     polynomial exp against double math; both read the same cache bytes).
 *   split-K vs single pass (fast): 2e-6 abs + 2e-5 rel -- the same f32 scores; only the points
 *     where the running max rescales and the final log-sum-exp merge differ (reassociation).
 *   grouped vs per-head, and 1 vs 2 threads: bit-identical. Each query head's arithmetic is the
 *     same sequence of f32 operations in both read patterns, and the merge adds partitions in
 *     partition order whichever thread finishes last.
 */
#include "backend.h"
#include "cpu/ops_cpu.h"
#include "dtype.h"
#include "kv_cache.h"
#include "test.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const enum coopt_dtype k_types[] = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_BF16, COOPT_DTYPE_FP8_E4M3,
                                           COOPT_DTYPE_FP8_E5M2};
static const int32_t k_parts[] = {0, 512, 100, 37};

// A hand-built cache: n_seqs sequences of lens[i] positions in layer 1 of 2.
struct fixture {
    struct coopt_kv_cache kv;
    int32_t              *bt;
    int32_t               n_seqs, max_blocks;
    size_t                pool_bytes;
    bool                  extremes; // set before fixture_init: rows span 2^-23..1 of their amax
};

static bool fixture_init(struct test_ctx *t, struct coopt_backend *be, uint64_t *s, struct fixture *f,
                         enum coopt_dtype dt, int32_t nkv, int32_t hd, int32_t ps, int32_t n_seqs,
                         const int32_t *lens) {
    bool extremes = f->extremes;
    memset(f, 0, sizeof(*f));
    f->extremes   = extremes;
    int32_t max_len = 0, n_pages = 0;
    for (int i = 0; i < n_seqs; i++) {
        max_len = COOPT_MAX(max_len, lens[i]);
        n_pages += (lens[i] + ps - 1) / ps;
    }
    f->n_seqs     = n_seqs;
    f->max_blocks = (max_len + ps - 1) / ps;
    if (coopt_kv_layout_init(&f->kv.layout, dt, 2, nkv, hd, ps) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "layout");
        return false;
    }
    f->pool_bytes = f->kv.layout.page_bytes * (size_t)n_pages;
    if (be->ops->kv_pool_init(be, f->pool_bytes, (void **)&f->kv.pool) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "pool");
        return false;
    }
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)n_pages);
    for (int i = 0; i < n_pages; i++) perm[i] = i;
    for (int i = n_pages - 1; i > 0; i--) {
        int j = (int)(test_rand_u64(s) % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    f->bt    = malloc(sizeof(int32_t) * (size_t)n_seqs * (size_t)f->max_blocks);
    int next = 0;
    for (int q = 0; q < n_seqs; q++)
        for (int bl = 0; bl < f->max_blocks; bl++) f->bt[q * f->max_blocks + bl] = bl * ps < lens[q] ? perm[next++] : -1;
    free(perm);
    const struct coopt_kv_layout *l = &f->kv.layout;
    float                        *x = malloc(sizeof(float) * (size_t)hd);
    for (int q = 0; q < n_seqs; q++)
        for (int32_t p = 0; p < lens[q]; p++)
            for (int32_t h = 0; h < nkv; h++)
                for (int kvi = 0; kvi < 2; kvi++) {
                    int32_t page = f->bt[q * f->max_blocks + p / ps], row = p % ps;
                    // rows of different magnitude, so FP8 scales differ from row to row
                    float amp = 0.25f + (float)((p * 7 + h * 3 + kvi) % 8) * 0.25f;
                    test_fill_uniform(s, x, (size_t)hd, -amp, amp);
                    if (f->extremes) // magnitudes amp * 2^-k down to 2^-23: FP8 subnormals, zeros
                        for (int32_t i = 0; i < hd; i++) x[i] = copysignf(amp * ldexpf(1.0f, -(i % 24)), x[i]);
                    void *sc = l->has_scales ? f->kv.pool + coopt_kv_scale_offset(l, page, 1, kvi, h, row) : NULL;
                    cpu_kv_store_row(l, kvi, x, f->kv.pool + coopt_kv_offset(l, page, 1, kvi, h, row), sc);
                }
    free(x);
    return true;
}

static void fixture_free(struct coopt_backend *be, struct fixture *f) {
    if (f->kv.pool) be->ops->kv_pool_free(be, f->kv.pool, f->pool_bytes);
    free(f->bt);
}

// The query batch: n tokens (seq[i], pos[i]).
struct qbatch {
    int32_t n;
    int32_t seq[160], pos[160];
};

static void qb_add(struct qbatch *qb, int32_t seq, int32_t pos) {
    if (qb->n < 160) qb->seq[qb->n] = seq, qb->pos[qb->n++] = pos;
}

struct backends {
    struct coopt_backend *ref, *fast1, *fast2;
};

static bool backends_init(struct test_ctx *t, struct backends *bs) {
    memset(bs, 0, sizeof(*bs));
    if (coopt_cpu_backend_init(1, true, &bs->ref) != COOPT_OK || coopt_cpu_backend_init(1, false, &bs->fast1) != COOPT_OK ||
        coopt_cpu_backend_init(2, false, &bs->fast2) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "backend init failed");
        return false;
    }
    return true;
}

static void backends_free(struct backends *bs) {
    if (bs->ref) bs->ref->ops->destroy(bs->ref);
    if (bs->fast1) bs->fast1->ops->destroy(bs->fast1);
    if (bs->fast2) bs->fast2->ops->destroy(bs->fast2);
}

static void run_attn(struct coopt_backend *be, int32_t part, bool per_head, float *out, const float *q, int32_t nh,
                     const struct fixture *f, const struct qbatch *qb, int32_t window) {
    struct coopt_batch b = {.n_tokens = qb->n, .pos = qb->pos, .tok_seq = qb->seq, .n_seqs = f->n_seqs,
                            .max_blocks = f->max_blocks, .block_tables = f->bt, .window = window};
    be->attn_partition   = part;
    be->attn_per_head    = per_head;
    be->ops->attention(be, out, q, nh, &f->kv, 1, &b, 1.0f / sqrtf((float)f->kv.layout.head_dim));
}

// Runs every variant against the reference and against each other. `what` names the case.
static bool check_variants(struct test_ctx *t, struct backends *bs, const float *q, int32_t nh, const struct fixture *f,
                           const struct qbatch *qb, int32_t window, const char *what) {
    size_t n    = (size_t)qb->n * nh * f->kv.layout.head_dim;
    float *want = malloc(n * sizeof(float)), *single = malloc(n * sizeof(float));
    float *got = malloc(n * sizeof(float)), *first = malloc(n * sizeof(float));
    bool   ok  = true;
    char   ctx[200];
    run_attn(bs->ref, 0, false, want, q, nh, f, qb, window);
    for (size_t pi = 0; pi < COOPT_ARRAY_LEN(k_parts) && ok; pi++) {
        int32_t part = k_parts[pi];
        for (int v = 0; v < 4 && ok; v++) {
            struct coopt_backend *be       = v / 2 ? bs->fast2 : bs->fast1;
            bool                  per_head = v % 2;
            run_attn(be, part, per_head, got, q, nh, f, qb, window);
            snprintf(ctx, sizeof(ctx), " [%s %s hd %d heads %d/%d window %d partition %d threads %d %s]", what,
                     coopt_dtype_name(f->kv.layout.dtype), f->kv.layout.head_dim, nh, f->kv.layout.n_kv_heads, window,
                     part, be->n_threads, per_head ? "per-head" : "grouped");
            ok = test_near(t, __FILE__, __LINE__, got, want, n, 2e-5, 1e-4);
            if (ok && pi == 0 && v == 0) memcpy(single, got, n * sizeof(float));
            if (ok && pi > 0) ok = test_near(t, __FILE__, __LINE__, got, single, n, 2e-6, 2e-5);
            if (ok && v == 0) memcpy(first, got, n * sizeof(float));
            if (ok && v > 0 && memcmp(got, first, n * sizeof(float)) != 0) {
                test_fail(t, __FILE__, __LINE__, "not bit-identical to 1 thread grouped");
                ok = false;
            }
            if (!ok) strncat(t->msg, ctx, sizeof(t->msg) - strlen(t->msg) - 1);
        }
    }
    free(want), free(single), free(got), free(first);
    return ok;
}

// Every KV type, head dims 64..128, GQA ratios 1, 4, 8; contexts 1..3000 decoded, plus a
// prefill chunk of 6 tokens in the same batch (mixed batch). FP8 cases at GQA 4 store rows whose
// values span 2^-23..1 of the row's amax, so the in-register decoding meets FP8 subnormals.
TEST(attn_splitk_types) {
    struct backends bs;
    if (!backends_init(t, &bs)) goto done;
    uint64_t      s      = 101;
    const int32_t hds[]    = {64, 80, 96, 128};
    const int32_t ratios[] = {1, 4, 8};
    const int32_t longs[]  = {1025, 2000, 3000}; // the longest context cycles through the cases
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_types); d++)
        for (size_t h = 0; h < COOPT_ARRAY_LEN(hds); h++)
            for (size_t r = 0; r < COOPT_ARRAY_LEN(ratios); r++) {
                const int32_t  lens[] = {1, 37, 100, 512, 513, longs[(d + h + r) % 3]};
                const int32_t  n_seqs = (int32_t)COOPT_ARRAY_LEN(lens);
                int32_t        nh = 8, nkv = nh / ratios[r], hd = hds[h], ps = (int32_t)(h % 2 ? 16 : 7);
                struct fixture f = {.extremes = d >= 3 && r == 1}; // FP8 subnormals, GQA 4
                if (!fixture_init(t, bs.ref, &s, &f, k_types[d], nkv, hd, ps, n_seqs, lens)) goto done;
                struct qbatch qb = {0};
                for (int i = 0; i < n_seqs; i++) qb_add(&qb, i, lens[i] - 1);
                for (int i = 6; i > 1; i--) qb_add(&qb, 4, lens[4] - i); // prefill chunk, causal inside
                float *q  = test_rand_array(&s, (size_t)qb.n * nh * hd, -2, 2);
                bool   ok = check_variants(t, &bs, q, nh, &f, &qb, 0, "types");
                free(q);
                fixture_free(bs.ref, &f);
                if (!ok) goto done;
            }
done:
    backends_free(&bs);
}

// Sliding windows shorter and longer than the partitions, with the pages before every window
// released (-1): they must never be read.
TEST(attn_splitk_window) {
    struct backends bs;
    if (!backends_init(t, &bs)) goto done;
    uint64_t      s         = 202;
    const int32_t lens[]    = {3000, 700, 40};
    const int32_t windows[] = {37, 100, 511, 513, 1000};
    const enum coopt_dtype dts[] = {COOPT_DTYPE_F16, COOPT_DTYPE_FP8_E4M3};
    for (size_t d = 0; d < COOPT_ARRAY_LEN(dts); d++)
        for (size_t w = 0; w < COOPT_ARRAY_LEN(windows); w++) {
            int32_t        nh = 8, nkv = 2, hd = w % 2 ? 128 : 64, ps = 16, window = windows[w];
            struct fixture f = {0};
            if (!fixture_init(t, bs.ref, &s, &f, dts[d], nkv, hd, ps, 3, lens)) goto done;
            struct qbatch qb = {0};
            for (int i = 0; i < 3; i++) qb_add(&qb, i, lens[i] - 1);
            for (int i = 10; i > 1; i--) qb_add(&qb, 0, lens[0] - i);
            for (int q = 0; q < 3; q++) { // release the pages wholly before the earliest window
                int32_t first = COOPT_MAX(0, lens[q] - 10 - window + 1);
                for (int bl = 0; (bl + 1) * ps <= first; bl++) f.bt[q * f.max_blocks + bl] = -1;
            }
            float *q  = test_rand_array(&s, (size_t)qb.n * nh * hd, -2, 2);
            bool   ok = check_variants(t, &bs, q, nh, &f, &qb, window, "window");
            free(q);
            fixture_free(bs.ref, &f);
            if (!ok) goto done;
        }
done:
    backends_free(&bs);
}

// Sharp softmax: scores spread over ~100, so partitions have very different maxima and most
// partitions' weights underflow in the merge.
TEST(attn_splitk_sharp) {
    struct backends bs;
    if (!backends_init(t, &bs)) goto done;
    uint64_t       s      = 303;
    const int32_t  lens[] = {2000, 300};
    int32_t        nh = 32, nkv = 8, hd = 128;
    struct fixture f = {0};
    if (!fixture_init(t, bs.ref, &s, &f, COOPT_DTYPE_F32, nkv, hd, 16, 2, lens)) goto done;
    struct qbatch qb = {0};
    qb_add(&qb, 0, 1999), qb_add(&qb, 1, 299), qb_add(&qb, 0, 1000);
    float *q  = test_rand_array(&s, (size_t)qb.n * nh * hd, -6, 6);
    bool   ok = check_variants(t, &bs, q, nh, &f, &qb, 0, "sharp");
    free(q);
    fixture_free(bs.ref, &f);
    (void)ok;
done:
    backends_free(&bs);
}

// A long prefill chunk with tiny partitions: the partials exceed one wave (attn_cpu.c
// ATTN_WAVE_BYTES), so the batch runs in several waves. Also: repeated decode calls reuse the
// attention scratch (no allocation in steady state).
TEST(attn_splitk_waves_scratch) {
    struct backends bs;
    if (!backends_init(t, &bs)) goto done;
    uint64_t       s      = 404;
    const int32_t  lens[] = {3000};
    int32_t        nh = 4, nkv = 1, hd = 64;
    struct fixture f = {0};
    if (!fixture_init(t, bs.ref, &s, &f, COOPT_DTYPE_F16, nkv, hd, 16, 1, lens)) goto done;
    struct qbatch qb = {0};
    for (int i = 64; i >= 1; i--) qb_add(&qb, 0, 3000 - i);
    size_t n    = (size_t)qb.n * nh * hd;
    float *q    = test_rand_array(&s, n, -2, 2);
    float *want = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float)), *single = malloc(n * sizeof(float));
    run_attn(bs.ref, 0, false, want, q, nh, &f, &qb, 0);
    run_attn(bs.fast2, 0, false, single, q, nh, &f, &qb, 0);
    // 375 partitions of 8 x 4 heads x (64 + 16) floats = 480 KB per token: 64 tokens > 16 MiB
    run_attn(bs.fast2, 8, false, got, q, nh, &f, &qb, 0);
    bool ok = test_near(t, __FILE__, __LINE__, got, want, n, 2e-5, 1e-4) &&
              test_near(t, __FILE__, __LINE__, got, single, n, 2e-6, 2e-5);
    struct cpu_backend *cb = bs.fast2->impl;
    if (ok) {
        // steady-state decode: the scratch neither moves nor grows
        struct qbatch one = {.n = 1, .seq = {0}, .pos = {2999}};
        run_attn(bs.fast2, 512, false, got, q, nh, &f, &one, 0);
        void  *p0 = cb->attn_scratch;
        size_t b0 = cb->attn_scratch_bytes;
        for (int i = 0; i < 5; i++) run_attn(bs.fast2, 512, i % 2, got, q, nh, &f, &one, 0);
        CHECKF(t, cb->attn_scratch == p0 && cb->attn_scratch_bytes == b0, "attention scratch reallocated");
        CHECKF(t, b0 < (32u << 20), "attention scratch %zu bytes", b0);
    }
    free(q), free(want), free(got), free(single);
    fixture_free(bs.ref, &f);
done:
    backends_free(&bs);
}

// The ablation switch changes the read pattern only: per-head reads of an MHA model equal the
// grouped ones trivially, so check a GQA model where per-head means 8 reads of each K/V row.
TEST(attn_per_head_generic_hd) {
    // head_dim 40 and 8 are not multiples of 16: the generic (non-AVX-512-kernel) path
    struct backends bs;
    if (!backends_init(t, &bs)) goto done;
    uint64_t      s      = 505;
    const int32_t lens[] = {700, 5};
    const int32_t hds[]  = {8, 40};
    for (size_t h = 0; h < COOPT_ARRAY_LEN(hds); h++)
        for (size_t d = 0; d < COOPT_ARRAY_LEN(k_types); d++) {
            struct fixture f = {0};
            if (!fixture_init(t, bs.ref, &s, &f, k_types[d], 1, hds[h], 16, 2, lens)) goto done;
            struct qbatch qb = {0};
            qb_add(&qb, 0, 699), qb_add(&qb, 1, 4), qb_add(&qb, 0, 600);
            float *q  = test_rand_array(&s, (size_t)qb.n * 8 * hds[h], -2, 2);
            bool   ok = check_variants(t, &bs, q, 8, &f, &qb, 0, "generic");
            free(q);
            fixture_free(bs.ref, &f);
            if (!ok) goto done;
        }
done:
    backends_free(&bs);
}
