/*
 * test_cuda_decode.c -- the CUDA decode path: the GEMV at the decode shapes of real models, the
 * fused ops (matmul_multi, matmul_swiglu, matmul_add) against the composed CPU reference ops, and
 * decode steps replayed from CUDA graphs against the same steps run op by op. Every test skips
 * without CUDA or a GPU.
 *
 * Tolerances, per output (and why):
 *   norm_matmul_*: as below with x replaced by rmsnorm_ref(x) (the fused kernels scale the dot
 *     product by 1/rms instead of each element: f32 rounding, inside the 1e-5 term).
 *   matmul / matmul_multi / matmul_add: as tests/test_cuda.c: (1e-5 + r16) * sum_i |w_i x_i| +
 *     q8 + 1e-6, where r16 = 2^-11 (F16) / 2^-8 (BF16) on the cuBLAS path (x rounded to 16 bits)
 *     and q8 = sum_blocks amax(x block)/254 * sum_block |w| for Q8_0/Q4_0 (x rounded to int8).
 *     matmul_add adds 1e-6 * |result| for the extra f32 addition.
 *   matmul_swiglu: silu(g) * u with g, u each within the matmul bound t_g, t_u of the reference:
 *     |d/dg silu(g)| <= 1.1, so |err| <= 1.1 * |u| * t_g + |silu(g)| * t_u (+ 1e-6 relative for
 *     expf), times 1.5 for the products of the errors.
 *   graph replay: bit-identical to the op-by-op step (the same kernels with the same arguments).
 */
#include "backend.h"
#include "context.h"
#include "coopt.h"
#include "dtype.h"
#include "test.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef COOPT_CUDA
#include "cuda/cuda.h"

#include "test_cuda_util.h"
#include "test_generate_util.h"

static bool is_q(enum coopt_dtype d) { return d == COOPT_DTYPE_Q8_0 || d == COOPT_DTYPE_Q4_0; }

// A random weight: host quantized copy, its dequantized values (for bounds), device copy.
struct tw {
    struct coopt_weight host, dev;
    float              *wd; // [n_out][n_in] dequantized
};

static void tw_make(struct tw *w, struct coopt_backend *cu, uint64_t *s, enum coopt_dtype dt, int64_t n_in, int64_t n_out,
                    bool bias) {
    size_t   rb = coopt_dtype_row_bytes(dt, n_in);
    float   *wf = test_rand_array(s, (size_t)n_in * n_out, -1, 1);
    uint8_t *wq = malloc(rb * n_out);
    w->wd       = malloc((size_t)n_in * n_out * sizeof(float));
    for (int64_t o = 0; o < n_out; o++) {
        coopt_quant_row(dt, wf + o * n_in, wq + o * rb, n_in);
        coopt_dequant_row(dt, wq + o * rb, w->wd + o * n_in, n_in);
    }
    free(wf);
    float *b = bias ? test_rand_array(s, n_out, -1, 1) : NULL;
    w->host  = (struct coopt_weight){.dtype = dt, .n_in = n_in, .n_out = n_out, .data = wq, .bias = b};
    w->dev   = w->host;
    w->dev.data = dev_copy(cu, wq, rb * n_out);
    w->dev.bias = b ? dev_copy(cu, b, (size_t)n_out * 4) : NULL;
}

static void tw_free(struct tw *w, struct coopt_backend *cu) {
    cu->ops->free(cu, (void *)w->dev.data);
    cu->ops->free(cu, (void *)w->dev.bias);
    free((void *)w->host.data);
    free((void *)w->host.bias);
    free(w->wd);
}

static bool on_cublas(enum coopt_dtype dt, int32_t n_rows) {
    return (dt == COOPT_DTYPE_F32 && n_rows > 8) || ((dt == COOPT_DTYPE_F16 || dt == COOPT_DTYPE_BF16) && n_rows > 2);
}

// Bound on |cuda - ref| of output (r, o) of x · w (see the header).
static double mm_tol(const struct tw *w, const float *x, int32_t r, int64_t o, int32_t n_rows) {
    enum coopt_dtype dt  = w->host.dtype;
    int64_t          n   = w->host.n_in;
    const float     *xr  = x + (size_t)r * n, *wr = w->wd + (size_t)o * n;
    double           mag = 0, q8 = 0;
    for (int64_t i = 0; i < n; i++) mag += fabs((double)wr[i] * xr[i]);
    for (int64_t b0 = 0; is_q(dt) && b0 < n; b0 += 32) {
        double amax = 0, sw = 0;
        for (int j = 0; j < 32; j++) amax = fmax(amax, fabs(xr[b0 + j])), sw += fabs(wr[b0 + j]);
        q8 += amax / 254.0 * sw;
    }
    double r16 = !on_cublas(dt, n_rows) ? 0 : dt == COOPT_DTYPE_F16 ? ldexp(1, -11) : dt == COOPT_DTYPE_BF16 ? ldexp(1, -8) : 0;
    return (1e-5 + r16) * mag + q8 + 1e-6;
}

