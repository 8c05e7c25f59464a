/*
 * test_cuda.c -- the CUDA backend against the CPU scalar reference (coopt_cpu_backend_init(1,
 * true)): every op on random inputs at real and odd shapes, the lazily mapped KV pool, a whole
 * forward pass of random models, and the real test models through the public API (CUDA logits
 * against the CPU backend's). Every test skips when the build has no CUDA or no GPU is present
 * (CI compiles CUDA code on machines without one).
 *
 * Tolerances (|got - ref| <= atol + rtol*|ref|, or a per-element bound), and why:
 *   embed, add, get_rows: exact (the same conversions, no arithmetic to reorder).
 *   rmsnorm 1e-5 rel: f32 tree reduction of the sum of squares against the reference's double.
 *   silu_mul 2e-6 rel: CUDA expf is within 2 ulp, glibc's within 1.
 *   rope 2e-6 abs/rel: CUDA cosf/sinf within 2 ulp of glibc's (angles |x| < 1e4 rad).
 *   matmul GEMV path (F32 n_rows <= 8, F16/BF16 n_rows <= 2, Q8_0/Q4_0 always): 1e-5 *
 *     sum_i |w_i x_i|, f32 accumulation in another order against a double reference; Q8_0/Q4_0
 *     add sum_blocks amax(x block)/254 * sum_block |w| (x is rounded to int8 per 32-block, half
 *     a quantum at most, as the CPU fast path; matmul.cu). cuBLAS path (the other rows): F32 the
 *     same (no TF32); F16/BF16 add 2^-11 / 2^-8 * sum|w x| because x is rounded to the weight's
 *     16-bit type (half an ulp per element, worst case all one sign).
 *   rope_store: q as rope; V rows byte-identical to the reference (no arithmetic but the
 *     conversion, which rounds identically); K rows within one ulp of the cache type of the
 *     reference value (an ulp apart in cos/sin can flip a rounding) plus 1e-6 of the row's amax
 *     (the f32 rotation itself), and for 16/8-bit types at most 2% of K bytes differ.
 *   attention 2e-5 abs + 1e-4 rel: f32 online softmax with expf against double math, both
 *     reading the same cache bytes.
 *   forward / real models: logits within 1e-3 * max|ref logit| + 1e-3 * |ref| (f32 end to end;
 *     the F16 random model 2e-2, its prefill rounds activations to f16 for cuBLAS; Q4_0 3e-2,
 *     its matmuls round activations to int8 per 32-block, ~0.1-0.4 % of sum|w x| each); FP8 KV
 *     models within 0.1 * max|logit| (an ulp flip of an FP8 value moves a logit by ~1e-2).
 */
#include "backend.h"
#include "pick.h"
#include "sampler.h"
#include "coopt.h"
#include "dtype.h"
#include "forward.h"
#include "kv_cache.h"
#include "model.h"
#include "test.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef COOPT_CUDA
#include "cuda/cuda.h"
#include "cuda/gptq_dev.h"

#include "test_cuda_util.h"

// helpers defined in test_safetensors.c
void        st_test_capture_begin(void);
const char *st_test_capture_end(void);

static const enum coopt_dtype k_wtypes[] = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_BF16, COOPT_DTYPE_Q8_0,
                                            COOPT_DTYPE_Q4_0};
static const enum coopt_dtype k_kvtypes[] = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_BF16,
                                             COOPT_DTYPE_FP8_E4M3, COOPT_DTYPE_FP8_E5M2};

static bool is_quant(enum coopt_dtype d) { return d == COOPT_DTYPE_Q8_0 || d == COOPT_DTYPE_Q4_0; }

// ---- memory ----

TEST(cuda_memory) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    struct coopt_backend *be = p.cu;
    CHECK(t, strcmp(be->ops->name, "cuda") == 0);
    char  back[6] = {0};
    void *m       = dev_copy(be, "hello", 6);
    dev_read(be, back, m, 6);
    CHECK(t, strcmp(back, "hello") == 0);
    be->ops->free(be, m);
    be->ops->free(be, NULL);
    // an impossible allocation is a status, and the backend keeps working afterwards
    void *huge = (void *)1;
    CHECK(t, be->ops->alloc(be, (size_t)1 << 52, &huge) == COOPT_ERR_NOMEM && huge == NULL);
    m = dev_copy(be, "again", 6);
    dev_read(be, back, m, 6);
    be->ops->free(be, m);
    CHECK(t, strcmp(back, "again") == 0);
    // zero-byte transfers are no-ops
    be->ops->upload(be, NULL, NULL, 0);
    be->ops->download(be, NULL, NULL, 0);
    be->ops->sync(be);
    cu_pair_free(&p);
}

// ---- embed, rmsnorm, element-wise ----

TEST(cuda_embed) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t s = 3;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_wtypes); d++) {
        int64_t  n_in = is_quant(k_wtypes[d]) ? 96 : 77, n_vocab = 50;
        int32_t  n    = 600;
        size_t   rb   = coopt_dtype_row_bytes(k_wtypes[d], n_in);
        float   *tf   = test_rand_array(&s, (size_t)n_in * n_vocab, -1, 1);
        uint8_t *tq   = malloc(rb * n_vocab);
        for (int64_t r = 0; r < n_vocab; r++) coopt_quant_row(k_wtypes[d], tf + r * n_in, tq + r * rb, n_in);
        int32_t tokens[600];
        for (int i = 0; i < n; i++) tokens[i] = (int32_t)(test_rand_u64(&s) % n_vocab);
        struct coopt_weight w  = {.dtype = k_wtypes[d], .n_in = n_in, .n_out = n_vocab, .data = tq};
        struct coopt_weight dw = w;
        dw.data                = dev_copy(p.cu, tq, rb * n_vocab);
        int32_t *dtok          = dev_copy(p.cu, tokens, sizeof(tokens));
        float   *dout          = dev_copy(p.cu, NULL, (size_t)n * n_in * sizeof(float));
        float   *got = malloc((size_t)n * n_in * sizeof(float)), *want = malloc((size_t)n * n_in * sizeof(float));
        p.cu->ops->embed(p.cu, dout, &dw, dtok, n);
        dev_read(p.cu, got, dout, (size_t)n * n_in * sizeof(float));
        p.ref->ops->embed(p.ref, want, &w, tokens, n);
        bool ok = memcmp(got, want, (size_t)n * n_in * sizeof(float)) == 0;
        p.cu->ops->free(p.cu, (void *)dw.data), p.cu->ops->free(p.cu, dtok), p.cu->ops->free(p.cu, dout);
        free(tf), free(tq), free(got), free(want);
        CHECKF(t, ok, "embed %s differs from the reference", coopt_dtype_name(k_wtypes[d]));
    }
    cu_pair_free(&p);
}

TEST(cuda_rmsnorm) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t      s      = 5;
    const int32_t dims[] = {1, 15, 64, 100, 4096, 5120};
    for (size_t d = 0; d < COOPT_ARRAY_LEN(dims); d++) {
        int32_t dim = dims[d], n_rows = 37;
        size_t  n   = (size_t)dim * n_rows;
        float  *x = test_rand_array(&s, n, -3, 3), *w = test_rand_array(&s, dim, 0.5f, 1.5f);
        float  *got = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float));
        float  *dx = dev_copy(p.cu, x, n * 4), *dw = dev_copy(p.cu, w, (size_t)dim * 4), *dout = dev_copy(p.cu, NULL, n * 4);
        p.ref->ops->rmsnorm(p.ref, want, x, w, n_rows, dim, 1e-5f);
        p.cu->ops->rmsnorm(p.cu, dout, dx, dw, n_rows, dim, 1e-5f);
        dev_read(p.cu, got, dout, n * 4);
        bool ok = test_near(t, __FILE__, __LINE__, got, want, n, 1e-7, 1e-5);
        p.cu->ops->rmsnorm(p.cu, dx, dx, dw, n_rows, dim, 1e-5f); // in place
        dev_read(p.cu, got, dx, n * 4);
        ok = ok && test_near(t, __FILE__, __LINE__, got, want, n, 1e-7, 1e-5);
        p.cu->ops->free(p.cu, dx), p.cu->ops->free(p.cu, dw), p.cu->ops->free(p.cu, dout);
        free(x), free(w), free(got), free(want);
        if (!ok) return;
    }
    cu_pair_free(&p);
}

TEST(cuda_elementwise) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t      s    = 9;
    const int64_t ns[] = {1, 17, 1000, 100003, 3000000};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(ns); k++) {
        int64_t n = ns[k];
        float  *a = test_rand_array(&s, n, -20, 20), *b = test_rand_array(&s, n, -2, 2);
        float  *got = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float));
        float  *da = dev_copy(p.cu, a, n * 4), *db = dev_copy(p.cu, b, n * 4), *dout = dev_copy(p.cu, NULL, n * 4);
        p.ref->ops->silu_mul(p.ref, want, a, b, n);
        p.cu->ops->silu_mul(p.cu, dout, da, db, n);
        dev_read(p.cu, got, dout, n * 4);
        bool ok = test_near(t, __FILE__, __LINE__, got, want, n, 1e-7, 2e-6);
        p.ref->ops->add(p.ref, want, a, b, n);
        p.cu->ops->add(p.cu, da, da, db, n); // aliasing out == a
        dev_read(p.cu, got, da, n * 4);
        ok = ok && test_near(t, __FILE__, __LINE__, got, want, n, 0, 0);
        p.cu->ops->free(p.cu, da), p.cu->ops->free(p.cu, db), p.cu->ops->free(p.cu, dout);
        free(a), free(b), free(got), free(want);
        if (!ok) return;
    }
    // get_rows: to another buffer, and in place with ascending rows (what the LM head does)
    int32_t dim = 1000, n_rows = 9, rows[4] = {1, 3, 4, 8};
    float  *x   = test_rand_array(&s, (size_t)dim * n_rows, -1, 1);
    float  *want = malloc(4 * (size_t)dim * 4), *got = malloc(4 * (size_t)dim * 4);
    p.ref->ops->get_rows(p.ref, want, x, rows, 4, dim);
    float   *dx = dev_copy(p.cu, x, (size_t)dim * n_rows * 4), *dout = dev_copy(p.cu, NULL, 4 * (size_t)dim * 4);
    int32_t *dr = dev_copy(p.cu, rows, sizeof(rows));
    p.cu->ops->get_rows(p.cu, dout, dx, dr, 4, dim);
    dev_read(p.cu, got, dout, 4 * (size_t)dim * 4);
    bool ok = test_near(t, __FILE__, __LINE__, got, want, 4 * (size_t)dim, 0, 0);
    p.cu->ops->get_rows(p.cu, dx, dx, dr, 4, dim);
    dev_read(p.cu, got, dx, 4 * (size_t)dim * 4);
    ok = ok && test_near(t, __FILE__, __LINE__, got, want, 4 * (size_t)dim, 0, 0);
    p.cu->ops->free(p.cu, dx), p.cu->ops->free(p.cu, dout), p.cu->ops->free(p.cu, dr);
    free(x), free(want), free(got);
    if (!ok) return;
    cu_pair_free(&p);
}

// ---- argmax ----

// The CUDA argmax against the CPU's on rows of real vocabulary sizes (and odd ones, and one
// shorter than a block) with ties across warps and blocks' strides, NaN and -inf sprinkled in,
// and rows with nothing to choose. Exact: an index, no arithmetic.
TEST(cuda_argmax) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t      s    = 17;
    const int32_t ns[] = {100, 8191, 32000, 32001, 128256};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(ns); k++) {
        const int32_t n = ns[k], R = 6;
        float        *x = test_rand_array(&s, (size_t)R * n, -30, 30);
        for (int32_t i = 0; i < n; i += 97) x[(size_t)2 * n + i] = NAN;
        for (int32_t i = 50; i < n; i += 97) x[(size_t)2 * n + i] = -INFINITY;
        x[n + n - 1] = x[n + n / 3] = x[n + 5] = 99; // row 1: three-way tie
        x[(size_t)2 * n + n / 2] = 98;              // row 2: beside NaN and -inf
        for (int32_t i = 0; i < n; i++) x[(size_t)3 * n + i] = -INFINITY, x[(size_t)4 * n + i] = NAN;
        x[(size_t)5 * n + n - 1] = 1e30f; // row 5: the last element
        int32_t want[6], got[6];
        p.ref->ops->argmax(p.ref, want, NULL, x, R, n);
        float   *dx = dev_copy(p.cu, x, (size_t)R * n * 4);
        int32_t *dg = dev_copy(p.cu, NULL, sizeof(got));
        int32_t *hg = NULL;
        CHECK(t, p.cu->ops->host_alloc(p.cu, sizeof(got), (void **)&hg) == COOPT_OK);
        p.cu->ops->argmax(p.cu, dg, hg, dx, R, n);
        dev_read(p.cu, got, dg, sizeof(got));
        p.cu->ops->free(p.cu, dx), p.cu->ops->free(p.cu, dg);
        free(x);
        for (int r = 0; r < R; r++)
            CHECKF(t, got[r] == want[r] && hg[r] == want[r], "n %d row %d: argmax %d (host copy %d), cpu %d", n, r, got[r],
                   hg[r], want[r]);
        p.cu->ops->host_free(p.cu, hg);
        CHECK(t, want[1] == 5 && want[3] == 0 && want[4] == 0 && want[5] == n - 1);
    }
    cu_pair_free(&p);
}

// ---- sample (the pick kernel) ----

// Rows of n logits of kind 0-6: random; a few levels (ties everywhere, also at the k-th);
// NaN and -inf sprinkled; two +inf; -0 and +0 on top (ties by id, the sign kept); everything
// -inf or NaN; fewer valid logits than k (the rest -inf).
static void sample_row(float *x, int32_t n, int kind, uint64_t *s) {
    for (int32_t i = 0; i < n; i++) x[i] = (float)(test_rand_u64(s) % 2000000) * 1e-5f - 10.0f;
    if (kind == 1)
        for (int32_t i = 0; i < n; i++) x[i] = (float)(test_rand_u64(s) % 5);
    if (kind == 2)
        for (int32_t i = 0; i < n; i += 3) x[i] = i % 2 ? NAN : -INFINITY;
    if (kind == 3) x[n / 3] = x[n - 1] = INFINITY;
    if (kind == 4) {
        for (int32_t i = 0; i < n; i++) x[i] = -fabsf(x[i]) - 1.0f;
        for (int32_t i = n / 7; i < n; i += n / 5 + 1) x[i] = (i / 7) % 2 ? -0.0f : 0.0f;
    }
    if (kind == 5)
        for (int32_t i = 0; i < n; i++) x[i] = i % 2 ? NAN : -INFINITY;
    if (kind == 6)
        for (int32_t i = 0; i < n; i++)
            if (i % (n / 5 + 1)) x[i] = -INFINITY;
}

