/*
 * test_fused.c -- the fused matmul ops of the fast CPU table (matmul_multi, matmul_swiglu,
 * matmul_add; backend.h, src/cpu/matmul_fused.c) for every weight type, and the forward pass
 * with them against the forward pass that composes them from matmul / silu_mul / add.
 *
 * Ops: random weights at tinyllama-1.1b's real shapes (q/k/v 2048 -> 2048/256/256, gate/up 2048
 * -> 5632, o 2048 -> 2048, down 5632 -> 2048; 1 row) and at odd shapes (n_in not a multiple of
 * 32 for float and GPTQ weights -- GPTQ pads it --, n_out not a multiple of the 16-column
 * subtile or of the float kernel's 4 rows; 1, 3, 9 and 17 rows, where 9+ rows of float weights
 * take the composed fallback), with and without bias, GPTQ with and without act-order (whose
 * weights cannot share one prepared x) and a q/k/v call mixing GPTQ and F16. Each result is
 * checked against the scalar reference table, per output o of row r:
 *   e(o) = 1e-5 * sum_i |W[o][i] x_i| + q(o) + 1e-6,
 *   q(o) = sum_i |W[o][i]| * amax(x block of i) / 254 for int8 activations (Q8_0 / Q4_0 / GPTQ:
 *          half a quantum per element; blocks of 32 in the order the kernel quantizes them, i.e.
 *          GPTQ's padded/permuted rows), 0 for F32/F16/BF16
 * (the bounds of test_ops.c and test_gptq.c: f32 accumulation against double, plus x rounding);
 *   multi: every output within e(o);
 *   add:   out0 + x·W within e(o) + 2^-23 |out0 + x·W| (one more f32 rounding);
 *   swiglu: with eg, eu the bounds of gate and up and |silu'| <= 1.1,
 *          |got - silu(g) u| <= 1.1 |u| eg + (|silu(g)| + 1.1 eg) eu + 1e-5 |silu(g) u| + 1e-6.
 * And against the fast table's composed ops (matmul, then silu_mul / add): the same kernels do
 * the same per-output arithmetic, bias and residual are added in the composed order, and silu is
 * elementwise, so results are bit-identical -- except float weights with 2..8 rows, whose
 * kernel groups 4 weight rows by position within a chunk (other accumulators): there only the
 * reference bounds apply.
 *
 * Forward: the real test models ($COOPT_MODELS: story-lmrs, stories260K, tinystories-mha-25m)
 * and small random models of every weight type (GPTQ with and without act-order) run a 9-token
 * prefill and 3 decode steps on two fast backends, one with the fused ops and one with them
 * removed from its table. Logits must agree to 1e-5 of the largest |logit| (summation order of
 * the float kernels only; GOLDEN_TOL_BATCH in test_golden.c is the same allowance), and be
 * bit-identical for the GPTQ models (where nothing differs but the scheduling).
 */
#include "backend.h"
#include "dtype.h"
#include "forward.h"
#include "gptq.h"
#include "kv_cache.h"
#include "model.h"
#include "test.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- random weights of every type ----

struct tw {
    struct coopt_weight       w;
    float                    *wd;   // [n_out][n_in] dequantized
    void                     *data; // row data (non-GPTQ)
    struct coopt_gptq_weight *g;    // GPTQ
    float                    *bias;
};

static bool is_int8_x(enum coopt_dtype d) {
    return d == COOPT_DTYPE_Q8_0 || d == COOPT_DTYPE_Q4_0 || d == COOPT_DTYPE_Q4_GPTQ;
}