static float silu(float g) { return g / (1.0f + expf(-g)); }

// Reference products of x with the 3 weights and their bounds (mm_tol), per output.
struct fref {
    float  *want[3];
    double *tol[3];
};

static void fref_make(struct fref *f, struct coopt_backend *ref, const struct tw *w, const float *x, int32_t n_rows) {
    for (int i = 0; i < 3; i++) {
        int64_t no = w[i].host.n_out;
        f->want[i] = malloc((size_t)no * n_rows * sizeof(float));
        f->tol[i]  = malloc((size_t)no * n_rows * sizeof(double));
        ref->ops->matmul(ref, f->want[i], x, &w[i].host, n_rows);
        for (int32_t r = 0; r < n_rows; r++)
            for (int64_t o = 0; o < no; o++) f->tol[i][(size_t)r * no + o] = mm_tol(&w[i], x, r, o, n_rows);
    }
}

static void fref_free(struct fref *f) {
    for (int i = 0; i < 3; i++) free(f->want[i]), free(f->tol[i]);
}

// got (device, [n_rows][n_out]) against want within tol.
static bool near_rows(struct test_ctx *t, struct coopt_backend *cu, const float *dgot, const float *want,
                      const double *tol, int64_t n_out, int32_t n_rows, const char *op, const char *what) {
    size_t n   = (size_t)n_out * n_rows;
    float *got = malloc(n * sizeof(float));
    dev_read(cu, got, dgot, n * sizeof(float));
    bool ok = true;
    for (size_t k = 0; k < n && ok; k++) {
        if (!(fabs((double)got[k] - want[k]) <= tol[k])) {
            test_fail(t, __FILE__, __LINE__, "%s %s: out[%lld][%lld] = %.7g, ref %.7g, tol %.3g", op, what,
                      (long long)(k / (size_t)n_out), (long long)(k % (size_t)n_out), got[k], want[k], tol[k]);
            ok = false;
        }
    }
    free(got);
    return ok;
}

// silu(g) * u of two reference products, and its bound (see the header).
static void swiglu_ref(const struct fref *f, size_t n, float *want, double *tol) {
    for (size_t k = 0; k < n; k++) {
        float g = f->want[0][k], u = f->want[1][k], e = silu(g) * u;
        want[k] = e;
        tol[k]  = 1.5 * (1.1 * fabs(u) * f->tol[0][k] + fabs(silu(g)) * f->tol[1][k]) + 1e-6 * fabs(e) + 1e-6;
    }
}