// The sample op against coopt_pick_row (the host sampler's code) on rows of 512 to 262144 logits,
// every row kind above, top_k 1 / 7 / 40 / 64, with and without top-p and min-p, temperature 0.3
// and 2: the same token, the same random state after each of 6 draws per row (on the device, in
// the page-locked result and on the host), for segment counts 1 to 64 and a last segment of one
// logit (4097).
TEST(cuda_sample) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t      s    = 29;
    const int32_t ns[] = {512, 2048, 4096, 4097, 32000, 128256, 262144};
    struct {
        int32_t k;
        float   temp, top_p, min_p;
    } const ps_set[] = {{40, 2.0f, 0.95f, 0.05f}, {1, 2.0f, 1.0f, 0.0f}, {7, 0.3f, 1.0f, 0.0f}, {64, 2.0f, 0.5f, 0.0f},
                        {64, 2.0f, 1.0f, 0.2f}};
    uint8_t *hres = NULL;
    CHECK(t, p.cu->ops->host_alloc(p.cu, PICK_RESULT_BYTES, (void **)&hres) == COOPT_OK);
    int n_rows = 0, n_draws = 0, n_moved = 0;
    for (size_t a = 0; a < COOPT_ARRAY_LEN(ns) && !t->failed; a++) {
        const int32_t n  = ns[a];
        float        *x  = malloc((size_t)n * sizeof(float));
        float        *dx = dev_copy(p.cu, NULL, (size_t)n * sizeof(float));
        uint8_t      *blk = dev_copy(p.cu, NULL, pick_scratch_bytes(n));
        struct pick_state *dst = dev_copy(p.cu, NULL, sizeof(struct pick_state));
        int32_t      *dout = dev_copy(p.cu, NULL, sizeof(int32_t));
        uint8_t       zeros[PICK_CANDS_OFF] = {0};
        p.cu->ops->upload(p.cu, blk, zeros, sizeof(zeros));
        for (int kind = 0; kind < 7 && !t->failed; kind++) {
            sample_row(x, n, kind, &s);
            p.cu->ops->upload(p.cu, dx, x, (size_t)n * sizeof(float));
            for (size_t q = 0; q < COOPT_ARRAY_LEN(ps_set) && !t->failed; q++) {
                struct coopt_sampler_params sp = coopt_sampler_default_params();
                sp.top_k = ps_set[q].k, sp.temp = ps_set[q].temp, sp.top_p = ps_set[q].top_p, sp.min_p = ps_set[q].min_p;
                sp.seed = 1000 + (uint64_t)q;
                struct coopt_sampler *smp = NULL;
                struct pick_state     hs;
                CHECK(t, coopt_sampler_init(&sp, n, &smp) == COOPT_OK && coopt_sampler_pick_state(smp, &hs));
                coopt_sampler_free(smp);
                p.cu->ops->upload(p.cu, dst, &hs, sizeof(hs));
                int32_t first = -1;
                for (int d = 0; d < 6 && !t->failed; d++) {
                    const int32_t want = coopt_pick_row(x, n, &hs);
                    memset(hres, 0xff, PICK_RESULT_BYTES);
                    p.cu->ops->sample(p.cu, dout, hres, dx, 1, n, dst, blk);
                    int32_t           got = -1, hgot = -1;
                    struct pick_state ds;
                    dev_read(p.cu, &got, dout, sizeof(got));
                    dev_read(p.cu, &ds, dst, sizeof(ds));
                    memcpy(&hgot, hres, sizeof(hgot));
                    CHECKF(t, got == want && hgot == want, "n %d kind %d params %zu draw %d: token %d (result %d), host %d", n,
                           kind, q, d, got, hgot, want);
                    CHECKF(t, !memcmp(ds.rng, hs.rng, sizeof(hs.rng)) && !memcmp(hres + 8, hs.rng, sizeof(hs.rng)),
                           "n %d kind %d params %zu draw %d: random state differs", n, kind, q, d);
                    if (d == 0) first = want;
                    n_moved += d > 0 && want != first;
                    n_draws++;
                }
                n_rows++;
            }
        }
        uint32_t counter = 1;
        dev_read(p.cu, &counter, blk, sizeof(counter));
        CHECKF(t, counter == 0, "n %d: the segment counter is %u after the calls", n, counter);
        p.cu->ops->free(p.cu, dx), p.cu->ops->free(p.cu, blk), p.cu->ops->free(p.cu, dout), p.cu->ops->free(p.cu, dst);
        free(x);
    }
    p.cu->ops->host_free(p.cu, hres);
    CHECKF(t, n_moved > n_draws / 8, "only %d of %d draws moved away from a row's first: the test sees no draws", n_moved,
           n_draws);
    (void)n_rows;
    cu_pair_free(&p);
}

// The op over several rows at once (a batch drawn where its logits are): 5 rows of 32000 or
// 128256 logits, each its own parameters, kind and random state, row 2 skipped (top_k 0: its
// token, result and state untouched), 3 draws: every other row's token and state equal
// coopt_pick_row's on that row (a kernel that mixed up the rows' logits, states or scratch
// would not), the scratch counters zero afterwards.
TEST(cuda_sample_rows) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t s = 31;
    enum { R = 5 };
    uint8_t *hres = NULL;
    CHECK(t, p.cu->ops->host_alloc(p.cu, R * PICK_RESULT_BYTES, (void **)&hres) == COOPT_OK);
    const int32_t ns[] = {32000, 128256};
    for (size_t a = 0; a < COOPT_ARRAY_LEN(ns) && !t->failed; a++) {
        const int32_t      n = ns[a];
        const size_t       sb = pick_scratch_bytes(n);
        float             *x  = malloc((size_t)R * (size_t)n * sizeof(float));
        struct pick_state  hs[R];
        uint8_t           *zeros = calloc(R, sb);
        for (int r = 0; r < R; r++) {
            sample_row(x + (size_t)r * n, n, r % 2 ? 1 : 0, &s);
            struct coopt_sampler_params sp = coopt_sampler_default_params();
            sp.top_k = r == 3 ? 64 : 40 - r, sp.temp = 1.5f + 0.1f * (float)r, sp.seed = 77 + (uint64_t)r;
            struct coopt_sampler *smp = NULL;
            CHECK(t, coopt_sampler_init(&sp, n, &smp) == COOPT_OK && coopt_sampler_pick_state(smp, &hs[r]));
            coopt_sampler_free(smp);
        }
        hs[2].p.top_k      = 0;
        float             *dx   = dev_copy(p.cu, x, (size_t)R * (size_t)n * sizeof(float));
        uint8_t           *blk  = dev_copy(p.cu, zeros, R * sb);
        struct pick_state *dst  = dev_copy(p.cu, hs, sizeof(hs));
        int32_t            sent[R] = {-7, -7, -7, -7, -7};
        int32_t           *dout = dev_copy(p.cu, sent, sizeof(sent));
        struct pick_state  skipped = hs[2];
        memset(hres, 0xee, R * PICK_RESULT_BYTES);
        for (int d = 0; d < 3 && !t->failed; d++) {
            p.cu->ops->sample(p.cu, dout, hres, dx, R, n, dst, blk);
            int32_t           got[R];
            struct pick_state ds[R];
            dev_read(p.cu, got, dout, sizeof(got));
            dev_read(p.cu, ds, dst, sizeof(ds));
            for (int r = 0; r < R; r++) {
                const uint8_t *h = hres + (size_t)r * PICK_RESULT_BYTES;
                if (r == 2) {
                    CHECKF(t, got[r] == -7 && h[0] == 0xee && !memcmp(&ds[r], &skipped, sizeof(skipped)),
                           "n %d draw %d: the skipped row was written (token %d)", n, d, got[r]);
                    continue;
                }
                const int32_t want = coopt_pick_row(x + (size_t)r * n, n, &hs[r]);
                int32_t       hgot = -1;
                memcpy(&hgot, h, sizeof(hgot));
                CHECKF(t, got[r] == want && hgot == want && !memcmp(ds[r].rng, hs[r].rng, sizeof(hs[r].rng)) &&
                              !memcmp(h + 8, hs[r].rng, sizeof(hs[r].rng)),
                       "n %d draw %d row %d: token %d (result %d), host %d, or the random state differs", n, d, r, got[r],
                       hgot, want);
            }
        }
        uint32_t counters[R];
        for (int r = 0; r < R; r++) dev_read(p.cu, &counters[r], blk + (size_t)r * sb, sizeof(uint32_t));
        for (int r = 0; r < R; r++) CHECKF(t, counters[r] == 0, "n %d row %d: segment counter %u", n, r, counters[r]);
        p.cu->ops->free(p.cu, dx), p.cu->ops->free(p.cu, blk), p.cu->ops->free(p.cu, dst), p.cu->ops->free(p.cu, dout);
        free(x), free(zeros);
    }
    p.cu->ops->host_free(p.cu, hres);
    cu_pair_free(&p);
}

// ---- matmul ----

static bool check_matmul(struct test_ctx *t, struct cu_pair *p, uint64_t *s, enum coopt_dtype dt, int64_t n_in,
                         int64_t n_out, int32_t n_rows, bool bias) {
    size_t   rb   = coopt_dtype_row_bytes(dt, n_in);
    float   *wf   = test_rand_array(s, (size_t)n_in * n_out, -1, 1);
    uint8_t *wq   = malloc(rb * n_out);
    float   *wd   = malloc((size_t)n_in * n_out * sizeof(float));
    float   *x    = test_rand_array(s, (size_t)n_in * n_rows, -2, 2);
    float   *b    = bias ? test_rand_array(s, n_out, -1, 1) : NULL;
    size_t   no   = (size_t)n_out * n_rows;
    float   *got  = malloc(no * sizeof(float)), *want = malloc(no * sizeof(float));
    for (int64_t o = 0; o < n_out; o++) {
        coopt_quant_row(dt, wf + o * n_in, wq + o * rb, n_in);
        coopt_dequant_row(dt, wq + o * rb, wd + o * n_in, n_in);
    }
    struct coopt_weight w = {.dtype = dt, .n_in = n_in, .n_out = n_out, .data = wq, .bias = b};
    p->ref->ops->matmul(p->ref, want, x, &w, n_rows);
    struct coopt_weight dw = w;
    dw.data                = dev_copy(p->cu, wq, rb * n_out);
    dw.bias                = b ? dev_copy(p->cu, b, (size_t)n_out * 4) : NULL;
    float *dx = dev_copy(p->cu, x, (size_t)n_in * n_rows * 4), *dout = dev_copy(p->cu, NULL, no * 4);
    p->cu->ops->matmul(p->cu, dout, dx, &dw, n_rows);
    dev_read(p->cu, got, dout, no * 4);
    bool   cublas = (dt == COOPT_DTYPE_F32 && n_rows > 8) || ((dt == COOPT_DTYPE_F16 || dt == COOPT_DTYPE_BF16) && n_rows > 2);
    double xr     = !cublas ? 0 : dt == COOPT_DTYPE_F16 ? ldexp(1, -11) : dt == COOPT_DTYPE_BF16 ? ldexp(1, -8) : 0;
    bool   ok     = true;
    for (int32_t r = 0; r < n_rows && ok; r++) {
        const float *xrow = x + (size_t)r * n_in;
        for (int64_t o = 0; o < n_out && ok; o++) {
            double mag = 0, qerr = 0;
            for (int64_t i = 0; i < n_in; i++) mag += fabs((double)wd[o * n_in + i] * xrow[i]);
            for (int64_t b0 = 0; is_quant(dt) && b0 < n_in; b0 += 32) {
                double amax = 0, sw = 0;
                for (int j = 0; j < 32; j++) amax = fmax(amax, fabs(xrow[b0 + j])), sw += fabs(wd[o * n_in + b0 + j]);
                qerr += amax / 254.0 * sw;
            }
            double tol = (1e-5 + xr) * mag + qerr + 1e-6;
            double g = got[(size_t)r * n_out + o], e = want[(size_t)r * n_out + o];
            if (!(fabs(g - e) <= tol)) {
                test_fail(t, __FILE__, __LINE__,
                          "matmul %s n_in %lld n_out %lld n_rows %d bias %d: out[%d][%lld] = %.7g, ref %.7g, tol %.3g",
                          coopt_dtype_name(dt), (long long)n_in, (long long)n_out, n_rows, bias, r, (long long)o, g,
                          e, tol);
                ok = false;
            }
        }
    }
    p->cu->ops->free(p->cu, (void *)dw.data), p->cu->ops->free(p->cu, (void *)dw.bias);
    p->cu->ops->free(p->cu, dx), p->cu->ops->free(p->cu, dout);
    free(wf), free(wq), free(wd), free(x), free(b), free(got), free(want);
    return ok;
}

TEST(cuda_matmul) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t      s         = 42;
    const int64_t n_ins[]   = {64, 172, 256, 4096, 4128}; // 256, 4096: the staged quantized path
    const int64_t n_outs[]  = {1, 7, 173, 512};
    const int32_t n_rowss[] = {1, 2, 3, 8, 17, 64};
    bool          ok        = true;
    int           i         = 0;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_wtypes) && ok; d++)
        for (size_t a = 0; a < COOPT_ARRAY_LEN(n_ins) && ok; a++) {
            if (is_quant(k_wtypes[d]) && n_ins[a] % 32) continue;
            for (size_t bo = 0; bo < COOPT_ARRAY_LEN(n_outs) && ok; bo++)
                for (size_t c = 0; c < COOPT_ARRAY_LEN(n_rowss) && ok; c++, i++)
                    ok = check_matmul(t, &p, &s, k_wtypes[d], n_ins[a], n_outs[bo], n_rowss[c], i % 3 == 0);
        }
    if (!ok) return;
    cu_pair_free(&p);
}

// ---- rope ----

static float *make_inv_freq(int32_t hd, float theta) {
    float *f = malloc((size_t)hd / 2 * sizeof(float));
    for (int32_t i = 0; i < hd / 2; i++) f[i] = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
    return f;
}

TEST(cuda_rope) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t s = 11;
    for (int layout = 0; layout < 2; layout++)
        for (int32_t hd = 8; hd <= 128; hd *= 2) {
            int32_t           nh = 5, n = 40;
            size_t            nq = (size_t)n * nh * hd;
            float            *inv  = make_inv_freq(hd, 10000.0f);
            struct coopt_rope rope = {.layout = layout ? COOPT_ROPE_HALF : COOPT_ROPE_INTERLEAVED, .head_dim = hd,
                                      .inv_freq = inv};
            int32_t           pos[40];
            for (int i = 0; i < n; i++) pos[i] = (int32_t)(test_rand_u64(&s) % 5000);
            float   *q = test_rand_array(&s, nq, -1, 1), *got = malloc(nq * 4);
            float   *dq   = dev_copy(p.cu, q, nq * 4);
            int32_t *dpos = dev_copy(p.cu, pos, sizeof(pos));
            p.ref->ops->rope(p.ref, q, nh, pos, n, &rope);
            p.cu->ops->rope(p.cu, dq, nh, dpos, n, &rope);
            dev_read(p.cu, got, dq, nq * 4);
            bool ok = test_near(t, __FILE__, __LINE__, got, q, nq, 2e-6, 2e-6);
            p.cu->ops->free(p.cu, dq), p.cu->ops->free(p.cu, dpos);
            free(inv), free(q), free(got);
            if (!ok) return;
        }
    cu_pair_free(&p);
}

// ---- KV helpers ----

// One cached row as f32 (scale applied), from a host copy of the pool.
static void kv_read_row(const struct coopt_kv_layout *l, const uint8_t *pool, int64_t page, int32_t layer, int kvi,
                        int32_t h, int32_t row, float *dst) {
    coopt_dequant_row(l->dtype, pool + coopt_kv_offset(l, page, layer, kvi, h, row), dst, l->head_dim);
    if (l->has_scales) {
        float sc;
        memcpy(&sc, pool + coopt_kv_scale_offset(l, page, layer, kvi, h, row), 4);
        for (int32_t i = 0; i < l->head_dim; i++) dst[i] *= sc;
    }
}