// Random GPTQ checkpoint tensors (v2 zeros, group 128 -- or one group when n_in < 128 --,
// random act-order groups when act) repacked by the loader's path.
static struct coopt_gptq_weight *make_gptq(uint64_t *s, int64_t n_in, int64_t n_out, bool act) {
    int32_t   gs = n_in >= 128 ? 128 : -1, G = gs == -1 ? 1 : (int32_t)((n_in + gs - 1) / gs);
    int32_t  *qw = malloc((size_t)(n_in / 8 * n_out) * 4), *qz = malloc((size_t)(G * n_out / 8) * 4);
    uint16_t *sc = malloc((size_t)(G * n_out) * 2);
    int32_t  *gi = act ? malloc((size_t)n_in * 4) : NULL;
    for (int64_t i = 0; i < n_in / 8 * n_out; i++) qw[i] = (int32_t)(uint32_t)test_rand_u64(s);
    for (int64_t i = 0; i < G * n_out / 8; i++) qz[i] = (int32_t)(uint32_t)test_rand_u64(s);
    for (int64_t i = 0; i < G * n_out; i++) sc[i] = coopt_f32_to_f16(test_rand_uniform(s, 0.002f, 0.03f));
    for (int64_t i = 0; act && i < n_in; i++) gi[i] = (int32_t)(test_rand_u64(s) % (uint64_t)G);
    struct coopt_gptq_src src = {
        .name = "fused", .n_in = n_in, .n_out = n_out, .bits = 4, .group_size = gs, .zeros_v1 = false,
        .qweight = qw, .qweight_shape = {n_in / 8, n_out}, .qweight_dtype = COOPT_DTYPE_I32, .qzeros = qz,
        .qzeros_shape = {G, n_out / 8}, .qzeros_dtype = COOPT_DTYPE_I32, .scales = sc, .scales_shape = {G, n_out},
        .scales_dtype = COOPT_DTYPE_F16, .g_idx = gi, .g_idx_len = act ? n_in : 0, .g_idx_dtype = COOPT_DTYPE_I32};
    struct coopt_gptq_weight *g = NULL;
    COOPT_ASSERT(coopt_gptq_repack(&src, 1, &g) == COOPT_OK);
    free(qw), free(qz), free(sc), free(gi);
    return g;
}

// amp: weights uniform in [-amp, amp] (non-GPTQ; GPTQ weights are |s (q - z)| <= 0.45).
static void tw_make(uint64_t *s, enum coopt_dtype dt, int64_t n_in, int64_t n_out, bool bias, bool act, float amp,
                    struct tw *t) {
    memset(t, 0, sizeof(*t));
    t->wd = malloc((size_t)(n_in * n_out) * sizeof(float));
    if (dt == COOPT_DTYPE_Q4_GPTQ) {
        t->g = make_gptq(s, n_in, n_out, act);
        coopt_gptq_dequant_ref(t->g, t->wd);
        coopt_gptq_as_weight(t->g, NULL, &t->w);
    } else {
        size_t rb = coopt_dtype_row_bytes(dt, n_in);
        float *wf = test_rand_array(s, (size_t)(n_in * n_out), -amp, amp);
        t->data   = malloc(rb * (size_t)n_out);
        for (int64_t o = 0; o < n_out; o++) {
            coopt_quant_row(dt, wf + o * n_in, (uint8_t *)t->data + o * rb, n_in);
            coopt_dequant_row(dt, (uint8_t *)t->data + o * rb, t->wd + o * n_in, n_in);
        }
        free(wf);
        t->w = (struct coopt_weight){.dtype = dt, .n_in = n_in, .n_out = n_out, .data = t->data};
    }
    if (bias) t->w.bias = t->bias = test_rand_array(s, (size_t)n_out, -1, 1);
}

static void tw_free(struct tw *t) {
    free(t->wd), free(t->data), free(t->bias);
    coopt_gptq_weight_free(t->g);
}

// e(o) of the file comment for row r of x, output o.
static double bound(const struct tw *t, const float *xr, int64_t o) {
    const struct coopt_weight *w  = &t->w;
    const float               *wr = t->wd + o * w->n_in;
    double                     mag = 0, q = 0;
    for (int64_t i = 0; i < w->n_in; i++) mag += fabs((double)wr[i] * xr[i]);
    if (is_int8_x(w->dtype)) {
        // blocks of 32 in the kernel's order: padded / permuted rows for GPTQ, natural otherwise
        int64_t k_pad = t->g ? t->g->k_pad : w->n_in;
        for (int64_t b = 0; b < k_pad; b += 32) {
            double amax = 0, sw = 0;
            for (int64_t kk = b; kk < b + 32; kk++) {
                int64_t i = t->g && t->g->perm ? t->g->perm[kk] : (kk < w->n_in ? kk : -1);
                if (i < 0) continue;
                amax = fmax(amax, fabs(xr[i]));
                sw += fabs(wr[i]);
            }
            q += amax / 254.0 * sw;
        }
    }
    return 1e-5 * mag + q + 1e-6;
}