// One shape: matmul_multi (3 weights), plain matmul (w2), matmul_swiglu (gate = w0, up = w1 when
// their n_out match) and matmul_add (w0 onto a random base), all against the reference matmul;
// with_norm adds norm_matmul_multi / norm_matmul_swiglu against rmsnorm_ref then matmul_ref.
static bool check_fused(struct test_ctx *t, struct cu_pair *p, uint64_t *s, enum coopt_dtype dt, int64_t n_in,
                        const int64_t n_out[3], int32_t n_rows, bool bias, bool with_norm) {
    struct coopt_backend *cu = p->cu, *ref = p->ref;
    struct tw             w[3];
    for (int i = 0; i < 3; i++) tw_make(&w[i], cu, s, dt, n_in, n_out[i], bias);
    float *x  = test_rand_array(s, (size_t)n_in * n_rows, -2, 2);
    float *dx = dev_copy(cu, x, (size_t)n_in * n_rows * 4);
    size_t no_max = (size_t)fmax(fmax(n_out[0], n_out[1]), n_out[2]) * n_rows;
    float *dout[3], *dtmp = dev_copy(cu, NULL, no_max * 4), *sw = malloc(no_max * 4);
    double *swt = malloc(no_max * sizeof(double));
    for (int i = 0; i < 3; i++) dout[i] = dev_copy(cu, NULL, (size_t)n_out[i] * n_rows * 4);
    struct fref f;
    fref_make(&f, ref, w, x, n_rows);
    char what[160];
    snprintf(what, sizeof(what), "%s n_in %lld n_out %lld/%lld/%lld n_rows %d bias %d", coopt_dtype_name(dt),
             (long long)n_in, (long long)n_out[0], (long long)n_out[1], (long long)n_out[2], n_rows, bias);
    bool                       ok    = true;
    const struct coopt_weight *ws[3] = {&w[0].dev, &w[1].dev, &w[2].dev};
    cu->ops->matmul_multi(cu, 3, dout, dx, ws, n_rows);
    for (int i = 0; i < 3 && ok; i++)
        ok = near_rows(t, cu, dout[i], f.want[i], f.tol[i], n_out[i], n_rows, "matmul_multi", what);
    if (ok) {
        cu->ops->matmul(cu, dout[2], dx, &w[2].dev, n_rows);
        ok = near_rows(t, cu, dout[2], f.want[2], f.tol[2], n_out[2], n_rows, "matmul", what);
    }
    if (ok && n_out[0] == n_out[1]) {
        swiglu_ref(&f, (size_t)n_out[0] * n_rows, sw, swt);
        cu->ops->matmul_swiglu(cu, dout[0], dtmp, dx, &w[0].dev, &w[1].dev, n_rows);
        ok = near_rows(t, cu, dout[0], sw, swt, n_out[0], n_rows, "matmul_swiglu", what);
    }
    if (ok) { // base + x·w0
        size_t n    = (size_t)n_out[0] * n_rows;
        float *base = test_rand_array(s, n, -3, 3);
        cu->ops->upload(cu, dout[0], base, n * 4);
        cu->ops->matmul_add(cu, dout[0], dx, &w[0].dev, n_rows);
        for (size_t k = 0; k < n; k++) {
            sw[k]  = base[k] + f.want[0][k];
            swt[k] = f.tol[0][k] + 1e-6 * fabs(sw[k]);
        }
        ok = near_rows(t, cu, dout[0], sw, swt, n_out[0], n_rows, "matmul_add", what);
        free(base);
    }
    if (ok && with_norm) { // the same products of rmsnorm(x, g)
        float *g  = test_rand_array(s, (size_t)n_in, 0.5f, 1.5f), *xn = malloc((size_t)n_in * n_rows * 4);
        float *dg = dev_copy(cu, g, (size_t)n_in * 4), eps = 1e-5f;
        ref->ops->rmsnorm(ref, xn, x, g, n_rows, (int32_t)n_in, eps);
        struct fref fn;
        fref_make(&fn, ref, w, xn, n_rows);
        cu->ops->norm_matmul_multi(cu, 3, dout, dx, dg, eps, ws, n_rows);
        for (int i = 0; i < 3 && ok; i++)
            ok = near_rows(t, cu, dout[i], fn.want[i], fn.tol[i], n_out[i], n_rows, "norm_matmul_multi", what);
        if (ok && n_out[0] == n_out[1]) {
            swiglu_ref(&fn, (size_t)n_out[0] * n_rows, sw, swt);
            cu->ops->norm_matmul_swiglu(cu, dout[0], dtmp, dx, dg, eps, &w[0].dev, &w[1].dev, n_rows);
            ok = near_rows(t, cu, dout[0], sw, swt, n_out[0], n_rows, "norm_matmul_swiglu", what);
        }
        // x itself is left alone
        float *xb = malloc((size_t)n_in * n_rows * 4);
        dev_read(cu, xb, dx, (size_t)n_in * n_rows * 4);
        if (ok && memcmp(xb, x, (size_t)n_in * n_rows * 4) != 0) {
            test_fail(t, __FILE__, __LINE__, "norm_matmul %s: x was modified", what);
            ok = false;
        }
        free(xb);
        fref_free(&fn);
        cu->ops->free(cu, dg);
        free(g), free(xn);
    }
    fref_free(&f);
    for (int i = 0; i < 3; i++) {
        tw_free(&w[i], cu);
        cu->ops->free(cu, dout[i]);
    }
    cu->ops->free(cu, dx), cu->ops->free(cu, dtmp);
    free(x), free(sw), free(swt);
    return ok;
}

static const enum coopt_dtype k_types[] = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_BF16, COOPT_DTYPE_Q8_0,
                                           COOPT_DTYPE_Q4_0};

// Odd shapes (n_in not a multiple of the 16-byte or 256-element tiles, n_out odd and tiny, every
// batch size class) for every type, fused ops and plain.
TEST(cuda_fused_ops) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t s = 7;
    struct {
        int64_t n_in, n_out[3];
        int32_t n_rows;
    } shapes[] = {
        {64, {7, 7, 1}, 1},        {96, {173, 173, 5}, 2},    {172, {3, 3, 9}, 3},     {4128, {33, 33, 16}, 5},
        {256, {9, 9, 2}, 8},       {4096, {17, 17, 64}, 17},  {288, {40, 40, 7}, 1},   {544, {1, 1, 3}, 2},
    };
    int i = 0;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_types); d++)
        for (size_t k = 0; k < COOPT_ARRAY_LEN(shapes); k++, i++) {
            if (is_q(k_types[d]) && shapes[k].n_in % 32) continue;
            if (!check_fused(t, &p, &s, k_types[d], shapes[k].n_in, shapes[k].n_out, shapes[k].n_rows, i % 2 == 0, true)) {
                cu_pair_free(&p);
                return;
            }
        }
    cu_pair_free(&p);
}