// Relative size of one ulp of the cache type (FP8: of the row's amax, which maps to the FP8 max).
static double kv_ulp(enum coopt_dtype dt) {
    switch (dt) {
    case COOPT_DTYPE_F32: return ldexp(1, -23);
    case COOPT_DTYPE_F16: return ldexp(1, -10);
    case COOPT_DTYPE_BF16: return ldexp(1, -7);
    case COOPT_DTYPE_FP8_E4M3: return ldexp(1, -3);
    default: return ldexp(1, -2);
    }
}

TEST(cuda_rope_store) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t      s     = 13;
    const int32_t hds[] = {8, 16, 64, 80, 128, 256};
    for (size_t kt = 0; kt < COOPT_ARRAY_LEN(k_kvtypes); kt++)
        for (size_t hi = 0; hi < COOPT_ARRAY_LEN(hds); hi++) {
            enum coopt_dtype dt = k_kvtypes[kt];
            int    layout = (int)(hi + kt) % 2;
            int32_t hd = hds[hi], nh = 8, nkv = 2, ps = 7, n_layers = 3, layer = 1, n = 23, n_pages = 5;
            struct coopt_kv_cache kv = {0};
            CHECK(t, coopt_kv_layout_init(&kv.layout, dt, n_layers, nkv, hd, ps) == COOPT_OK);
            const struct coopt_kv_layout *l          = &kv.layout;
            size_t                        pool_bytes = l->page_bytes * n_pages;
            uint8_t *ref_pool = calloc(1, pool_bytes), *cu_pool = malloc(pool_bytes);
            void    *dpool;
            CHECK(t, p.cu->ops->kv_pool_init(p.cu, pool_bytes, &dpool) == COOPT_OK);
            float            *inv  = make_inv_freq(hd, 500000.0f);
            struct coopt_rope rope = {.layout = layout ? COOPT_ROPE_HALF : COOPT_ROPE_INTERLEAVED, .head_dim = hd,
                                      .inv_freq = inv};
            int32_t bt[5] = {3, 0, 4, 1, 2}, pos[23], seq[23];
            int64_t slots[23];
            for (int i = 0; i < n; i++) {
                pos[i]   = i * 37; // positions far apart: large angles
                seq[i]   = 0;
                slots[i] = (int64_t)bt[i / ps] * ps + i % ps;
            }
            size_t nq = (size_t)n * nh * hd, nk = (size_t)n * nkv * hd;
            float *q = test_rand_array(&s, nq, -1, 1), *k = test_rand_array(&s, nk, -3, 3), *v = test_rand_array(&s, nk, -3, 3);
            for (int i = 0; i < hd; i++) v[i] = 0; // an all-zero row: scale 0, zeros
            // FP8: a row whose candidate errors all overflow to inf (every candidate ties; the CPU
            // keeps the first), and a row with one nonzero element (only the first candidate is exact)
            for (int i = 0; i < hd; i++) v[(size_t)2 * nkv * hd + i] *= 1e30f;
            for (int i = 0; i < hd; i++) v[(size_t)3 * nkv * hd + i] = i == 5 ? 2.5f : 0.0f;
            float *q_got = malloc(nq * 4), *k_got = malloc(nk * 4);
            float *dq = dev_copy(p.cu, q, nq * 4), *dk = dev_copy(p.cu, k, nk * 4), *dv = dev_copy(p.cu, v, nk * 4);
            int32_t *dpos = dev_copy(p.cu, pos, sizeof(pos)), *dseq = dev_copy(p.cu, seq, sizeof(seq));
            int64_t *dslots = dev_copy(p.cu, slots, sizeof(slots));
            struct coopt_batch b = {.n_tokens = n, .pos = pos, .tok_seq = seq, .slots = slots, .n_seqs = 1,
                                    .max_blocks = 5, .block_tables = bt};
            struct coopt_batch db = b;
            db.pos = dpos, db.tok_seq = dseq, db.slots = dslots;

            kv.pool = dpool;
            p.cu->ops->rope_store(p.cu, dq, dk, dv, nh, &kv, layer, &db, &rope);
            dev_read(p.cu, cu_pool, dpool, pool_bytes);
            dev_read(p.cu, q_got, dq, nq * 4);
            dev_read(p.cu, k_got, dk, nk * 4);
            kv.pool = ref_pool;
            p.ref->ops->rope_store(p.ref, q, k, v, nh, &kv, layer, &b, &rope);

            char what[64];
            snprintf(what, sizeof(what), "%s hd %d layout %d", coopt_dtype_name(dt), hd, layout);
            bool ok = test_near(t, __FILE__, __LINE__, q_got, q, nq, 2e-6, 2e-6);
            CHECKF(t, ok, "%s: q", what);
            CHECKF(t, memcmp(k_got, k, nk * 4) == 0, "%s: k was modified", what);
            size_t n_diff = 0, n_bytes = 0;
            float  a[256], r[256];
            for (int i = 0; i < n; i++)
                for (int h = 0; h < nkv; h++)
                    for (int kvi = 0; kvi < 2; kvi++) {
                        int64_t pg = bt[i / ps];
                        int32_t row = i % ps;
                        size_t  off = coopt_kv_offset(l, pg, layer, kvi, h, row), rb = (size_t)hd * l->elem_bytes;
                        if (l->has_scales) {
                            CHECKF(t, kvi == 0 || memcmp(cu_pool + coopt_kv_scale_offset(l, pg, layer, kvi, h, row),
                                                         ref_pool + coopt_kv_scale_offset(l, pg, layer, kvi, h, row), 4) == 0,
                                   "%s: v scale token %d head %d", what, i, h);
                        }
                        if (kvi == 1) {
                            CHECKF(t, memcmp(cu_pool + off, ref_pool + off, rb) == 0, "%s: v row token %d head %d", what,
                                   i, h);
                            continue;
                        }
                        if (dt != COOPT_DTYPE_F32) { // f32 values may all differ in the last bit
                            for (size_t j = 0; j < rb; j++) n_diff += cu_pool[off + j] != ref_pool[off + j];
                            n_bytes += rb;
                        }
                        kv_read_row(l, cu_pool, pg, layer, 0, h, row, a);
                        kv_read_row(l, ref_pool, pg, layer, 0, h, row, r);
                        double amax = 0;
                        for (int j = 0; j < hd; j++) amax = fmax(amax, fabs(r[j]));
                        for (int j = 0; j < hd; j++) {
                            // one ulp of the cache type, plus the f32 rotation's own error
                            // (cos/sin a few ulp apart, times inputs of the row's size)
                            double tol = (l->has_scales ? amax : fabs(r[j])) * kv_ulp(dt) * 1.01 + 1e-6 * amax;
                            CHECKF(t, fabs(a[j] - r[j]) <= tol, "%s: k token %d head %d [%d]: %.7g vs ref %.7g", what, i,
                                   h, j, a[j], r[j]);
                        }
                    }
            CHECKF(t, n_diff * 50 <= n_bytes, "%s: %zu of %zu K bytes differ", what, n_diff, n_bytes);
            if (l->has_scales) {
                float sc = 1;
                memcpy(&sc, cu_pool + coopt_kv_scale_offset(l, bt[0], layer, 1, 0, 0), 4);
                CHECK(t, sc == 0.0f);
            }
            p.cu->ops->kv_pool_free(p.cu, dpool, pool_bytes);
            p.cu->ops->free(p.cu, dq), p.cu->ops->free(p.cu, dk), p.cu->ops->free(p.cu, dv);
            p.cu->ops->free(p.cu, dpos), p.cu->ops->free(p.cu, dseq), p.cu->ops->free(p.cu, dslots);
            free(ref_pool), free(cu_pool), free(inv), free(q), free(k), free(v), free(q_got), free(k_got);
        }
    cu_pair_free(&p);
}

// K smoothing offsets (kv_cache.h): the mean roped K of each sequence's first step, written by
// rope_store's offsets kernel. Three sequences interleaved in one step of 650 tokens (more than one
// chunk of the kernel): two start at position 0, one does not and must keep its offsets. Tolerance
// as rope (cos/sin a few ulp from glibc's), on means of |k| <= 3: 1e-5 abs + 1e-5 rel.
TEST(cuda_kv_offsets) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t s = 29;
    for (int32_t hd = 16; hd <= 128; hd *= 8) {
        const int32_t nh = 4, nkv = 2, ps = 16, n_layers = 2, layer = 1, n_seq_max = 3;
        // batch sequences 0, 1, 2 are KV sequences 2, 0, 1; sequence 1 continues at position 10
        enum { N_TOK = 650, MB = 20 };
        const int32_t seq_ids[3] = {2, 0, 1}, start[3] = {0, 10, 0}, count[3] = {300, 150, 200};
        int32_t       pos[N_TOK], seq[N_TOK], n = 0, next[3] = {0, 0, 0};
        while (n < N_TOK)
            for (int q = 0; q < 3; q++)
                if (next[q] < count[q]) pos[n] = start[q] + next[q]++, seq[n++] = q;
        struct coopt_kv_cache kv = {0};
        CHECK(t, coopt_kv_layout_init(&kv.layout, COOPT_DTYPE_FP8_E4M3, n_layers, nkv, hd, ps) == COOPT_OK);
        const int32_t max_blocks = MB, n_pages = 3 * MB;
        int32_t       bt[3 * MB];
        int64_t       slots[N_TOK];
        for (int i = 0; i < n_pages; i++) bt[i] = (i * 7) % n_pages; // sequence q owns bt[MB q .. MB q + MB - 1]
        for (int i = 0; i < n; i++) slots[i] = (int64_t)bt[seq[i] * max_blocks + pos[i] / ps] * ps + pos[i] % ps;
        size_t   pool_bytes = kv.layout.page_bytes * n_pages, n_off = (size_t)n_seq_max * n_layers * nkv * hd;
        uint8_t *ref_pool   = calloc(1, pool_bytes);
        float   *off_ref = malloc(n_off * 4), *off_got = malloc(n_off * 4);
        for (size_t i = 0; i < n_off; i++) off_ref[i] = 7.0f; // sentinel: rows that must not change
        void *dpool;
        CHECK(t, p.cu->ops->kv_pool_init(p.cu, pool_bytes, &dpool) == COOPT_OK);
        float            *inv  = make_inv_freq(hd, 10000.0f);
        struct coopt_rope rope = {.layout = hd == 16 ? COOPT_ROPE_INTERLEAVED : COOPT_ROPE_HALF, .head_dim = hd,
                                  .inv_freq = inv};
        size_t nq = (size_t)n * nh * hd, nk = (size_t)n * nkv * hd;
        float *q = test_rand_array(&s, nq, -1, 1), *k = test_rand_array(&s, nk, -3, 3), *v = test_rand_array(&s, nk, -3, 3);
        float *dq = dev_copy(p.cu, q, nq * 4), *dk = dev_copy(p.cu, k, nk * 4), *dv = dev_copy(p.cu, v, nk * 4);
        float *doff = dev_copy(p.cu, off_ref, n_off * 4);
        int32_t *dpos = dev_copy(p.cu, pos, sizeof(pos)), *dseq = dev_copy(p.cu, seq, sizeof(seq));
        int32_t *dids = dev_copy(p.cu, seq_ids, sizeof(seq_ids));
        int64_t *dslots = dev_copy(p.cu, slots, sizeof(slots));
        struct coopt_batch b = {.n_tokens = n, .pos = pos, .tok_seq = seq, .slots = slots, .n_seqs = 3,
                                .max_blocks = max_blocks, .block_tables = bt, .seq_ids = seq_ids};
        struct coopt_batch db = b;
        db.pos = dpos, db.tok_seq = dseq, db.slots = dslots, db.seq_ids = dids;
        kv.pool = dpool, kv.k_offset = doff;
        p.cu->ops->rope_store(p.cu, dq, dk, dv, nh, &kv, layer, &db, &rope);
        dev_read(p.cu, off_got, doff, n_off * 4);
        kv.pool = ref_pool, kv.k_offset = off_ref;
        p.ref->ops->rope_store(p.ref, q, k, v, nh, &kv, layer, &b, &rope);
        bool ok = test_near(t, __FILE__, __LINE__, off_got, off_ref, n_off, 1e-5, 1e-5);
        for (size_t i = 0; i < n_off && ok; i++) {
            size_t seq_id = i / ((size_t)n_layers * nkv * hd), lay = i / ((size_t)nkv * hd) % n_layers;
            bool   kept   = seq_id == 0 || lay != (size_t)layer; // KV sequence 0 = batch sequence 1
            if (kept != (off_ref[i] == 7.0f) || kept != (off_got[i] == 7.0f)) {
                test_fail(t, __FILE__, __LINE__, "hd %d: offset %zu: %g (ref %g), sequence %zu layer %zu", hd, i,
                          off_got[i], off_ref[i], seq_id, lay);
                ok = false;
            }
        }
        p.cu->ops->kv_pool_free(p.cu, dpool, pool_bytes);
        void *dev[] = {dq, dk, dv, doff, dpos, dseq, dids, dslots};
        for (size_t i = 0; i < COOPT_ARRAY_LEN(dev); i++) p.cu->ops->free(p.cu, dev[i]);
        free(ref_pool), free(off_ref), free(off_got), free(inv), free(q), free(k), free(v);
        if (!ok) return;
    }
    cu_pair_free(&p);
}

// ---- attention ----

struct attn_case {
    int32_t          hd, nh, nkv, ps, window;
    enum coopt_dtype dt;
    int32_t          n_seqs;
    const int32_t   *lens, *n_q; // [n_seqs] positions held, query tokens (the last n_q positions)
    int              route;      // cuda_attn_set_route: 0 auto, 1 tensor cores wherever compiled, 2 never
};

// Tolerances (|got - ref| <= atol + rtol*|ref|; the reference is double math over the same
// cache bytes):
//   decode kernel only (route 2, auto for decode-like steps, shapes the tensor-core kernel is not
//     compiled for): 2e-5 + 1e-4 rel, f32 online softmax
//     (ex2.approx, ~2^-22 relative) summed in another order.
//   tensor-core kernel possible (route 1, auto for chunked steps): q is made f16-representable, so the
//     f16 query tile is exact, and K is exact in f16 (F16 cache, or FP8 values). The probabilities
//     are rounded to f16 before P.V while the denominator sums them in f32: each term is off by at
//     most 2^-11 relative (2^-25 absolute when p is subnormal), so the output is within
//     (2^-11 + n_keys * 2^-25) * max|v| = 6.4e-4 here (|v| <= ~1, n_keys <= 5000): atol 1e-3.
//     FP8 V rows are also rounded to f16 after their scale: another 2^-11 * max|v| (max|v| of the
//     dequantized rows <= 1.07): atol 1.5e-3. A key wrongly inside or outside a row's range moves
//     that row by ~|v| / (keys in range), which the short ranges of every case (prefill from
//     position 0, window edges) expose.
// The KV types the tensor-core attention kernels are compiled for.
static bool attn_tc_kv_type(enum coopt_dtype dt) {
    return dt == COOPT_DTYPE_F16 || dt == COOPT_DTYPE_FP8_E4M3 || dt == COOPT_DTYPE_FP8_E5M2;
}

