/*
 * test_cuda_gptq.c -- GPTQ int4 on the CUDA backend (src/cuda/gptq.cu) against exact references:
 * every path (tensor-core GEMV, f32 GEMV, int8 GEMV in several launch configurations and without
 * programmatic dependent launch, tensor-core MMA with 16-128 tokens per block, dequantize + cuBLAS,
 * the automatic choice, the multi-weight GEMVs, the fused decode ops) on random GPTQ checkpoints at odd and real shapes,
 * the int8 GEMV against the CPU int8 kernels, the committed fixtures of the independent Python
 * packer, and whole models (`coopt synth` GPTQ checkpoints loaded on cuda against the CPU scalar
 * reference backend). Skips without a GPU.
 *
 * References are independent of the repacking: W[o][i] is dequantized straight from the
 * checkpoint tensors (qweight/qzeros/scales/g_idx by the format's definition), products summed
 * in double. Tolerances, with mag = sum_i |W[o][i] x[i]| and sw = sum_i |W[o][i]|:
 *   int8 GEMV: 1.0001 sum_i |W[o][i]| h_i + 1e-5 mag + 1e-6, h_i = amax(x over the 32-row block
 *     of i in the weight's padded order) / 254: x is rounded to int8 per block (half a quantum
 *     d / 2 = amax / 254 at most per element; the 1.0001 covers the f32 rounding of d), then
 *     exact integer products and f32 accumulation as below. The same bound as the CPU kernels'
 *     in test_gptq.c. Against the CPU int8 kernels (test cuda_gptq_cpu_match), which quantize x
 *     identically: both compute sum over blocks and groups of s d (q - z) xq exactly in integers
 *     except for f32 rounding in different orders (the CPU subtracts the zero term per group,
 *     the GPU per block), so the tolerance is 3e-6 m2 + 1e-6 with m2 = sum_i s (q + z) (|x_i| +
 *     h_i), a bound on the magnitudes both f32 sums see (|q xq d| + |z xq d| per element): about
 *     25 f32 ulps of m2 for the two orders' rounding. A host emulation of the kernel measured
 *     at most 0.001 of the earlier 3e-5 (so ~0.01 of this one) on every case of the test; a
 *     wrong term or a systematic quantization mismatch is orders of magnitude larger (a single
 *     flipped int8 value moves the sum by s |q - z| d, ~1e-6 m2 at K = 4096).
 *   f32 GEMV: 1e-5 mag + 1e-6. Every weight is exactly s (q - z) and every product is formed in
 *     f32 (q - z exact, scale applied per group sum), so only f32 accumulation differs from the
 *     double reference (as for the F32 GEMV in test_cuda.c).
 *   tensor-core GEMV (h, the decode default): (2^-10 + 1e-5) mag + 2^-23 amax(x row) sw + 1e-6.
 *     Each warp stages its x range times a power of two (exact) chosen so that its amax lands in
 *     [2^-1, 2^15), rounded to f16 once (2^-11 relative, or 2^-25 absolute below the f16 normal
 *     range, <= 2^-24 of the warp's amax; 2^-10 and 2^-23 leave a factor 2 for the tensor
 *     cores' f32 accumulation, which is not IEEE round-to-nearest at every step); q - z is exact
 *     in f16, products exact, scales applied per group in f32. With the RMS norm fused, x is the
 *     reference's rmsnorm(x) (the kernel stages x * g and multiplies the sums by 1 / rms; f32
 *     rounding inside the 1e-5 term). gq_scale_rows makes rows whose warps need each choice.
 *   MMA and cuBLAS: (2^-10 + 2^-22 + 1e-5) mag + 2^-25 sw + 1e-6. x and s (q - z) are each
 *     rounded to f16 once (half an ulp: 2^-11 relative each, the product's error at most
 *     2^-10 + 2^-22 of |W x|; x below the f16 normal range loses at most 2^-25 absolute), then
 *     f32 accumulation as above.
 *   whole models: logits within 1e-3 max|ref| + 1e-3 |ref| when every GPTQ matmul is the f32
 *     GEMV (one token per step: f32 end to end, as test_cuda.c's f32 models), 2e-2 with the
 *     int8 GEMV and after a prompt (tensor-core path, as test_cuda.c's F16 model, whose prefill
 *     rounds activations to f16). int8 rounding is ~20x f16's per element (amax / 254 against
 *     2^-11 |x|); the f16 path measured 0.009 of its tolerance (docs/BENCHMARKS.md), so the
 *     int8 GEMV was expected at ~0.2 of the same tolerance; an H100 measured 0.29-0.30 (the test
 *     prints the ratio).
 * Outputs are poisoned (NaN) before every run, so an unwritten element fails.
 * COOPT_CUDA_BENCH=1 ./build/coopt-test cuda_gptq_bench times the kernels (not a check).
 */
#include "context.h"
#include "coopt.h"
#include "cpu/threads.h"
#include "dtype.h"
#include "gptq.h"
#include "model.h"
#include "synth.h"
#include "test.h"
#include "test_gptq_util.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef COOPT_CUDA
#include "backend.h"
#include "cuda/cuda.h"
#include "cuda/gptq_dev.h"

// helpers defined in test_safetensors.c
bool        st_test_mkdtemp(char *buf, size_t cap);
void        st_test_rmtree(const char *dir);
void        st_test_capture_begin(void);
const char *st_test_capture_end(void);

// Row o of W [n_out][n_in] from the checkpoint tensors alone; qz (NULL: not wanted) gets
// s (q + z) of every element.
static void gq_row(const struct coopt_gptq_src *s, int64_t o, float *w, float *qz) {
    int64_t in = s->n_in, out = s->n_out;
    for (int64_t i = 0; i < in; i++) {
        int32_t grp = s->g_idx ? s->g_idx[i] : (s->group_size == -1 ? 0 : (int32_t)(i / s->group_size));
        int     q   = (int)(((uint32_t)s->qweight[(i / 8) * out + o] >> (4 * (i % 8))) & 15u);
        int     z = (int)(((uint32_t)s->qzeros[grp * (out / 8) + o / 8] >> (4 * (o % 8))) & 15u) + (s->zeros_v1 ? 1 : 0);
        float   sc = coopt_f16_to_f32(s->scales[grp * out + o]);
        w[i]       = sc * (float)(q - z);
        if (qz) qz[i] = sc * (float)(q + z);
    }
}

// ---- reference and comparison ----

// Exact products for the checked columns cols[0..n_cols): ref/mag/sw/hq/m2 [n_rows][n_cols]
// (hq = sum_i |W| h_i, m2 = sum_i s (q + z) (|x_i| + h_i): see the file comment).
struct gq_ref {
    int64_t *cols;
    int64_t  n_cols;
    double  *ref, *mag, *sw, *hq, *m2;
    double   amax[8]; // max |x| of rows 0..7
};

static void gq_ref_free(struct gq_ref *r) {
    free(r->cols), free(r->ref), free(r->mag), free(r->sw), free(r->hq), free(r->m2);
}

// h[i] = half the int8 quantum of input i of row x [n_in]: amax of its 32-row block in hw's
// padded order / 254 (the activation quantization of the CPU kernels and the int8 GEMV).
static void gq_half_quanta(const struct coopt_gptq_weight *hw, const float *x, float *h) {
    for (int64_t b = 0; b < hw->k_pad / 32; b++) {
        float amax = 0;
        for (int pass = 0; pass < 2; pass++) {
            for (int64_t kk = b * 32; kk < b * 32 + 32; kk++) {
                int64_t i = hw->perm ? hw->perm[kk] : (kk < hw->n_in ? kk : -1);
                if (i < 0) continue;
                if (pass == 0) amax = fmaxf(amax, fabsf(x[i]));
                else h[i] = amax / 254.0f;
            }
        }
    }
}

// Every column when n_out is small, else the first and last 24 and every 61st (all tiles and
// lanes are hit: 61 is odd, so o % 16 cycles).
static void gq_ref_make(const struct coopt_gptq_src *s, const struct coopt_gptq_weight *hw, const float *x,
                        const float *bias, int32_t n_rows, struct gq_ref *r) {
    int64_t out = s->n_out, in = s->n_in;
    r->cols     = malloc(sizeof(int64_t) * (size_t)out);
    r->n_cols   = 0;
    for (int64_t o = 0; o < out; o++)
        if (out <= 1100 || o < 24 || o >= out - 24 || o % 61 == 0) r->cols[r->n_cols++] = o;
    size_t n = (size_t)r->n_cols * (size_t)n_rows;
    r->ref = malloc(n * 8), r->mag = malloc(n * 8), r->sw = malloc(n * 8), r->hq = malloc(n * 8), r->m2 = malloc(n * 8);
    for (int32_t row = 0; row < 8; row++) {
        r->amax[row] = 0;
        for (int64_t i = 0; row < n_rows && i < in; i++) r->amax[row] = fmax(r->amax[row], fabs(x[(size_t)row * in + i]));
    }
    float *w = malloc((size_t)in * 4), *qz = malloc((size_t)in * 4), *h = malloc((size_t)in * 4 * (size_t)n_rows);
    for (int32_t row = 0; row < n_rows; row++) gq_half_quanta(hw, x + (size_t)row * (size_t)in, h + (size_t)row * (size_t)in);
    for (int64_t c = 0; c < r->n_cols; c++) {
        gq_row(s, r->cols[c], w, qz);
        double sw = 0;
        for (int64_t i = 0; i < in; i++) sw += fabs(w[i]);
        for (int32_t row = 0; row < n_rows; row++) {
            const float *xr = x + (size_t)row * (size_t)in, *hr = h + (size_t)row * (size_t)in;
            double       acc = 0, mag = 0, hq = 0, m2 = 0;
            for (int64_t i = 0; i < in; i++) {
                acc += (double)w[i] * xr[i], mag += fabs((double)w[i] * xr[i]);
                hq += fabs((double)w[i]) * hr[i], m2 += (double)qz[i] * (fabs(xr[i]) + hr[i]);
            }
            size_t k  = (size_t)row * (size_t)r->n_cols + (size_t)c;
            r->ref[k] = acc + (bias ? bias[r->cols[c]] : 0.0);
            r->mag[k] = mag, r->sw[k] = sw, r->hq[k] = hq, r->m2[k] = m2;
        }
    }
    free(w), free(qz), free(h);
}

// How a result is checked (tolerances: file comment).
enum gq_kind { GQ_F32, GQ_F16, GQ_I8, GQ_H };

static enum gq_kind gq_kind_of(enum cuda_gptq_path path) {
    return path == CUDA_GPTQ_GEMV      ? GQ_F32
           : path == CUDA_GPTQ_GEMV_I8 ? GQ_I8
           : path == CUDA_GPTQ_HGEMV   ? GQ_H
                                       : GQ_F16;
}

// The tolerance of one output (file comment); amax = max |x| of its row.
static double gq_tol(enum gq_kind kind, double mag, double sw, double hq, double amax) {
    switch (kind) {
    case GQ_F32: return 1e-5 * mag + 1e-6;
    case GQ_I8: return 1e-5 * mag + 1.0001 * hq + 1e-6;
    case GQ_H: return (ldexp(1, -10) + 1e-5) * mag + ldexp(1, -23) * amax * sw + 1e-6;
    default: return (ldexp(1, -10) + ldexp(1, -22) + 1e-5) * mag + ldexp(1, -25) * sw + 1e-6;
    }
}

static bool gq_check(struct test_ctx *t, const char *what, const float *got, int64_t n_out, int32_t n_rows,
                     const struct gq_ref *r, enum gq_kind kind) {
    for (int32_t row = 0; row < n_rows; row++) {
        for (int64_t c = 0; c < r->n_cols; c++) {
            size_t k   = (size_t)row * (size_t)r->n_cols + (size_t)c;
            double tol = gq_tol(kind, r->mag[k], r->sw[k], r->hq[k], row < 8 ? r->amax[row] : INFINITY);
            double g   = got[(size_t)row * (size_t)n_out + (size_t)r->cols[c]];
            if (!(fabs(g - r->ref[k]) <= tol)) {
                test_fail(t, __FILE__, __LINE__, "%s: out[%d][%lld] = %.7g, exact %.7g, tol %.3g", what, row,
                          (long long)r->cols[c], g, r->ref[k], tol);
                return false;
            }
        }
    }
    return true;
}