// Whether fused and composed fast results must be bit-identical (see the file comment).
static bool exact_vs_composed(enum coopt_dtype dt, int32_t n_rows) {
    return is_int8_x(dt) || n_rows == 1 || n_rows > 8;
}

struct be3 {
    struct coopt_backend *fast, *ref;
};

static bool be3_init(struct test_ctx *t, struct be3 *b, int32_t n_threads) {
    b->fast = b->ref = NULL;
    if (coopt_cpu_backend_init(n_threads, false, &b->fast) != COOPT_OK ||
        coopt_cpu_backend_init(1, true, &b->ref) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "backend init failed");
        return false;
    }
    if (!b->fast->ops->matmul_multi || !b->fast->ops->matmul_swiglu || !b->fast->ops->matmul_add) {
        test_fail(t, __FILE__, __LINE__, "the fast CPU table lacks the fused ops");
        return false;
    }
    return true;
}

static void be3_free(struct be3 *b) {
    if (b->fast) b->fast->ops->destroy(b->fast);
    if (b->ref) b->ref->ops->destroy(b->ref);
}

// ---- matmul_multi ----

static bool check_multi(struct test_ctx *t, struct be3 *b, uint64_t *s, int32_t n, const enum coopt_dtype *dts,
                        int64_t n_in, const int64_t *n_outs, int32_t rows, bool bias, bool act) {
    struct tw                  tws[4];
    const struct coopt_weight *ws[4];
    float                     *got[4], *comp[4], *want[4];
    float                     *x = test_rand_array(s, (size_t)(n_in * rows), -2, 2);
    for (int32_t j = 0; j < n; j++) {
        tw_make(s, dts[j], n_in, n_outs[j], bias && j == 1, act, 1.0f / sqrtf((float)n_in), &tws[j]);
        ws[j]     = &tws[j].w;
        size_t sz = (size_t)(n_outs[j] * rows) * sizeof(float);
        got[j] = malloc(sz), comp[j] = malloc(sz), want[j] = malloc(sz);
        b->ref->ops->matmul(b->ref, want[j], x, ws[j], rows);
        b->fast->ops->matmul(b->fast, comp[j], x, ws[j], rows);
    }
    b->fast->ops->matmul_multi(b->fast, n, got, x, ws, rows);
    bool ok = true;
    for (int32_t j = 0; j < n && ok; j++) {
        bool exact = exact_vs_composed(dts[j], rows);
        for (int32_t r = 0; r < rows && ok; r++)
            for (int64_t o = 0; o < n_outs[j] && ok; o++) {
                size_t i   = (size_t)(r * n_outs[j] + o);
                double tol = bound(&tws[j], x + r * n_in, o);
                if (!(fabs((double)got[j][i] - want[j][i]) <= tol) || (exact && got[j][i] != comp[j][i])) {
                    test_fail(t, __FILE__, __LINE__,
                              "multi %s (weight %d of %d) n_in %lld n_out %lld rows %d act %d: out[%d][%lld] = %.8g, "
                              "composed %.8g, ref %.8g, tol %.3g",
                              coopt_dtype_name(dts[j]), j, n, (long long)n_in, (long long)n_outs[j], rows, act, r,
                              (long long)o, got[j][i], comp[j][i], want[j][i], tol);
                    ok = false;
                }
            }
    }
    for (int32_t j = 0; j < n; j++) tw_free(&tws[j]), free(got[j]), free(comp[j]), free(want[j]);
    free(x);
    return ok;
}

static const enum coopt_dtype k_types[] = {COOPT_DTYPE_F32,  COOPT_DTYPE_F16,  COOPT_DTYPE_BF16,
                                           COOPT_DTYPE_Q8_0, COOPT_DTYPE_Q4_0, COOPT_DTYPE_Q4_GPTQ};

// n_in of the odd shapes: not a multiple of 32 where the type allows it (GPTQ needs 8 | n_in).
static int64_t odd_in(enum coopt_dtype dt) {
    return dt == COOPT_DTYPE_Q4_GPTQ ? 200 : (dt == COOPT_DTYPE_Q8_0 || dt == COOPT_DTYPE_Q4_0) ? 160 : 100;
}
// n_out of the odd shapes (GPTQ needs 8 | n_out).
static int64_t odd_out(enum coopt_dtype dt, int k) {
    static const int64_t f[] = {37, 5, 19}, g[] = {40, 8, 24};
    return dt == COOPT_DTYPE_Q4_GPTQ ? g[k] : f[k];
}