// Whether the decode kernel walks the keys on tensor cores for these shapes: the query heads a CTA
// serves are the launcher's (paged_attn.cu: the KV group up to 8, rounded up to a power of two;
// one with the per-head ablation).
static bool decode_tc(struct cu_pair *p, int32_t nh, int32_t nkv, int32_t hd, enum coopt_dtype dt) {
    int32_t sub_g = 1;
    if (!p->cu->attn_per_head)
        while (sub_g < nh / nkv && sub_g < 8) sub_g *= 2;
    return cuda_attn_tc_decode(p->cu, hd, dt, sub_g);
}

static bool check_attention(struct test_ctx *t, struct cu_pair *p, uint64_t *s, const struct attn_case *c) {
    int32_t max_len = 0, n_pages = 0, n_all = 0, n_tok = 0;
    for (int i = 0; i < c->n_seqs; i++) {
        max_len = COOPT_MAX(max_len, c->lens[i]);
        n_pages += (c->lens[i] + c->ps - 1) / c->ps;
        n_all += c->lens[i];
        n_tok += c->n_q[i];
    }
    int32_t               max_blocks = (max_len + c->ps - 1) / c->ps;
    struct coopt_kv_cache kv         = {0};
    COOPT_ASSERT(coopt_kv_layout_init(&kv.layout, c->dt, 2, c->nkv, c->hd, c->ps) == COOPT_OK);
    size_t pool_bytes = kv.layout.page_bytes * (size_t)n_pages;
    void  *dpool;
    COOPT_ASSERT(p->cu->ops->kv_pool_init(p->cu, pool_bytes, &dpool) == COOPT_OK);
    // block tables: pages handed out in a scrambled order
    int32_t *bt = malloc(sizeof(int32_t) * c->n_seqs * max_blocks), *perm = malloc(sizeof(int32_t) * n_pages);
    for (int i = 0; i < n_pages; i++) perm[i] = i;
    for (int i = n_pages - 1; i > 0; i--) {
        int j = (int)(test_rand_u64(s) % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    int next = 0;
    for (int q = 0; q < c->n_seqs; q++)
        for (int bl = 0; bl < max_blocks; bl++) bt[q * max_blocks + bl] = bl * c->ps < c->lens[q] ? perm[next++] : -1;
    // fill every position of layer 1 through the CUDA write path
    int32_t *pos = malloc(sizeof(int32_t) * n_all), *seq = malloc(sizeof(int32_t) * n_all);
    int64_t *slots = malloc(sizeof(int64_t) * n_all);
    for (int q = 0, k = 0; q < c->n_seqs; q++)
        for (int i = 0; i < c->lens[q]; i++, k++) {
            pos[k] = i, seq[k] = q;
            slots[k] = (int64_t)bt[q * max_blocks + i / c->ps] * c->ps + i % c->ps;
        }
    float            *inv  = make_inv_freq(c->hd, 10000.0f);
    struct coopt_rope rope = {.layout = COOPT_ROPE_HALF, .head_dim = c->hd, .inv_freq = inv};
    size_t            nqa = (size_t)n_all * c->nh * c->hd, nka = (size_t)n_all * c->nkv * c->hd;
    float            *qa = test_rand_array(s, nqa, -1, 1), *ka = test_rand_array(s, nka, -1, 1), *va = test_rand_array(s, nka, -1, 1);
    float   *dqa = dev_copy(p->cu, qa, nqa * 4), *dka = dev_copy(p->cu, ka, nka * 4), *dva = dev_copy(p->cu, va, nka * 4);
    int32_t *dpos = dev_copy(p->cu, pos, sizeof(int32_t) * n_all), *dseq = dev_copy(p->cu, seq, sizeof(int32_t) * n_all);
    int64_t *dslots = dev_copy(p->cu, slots, sizeof(int64_t) * n_all);
    struct coopt_batch fill = {.n_tokens = n_all, .pos = dpos, .tok_seq = dseq, .slots = dslots, .n_seqs = c->n_seqs,
                               .max_blocks = max_blocks, .block_tables = NULL};
    kv.pool = dpool;
    p->cu->ops->rope_store(p->cu, dqa, dka, dva, c->nh, &kv, 1, &fill, &rope);
    uint8_t *host_pool = malloc(pool_bytes);
    dev_read(p->cu, host_pool, dpool, pool_bytes);

    // the query batch: the last n_q[q] positions of each sequence
    int32_t *qpos = malloc(sizeof(int32_t) * n_tok), *qseq = malloc(sizeof(int32_t) * n_tok);
    for (int q = 0, k = 0; q < c->n_seqs; q++)
        for (int i = c->lens[q] - c->n_q[q]; i < c->lens[q]; i++, k++) qpos[k] = i, qseq[k] = q;
    if (c->window > 0) {
        // release pages wholly before every query's window: they must not be read
        for (int q = 0; q < c->n_seqs; q++) {
            int first = COOPT_MAX(0, c->lens[q] - c->n_q[q] - c->window + 1);
            for (int bl = 0; (bl + 1) * c->ps <= first; bl++) bt[q * max_blocks + bl] = -1;
        }
    }
    struct coopt_batch b = {.n_tokens = n_tok, .pos = qpos, .tok_seq = qseq, .n_seqs = c->n_seqs,
                            .max_blocks = max_blocks, .block_tables = bt, .window = c->window};
    size_t  n_o  = (size_t)n_tok * c->nh * c->hd;
    float  *q    = test_rand_array(s, n_o, -2, 2);
    // whether a tensor-core kernel can take part (the launcher's rules, paged_attn.cu): the prefill
    // kernel, or the decode kernel's tensor-core walk (cuda_attn_tc_decode, same tolerance)
    bool    tc_shape = (c->hd == 64 || c->hd == 80 || c->hd == 96 || c->hd == 128) && attn_tc_kv_type(c->dt);
    cuda_attn_set_route(p->cu, c->route);
    bool tc = (tc_shape && (c->route == 1 || (c->route == 0 && n_tok >= 16 && n_tok >= 4 * c->n_seqs))) ||
              decode_tc(p, c->nh, c->nkv, c->hd, c->dt);
    if (tc)
        for (size_t i = 0; i < n_o; i++) q[i] = coopt_f16_to_f32(coopt_f32_to_f16(q[i])); // see the tolerances
    float  *got  = malloc(n_o * sizeof(float)), *want = malloc(n_o * sizeof(float));
    float   scale = 1.0f / sqrtf((float)c->hd);
    float  *dq = dev_copy(p->cu, q, n_o * 4), *dout = dev_copy(p->cu, NULL, n_o * 4);
    int32_t *dqpos = dev_copy(p->cu, qpos, sizeof(int32_t) * n_tok), *dqseq = dev_copy(p->cu, qseq, sizeof(int32_t) * n_tok);
    int32_t *dbt = dev_copy(p->cu, bt, sizeof(int32_t) * c->n_seqs * max_blocks);
    struct coopt_batch db = b;
    db.pos = dqpos, db.tok_seq = dqseq, db.block_tables = dbt;
    // poison the output: every element must be written by exactly one of the kernels
    float *nan = malloc(n_o * sizeof(float));
    for (size_t i = 0; i < n_o; i++) nan[i] = NAN;
    p->cu->ops->upload(p->cu, dout, nan, n_o * 4);
    p->cu->ops->attention(p->cu, dout, dq, c->nh, &kv, 1, &db, scale);
    cuda_attn_set_route(p->cu, 0);
    dev_read(p->cu, got, dout, n_o * 4);
    kv.pool = host_pool;
    p->ref->ops->attention(p->ref, want, q, c->nh, &kv, 1, &b, scale);
    bool ok = tc ? test_near(t, __FILE__, __LINE__, got, want, n_o, c->dt == COOPT_DTYPE_F16 ? 1e-3 : 1.5e-3, 0)
                 : test_near(t, __FILE__, __LINE__, got, want, n_o, 2e-5, 1e-4);
    if (!ok) {
        char extra[200];
        snprintf(extra, sizeof(extra), " [hd %d heads %d/%d page %d window %d %s, %d seqs, max len %d, route %d, tc %d]",
                 c->hd, c->nh, c->nkv, c->ps, c->window, coopt_dtype_name(c->dt), c->n_seqs, max_len, c->route, tc);
        strncat(t->msg, extra, sizeof(t->msg) - strlen(t->msg) - 1);
    }
    p->cu->ops->kv_pool_free(p->cu, dpool, pool_bytes);
    void *dev[] = {dqa, dka, dva, dpos, dseq, dslots, dq, dout, dqpos, dqseq, dbt};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(dev); i++) p->cu->ops->free(p->cu, dev[i]);
    free(bt), free(perm), free(pos), free(seq), free(slots), free(inv), free(qa), free(ka), free(va), free(q);
    free(got), free(want), free(host_pool), free(qpos), free(qseq), free(nan);
    return ok;
}

// The decode kernel (and its split-K merge) on ragged batches: route 2 keeps the tensor-core
// kernel out; every third case uses route 1, where tiles of one sequence's tokens (the 20-token
// chunk, for 4 or more heads per KV head) go to tensor cores and the rest stays on the decode
// kernel in the same step.
TEST(cuda_attention) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t      s          = 17;
    const int32_t hds[]      = {8, 16, 32, 64, 80, 96, 128};
    // GQA groups 1, 2, 4, 5 (not a power of two), 8 and 16 (two subgroups per KV head)
    const int32_t heads[][2] = {{8, 8}, {8, 4}, {8, 2}, {40, 8}, {64, 8}, {32, 2}};
    const int32_t pss[]      = {16, 32, 7};
    // decode tokens, a prefill chunk of 5, decode at 1100 positions (split into partitions), a
    // chunk of 20
    const int32_t lens[] = {1, 37, 1100, 130}, n_q[] = {1, 5, 1, 20};
    int           i      = 0;
    for (size_t a = 0; a < COOPT_ARRAY_LEN(hds); a++)
        for (size_t h = 0; h < COOPT_ARRAY_LEN(heads); h++)
            for (size_t d = 0; d < COOPT_ARRAY_LEN(k_kvtypes); d++, i++) {
                if (i % 2 && hds[a] != 64 && hds[a] != 128) continue; // keep the run short: half of the odd dims
                struct attn_case c = {.hd = hds[a], .nh = heads[h][0], .nkv = heads[h][1], .ps = pss[i % 3],
                                      .window = (i / 3) % 2 ? 64 : 0, .dt = k_kvtypes[d], .n_seqs = 4,
                                      .lens = lens, .n_q = n_q, .route = i % 3 == 0 ? 1 : 2};
                if (!check_attention(t, &p, &s, &c)) return;
            }
    // decode batches at lengths around partition and tile edges, up to 5000 positions; windows
    // with released pages
    const int32_t lens3[] = {511, 513, 1500, 5000, 17, 1}, n_q3[] = {1, 1, 1, 1, 1, 1};
    const int32_t hds3[] = {128, 64, 80, 128, 16};
    for (size_t a = 0; a < COOPT_ARRAY_LEN(hds3); a++)
        for (size_t d = 0; d < COOPT_ARRAY_LEN(k_kvtypes); d++) {
            struct attn_case c = {.hd = hds3[a], .nh = a % 2 ? 32 : 16, .nkv = a % 2 ? 8 : 16, .ps = d % 2 ? 16 : 32,
                                  .window = (a + d) % 3 == 0 ? 1000 : 0, .dt = k_kvtypes[d], .n_seqs = 6,
                                  .lens = lens3, .n_q = n_q3, .route = (a + d) % 2 ? 0 : 2};
            if (!check_attention(t, &p, &s, &c)) return;
        }
    // a long prefill chunk on the decode kernel: enough CTAs that the key range is not split;
    // then the ablation switches: one query head per CTA, no split-K (decode batch)
    const int32_t lens2[] = {700, 300}, n_q2[] = {300, 100};
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_kvtypes); d++) {
        struct attn_case c = {.hd = 64, .nh = 8, .nkv = 2, .ps = 16, .window = d == 2 ? 100 : 0, .dt = k_kvtypes[d],
                              .n_seqs = 2, .lens = lens2, .n_q = n_q2, .route = 2};
        if (!check_attention(t, &p, &s, &c)) return;
    }
    // the decode kernel's tensor-core walk (head dims 64 and 128, F16 and FP8): 1, 2, 4 and 8 query
    // heads per KV head (1 only when forced: cuda_attn_set_tc_decode 1), ranges around partition
    // and sub-tile edges, windows over released pages, odd page sizes
    const int32_t groups[] = {1, 2, 4, 8};
    for (size_t a = 0; a < 2; a++)
        for (size_t g = 0; g < COOPT_ARRAY_LEN(groups); g++)
            for (size_t d = 0; d < COOPT_ARRAY_LEN(k_kvtypes); d++) {
                if (!attn_tc_kv_type(k_kvtypes[d])) continue;
                const int32_t    nkv = 4 - 2 * (int32_t)a;
                struct attn_case c = {.hd = a ? 64 : 128, .nh = nkv * groups[g], .nkv = nkv, .ps = (g + d) % 3 == 2 ? 7 : 16 << (d % 2),
                                      .window = (g + d) % 2 ? 1000 : 0, .dt = k_kvtypes[d], .n_seqs = 6,
                                      .lens = lens3, .n_q = n_q3, .route = 0};
                cuda_attn_set_tc_decode(p.cu, groups[g] == 1 ? 1 : 0);
                CHECKF(t, cuda_attn_tc_decode(p.cu, c.hd, c.dt, groups[g]), "hd %d %s, %d heads per KV head: not routed to tensor cores",
                       c.hd, coopt_dtype_name(c.dt), groups[g]);
                bool ok = check_attention(t, &p, &s, &c);
                cuda_attn_set_tc_decode(p.cu, 0);
                if (!ok) return;
            }
    // the ablation switches (one query head per CTA; no split-K), then short partitions: one
    // sequence of 10000 positions in 128-key partitions, 79 partials per (token, head), past the
    // merge kernel's first round of 64
    const int32_t lens4[] = {10000}, n_q4[] = {1};
    for (int ab = 0; ab < 3; ab++) {
        p.cu->attn_per_head  = ab == 0;
        p.cu->attn_partition = ab == 0 ? 512 : ab == 1 ? 0 : 64;
        struct attn_case c = {.hd = 128, .nh = 32, .nkv = 8, .ps = 16, .dt = COOPT_DTYPE_FP8_E4M3, .n_seqs = ab == 2 ? 1 : 6,
                              .lens = ab == 2 ? lens4 : lens3, .n_q = ab == 2 ? n_q4 : n_q3, .route = 2};
        bool ok = check_attention(t, &p, &s, &c);
        p.cu->attn_per_head  = false;
        p.cu->attn_partition = 512;
        if (!ok) return;
    }
    cu_pair_free(&p);
}

// ---- rope_store + attention fused (decode) ----

struct fused_case {
    int32_t          hd, nh, nkv, ps;
    enum coopt_dtype dt;
    int              layout;     // 1: COOPT_ROPE_HALF, 0: interleaved
    bool             koffs;      // K smoothing offsets (FP8 caches)
    bool             seq_start;  // the first sequence's token is at position 0 (not fusable)
    bool             unfused;    // cuda_attn_set_fuse_fp8(false): FP8 caches in two kernels
    int              store_cta;  // cuda_attn_set_store_cta: 0 default (FP8 caches, by depth), 1 always, -1 never
    int              want_ctas;  // what cuda_attn_store_ctas must report: 1 false, 2 true, 0 not checked
    bool             no_wait;    // cuda_attn_set_store_wait(false): one partition's store CTAs through the merge kernel
    bool             no_cluster; // cuda_attn_set_cluster(false): their partial through global memory and a count
    bool             no_pre;     // cuda_attn_set_prefetch(false): every CTA waits for the kernel before first
    bool             then;       // the second run is rope_store_attention_then_matmul (check_staged)
    int32_t          n_seqs;
    const int32_t   *lens;       // [n_seqs] positions held after the step; the step has the last one of each
};