// ---- device helpers ----

static void *dev_alloc_copy(struct coopt_backend *be, const void *src, size_t n) {
    void *d = NULL;
    COOPT_ASSERT(be->ops->alloc(be, n, &d) == COOPT_OK);
    if (src) be->ops->upload(be, d, src, n);
    return d;
}

static bool init_cuda(struct test_ctx *t, struct coopt_backend **be) {
    *be = NULL;
    if (coopt_cuda_device_count() <= 0) {
        test_skip(t, "no CUDA device");
        return false;
    }
    coopt_log_set_quiet(1);
    if (coopt_cuda_backend_init(0, be) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "cuda backend init failed");
        return false;
    }
    return true;
}

struct gq_run {
    enum cuda_gptq_path path;
    int                 param;
    int32_t             max_rows; // skip above (the GEMV at hundreds of rows is slow, not wrong)
    const char         *name;
    int                 pdl; // cuda_gptq_set_pdl for this run (-1: default)
};

// MMA param: tokens per block | K splits << 8 (0 = automatic); int8 GEMV: warps | K splits << 8
// (64 splits: one per chunk for most of the shapes here)
static const struct gq_run k_runs[] = {
    {CUDA_GPTQ_AUTO, 0, 1 << 30, "auto", -1},
    {CUDA_GPTQ_GEMV_I8, 0, 64, "i8", -1},
    {CUDA_GPTQ_GEMV_I8, 0, 17, "i8nopdl", 0},
    {CUDA_GPTQ_GEMV_I8, 4 | 1 << 8, 17, "i8w4s1", -1},
    {CUDA_GPTQ_GEMV_I8, 8 | 3 << 8, 17, "i8w8s3", -1},
    {CUDA_GPTQ_GEMV_I8, 16 | 2 << 8, 8, "i8w16s2", -1},
    {CUDA_GPTQ_GEMV_I8, 4 | 64 << 8, 8, "i8w4s64", 0},
    {CUDA_GPTQ_GEMV, 0, 64, "gemv", -1},
    {CUDA_GPTQ_GEMV, 4, 8, "gemv4", -1},
    {CUDA_GPTQ_GEMV, 16, 8, "gemv16", -1},
    {CUDA_GPTQ_HGEMV, 0, 8, "h", -1},
    {CUDA_GPTQ_HGEMV, 4, 8, "h4", 0},
    {CUDA_GPTQ_HGEMV, 16, 8, "h16", -1},
    {CUDA_GPTQ_HGEMV, 8 | 72 << 8, 8, "h8r72", -1},
    {CUDA_GPTQ_HGEMV, 4 | 80 << 8, 8, "h4r80", -1},
    {CUDA_GPTQ_MMA, 0, 1 << 30, "mma", -1},
    {CUDA_GPTQ_MMA, 16 | 3 << 8, 64, "mma16s3", -1},
    {CUDA_GPTQ_MMA, 32, 1 << 30, "mma32", -1},
    {CUDA_GPTQ_MMA, 64 | 1 << 8, 1 << 30, "mma64s1", -1},
    {CUDA_GPTQ_MMA, 128, 1 << 30, "mma128", -1},
    {CUDA_GPTQ_CUBLAS, 0, 1 << 30, "cublas", -1},
};

// Rows of magnitudes the tensor-core GEMV stages on both of its paths (see gptq_hgemv_kernel: x
// * 2^HG_XS, or by 2^-e where a warp's amax falls outside the window): row 0's second half times
// 2^-9 (its warps take different paths), then whole rows alternately times 1, 2^-9 (amax ~0.01:
// subnormals) and 2^12 (amax ~16000: f16 overflow at 2^HG_XS).
static void gq_scale_rows(float *x, int32_t n_rows, int64_t n_in) {
    for (int32_t r = 0; r < n_rows; r++) {
        const float   f  = r == 0 || r % 3 == 1 ? 0x1p-9f : r % 3 == 2 ? 0x1p12f : 1.0f;
        float        *xr = x + (size_t)r * (size_t)n_in;
        for (int64_t i = r == 0 ? n_in / 2 : 0; i < n_in; i++) xr[i] *= f;
    }
}

// One path of k_runs into dout (poisoned first), downloaded into got [no floats].
static void gq_run_path(struct coopt_backend *be, const struct gq_run *run, float *dout, float *got, size_t no,
                        const float *dx, const struct cuda_gptq_weight *dw, const float *db, int32_t n_rows) {
    memset(got, 0xff, no * 4); // NaN
    be->ops->upload(be, dout, got, no * 4);
    cuda_gptq_set_pdl(run->pdl);
    cuda_gptq_matmul_path(be, dout, dx, dw, db, n_rows, run->path, run->param);
    cuda_gptq_set_pdl(-1);
    be->ops->download(be, got, dout, no * 4);
    be->ops->sync(be);
}

// Uploads the weight of case c and checks every path at every row count. Returns false after FAIL.
static bool run_case(struct test_ctx *t, struct coopt_backend *be, const struct gptq_case *c, const int32_t *rows,
                     int n_rows_list, uint64_t seed, bool bias) {
    uint64_t          rs = seed;
    struct gptq_tensors g;
    gptq_make_tensors(&rs, c, NULL, "test.proj", &g);
    char base[160], what[240];
    snprintf(base, sizeof(base), "in %lld out %lld gs %d act %d sym %d v1 %d bias %d", (long long)c->n_in,
             (long long)c->n_out, c->gs, c->act, c->sym, c->v1, bias);
    struct coopt_gptq_weight *hw = NULL;
    struct cuda_gptq_weight   dw;
    memset(&dw, 0, sizeof(dw));
    bool ok = coopt_gptq_repack(&g.src, 2, &hw) == COOPT_OK;
    if (!ok) test_fail(t, __FILE__, __LINE__, "%s: repack failed", base);
    if (ok && cuda_gptq_upload(be, hw, &dw) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "%s: upload failed", base);
        ok = false;
    }
    float *b = bias ? test_rand_array(&rs, (size_t)c->n_out, -1, 1) : NULL;
    float *db = b ? dev_alloc_copy(be, b, (size_t)c->n_out * 4) : NULL;
    for (int k = 0; k < n_rows_list && ok; k++) {
        int32_t n_rows = rows[k];
        size_t  nx = (size_t)n_rows * (size_t)c->n_in, no = (size_t)n_rows * (size_t)c->n_out;
        float  *x = malloc(nx * 4), *got = malloc(no * 4);
        for (size_t i = 0; i < nx; i++) x[i] = test_rand_normal(&rs);
        gq_scale_rows(x, n_rows, c->n_in);
        x[0] = 6.0f; // an outlier
        if (nx > 7) x[7] = 3e-6f; // below the f16 normal range
        struct gq_ref ref;
        gq_ref_make(&g.src, hw, x, b, n_rows, &ref);
        float *dx = dev_alloc_copy(be, x, nx * 4), *dout = dev_alloc_copy(be, NULL, no * 4);
        for (size_t p = 0; p < COOPT_ARRAY_LEN(k_runs) && ok; p++) {
            if (n_rows > k_runs[p].max_rows) continue;
            gq_run_path(be, &k_runs[p], dout, got, no, dx, &dw, db, n_rows);
            enum cuda_gptq_path path = k_runs[p].path ? k_runs[p].path : cuda_gptq_auto_path(&dw, n_rows);
            snprintf(what, sizeof(what), "%s rows %d path %s", base, n_rows, k_runs[p].name);
            ok = gq_check(t, what, got, c->n_out, n_rows, &ref, gq_kind_of(path));
        }
        be->ops->free(be, dx), be->ops->free(be, dout);
        gq_ref_free(&ref);
        free(x), free(got);
    }
    if (db) be->ops->free(be, db);
    free(b);
    cuda_gptq_release(&dw);
    coopt_gptq_weight_free(hw);
    gptq_tensors_free(&g);
    return ok;
}

TEST(cuda_gptq_matmul) {
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    // output widths not multiples of the 16-column tile or the 64-column MMA block, inputs not
    // multiples of 64 (padded, x gathered), every group size incl. 16 and 48 (groups padded to
    // 32-row blocks), act-order on / irregular, sym/asym, v1/v2
    static const struct gptq_case cases[] = {
        {256, 8, 32, 0, 1, 1},  {256, 24, 64, 1, 0, 1},   {384, 72, 128, 0, 0, 0},   {384, 200, 128, 1, 1, 0},
        {200, 72, -1, 0, 0, 1}, {256, 40, -1, 1, 0, 0},   {512, 88, 64, 2, 0, 1},    {192, 56, 16, 0, 0, 0},
        {160, 24, 32, 1, 0, 0}, {128, 136, 128, 2, 1, 1}, {96, 16, 48, 0, 0, 1},     {1024, 1000, 128, 1, 0, 1},
    };
    static const int32_t rows[] = {1, 2, 3, 8, 17, 64, 513};
    bool                 ok     = true;
    for (size_t i = 0; i < COOPT_ARRAY_LEN(cases) && ok; i++)
        ok = run_case(t, be, &cases[i], rows, cases[i].n_in * cases[i].n_out > 200000 ? 5 : 7, 300 + i, i % 2 == 0);
    be->ops->destroy(be);
}

// q/k/v of one input in one multi call: q and k share an act-order g_idx (one gather), v has none.
TEST(cuda_gptq_multi) {
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    uint64_t             rs = 77;
    struct gptq_case       cs[3] = {{512, 512, 128, 1, 0, 1}, {512, 136, 128, 1, 1, 1}, {512, 72, 64, 0, 0, 0}};
    struct gptq_tensors    g[3];
    struct coopt_gptq_weight *hw[3] = {0};
    struct cuda_gptq_weight   dw[3];
    memset(dw, 0, sizeof(dw));
    bool ok = true;
    for (int j = 0; j < 3; j++) {
        gptq_make_tensors(&rs, &cs[j], j == 1 ? g[0].g_idx : NULL, "test.proj", &g[j]);
        ok = ok && coopt_gptq_repack(&g[j].src, 1, &hw[j]) == COOPT_OK && cuda_gptq_upload(be, hw[j], &dw[j]) == COOPT_OK;
    }
    if (ok && !(dw[0].perm_hash && dw[0].perm_hash == dw[1].perm_hash && dw[2].direct)) {
        test_fail(t, __FILE__, __LINE__, "perm hashes %llx %llx, v direct %d", (unsigned long long)dw[0].perm_hash,
                  (unsigned long long)dw[1].perm_hash, dw[2].direct);
        ok = false;
    }
    // the decode GEMVs: int8 (1-8 rows in one launch), f32 (1 row), tensor-core (1-8 rows; q/k and v
    // differ in permutation, so per weight); 20 rows: per weight
    static const int32_t rows[] = {1, 4, 8, 20, 1, 4, 1, 3, 8};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(rows) && ok; k++) {
        int32_t n_rows = rows[k];
        cuda_gptq_set_gemv(k < 4 ? CUDA_GPTQ_GEMV_MODE_I8 : k < 6 ? CUDA_GPTQ_GEMV_MODE_F32 : CUDA_GPTQ_GEMV_MODE_H);
        size_t  nx     = (size_t)n_rows * 512;
        float  *x      = malloc(nx * 4);
        for (size_t i = 0; i < nx; i++) x[i] = test_rand_normal(&rs);
        gq_scale_rows(x, n_rows, 512);
        float *b1 = test_rand_array(&rs, 136, -1, 1);
        float *dx = dev_alloc_copy(be, x, nx * 4), *db1 = dev_alloc_copy(be, b1, 136 * 4);
        float *douts[3], *got[3];
        const struct cuda_gptq_weight *ws[3] = {&dw[0], &dw[1], &dw[2]};
        const float                   *bs[3] = {NULL, db1, NULL};
        for (int j = 0; j < 3; j++) {
            size_t no = (size_t)n_rows * (size_t)cs[j].n_out;
            got[j]    = malloc(no * 4);
            memset(got[j], 0xff, no * 4);
            douts[j] = dev_alloc_copy(be, got[j], no * 4);
        }
        cuda_gptq_matmul_multi(be, 3, douts, dx, ws, bs, n_rows);
        for (int j = 0; j < 3 && ok; j++) {
            size_t no = (size_t)n_rows * (size_t)cs[j].n_out;
            be->ops->download(be, got[j], douts[j], no * 4);
            be->ops->sync(be);
            struct gq_ref ref;
            gq_ref_make(&g[j].src, hw[j], x, j == 1 ? b1 : NULL, n_rows, &ref);
            char what[96];
            enum cuda_gptq_path path = cuda_gptq_auto_path(&dw[j], n_rows);
            snprintf(what, sizeof(what), "multi weight %d rows %d path %d", j, n_rows, (int)path);
            ok = gq_check(t, what, got[j], cs[j].n_out, n_rows, &ref, gq_kind_of(path));
            gq_ref_free(&ref);
        }
        for (int j = 0; j < 3; j++) be->ops->free(be, douts[j]), free(got[j]);
        be->ops->free(be, dx), be->ops->free(be, db1);
        free(x), free(b1);
    }
    cuda_gptq_set_gemv(CUDA_GPTQ_GEMV_MODE_DEFAULT);
    for (int j = 0; j < 3; j++) cuda_gptq_release(&dw[j]), coopt_gptq_weight_free(hw[j]), gptq_tensors_free(&g[j]);
    be->ops->destroy(be);
}