TEST(fused_matmul_multi) {
    struct be3 b;
    if (!be3_init(t, &b, 2)) return;
    uint64_t      s       = 5;
    const int32_t rowss[] = {1, 3, 9, 17};
    bool          ok      = true;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_types) && ok; d++) {
        enum coopt_dtype dt     = k_types[d];
        enum coopt_dtype dts[4] = {dt, dt, dt, dt};
        // tinyllama q/k/v, decode
        const int64_t real[3] = {2048, 256, 256};
        ok = check_multi(t, &b, &s, 3, dts, 2048, real, 1, false, false);
        for (size_t r = 0; r < COOPT_ARRAY_LEN(rowss) && ok; r++) {
            const int64_t outs[4] = {odd_out(dt, 0), odd_out(dt, 1), odd_out(dt, 2), odd_out(dt, 0)};
            ok = check_multi(t, &b, &s, 3, dts, odd_in(dt), outs, rowss[r], r % 2 == 0, false) &&
                 check_multi(t, &b, &s, 1, dts, odd_in(dt), outs + 2, rowss[r], true, false) &&
                 check_multi(t, &b, &s, 4, dts, odd_in(dt), outs, rowss[r], false, false);
        }
    }
    // act-order GPTQ (each weight prepares its own x), and GPTQ mixed with F16 in one call
    const enum coopt_dtype g3[3] = {COOPT_DTYPE_Q4_GPTQ, COOPT_DTYPE_Q4_GPTQ, COOPT_DTYPE_Q4_GPTQ};
    const enum coopt_dtype mx[3] = {COOPT_DTYPE_Q4_GPTQ, COOPT_DTYPE_F16, COOPT_DTYPE_Q4_GPTQ};
    const int64_t          o3[3] = {128, 32, 32};
    for (int32_t rows = 1; rows <= 9 && ok; rows += 4)
        ok = check_multi(t, &b, &s, 3, g3, 256, o3, rows, true, true) &&
             check_multi(t, &b, &s, 3, mx, 256, o3, rows, false, false);
    be3_free(&b);
}

// ---- matmul_swiglu ----

static float silu(float g) { return g / (1.0f + expf(-g)); }

static bool check_swiglu(struct test_ctx *t, struct be3 *b, uint64_t *s, enum coopt_dtype dt, int64_t n_in,
                         int64_t n_out, int32_t rows, bool bias, bool act) {
    struct tw tg, tu;
    float     amp = 1.0f / sqrtf((float)n_in);
    tw_make(s, dt, n_in, n_out, bias, act, amp, &tg);
    tw_make(s, dt, n_in, n_out, false, act, amp, &tu);
    size_t n   = (size_t)(n_out * rows);
    float *x   = test_rand_array(s, (size_t)(n_in * rows), -2, 2);
    float *got = malloc(n * 4), *tmp = malloc(n * 4), *cg = malloc(n * 4), *cu = malloc(n * 4);
    float *rg = malloc(n * 4), *ru = malloc(n * 4);
    b->ref->ops->matmul(b->ref, rg, x, &tg.w, rows);
    b->ref->ops->matmul(b->ref, ru, x, &tu.w, rows);
    b->fast->ops->matmul(b->fast, cg, x, &tg.w, rows);
    b->fast->ops->matmul(b->fast, cu, x, &tu.w, rows);
    b->fast->ops->silu_mul(b->fast, cg, cg, cu, (int64_t)n); // the composed result
    b->fast->ops->matmul_swiglu(b->fast, got, tmp, x, &tg.w, &tu.w, rows);
    bool ok = true, exact = exact_vs_composed(dt, rows);
    for (int32_t r = 0; r < rows && ok; r++)
        for (int64_t o = 0; o < n_out && ok; o++) {
            size_t i  = (size_t)(r * n_out + o);
            double eg = bound(&tg, x + r * n_in, o), eu = bound(&tu, x + r * n_in, o);
            double sg = silu(rg[i]), want = sg * ru[i];
            double tol = 1.1 * fabs(ru[i]) * eg + (fabs(sg) + 1.1 * eg) * eu + 1e-5 * fabs(want) + 1e-6;
            if (!(fabs(got[i] - want) <= tol) || (exact && got[i] != cg[i])) {
                test_fail(t, __FILE__, __LINE__,
                          "swiglu %s n_in %lld n_out %lld rows %d bias %d act %d: out[%d][%lld] = %.8g, composed %.8g, "
                          "ref %.8g, tol %.3g",
                          coopt_dtype_name(dt), (long long)n_in, (long long)n_out, rows, bias, act, r, (long long)o,
                          got[i], cg[i], want, tol);
                ok = false;
            }
        }
    tw_free(&tg), tw_free(&tu);
    free(x), free(got), free(tmp), free(cg), free(cu), free(rg), free(ru);
    return ok;
}