// hg_pos of src/cuda/xstage.cuh: where padded row k's pair sits (half2 units) in a staged input.
static int32_t staged_pos(int32_t k) {
    const int m = k & 63;
    return (k >> 6) * 32 + (((m & 7) >> 1) << 3) + ((m >> 4) << 1) + ((m >> 3) & 1);
}

// After rope_store_attention_then_matmul: the record the next GEMV op would take for out (dout on
// the device, out its n values read back). Where the op stages (one token, head_dim % 16 == 0,
// n % 64 == 0) every element must be f16(out * 16) at its hg_pos slot and every 16-element
// tile's partials {sum of squares, amax} bit-identical to the kernel's butterfly (lanes i and
// i ^ m added, m = 8, 4, 2, 1; the GEMV epilogue's order), i.e. exactly what the consuming GEMV
// would stage itself; elsewhere nothing may be recorded for out.
static bool check_staged(struct test_ctx *t, struct cu_pair *p, const float *dout, const float *out, int64_t n,
                         bool want, const char *what) {
    const void *buf = NULL;
    int64_t     len = 0;
    const bool  have = cuda_xstage_peek(p->cu, dout, &buf, &len);
    if (have != want || (have && len != n)) {
        test_fail(t, __FILE__, __LINE__, "%s: staged output %s (%lld values), want %s", what, have ? "recorded" : "none",
                  (long long)len, want ? "one" : "none");
        return false;
    }
    if (!have) return true;
    const size_t bytes = cuda_gptq_xstage_bytes(n);
    uint8_t     *h     = malloc(bytes);
    dev_read(p->cu, h, buf, bytes);
    const uint16_t *hx = (const uint16_t *)h;
    float           part[2];
    bool            ok = true;
    for (int64_t k = 0; k < n && ok; k++) {
        const uint16_t want_bits = coopt_f32_to_f16(out[k] * 16.0f), got = hx[2 * staged_pos((int32_t)k) + (k & 1)];
        if (got != want_bits) {
            test_fail(t, __FILE__, __LINE__, "%s: staged [%lld] = 0x%04x, want 0x%04x (%.9g)", what, (long long)k, got,
                      want_bits, out[k]);
            ok = false;
        }
    }
    for (int64_t tile = 0; tile < n / 16 && ok; tile++) {
        float ss[16], am[16];
        for (int i = 0; i < 16; i++) ss[i] = out[tile * 16 + i] * out[tile * 16 + i], am[i] = fabsf(out[tile * 16 + i]);
        for (int m = 8; m > 0; m >>= 1) {
            float s2[16], a2[16];
            for (int i = 0; i < 16; i++) s2[i] = ss[i] + ss[i ^ m], a2[i] = fmaxf(am[i], am[i ^ m]);
            memcpy(ss, s2, sizeof(ss)), memcpy(am, a2, sizeof(am));
        }
        memcpy(part, h + cuda_gptq_xstage_part(n) + (size_t)tile * 8, 8);
        if (memcmp(&part[0], &ss[0], 4) != 0 || memcmp(&part[1], &am[0], 4) != 0) {
            test_fail(t, __FILE__, __LINE__, "%s: tile %lld partials {%.9g, %.9g}, want {%.9g, %.9g}", what,
                      (long long)tile, part[0], part[1], ss[0], am[0]);
            ok = false;
        }
    }
    free(h);
    return ok;
}

// rope_store_attention against rope_store + attention on the same inputs and cache history. The
// fused decode kernel runs the same operations as the two kernels (rope_store's rotation and FP8
// scale search, attention's loop), so the cache bytes must be bit-identical, and it leaves q
// unrotated: q unchanged is how the test knows the fused kernel ran. Steps it does not fuse (a
// sequence start, query groups over 8, FP8 caches where cuda_attn_set_fuse_fp8 says not) run the
// two kernels: q rotated. Where the last partition's CTA stores, the output is bit-identical too.
// Where two store CTAs do (cuda_attn_set_store_cta; cuda_attn_store_ctas tells), the token's own
// key is a partial of one key merged with the rest (by the merge kernel, or over one partition by
// the partition's CTA after waiting for the store CTAs: cuda_attn_set_store_wait), and its
// partition's running maximum may differ, so the output matches to a tolerance: on the
// tensor-core walk P is rounded to f16 (2^-11 relative) for that key and that partition's keys,
// each side, so |error| <= 2^-9 max|v| = 3.9e-3 (|v| <= 2 here); on CUDA cores only the f32
// order of the sums differs (1e-4 absolute and relative). The test's
// short ranges (2, 33, 37 positions) give the own key a weight that a missing or wrong partial
// would move far past these.
static bool check_fused_attention(struct test_ctx *t, struct cu_pair *p, uint64_t *s, const struct fused_case *c) {
    const int32_t n_layers = 2, layer = 1, n = c->n_seqs;
    int32_t       max_len = 0, n_pages = 0, n_fill = 0;
    for (int i = 0; i < n; i++) {
        max_len = COOPT_MAX(max_len, c->lens[i]);
        n_pages += (c->lens[i] + c->ps - 1) / c->ps;
        n_fill += c->lens[i] - 1;
    }
    const int32_t         max_blocks = (max_len + c->ps - 1) / c->ps;
    struct coopt_kv_cache kv[2];
    memset(kv, 0, sizeof(kv));
    COOPT_ASSERT(coopt_kv_layout_init(&kv[0].layout, c->dt, n_layers, c->nkv, c->hd, c->ps) == COOPT_OK);
    kv[1].layout            = kv[0].layout;
    const size_t pool_bytes = kv[0].layout.page_bytes * (size_t)n_pages;
    for (int j = 0; j < 2; j++) {
        void *pool = NULL;
        COOPT_ASSERT(p->cu->ops->kv_pool_init(p->cu, pool_bytes, &pool) == COOPT_OK);
        kv[j].pool = pool;
    }
    int32_t *bt = malloc(sizeof(int32_t) * (size_t)(n * max_blocks));
    for (int q = 0, next = n_pages - 1; q < n; q++) // pages handed out backwards
        for (int bl = 0; bl < max_blocks; bl++) bt[q * max_blocks + bl] = bl * c->ps < c->lens[q] ? next-- : -1;
    float            *inv  = make_inv_freq(c->hd, 10000.0f);
    struct coopt_rope rope = {.layout = c->layout ? COOPT_ROPE_HALF : COOPT_ROPE_INTERLEAVED, .head_dim = c->hd,
                              .inv_freq = inv};
    int32_t ids[64];
    for (int i = 0; i < n; i++) ids[i] = i;
    int32_t *dbt = dev_copy(p->cu, bt, sizeof(int32_t) * (size_t)(n * max_blocks)), *dids = dev_copy(p->cu, ids, sizeof(int32_t) * (size_t)n);
    const size_t n_off = (size_t)n * n_layers * c->nkv * c->hd;
    float       *doff  = c->koffs && kv[0].layout.has_scales ? dev_copy(p->cu, NULL, n_off * 4) : NULL;
    kv[0].k_offset = kv[1].k_offset = doff;
    // history: positions 0 .. len-2 of every sequence, the same rows into both caches (the offsets
    // come from these, position 0 being in the step)
    if (n_fill > 0) {
        int32_t *pos = malloc(sizeof(int32_t) * (size_t)n_fill), *seq = malloc(sizeof(int32_t) * (size_t)n_fill);
        int64_t *slots = malloc(sizeof(int64_t) * (size_t)n_fill);
        for (int q = 0, k = 0; q < n; q++)
            for (int i = 0; i < c->lens[q] - 1; i++, k++)
                pos[k] = i, seq[k] = q, slots[k] = (int64_t)bt[q * max_blocks + i / c->ps] * c->ps + i % c->ps;
        const size_t nq = (size_t)n_fill * c->nh * c->hd, nk = (size_t)n_fill * c->nkv * c->hd;
        float *qa = test_rand_array(s, nq, -1, 1), *ka = test_rand_array(s, nk, -1, 1), *va = test_rand_array(s, nk, -1, 1);
        float *dqa = dev_copy(p->cu, qa, nq * 4), *dka = dev_copy(p->cu, ka, nk * 4), *dva = dev_copy(p->cu, va, nk * 4);
        int32_t *dpos = dev_copy(p->cu, pos, sizeof(int32_t) * (size_t)n_fill), *dseq = dev_copy(p->cu, seq, sizeof(int32_t) * (size_t)n_fill);
        int64_t *dslots = dev_copy(p->cu, slots, sizeof(int64_t) * (size_t)n_fill);
        struct coopt_batch fill = {.n_tokens = n_fill, .pos = dpos, .tok_seq = dseq, .slots = dslots, .n_seqs = n,
                                   .max_blocks = max_blocks, .block_tables = dbt, .seq_ids = dids};
        for (int j = 0; j < 2; j++) {
            p->cu->ops->upload(p->cu, dqa, qa, nq * 4);
            p->cu->ops->rope_store(p->cu, dqa, dka, dva, c->nh, &kv[j], layer, &fill, &rope);
        }
        void *dev[] = {dqa, dka, dva, dpos, dseq, dslots};
        for (size_t i = 0; i < COOPT_ARRAY_LEN(dev); i++) p->cu->ops->free(p->cu, dev[i]);
        free(pos), free(seq), free(slots), free(qa), free(ka), free(va);
    }
    // the step: the last position of every sequence
    int32_t pos[64], seq[64];
    int64_t slots[64];
    for (int q = 0; q < n; q++) {
        pos[q] = c->lens[q] - 1, seq[q] = q;
        slots[q] = (int64_t)bt[q * max_blocks + pos[q] / c->ps] * c->ps + pos[q] % c->ps;
    }
    const size_t nq = (size_t)n * c->nh * c->hd, nk = (size_t)n * c->nkv * c->hd;
    float       *q = test_rand_array(s, nq, -2, 2), *k = test_rand_array(s, nk, -2, 2), *v = test_rand_array(s, nk, -2, 2);
    int32_t     *dpos = dev_copy(p->cu, pos, sizeof(int32_t) * (size_t)n), *dseq = dev_copy(p->cu, seq, sizeof(int32_t) * (size_t)n);
    int64_t     *dslots = dev_copy(p->cu, slots, sizeof(int64_t) * (size_t)n);
    float       *dk = dev_copy(p->cu, k, nk * 4), *dv = dev_copy(p->cu, v, nk * 4);
    float       *dq[2] = {dev_copy(p->cu, q, nq * 4), dev_copy(p->cu, q, nq * 4)};
    float       *dout[2] = {dev_copy(p->cu, NULL, nq * 4), dev_copy(p->cu, NULL, nq * 4)};
    bool         start = false;
    for (int i = 0; i < n; i++) start = start || pos[i] == 0;
    struct coopt_batch b = {.n_tokens = n, .pos = dpos, .tok_seq = dseq, .slots = dslots, .n_seqs = n,
                            .max_blocks = max_blocks, .block_tables = dbt, .seq_ids = dids, .no_seq_start = !start};
    const float scale = 1.0f / sqrtf((float)c->hd);
    p->cu->ops->rope_store(p->cu, dq[0], dk, dv, c->nh, &kv[0], layer, &b, &rope);
    p->cu->ops->attention(p->cu, dout[0], dq[0], c->nh, &kv[0], layer, &b, scale);
    cuda_attn_set_fuse_fp8(p->cu, !c->unfused);
    cuda_attn_set_store_cta(p->cu, c->store_cta);
    cuda_attn_set_store_wait(p->cu, !c->no_wait);
    cuda_attn_set_cluster(p->cu, !c->no_cluster);
    cuda_attn_set_prefetch(p->cu, !c->no_pre);
    const bool store_ctas = cuda_attn_store_ctas(p->cu, &kv[1], &b, c->nh);
    if (c->then) p->cu->ops->rope_store_attention_then_matmul(p->cu, dout[1], dq[1], dk, dv, c->nh, &kv[1], layer, &b, &rope, scale);
    else p->cu->ops->rope_store_attention(p->cu, dout[1], dq[1], dk, dv, c->nh, &kv[1], layer, &b, &rope, scale);
    cuda_attn_set_fuse_fp8(p->cu, true);
    cuda_attn_set_store_cta(p->cu, 0);
    cuda_attn_set_store_wait(p->cu, true);
    cuda_attn_set_cluster(p->cu, true);
    cuda_attn_set_prefetch(p->cu, true);
    uint8_t *pools[2] = {malloc(pool_bytes), malloc(pool_bytes)};
    float   *outs[2] = {malloc(nq * 4), malloc(nq * 4)}, *qs[2] = {malloc(nq * 4), malloc(nq * 4)};
    for (int j = 0; j < 2; j++) {
        dev_read(p->cu, pools[j], kv[j].pool, pool_bytes);
        dev_read(p->cu, outs[j], dout[j], nq * 4);
        dev_read(p->cu, qs[j], dq[j], nq * 4);
    }
    const bool scaled = kv[0].layout.has_scales;
    const bool fused  = !start && c->nh / c->nkv <= 8 && (!scaled || !c->unfused);
    const bool tc     = decode_tc(p, c->nh, c->nkv, c->hd, c->dt);
    char       what[200];
    snprintf(what, sizeof(what),
             " [%s hd %d heads %d/%d page %d layout %d koffs %d lens %d..%d then %d fused %d store_ctas %d tc %d pre %d wait %d cluster %d]",
             coopt_dtype_name(c->dt), c->hd, c->nh, c->nkv, c->ps, c->layout, doff != NULL, c->lens[0], c->lens[n - 1],
             c->then, fused, store_ctas, tc, !c->no_pre, !c->no_wait, !c->no_cluster);
    bool ok = true;
    if (memcmp(pools[0], pools[1], pool_bytes) != 0) {
        size_t i = 0;
        while (pools[0][i] == pools[1][i]) i++;
        test_fail(t, __FILE__, __LINE__, "%s: caches differ from byte %zu (%u vs %u)", what, i, pools[1][i], pools[0][i]);
        ok = false;
    }
    if (c->want_ctas && store_ctas != (c->want_ctas == 2)) {
        test_fail(t, __FILE__, __LINE__, "%s: store CTAs %d, want %d", what, store_ctas, c->want_ctas == 2);
        ok = false;
    }
    if (ok && fused && store_ctas) {
        ok = tc ? test_near(t, __FILE__, __LINE__, outs[1], outs[0], nq, 3.9e-3, 0)
                : test_near(t, __FILE__, __LINE__, outs[1], outs[0], nq, 1e-4, 1e-4);
        if (!ok) strncat(t->msg, what, sizeof(t->msg) - strlen(t->msg) - 1);
    }
    for (size_t i = 0; i < nq && ok && !(fused && store_ctas); i++)
        if (memcmp(&outs[0][i], &outs[1][i], 4) != 0) {
            test_fail(t, __FILE__, __LINE__, "%s: out[%zu] = %.9g, two kernels %.9g", what, i, outs[1][i], outs[0][i]);
            ok = false;
        }
    if (ok && memcmp(qs[1], fused ? q : qs[0], nq * 4) != 0) {
        test_fail(t, __FILE__, __LINE__, "%s: q %s", what, fused ? "modified (the fused kernel did not run)" : "not rotated");
        ok = false;
    }
    if (ok && c->then)
        ok = check_staged(t, p, dout[1], outs[1], (int64_t)nq, n == 1 && c->hd % 16 == 0 && nq % 64 == 0, what);
    for (int j = 0; j < 2; j++) {
        p->cu->ops->kv_pool_free(p->cu, kv[j].pool, pool_bytes);
        p->cu->ops->free(p->cu, dq[j]), p->cu->ops->free(p->cu, dout[j]);
        free(pools[j]), free(outs[j]), free(qs[j]);
    }
    void *dev[] = {dbt, dids, dpos, dseq, dslots, dk, dv};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(dev); i++) p->cu->ops->free(p->cu, dev[i]);
    if (doff) p->cu->ops->free(p->cu, doff);
    free(bt), free(inv), free(q), free(k), free(v);
    return ok;
}

