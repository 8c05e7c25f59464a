/*
 * quantize.c -- GPTQ / RTN quantization of one matrix, the calibration Hessian, and packing
 * into GPTQ checkpoint tensors. The semantics are written down in quantize.h.
 *
 * GPTQ treats every output row independently once U (the upper Cholesky factor of H^-1) is
 * known, so rows are processed in tiles of TILE rows spread over the thread pool; within a
 * tile the columns are walked in blocks (the "lazy batch" of the paper): updates inside the
 * block are applied column by column, and the block's errors are applied to the remaining
 * columns at the block's end. U is read once per tile, so TILE rows amortise its traffic.
 * H and its factorisation are double; the weights, U and the updates are f32 (as AutoGPTQ).
 */
#include "quantize.h"

#include "context.h"
#include "cpu/threads.h"
#include "dtype.h"
#include "forward.h"
#include "json_util.h"
#include "model.h"
#include "safetensors.h"
#include "util.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TILE 16 // output rows per GPTQ work item

struct coopt_quant_params coopt_quant_default_params(void) {
    return (struct coopt_quant_params){.bits = 4, .group_size = 128, .sym = true, .damp = 0.01, .block_size = 128};
}

void coopt_quant_result_free(struct coopt_quant_result *r) {
    if (!r) return;
    free(r->q), free(r->scale), free(r->zero), free(r->g_idx);
    *r = (struct coopt_quant_result){0};
}

// ---- H^-1 factorisation ----

// In-place lower Cholesky factor of a [n][n] (lower triangle read and written). False if a
// pivot is not positive (not positive definite).
static bool cholesky_lower(double *a, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        double *ri = a + i * n;
        for (int64_t j = 0; j <= i; j++) {
            const double *rj = a + j * n;
            double        s  = ri[j];
            for (int64_t k = 0; k < j; k++) s -= ri[k] * rj[k];
            if (i == j) {
                if (!(s > 0) || !isfinite(s)) return false;
                ri[i] = sqrt(s);
            } else {
                ri[j] = s / rj[j];
            }
        }
    }
    return true;
}

// x = r^-1 for lower-triangular r [n][n]; x lower, row by row:
// x[i][c] = -(sum_{c<=k<i} r[i][k] x[k][c]) / r[i][i], x[i][i] = 1 / r[i][i].
static void tri_inverse_lower(const double *r, double *x, int64_t n, double *acc) {
    for (int64_t i = 0; i < n; i++) {
        const double *ri = r + i * n;
        memset(acc, 0, (size_t)i * sizeof(double));
        for (int64_t k = 0; k < i; k++) {
            double        f  = ri[k];
            const double *xk = x + k * n;
            for (int64_t c = 0; c <= k; c++) acc[c] += f * xk[c];
        }
        double *xi = x + i * n;
        for (int64_t c = 0; c < i; c++) xi[c] = -acc[c] / ri[i];
        xi[i] = 1.0 / ri[i];
    }
}

// U [n][n] (f32, upper) with U^T U = (hp + damp*mean(diag)*I)^-1. With J the reversal
// permutation: J H J = R R^T (R lower) gives H^-1 = (J R^-1 J)^T (J R^-1 J), and J R^-1 J is
// upper with a positive diagonal, so it is THE upper Cholesky factor of H^-1 (as
// torch.linalg.cholesky(cholesky_inverse(cholesky(H)), upper=True) computes it).
static enum coopt_status hinv_factor(const double *hp, int64_t n, const struct coopt_quant_params *p, float *u,
                                     double *damp_used) {
    enum coopt_status st  = COOPT_OK;
    double           *a   = coopt_malloc((size_t)n * (size_t)n * sizeof(double));
    double           *x   = coopt_malloc((size_t)n * (size_t)n * sizeof(double));
    double           *acc = coopt_malloc((size_t)n * sizeof(double));
    if (!a || !x || !acc) {
        st = COOPT_ERR_NOMEM;
        goto done;
    }
    double mean = 0;
    for (int64_t i = 0; i < n; i++) mean += hp[i * n + i];
    mean /= (double)n;
    double damp = p->damp;
    for (int attempt = 0;; attempt++) {
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j <= i; j++) a[i * n + j] = hp[(n - 1 - i) * n + (n - 1 - j)];
        for (int64_t i = 0; i < n; i++) a[i * n + i] += damp * mean;
        if (cholesky_lower(a, n)) break;
        if (attempt == 4) {
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: Hessian is not positive definite even with dampening %g",
                            p->name ? p->name : "layer", damp);
            goto done;
        }
        coopt_log_info("%s: Hessian not positive definite with dampening %g, retrying with %g",
                       p->name ? p->name : "layer", damp, damp * 10);
        damp *= 10;
    }
    *damp_used = damp;
    tri_inverse_lower(a, x, n, acc);
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < n; j++) u[i * n + j] = j >= i ? (float)x[(n - 1 - i) * n + (n - 1 - j)] : 0.0f;
done:
    free(a), free(x), free(acc);
    return st;
}

// ---- the grid ----

struct grid {
    float   maxq;
    bool    sym;
};

// Scale (f16-exact) and zero of one row's group with extremes lo <= hi.
static void grid_params(const struct grid *g, float lo, float hi, uint16_t *s16, uint8_t *zero) {
    float xmin = fminf(lo, 0.0f), xmax = fmaxf(hi, 0.0f);
    if (g->sym) {
        xmax = fmaxf(-xmin, xmax);
        xmin = -xmax;
    }
    if (xmin == 0.0f && xmax == 0.0f) xmin = -1.0f, xmax = 1.0f;
    float scale = (xmax - xmin) / g->maxq;
    float z;
    if (g->sym) {
        z = (g->maxq + 1.0f) / 2.0f;
    } else {
        z = nearbyintf(-xmin / scale);
        if (z < 1.0f) { // v1 zero - 1 must be >= 0: shift the grid up one step
            scale = xmax / (g->maxq - 1.0f);
            z     = 1.0f;
        }
    }
    uint16_t h = coopt_f32_to_f16(scale);
    if (coopt_f16_to_f32(h) <= 0.0f || !isfinite(coopt_f16_to_f32(h))) h = coopt_f16_to_f32(h) > 0 ? 0x7bffu : 1u;
    if (!g->sym) {
        z = nearbyintf(-xmin / coopt_f16_to_f32(h));
        z = fminf(fmaxf(z, 1.0f), g->maxq);
    }
    *s16  = h;
    *zero = (uint8_t)z;
}

static inline float grid_quant(const struct grid *g, float x, float s, float z, uint8_t *q) {
    float v = nearbyintf(x / s) + z;
    v       = fminf(fmaxf(v, 0.0f), g->maxq);
    *q      = (uint8_t)v;
    return s * (v - z);
}

// ---- GPTQ over tiles of rows ----

struct gptq_job {
    const float  *w;      // [n_out][n_in] original order
    const float  *u;      // [n][n] upper, permuted order; NULL = RTN
    const int32_t *perm;  // [n] position -> original column
    const uint8_t *dead;  // [n] original order, or NULL
    int64_t       n_out, n;
    int32_t       gs, block;
    struct grid   grid;
    struct coopt_quant_result *r;
    double        loss[64]; // per thread
    enum coopt_status st[64];
};