TEST(fused_matmul_swiglu) {
    struct be3 b;
    if (!be3_init(t, &b, 2)) return;
    uint64_t      s       = 6;
    const int32_t rowss[] = {1, 3, 9, 17};
    bool          ok      = true;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_types) && ok; d++) {
        enum coopt_dtype dt = k_types[d];
        ok                  = check_swiglu(t, &b, &s, dt, 2048, 5632, 1, false, false); // tinyllama gate/up
        for (size_t r = 0; r < COOPT_ARRAY_LEN(rowss) && ok; r++) {
            ok = check_swiglu(t, &b, &s, dt, odd_in(dt), odd_out(dt, 0), rowss[r], r % 2 == 1, false) &&
                 check_swiglu(t, &b, &s, dt, odd_in(dt), dt == COOPT_DTYPE_Q4_GPTQ ? 424 : 421, rowss[r], false,
                              false);
        }
    }
    for (int32_t rows = 1; rows <= 9 && ok; rows += 4)
        ok = check_swiglu(t, &b, &s, COOPT_DTYPE_Q4_GPTQ, 256, 104, rows, true, true);
    be3_free(&b);
}

// ---- matmul_add ----

static bool check_add(struct test_ctx *t, struct be3 *b, uint64_t *s, enum coopt_dtype dt, int64_t n_in,
                      int64_t n_out, int32_t rows, bool bias, bool act) {
    struct tw tw;
    tw_make(s, dt, n_in, n_out, bias, act, 1.0f / sqrtf((float)n_in), &tw);
    size_t n    = (size_t)(n_out * rows);
    float *x    = test_rand_array(s, (size_t)(n_in * rows), -2, 2);
    float *out0 = test_rand_array(s, n, -3, 3);
    float *got = malloc(n * 4), *comp = malloc(n * 4), *want = malloc(n * 4), *tmp = malloc(n * 4);
    memcpy(got, out0, n * 4);
    memcpy(comp, out0, n * 4);
    b->ref->ops->matmul(b->ref, want, x, &tw.w, rows);
    b->fast->ops->matmul(b->fast, tmp, x, &tw.w, rows);
    b->fast->ops->add(b->fast, comp, comp, tmp, (int64_t)n);
    b->fast->ops->matmul_add(b->fast, got, x, &tw.w, rows);
    bool ok = true;
    for (int32_t r = 0; r < rows && ok; r++)
        for (int64_t o = 0; o < n_out && ok; o++) {
            size_t i  = (size_t)(r * n_out + o);
            double w  = (double)out0[i] + want[i];
            double tol = bound(&tw, x + r * n_in, o) + 0x1p-23 * fabs(w);
            if (!(fabs(got[i] - w) <= tol) || got[i] != comp[i]) {
                test_fail(t, __FILE__, __LINE__,
                          "add %s n_in %lld n_out %lld rows %d bias %d act %d: out[%d][%lld] = %.8g, composed %.8g, "
                          "ref %.8g, tol %.3g",
                          coopt_dtype_name(dt), (long long)n_in, (long long)n_out, rows, bias, act, r, (long long)o,
                          got[i], comp[i], w, tol);
                ok = false;
            }
        }
    tw_free(&tw);
    free(x), free(out0), free(got), free(comp), free(want), free(tmp);
    return ok;
}