TEST(cuda_rope_store_attention) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    if (!p.cu->ops->rope_store_attention) {
        test_fail(t, __FILE__, __LINE__, "the CUDA backend lacks rope_store_attention");
        cu_pair_free(&p);
        return;
    }
    uint64_t s = 23;
    // decode lengths: split into partitions (1100, 513), one partition, a page edge, 2 positions
    const int32_t lens[] = {1100, 37, 513, 2, 33}, lens0[] = {1, 300};
    const int32_t hds[] = {128, 64, 80, 16};
    // query heads per KV head: 1, 4, 8 (fused), 16 (two CTAs per KV head: not fused)
    const int32_t heads[][2] = {{8, 8}, {32, 8}, {64, 8}, {32, 2}};
    int           i = 0;
    for (size_t a = 0; a < COOPT_ARRAY_LEN(hds); a++)
        for (size_t h = 0; h < COOPT_ARRAY_LEN(heads); h++)
            for (size_t d = 0; d < COOPT_ARRAY_LEN(k_kvtypes); d++, i++) {
                if (hds[a] == 16 && heads[h][0] > 8) continue; // (keep the run short)
                struct fused_case c = {.hd = hds[a], .nh = heads[h][0], .nkv = heads[h][1], .ps = i % 2 ? 16 : 32,
                                       .dt = k_kvtypes[d], .layout = i % 3 != 0, .koffs = i % 2 == 0,
                                       .unfused = i % 4 == 3, .store_cta = i % 3 == 2 ? 1 : i % 5 == 4 ? -1 : 0,
                                       .no_wait = i % 7 == 1, .no_cluster = i % 4 == 1, .no_pre = i % 6 == 5,
                                       .n_seqs = 5, .lens = lens};
                if (!check_fused_attention(t, &p, &s, &c)) goto done;
            }
    const int32_t lens1[] = {200, 37, 5};
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_kvtypes); d++) {
        // a sequence start: the two kernels
        struct fused_case c = {.hd = 128, .nh = 32, .nkv = 8, .ps = 16, .dt = k_kvtypes[d], .layout = 1,
                               .koffs = true, .seq_start = true, .n_seqs = 2, .lens = lens0};
        if (!check_fused_attention(t, &p, &s, &c)) goto done;
        // short ranges (one partition): the default (FP8: store CTAs, the partition's CTA waiting
        // for them), the same through the merge kernel, the last partition's CTA storing, FP8 in
        // two kernels
        const bool        f8 = k_kvtypes[d] == COOPT_DTYPE_FP8_E4M3 || k_kvtypes[d] == COOPT_DTYPE_FP8_E5M2;
        struct fused_case c1 = {.hd = 128, .nh = 32, .nkv = 8, .ps = 16, .dt = k_kvtypes[d], .layout = 1,
                                .koffs = true, .n_seqs = 3, .lens = lens1, .want_ctas = f8 ? 2 : 1};
        if (!check_fused_attention(t, &p, &s, &c1)) goto done;
        c1.no_cluster = true; // (sm_90+: the count in global memory instead of the cluster)
        if (!check_fused_attention(t, &p, &s, &c1)) goto done;
        c1.no_cluster = false, c1.no_wait = true;
        if (!check_fused_attention(t, &p, &s, &c1)) goto done;
        c1.store_cta = -1, c1.want_ctas = 1;
        if (!check_fused_attention(t, &p, &s, &c1)) goto done;
        c1.unfused = true, c1.want_ctas = 0;
        if (!check_fused_attention(t, &p, &s, &c1)) goto done;
        // split ranges: the default (FP8: store CTAs below CUDA_ATTN_STORE_CTA_BOUND), and at
        // depth the last partition's CTA; store CTAs forced there
        const int32_t     lens_mid[] = {1100, 37};
        struct fused_case c3 = {.hd = 64, .nh = 32, .nkv = 8, .ps = 16, .dt = k_kvtypes[d], .layout = 0,
                                .koffs = true, .n_seqs = 2, .lens = lens_mid, .want_ctas = f8 ? 2 : 1};
        if (!check_fused_attention(t, &p, &s, &c3)) goto done;
        const int32_t lens_deep[] = {CUDA_ATTN_STORE_CTA_BOUND + 9, 37};
        struct fused_case c2 = {.hd = 128, .nh = 8, .nkv = 2, .ps = 16, .dt = k_kvtypes[d], .layout = 1,
                                .koffs = true, .n_seqs = 2, .lens = lens_deep, .want_ctas = 1};
        if (!check_fused_attention(t, &p, &s, &c2)) goto done;
        c2.store_cta = 1, c2.want_ctas = 2;
        if (!check_fused_attention(t, &p, &s, &c2)) goto done;
    }
    // the then-op: one decode token's output is also staged for the o projection (check_staged),
    // by the decode kernel (one partition) or the merge kernel (1100 positions); several tokens,
    // and outputs that are not whole 64-row chunks (2 heads of 16), are not staged
    const int32_t one_long[] = {1100}, one_short[] = {37};
    const int32_t shapes[][3] = {{128, 32, 8}, {64, 8, 8}, {80, 64, 8}, {16, 8, 8}, {16, 2, 2}};
    for (size_t a = 0; a < COOPT_ARRAY_LEN(shapes); a++)
        for (size_t d = 0; d < COOPT_ARRAY_LEN(k_kvtypes); d++)
            for (int r = 0; r < 3; r++) {
                struct fused_case c = {.hd = shapes[a][0], .nh = shapes[a][1], .nkv = shapes[a][2], .ps = 16,
                                       .dt = k_kvtypes[d], .layout = 1, .koffs = true, .unfused = (d + r) % 2 == 1,
                                       .store_cta = r == 1 && d % 2 ? 1 : 0,
                                       .then = true, .n_seqs = r == 2 ? 5 : 1,
                                       .lens = r == 0 ? one_long : r == 1 ? one_short : lens};
                if (!check_fused_attention(t, &p, &s, &c)) goto done;
            }
done:
    cu_pair_free(&p);
}

// The tensor-core prefill kernel: F16 and FP8 caches, head dims 64/80/96/128, 1 to 16 query heads
// per KV head, a chunk at depth, a prompt from position 0, and a mixed step (chunks next to decode
// tokens: tiles that mix sequences go to the decode kernel), windows with released pages.
TEST(cuda_attention_prefill) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t               s          = 23;
    const int32_t          hds[]      = {64, 80, 96, 128};
    const enum coopt_dtype kts[]      = {COOPT_DTYPE_F16, COOPT_DTYPE_FP8_E4M3, COOPT_DTYPE_FP8_E5M2};
    const int32_t          heads[][2] = {{8, 8}, {8, 2}, {10, 2}, {16, 1}, {8, 4}};
    const int32_t          pss[]      = {16, 7, 32};
    const int32_t          l_chunk[] = {500}, q_chunk[] = {200};
    const int32_t          l_zero[] = {130}, q_zero[] = {130};
    const int32_t          l_mix[] = {300, 40, 1100, 5}, q_mix[] = {130, 1, 70, 5};
    int                    i = 0;
    for (size_t a = 0; a < COOPT_ARRAY_LEN(hds); a++)
        for (size_t d = 0; d < COOPT_ARRAY_LEN(kts); d++)
            for (int bi = 0; bi < 3; bi++, i++) {
                struct attn_case c = {.hd = hds[a], .nh = heads[i % 5][0], .nkv = heads[i % 5][1], .ps = pss[i % 3],
                                      .window = i % 4 == 1 ? 100 : 0, .dt = kts[d], .route = i % 6 == 5 ? 0 : 1};
                c.n_seqs = bi == 2 ? 4 : 1;
                c.lens   = bi == 0 ? l_chunk : bi == 1 ? l_zero : l_mix;
                c.n_q    = bi == 0 ? q_chunk : bi == 1 ? q_zero : q_mix;
                if (!check_attention(t, &p, &s, &c)) return;
            }
    cu_pair_free(&p);
}

// ---- KV pool ----

static int64_t gpu_free_bytes(void) {
    size_t f = 0, tot = 0;
    coopt_cuda_mem_info(&f, &tot);
    return (int64_t)f;
}

TEST(cuda_kv_pool) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    struct coopt_backend *be = p.cu;
    // a 4 GiB reservation commits (almost) nothing
    size_t  page_bytes = (1u << 20) + 64 * 3, n_pages = 4096 - 16, bytes = page_bytes * n_pages;
    int64_t f0 = gpu_free_bytes();
    void   *pool;
    CHECK(t, be->ops->kv_pool_init(be, bytes, &pool) == COOPT_OK);
    int64_t f1 = gpu_free_bytes();
    CHECKF(t, f0 - f1 < (64 << 20), "reserving %zu bytes used %lld bytes", bytes, (long long)(f0 - f1));
    // commit 16 pages (~16 MiB): memory follows
    CHECK(t, be->ops->kv_pool_commit != NULL);
    for (int pg = 0; pg < 16; pg++) CHECK(t, be->ops->kv_pool_commit(be, pool, pg * page_bytes, page_bytes) == COOPT_OK);
    int64_t f2 = gpu_free_bytes();
    CHECKF(t, f1 - f2 >= (14 << 20) && f1 - f2 <= (40 << 20), "16 pages committed %lld bytes", (long long)(f1 - f2));
    // write, copy-on-write copy into an uncommitted page, read back
    uint8_t *pat = malloc(page_bytes), *back = malloc(page_bytes);
    for (size_t i = 0; i < page_bytes; i++) pat[i] = (uint8_t)(i * 7 + 1);
    be->ops->upload(be, (uint8_t *)pool + 3 * page_bytes, pat, page_bytes);
    be->ops->kv_page_copy(be, pool, page_bytes, 2000, 3);
    dev_read(be, back, (uint8_t *)pool + 2000 * page_bytes, page_bytes);
    CHECK(t, memcmp(back, pat, page_bytes) == 0);
    // release: chunks shared with live pages stay (page 4 shares a chunk with page 3)
    be->ops->kv_pool_release(be, pool, 4 * page_bytes, page_bytes);
    dev_read(be, back, (uint8_t *)pool + 3 * page_bytes, page_bytes);
    CHECK(t, memcmp(back, pat, page_bytes) == 0);
    for (int pg = 0; pg < 16; pg++) be->ops->kv_pool_release(be, pool, pg * page_bytes, page_bytes);
    be->ops->kv_pool_release(be, pool, 2000 * page_bytes, page_bytes);
    be->ops->kv_pool_release(be, pool, 2001 * page_bytes, page_bytes); // never committed: no-op
    int64_t f3 = gpu_free_bytes();
    CHECKF(t, f3 - f1 >= -(4 << 20), "after releasing every page %lld bytes are still held", (long long)(f1 - f3));
    // commit again after release
    CHECK(t, be->ops->kv_pool_commit(be, pool, 5 * page_bytes, page_bytes) == COOPT_OK);
    be->ops->upload(be, (uint8_t *)pool + 5 * page_bytes, pat, page_bytes);
    dev_read(be, back, (uint8_t *)pool + 5 * page_bytes, page_bytes);
    CHECK(t, memcmp(back, pat, page_bytes) == 0);
    be->ops->kv_pool_free(be, pool, bytes);
    // an impossible reservation is a status
    void *huge = NULL;
    CHECK(t, be->ops->kv_pool_init(be, (size_t)1 << 60, &huge) == COOPT_ERR_NOMEM && huge == NULL);
    free(pat), free(back);
    cu_pair_free(&p);
}

// A GPU out of memory inside a KV op (an uncommitted destination page of kv_page_copy; the
// context commits pages itself, direct users of the op may not) is kept for take_error and the op
// enqueues nothing -- no abort: with the device memory taken by one large allocation, pages are
// committed until kv_pool_commit says NOMEM, then a copy into a page that could not be committed
// reports NOMEM through take_error; once memory is back the same copy works.
TEST(cuda_kv_pool_oom) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    struct coopt_backend *be = p.cu;
    const size_t          page_bytes = (size_t)32 << 20, n_pages = 64, bytes = page_bytes * n_pages; // 2 GiB
    void                 *pool = NULL, *fill = NULL;
    CHECK(t, be->ops->kv_pool_init(be, bytes, &pool) == COOPT_OK);
    int64_t room = gpu_free_bytes() - ((int64_t)256 << 20); // leave 256 MiB: a few pages fit
    CHECK(t, room > 0 && be->ops->alloc(be, (size_t)room, &fill) == COOPT_OK);
    int32_t n_ok = 0;
    st_test_capture_begin(); // (the failed commits log their errors)
    while (n_ok < (int32_t)n_pages && be->ops->kv_pool_commit(be, pool, (size_t)n_ok * page_bytes, page_bytes) == COOPT_OK)
        n_ok++;
    CHECKF(t, n_ok >= 1 && n_ok < (int32_t)n_pages, "%d of %zu pages committed with the memory taken", n_ok, n_pages);
    CHECK(t, be->ops->take_error(be) == COOPT_OK); // (kv_pool_commit returned its status)
    be->ops->kv_page_copy(be, pool, page_bytes, n_ok, 0);
    be->ops->sync(be);
    st_test_capture_end();
    CHECK(t, be->ops->take_error(be) == COOPT_ERR_NOMEM && be->ops->take_error(be) == COOPT_OK);
    be->ops->free(be, fill);
    uint8_t *pat = malloc(page_bytes), *back = malloc(page_bytes);
    for (size_t i = 0; i < page_bytes; i++) pat[i] = (uint8_t)(i * 13 + 5);
    be->ops->upload(be, pool, pat, page_bytes);
    be->ops->kv_page_copy(be, pool, page_bytes, n_ok, 0);
    dev_read(be, back, (uint8_t *)pool + (size_t)n_ok * page_bytes, page_bytes);
    CHECK(t, be->ops->take_error(be) == COOPT_OK && memcmp(back, pat, page_bytes) == 0);
    be->ops->kv_pool_free(be, pool, bytes);
    free(pat), free(back);
    cu_pair_free(&p);
}

// ---- whole forward pass on random models ----

struct rnd_model {
    struct coopt_model m;
    void             **bufs;
    int                n_bufs;
};

static void *rm_keep(struct rnd_model *r, void *p) {
    r->bufs              = realloc(r->bufs, (size_t)(r->n_bufs + 1) * sizeof(void *));
    r->bufs[r->n_bufs++] = p;
    return p;
}