// The fused ops of backend.h on GPTQ weights through the backend's op table: norm_matmul_multi
// (q/k/v), matmul_swiglu and norm_matmul_swiglu (gate/up), matmul_add (down / o + residual), at
// 1 row (the fused f32 GEMV where it applies: not act-order, n_in a multiple of 64) and 3 rows
// (the composed path: tensor-core kernel + element-wise ops), against exact products of the
// checkpoint. Tolerances as gq_check for the path taken (norm: x is the CPU reference's
// rmsnorm(x); the fused GEMV scales the dot product by 1/rms instead, f32 rounding inside the
// 1e-5 term); matmul_add: |base| joins the magnitude; swiglu as test_cuda_decode.c:
// 1.5 (1.1 |u| t_g + |silu(g)| t_u) + 1e-6 |result|.
static bool fused_case(struct test_ctx *t, struct coopt_backend *be, const struct gptq_case *c, int64_t n_out_v,
                       int32_t n_rows, bool scaled, uint64_t seed) {
    uint64_t                  rs = seed;
    const int64_t             n_outs[3] = {c->n_out, c->n_out, n_out_v};
    struct gptq_tensors       g[3];
    struct coopt_gptq_weight *hw[3] = {0};
    struct cuda_gptq_weight   dw[3];
    struct coopt_weight       cw[3];
    float                    *b[3], *db[3], *dout[3], *got[3];
    memset(dw, 0, sizeof(dw));
    bool ok = true;
    for (int j = 0; j < 3; j++) {
        struct gptq_case cj = *c;
        cj.n_out = n_outs[j];
        gptq_make_tensors(&rs, &cj, j > 0 && c->act ? g[0].g_idx : NULL, "test.proj", &g[j]);
        ok = ok && coopt_gptq_repack(&g[j].src, 1, &hw[j]) == COOPT_OK && cuda_gptq_upload(be, hw[j], &dw[j]) == COOPT_OK;
        b[j]  = j != 1 ? test_rand_array(&rs, (size_t)n_outs[j], -1, 1) : NULL; // up without bias
        db[j] = b[j] ? dev_alloc_copy(be, b[j], (size_t)n_outs[j] * 4) : NULL;
        cw[j] = (struct coopt_weight){.dtype = COOPT_DTYPE_Q4_GPTQ, .n_in = c->n_in, .n_out = n_outs[j], .data = dw[j].qw,
                                      .gptq = &dw[j], .bias = db[j]};
        got[j]  = malloc((size_t)n_rows * (size_t)n_outs[j] * 4);
        dout[j] = dev_alloc_copy(be, NULL, (size_t)n_rows * (size_t)n_outs[j] * 4);
    }
    if (!ok) {
        test_fail(t, __FILE__, __LINE__, "in %lld out %lld: repack/upload failed", (long long)c->n_in, (long long)c->n_out);
        for (int j = 0; j < 3; j++) {
            if (db[j]) be->ops->free(be, db[j]);
            be->ops->free(be, dout[j]);
            free(b[j]), free(got[j]);
            cuda_gptq_release(&dw[j]), coopt_gptq_weight_free(hw[j]), gptq_tensors_free(&g[j]);
        }
        return false;
    }
    const size_t nx = (size_t)n_rows * (size_t)c->n_in;
    float       *x = malloc(nx * 4), *xn = malloc(nx * 4), *gn = test_rand_array(&rs, (size_t)c->n_in, 0.5f, 1.5f);
    for (size_t i = 0; i < nx; i++) x[i] = 2.0f * test_rand_normal(&rs);
    if (scaled) gq_scale_rows(x, n_rows, c->n_in);
    const float eps = 1e-5f;
    for (int32_t r = 0; r < n_rows; r++) { // as ops_cpu_ref.c's rmsnorm
        const float *xr = x + (size_t)r * c->n_in;
        double       ss = 0;
        for (int64_t i = 0; i < c->n_in; i++) ss += (double)xr[i] * xr[i];
        const float inv = 1.0f / sqrtf((float)(ss / c->n_in) + eps);
        for (int64_t i = 0; i < c->n_in; i++) xn[(size_t)r * c->n_in + i] = (xr[i] * inv) * gn[i];
    }
    float *dx = dev_alloc_copy(be, x, nx * 4), *dg = dev_alloc_copy(be, gn, (size_t)c->n_in * 4);
    float *dtmp = dev_alloc_copy(be, NULL, (size_t)n_rows * (size_t)c->n_out * 4);
    const struct coopt_weight *ws[3] = {&cw[0], &cw[1], &cw[2]};
    const enum gq_kind         kind  = gq_kind_of(cuda_gptq_auto_path(&dw[0], n_rows));
    char                       what[200];
    snprintf(what, sizeof(what), "fused (%s GEMV) in %lld out %lld/%lld gs %d act %d rows %d%s",
             cuda_gptq_get_gemv() == CUDA_GPTQ_GEMV_MODE_F32 ? "f32" : "default", (long long)c->n_in,
             (long long)c->n_out, (long long)n_out_v, c->gs, c->act, n_rows, scaled ? " scaled" : "");
    struct gq_ref rn[3], rx[2];
    for (int j = 0; j < 3; j++) gq_ref_make(&g[j].src, hw[j], xn, b[j], n_rows, &rn[j]);
    for (int j = 0; j < 2; j++) gq_ref_make(&g[j].src, hw[j], x, b[j], n_rows, &rx[j]);
    const struct coopt_ops *op = be->ops;
    if (ok) { // q/k/v of rmsnorm(x)
        op->norm_matmul_multi(be, 3, dout, dx, dg, eps, ws, n_rows);
        for (int j = 0; j < 3 && ok; j++) {
            op->download(be, got[j], dout[j], (size_t)n_rows * (size_t)n_outs[j] * 4);
            op->sync(be);
            char w2[240];
            snprintf(w2, sizeof(w2), "%s norm_matmul_multi weight %d", what, j);
            ok = gq_check(t, w2, got[j], n_outs[j], n_rows, &rn[j], kind);
        }
    }
    for (int with_norm = 0; with_norm < 2 && ok; with_norm++) { // silu(gate) * up
        const struct gq_ref *r = with_norm ? rn : rx;
        if (with_norm) op->norm_matmul_swiglu(be, dout[0], dtmp, dx, dg, eps, ws[0], ws[1], n_rows);
        else op->matmul_swiglu(be, dout[0], dtmp, dx, ws[0], ws[1], n_rows);
        op->download(be, got[0], dout[0], (size_t)n_rows * (size_t)c->n_out * 4);
        op->sync(be);
        for (int32_t row = 0; row < n_rows && ok; row++)
            for (int64_t k = 0; k < r[0].n_cols && ok; k++) {
                const size_t i  = (size_t)row * (size_t)r[0].n_cols + (size_t)k;
                const double gv = r[0].ref[i], uv = r[1].ref[i], sg = gv / (1 + exp(-gv)), want = sg * uv;
                const double tg = gq_tol(kind, r[0].mag[i], r[0].sw[i], 0, r[0].amax[row]);
                const double tu = gq_tol(kind, r[1].mag[i], r[1].sw[i], 0, r[1].amax[row]);
                const double tol = 1.5 * (1.1 * fabs(uv) * tg + fabs(sg) * tu) + 1e-6 * fabs(want) + 1e-7;
                const double gt  = got[0][(size_t)row * (size_t)c->n_out + (size_t)r[0].cols[k]];
                if (!(fabs(gt - want) <= tol)) {
                    test_fail(t, __FILE__, __LINE__, "%s %s: out[%d][%lld] = %.7g, exact %.7g, tol %.3g", what,
                              with_norm ? "norm_matmul_swiglu" : "matmul_swiglu", row, (long long)r[0].cols[k], gt,
                              want, tol);
                    ok = false;
                }
            }
    }
    if (ok) { // base += x W0
        const size_t no = (size_t)n_rows * (size_t)c->n_out;
        float       *base = test_rand_array(&rs, no, -3, 3);
        op->upload(be, dout[0], base, no * 4);
        op->matmul_add(be, dout[0], dx, ws[0], n_rows);
        op->download(be, got[0], dout[0], no * 4);
        op->sync(be);
        for (int32_t row = 0; row < n_rows; row++)
            for (int64_t k = 0; k < rx[0].n_cols; k++) {
                const size_t i = (size_t)row * (size_t)rx[0].n_cols + (size_t)k;
                const float  bv = base[(size_t)row * (size_t)c->n_out + (size_t)rx[0].cols[k]];
                rx[0].ref[i] += bv, rx[0].mag[i] += fabs(bv);
            }
        char w2[240];
        snprintf(w2, sizeof(w2), "%s matmul_add", what);
        ok = gq_check(t, w2, got[0], c->n_out, n_rows, &rx[0], kind);
        free(base);
    }
    for (int j = 0; j < 3; j++) gq_ref_free(&rn[j]);
    for (int j = 0; j < 2; j++) gq_ref_free(&rx[j]);
    for (int j = 0; j < 3; j++) {
        if (db[j]) op->free(be, db[j]);
        op->free(be, dout[j]);
        free(b[j]), free(got[j]);
        cuda_gptq_release(&dw[j]), coopt_gptq_weight_free(hw[j]), gptq_tensors_free(&g[j]);
    }
    op->free(be, dx), op->free(be, dg), op->free(be, dtmp);
    free(x), free(xn), free(gn);
    return ok;
}

TEST(cuda_gptq_fused) {
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    if (!be->ops->norm_matmul_multi || !be->ops->norm_matmul_swiglu || !be->ops->matmul_swiglu || !be->ops->matmul_add) {
        test_fail(t, __FILE__, __LINE__, "the CUDA backend lacks a fused op");
        be->ops->destroy(be);
        return;
    }
    // direct weights (the fused GEMV at 1 row: n_in multiple of 64, with and without a partial
    // last tile), act-order and padded n_in (composed), the real q/k/v and gate/up input width
    static const struct {
        struct gptq_case c;
        int64_t          n_out_v;
    } cases[] = {
        {{512, 136, 128, 0, 0, 1}, 72}, {{256, 40, 32, 0, 1, 0}, 8},   {{384, 200, 128, 1, 0, 1}, 24},
        {{200, 72, -1, 0, 0, 1}, 16},   {{4096, 1096, 128, 0, 1, 1}, 1024}, {{11008, 48, 128, 0, 0, 1}, 16},
    };
    static const int32_t rows[] = {1, 3};
    bool                 ok     = true;
    // the default (tensor-core) decode GEMV at its default register cap (automatic: 80 at these sizes), at
    // the other cap, then the exact f32 one (its own fused norm/store)
    static const enum cuda_gptq_gemv modes[] = {CUDA_GPTQ_GEMV_MODE_DEFAULT, CUDA_GPTQ_GEMV_MODE_DEFAULT,
                                                CUDA_GPTQ_GEMV_MODE_F32};
    static const int                 regs[]  = {-1, 72, -1};
    for (size_t mi = 0; mi < COOPT_ARRAY_LEN(modes) && ok; mi++) {
        cuda_gptq_set_gemv(modes[mi]);
        cuda_gptq_set_hgemv_regs(regs[mi]);
        for (size_t i = 0; i < COOPT_ARRAY_LEN(cases) && ok; i++)
            for (size_t r = 0; r < COOPT_ARRAY_LEN(rows) && ok; r++)
                for (int scaled = 0; scaled < (rows[r] == 1 ? 2 : 1) && ok; scaled++) // (gq_scale_rows)
                    ok = fused_case(t, be, &cases[i].c, cases[i].n_out_v, rows[r], scaled, 900 + 7 * i + r);
    }
    cuda_gptq_set_gemv(CUDA_GPTQ_GEMV_MODE_DEFAULT);
    cuda_gptq_set_hgemv_regs(-1);
    be->ops->destroy(be);
}