TEST(fused_matmul_add) {
    struct be3 b;
    if (!be3_init(t, &b, 2)) return;
    uint64_t      s       = 8;
    const int32_t rowss[] = {1, 3, 9, 17};
    bool          ok      = true;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_types) && ok; d++) {
        enum coopt_dtype dt = k_types[d];
        // tinyllama o and down projections
        ok = check_add(t, &b, &s, dt, 2048, 2048, 1, false, false) && check_add(t, &b, &s, dt, 5632, 2048, 1, true, false);
        for (size_t r = 0; r < COOPT_ARRAY_LEN(rowss) && ok; r++)
            ok = check_add(t, &b, &s, dt, odd_in(dt), odd_out(dt, r % 3), rowss[r], r % 2 == 0, false);
    }
    for (int32_t rows = 1; rows <= 9 && ok; rows += 4)
        ok = check_add(t, &b, &s, COOPT_DTYPE_Q4_GPTQ, 264, 56, rows, rows > 1, true);
    be3_free(&b);
}

TEST(fused_matmul_threads) {
    // 1 and 3 threads: uneven chunk lists, and the single-thread path
    for (int32_t nth = 1; nth <= 3; nth += 2) {
        struct be3 b;
        if (!be3_init(t, &b, nth)) return;
        uint64_t               s   = 9 + (uint64_t)nth;
        const enum coopt_dtype g[] = {COOPT_DTYPE_Q4_GPTQ, COOPT_DTYPE_Q4_GPTQ, COOPT_DTYPE_Q4_GPTQ};
        const enum coopt_dtype q[] = {COOPT_DTYPE_Q4_0, COOPT_DTYPE_Q4_0, COOPT_DTYPE_Q4_0};
        const int64_t          o[] = {512, 64, 64};
        bool ok = check_multi(t, &b, &s, 3, g, 512, o, 1, false, false) && check_multi(t, &b, &s, 3, q, 512, o, 2, true, false) &&
                  check_swiglu(t, &b, &s, COOPT_DTYPE_F16, 256, 301, 1, false, false) &&
                  check_swiglu(t, &b, &s, COOPT_DTYPE_Q4_GPTQ, 512, 344, 3, false, false) &&
                  check_add(t, &b, &s, COOPT_DTYPE_Q8_0, 512, 301, 1, true, false);
        be3_free(&b);
        if (!ok) return;
    }
}

// ---- the forward pass with and without the fused ops ----

struct fw {
    struct coopt_backend  *be;
    struct coopt_kv_cache *kv;
    size_t                 pool_bytes;
    struct coopt_scratch   s;
};

static void fw_init(struct fw *f, struct coopt_backend *be, const struct coopt_model *m, int32_t max_tokens) {
    const struct coopt_model_config *c = &m->config;
    struct coopt_kv_layout            l;
    enum coopt_dtype                  kvt = c->head_dim >= 16 ? COOPT_DTYPE_FP8_E4M3 : COOPT_DTYPE_F16;
    int32_t                           mb  = (max_tokens + 15) / 16;
    memset(f, 0, sizeof(*f));
    f->be = be;
    COOPT_ASSERT(coopt_kv_layout_init(&l, kvt, c->n_layers, c->n_kv_heads, c->head_dim, 16) == COOPT_OK);
    COOPT_ASSERT(coopt_kv_cache_init(&l, mb, 1, mb, &f->kv) == COOPT_OK);
    f->pool_bytes = l.page_bytes * (size_t)mb;
    void *pool;
    COOPT_ASSERT(be->ops->kv_pool_init(be, f->pool_bytes, &pool) == COOPT_OK);
    f->kv->pool = pool;
    COOPT_ASSERT(coopt_scratch_init(be, c, max_tokens, &f->s) == COOPT_OK);
    COOPT_ASSERT(coopt_kv_seq_init(f->kv, 0) == COOPT_OK);
}

static void fw_free(struct fw *f) {
    coopt_scratch_free(f->be, &f->s);
    f->be->ops->kv_pool_free(f->be, f->kv->pool, f->pool_bytes);
    f->kv->pool = NULL;
    coopt_kv_cache_free(f->kv);
}