static struct coopt_weight rm_weight(struct rnd_model *r, uint64_t *s, enum coopt_dtype dt, int64_t n_out, int64_t n_in,
                                     float amp) {
    size_t   rb = coopt_dtype_row_bytes(dt, n_in);
    float   *f  = test_rand_array(s, (size_t)n_in * n_out, -amp, amp);
    uint8_t *q  = rm_keep(r, malloc(rb * n_out));
    for (int64_t o = 0; o < n_out; o++) coopt_quant_row(dt, f + o * n_in, q + o * rb, n_in);
    free(f);
    return (struct coopt_weight){.dtype = dt, .n_in = n_in, .n_out = n_out, .data = q};
}

static void rm_init(struct rnd_model *r, uint64_t *s, enum coopt_dtype dt, int32_t dim, int32_t nh, int32_t nkv,
                    int32_t n_layers) {
    memset(r, 0, sizeof(*r));
    struct coopt_model_config *c = &r->m.config;
    c->n_vocab = 300, c->dim = dim, c->n_layers = n_layers, c->n_heads = nh, c->n_kv_heads = nkv;
    c->head_dim = dim / nh, c->ffn_dim = 2 * dim + 64, c->n_ctx_train = 512, c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f, c->rope_layout = COOPT_ROPE_HALF;
    int32_t hd = c->head_dim;
    float   a  = 1.0f / sqrtf((float)dim);
    r->m.tok_embd = rm_weight(r, s, dt, c->n_vocab, dim, 1.0f);
    r->m.output   = rm_weight(r, s, dt, c->n_vocab, dim, a);
    r->m.out_norm = rm_keep(r, test_rand_array(s, dim, 0.8f, 1.2f));
    r->m.layers   = rm_keep(r, calloc((size_t)n_layers, sizeof(struct coopt_layer)));
    for (int l = 0; l < n_layers; l++) {
        struct coopt_layer *L = &r->m.layers[l];
        L->attn_norm          = rm_keep(r, test_rand_array(s, dim, 0.8f, 1.2f));
        L->ffn_norm           = rm_keep(r, test_rand_array(s, dim, 0.8f, 1.2f));
        L->wq                 = rm_weight(r, s, dt, (int64_t)nh * hd, dim, 2 * a);
        L->wk                 = rm_weight(r, s, dt, (int64_t)nkv * hd, dim, 2 * a);
        L->wv                 = rm_weight(r, s, dt, (int64_t)nkv * hd, dim, 2 * a);
        L->wo                 = rm_weight(r, s, dt, dim, (int64_t)nh * hd, a);
        L->w_gate             = rm_weight(r, s, dt, c->ffn_dim, dim, a);
        L->w_up               = rm_weight(r, s, dt, c->ffn_dim, dim, a);
        L->w_down             = rm_weight(r, s, dt, dim, c->ffn_dim, 1.0f / sqrtf((float)c->ffn_dim));
    }
}

static void rm_free(struct rnd_model *r) {
    for (int i = 0; i < r->n_bufs; i++) free(r->bufs[i]);
    free(r->bufs);
}

// One side of the comparison: backend, cache, scratch, device copies of the batch.
struct fw_side {
    struct coopt_backend  *be;
    struct coopt_model    *m;
    struct coopt_kv_cache *kv;
    struct coopt_scratch   s;
    size_t                 pool_bytes;
};

static bool fw_side_init(struct test_ctx *t, struct fw_side *f, struct coopt_backend *be, struct coopt_model *host,
                         enum coopt_dtype kv_type, int32_t n_seq, int32_t max_blocks) {
    memset(f, 0, sizeof(*f));
    f->be = be;
    f->m  = host;
    if (be->ops->model_upload && be->ops->model_upload(be, host, &f->m) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "model_upload failed");
        return false;
    }
    const struct coopt_model_config *c = &host->config;
    struct coopt_kv_layout            l;
    COOPT_ASSERT(coopt_kv_layout_init(&l, kv_type, c->n_layers, c->n_kv_heads, c->head_dim, 16) == COOPT_OK);
    COOPT_ASSERT(coopt_kv_cache_init(&l, (int64_t)n_seq * max_blocks, n_seq, max_blocks, &f->kv) == COOPT_OK);
    f->pool_bytes = l.page_bytes * (size_t)f->kv->n_pages;
    void *pool;
    COOPT_ASSERT(be->ops->kv_pool_init(be, f->pool_bytes, &pool) == COOPT_OK);
    f->kv->pool = pool;
    COOPT_ASSERT(coopt_scratch_init(be, c, 64, &f->s) == COOPT_OK);
    return true;
}

static void fw_side_free(struct fw_side *f) {
    coopt_scratch_free(f->be, &f->s);
    f->be->ops->kv_pool_free(f->be, f->kv->pool, f->pool_bytes);
    f->kv->pool = NULL;
    coopt_kv_cache_free(f->kv);
    if (f->be->ops->model_release) f->be->ops->model_release(f->be, f->m);
}

// Runs one step of n tokens (seq ids in seqs) on side f; logits of every token into logits.
static void fw_step(struct fw_side *f, const struct coopt_rope *rope, const int32_t *tokens, const int32_t *seqs,
                    int32_t n, float *logits) {
    struct coopt_backend *be = f->be;
    struct coopt_kv_cache *kv = f->kv;
    int32_t mb = kv->max_pages_per_seq, n_seq = kv->n_seq_max;
    int32_t pos[64], tok_seq[64], out_rows[64], cnt[8] = {0}, *bt = malloc(sizeof(int32_t) * n_seq * mb), lens[8] = {0};
    int64_t slots[64];
    for (int32_t i = 0; i < n; i++) cnt[seqs[i]]++;
    for (int32_t s = 0; s < n_seq; s++) {
        if (cnt[s]) {
            COOPT_ASSERT(coopt_kv_seq_reserve(kv, s, cnt[s], NULL, NULL) == COOPT_OK);
            // commit the reserved pages the clean way where the backend offers it
            if (be->ops->kv_pool_commit && s % 2 == 0) {
                for (int32_t bl = 0; bl < mb && kv->seqs[s].pages[bl] >= 0; bl++)
                    COOPT_ASSERT(be->ops->kv_pool_commit(be, kv->pool, (size_t)kv->seqs[s].pages[bl] * kv->layout.page_bytes,
                                                        kv->layout.page_bytes) == COOPT_OK);
            }
        }
        memcpy(bt + (size_t)s * mb, kv->seqs[s].pages, sizeof(int32_t) * mb);
        cnt[s] = 0;
    }
    for (int32_t i = 0; i < n; i++) {
        int32_t s   = seqs[i];
        pos[i]      = (int32_t)kv->seqs[s].n_tokens + cnt[s]++;
        tok_seq[i]  = s; // batch sequence index == cache sequence id here
        slots[i]    = coopt_kv_slot(kv, s, pos[i]);
        out_rows[i] = i;
        lens[s]     = pos[i] + 1;
    }
    const void *src[] = {tokens, pos, tok_seq, slots, out_rows, bt, lens};
    size_t      sz[]  = {4 * (size_t)n, 4 * (size_t)n, 4 * (size_t)n, 8 * (size_t)n, 4 * (size_t)n,
                         4 * (size_t)n_seq * mb, 4 * (size_t)n_seq};
    void       *dst[7];
    for (int i = 0; i < 7; i++) {
        if (be->ops->model_upload) {
            dst[i] = dev_copy(be, src[i], sz[i]);
        } else {
            dst[i] = (void *)src[i];
        }
    }
    struct coopt_batch b = {.n_tokens = n, .tokens = dst[0], .pos = dst[1], .tok_seq = dst[2], .slots = dst[3],
                            .n_seqs = n_seq, .max_blocks = mb, .block_tables = dst[5], .seq_lens = dst[6],
                            .window = 0, .n_out = n, .out_rows = dst[4]};
    coopt_forward(f->m, be, kv, rope, &f->s, &b, NULL);
    size_t nv = (size_t)f->m->config.n_vocab;
    be->ops->download(be, logits, f->s.logits, (size_t)n * nv * 4);
    be->ops->sync(be);
    if (be->ops->model_upload)
        for (int i = 0; i < 7; i++) be->ops->free(be, dst[i]);
    for (int32_t s = 0; s < n_seq; s++)
        if (cnt[s]) coopt_kv_seq_advance(kv, s, cnt[s]);
    free(bt);
}

static bool check_forward(struct test_ctx *t, struct cu_pair *p, enum coopt_dtype wt, enum coopt_dtype kvt, int32_t dim,
                          int32_t nh, int32_t nkv) {
    uint64_t         s = 99 + (uint64_t)wt * 7 + (uint64_t)kvt;
    struct rnd_model rm;
    rm_init(&rm, &s, wt, dim, nh, nkv, 2);
    const struct coopt_model_config *c   = &rm.m.config;
    float                           *inv = malloc(sizeof(float) * c->head_dim / 2);
    coopt_rope_init(c, inv);
    struct coopt_rope rope = {.layout = c->rope_layout, .head_dim = c->head_dim, .inv_freq = inv};
    struct fw_side    fc, fr;
    if (!fw_side_init(t, &fc, p->cu, &rm.m, kvt, 3, 8)) return false;
    fw_side_init(t, &fr, p->ref, &rm.m, kvt, 3, 8);
    for (int sq = 0; sq < 3; sq++) {
        COOPT_ASSERT(coopt_kv_seq_init(fc.kv, sq) == COOPT_OK && coopt_kv_seq_init(fr.kv, sq) == COOPT_OK);
    }
    // step 1: prefill 20 tokens of seq 0 and 9 of seq 1 interleaved (cuBLAS path: 29 rows);
    // step 2: decode one token of each plus 3 prefill tokens of seq 2 (GEMV path: 6 rows)
    int32_t toks[64], seqs[64], n1 = 29, n2 = 6;
    for (int i = 0; i < n1; i++) toks[i] = (int32_t)(test_rand_u64(&s) % 300), seqs[i] = i % 3 == 2 && i < 27 ? 1 : 0;
    bool   ok     = true;
    size_t nv     = (size_t)c->n_vocab;
    float *lc     = malloc(64 * nv * 4), *lr = malloc(64 * nv * 4);
    bool   fp8    = kvt == COOPT_DTYPE_FP8_E4M3 || kvt == COOPT_DTYPE_FP8_E5M2;
    double rel    = fp8 ? 0.1 : wt == COOPT_DTYPE_F16 || wt == COOPT_DTYPE_BF16 ? 2e-2 : is_quant(wt) ? 3e-2 : 1e-3;
    for (int step = 0; step < 2 && ok; step++) {
        int32_t n = step ? n2 : n1;
        if (step) {
            const int32_t sq[6] = {0, 2, 2, 2, 1, 0}; // seq 0 gets two tokens, in order
            for (int i = 0; i < n; i++) toks[i] = (int32_t)(test_rand_u64(&s) % 300), seqs[i] = sq[i];
        }
        fw_step(&fc, &rope, toks, seqs, n, lc);
        fw_step(&fr, &rope, toks, seqs, n, lr);
        double mx = 0;
        for (size_t i = 0; i < (size_t)n * nv; i++) mx = fmax(mx, fabs(lr[i]));
        ok = test_near(t, __FILE__, __LINE__, lc, lr, (size_t)n * nv, rel * mx, fp8 ? 0 : rel);
        if (!ok) {
            char extra[160];
            snprintf(extra, sizeof(extra), " [forward %s weights, %s KV, dim %d heads %d/%d, step %d, max|logit| %.3g]",
                     coopt_dtype_name(wt), coopt_dtype_name(kvt), dim, nh, nkv, step, mx);
            strncat(t->msg, extra, sizeof(t->msg) - strlen(t->msg) - 1);
        }
    }
    fw_side_free(&fc);
    fw_side_free(&fr);
    free(lc), free(lr), free(inv);
    rm_free(&rm);
    return ok;
}

// A head dim the model loader takes (<= 512) but the CUDA kernels do not (> 256): the upload
// refuses it with a message naming it, instead of an abort in the first attention.
TEST(cuda_head_dim_limit) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t         s = 5;
    struct rnd_model rm;
    rm_init(&rm, &s, COOPT_DTYPE_F32, 1024, 2, 2, 1); // head dim 512
    struct coopt_model *dm = NULL;
    st_test_capture_begin();
    const enum coopt_status st = p.cu->ops->model_upload(p.cu, &rm.m, &dm);
    const char             *msg = st_test_capture_end();
    CHECKF(t, st == COOPT_ERR_UNSUPPORTED && dm == NULL, "upload of a head dim 512 model: status %d", (int)st);
    CHECKF(t, strstr(msg, "head dim 512") != NULL, "message '%s'", msg);
    rm_free(&rm);
    cu_pair_free(&p);
}

TEST(cuda_forward) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    // head dims 16 (generic attention path) and 64 (templated), GQA and MHA, each weight type
    if (!check_forward(t, &p, COOPT_DTYPE_F32, COOPT_DTYPE_F32, 128, 8, 2)) return;
    if (!check_forward(t, &p, COOPT_DTYPE_F16, COOPT_DTYPE_F16, 256, 4, 4)) return;
    if (!check_forward(t, &p, COOPT_DTYPE_BF16, COOPT_DTYPE_BF16, 256, 4, 2)) return;
    if (!check_forward(t, &p, COOPT_DTYPE_Q8_0, COOPT_DTYPE_FP8_E4M3, 256, 4, 2)) return;
    if (!check_forward(t, &p, COOPT_DTYPE_Q4_0, COOPT_DTYPE_F32, 128, 8, 2)) return;
    cu_pair_free(&p);
}

// ---- real models through the public API ----

static bool check_real_model(struct test_ctx *t, const char *name, enum coopt_dtype kvt) {
    const char *path = test_model_path(name);
    if (!coopt_path_exists(path)) {
        test_skip(t, "test model not available");
        return false;
    }
    struct coopt_model_params mp = coopt_model_default_params();
    struct coopt_model       *mc = NULL, *mr = NULL;
    mp.device = "cuda";
    if (coopt_model_load(path, &mp, &mc) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "%s: load on cuda", name);
        return false;
    }
    mp.device = "cpu";
    if (coopt_model_load(path, &mp, &mr) != COOPT_OK) {
        coopt_model_free(mc);
        test_fail(t, __FILE__, __LINE__, "%s: load on cpu", name);
        return false;
    }
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx = 256, cp.n_seq_max = 2, cp.n_batch = 64, cp.kv_type = kvt;
    struct coopt_ctx *cc = NULL, *cr = NULL;
    bool              ok = coopt_ctx_init(mc, &cp, &cc) == COOPT_OK && coopt_ctx_init(mr, &cp, &cr) == COOPT_OK;
    int32_t           nv = coopt_model_get_info(mr)->n_vocab;
    int32_t           s0 = -1, s1 = -1;
    ok = ok && coopt_seq_new(cc, &s0) == COOPT_OK && coopt_seq_new(cr, &s1) == COOPT_OK && s0 == s1;
    // a 100-token prompt (two steps of 64: chunked prefill), then 20 greedy steps on the CPU's choice
    int32_t toks[100], seqs[100];
    for (int i = 0; i < 100; i++) toks[i] = 3 + (int32_t)((i * 2654435761u) % (uint32_t)(nv - 3)), seqs[i] = s0;
    double worst = 0, mx = 0;
    for (int step = 0; step <= 20 && ok; step++) {
        struct coopt_batch_input in = {.n_tokens = step ? 1 : 100, .tokens = toks, .seq_ids = seqs};
        ok = coopt_ctx_decode(cc, &in) == COOPT_OK && coopt_ctx_decode(cr, &in) == COOPT_OK;
        if (!ok) break;
        const float *lc = coopt_ctx_logits(cc, in.n_tokens - 1), *lr = coopt_ctx_logits(cr, in.n_tokens - 1);
        int32_t      best = 0;
        double       m    = 0;
        for (int32_t i = 0; i < nv; i++) m = fmax(m, fabs(lr[i]));
        for (int32_t i = 0; i < nv; i++) {
            double tol = (kvt == COOPT_DTYPE_F32 || kvt == COOPT_DTYPE_F16 ? 1e-3 : 0.1) * m +
                         (kvt == COOPT_DTYPE_F32 || kvt == COOPT_DTYPE_F16 ? 1e-3 * fabs(lr[i]) : 0);
            worst = fmax(worst, fabs(lc[i] - lr[i]) / tol);
            if (lr[i] > lr[best]) best = i;
        }
        mx      = fmax(mx, m);
        toks[0] = best;
    }
    fprintf(stderr, "  %s %s KV: worst |cuda - cpu| / tol = %.3f (max |logit| %.2f)\n", name, coopt_dtype_name(kvt),
            worst, mx);
    coopt_ctx_free(cc);
    coopt_ctx_free(cr);
    coopt_model_free(mc);
    coopt_model_free(mr);
    if (!ok) {
        test_fail(t, __FILE__, __LINE__, "%s %s KV: context or decode failed", name, coopt_dtype_name(kvt));
        return false;
    }
    if (!(worst <= 1.0)) {
        test_fail(t, __FILE__, __LINE__, "%s %s KV: CUDA logits differ from the CPU's (worst error %.2f x tolerance)",
                  name, coopt_dtype_name(kvt), worst);
        return false;
    }
    return true;
}