// ---- decode GEMVs staging the next one's input (backend.h's *_then_* ops, gptq_hgemv_kernel) ----

struct xst_w {
    struct gptq_tensors       g;
    struct coopt_gptq_weight *hw;
    struct cuda_gptq_weight   dw;
    struct coopt_weight       cw;
};

static bool xst_w_make(struct coopt_backend *be, uint64_t *rs, int64_t n_in, int64_t n_out, int act,
                       const int32_t *g_idx, struct xst_w *w) {
    const struct gptq_case c = {n_in, n_out, 128, act, 0, 1};
    memset(w, 0, sizeof(*w));
    gptq_make_tensors(rs, &c, g_idx, "test.proj", &w->g);
    if (coopt_gptq_repack(&w->g.src, 1, &w->hw) != COOPT_OK || cuda_gptq_upload(be, w->hw, &w->dw) != COOPT_OK)
        return false;
    w->cw = (struct coopt_weight){.dtype = COOPT_DTYPE_Q4_GPTQ, .n_in = n_in, .n_out = n_out, .data = w->dw.qw,
                                  .gptq = &w->dw};
    return true;
}

static void xst_w_free(struct xst_w *w) {
    cuda_gptq_release(&w->dw), coopt_gptq_weight_free(w->hw), gptq_tensors_free(&w->g);
}

// The GEMVs from one attention output to the next q/k/v -- x += att Wo; hb = silu(rmsnorm(x) Wg) *
// (rmsnorm(x) Wu); x += hb Wd; q, k, v = rmsnorm(x) Wq, Wk, Wv -- with the plain ops and with the
// then-ops (the forward pass's calls), at 1 row (the launch counters must show 3 staged outputs
// and 3 staged inputs, 2 where q/k/v are act-order: that GEMV stages from x) and 2 rows (nothing
// staged; same results). x after the o projection must be bit-identical (staging does not change
// a GEMV's own result); every other output within 1e-4 max|plain|: the staged bits are the ones
// the next GEMV would stage itself and only the order of the norm's sum of squares differs (f32
// ulps of 1 / rms, which can flip the f16 rounding of a staged element: 2^-11 of one term), while
// a wrong position, partial sum or norm factor is off by O(1). Inputs as they come, with half of
// the residual times 2^12 (those warps' amax above the f16 window: they stage from x again), and
// with the residual and attention output times 2^-9 (below the window).
static bool xstage_case(struct test_ctx *t, struct coopt_backend *be, int64_t dim, int64_t ffn, int64_t kvd, int act,
                        int32_t n_rows, int variant, uint64_t seed) {
    uint64_t     rs = seed;
    struct xst_w w[7]; // o, gate, up, down, q, k, v
    const int64_t io[7][2] = {{dim, dim}, {dim, ffn}, {dim, ffn}, {ffn, dim}, {dim, dim}, {dim, kvd}, {dim, kvd}};
    bool         ok = true;
    for (int j = 0; j < 7; j++) {
        const bool qkv = j >= 4;
        ok = xst_w_make(be, &rs, io[j][0], io[j][1], qkv ? act : 0, qkv && j > 4 && act ? w[4].g.g_idx : NULL, &w[j]) && ok;
    }
    const size_t nd = (size_t)n_rows * (size_t)dim, nf = (size_t)n_rows * (size_t)ffn, nk = (size_t)n_rows * (size_t)kvd;
    float *att = test_rand_array(&rs, nd, -1, 1), *base = malloc(nd * 4);
    for (size_t i = 0; i < nd; i++) base[i] = 2.0f * test_rand_normal(&rs);
    for (size_t i = 0; i < nd; i++) {
        if (variant == 1 && (i / 256) % 2) base[i] *= 0x1p12f;
        if (variant == 2) base[i] *= 0x1p-9f, att[i] *= 0x1p-9f;
    }
    float *g1 = test_rand_array(&rs, (size_t)dim, 0.5f, 1.5f), *g2 = test_rand_array(&rs, (size_t)dim, 0.5f, 1.5f);
    float *datt = dev_alloc_copy(be, att, nd * 4), *dg1 = dev_alloc_copy(be, g1, (size_t)dim * 4);
    float *dg2 = dev_alloc_copy(be, g2, (size_t)dim * 4), *dx = dev_alloc_copy(be, NULL, nd * 4);
    float *dhb = dev_alloc_copy(be, NULL, nf * 4), *dtmp = dev_alloc_copy(be, NULL, nf * 4);
    float *dq = dev_alloc_copy(be, NULL, nd * 4), *dk = dev_alloc_copy(be, NULL, nk * 4), *dv = dev_alloc_copy(be, NULL, nk * 4);
    const size_t n_of[6] = {nd, nf, nd, nd, nk, nk};          // x after o, hb, x after down, q, k, v
    float       *dev_of[6] = {dx, dhb, dx, dq, dk, dv}, *got[2][6];
    const char  *name[6] = {"x after o", "hb", "x after down", "q", "k", "v"};
    const struct coopt_ops *op = be->ops;
    const float             eps = 1e-5f;
    char                    what[160];
    snprintf(what, sizeof(what), "xstage dim %lld ffn %lld kv %lld act %d rows %d variant %d", (long long)dim,
             (long long)ffn, (long long)kvd, act, n_rows, variant);
    for (int then = 0; then < 2; then++) {
        for (int i = 0; i < 6; i++) got[then][i] = malloc(n_of[i] * 4);
        if (!ok) continue;
        int64_t made0, used0, made1, used1;
        cuda_gptq_xstage_counts(&made0, &used0);
        op->upload(be, dx, base, nd * 4);
        float *const               qkv[3] = {dq, dk, dv};
        const struct coopt_weight *wq[3]  = {&w[4].cw, &w[5].cw, &w[6].cw};
        if (then) op->matmul_add_then_norm(be, dx, datt, &w[0].cw, n_rows, dg1);
        else op->matmul_add(be, dx, datt, &w[0].cw, n_rows);
        op->download(be, got[then][0], dx, nd * 4);
        if (then) op->norm_matmul_swiglu_then_add(be, dhb, dtmp, dx, dg1, eps, &w[1].cw, &w[2].cw, n_rows);
        else op->norm_matmul_swiglu(be, dhb, dtmp, dx, dg1, eps, &w[1].cw, &w[2].cw, n_rows);
        if (then) op->matmul_add_then_norm(be, dx, dhb, &w[3].cw, n_rows, dg2);
        else op->matmul_add(be, dx, dhb, &w[3].cw, n_rows);
        op->norm_matmul_multi(be, 3, qkv, dx, dg2, eps, wq, n_rows);
        for (int i = 1; i < 6; i++) op->download(be, got[then][i], dev_of[i], n_of[i] * 4);
        op->sync(be);
        cuda_gptq_xstage_counts(&made1, &used1);
        const bool    h    = cuda_gptq_get_gemv() == CUDA_GPTQ_GEMV_MODE_H && n_rows == 1 && then;
        const int64_t want_m = h ? 3 : 0, want_u = h ? (act ? 2 : 3) : 0;
        if (made1 - made0 != want_m || used1 - used0 != want_u) {
            test_fail(t, __FILE__, __LINE__, "%s then %d: %lld staged outputs, %lld staged inputs; want %lld, %lld", what,
                      then, (long long)(made1 - made0), (long long)(used1 - used0), (long long)want_m, (long long)want_u);
            ok = false;
        }
    }
    for (int i = 0; i < 6 && ok; i++) {
        double amax = 0, dmax = 0;
        size_t at = 0;
        for (size_t k = 0; k < n_of[i]; k++) {
            const double a = got[0][i][k], b = got[1][i][k];
            amax = fmax(amax, fabs(a));
            if (!(fabs(b - a) <= dmax)) dmax = fabs(b - a), at = k; // (NaN: taken, then never exceeded)
        }
        const bool bits = i == 0 ? memcmp(got[0][0], got[1][0], n_of[0] * 4) == 0 : true;
        if (!bits || !(dmax <= 1e-4 * amax) || !(amax > 0)) {
            test_fail(t, __FILE__, __LINE__, "%s: %s with the then-ops differs: [%zu] %.9g vs %.9g (max |plain| %.6g)%s",
                      what, name[i], at, got[1][i][at], got[0][i][at], amax, bits ? "" : ", not bit-identical");
            ok = false;
        }
    }
    for (int then = 0; then < 2; then++)
        for (int i = 0; i < 6; i++) free(got[then][i]);
    for (int j = 0; j < 7; j++) xst_w_free(&w[j]);
    float *dev[] = {datt, dg1, dg2, dx, dhb, dtmp, dq, dk, dv};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(dev); i++) op->free(be, dev[i]);
    free(att), free(base), free(g1), free(g2);
    if (!ok && !t->failed) test_fail(t, __FILE__, __LINE__, "%s: repack/upload failed", what);
    return ok;
}

TEST(cuda_gptq_xstage) {
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    if (!be->ops->matmul_add_then_norm || !be->ops->norm_matmul_swiglu_then_add) {
        test_fail(t, __FILE__, __LINE__, "the CUDA backend lacks the then-ops");
        be->ops->destroy(be);
        return;
    }
    static const struct {
        int64_t dim, ffn, kvd;
        int     act;
    } cases[] = {{512, 1408, 128, 0}, {512, 1408, 512, 1}, {4096, 11008, 1024, 0}};
    bool ok = true;
    for (size_t i = 0; i < COOPT_ARRAY_LEN(cases) && ok; i++)
        for (int32_t rows = 1; rows <= 2 && ok; rows++)
            for (int variant = 0; variant < (rows == 1 ? 3 : 1) && ok; variant++)
                ok = xstage_case(t, be, cases[i].dim, cases[i].ffn, cases[i].kvd, cases[i].act, rows, variant,
                                 1300 + 11 * i + 3 * rows + variant);
    be->ops->destroy(be);
}