static void gptq_tile(struct gptq_job *j, int64_t o0, int nr, float *wt, float *err, float *scl, float *zer,
                      double *loss) {
    const int64_t n = j->n, n_out = j->n_out;
    const int32_t gs = j->gs;
    for (int r = 0; r < nr; r++) {
        const float *src = j->w + (o0 + r) * n;
        float       *row = wt + (int64_t)r * n;
        for (int64_t i = 0; i < n; i++) {
            int32_t c = j->perm[i];
            row[i]    = (j->dead && j->dead[c]) ? 0.0f : src[c];
        }
    }
    for (int64_t i1 = 0; i1 < n; i1 += j->block) {
        int64_t i2 = COOPT_MIN(i1 + j->block, n);
        for (int64_t i = i1; i < i2; i++) {
            if (i % gs == 0) { // group start: params from the current (updated) columns
                int64_t g = i / gs, e = COOPT_MIN(i + gs, n);
                for (int r = 0; r < nr; r++) {
                    const float *row = wt + (int64_t)r * n;
                    float        lo = row[i], hi = row[i];
                    for (int64_t k = i + 1; k < e; k++) lo = fminf(lo, row[k]), hi = fmaxf(hi, row[k]);
                    uint16_t s16;
                    uint8_t  z;
                    grid_params(&j->grid, lo, hi, &s16, &z);
                    j->r->scale[g * n_out + o0 + r] = s16;
                    j->r->zero[g * n_out + o0 + r]  = z;
                    scl[r]                          = coopt_f16_to_f32(s16);
                    zer[r]                          = z;
                }
            }
            int32_t      c = j->perm[i];
            const float *ui = j->u ? j->u + i * n : NULL;
            float        d  = ui ? ui[i] : 1.0f;
            for (int r = 0; r < nr; r++) {
                float  *row = wt + (int64_t)r * n;
                float   x   = row[i];
                uint8_t q;
                float   dq = grid_quant(&j->grid, x, scl[r], zer[r], &q);
                j->r->q[(o0 + r) * n + c] = q;
                float e = (x - dq) / d;
                *loss += 0.5 * (double)e * (double)e;
                if (!ui) continue;
                err[r * j->block + (i - i1)] = e;
                for (int64_t k = i + 1; k < i2; k++) row[k] -= e * ui[k];
            }
        }
        if (!j->u || i2 == n) continue;
        for (int r = 0; r < nr; r++) { // the block's errors to all later columns
            float       *row = wt + (int64_t)r * n;
            const float *er  = err + r * j->block;
            for (int64_t k = i1; k < i2; k++) {
                float        e  = er[k - i1];
                const float *uk = j->u + k * n;
                for (int64_t c = i2; c < n; c++) row[c] -= e * uk[c];
            }
        }
    }
}

static void gptq_task(void *ctx, int32_t ith, int32_t nth) {
    struct gptq_job *j     = ctx;
    int64_t          tiles = (j->n_out + TILE - 1) / TILE;
    float           *wt    = coopt_malloc((size_t)TILE * (size_t)j->n * sizeof(float));
    float           *err   = coopt_malloc((size_t)TILE * (size_t)j->block * sizeof(float));
    float            scl[TILE], zer[TILE];
    double           loss = 0;
    if (!wt || !err) {
        j->st[ith] = COOPT_ERR_NOMEM;
    } else {
        for (int64_t t = ith; t < tiles; t += nth)
            gptq_tile(j, t * TILE, (int)COOPT_MIN(TILE, j->n_out - t * TILE), wt, err, scl, zer, &loss);
    }
    j->loss[ith] = loss;
    free(wt), free(err);
}

static int cmp_diag_desc(const void *a, const void *b, void *ud) {
    const double *d = ud;
    int32_t       i = *(const int32_t *)a, k = *(const int32_t *)b;
    if (d[i] != d[k]) return d[i] > d[k] ? -1 : 1;
    return (i > k) - (i < k); // stable
}

enum coopt_status coopt_quant_gptq(const float *w, const double *h, int64_t n_out, int64_t n_in,
                                   const struct coopt_quant_params *p, struct coopt_threadpool *tp,
                                   struct coopt_quant_result *r) {
    *r               = (struct coopt_quant_result){0};
    const char *name = p->name ? p->name : "layer";
    if (p->bits < 2 || p->bits > 8)
        return coopt_fail(COOPT_ERR_INVALID, "%s: %d-bit quantization is not supported (2..8)", name, p->bits);
    if (p->group_size == 0 || p->group_size < -1)
        return coopt_fail(COOPT_ERR_INVALID, "%s: group size %d (expected > 0 or -1)", name, p->group_size);
    if (p->act_order && !h)
        return coopt_fail(COOPT_ERR_INVALID, "%s: act-order needs calibration statistics (GPTQ)", name);
    if (!(p->damp >= 0) || n_in <= 0 || n_out <= 0)
        return coopt_fail(COOPT_ERR_INVALID, "%s: bad shape [%lld,%lld] or dampening %g", name, (long long)n_out,
                          (long long)n_in, p->damp);
    const int64_t n  = n_in;
    int32_t       gs = p->group_size == -1 || p->group_size >= n ? (int32_t)n : p->group_size;
    int32_t       block = p->block_size > 0 ? p->block_size : 128;
    block = gs >= block ? gs : block / gs * gs; // groups never straddle blocks
    r->n_in = n_in, r->n_out = n_out, r->group_size = p->group_size, r->bits = p->bits;
    r->n_groups = (int32_t)((n + gs - 1) / gs);

    enum coopt_status st   = COOPT_OK;
    int32_t          *perm = coopt_malloc((size_t)n * sizeof(int32_t));
    uint8_t          *dead = h ? coopt_calloc((size_t)n, 1) : NULL;
    double           *hp   = h ? coopt_malloc((size_t)n * (size_t)n * sizeof(double)) : NULL;
    float            *u    = h ? coopt_malloc((size_t)n * (size_t)n * sizeof(float)) : NULL;
    double           *diag = h ? coopt_malloc((size_t)n * sizeof(double)) : NULL;
    r->q     = coopt_malloc((size_t)n_out * (size_t)n);
    r->scale = coopt_malloc((size_t)r->n_groups * (size_t)n_out * sizeof(uint16_t));
    r->zero  = coopt_malloc((size_t)r->n_groups * (size_t)n_out);
    r->g_idx = coopt_malloc((size_t)n * sizeof(int32_t));
    if (!perm || !r->q || !r->scale || !r->zero || !r->g_idx || (h && (!dead || !hp || !u || !diag))) {
        st = COOPT_ERR_NOMEM;
        goto done;
    }
    for (int64_t i = 0; i < n; i++) perm[i] = (int32_t)i;
    if (h) {
        for (int64_t i = 0; i < n; i++) {
            diag[i] = h[i * n + i];
            if (!isfinite(diag[i])) {
                st = coopt_fail(COOPT_ERR_FORMAT, "%s: Hessian has a non-finite diagonal at %lld", name, (long long)i);
                goto done;
            }
            if (diag[i] == 0) dead[i] = 1, diag[i] = 1;
        }
        if (p->act_order) qsort_r(perm, (size_t)n, sizeof(int32_t), cmp_diag_desc, diag);
        for (int64_t i = 0; i < n; i++) {
            for (int64_t k = 0; k < n; k++) {
                int32_t a = perm[i], b = perm[k];
                hp[i * n + k] = a == b ? diag[a] : ((dead[a] || dead[b]) ? 0.0 : h[(int64_t)a * n + b]);
            }
        }
        if ((st = hinv_factor(hp, n, p, u, &r->damp_used)) != COOPT_OK) goto done;
    }
    for (int64_t i = 0; i < n; i++) r->g_idx[perm[i]] = (int32_t)(i / gs);

    struct gptq_job *job = coopt_calloc(1, sizeof(*job));
    if (!job) {
        st = COOPT_ERR_NOMEM;
        goto done;
    }
    *job = (struct gptq_job){.w = w, .u = u, .perm = perm, .dead = dead, .n_out = n_out, .n = n, .gs = gs,
                             .block = block, .grid = {.maxq = (float)((1 << p->bits) - 1), .sym = p->sym}, .r = r};
    int32_t nth = tp ? COOPT_MIN(coopt_threadpool_n_threads(tp), 64) : 1;
    if (tp && nth > 1 && coopt_threadpool_n_threads(tp) <= 64) coopt_threadpool_run(tp, gptq_task, job);
    else gptq_task(job, 0, 1), nth = 1;
    for (int32_t t = 0; t < nth; t++) {
        r->loss += job->loss[t];
        if (job->st[t] != COOPT_OK) st = job->st[t];
    }
    free(job);
done:
    free(perm), free(dead), free(hp), free(u), free(diag);
    if (st != COOPT_OK) coopt_quant_result_free(r);
    return st;
}