// The decode shapes of llama2-7b / llama3-8b / llama2-13b: q/k/v (4096 -> 4096 / 1024), gate/up
// (4096 -> 11008), down (11008 -> 4096), 13b's 5120 / 13824, the LM head (4096 -> 32000), at
// batch 1 and 2. The big ones for F16 and the quantized types (the ones that ship); F32/BF16 at
// the smaller ones.
TEST(cuda_gemv_shapes) {
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    uint64_t s = 17;
    struct {
        int64_t n_in, n_out[3];
        int32_t n_rows;
        bool    all_types;
    } shapes[] = {
        {4096, {4096, 4096, 1024}, 1, true},
        {4096, {11008, 11008, 4096}, 2, false},
        {11008, {4096, 4096, 4096}, 1, false},
        {5120, {13824, 13824, 5120}, 1, false},
        {13824, {5120, 5120, 5120}, 2, false},
        {4096, {14336, 14336, 32000}, 1, false},
    };
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_types); d++)
        for (size_t k = 0; k < COOPT_ARRAY_LEN(shapes); k++) {
            enum coopt_dtype dt = k_types[d];
            if (!shapes[k].all_types && (dt == COOPT_DTYPE_F32 || dt == COOPT_DTYPE_BF16)) continue;
            if (!check_fused(t, &p, &s, dt, shapes[k].n_in, shapes[k].n_out, shapes[k].n_rows, k == 0, k % 2 == 0)) {
                cu_pair_free(&p);
                return;
            }
        }
    cu_pair_free(&p);
}

// ---- decode steps replayed from CUDA graphs ----