// A GPU that gives a block less shared memory than the tensor-core GEMV's launch needs (A100:
// 163 KiB, sm_86/89: 99 KiB; simulated with cuda_gptq_set_hgemv_smem_limit): the fused op
// declines (returns false, nothing enqueued: the caller composes the op) and a plain matmul takes
// the f32 GEMV, checked at the f32 GEMV's tolerance, which the tensor-core GEMV's f16 rounding of
// x would exceed. A weight whose launch fits still takes the tensor-core GEMV. Then a bad
// $COOPT_GPTQ_HGEMV_REGS: a message naming it, and the automatic choice.
TEST(cuda_gptq_hgemv_settings) {
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    uint64_t                  rs    = 4242;
    const struct gptq_case    cs[2] = {{4096, 200, 128, 0, 0, 1}, {512, 72, 128, 0, 1, 0}};
    struct gptq_tensors       g[2];
    struct coopt_gptq_weight *hw[2] = {0};
    struct cuda_gptq_weight   dw[2];
    memset(dw, 0, sizeof(dw));
    bool ok = true;
    for (int j = 0; j < 2; j++) {
        gptq_make_tensors(&rs, &cs[j], NULL, "test.proj", &g[j]);
        ok = ok && coopt_gptq_repack(&g[j].src, 1, &hw[j]) == COOPT_OK && cuda_gptq_upload(be, hw[j], &dw[j]) == COOPT_OK;
    }
    if (!ok) test_fail(t, __FILE__, __LINE__, "repack/upload failed");
    cuda_gptq_set_gemv(CUDA_GPTQ_GEMV_MODE_H);
    // 4 KiB: the 512-input launch needs 1.3 KiB, the 4096-input one 8.5 KiB
    static const size_t limits[] = {4096, 0};
    for (size_t li = 0; li < COOPT_ARRAY_LEN(limits) && ok; li++) {
        cuda_gptq_set_hgemv_smem_limit(limits[li]);
        for (int j = 0; j < 2 && ok; j++) {
            const int64_t n_in = cs[j].n_in, n_out = cs[j].n_out;
            float        *x = malloc((size_t)n_in * 4), *got = malloc((size_t)n_out * 4);
            for (int64_t i = 0; i < n_in; i++) x[i] = test_rand_normal(&rs);
            struct gq_ref ref;
            gq_ref_make(&g[j].src, hw[j], x, NULL, 1, &ref);
            float *dx = dev_alloc_copy(be, x, (size_t)n_in * 4), *dout = dev_alloc_copy(be, NULL, (size_t)n_out * 4);
            const bool fits = limits[li] == 0 || j == 1;
            char       what[160];
            for (int fused = 1; fused >= 0 && ok; fused--) {
                memset(got, 0xff, (size_t)n_out * 4); // NaN: an unwritten output fails
                be->ops->upload(be, dout, got, (size_t)n_out * 4);
                const struct cuda_gptq_weight *ws[1]   = {&dw[j]};
                float                         *outs[1] = {dout};
                snprintf(what, sizeof(what), "smem limit %zu, in %lld, %s", limits[li], (long long)n_in,
                         fused ? "cuda_gptq_gemv_fused" : "cuda_gptq_matmul");
                if (fused) {
                    const bool ran = cuda_gptq_gemv_fused(be, CUDA_GPTQ_FUSED_STORE, 1, outs, dx, NULL, 0.0f, ws, NULL, 1, NULL);
                    if (ran != fits) {
                        test_fail(t, __FILE__, __LINE__, "%s: returned %d, want %d", what, ran, fits);
                        ok = false;
                    }
                    if (!ran) continue;
                } else {
                    cuda_gptq_matmul(be, dout, dx, &dw[j], NULL, 1);
                }
                be->ops->download(be, got, dout, (size_t)n_out * 4);
                be->ops->sync(be);
                ok = ok && gq_check(t, what, got, n_out, 1, &ref, fits ? GQ_H : GQ_F32);
            }
            be->ops->free(be, dx), be->ops->free(be, dout);
            gq_ref_free(&ref);
            free(x), free(got);
        }
    }
    cuda_gptq_set_hgemv_smem_limit(0);
    if (ok) {
        const char *old  = getenv("COOPT_GPTQ_HGEMV_REGS");
        char       *keep = old ? strdup(old) : NULL;
        setenv("COOPT_GPTQ_HGEMV_REGS", "64", 1);
        cuda_gptq_set_hgemv_regs(-1); // read the environment again
        const int64_t n_in = cs[1].n_in, n_out = cs[1].n_out;
        float        *x = malloc((size_t)n_in * 4), *got = malloc((size_t)n_out * 4);
        for (int64_t i = 0; i < n_in; i++) x[i] = test_rand_normal(&rs);
        struct gq_ref ref;
        gq_ref_make(&g[1].src, hw[1], x, NULL, 1, &ref);
        float *dx = dev_alloc_copy(be, x, (size_t)n_in * 4), *dout = dev_alloc_copy(be, NULL, (size_t)n_out * 4);
        memset(got, 0xff, (size_t)n_out * 4);
        be->ops->upload(be, dout, got, (size_t)n_out * 4);
        st_test_capture_begin();
        cuda_gptq_matmul(be, dout, dx, &dw[1], NULL, 1);
        be->ops->sync(be);
        const char *msg = st_test_capture_end();
        if (!strstr(msg, "COOPT_GPTQ_HGEMV_REGS=64") || !strstr(msg, "automatically")) {
            test_fail(t, __FILE__, __LINE__, "COOPT_GPTQ_HGEMV_REGS=64: message '%s'", msg);
            ok = false;
        }
        be->ops->download(be, got, dout, (size_t)n_out * 4);
        be->ops->sync(be);
        ok = ok && gq_check(t, "COOPT_GPTQ_HGEMV_REGS=64", got, n_out, 1, &ref, GQ_H);
        if (keep) setenv("COOPT_GPTQ_HGEMV_REGS", keep, 1);
        else unsetenv("COOPT_GPTQ_HGEMV_REGS");
        free(keep);
        cuda_gptq_set_hgemv_regs(-1);
        be->ops->free(be, dx), be->ops->free(be, dout);
        gq_ref_free(&ref);
        free(x), free(got);
    }
    cuda_gptq_set_gemv(CUDA_GPTQ_GEMV_MODE_DEFAULT);
    for (int j = 0; j < 2; j++) cuda_gptq_release(&dw[j]), coopt_gptq_weight_free(hw[j]), gptq_tensors_free(&g[j]);
    be->ops->destroy(be);
}

// The shapes of llama2-7b/13b and llama3-8b (W [n_out][n_in]), group 128.
static const struct gptq_case k_real[] = {
    {4096, 4096, 128, 0, 1, 1},  {4096, 11008, 128, 1, 1, 1}, {11008, 4096, 128, 0, 0, 1}, {4096, 1024, 128, 1, 1, 1},
    {5120, 5120, 128, 0, 0, 0},  {5120, 13824, 128, 0, 1, 1}, {13824, 5120, 128, 1, 1, 1}, {4096, 14336, 128, 0, 1, 1},
    {14336, 4096, 128, 0, 1, 1},
};

TEST(cuda_gptq_real_shapes) {
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    static const int32_t rows[] = {1, 3, 8, 40, 512};
    bool                 ok     = true;
    for (size_t i = 0; i < COOPT_ARRAY_LEN(k_real) && ok; i++)
        ok = run_case(t, be, &k_real[i], rows, COOPT_ARRAY_LEN(rows), 500 + i, i == 2);
    be->ops->destroy(be);
}

// ---- the int8 GEMV against the CPU int8 kernels (the same activation quantization) ----

static const struct gq_run k_cpu_runs[] = {
    {CUDA_GPTQ_GEMV_I8, 0, 8, "i8", -1},
    {CUDA_GPTQ_GEMV_I8, 8 | 3 << 8, 8, "i8w8s3", -1},
    {CUDA_GPTQ_GEMV_I8, 4 | 64 << 8, 8, "i8w4s64", -1},
};

// Uploads case c; for every row count compares the int8 GEMV with coopt_gptq_matmul_cpu (+ bias)
// at the tight tolerance and with the exact product at the int8 bound. Returns false after FAIL.
static bool cpu_match_case(struct test_ctx *t, struct coopt_backend *be, struct coopt_threadpool *tp,
                           const struct gptq_case *c, const int32_t *rows, int n_rows_list, uint64_t seed, bool bias) {
    uint64_t          rs = seed;
    struct gptq_tensors g;
    gptq_make_tensors(&rs, c, NULL, "test.proj", &g);
    char base[160], what[240];
    snprintf(base, sizeof(base), "cpu match: in %lld out %lld gs %d act %d sym %d v1 %d bias %d", (long long)c->n_in,
             (long long)c->n_out, c->gs, c->act, c->sym, c->v1, bias);
    struct coopt_gptq_weight *hw = NULL;
    struct cuda_gptq_weight   dw;
    memset(&dw, 0, sizeof(dw));
    bool ok = coopt_gptq_repack(&g.src, 2, &hw) == COOPT_OK && cuda_gptq_upload(be, hw, &dw) == COOPT_OK;
    if (!ok) test_fail(t, __FILE__, __LINE__, "%s: repack/upload failed", base);
    float *b  = bias ? test_rand_array(&rs, (size_t)c->n_out, -1, 1) : NULL;
    float *db = b ? dev_alloc_copy(be, b, (size_t)c->n_out * 4) : NULL;
    for (int k = 0; k < n_rows_list && ok; k++) {
        int32_t n_rows = rows[k];
        size_t  nx = (size_t)n_rows * (size_t)c->n_in, no = (size_t)n_rows * (size_t)c->n_out;
        float  *x = malloc(nx * 4), *got = malloc(no * 4), *cpu = malloc(no * 4);
        for (size_t i = 0; i < nx; i++) x[i] = test_rand_normal(&rs);
        x[0] = 6.0f; // an outlier
        if (coopt_gptq_matmul_cpu(tp, cpu, x, hw, n_rows) != COOPT_OK) {
            test_fail(t, __FILE__, __LINE__, "%s: CPU matmul failed", base);
            ok = false;
        }
        for (size_t i = 0; b && i < no; i++) cpu[i] += b[i % (size_t)c->n_out];
        struct gq_ref ref;
        gq_ref_make(&g.src, hw, x, b, n_rows, &ref);
        float *dx = dev_alloc_copy(be, x, nx * 4), *dout = dev_alloc_copy(be, NULL, no * 4);
        for (size_t p = 0; p < COOPT_ARRAY_LEN(k_cpu_runs) && ok; p++) {
            gq_run_path(be, &k_cpu_runs[p], dout, got, no, dx, &dw, db, n_rows);
            snprintf(what, sizeof(what), "%s rows %d path %s", base, n_rows, k_cpu_runs[p].name);
            ok = gq_check(t, what, got, c->n_out, n_rows, &ref, GQ_I8);
            double worst = 0;
            for (int32_t row = 0; row < n_rows && ok; row++) {
                for (int64_t cc = 0; cc < ref.n_cols; cc++) {
                    size_t kr  = (size_t)row * (size_t)ref.n_cols + (size_t)cc;
                    size_t ko  = (size_t)row * (size_t)c->n_out + (size_t)ref.cols[cc];
                    double tol = 3e-6 * ref.m2[kr] + 1e-6, e = fabs((double)got[ko] - cpu[ko]);
                    worst      = fmax(worst, e / tol);
                    if (!(e <= tol)) {
                        test_fail(t, __FILE__, __LINE__, "%s: out[%d][%lld] = %.8g, cpu %.8g, exact %.8g, tol %.3g",
                                  what, row, (long long)ref.cols[cc], got[ko], cpu[ko], ref.ref[kr], tol);
                        ok = false;
                        break;
                    }
                }
            }
            if (ok && p == 0 && (n_rows == 1 || n_rows == 8))
                fprintf(stderr, "  %s: worst |gpu - cpu| / tol = %.4f\n", what, worst);
        }
        be->ops->free(be, dx), be->ops->free(be, dout);
        gq_ref_free(&ref);
        free(x), free(got), free(cpu);
    }
    if (db) be->ops->free(be, db);
    free(b);
    cuda_gptq_release(&dw);
    coopt_gptq_weight_free(hw);
    gptq_tensors_free(&g);
    return ok;
}

TEST(cuda_gptq_cpu_match) {
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    struct coopt_threadpool *tp = NULL;
    if (coopt_threadpool_init(4, &tp) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "thread pool");
        be->ops->destroy(be);
        return;
    }
    // odd shapes (every group size, act-order regular and irregular, sym/asym, v1/v2, padding)
    static const struct gptq_case odd[] = {
        {256, 40, 32, 1, 0, 1},  {200, 72, -1, 0, 0, 1},     {512, 88, 64, 2, 0, 1},    {384, 200, 128, 1, 1, 0},
        {96, 16, 48, 0, 0, 1},   {1024, 1000, 128, 0, 0, 0}, {4096, 1024, 32, 1, 0, 0}, {4096, 4104, 64, 0, 0, 1},
        {11008, 4096, -1, 1, 1, 1},
    };
    static const int32_t rows_odd[] = {1, 2, 5, 8}, rows_real[] = {1, 8};
    bool                 ok = true;
    for (size_t i = 0; i < COOPT_ARRAY_LEN(odd) && ok; i++)
        ok = cpu_match_case(t, be, tp, &odd[i], rows_odd, COOPT_ARRAY_LEN(rows_odd), 700 + i, i % 2 == 1);
    for (size_t i = 0; i < COOPT_ARRAY_LEN(k_real) && ok; i++)
        ok = cpu_match_case(t, be, tp, &k_real[i], rows_real, COOPT_ARRAY_LEN(rows_real), 800 + i, i == 3);
    coopt_threadpool_free(tp);
    be->ops->destroy(be);
}