void coopt_quant_dequant(const struct coopt_quant_result *r, float *out) {
    for (int64_t o = 0; o < r->n_out; o++) {
        for (int64_t i = 0; i < r->n_in; i++) {
            int64_t g = (int64_t)r->g_idx[i] * r->n_out + o;
            out[o * r->n_in + i] = coopt_f16_to_f32(r->scale[g]) * ((float)r->q[o * r->n_in + i] - (float)r->zero[g]);
        }
    }
}

double coopt_quant_proxy_loss(const float *w, const float *wq, const double *h, int64_t n_out, int64_t n_in) {
    double *d    = coopt_malloc((size_t)n_in * sizeof(double));
    double  loss = 0;
    if (!d) return NAN;
    for (int64_t o = 0; o < n_out; o++) {
        for (int64_t i = 0; i < n_in; i++) d[i] = (double)w[o * n_in + i] - (double)wq[o * n_in + i];
        for (int64_t i = 0; i < n_in; i++) {
            double s = 0;
            for (int64_t k = 0; k < n_in; k++) s += h[i * n_in + k] * d[k];
            loss += d[i] * s;
        }
    }
    free(d);
    return loss;
}

// ---- calibration Hessian ----

#define HB_ROWS 16  // rows of sum per tile
#define HB_COLS 512 // columns of sum per tile

struct hess_job {
    double      *sum;
    int64_t      n;
    const float *x;
    int32_t      n_rows;
};

static void hess_task(void *ctx, int32_t ith, int32_t nth) {
    struct hess_job *j = ctx;
    const int64_t    n = j->n;
    float            acc[HB_ROWS][HB_COLS];
    int64_t          n_blk = (n + HB_ROWS - 1) / HB_ROWS;
    for (int64_t b = ith; b < n_blk; b += nth) { // interleaved: the triangle's rows shrink
        int64_t i0 = b * HB_ROWS, ni = COOPT_MIN(HB_ROWS, n - i0);
        for (int64_t j0 = i0; j0 < n; j0 += HB_COLS) {
            int64_t nj = COOPT_MIN(HB_COLS, n - j0);
            for (int64_t a = 0; a < ni; a++) memset(acc[a], 0, (size_t)nj * sizeof(float));
            for (int32_t r = 0; r < j->n_rows; r++) {
                const float *xr = j->x + (int64_t)r * n;
                for (int64_t a = 0; a < ni; a++) {
                    float v = xr[i0 + a];
                    if (v == 0.0f) continue;
                    float       *ac = acc[a];
                    const float *xj = xr + j0;
                    for (int64_t c = 0; c < nj; c++) ac[c] += v * xj[c];
                }
            }
            for (int64_t a = 0; a < ni; a++) {
                double *row = j->sum + (i0 + a) * n;
                for (int64_t c = COOPT_MAX(0, i0 + a - j0); c < nj; c++) row[j0 + c] += acc[a][c];
            }
        }
    }
}

void coopt_quant_hessian_add(double *sum, int64_t n, const float *x, int32_t n_rows, struct coopt_threadpool *tp) {
    struct hess_job j = {.sum = sum, .n = n, .x = x, .n_rows = n_rows};
    // f32 accumulation over at most 256 rows at a time, then into double
    for (int32_t r0 = 0; r0 < n_rows; r0 += 256) {
        j.x      = x + (int64_t)r0 * n;
        j.n_rows = COOPT_MIN(256, n_rows - r0);
        if (tp) coopt_threadpool_run(tp, hess_task, &j);
        else hess_task(&j, 0, 1);
    }
}

void coopt_quant_hessian_finish(double *sum, int64_t n, int64_t n_tokens) {
    double f = n_tokens > 0 ? 2.0 / (double)n_tokens : 0.0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t k = i; k < n; k++) {
            double v        = sum[i * n + k] * f;
            sum[i * n + k] = v;
            sum[k * n + i] = v;
        }
    }
}

// ---- packing ----

enum coopt_status coopt_quant_pack(const struct coopt_quant_result *r, const char *name, int32_t *qweight,
                                   int32_t *qzeros, uint16_t *scales, int32_t *g_idx) {
    const int64_t n_in = r->n_in, n_out = r->n_out;
    if (r->bits != 4)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: the GPTQ writer packs 4-bit weights only (got %d bits)",
                          name ? name : "layer", r->bits);
    if (n_in % 8 || n_out % 8)
        return coopt_fail(COOPT_ERR_UNSUPPORTED,
                          "%s: shape [%lld,%lld] cannot be packed as GPTQ (in and out must be multiples of 8)",
                          name ? name : "layer", (long long)n_out, (long long)n_in);
    for (int64_t k = 0; k < n_in / 8; k++) {
        for (int64_t o = 0; o < n_out; o++) {
            uint32_t v = 0;
            for (int b = 0; b < 8; b++) v |= (uint32_t)(r->q[o * n_in + 8 * k + b] & 15u) << (4 * b);
            qweight[k * n_out + o] = (int32_t)v;
        }
    }
    for (int64_t g = 0; g < r->n_groups; g++) {
        for (int64_t c = 0; c < n_out / 8; c++) {
            uint32_t v = 0;
            for (int b = 0; b < 8; b++) v |= (uint32_t)((r->zero[g * n_out + 8 * c + b] - 1) & 15) << (4 * b);
            qzeros[g * (n_out / 8) + c] = (int32_t)v;
        }
    }
    memcpy(scales, r->scale, (size_t)r->n_groups * (size_t)n_out * sizeof(uint16_t));
    memcpy(g_idx, r->g_idx, (size_t)n_in * sizeof(int32_t));
    return COOPT_OK;
}

// ==================================================================================================
// ---- whole model: calibration through the forward hook, sequential quantization, checkpoint ----
// ==================================================================================================


struct coopt_quantize_opts coopt_quantize_default_opts(void) {
    return (struct coopt_quantize_opts){.qp = coopt_quant_default_params(), .gptq = true,
                                        .sequential = COOPT_QUANT_SEQ_LAYER, .n_calib = 128, .calib_len = 512};
}