// The same scripted run through two contexts on one model, one op by op and one with step
// recording: ragged batches of 1-3 sequences with 1-2 tokens each, prefill chunks in between
// (which grow the workspaces, so recorded steps must be re-recorded), a freed and reused
// sequence, contexts crossing the 128/256/512 attention buckets, and a 12-token batch twice in a
// row (cuBLAS inside a captured step), whose second recording is made to fail (the step then runs
// op by op: cuda_step_fail_next_graph). Every logit row must be bit-identical, and the recording
// context must really have replayed steps.
static bool check_graphs(struct test_ctx *t, struct coopt_model *m, enum coopt_dtype kvt) {
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx = 640, cp.n_seq_max = 4, cp.n_batch = 64, cp.kv_type = kvt;
    struct coopt_ctx *ce = NULL, *cg = NULL;
    cp.no_step_graphs = true;
    bool ok           = coopt_ctx_init(m, &cp, &ce) == COOPT_OK;
    cp.no_step_graphs = false;
    ok                = ok && coopt_ctx_init(m, &cp, &cg) == COOPT_OK;
    if (!ok) {
        test_fail(t, __FILE__, __LINE__, "context init failed");
        coopt_ctx_free(ce);
        return false;
    }
    int32_t nv = coopt_model_get_info(m)->n_vocab;
    int32_t seq[3], se, sg;
    for (int i = 0; i < 3 && ok; i++) {
        ok     = coopt_seq_new(ce, &se) == COOPT_OK && coopt_seq_new(cg, &sg) == COOPT_OK && se == sg;
        seq[i] = se;
    }
    uint64_t rng = 1234;
    int32_t  toks[128], sids[128], n_checked = 0;
    int      step = 0;
    for (; step < 420 && ok; step++) {
        int32_t n = 0;
        if (step == 0 || step == 150 || step == 300) { // prefill chunks: 100 tokens (two steps of 64/36)
            int32_t sq = seq[step == 150 ? 1 : step == 300 ? 2 : 0];
            for (int i = 0; i < 100; i++) toks[n] = (int32_t)(test_rand_u64(&rng) % (uint64_t)nv), sids[n++] = sq;
        } else if (step == 200 || step == 201) { // 12 tokens, same geometry twice: recorded with cuBLAS in it
            for (int i = 0; i < 12; i++) toks[n] = (int32_t)(test_rand_u64(&rng) % (uint64_t)nv), sids[n++] = seq[i % 3];
        } else if (step == 250) { // free sequence 1 and start it again
            coopt_seq_free(ce, seq[1]);
            coopt_seq_free(cg, seq[1]);
            ok = coopt_seq_new(ce, &se) == COOPT_OK && coopt_seq_new(cg, &sg) == COOPT_OK && se == sg;
            seq[1] = se;
            toks[n] = 5, sids[n++] = seq[1];
        } else { // decode: ragged subsets, some sequences with two tokens
            int pat = (int)(test_rand_u64(&rng) % 6);
            for (int q = 0; q < 3; q++) {
                if (!((pat + 1) & (1 << q)) && q != 0) continue;
                int cnt = (pat == 5 && q == 1) ? 2 : 1;
                for (int c = 0; c < cnt; c++) toks[n] = (int32_t)(test_rand_u64(&rng) % (uint64_t)nv), sids[n++] = seq[q];
            }
        }
        if (!ok) break;
        // step 201's recording fails (as if out of memory for the graph): the step runs op by op
        // instead (its logits below; counted op by op), nothing is recorded, and the geometry
        // stays op by op (without the failure the step would count as recorded)
        int64_t e_a = 0, c_a = 0, r_a = 0, e_b = 0, c_b = 0, r_b = 0;
        if (step == 201) cuda_step_fail_next_graph(coopt_ctx_backend(cg));
        coopt_cuda_step_stats(coopt_ctx_backend(cg), &e_a, &c_a, &r_a);
        struct coopt_batch_input in = {.n_tokens = n, .tokens = toks, .seq_ids = sids};
        enum coopt_status        a  = coopt_ctx_decode(ce, &in), b = coopt_ctx_decode(cg, &in);
        coopt_cuda_step_stats(coopt_ctx_backend(cg), &e_b, &c_b, &r_b);
        if (step == 201 && (c_b != c_a || r_b != r_a || e_b != e_a + 1)) {
            test_fail(t, __FILE__, __LINE__, "step 201: the failed recording counted as %lld recorded, %lld replayed",
                      (long long)(c_b - c_a), (long long)(r_b - r_a));
            ok = false;
        }
        if (a != COOPT_OK || b != COOPT_OK) {
            test_fail(t, __FILE__, __LINE__, "step %d: decode failed (%s / %s)", step, coopt_status_str(a), coopt_status_str(b));
            ok = false;
            break;
        }
        for (int32_t i = 0; i < n && ok; i++) {
            const float *le = coopt_ctx_logits(ce, i), *lg = coopt_ctx_logits(cg, i);
            if (!le && !lg) continue;
            if (!le || !lg || memcmp(le, lg, (size_t)nv * sizeof(float)) != 0) {
                int32_t j = 0;
                while (le && lg && j < nv && le[j] == lg[j]) j++;
                test_fail(t, __FILE__, __LINE__,
                          "%s KV, step %d (%d tokens), token %d: replayed logits differ from op by op (logit %d: %.7g vs %.7g)",
                          coopt_dtype_name(kvt), step, n, i, j, le && j < nv ? le[j] : 0.0, lg && j < nv ? lg[j] : 0.0);
                ok = false;
            }
            n_checked++;
        }
    }
    int64_t e0, c0, r0, e1, c1, r1;
    coopt_cuda_step_stats(coopt_ctx_backend(ce), &e0, &c0, &r0);
    coopt_cuda_step_stats(coopt_ctx_backend(cg), &e1, &c1, &r1);
    fprintf(stderr, "  %s KV: %d logit rows compared; recording context: %lld op by op, %lld recorded, %lld replayed\n",
            coopt_dtype_name(kvt), n_checked, (long long)e1, (long long)c1, (long long)r1);
    if (ok && (c0 != 0 || r0 != 0)) {
        test_fail(t, __FILE__, __LINE__, "the op-by-op context recorded %lld / replayed %lld steps", (long long)c0, (long long)r0);
        ok = false;
    }
    if (ok && (c1 < 5 || r1 < 150)) {
        test_fail(t, __FILE__, __LINE__, "only %lld steps recorded, %lld replayed: step recording is not working",
                  (long long)c1, (long long)r1);
        ok = false;
    }
    coopt_ctx_free(ce);
    coopt_ctx_free(cg);
    return ok;
}

// Runs check(t, m, kv) for F16 and FP8 KV on story-lmrs loaded on the GPU (the step-graph tests).
typedef bool story_check_fn(struct test_ctx *t, struct coopt_model *m, enum coopt_dtype kvt);
static void run_story_checks(struct test_ctx *t, story_check_fn *check) {
    if (coopt_cuda_device_count() <= 0) SKIP(t, "no CUDA device");
    const char *path = test_model_path("story-lmrs");
    NEED_FILE(t, path);
    coopt_log_set_quiet(1);
    const char *env = getenv("COOPT_CUDA_GRAPHS");
    if (env && !strcmp(env, "0")) SKIP(t, "COOPT_CUDA_GRAPHS=0");
    struct coopt_model_params mp = coopt_model_default_params();
    mp.device                    = "cuda";
    struct coopt_model *m        = NULL;
    if (coopt_model_load(path, &mp, &m) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "story-lmrs: load on cuda");
        return;
    }
    const enum coopt_dtype kvs[] = {COOPT_DTYPE_F16, COOPT_DTYPE_FP8_E4M3};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(kvs); k++)
        if (!check(t, m, kvs[k])) break;
    coopt_model_free(m);
}

TEST(cuda_step_graphs) { run_story_checks(t, check_graphs); }

// ---- decodes that return before the GPU finishes ----