// ---- fixtures from the independent packer (scripts/make_gptq_fixture.py), as test_gptq.c ----

TEST(cuda_gptq_fixtures) {
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    bool ok = true;
    for (size_t f = 0; f < COOPT_ARRAY_LEN(gptq_fixture_names) && ok; f++) {
        struct gptq_fixture fx;
        const int           lrc = gptq_fixture_load(gptq_fixture_names[f], &fx);
        if (lrc != GPTQ_FIXTURE_OK) {
            test_fail(t, __FILE__, __LINE__, lrc == GPTQ_FIXTURE_UNREADABLE ? "cannot read %s" : "%s: bad fixture header or size",
                      gptq_fixture_names[f]);
            ok = false;
            break;
        }
        const int64_t                in = fx.in, out = fx.out;
        const struct coopt_gptq_src  s    = fx.src;
        const float                 *wref = fx.wref; // the packer's W [out][in]
        struct coopt_gptq_weight *hw = NULL;
        struct cuda_gptq_weight   dw;
        memset(&dw, 0, sizeof(dw));
        ok = coopt_gptq_repack(&s, 1, &hw) == COOPT_OK && cuda_gptq_upload(be, hw, &dw) == COOPT_OK;
        if (!ok) test_fail(t, __FILE__, __LINE__, "%s: repack/upload failed", gptq_fixture_names[f]);
        uint64_t rs = 21 + f;
        const int32_t rows_list[] = {1, 5, 20};
        for (size_t k = 0; k < COOPT_ARRAY_LEN(rows_list) && ok; k++) {
            int32_t n_rows = rows_list[k];
            size_t  nx = (size_t)n_rows * (size_t)in, no = (size_t)n_rows * (size_t)out;
            float  *x = malloc(nx * 4), *got = malloc(no * 4);
            for (size_t i = 0; i < nx; i++) x[i] = test_rand_normal(&rs);
            // reference from the packer's W
            struct gq_ref ref = {.cols = malloc(sizeof(int64_t) * (size_t)out), .n_cols = out};
            ref.ref = malloc(no * 8), ref.mag = malloc(no * 8), ref.sw = malloc(no * 8), ref.hq = malloc(no * 8);
            ref.m2    = NULL; // not used here (no CPU comparison)
            float *hx = malloc(nx * 4); // half quanta of x
            for (int32_t r = 0; r < n_rows; r++) gq_half_quanta(hw, x + (size_t)r * (size_t)in, hx + (size_t)r * (size_t)in);
            for (int64_t o = 0; o < out; o++) {
                ref.cols[o] = o;
                double sw = 0;
                for (int64_t i = 0; i < in; i++) sw += fabs(wref[o * in + i]);
                for (int32_t r = 0; r < n_rows; r++) {
                    double acc = 0, mag = 0, hq = 0;
                    for (int64_t i = 0; i < in; i++) {
                        double v = (double)wref[o * in + i] * x[(size_t)r * (size_t)in + (size_t)i];
                        acc += v, mag += fabs(v), hq += fabs(wref[o * in + i]) * hx[(size_t)r * (size_t)in + (size_t)i];
                    }
                    size_t kk = (size_t)r * (size_t)out + (size_t)o;
                    ref.ref[kk] = acc, ref.mag[kk] = mag, ref.sw[kk] = sw, ref.hq[kk] = hq;
                }
            }
            free(hx);
            float *dx = dev_alloc_copy(be, x, nx * 4), *dout = dev_alloc_copy(be, NULL, no * 4);
            for (size_t pi = 0; pi < COOPT_ARRAY_LEN(k_runs) && ok; pi++) {
                if (n_rows > k_runs[pi].max_rows) continue;
                gq_run_path(be, &k_runs[pi], dout, got, no, dx, &dw, NULL, n_rows);
                enum cuda_gptq_path path = k_runs[pi].path ? k_runs[pi].path : cuda_gptq_auto_path(&dw, n_rows);
                char what[160];
                snprintf(what, sizeof(what), "%s rows %d path %s", gptq_fixture_names[f], n_rows, k_runs[pi].name);
                ok = gq_check(t, what, got, out, n_rows, &ref, gq_kind_of(path));
            }
            be->ops->free(be, dx), be->ops->free(be, dout);
            gq_ref_free(&ref);
            free(x), free(got);
        }
        cuda_gptq_release(&dw);
        coopt_gptq_weight_free(hw);
        free(fx.data);
    }
    be->ops->destroy(be);
}

// ---- whole models: coopt synth GPTQ checkpoints on cuda against the CPU scalar reference ----

// Decodes `in` on both contexts; compares the logits of the last token. Returns the CPU argmax
// (>= 0), or -1 after FAIL.
static int32_t model_step(struct test_ctx *t, struct coopt_ctx *cc, struct coopt_ctx *cr, const int32_t *toks,
                          const int32_t *seqs, int32_t n, int32_t nv, double rel, const char *what) {
    struct coopt_batch_input in = {.n_tokens = n, .tokens = toks, .seq_ids = seqs};
    if (coopt_ctx_decode(cc, &in) != COOPT_OK || coopt_ctx_decode(cr, &in) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "%s: decode failed", what);
        return -1;
    }
    const float *lc = coopt_ctx_logits(cc, n - 1), *lr = coopt_ctx_logits(cr, n - 1);
    if (!lc || !lr) {
        test_fail(t, __FILE__, __LINE__, "%s: no logits", what);
        return -1;
    }
    double  m = 0, worst = 0;
    int32_t best = 0, wi = 0;
    for (int32_t i = 0; i < nv; i++) m = fmax(m, fabs(lr[i]));
    for (int32_t i = 0; i < nv; i++) {
        double e = fabs((double)lc[i] - lr[i]) / (rel * m + rel * fabs(lr[i]));
        if (!(e <= worst)) worst = e, wi = i;
        if (lr[i] > lr[best]) best = i;
    }
    fprintf(stderr, "  %s: worst |cuda - cpu-ref| / tol = %.3f (max |logit| %.2f)\n", what, worst, m);
    if (!(worst <= 1.0)) {
        test_fail(t, __FILE__, __LINE__, "%s: logit %d cuda %.6g cpu-ref %.6g (%.2f x tol, max |logit| %.3g)", what, wi,
                  lc[wi], lr[wi], worst, m);
        return -1;
    }
    return best;
}

// A 2-layer tinyllama-1.1b GPTQ model (coopt synth) in dir/m, dir a new temporary directory
// (remove it with synth_tiny_remove). n_layers: 2 in this file's tests.
static enum coopt_status synth_tiny(char *dir, size_t cap, bool act, int32_t gs, int32_t n_layers) {
    if (!st_test_mkdtemp(dir, cap)) return COOPT_ERR_IO;
    strncat(dir, "/m", cap - strlen(dir) - 1);
    struct coopt_synth_params sp = coopt_synth_default_params();
    sp.arch = "tinyllama-1.1b", sp.dtype = COOPT_DTYPE_Q4_GPTQ, sp.n_layers = n_layers, sp.seed = 3;
    sp.act_order = act, sp.group_size = gs, sp.out_dir = dir;
    sp.tokenizer = test_model_path("llama2-tokenizer/tokenizer.model");
    st_test_capture_begin();
    enum coopt_status rc = coopt_synth_write(&sp, NULL);
    st_test_capture_end();
    return rc;
}

static void synth_tiny_remove(char *dir) {
    dir[strlen(dir) - 2] = 0;
    st_test_rmtree(dir);
}

static bool check_synth_model(struct test_ctx *t, bool act, int32_t gs) {
    char                      dir[512];
    const int32_t             n_layers = 2;
    enum coopt_status         rc       = synth_tiny(dir, sizeof(dir), act, gs, n_layers);
    struct coopt_model       *mc = NULL, *mr = NULL;
    struct coopt_ctx         *cc = NULL, *cr = NULL;
    struct coopt_model_params mp = coopt_model_default_params();
    bool                      ok = rc == COOPT_OK;
    mp.device = "cuda";
    ok = ok && coopt_model_load(dir, &mp, &mc) == COOPT_OK;
    mp.device = "cpu-ref";
    ok = ok && coopt_model_load(dir, &mp, &mr) == COOPT_OK;
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx = 128, cp.n_seq_max = 3, cp.n_batch = 64, cp.kv_type = COOPT_DTYPE_F32, cp.n_threads = 4;
    ok = ok && coopt_ctx_init(mc, &cp, &cc) == COOPT_OK && coopt_ctx_init(mr, &cp, &cr) == COOPT_OK;
    if (!ok) test_fail(t, __FILE__, __LINE__, "synth/load/context failed (act %d gs %d)", act, gs);
    int32_t s0 = -1, s1 = -1, s2 = -1, s3 = -1, s4 = -1, s5 = -1;
    ok = ok && coopt_seq_new(cc, &s0) == COOPT_OK && coopt_seq_new(cr, &s1) == COOPT_OK && s0 == s1;
    ok = ok && coopt_seq_new(cc, &s2) == COOPT_OK && coopt_seq_new(cr, &s3) == COOPT_OK && s2 == s3;
    ok = ok && coopt_seq_new(cc, &s4) == COOPT_OK && coopt_seq_new(cr, &s5) == COOPT_OK && s4 == s5;
    int32_t nv = ok ? coopt_model_get_info(mr)->n_vocab : 0;
    int32_t toks[24], seqs[24];
    char    what[96];
    // sequence A: one token at a time, every GPTQ matmul the f32 GEMV
    cuda_gptq_set_gemv(CUDA_GPTQ_GEMV_MODE_F32);
    toks[0] = 1, seqs[0] = s0;
    for (int step = 0; step < 4 && ok; step++) {
        snprintf(what, sizeof(what), "act %d gs %d seq A (f32 GEMV) step %d", act, gs, step);
        int32_t best = model_step(t, cc, cr, toks, seqs, 1, nv, 1e-3, what);
        ok = best >= 0, toks[0] = best;
    }
    // sequence C: the same with the int8 GEMV (x rounded to int8 in every GPTQ matmul)
    cuda_gptq_set_gemv(CUDA_GPTQ_GEMV_MODE_I8);
    toks[0] = 1, seqs[0] = s4;
    for (int step = 0; step < 4 && ok; step++) {
        snprintf(what, sizeof(what), "act %d gs %d seq C (int8 GEMV) step %d", act, gs, step);
        int32_t best = model_step(t, cc, cr, toks, seqs, 1, nv, 2e-2, what);
        ok = best >= 0, toks[0] = best;
    }
    cuda_gptq_set_gemv(CUDA_GPTQ_GEMV_MODE_DEFAULT);
    // sequence B: a 24-token prompt (tensor-core path), then one step (the default GEMV). That step
    // runs op by op (the first with its graph key since the GEMV mode changed) and, with direct
    // weights and the tensor-core GEMV, every GEMV but the first q/k/v reads an input staged for
    // it: o by the attention, gate/up by o, down by gate/up, the next q/k/v by down (launch
    // counters: 3 L - 1 GEMVs staged an output, 4 L - 1 used one)
    for (int i = 0; i < 24; i++) toks[i] = 3 + (int32_t)((i * 40503u + 7) % 31000u), seqs[i] = s2;
    for (int step = 0; step < 2 && ok; step++) {
        snprintf(what, sizeof(what), "act %d gs %d seq B step %d", act, gs, step);
        int64_t made0, used0, made1, used1;
        cuda_gptq_xstage_counts(&made0, &used0);
        int32_t best = model_step(t, cc, cr, toks, seqs, step ? 1 : 24, nv, 2e-2, what);
        ok = best >= 0, toks[0] = best;
        cuda_gptq_xstage_counts(&made1, &used1);
        const int64_t L = n_layers;
        if (ok && step == 1 && !act && cuda_gptq_get_gemv() == CUDA_GPTQ_GEMV_MODE_H &&
            (made1 - made0 != 3 * L - 1 || used1 - used0 != 4 * L - 1)) {
            test_fail(t, __FILE__, __LINE__, "%s: %lld GEMVs staged an output, %lld used one; want %lld, %lld", what,
                      (long long)(made1 - made0), (long long)(used1 - used0), (long long)(3 * L - 1),
                      (long long)(4 * L - 1));
            ok = false;
        }
    }
    coopt_ctx_free(cc), coopt_ctx_free(cr);
    coopt_model_free(mc), coopt_model_free(mr);
    synth_tiny_remove(dir);
    return ok;
}