#define N_LIN 7
static const struct {
    const char *name;  // Hugging Face module under model.layers.N.
    size_t      off;   // the weight in struct coopt_layer
    int         which; // the forward hook's input index (forward.h)
} k_lin[N_LIN] = {
    {"self_attn.q_proj", offsetof(struct coopt_layer, wq), 0},
    {"self_attn.k_proj", offsetof(struct coopt_layer, wk), 0},
    {"self_attn.v_proj", offsetof(struct coopt_layer, wv), 0},
    {"self_attn.o_proj", offsetof(struct coopt_layer, wo), 1},
    {"mlp.gate_proj", offsetof(struct coopt_layer, w_gate), 2},
    {"mlp.up_proj", offsetof(struct coopt_layer, w_up), 2},
    {"mlp.down_proj", offsetof(struct coopt_layer, w_down), 3},
};

static struct coopt_weight *lin_weight(struct coopt_model *m, int32_t l, int k) {
    return (struct coopt_weight *)((char *)&m->layers[l] + k_lin[k].off);
}

// Hessian sums collected by the forward hook.
struct calib {
    int32_t                  layer; // collect this layer only (-1: all layers)
    unsigned                 mask;  // bit w: collect hook input `which` = w
    double                 **sum;   // [n_layers * 4] upper-triangle sums of x^T x, NULL until seen
    int64_t                 *n_tok; // [n_layers * 4]
    int64_t                 *n_in;  // [n_layers * 4]
    struct coopt_threadpool *tp;
    bool                     nomem;
};

static void calib_hook(void *ud, int32_t layer, int32_t which, const float *x, int32_t n_rows, int32_t n_in) {
    struct calib *c = ud;
    if ((c->layer >= 0 && layer != c->layer) || !(c->mask & (1u << which)) || c->nomem) return;
    int32_t idx = layer * 4 + which;
    if (!c->sum[idx]) {
        c->sum[idx] = coopt_calloc((size_t)n_in * (size_t)n_in, sizeof(double));
        if (!c->sum[idx]) {
            c->nomem = true;
            return;
        }
        c->n_in[idx] = n_in;
    }
    coopt_quant_hessian_add(c->sum[idx], n_in, x, n_rows, c->tp);
    c->n_tok[idx] += n_rows;
}

// Runs every calibration chunk through the first n_run layers (the rest of the model is skipped
// by lowering config.n_layers for the pass: layer l's inputs do not depend on later layers).
static enum coopt_status calib_pass(struct coopt_ctx *ctx, struct coopt_model *m, int32_t n_run, const int32_t *chunks,
                                    int32_t n_chunks, int32_t len, int32_t per_call, struct calib *c) {
    int32_t *seqs = coopt_malloc((size_t)per_call * (size_t)len * sizeof(int32_t));
    int32_t  ids[64];
    if (!seqs) return COOPT_ERR_NOMEM;
    int32_t           saved = m->config.n_layers;
    enum coopt_status st    = COOPT_OK;
    m->config.n_layers      = n_run;
    for (int32_t c0 = 0; c0 < n_chunks && st == COOPT_OK; c0 += per_call) {
        int32_t k = COOPT_MIN(per_call, n_chunks - c0), made = 0;
        for (; made < k; made++) {
            if ((st = coopt_seq_new(ctx, &ids[made])) != COOPT_OK) break;
            for (int32_t t = 0; t < len; t++) seqs[made * len + t] = ids[made];
        }
        if (st == COOPT_OK) {
            struct coopt_batch_input b = {.n_tokens = k * len, .tokens = chunks + (int64_t)c0 * len, .seq_ids = seqs};
            st = coopt_ctx_decode(ctx, &b);
        }
        for (int32_t i = 0; i < made; i++) coopt_seq_free(ctx, ids[i]);
        if (c->nomem) st = COOPT_ERR_NOMEM;
    }
    m->config.n_layers = saved;
    free(seqs);
    return st;
}

// Tokenizes the calibration files into n_chunks sequences of len tokens, each starting with BOS
// (when the tokenizer has one), taken consecutively from the concatenated text.
static enum coopt_status calib_tokens(const struct coopt_tokenizer *tok, const struct coopt_quantize_opts *o,
                                      int32_t **out, int32_t *n_chunks) {
    *out = NULL, *n_chunks = 0;
    int32_t *all = NULL;
    size_t   n_all = 0;
    for (int f = 0; f < o->n_calib_files; f++) {
        char  *text;
        size_t len;
        enum coopt_status st = coopt_read_file(o->calib_files[f], &text, &len);
        if (st != COOPT_OK) {
            free(all);
            return st;
        }
        int32_t *ids;
        size_t   n;
        st = coopt_tokenize(tok, text, len, 0, &ids, &n);
        free(text);
        if (st != COOPT_OK) {
            free(all);
            return st;
        }
        int32_t *grown = coopt_realloc(all, (n_all + n + 1) * sizeof(int32_t));
        if (!grown) {
            free(ids), free(all);
            return COOPT_ERR_NOMEM;
        }
        all = grown;
        memcpy(all + n_all, ids, n * sizeof(int32_t));
        n_all += n;
        free(ids);
    }
    int32_t bos = coopt_tokenizer_bos(tok), len = o->calib_len, body = bos >= 0 ? len - 1 : len;
    int64_t avail = body > 0 ? (int64_t)(n_all / (size_t)body) : 0;
    if (avail < 1) {
        free(all);
        return coopt_fail(COOPT_ERR_INVALID, "calibration text has %zu tokens, need at least %d (--calib-len)", n_all,
                          body);
    }
    int32_t n = (int32_t)COOPT_MIN(avail, (int64_t)o->n_calib);
    if (n < o->n_calib)
        coopt_log_info("calibration text holds %d sequences of %d tokens (%d requested)", n, len, o->n_calib);
    int32_t *ch = coopt_malloc((size_t)n * (size_t)len * sizeof(int32_t));
    if (!ch) {
        free(all);
        return COOPT_ERR_NOMEM;
    }
    for (int32_t c = 0; c < n; c++) {
        int32_t *dst = ch + (int64_t)c * len;
        if (bos >= 0) *dst++ = bos;
        memcpy(dst, all + (int64_t)c * body, (size_t)body * sizeof(int32_t));
    }
    free(all);
    *out = ch, *n_chunks = n;
    return COOPT_OK;
}

static int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

// A GGUF / llama2.c model ships the tokenizer of o->tokenizer_dir: it must encode like the model's.
static enum coopt_status check_tokenizer(const struct coopt_model *m, const struct coopt_quantize_opts *o) {
    struct coopt_tokenizer       *tok;
    const struct coopt_tokenizer *own = coopt_model_tokenizer(m);
    enum coopt_status             st  = coopt_tokenizer_load(o->tokenizer_dir, &tok);
    if (st != COOPT_OK) return st;
    char  *text = NULL;
    size_t len  = 0;
    static const char sample[] = "Once upon a time, there was a little girl named Lily. She loved to play outside "
                                 "in the park. \"Look!\" she said, 123 times.\n";
    if (o->n_calib_files > 0 && coopt_read_file(o->calib_files[0], &text, &len) == COOPT_OK && len > 16384) len = 16384;
    bool same = coopt_tokenizer_n_vocab(tok) == coopt_tokenizer_n_vocab(own) &&
                coopt_tokenizer_bos(tok) == coopt_tokenizer_bos(own) &&
                coopt_tokenizer_eos(tok) == coopt_tokenizer_eos(own);
    for (int pass = 0; pass < 2 && same; pass++) {
        const char *s = pass ? text : sample;
        size_t      n = pass ? len : sizeof(sample) - 1;
        if (!s) continue;
        // stop at a line break so a cut UTF-8 character cannot matter
        while (pass && n > 0 && s[n - 1] != '\n') n--;
        int32_t *a = NULL, *b = NULL;
        size_t   na = 0, nb = 0;
        same = coopt_tokenize(tok, s, n, COOPT_TOKENIZE_ADD_BOS, &a, &na) == COOPT_OK &&
               coopt_tokenize(own, s, n, COOPT_TOKENIZE_ADD_BOS, &b, &nb) == COOPT_OK && na == nb &&
               !memcmp(a, b, na * sizeof(int32_t));
        free(a), free(b);
    }
    free(text);
    coopt_tokenizer_free(tok);
    if (!same)
        return coopt_fail(COOPT_ERR_INVALID, "%s: its tokenizer does not encode like the model's own vocabulary",
                          o->tokenizer_dir);
    return COOPT_OK;
}