#define ASYNC_STEPS 240
#define ASYNC_CHECKS 8 // checkpoints: steps 39, 79, 119, 159, 199, 239 and the two before a change

static bool async_checkpoint(int step) { return step % 40 == 39 || step == 78 || step == 158; }

// Runs the script of check_async on a fresh sequence of c; every_step: read the logits after each
// decode (each decode is waited for before the next is enqueued), else only at the checkpoints.
// Stores the checkpoints' last-token logits in out[ASYNC_CHECKS][nv]. Returns false after a FAIL.
static bool async_script(struct test_ctx *t, struct coopt_ctx *c, int32_t nv, bool every_step, float *out) {
    int32_t  s0 = -1, s1 = -1, toks[128], sids[128];
    uint64_t rng = 99;
    int      k   = 0;
    if (coopt_seq_new(c, &s0) != COOPT_OK) return test_fail(t, __FILE__, __LINE__, "seq_new"), false;
    for (int step = 0; step < ASYNC_STEPS; step++) {
        int32_t n = 0;
        if (step == 0) {
            for (int i = 0; i < 100; i++) toks[n] = (int32_t)(test_rand_u64(&rng) % (uint64_t)nv), sids[n++] = s0;
        } else if (step == 80) {
            if (coopt_seq_new(c, &s1) != COOPT_OK) return test_fail(t, __FILE__, __LINE__, "seq_new"), false;
            for (int i = 0; i < 40; i++) toks[n] = (int32_t)(test_rand_u64(&rng) % (uint64_t)nv), sids[n++] = s1;
        } else {
            if (step == 160) coopt_seq_free(c, s1), s1 = -1;
            toks[n] = (int32_t)(test_rand_u64(&rng) % (uint64_t)nv), sids[n++] = s0;
            if (s1 >= 0) toks[n] = (int32_t)(test_rand_u64(&rng) % (uint64_t)nv), sids[n++] = s1;
        }
        struct coopt_batch_input in = {.n_tokens = n, .tokens = toks, .seq_ids = sids};
        enum coopt_status        st = coopt_ctx_decode(c, &in);
        const float             *l  = st == COOPT_OK && (every_step || async_checkpoint(step)) ? coopt_ctx_logits(c, n - 1) : NULL;
        if (st != COOPT_OK || ((every_step || async_checkpoint(step)) && !l))
            return test_fail(t, __FILE__, __LINE__, "step %d: decode failed (%s)", step, coopt_status_str(st)), false;
        if (async_checkpoint(step)) memcpy(out + (size_t)k++ * (size_t)nv, l, (size_t)nv * sizeof(float));
    }
    coopt_seq_free(c, s0);
    return k == ASYNC_CHECKS || (test_fail(t, __FILE__, __LINE__, "%d checkpoints, expected %d", k, ASYNC_CHECKS), false);
}

// One script through two contexts on one model: `ca` first, alone, reading logits only at the
// checkpoints, so its host fills the next step's batch arrays while the GPU still runs earlier
// steps (the two host blocks and their fences, context.c); then `ce`, which reads the logits after
// every decode. The script: a 100-token prompt in chunks of 32 (four steps in one decode), single-
// token decodes (replayed graphs), a second sequence prefilled at step 80 and decoded beside the
// first (two-token batches), then freed at step 160 (its pages released while steps may be in
// flight). Checkpoint logits must be bit-identical: a step that read a half-rewritten or stale
// batch block (wrong token, position or slot) does not reproduce them. (Without the fence wait in
// run_step this fails on an H100: the host runs ahead of story-lmrs's small steps.)
static bool check_async(struct test_ctx *t, struct coopt_model *m, enum coopt_dtype kvt) {
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx = 512, cp.n_seq_max = 2, cp.n_batch = 32, cp.kv_type = kvt;
    struct coopt_ctx *ce = NULL, *ca = NULL;
    int32_t           nv = coopt_model_get_info(m)->n_vocab;
    float            *le = malloc((size_t)ASYNC_CHECKS * (size_t)nv * sizeof(float));
    float            *la = malloc((size_t)ASYNC_CHECKS * (size_t)nv * sizeof(float));
    if (!le || !la || coopt_ctx_init(m, &cp, &ce) != COOPT_OK || coopt_ctx_init(m, &cp, &ca) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "context init failed");
        coopt_ctx_free(ce);
        free(le), free(la);
        return false;
    }
    bool ok = async_script(t, ca, nv, false, la) && async_script(t, ce, nv, true, le);
    for (int k = 0; k < ASYNC_CHECKS && ok; k++) {
        const float *x = le + (size_t)k * (size_t)nv, *y = la + (size_t)k * (size_t)nv;
        if (memcmp(x, y, (size_t)nv * sizeof(float)) != 0) {
            int32_t j = 0;
            while (j < nv && x[j] == y[j]) j++;
            test_fail(t, __FILE__, __LINE__, "%s KV, checkpoint %d: logits of the context that ran ahead differ (logit %d: %.7g vs %.7g)",
                      coopt_dtype_name(kvt), k, j, j < nv ? x[j] : 0.0, j < nv ? y[j] : 0.0);
            ok = false;
        }
    }
    int64_t e1, c1, r1;
    coopt_cuda_step_stats(coopt_ctx_backend(ca), &e1, &c1, &r1);
    fprintf(stderr, "  %s KV: %d checkpoints compared; %lld steps op by op, %lld recorded, %lld replayed\n",
            coopt_dtype_name(kvt), ASYNC_CHECKS, (long long)e1, (long long)c1, (long long)r1);
    if (ok && r1 < 200) {
        test_fail(t, __FILE__, __LINE__, "only %lld steps replayed: the run ahead was not tested on graphs", (long long)r1);
        ok = false;
    }
    coopt_ctx_free(ce);
    coopt_ctx_free(ca);
    free(le), free(la);
    return ok;
}