TEST(cuda_real_models) {
    if (coopt_cuda_device_count() <= 0) SKIP(t, "no CUDA device");
    coopt_log_set_quiet(1);
    const char            *models[] = {"stories260K.gguf", "story-lmrs"};
    const enum coopt_dtype kvs[]    = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_FP8_E4M3};
    for (size_t m = 0; m < COOPT_ARRAY_LEN(models); m++)
        for (size_t k = 0; k < COOPT_ARRAY_LEN(kvs); k++)
            if (!check_real_model(t, models[m], kvs[k])) return;
}

// ---- kernel timings (not a check): COOPT_CUDA_BENCH=1 ./build/coopt-test cuda_bench ----

// Mean microseconds per call of fn over reps calls, after 3 warm-up calls.
#define BENCH_US(be, reps, call)                                                                   \
    ({                                                                                             \
        for (int w_ = 0; w_ < 3; w_++) call;                                                       \
        (be)->ops->sync(be);                                                                       \
        int64_t t0_ = coopt_time_us();                                                             \
        for (int r_ = 0; r_ < (reps); r_++) call;                                                  \
        (be)->ops->sync(be);                                                                       \
        (double)(coopt_time_us() - t0_) / (reps);                                                  \
    })

TEST(cuda_bench) {
    if (!getenv("COOPT_CUDA_BENCH")) SKIP(t, "set COOPT_CUDA_BENCH=1 to time the kernels");
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    struct coopt_backend *be = p.cu;
    uint64_t              s  = 1;
    // matmul: W [32768][4096] (larger than L2), x [n_rows][4096]
    const int64_t n_in = 4096, n_blk = 4096, n_rep = 8, n_out = n_blk * n_rep;
    float        *wf   = test_rand_array(&s, (size_t)n_in * n_blk, -1, 1);
    float        *dx   = dev_copy(be, NULL, 512 * (size_t)n_in * 4), *dout = dev_copy(be, NULL, 512 * (size_t)n_out * 4);
    float        *xh   = test_rand_array(&s, 512 * (size_t)n_in, -1, 1);
    be->ops->upload(be, dx, xh, 512 * (size_t)n_in * 4);
    printf("bench: matmul W [%lld][%lld]\n", (long long)n_out, (long long)n_in);
    printf("bench: %-6s %6s %10s %10s %10s\n", "type", "rows", "us/call", "GB/s(W)", "TFLOP/s");
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_wtypes); d++) {
        enum coopt_dtype dt = k_wtypes[d];
        size_t           rb = coopt_dtype_row_bytes(dt, n_in), blk = rb * (size_t)n_blk;
        uint8_t         *wq = malloc(blk);
        for (int64_t o = 0; o < n_blk; o++) coopt_quant_row(dt, wf + o * n_in, wq + o * rb, n_in);
        uint8_t *dw = dev_copy(be, NULL, blk * n_rep);
        for (int64_t r = 0; r < n_rep; r++) be->ops->upload(be, dw + r * blk, wq, blk);
        struct coopt_weight w = {.dtype = dt, .n_in = n_in, .n_out = n_out, .data = dw};
        const int32_t       rows[] = {1, 2, 8, 64, 512};
        for (size_t i = 0; i < COOPT_ARRAY_LEN(rows); i++) {
            int    reps = rows[i] >= 64 ? 5 : 20;
            double us   = BENCH_US(be, reps, be->ops->matmul(be, dout, dx, &w, rows[i]));
            printf("bench: %-6s %6d %10.1f %10.1f %10.2f\n", coopt_dtype_name(dt), rows[i], us, blk * n_rep / us / 1e3,
                   2.0 * n_in * n_out * rows[i] / us / 1e6);
        }
        be->ops->free(be, dw);
        free(wq);
    }
    be->ops->free(be, dx), be->ops->free(be, dout);
    free(wf), free(xh);
    cu_pair_free(&p);
}

// ---- attention timings (not a check): COOPT_CUDA_BENCH=1 ./build/coopt-test cuda_attn_bench ----
//
// One layer, head_dim 128, page 16: MHA (32/32 heads, llama2-7b) and GQA (32/8, llama3-8b).
// Decode: B tokens at context L, GB/s of K/V (+ FP8 scales) read. Prefill: one 512-token chunk
// at positions [L - 512, L) of one sequence, tensor cores (auto route) and, at 4k, the decode
// kernel (route 2); TFLOP/s counts 4 * hd flops per (query, key, head). The pool has 32 layers
// (a real model's page stride) where that fits in 24 GiB, else 1. Filters (unset: all):
// COOPT_CUDA_BENCH_HEADS=MHA|GQA, COOPT_CUDA_BENCH_KV=<kv type>, COOPT_CUDA_BENCH_CTX=<L>,
// COOPT_CUDA_BENCH_B=<B>, COOPT_CUDA_BENCH_PREFILL=0 (decode only), COOPT_CUDA_BENCH_REPS=<n>
// (decode calls timed, 20), COOPT_CUDA_BENCH_LAYERS=<n> (layers of the pool's pages, 32; 1 puts a
// sequence's rows of a layer in one contiguous run), COOPT_CUDA_BENCH_PAGE=<positions a page, 16>.
static bool bench_pick(const char *env, const char *val) {
    const char *e = getenv(env);
    return !e || !*e || !strcmp(e, val);
}

TEST(cuda_attn_bench) {
    if (!getenv("COOPT_CUDA_BENCH")) SKIP(t, "set COOPT_CUDA_BENCH=1 to time the kernels");
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    struct coopt_backend *be = p.cu;
    uint64_t              s  = 1;
    const char   *pse = getenv("COOPT_CUDA_BENCH_PAGE");
    const int32_t hd = 128, ps = pse && atoi(pse) > 0 ? atoi(pse) : 16, chunk = 4096, n_pf = 512;
    const int32_t hcfg[][2] = {{32, 32}, {32, 8}};
    const char   *re = getenv("COOPT_CUDA_BENCH_REPS"), *pf = getenv("COOPT_CUDA_BENCH_PREFILL");
    const int     reps = re && atoi(re) > 0 ? atoi(re) : 20;
    const char   *nl = getenv("COOPT_CUDA_BENCH_LAYERS");
    const int32_t n_layers = nl && atoi(nl) > 0 ? atoi(nl) : 32;
    const bool    prefill = !pf || strcmp(pf, "0") != 0;
    printf("bench: attention head_dim %d, page %d (one layer)\n", hd, ps);
    printf("bench: %-5s %-9s %-7s %3s %6s %10s %10s\n", "heads", "kv", "step", "B", "ctx", "us/call", "GB/s|TF/s");
    const enum coopt_dtype kts[] = {COOPT_DTYPE_F16, COOPT_DTYPE_FP8_E4M3};
    const int32_t          nh_max = 32;
    float *kq = test_rand_array(&s, (size_t)chunk * nh_max * hd, -1, 1), *kk = test_rand_array(&s, (size_t)chunk * nh_max * hd, -1, 1);
    float *dq = dev_copy(be, kq, (size_t)chunk * nh_max * hd * 4), *dk = dev_copy(be, kk, (size_t)chunk * nh_max * hd * 4);
    float *dv = dev_copy(be, kk, (size_t)chunk * nh_max * hd * 4), *dao = dev_copy(be, NULL, (size_t)chunk * nh_max * hd * 4);
    float *inv = make_inv_freq(hd, 10000.0f);
    struct coopt_rope rope = {.layout = COOPT_ROPE_HALF, .head_dim = hd, .inv_freq = inv};
    for (size_t hc = 0; hc < COOPT_ARRAY_LEN(hcfg); hc++)
        for (size_t kt = 0; kt < COOPT_ARRAY_LEN(kts); kt++)
            for (int32_t L = 4096; L <= 16384; L *= 4)
                for (int32_t B = 1; B <= 8; B *= 8) {
                    const int32_t nh = hcfg[hc][0], nkv = hcfg[hc][1];
                    const char   *hname = nkv == nh ? "MHA" : "GQA";
                    char          lb[16], bb[16];
                    snprintf(lb, sizeof lb, "%d", L), snprintf(bb, sizeof bb, "%d", B);
                    if (!bench_pick("COOPT_CUDA_BENCH_HEADS", hname) ||
                        !bench_pick("COOPT_CUDA_BENCH_KV", coopt_dtype_name(kts[kt])) ||
                        !bench_pick("COOPT_CUDA_BENCH_CTX", lb) || !bench_pick("COOPT_CUDA_BENCH_B", bb))
                        continue;
                    struct coopt_kv_cache kv = {0};
                    int32_t               mb = (L + ps - 1) / ps;
                    size_t                n_pages = (size_t)B * mb;
                    COOPT_ASSERT(coopt_kv_layout_init(&kv.layout, kts[kt], n_layers, nkv, hd, ps) == COOPT_OK);
                    if (n_pages * kv.layout.page_bytes > ((size_t)24 << 30))
                        COOPT_ASSERT(coopt_kv_layout_init(&kv.layout, kts[kt], 1, nkv, hd, ps) == COOPT_OK);
                    size_t pool_bytes = n_pages * kv.layout.page_bytes;
                    void  *pool;
                    COOPT_ASSERT(be->ops->kv_pool_init(be, pool_bytes, &pool) == COOPT_OK);
                    kv.pool      = pool;
                    int32_t *bt  = malloc(sizeof(int32_t) * n_pages), *pos = malloc(sizeof(int32_t) * chunk);
                    int32_t *sq  = malloc(sizeof(int32_t) * chunk);
                    int64_t *sl  = malloc(sizeof(int64_t) * chunk);
                    for (size_t i = 0; i < n_pages; i++) bt[i] = (int32_t)i;
                    int32_t *dpos = dev_copy(be, NULL, sizeof(int32_t) * chunk), *dsq = dev_copy(be, NULL, sizeof(int32_t) * chunk);
                    int64_t *dsl = dev_copy(be, NULL, sizeof(int64_t) * chunk);
                    int32_t *dbt = dev_copy(be, bt, sizeof(int32_t) * n_pages);
                    for (int32_t b = 0; b < B; b++)
                        for (int32_t c0 = 0; c0 < L; c0 += chunk) {
                            for (int32_t i = 0; i < chunk; i++)
                                pos[i] = c0 + i, sq[i] = b, sl[i] = (int64_t)b * mb * ps + c0 + i;
                            be->ops->upload(be, dpos, pos, sizeof(int32_t) * chunk);
                            be->ops->upload(be, dsq, sq, sizeof(int32_t) * chunk);
                            be->ops->upload(be, dsl, sl, sizeof(int64_t) * chunk);
                            struct coopt_batch fb = {.n_tokens = chunk, .pos = dpos, .tok_seq = dsq, .slots = dsl};
                            be->ops->rope_store(be, dq, dk, dv, nh, &kv, 0, &fb, &rope);
                        }
                    // decode: the last position of each of the B sequences
                    for (int32_t b = 0; b < B; b++) pos[b] = L - 1, sq[b] = b;
                    be->ops->upload(be, dpos, pos, sizeof(int32_t) * B);
                    be->ops->upload(be, dsq, sq, sizeof(int32_t) * B);
                    struct coopt_batch ab = {.n_tokens = B, .pos = dpos, .tok_seq = dsq, .n_seqs = B, .max_blocks = mb,
                                             .block_tables = dbt};
                    double us = BENCH_US(be, reps, be->ops->attention(be, dao, dq, nh, &kv, 0, &ab, 0.088f));
                    double kv_bytes = (double)B * L * 2 * nkv * (hd * kv.layout.elem_bytes + (kv.layout.has_scales ? 4 : 0));
                    printf("bench: %-5s %-9s %-7s %3d %6d %10.1f %10.1f  (%d-layer pool)\n", hname, coopt_dtype_name(kts[kt]),
                           "decode", B, L, us, kv_bytes / us / 1e3, kv.layout.n_layers);
                    if (B == 1 && prefill) { // prefill: a 512-token chunk ending at L
                        for (int32_t i = 0; i < n_pf; i++) pos[i] = L - n_pf + i, sq[i] = 0;
                        be->ops->upload(be, dpos, pos, sizeof(int32_t) * n_pf);
                        be->ops->upload(be, dsq, sq, sizeof(int32_t) * n_pf);
                        struct coopt_batch pb = {.n_tokens = n_pf, .pos = dpos, .tok_seq = dsq, .n_seqs = 1,
                                                 .max_blocks = mb, .block_tables = dbt};
                        double flops = 4.0 * hd * nh * ((double)n_pf * (L - n_pf) + (double)n_pf * (n_pf + 1) / 2);
                        for (int route = 0; route <= 2; route += 2) {
                            if (route == 2 && L > 4096) continue; // the decode kernel: minutes at 16k
                            cuda_attn_set_route(be, route);
                            double pus = BENCH_US(be, 5, be->ops->attention(be, dao, dq, nh, &kv, 0, &pb, 0.088f));
                            printf("bench: %-5s %-9s %-7s %3d %6d %10.1f %10.2f\n", hname, coopt_dtype_name(kts[kt]),
                                   route ? "pf-dec" : "pf-tc", n_pf, L, pus, flops / pus / 1e6);
                        }
                        cuda_attn_set_route(be, 0);
                    }
                    be->ops->kv_pool_free(be, pool, pool_bytes);
                    void *dd[] = {dpos, dsq, dsl, dbt};
                    for (size_t i = 0; i < 4; i++) be->ops->free(be, dd[i]);
                    free(bt), free(pos), free(sq), free(sl);
                }
    void *dd[] = {dq, dk, dv, dao};
    for (size_t i = 0; i < 4; i++) be->ops->free(be, dd[i]);
    free(kq), free(kk), free(inv);
    cu_pair_free(&p);
}

#else // !COOPT_CUDA

TEST(cuda_ops) { SKIP(t, "built without CUDA"); }

#endif