// HF rotate-half row order from interleaved-pair rows, per head of hd rows:
// HF row s*hd/2 + i = interleaved row 2i + s (the inverse of llama.cpp's HF -> GGUF permute).
static enum coopt_status result_rows_to_half(const struct coopt_quant_result *r, int32_t hd,
                                             struct coopt_quant_result *out) {
    const int64_t in = r->n_in, n_out = r->n_out, G = r->n_groups;
    *out = *r;
    out->q = coopt_malloc((size_t)(n_out * in)), out->scale = coopt_malloc((size_t)(G * n_out) * 2);
    out->zero = coopt_malloc((size_t)(G * n_out)), out->g_idx = coopt_malloc((size_t)in * 4);
    if (!out->q || !out->scale || !out->zero || !out->g_idx) {
        coopt_quant_result_free(out);
        return COOPT_ERR_NOMEM;
    }
    memcpy(out->g_idx, r->g_idx, (size_t)in * 4);
    for (int64_t o = 0; o < n_out; o++) {
        int64_t h = o / hd, j = o % hd, s = j / (hd / 2), i = j % (hd / 2), src = h * hd + 2 * i + s;
        memcpy(out->q + o * in, r->q + src * in, (size_t)in);
        for (int64_t g = 0; g < G; g++) {
            out->scale[g * n_out + o] = r->scale[g * n_out + src];
            out->zero[g * n_out + o]  = r->zero[g * n_out + src];
        }
    }
    return COOPT_OK;
}

// ---- checkpoint writing ----

struct owned {
    void **p;
    int    n, cap;
};

static void *own(struct owned *o, void *p) {
    if (!p) return NULL;
    if (o->n == o->cap) {
        int    cap = o->cap ? o->cap * 2 : 64;
        void **g   = coopt_realloc(o->p, (size_t)cap * sizeof(void *));
        if (!g) {
            free(p);
            return NULL;
        }
        o->p = g, o->cap = cap;
    }
    return o->p[o->n++] = p;
}

static void owned_free(struct owned *o) {
    for (int i = 0; i < o->n; i++) free(o->p[i]);
    free(o->p);
}

// An f16 copy of a weight or an f32 vector (rows of n_in values).
static uint16_t *to_f16(struct owned *ow, enum coopt_dtype t, const void *src, int64_t n_rows, int64_t n_in) {
    uint16_t *out = own(ow, coopt_malloc((size_t)n_rows * (size_t)n_in * sizeof(uint16_t)));
    float    *row = coopt_malloc((size_t)n_in * sizeof(float));
    if (!out || !row) {
        free(row);
        return NULL;
    }
    size_t rb = coopt_dtype_row_bytes(t, n_in);
    for (int64_t r = 0; r < n_rows; r++) {
        coopt_dequant_row(t, (const char *)src + (size_t)r * rb, row, n_in);
        for (int64_t i = 0; i < n_in; i++) out[r * n_in + i] = coopt_f32_to_f16(row[i]);
    }
    free(row);
    return out;
}

static enum coopt_status add_f16(struct coopt_st_writer *w, struct owned *ow, const char *name, enum coopt_dtype t,
                                 const void *src, int64_t n_rows, int64_t n_in, int n_dims) {
    uint16_t *h = to_f16(ow, t, src, n_rows, n_in);
    if (!h) return COOPT_ERR_NOMEM;
    int64_t shape[2] = {n_rows, n_in};
    if (n_dims == 1) shape[0] = n_in;
    return coopt_st_writer_add(w, name, COOPT_DTYPE_F16, n_dims, shape, h);
}