// Appends n tokens to the sequence in one step; logits of every token into logits [n][n_vocab].
static void fw_step(struct fw *f, const struct coopt_model *m, const struct coopt_rope *rope, const int32_t *toks,
                    int32_t n, float *logits) {
    struct coopt_kv_cache *kv = f->kv;
    COOPT_ASSERT(n <= 16 && coopt_kv_seq_reserve(kv, 0, n, NULL, NULL) == COOPT_OK);
    int32_t pos[16], tok_seq[16], out_rows[16], len = (int32_t)kv->seqs[0].n_tokens + n;
    int64_t slots[16];
    for (int32_t i = 0; i < n; i++) {
        pos[i] = (int32_t)kv->seqs[0].n_tokens + i, tok_seq[i] = 0, out_rows[i] = i;
        slots[i] = coopt_kv_slot(kv, 0, pos[i]);
    }
    struct coopt_batch b = {.n_tokens = n, .tokens = toks, .pos = pos, .tok_seq = tok_seq, .slots = slots,
                            .n_seqs = 1, .max_blocks = kv->max_pages_per_seq, .block_tables = kv->seqs[0].pages,
                            .seq_lens = &len, .n_out = n, .out_rows = out_rows};
    coopt_forward(m, f->be, kv, rope, &f->s, &b, NULL);
    memcpy(logits, f->s.logits, (size_t)n * (size_t)m->config.n_vocab * sizeof(float));
    coopt_kv_seq_advance(kv, 0, n);
}

// 9-token prefill and 3 decode steps with the fused ops and without; see the file comment.
static bool check_forward(struct test_ctx *t, const char *name, const struct coopt_model *m, bool exact) {
    const struct coopt_model_config *c = &m->config;
    struct coopt_backend            *fused = NULL, *comp = NULL;
    COOPT_ASSERT(coopt_cpu_backend_init(2, false, &fused) == COOPT_OK && coopt_cpu_backend_init(2, false, &comp) == COOPT_OK);
    struct coopt_ops ops = *comp->ops; // the same table without the fused ops
    const struct coopt_ops *saved = comp->ops;
    ops.matmul_multi = NULL, ops.matmul_swiglu = NULL, ops.matmul_add = NULL;
    comp->ops = &ops;
    float *inv = malloc(sizeof(float) * (size_t)c->head_dim / 2);
    coopt_rope_init(c, inv);
    struct coopt_rope rope = {.layout = c->rope_layout, .head_dim = c->head_dim, .inv_freq = inv};
    struct fw         ff, fc;
    fw_init(&ff, fused, m, 16);
    fw_init(&fc, comp, m, 16);
    size_t  nv = (size_t)c->n_vocab;
    float  *lf = malloc(9 * nv * 4), *lc = malloc(9 * nv * 4);
    int32_t toks[9];
    for (int i = 0; i < 9; i++) toks[i] = (int32_t)((i * 37 + 1) % c->n_vocab);
    bool ok = true;
    for (int step = 0; step < 4 && ok; step++) {
        int32_t n = step == 0 ? 9 : 1;
        if (step) toks[0] = (int32_t)((step * 101 + 7) % c->n_vocab);
        fw_step(&ff, m, &rope, toks, n, lf);
        fw_step(&fc, m, &rope, toks, n, lc);
        double scale = 0, worst = 0;
        size_t wi = 0;
        for (size_t i = 0; i < (size_t)n * nv; i++) scale = fmax(scale, fabs(lc[i]));
        for (size_t i = 0; i < (size_t)n * nv; i++) {
            double d = fabs((double)lf[i] - lc[i]);
            if (d > worst || isnan(d)) worst = d, wi = i;
        }
        double tol = exact ? 0 : 1e-5 * scale;
        if (!(worst <= tol) || !isfinite(scale)) {
            test_fail(t, __FILE__, __LINE__, "%s step %d: fused logit[%zu] = %.8g, composed %.8g (|diff| %.3g > %.3g)",
                      name, step, wi, lf[wi], lc[wi], worst, tol);
            ok = false;
        }
    }
    fw_free(&ff), fw_free(&fc);
    comp->ops = saved;
    fused->ops->destroy(fused), comp->ops->destroy(comp);
    free(lf), free(lc), free(inv);
    return ok;
}

// A random model with every matmul weight of type dt (GPTQ: f16 embeddings and LM head, as
// GPTQ checkpoints have them).
struct rnd_model {
    struct coopt_model m;
    struct tw         *tws;
    int                n_tws;
    float             *norms;
};

static struct coopt_weight rm_w(struct rnd_model *r, uint64_t *s, enum coopt_dtype dt, int64_t n_out, int64_t n_in,
                                float amp, bool act) {
    struct tw *t = &r->tws[r->n_tws++];
    tw_make(s, dt, n_in, n_out, false, act, amp, t);
    free(t->wd), t->wd = NULL; // only the weights are needed
    return t->w;
}