TEST(cuda_decode_async) { run_story_checks(t, check_async); }

// ---- greedy generation with the argmax in the step (coopt_ctx_generate) ----

// story-lmrs on the GPU (2048-token vocabulary; cuda_argmax covers 32000-128256): the generation,
// whose steps are chained on the device and run ahead of the host, against the host loop on the
// same GPU (tests/test_generate_util.h), bit-identical. (A chained step's geometry is recorded on
// its second step and replayed from the third; this test does not count the replays,
// cuda_step_graphs does for plain steps.) Greedy, then sampled (the pick kernel; cuda_sample
// covers vocabularies up to 128256).
static bool check_generate_cuda(struct test_ctx *t, struct coopt_model *m, enum coopt_dtype kvt) {
    return check_generate(t, m, kvt, 16, false) && check_generate(t, m, kvt, 16, true);
}

TEST(cuda_generate) { run_story_checks(t, check_generate_cuda); }

// A batch drawn by its samplers on the GPU (the pick kernel over the batch's rows, inside the
// recorded steps from the third round on) against coopt_sampler_sample on a reference context's
// logits: tests/test_generate_util.h check_batch_samplers, as context_batch_samplers on the CPU.
static bool check_batch_samplers_cuda(struct test_ctx *t, struct coopt_model *m, enum coopt_dtype kvt) {
    return check_batch_samplers(t, m, kvt, 8);
}

TEST(cuda_batch_samplers) { run_story_checks(t, check_batch_samplers_cuda); }

// ---- timings (not a check): COOPT_CUDA_BENCH=1 ./build/coopt-test cuda_decode_bench ----