static enum coopt_status write_text(const char *dir, const char *name, const char *text) {
    char path[4096];
    if (!coopt_path_join(path, sizeof(path), dir, name)) return coopt_fail(COOPT_ERR_IO, "%s: path too long", dir);
    FILE *f = fopen(path, "wb");
    if (!f) return coopt_fail(COOPT_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    size_t n  = strlen(text);
    bool   ok = fwrite(text, 1, n, f) == n;
    ok        = (fclose(f) == 0) && ok;
    return ok ? COOPT_OK : coopt_fail(COOPT_ERR_IO, "%s: write failed", path);
}

static enum coopt_status write_json(const char *dir, const char *name, const cJSON *j) {
    char *text = cJSON_Print(j);
    if (!text) return COOPT_ERR_NOMEM;
    size_t n   = strlen(text);
    char  *nl  = coopt_realloc(text, n + 2);
    if (!nl) {
        free(text);
        return COOPT_ERR_NOMEM;
    }
    nl[n] = '\n', nl[n + 1] = 0;
    enum coopt_status st = write_text(dir, name, nl);
    free(nl);
    return st;
}

// The GPTQ parameters as AutoGPTQ / transformers spell them (quantize_config.json and
// config.json's quantization_config).
static cJSON *gptq_config_json(const struct coopt_quantize_opts *o, int32_t n_calib, bool with_meta) {
    cJSON *q = cJSON_CreateObject();
    if (!q) return NULL;
    cJSON_AddNumberToObject(q, "bits", o->qp.bits);
    cJSON_AddNumberToObject(q, "group_size", o->qp.group_size);
    cJSON_AddNumberToObject(q, "damp_percent", o->qp.damp);
    cJSON_AddBoolToObject(q, "desc_act", o->qp.act_order);
    cJSON_AddBoolToObject(q, "static_groups", false);
    cJSON_AddBoolToObject(q, "sym", o->qp.sym);
    cJSON_AddBoolToObject(q, "true_sequential", o->gptq && o->sequential == COOPT_QUANT_SEQ_TRUE);
    cJSON_AddStringToObject(q, "quant_method", "gptq");
    cJSON_AddStringToObject(q, "checkpoint_format", "gptq");
    if (with_meta) {
        cJSON *meta = cJSON_AddObjectToObject(q, "meta");
        if (meta) {
            cJSON *qz = cJSON_AddArrayToObject(meta, "quantizer");
            if (qz) cJSON_AddItemToArray(qz, cJSON_CreateString("coopt"));
            cJSON_AddStringToObject(meta, "method", o->gptq ? "gptq" : "rtn");
            static const char *seq[] = {"none", "layer", "true"};
            cJSON_AddStringToObject(meta, "sequential", o->gptq ? seq[o->sequential] : "none");
            cJSON_AddNumberToObject(meta, "calib_samples", o->gptq ? n_calib : 0);
            cJSON_AddNumberToObject(meta, "calib_len", o->gptq ? o->calib_len : 0);
        }
    }
    return q;
}


static enum coopt_status write_configs(const char *in_dir, const char *out_dir, const struct coopt_model *m,
                                       const struct coopt_quantize_opts *o, int32_t n_calib) {
    char path[4096];
    if (!coopt_path_join(path, sizeof(path), in_dir, "config.json")) return COOPT_ERR_IO;
    char             *text;
    size_t            len;
    cJSON            *root = NULL, *q = NULL, *qc = NULL;
    enum coopt_status st   = COOPT_OK;
    if (o->tokenizer_dir && !coopt_path_exists(path)) {
        if (!(root = coopt_hf_config_from_model(m))) return COOPT_ERR_NOMEM;
    } else {
        if ((st = coopt_read_file(path, &text, &len)) != COOPT_OK) return st;
        st = coopt_json_parse(text, len, path, &root);
        free(text);
        if (st != COOPT_OK) return st;
    }
    if (!cJSON_IsObject(root)) {
        st = coopt_fail(COOPT_ERR_FORMAT, "%s: not a JSON object", path);
        goto done;
    }
    q  = gptq_config_json(o, n_calib, true);
    qc = gptq_config_json(o, n_calib, false);
    if (!q || !qc) {
        st = COOPT_ERR_NOMEM;
        goto done;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "quantization_config");
    cJSON_AddItemToObject(root, "quantization_config", q);
    q = NULL;
    cJSON_DeleteItemFromObjectCaseSensitive(root, "torch_dtype");
    cJSON_AddStringToObject(root, "torch_dtype", "float16");
    if (m->config.ffn_dim % 8) {
        cJSON_DeleteItemFromObjectCaseSensitive(root, "intermediate_size");
        cJSON_AddNumberToObject(root, "intermediate_size", (double)pad8(m->config.ffn_dim));
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "tie_word_embeddings");
    cJSON_AddBoolToObject(root, "tie_word_embeddings", m->config.tied_embeddings);
    cJSON_AddStringToObject(qc, "model_file_base_name", "model");
    if ((st = write_json(out_dir, "config.json", root)) != COOPT_OK) goto done;
    st = write_json(out_dir, "quantize_config.json", qc);
done:
    cJSON_Delete(root), cJSON_Delete(q), cJSON_Delete(qc);
    return st;
}

static enum coopt_status copy_tokenizer_files(const char *in_dir, const char *out_dir) {
    static const char *files[] = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                  "special_tokens_map.json", "added_tokens.json", "generation_config.json"};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(files); i++) {
        char src[4096], dst[4096];
        if (!coopt_path_join(src, sizeof(src), in_dir, files[i]) || !coopt_path_exists(src)) continue;
        char             *data;
        size_t            len;
        enum coopt_status st = coopt_read_file(src, &data, &len);
        if (st != COOPT_OK) return st;
        FILE *f  = coopt_path_join(dst, sizeof(dst), out_dir, files[i]) ? fopen(dst, "wb") : NULL;
        bool  ok = f && fwrite(data, 1, len, f) == len;
        if (f) ok = (fclose(f) == 0) && ok;
        free(data);
        if (!ok) return coopt_fail(COOPT_ERR_IO, "%s/%s: cannot write", out_dir, files[i]);
    }
    return COOPT_OK;
}

static enum coopt_status write_checkpoint(const char *in_dir, const char *out_dir, const struct coopt_model *m,
                                          const struct coopt_quant_result *res, const struct coopt_quantize_opts *o,
                                          int32_t n_calib) {
    struct owned            ow = {0};
    struct coopt_st_writer *w  = NULL;
    enum coopt_status       st;
    const int64_t           dim = m->config.dim;
    char                    name[320], path[4096];
    if ((st = coopt_st_writer_init(&w)) != COOPT_OK) return st;
    if ((st = coopt_st_writer_meta(w, "format", "pt")) != COOPT_OK) goto done;
    if ((st = add_f16(w, &ow, "model.embed_tokens.weight", m->tok_embd.dtype, m->tok_embd.data, m->tok_embd.n_out,
                      m->tok_embd.n_in, 2)) != COOPT_OK)
        goto done;
    if (!m->config.tied_embeddings &&
        (st = add_f16(w, &ow, "lm_head.weight", m->output.dtype, m->output.data, m->output.n_out, m->output.n_in, 2)))
        goto done;
    if ((st = add_f16(w, &ow, "model.norm.weight", COOPT_DTYPE_F32, m->out_norm, 1, dim, 1)) != COOPT_OK) goto done;
    for (int32_t l = 0; l < m->config.n_layers; l++) {
        const struct coopt_layer *L = &m->layers[l];
        snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight", l);
        if ((st = add_f16(w, &ow, name, COOPT_DTYPE_F32, L->attn_norm, 1, dim, 1)) != COOPT_OK) goto done;
        snprintf(name, sizeof(name), "model.layers.%d.post_attention_layernorm.weight", l);
        if ((st = add_f16(w, &ow, name, COOPT_DTYPE_F32, L->ffn_norm, 1, dim, 1)) != COOPT_OK) goto done;
        for (int k = 0; k < N_LIN; k++) {
            const struct coopt_quant_result *r = &res[l * N_LIN + k];
            const struct coopt_weight *lw = (const struct coopt_weight *)((const char *)L + k_lin[k].off);
            int64_t in = r->n_in, out = r->n_out, G = r->n_groups;
            int32_t  *qw = own(&ow, coopt_malloc((size_t)(in / 8 * out) * 4));
            int32_t  *qz = own(&ow, coopt_malloc((size_t)(G * out / 8) * 4));
            uint16_t *sc = own(&ow, coopt_malloc((size_t)(G * out) * 2));
            int32_t  *gi = own(&ow, coopt_malloc((size_t)in * 4));
            if (!qw || !qz || !sc || !gi) {
                st = COOPT_ERR_NOMEM;
                goto done;
            }
            snprintf(name, sizeof(name), "model.layers.%d.%s", l, k_lin[k].name);
            if (k <= 1 && m->config.rope_layout == COOPT_ROPE_INTERLEAVED) {
                struct coopt_quant_result half;
                if ((st = result_rows_to_half(r, m->config.head_dim, &half)) != COOPT_OK) goto done;
                st = coopt_quant_pack(&half, name, qw, qz, sc, gi);
                coopt_quant_result_free(&half);
            } else {
                st = coopt_quant_pack(r, name, qw, qz, sc, gi);
            }
            if (st != COOPT_OK) goto done;
            struct {
                const char      *suffix;
                enum coopt_dtype t;
                int              n_dims;
                int64_t          shape[2];
                const void      *data;
            } parts[] = {
                {"qweight", COOPT_DTYPE_I32, 2, {in / 8, out}, qw},
                {"qzeros", COOPT_DTYPE_I32, 2, {G, out / 8}, qz},
                {"scales", COOPT_DTYPE_F16, 2, {G, out}, sc},
                {"g_idx", COOPT_DTYPE_I32, 1, {in, 0}, gi},
            };
            for (size_t p = 0; p < COOPT_ARRAY_LEN(parts); p++) {
                char tn[352];
                snprintf(tn, sizeof(tn), "%s.%s", name, parts[p].suffix);
                if ((st = coopt_st_writer_add(w, tn, parts[p].t, parts[p].n_dims, parts[p].shape, parts[p].data)))
                    goto done;
            }
            if (lw->bias) {
                char tn[352];
                snprintf(tn, sizeof(tn), "%s.bias", name);
                if ((st = add_f16(w, &ow, tn, COOPT_DTYPE_F32, lw->bias, 1, out, 1)) != COOPT_OK) goto done;
            }
        }
    }
    if (!coopt_path_join(path, sizeof(path), out_dir, COOPT_ST_SINGLE_NAME)) {
        st = coopt_fail(COOPT_ERR_IO, "%s: path too long", out_dir);
        goto done;
    }
    if ((st = coopt_st_writer_write(w, path)) != COOPT_OK) goto done;
    if ((st = write_configs(in_dir, out_dir, m, o, n_calib)) != COOPT_OK) goto done;
    st = copy_tokenizer_files(o->tokenizer_dir && !coopt_path_is_dir(in_dir) ? o->tokenizer_dir : in_dir, out_dir);
done:
    coopt_st_writer_free(w);
    owned_free(&ow);
    return st;
}