static void rm_init(struct rnd_model *r, uint64_t *s, enum coopt_dtype dt, bool act) {
    memset(r, 0, sizeof(*r));
    struct coopt_model_config *c = &r->m.config;
    int32_t                    dim = 256, nl = 2;
    c->n_vocab = 300, c->dim = dim, c->n_layers = nl, c->n_heads = 8, c->n_kv_heads = 2, c->head_dim = 32;
    // ffn_dim: not a multiple of the 16-column subtile where the type allows it (Q8_0/Q4_0 need 32 | n_in)
    c->ffn_dim = dt == COOPT_DTYPE_Q8_0 || dt == COOPT_DTYPE_Q4_0 ? 416 : 424, c->n_ctx_train = 512, c->norm_eps = 1e-5f, c->rope_theta = 10000.0f;
    c->rope_layout = COOPT_ROPE_HALF;
    r->tws         = calloc((size_t)(2 + 7 * nl), sizeof(struct tw));
    r->norms       = test_rand_array(s, (size_t)(dim * (2 * nl + 1)), 0.8f, 1.2f);
    enum coopt_dtype et = dt == COOPT_DTYPE_Q4_GPTQ ? COOPT_DTYPE_F16 : dt;
    float            a  = 1.0f / sqrtf((float)dim);
    r->m.tok_embd       = rm_w(r, s, et, c->n_vocab, dim, 1.0f, false);
    r->m.output         = rm_w(r, s, et, c->n_vocab, dim, a, false);
    r->m.out_norm       = r->norms + 2 * nl * dim;
    r->m.layers         = calloc((size_t)nl, sizeof(struct coopt_layer));
    for (int l = 0; l < nl; l++) {
        struct coopt_layer *L = &r->m.layers[l];
        L->attn_norm          = r->norms + 2 * l * dim;
        L->ffn_norm           = r->norms + (2 * l + 1) * dim;
        L->wq                 = rm_w(r, s, dt, 256, dim, 2 * a, act);
        L->wk                 = rm_w(r, s, dt, 64, dim, 2 * a, act);
        L->wv                 = rm_w(r, s, dt, 64, dim, 2 * a, act);
        L->wo                 = rm_w(r, s, dt, dim, 256, a, act);
        L->w_gate             = rm_w(r, s, dt, c->ffn_dim, dim, a, act);
        L->w_up               = rm_w(r, s, dt, c->ffn_dim, dim, a, act);
        L->w_down             = rm_w(r, s, dt, dim, c->ffn_dim, 1.0f / sqrtf((float)c->ffn_dim), act);
    }
}

static void rm_free(struct rnd_model *r) {
    for (int i = 0; i < r->n_tws; i++) tw_free(&r->tws[i]);
    free(r->tws), free(r->norms), free(r->m.layers);
}

TEST(fused_forward_random) {
    uint64_t s  = 12;
    bool     ok = true;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_types) && ok; d++) {
        for (int act = 0; act <= (k_types[d] == COOPT_DTYPE_Q4_GPTQ) && ok; act++) {
            struct rnd_model r;
            rm_init(&r, &s, k_types[d], act);
            char name[64];
            snprintf(name, sizeof(name), "random %s%s", coopt_dtype_name(k_types[d]), act ? " act-order" : "");
            ok = check_forward(t, name, &r.m, k_types[d] == COOPT_DTYPE_Q4_GPTQ);
            rm_free(&r);
        }
    }
}

TEST(fused_forward_real_models) {
    const char *names[] = {"story-lmrs", "stories260K.gguf", "tinystories-mha-25m"};
    int         n_run   = 0;
    for (size_t i = 0; i < COOPT_ARRAY_LEN(names); i++) {
        const char *path = test_model_path(names[i]);
        if (!test_have_file(path)) continue;
        struct coopt_model *m = NULL;
        CHECKF(t, coopt_model_load(path, NULL, &m) == COOPT_OK, "cannot load %s", path);
        bool ok = check_forward(t, names[i], m, false);
        coopt_model_free(m);
        if (!ok) return;
        n_run++;
    }
    if (n_run == 0) SKIP(t, "no test model found (set COOPT_MODELS)");
}