TEST(cuda_gptq_model) {
    if (coopt_cuda_device_count() <= 0) SKIP(t, "no CUDA device");
    if (!test_have_file(test_model_path("llama2-tokenizer/tokenizer.model"))) SKIP(t, "llama2-tokenizer not available");
    coopt_log_set_quiet(1);
    if (!check_synth_model(t, true, 128)) return;
    if (!check_synth_model(t, false, 32)) return;
}

// ---- out of device memory inside a step ----

struct oom_rec {
    int32_t *toks; // [4]
    int      n;
};

static bool oom_rec_fn(void *ud, int32_t tok) {
    struct oom_rec *r = (struct oom_rec *)ud;
    if (r->n < 4) r->toks[r->n] = tok;
    r->n++;
    return true;
}

// The n tokens fed to sequence *seq of c (created when < 0); the last one's logits to out (NULL: none).
static enum coopt_status oom_feed(struct coopt_ctx *c, const int32_t *toks, int32_t n, float *out, int32_t nv,
                                  int32_t *seq) {
    int32_t seqs[32];
    if (*seq < 0 && coopt_seq_new(c, seq) != COOPT_OK) return COOPT_ERR_INVALID;
    for (int32_t i = 0; i < n; i++) seqs[i] = *seq;
    struct coopt_batch_input b  = {.n_tokens = n, .tokens = toks, .seq_ids = seqs};
    enum coopt_status        st = coopt_ctx_decode(c, &b);
    const float             *l  = st == COOPT_OK ? coopt_ctx_logits(c, n - 1) : NULL;
    if (l && out) memcpy(out, l, (size_t)nv * sizeof(float));
    return st;
}

// A GPU out of memory for a workspace inside a step (cuda_set_workspace_limit makes the growth
// fail as cudaMalloc would) is a status with a message, not an abort: the decode returns
// COOPT_ERR_NOMEM, the sequence keeps its length and the batch has no logits; the same call
// fails the same way again (its launch geometry must not be recorded into a CUDA graph after the
// failed first sight: recording it would grow the workspace inside the capture, which aborts);
// once memory is there the same prompt gives the logits of a context that never failed, bit for
// bit, and generation (whose first step fails the same way before memory is there) the same
// tokens. Act-order weights: the GEMVs gather x into the workspace at one row too.
TEST(cuda_workspace_oom) {
    if (coopt_cuda_device_count() <= 0) SKIP(t, "no CUDA device");
    if (!test_have_file(test_model_path("llama2-tokenizer/tokenizer.model"))) SKIP(t, "llama2-tokenizer not available");
    coopt_log_set_quiet(1);
    char                      dir[512];
    struct coopt_model       *m  = NULL;
    struct coopt_ctx         *cr = NULL, *cc = NULL;
    struct coopt_model_params mp = coopt_model_default_params();
    mp.device                    = "cuda";
    struct coopt_ctx_params cp   = coopt_ctx_default_params();
    cp.n_ctx = 128, cp.n_seq_max = 4, cp.n_batch = 64, cp.kv_type = COOPT_DTYPE_FP8_E4M3;
    bool ok = synth_tiny(dir, sizeof(dir), true, 128, 2) == COOPT_OK && coopt_model_load(dir, &mp, &m) == COOPT_OK &&
              coopt_ctx_init(m, &cp, &cr) == COOPT_OK && coopt_ctx_init(m, &cp, &cc) == COOPT_OK;
    if (!ok) test_fail(t, __FILE__, __LINE__, "synth/load/context failed");
    int32_t nv = ok ? coopt_model_get_info(m)->n_vocab : 0, toks[24], sr = -1, sc = -1;
    for (int i = 0; i < 24; i++) toks[i] = 3 + (int32_t)((i * 40503u + 11) % 31000u);
    float *ref = malloc((size_t)COOPT_MAX(nv, 1) * sizeof(float)), *got = malloc((size_t)COOPT_MAX(nv, 1) * sizeof(float));
    ok = ok && ref && got && oom_feed(cr, toks, 24, ref, nv, &sr) == COOPT_OK;
    struct coopt_backend *be = ok ? coopt_ctx_backend(cc) : NULL;
    for (int k = 0; k < 2 && ok; k++) {
        cuda_set_workspace_limit(be, 1);
        st_test_capture_begin();
        enum coopt_status st  = oom_feed(cc, toks, 24, NULL, nv, &sc);
        const char       *msg = st_test_capture_end();
        CHECKF(t, st == COOPT_ERR_NOMEM && coopt_seq_len(cc, sc) == 0 && coopt_ctx_logits(cc, 23) == NULL,
               "attempt %d: status %d, sequence length %d", k, (int)st, coopt_seq_len(cc, sc));
        CHECKF(t, msg && strstr(msg, "out of GPU memory") && strstr(msg, "workspace"), "attempt %d: message '%s'", k,
               msg ? msg : "(none)");
        ok = !t->failed;
    }
    cuda_set_workspace_limit(be, 0);
    ok = ok && oom_feed(cc, toks, 24, got, nv, &sc) == COOPT_OK;
    CHECK(t, ok && coopt_seq_len(cc, sc) == 24 && memcmp(got, ref, (size_t)nv * sizeof(float)) == 0);
    // generation from a fresh context: the first step fails before any token is fed
    struct coopt_ctx *cg = NULL;
    int32_t           sg = -1, sr2 = -1, n_fed = -1, tok_ref[4] = {0}, tok_got[4] = {0};
    ok = ok && coopt_ctx_init(m, &cp, &cg) == COOPT_OK && coopt_seq_new(cg, &sg) == COOPT_OK &&
         coopt_seq_new(cr, &sr2) == COOPT_OK;
    if (ok) {
        cuda_set_workspace_limit(coopt_ctx_backend(cg), 1);
        st_test_capture_begin();
        enum coopt_status st = coopt_ctx_generate(cg, sg, toks[0], 4, NULL, NULL, NULL, &n_fed);
        st_test_capture_end();
        CHECKF(t, st == COOPT_ERR_NOMEM && n_fed == 0 && coopt_seq_len(cg, sg) == 0, "generate: status %d, %d fed",
               (int)st, n_fed);
        cuda_set_workspace_limit(coopt_ctx_backend(cg), 0);
        struct oom_rec rr = {tok_ref, 0}, rg = {tok_got, 0};
        CHECK(t, coopt_ctx_generate(cr, sr2, toks[0], 5, NULL, oom_rec_fn, &rr, NULL) == COOPT_OK &&
                     coopt_ctx_generate(cg, sg, toks[0], 5, NULL, oom_rec_fn, &rg, &n_fed) == COOPT_OK);
        CHECKF(t, rr.n == 4 && rg.n == 4 && n_fed == 5 && memcmp(tok_ref, tok_got, sizeof(tok_ref)) == 0,
               "generate after the failure: %d / %d tokens, %d fed, first %d / %d", rr.n, rg.n, n_fed, tok_ref[0],
               tok_got[0]);
    }
    coopt_ctx_free(cg);
    coopt_ctx_free(cc), coopt_ctx_free(cr);
    coopt_model_free(m);
    free(ref), free(got);
    synth_tiny_remove(dir);
}

// ---- kernel timings (not a check): COOPT_CUDA_BENCH=1 ./build/coopt-test cuda_gptq_bench ----

#define GPTQ_BENCH_MAX_MULTI 3

struct bench_arg {
    struct coopt_backend          *be;
    const struct cuda_gptq_weight *ws; // n_copies uploads of one weight (rotated: more than L2)
    int                            n_copies;
    float                         *dx, *dout;
    int32_t                        n_rows;
    enum cuda_gptq_path            path;
    int                            param;
};

static void bench_call(void *p, int i) {
    struct bench_arg *a = p;
    cuda_gptq_matmul_path(a->be, a->dout, a->dx, &a->ws[i % a->n_copies], NULL, a->n_rows, a->path, a->param);
}

// Several weights of one input (q/k/v, gate/up): one multi call, or one call per weight.
struct bench_multi_arg {
    struct coopt_backend          *be;
    const struct cuda_gptq_weight *ws; // [n_copies][n]
    int                            n, n_copies;
    float                         *dx, *douts[GPTQ_BENCH_MAX_MULTI];
    int32_t                        n_rows;
    bool                           multi;
    int                            fused; // -1: matmul(s), else the cuda_gptq_fused op (norm: dnorm or NULL)
    const float                   *dnorm;
};

static void bench_multi_call(void *p, int i) {
    struct bench_multi_arg        *a = p;
    const struct cuda_gptq_weight *w = &a->ws[(i % a->n_copies) * a->n];
    if (a->fused >= 0) {
        const struct cuda_gptq_weight *ws[GPTQ_BENCH_MAX_MULTI];
        for (int j = 0; j < a->n; j++) ws[j] = &w[j];
        (void)cuda_gptq_gemv_fused(a->be, (enum cuda_gptq_fused)a->fused, a->n, a->douts, a->dx, a->dnorm, 1e-5f, ws,
                                   NULL, a->n_rows, NULL);
    } else if (a->multi) {
        const struct cuda_gptq_weight *ws[GPTQ_BENCH_MAX_MULTI];
        for (int j = 0; j < a->n; j++) ws[j] = &w[j];
        cuda_gptq_matmul_multi(a->be, a->n, a->douts, a->dx, ws, NULL, a->n_rows);
    } else {
        for (int j = 0; j < a->n; j++) cuda_gptq_matmul(a->be, a->douts[j], a->dx, &w[j], NULL, a->n_rows);
    }
}

// Weight bytes one call reads: packed codes + scale/zero words.
static double bench_wbytes(const struct cuda_gptq_weight *w) {
    return (double)w->n_ot * 16 * (double)w->k_pad / 2 + (double)w->n_ot * 16 * w->n_groups * 4;
}