// The dequantized f32 weights in the checkpoint's layout (rotate-half Q/K rows, padded
// intermediate size), for scripts/check_gptq_checkpoint.py.
static enum coopt_status write_dequant(const char *path, const struct coopt_model *m,
                                       const struct coopt_quant_result *res) {
    struct coopt_st_writer *w;
    struct owned            ow = {0};
    enum coopt_status       st = coopt_st_writer_init(&w);
    if (st != COOPT_OK) return st;
    for (int32_t l = 0; l < m->config.n_layers && st == COOPT_OK; l++) {
        for (int k = 0; k < N_LIN && st == COOPT_OK; k++) {
            const struct coopt_quant_result *r = &res[l * N_LIN + k];
            struct coopt_quant_result        half = {0};
            if (k <= 1 && m->config.rope_layout == COOPT_ROPE_INTERLEAVED) {
                if ((st = result_rows_to_half(r, m->config.head_dim, &half)) != COOPT_OK) break;
                r = &half;
            }
            float *d = own(&ow, coopt_malloc((size_t)(r->n_in * r->n_out) * sizeof(float)));
            if (d) coopt_quant_dequant(r, d);
            char    name[320];
            int64_t shape[2] = {r->n_out, r->n_in};
            snprintf(name, sizeof(name), "model.layers.%d.%s.weight", l, k_lin[k].name);
            st = d ? coopt_st_writer_add(w, name, COOPT_DTYPE_F32, 2, shape, d) : COOPT_ERR_NOMEM;
            coopt_quant_result_free(&half);
        }
    }
    if (st == COOPT_OK) st = coopt_st_writer_write(w, path);
    coopt_st_writer_free(w);
    owned_free(&ow);
    return st;
}

// ---- the driver ----

static enum coopt_status check_opts(const char *in_dir, const struct coopt_quantize_opts *o, bool *hf) {
    char cfg[4096];
    *hf = coopt_path_is_dir(in_dir) && coopt_path_join(cfg, sizeof(cfg), in_dir, "config.json") &&
          coopt_path_exists(cfg);
    if (!*hf && !o->tokenizer_dir)
        return coopt_fail(COOPT_ERR_UNSUPPORTED,
                          "%s: not a Hugging Face model directory; a GGUF or llama2.c input needs --tokenizer-dir DIR "
                          "(a Hugging Face directory whose tokenizer files match the model's vocabulary) so the "
                          "checkpoint ships a tokenizer",
                          in_dir);
    if (o->qp.bits != 4)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "--bits %d: the GPTQ checkpoint writer supports 4 bits", o->qp.bits);
    if (o->qp.group_size == 0 || o->qp.group_size < -1)
        return coopt_fail(COOPT_ERR_INVALID, "--group-size %d: expected a positive size or -1", o->qp.group_size);
    if (o->qp.act_order && !o->gptq)
        return coopt_fail(COOPT_ERR_INVALID, "--act-order needs calibration statistics: use --method gptq");
    if (!(o->qp.damp >= 0 && o->qp.damp < 1))
        return coopt_fail(COOPT_ERR_INVALID, "--damp %g: expected a value in [0, 1)", o->qp.damp);
    if (o->gptq && (o->n_calib_files < 1 || o->n_calib < 1 || o->calib_len < 2))
        return coopt_fail(COOPT_ERR_INVALID, "GPTQ needs calibration text (--calib FILE), --n-calib >= 1 and "
                                             "--calib-len >= 2");
    return COOPT_OK;
}

enum coopt_status coopt_quantize_model(const char *in_dir, const char *out_dir, const struct coopt_quantize_opts *o) {
    bool              hf;
    enum coopt_status st = check_opts(in_dir, o, &hf);
    if (st != COOPT_OK) return st;
    struct coopt_model      *m     = NULL;
    struct coopt_ctx        *ctx   = NULL;
    struct coopt_threadpool *tp    = NULL;
    struct coopt_quant_result *res = NULL;
    float                  **deq   = NULL;
    int32_t                 *chunks = NULL, n_chunks = 0;
    struct calib             cal   = {0};
    int32_t                  L     = 0;
    struct coopt_model_params mp   = coopt_model_default_params();
    mp.n_threads                   = o->n_threads;
    if ((st = coopt_model_load(in_dir, &mp, &m)) != COOPT_OK) return st;
    L = m->config.n_layers;
    for (int32_t l = 0; l < L; l++) {
        for (int k = 0; k < N_LIN; k++) {
            const struct coopt_weight *lw = lin_weight(m, l, k);
            if (lw->dtype == COOPT_DTYPE_Q4_GPTQ) {
                st = coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: the model is already GPTQ-quantized", in_dir);
                goto done;
            }
            // only the intermediate size can be padded (see quantize.h)
            bool ffn_in = k == 6, ffn_out = k == 4 || k == 5;
            if ((!ffn_in && lw->n_in % 8) || (!ffn_out && lw->n_out % 8)) {
                st = coopt_fail(COOPT_ERR_UNSUPPORTED,
                                "%s: model.layers.%d.%s has shape [%lld,%lld]; GPTQ packing needs hidden and "
                                "attention sizes that are multiples of 8",
                                in_dir, l, k_lin[k].name, (long long)lw->n_out, (long long)lw->n_in);
                goto done;
            }
            if (lw->bias && m->config.rope_layout == COOPT_ROPE_INTERLEAVED) {
                st = coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: linear biases with interleaved RoPE rows", in_dir);
                goto done;
            }
        }
    }
    if (m->config.ffn_dim % 8)
        coopt_log_info("intermediate size %d padded to %d with zero rows/columns (an exact transformation)",
                       m->config.ffn_dim, (int)pad8(m->config.ffn_dim));
    if (!hf && (st = check_tokenizer(m, o)) != COOPT_OK) goto done;
    if ((st = coopt_threadpool_init(o->n_threads > 0 ? o->n_threads : coopt_n_cores(), &tp)) != COOPT_OK) goto done;
    res = coopt_calloc((size_t)L * N_LIN, sizeof(*res));
    deq = coopt_calloc((size_t)L * N_LIN, sizeof(*deq));
    cal = (struct calib){.sum = coopt_calloc((size_t)L * 4, sizeof(double *)), .n_tok = coopt_calloc((size_t)L * 4, 8),
                         .n_in = coopt_calloc((size_t)L * 4, 8), .tp = tp};
    if (!res || !deq || !cal.sum || !cal.n_tok || !cal.n_in) {
        st = COOPT_ERR_NOMEM;
        goto done;
    }