// Device bandwidth (copy and read-only kernel), then the decode GEMVs of llama2-7b (and 13b's
// shapes) per weight type, each weight rotated among enough copies that it cannot sit in L2.
// COOPT_CUDA_BENCH_ROWS2=1 adds batch 2, COOPT_CUDA_BENCH_F16=1 times F16 only.
TEST(cuda_decode_bench) {
    if (!getenv("COOPT_CUDA_BENCH")) SKIP(t, "set COOPT_CUDA_BENCH=1 to time the kernels");
    struct cu_pair p;
    if (!cu_pair_init(t, &p)) return;
    double copy = 0, rd = 0;
    if (coopt_cuda_membw((size_t)1 << 30, 10, &copy, &rd) == 0)
        printf("bench: device bandwidth, 1 GiB buffers, best of 10: cudaMemcpy D2D %.0f GB/s (read + write), "
               "read-only kernel %.0f GB/s\n", copy, rd);
    struct coopt_backend *be = p.cu;
    uint64_t              s  = 3;
    const enum coopt_dtype types[] = {COOPT_DTYPE_F16, COOPT_DTYPE_Q8_0, COOPT_DTYPE_Q4_0};
    struct {
        const char *name;
        int         op; // 0 matmul, 1 multi3 (q,k,v), 2 swiglu, 3 matmul_add, 4 / 5 1 / 2 with the RMS norm
        int64_t     n_in, n_out, n_out_kv;
    } cases[] = {
        {"qkv 7b", 1, 4096, 4096, 4096},   {"qkv 8b", 1, 4096, 4096, 1024},   {"o 7b (add)", 3, 4096, 4096, 0},
        {"gate/up 7b", 2, 4096, 11008, 0}, {"down 7b (add)", 3, 11008, 4096, 0}, {"lm head 7b", 0, 4096, 32000, 0},
        {"gate/up 13b", 2, 5120, 13824, 0}, {"down 13b (add)", 3, 13824, 5120, 0},
        {"norm+qkv 7b", 4, 4096, 4096, 4096}, {"norm+gate/up 7b", 5, 4096, 11008, 0},
    };
    float *xh = test_rand_array(&s, 2 * 16384, -1, 1);
    float *dx = dev_copy(be, xh, 2 * 16384 * 4), *o1 = dev_copy(be, NULL, 2 * 32000 * 4), *o2 = dev_copy(be, NULL, 2 * 32000 * 4);
    float *o3 = dev_copy(be, NULL, 2 * 32000 * 4), *dg = dev_copy(be, xh, 16384 * 4);
    printf("bench: %-16s %-5s %4s %10s %10s\n", "decode GEMV", "type", "rows", "us/call", "GB/s");
    size_t n_types = getenv("COOPT_CUDA_BENCH_F16") ? 1 : COOPT_ARRAY_LEN(types);
    for (size_t d = 0; d < n_types; d++)
        for (size_t c = 0; c < COOPT_ARRAY_LEN(cases); c++) {
            enum coopt_dtype dt = types[d];
            int64_t          n_in = cases[c].n_in, n_out = cases[c].n_out, n_kv = cases[c].n_out_kv;
            size_t           rb = coopt_dtype_row_bytes(dt, n_in);
            int              op = cases[c].op, multi = op == 1 || op == 4;
            int              nw = multi ? 3 : op == 2 || op == 5 ? 2 : 1;
            size_t           bytes = rb * (size_t)n_out * (multi ? 1 : (size_t)nw);
            if (multi) bytes += 2 * rb * (size_t)n_kv;
            int      n_copies = (int)(400e6 / (double)bytes) + 1; // > 8x the 50 MB L2
            float   *wf       = test_rand_array(&s, (size_t)n_in * 64, -1, 1);
            uint8_t *row      = malloc(rb * 64);
            for (int r = 0; r < 64; r++) coopt_quant_row(dt, wf + (size_t)r * n_in, row + (size_t)r * rb, n_in);
            struct coopt_weight(*w)[3] = calloc((size_t)n_copies, sizeof(*w));
            for (int k = 0; k < n_copies; k++)
                for (int i = 0; i < nw; i++) {
                    int64_t no = multi && i > 0 ? n_kv : n_out;
                    uint8_t *dw = dev_copy(be, NULL, rb * (size_t)no);
                    for (int64_t r = 0; r < no; r += 64) be->ops->upload(be, dw + (size_t)r * rb, row, rb * (size_t)(no - r < 64 ? no - r : 64));
                    w[k][i] = (struct coopt_weight){.dtype = dt, .n_in = n_in, .n_out = no, .data = dw};
                }
            for (int rows = 1; rows <= (getenv("COOPT_CUDA_BENCH_ROWS2") ? 2 : 1); rows++) {
                int reps = 4 * n_copies;
                for (int pass = 0; pass < 2; pass++) { // warm-up, then timed
                    be->ops->sync(be);
                    int64_t t0 = coopt_time_us();
                    for (int r = 0; r < reps; r++) {
                        struct coopt_weight *ww = w[r % n_copies];
                        switch (cases[c].op) {
                        case 0: be->ops->matmul(be, o1, dx, &ww[0], rows); break;
                        case 1: {
                            float                     *outs[3] = {o1, o2, o3};
                            const struct coopt_weight *ws[3]   = {&ww[0], &ww[1], &ww[2]};
                            be->ops->matmul_multi(be, 3, outs, dx, ws, rows);
                            break;
                        }
                        case 2: be->ops->matmul_swiglu(be, o1, o2, dx, &ww[0], &ww[1], rows); break;
                        case 4: {
                            float                     *outs[3] = {o1, o2, o3};
                            const struct coopt_weight *ws[3]   = {&ww[0], &ww[1], &ww[2]};
                            be->ops->norm_matmul_multi(be, 3, outs, dx, dg, 1e-5f, ws, rows);
                            break;
                        }
                        case 5: be->ops->norm_matmul_swiglu(be, o1, o2, dx, dg, 1e-5f, &ww[0], &ww[1], rows); break;
                        default: be->ops->matmul_add(be, o1, dx, &ww[0], rows); break;
                        }
                    }
                    be->ops->sync(be);
                    double us = (double)(coopt_time_us() - t0) / reps;
                    if (pass == 1)
                        printf("bench: %-16s %-5s %4d %10.1f %10.0f\n", cases[c].name, coopt_dtype_name(dt), rows, us,
                               bytes / us / 1e3);
                }
            }
            for (int k = 0; k < n_copies; k++)
                for (int i = 0; i < nw; i++) be->ops->free(be, (void *)w[k][i].data);
            free(w), free(wf), free(row);
        }
    be->ops->free(be, dx), be->ops->free(be, o1), be->ops->free(be, o2), be->ops->free(be, o3), be->ops->free(be, dg);
    free(xh);
    cu_pair_free(&p);
}

#else // !COOPT_CUDA

TEST(cuda_decode) { SKIP(t, "built without CUDA"); }

#endif