TEST(cuda_gptq_bench) {
    if (!getenv("COOPT_CUDA_BENCH")) SKIP(t, "set COOPT_CUDA_BENCH=1 to time the kernels");
    struct coopt_backend *be;
    if (!init_cuda(t, &be)) return;
    const double bw = 2.94e12; // measured read bandwidth of the H100 (docs/BENCHMARKS.md)
    float       *xh = NULL;
    uint64_t     rs = 9;
    float       *dx = dev_alloc_copy(be, NULL, 512 * 14336 * 4), *dout = dev_alloc_copy(be, NULL, 512 * 14336 * 4);
    xh              = test_rand_array(&rs, 512 * 14336, -1, 1);
    be->ops->upload(be, dx, xh, 512 * 14336 * 4);
    printf("bench: gptq int4 g128, W [n_out][n_in]; GB/s counts the packed weights + scales read once\n");
    printf("bench: paths: f32 = f32 GEMV, i8 = int8 GEMV (auto config; wAsB = A warps, B K splits), nopdl = without\n");
    printf("bench: programmatic dependent launch, mma = f16 tensor-core kernel; us per call incl. the x preparation\n");
    printf("bench: %-12s %-9s %5s %9s %9s %6s %9s\n", "shape", "path", "rows", "us/call", "GB/s", "of BW", "TFLOP/s");
    struct gptq_case shapes[] = {{4096, 4096, 128, 0, 1, 1},   {4096, 11008, 128, 0, 1, 1}, {11008, 4096, 128, 0, 1, 1},
                               {4096, 1024, 128, 0, 1, 1},   {5120, 5120, 128, 0, 1, 1},  {5120, 13824, 128, 0, 1, 1},
                               {13824, 5120, 128, 0, 1, 1},  {4096, 14336, 128, 0, 1, 1}, {14336, 4096, 128, 0, 1, 1},
                               {4096, 4096, 128, 1, 1, 1}};
    for (size_t si = 0; si < COOPT_ARRAY_LEN(shapes); si++) {
        const struct gptq_case *c = &shapes[si];
        struct gptq_tensors     g;
        gptq_make_tensors(&rs, c, NULL, "test.proj", &g);
        struct coopt_gptq_weight *hw = NULL;
        COOPT_ASSERT(coopt_gptq_repack(&g.src, 4, &hw) == COOPT_OK);
        size_t one    = cuda_gptq_dev_bytes(hw);
        int    copies = (int)((320u << 20) / one) + 1;
        struct cuda_gptq_weight *ws = calloc((size_t)copies, sizeof(*ws));
        for (int i = 0; i < copies; i++) COOPT_ASSERT(cuda_gptq_upload(be, hw, &ws[i]) == COOPT_OK);
        double wbytes = bench_wbytes(&ws[0]);
        char   shape[32];
        snprintf(shape, sizeof(shape), "%lldx%lld%s", (long long)c->n_out, (long long)c->n_in, c->act ? "a" : "");
        int auto_nw = 0, auto_split = 0;
        cuda_gptq_i8_auto_config(be, ws[0].n_ot, ws[0].n_kc, &auto_nw, &auto_split);
        printf("bench: %-12s int8 GEMV auto config: %d warps, %d K splits\n", shape, auto_nw, auto_split);
        struct {
            enum cuda_gptq_path path;
            int                 param;
            int32_t             rows;
            const char         *name;
            int                 pdl;
        } runs[] = {{CUDA_GPTQ_GEMV, 0, 1, "f32", -1},   {CUDA_GPTQ_GEMV_I8, 0, 1, "i8", -1},
                    {CUDA_GPTQ_MMA, 0, 1, "mma", -1},    {CUDA_GPTQ_HGEMV, 0, 1, "h", -1},
                    {CUDA_GPTQ_HGEMV, 4, 1, "h4", -1},   {CUDA_GPTQ_HGEMV, 8, 1, "h8", -1},
                    {CUDA_GPTQ_HGEMV, 16, 1, "h16", -1}, {CUDA_GPTQ_HGEMV, 0, 1, "hnopdl", 0},
                    {CUDA_GPTQ_HGEMV, 0, 2, "h", -1},    {CUDA_GPTQ_MMA, 0, 2, "mma", -1},
                    {CUDA_GPTQ_HGEMV, 0, 4, "h", -1},    {CUDA_GPTQ_MMA, 0, 4, "mma", -1},
                    {CUDA_GPTQ_HGEMV, 0, 8, "h", -1},    {CUDA_GPTQ_GEMV_I8, 0, 8, "i8", -1},
                    {CUDA_GPTQ_MMA, 0, 8, "mma", -1},    {CUDA_GPTQ_MMA, 0, 16, "mma", -1}};
        for (size_t ri = 0; ri < COOPT_ARRAY_LEN(runs); ri++) {
            if (c->act && runs[ri].rows > 1 && runs[ri].path == CUDA_GPTQ_GEMV) continue;
            if (c->act && runs[ri].rows == 1 && runs[ri].param) continue; // the sweep: direct shapes only
            struct bench_arg a = {be, ws, copies, dx, dout, runs[ri].rows, runs[ri].path, runs[ri].param};
            cuda_gptq_set_pdl(runs[ri].pdl);
            double us = cuda_bench_graph(be, bench_call, &a, 2 * copies);
            cuda_gptq_set_pdl(-1);
            double gbs = wbytes / us / 1e3;
            printf("bench: %-12s %-9s %5d %9.2f %9.1f %5.0f%% %9.1f\n", shape, runs[ri].name, runs[ri].rows, us, gbs,
                   100.0 * gbs * 1e9 / bw, 2.0 * (double)c->n_in * (double)c->n_out * runs[ri].rows / us / 1e6);
            fflush(stdout);
        }
        for (int i = 0; i < copies; i++) cuda_gptq_release(&ws[i]);
        free(ws);
        coopt_gptq_weight_free(hw);
        gptq_tensors_free(&g);
    }
    // projections of one input: q/k/v of llama2-7b and llama3-8b, gate/up of llama2-7b
    // fused: -1 = matmul calls (multi / each), else the cuda_gptq_fused op; norm: with RMS norm
    // weights; layer_end: the last of a decode layer's four fused GEMVs (prints their sum)
    enum { M = -1, ST = CUDA_GPTQ_FUSED_STORE, ADD = CUDA_GPTQ_FUSED_ADD, SW = CUDA_GPTQ_FUSED_SWIGLU };
    struct {
        const char    *name;
        int            fused;
        bool           norm, layer_end;
        int            n;
        struct gptq_case cs[GPTQ_BENCH_MAX_MULTI];
    } sets[] = {
        {"qkv-7b", M, false, false, 3, {{4096, 4096, 128, 0, 1, 1}, {4096, 4096, 128, 0, 1, 1}, {4096, 4096, 128, 0, 1, 1}}},
        {"qkv-8b", M, false, false, 3, {{4096, 4096, 128, 0, 1, 1}, {4096, 1024, 128, 0, 1, 1}, {4096, 1024, 128, 0, 1, 1}}},
        {"gateup-7b", M, false, false, 2, {{4096, 11008, 128, 0, 1, 1}, {4096, 11008, 128, 0, 1, 1}}},
        // the four fused GEMVs of a decode layer, as the forward pass calls them
        {"7b:qkv+norm", ST, true, false, 3, {{4096, 4096, 128, 0, 1, 1}, {4096, 4096, 128, 0, 1, 1}, {4096, 4096, 128, 0, 1, 1}}},
        {"7b:o+add", ADD, false, false, 1, {{4096, 4096, 128, 0, 1, 1}}},
        {"7b:gu+norm+sw", SW, true, false, 2, {{4096, 11008, 128, 0, 1, 1}, {4096, 11008, 128, 0, 1, 1}}},
        {"7b:down+add", ADD, false, true, 1, {{11008, 4096, 128, 0, 1, 1}}},
        {"8b:qkv+norm", ST, true, false, 3, {{4096, 4096, 128, 0, 1, 1}, {4096, 1024, 128, 0, 1, 1}, {4096, 1024, 128, 0, 1, 1}}},
        {"8b:o+add", ADD, false, false, 1, {{4096, 4096, 128, 0, 1, 1}}},
        {"8b:gu+norm+sw", SW, true, false, 2, {{4096, 14336, 128, 0, 1, 1}, {4096, 14336, 128, 0, 1, 1}}},
        {"8b:down+add", ADD, false, true, 1, {{14336, 4096, 128, 0, 1, 1}}},
        {"13b:qkv+norm", ST, true, false, 3, {{5120, 5120, 128, 0, 1, 1}, {5120, 5120, 128, 0, 1, 1}, {5120, 5120, 128, 0, 1, 1}}},
        {"13b:o+add", ADD, false, false, 1, {{5120, 5120, 128, 0, 1, 1}}},
        {"13b:gu+norm+sw", SW, true, false, 2, {{5120, 13824, 128, 0, 1, 1}, {5120, 13824, 128, 0, 1, 1}}},
        {"13b:down+add", ADD, false, true, 1, {{13824, 5120, 128, 0, 1, 1}}},
    };
    float *dnorm = dev_alloc_copy(be, xh, 14336 * 4); // (any values: the time does not depend on them)
    double layer_us = 0;
    for (size_t si = 0; si < COOPT_ARRAY_LEN(sets); si++) {
        struct coopt_gptq_weight *hw[GPTQ_BENCH_MAX_MULTI] = {0};
        struct gptq_tensors         g[GPTQ_BENCH_MAX_MULTI];
        size_t                    one = 0;
        double                    wbytes = 0;
        for (int j = 0; j < sets[si].n; j++) {
            gptq_make_tensors(&rs, &sets[si].cs[j], NULL, "test.proj", &g[j]);
            COOPT_ASSERT(coopt_gptq_repack(&g[j].src, 4, &hw[j]) == COOPT_OK);
            one += cuda_gptq_dev_bytes(hw[j]);
        }
        int                      copies = (int)((320u << 20) / one) + 1;
        struct cuda_gptq_weight *ws     = calloc((size_t)copies * (size_t)sets[si].n, sizeof(*ws));
        for (int i = 0; i < copies; i++)
            for (int j = 0; j < sets[si].n; j++)
                COOPT_ASSERT(cuda_gptq_upload(be, hw[j], &ws[i * sets[si].n + j]) == COOPT_OK);
        for (int j = 0; j < sets[si].n; j++) wbytes += bench_wbytes(&ws[j]);
        const int              fused = sets[si].fused;
        struct bench_multi_arg a     = {be, ws, sets[si].n, copies, dx, {0}, 1, true, fused, sets[si].norm ? dnorm : NULL};
        for (int j = 0; j < sets[si].n; j++) a.douts[j] = dout + (size_t)j * 8 * 14336;
        struct {
            int32_t             rows;
            bool                multi;
            enum cuda_gptq_gemv mode;
            const char         *name;
        } runs[] = {{1, true, CUDA_GPTQ_GEMV_MODE_I8, "i8multi"}, {1, false, CUDA_GPTQ_GEMV_MODE_I8, "i8each"},
                    {1, true, CUDA_GPTQ_GEMV_MODE_F32, "f32multi"}, {1, false, CUDA_GPTQ_GEMV_MODE_F32, "f32each"},
                    {1, true, CUDA_GPTQ_GEMV_MODE_H, "hmulti"},     {1, false, CUDA_GPTQ_GEMV_MODE_H, "heach"},
                    {8, true, CUDA_GPTQ_GEMV_MODE_I8, "i8multi"}, {8, false, CUDA_GPTQ_GEMV_MODE_F32, "mmaeach"},
                    {8, true, CUDA_GPTQ_GEMV_MODE_H, "hmulti"}};
        for (size_t ri = 0; ri < COOPT_ARRAY_LEN(runs); ri++) {
            if (fused >= 0 && (runs[ri].rows != 1 || !runs[ri].multi || runs[ri].mode == CUDA_GPTQ_GEMV_MODE_I8))
                continue; // the fused ops: one row, the f32 and the tensor-core GEMV
            a.n_rows = runs[ri].rows, a.multi = runs[ri].multi;
            cuda_gptq_set_gemv(runs[ri].mode);
            double us = cuda_bench_graph(be, bench_multi_call, &a, 2 * copies);
            cuda_gptq_set_gemv(CUDA_GPTQ_GEMV_MODE_DEFAULT);
            double gbs = wbytes / us / 1e3;
            printf("bench: %-14s %-9s %5d %9.2f %9.1f %5.0f%%\n", sets[si].name, runs[ri].name, runs[ri].rows, us, gbs,
                   100.0 * gbs * 1e9 / bw);
            if (fused >= 0 && runs[ri].mode == CUDA_GPTQ_GEMV_MODE_H) {
                layer_us += us;
                if (sets[si].layer_end) {
                    printf("bench: %.*s decode layer, 4 fused GEMVs (h): %.2f us\n",
                           (int)strcspn(sets[si].name, ":"), sets[si].name, layer_us);
                    layer_us = 0;
                }
            }
            fflush(stdout);
        }
        for (int i = 0; i < copies * sets[si].n; i++) cuda_gptq_release(&ws[i]);
        free(ws);
        for (int j = 0; j < sets[si].n; j++) coopt_gptq_weight_free(hw[j]), gptq_tensors_free(&g[j]);
    }
    be->ops->free(be, dx), be->ops->free(be, dout), be->ops->free(be, (void *)dnorm);
    free(xh);
    be->ops->destroy(be);
}

#else // !COOPT_CUDA

TEST(cuda_gptq) { SKIP(t, "built without CUDA"); }

#endif