    int32_t per_call = 1;
    if (o->gptq) {
        if ((st = calib_tokens(coopt_model_tokenizer(m), o, &chunks, &n_chunks)) != COOPT_OK) goto done;
        per_call                   = COOPT_MAX(1, COOPT_MIN(COOPT_MIN(n_chunks, 64), 512 / o->calib_len));
        struct coopt_ctx_params cp = coopt_ctx_default_params();
        cp.kv_type                 = COOPT_DTYPE_F32; // calibrate on exact activations
        cp.n_ctx                   = o->calib_len;
        cp.n_seq_max               = per_call;
        cp.n_batch                 = per_call * o->calib_len;
        cp.n_threads               = o->n_threads;
        if ((st = coopt_ctx_init(m, &cp, &ctx)) != COOPT_OK) goto done;
        struct coopt_forward_hook hook = {.fn = calib_hook, .ud = &cal};
        if ((st = coopt_ctx_set_hook(ctx, &hook)) != COOPT_OK) goto done;
        coopt_log_info("calibration: %d sequences x %d tokens, %s", n_chunks, o->calib_len,
                       o->sequential == COOPT_QUANT_SEQ_NONE    ? "all Hessians from the float model"
                       : o->sequential == COOPT_QUANT_SEQ_LAYER ? "layer-sequential"
                                                                : "true-sequential");
    }
    int64_t t_all = coopt_time_us();
    if (o->gptq && o->sequential == COOPT_QUANT_SEQ_NONE) {
        cal.layer = -1, cal.mask = 15;
        if ((st = calib_pass(ctx, m, L, chunks, n_chunks, o->calib_len, per_call, &cal)) != COOPT_OK) goto done;
    }
    for (int32_t l = 0; l < L; l++) {
        int64_t t0 = coopt_time_us(), t_cal = 0;
        double  err2 = 0, w2 = 0, loss = 0, n_el = 0;
        int     n_stage = (o->gptq && o->sequential == COOPT_QUANT_SEQ_TRUE) ? 4 : 1;
        for (int s = 0; s < n_stage; s++) {
            unsigned mask = n_stage == 4 ? 1u << s : 15u;
            if (o->gptq && o->sequential != COOPT_QUANT_SEQ_NONE) {
                int64_t tc = coopt_time_us();
                cal.layer = l, cal.mask = mask;
                if ((st = calib_pass(ctx, m, l + 1, chunks, n_chunks, o->calib_len, per_call, &cal))) goto done;
                t_cal += coopt_time_us() - tc;
            }
            for (int k = 0; k < N_LIN; k++) {
                if (!(mask & (1u << k_lin[k].which))) continue;
                struct coopt_weight *lw  = lin_weight(m, l, k);
                int64_t              in = lw->n_in, out = lw->n_out, idx = (int64_t)l * 4 + k_lin[k].which;
                const double        *h  = NULL;
                if (o->gptq) {
                    if (!cal.sum[idx] || cal.n_tok[idx] == 0) {
                        st = coopt_fail(COOPT_ERR_INVALID, "layer %d: no calibration activations reached %s", l,
                                        k_lin[k].name);
                        goto done;
                    }
                    if (cal.n_tok[idx] > 0) { // finish once; later users of the same input see n_tok < 0
                        coopt_quant_hessian_finish(cal.sum[idx], cal.n_in[idx], cal.n_tok[idx]);
                        cal.n_tok[idx] = -cal.n_tok[idx];
                    }
                    h = cal.sum[idx];
                }
                // padded to multiples of 8 (zero rows / columns; dead Hessian columns)
                int64_t in_p = pad8(in), out_p = pad8(out);
                float  *wf = coopt_calloc((size_t)(in_p * out_p), sizeof(float));
                float  *dp = coopt_malloc((size_t)(in_p * out_p) * sizeof(float));
                double *hp = h && in_p != in ? coopt_calloc((size_t)(in_p * in_p), sizeof(double)) : NULL;
                deq[l * N_LIN + k] = coopt_aligned_alloc((size_t)(in * out) * sizeof(float));
                if (!wf || !dp || !deq[l * N_LIN + k] || (h && in_p != in && !hp)) {
                    free(wf), free(dp), free(hp);
                    st = COOPT_ERR_NOMEM;
                    goto done;
                }
                size_t rb = coopt_dtype_row_bytes(lw->dtype, in);
                for (int64_t r = 0; r < out; r++)
                    coopt_dequant_row(lw->dtype, (const char *)lw->data + r * rb, wf + r * in_p, in);
                if (hp)
                    for (int64_t i = 0; i < in; i++) memcpy(hp + i * in_p, h + i * in, (size_t)in * sizeof(double));
                char name[320];
                snprintf(name, sizeof(name), "model.layers.%d.%s", l, k_lin[k].name);
                struct coopt_quant_params qp = o->qp;
                qp.name                      = name;
                st = coopt_quant_gptq(wf, hp ? hp : h, out_p, in_p, &qp, tp, &res[l * N_LIN + k]);
                free(hp);
                if (st != COOPT_OK) {
                    free(wf), free(dp);
                    goto done;
                }
                float *dq = deq[l * N_LIN + k];
                coopt_quant_dequant(&res[l * N_LIN + k], dp);
                for (int64_t r = 0; r < out; r++) memcpy(dq + r * in, dp + r * in_p, (size_t)in * sizeof(float));
                for (int64_t i = 0; i < in_p * out_p; i++) {
                    double d = (double)wf[i] - dp[i];
                    err2 += d * d, w2 += (double)wf[i] * wf[i];
                }
                loss += res[l * N_LIN + k].loss, n_el += (double)(in * out);
                free(wf), free(dp);
                // later passes run this layer quantized
                lw->dtype = COOPT_DTYPE_F32, lw->data = dq, lw->gptq = NULL;
            }
        }
        for (int w = 0; w < 4; w++) free(cal.sum[l * 4 + w]), cal.sum[l * 4 + w] = NULL;
        coopt_log_info("layer %d/%d: %.1f s (calibration %.1f s), rel. weight error %.4f, %s loss/weight %.3g",
                       l + 1, L,
                       (double)(coopt_time_us() - t0) * 1e-6, (double)t_cal * 1e-6, sqrt(err2 / (w2 > 0 ? w2 : 1)),
                       o->gptq ? "GPTQ" : "RTN", loss / (n_el > 0 ? n_el : 1));
    }
    coopt_log_info("quantized %d layers in %.1f s; writing %s", L, (double)(coopt_time_us() - t_all) * 1e-6, out_dir);
    if (mkdir(out_dir, 0755) != 0 && errno != EEXIST) {
        st = coopt_fail(COOPT_ERR_IO, "%s: cannot create directory: %s", out_dir, strerror(errno));
        goto done;
    }
    if ((st = write_checkpoint(in_dir, out_dir, m, res, o, n_chunks)) != COOPT_OK) goto done;
    if (o->dump_dequant && (st = write_dequant(o->dump_dequant, m, res)) != COOPT_OK) goto done;
done:
    coopt_ctx_free(ctx);
    coopt_model_free(m); // weights pointing into deq[] are views; free the buffers after
    if (deq)
        for (int64_t i = 0; i < (int64_t)L * N_LIN; i++) coopt_aligned_free(deq[i]);
    if (res)
        for (int64_t i = 0; i < (int64_t)L * N_LIN; i++) coopt_quant_result_free(&res[i]);
    if (cal.sum)
        for (int64_t i = 0; i < (int64_t)L * 4; i++) free(cal.sum[i]);
    free(cal.sum), free(cal.n_tok), free(cal.n_in), free(res), free(deq), free(chunks);
    coopt_threadpool_free(tp);
    return st;
}
