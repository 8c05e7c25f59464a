/*
 * matmul_fused.c -- the matmul ops of the fast CPU table, plain and fused (backend.h):
 * matmul, matmul_multi (q/k/v of one input), matmul_swiglu (silu(x·Wg) * (x·Wu)) and matmul_add
 * (out += x·W, the residual add).
 *
 * A call is ONE thread-pool dispatch (two in prefill, where x is prepared in parallel first):
 *   - x is prepared once per layout and shared by every weight that reads it that way: int8
 *     blocks for GPTQ (coopt_gptq_act_shared: same groups, no act-order) and for Q8_0 / Q4_0,
 *     the reordered f32 rows for BF16; F32 / F16 read x as given;
 *   - the outputs of all weights form one list of chunks that the threads claim from one atomic
 *     counter, so the small k/v projections ride along with q and the threads finish together
 *     (decode: guided chunks, each 1/(2 * threads) of the call's bytes still left, so the first
 *     are long sequential streams and the last ones a single 16-column subtile; prefill: each
 *     kernel's own L2 blocking);
 *   - swiglu: a chunk is the same output columns of gate and up; gate is stored to tmp, up to out,
 *     and silu(gate) * up is applied to the chunk right away, while it is in L1;
 *   - add: the kernels' store computes out + (x·W + bias), the order of the composed ops, so the
 *     fused and composed results are bit-identical.
 * The kernels are the GPTQ kernels (matmul_gptq.c) and cpu_matmul's row kernel (matmul_cpu.c),
 * called on ranges of output subtiles / rows. Where neither applies (F32/F16/BF16 prefill and
 * CPUs without AVX-512 for non-GPTQ weights) the fused ops are composed from cpu_matmul and the
 * element-wise ops: that work is compute-bound and a few more dispatches do not show.
 */
#include "cpu/ops_cpu.h"

#include "dtype.h"
#include "gptq.h"
#include "util.h"

#include <stdatomic.h>
#include <string.h>

#define FUSED_MAX 4 // weights per call (matmul_multi takes up to 4; swiglu 2)
#define FUSED_GUIDED_MAX 128 // chunks of a decode call
#ifndef FUSED_GUIDED
#define FUSED_GUIDED 2 // decode chunk = remaining bytes / (FUSED_GUIDED * threads); 0 = equal chunks
#endif

enum fused_kind { FUSED_NONE, FUSED_GPTQ, FUSED_ROWS };

static enum fused_kind kind_of(const struct coopt_weight *w, int32_t n_rows) {
    if (w->dtype == COOPT_DTYPE_Q4_GPTQ) return FUSED_GPTQ;
    return cpu_mm_rows_ok(w, n_rows) ? FUSED_ROWS : FUSED_NONE;
}

// One weight of a call and its prepared x.
struct fused_w {
    const struct coopt_weight *w;
    enum fused_kind            kind;
    int32_t                    prep;     // the weight whose preparation it reads (itself or an earlier one)
    size_t                     prep_off; // where its own preparation goes in the scratch (prep == self)
    const void                *xp;       // prepared x, NULL when the kernel reads x as given
};

// The outputs of one weight (or of a gate/up pair) as chunks of units: 16-column subtiles for
// GPTQ, output rows for the row kernel.
struct fused_part {
    int32_t w, w2;   // weight indexes; w2 >= 0: swiglu with w = gate, w2 = up
    float  *out;     // [n_rows][n_out]
    float  *tmp;     // swiglu: gate outputs [n_rows][n_out]
    bool    add;     // out += result
    int64_t units;   // work units of the weight
    int64_t chunk;   // units per chunk
    int64_t c0, c1;  // its chunks in the call's list: [c0, c1)
};

struct fused_ctx {
    struct fused_w      ws[FUSED_MAX];
    int32_t             n_ws;
    struct fused_part   parts[FUSED_MAX];
    int32_t             n_parts;
    const float        *x; // [n_rows][n_in]
    int32_t             n_rows;
    int64_t             n_chunks;
    bool                guided;                     // chunk k is units [gu[k][0], gu[k][1]) of its part
    int64_t             gu[FUSED_GUIDED_MAX][2];
    atomic_int_fast64_t next; // next chunk to claim
};

static int64_t units_of(const struct fused_w *fw) {
    return fw->kind == FUSED_GPTQ ? ((const struct coopt_gptq_weight *)fw->w->gptq)->n_sub : fw->w->n_out;
}

static int64_t bytes_of(const struct fused_w *fw) {
    if (fw->kind == FUSED_GPTQ) return coopt_gptq_weight_bytes(fw->w->gptq);
    return (int64_t)coopt_dtype_row_bytes(fw->w->dtype, fw->w->n_in) * fw->w->n_out;
}

static size_t prep_bytes(const struct fused_w *fw, int32_t n_rows) {
    if (fw->kind == FUSED_GPTQ) return coopt_gptq_act_bytes(fw->w->gptq, n_rows);
    return (cpu_mm_rows_prep_bytes(fw->w, n_rows) + 63) & ~(size_t)63;
}

static bool prep_shared(const struct fused_w *a, const struct fused_w *b) {
    if (a->kind != b->kind) return false;
    if (a->kind == FUSED_GPTQ) return coopt_gptq_act_shared(a->w->gptq, b->w->gptq);
    return cpu_mm_rows_prep_shared(a->w, b->w);
}

// Prepares x rows [r_lo, r_hi) for every distinct preparation of the call.
static void prep_rows(const struct fused_ctx *c, int32_t r_lo, int32_t r_hi) {
    for (int32_t i = 0; i < c->n_ws; i++) {
        const struct fused_w *fw = &c->ws[i];
        if (fw->prep != i || !fw->xp) continue;
        if (fw->kind == FUSED_GPTQ)
            coopt_gptq_act_prepare(fw->w->gptq, c->x, c->n_rows, r_lo, r_hi, (void *)fw->xp, COOPT_GPTQ_ISA_AUTO);
        else cpu_mm_rows_prep(fw->w, c->x, r_lo, r_hi, (void *)fw->xp);
    }
}

static void prep_task(void *ctx, int32_t ith, int32_t nth) {
    const struct fused_ctx *c = ctx;
    int64_t                 lo, hi;
    coopt_split_range(c->n_rows, ith, nth, &lo, &hi);
    prep_rows(c, (int32_t)lo, (int32_t)hi);
}

// Units [u0, u1) of one weight for all rows.
static void run_units(const struct fused_ctx *c, const struct fused_w *fw, int64_t u0, int64_t u1, float *out,
                      bool add) {
    if (fw->kind == FUSED_GPTQ)
        coopt_gptq_run(fw->w->gptq, fw->xp, c->n_rows, u0, u1, out, fw->w->bias, add, COOPT_GPTQ_ISA_AUTO);
    else cpu_mm_rows_run(fw->w, c->x, fw->xp, c->n_rows, u0, u1, out, add);
}

static void fused_task(void *ctx, int32_t ith, int32_t nth) {
    struct fused_ctx *c = ctx;
    int32_t           p = 0; // a thread's claims only ascend, so its part index only moves forward
    for (;;) {
        int64_t k = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (k >= c->n_chunks) break;
        while (k >= c->parts[p].c1) p++;
        const struct fused_part *pt = &c->parts[p];
        const struct fused_w    *fw = &c->ws[pt->w];
        int64_t                  u0 = (k - pt->c0) * pt->chunk, u1 = COOPT_MIN(pt->units, u0 + pt->chunk);
        if (c->guided) u0 = c->gu[k][0], u1 = c->gu[k][1];
        if (pt->w2 < 0) {
            run_units(c, fw, u0, u1, pt->out, pt->add);
            continue;
        }
        run_units(c, fw, u0, u1, pt->tmp, false);
        run_units(c, &c->ws[pt->w2], u0, u1, pt->out, false);
        int64_t cols = fw->kind == FUSED_GPTQ ? COOPT_GPTQ_SUB : 1, n_out = fw->w->n_out;
        int64_t o0 = u0 * cols, o1 = COOPT_MIN(n_out, u1 * cols);
        for (int64_t r = 0; r < c->n_rows; r++)
            cpu_silu_mul(pt->out + r * n_out + o0, pt->tmp + r * n_out + o0, pt->out + r * n_out + o0, o1 - o0);
    }
}

// Prepares x, cuts the parts into chunks and runs them on the pool.
static void fused_run(struct coopt_backend *be, struct fused_ctx *c) {
    struct cpu_backend *cb  = be->impl;
    int32_t             nth = coopt_threadpool_n_threads(cb->tp);
    // one preparation per distinct layout
    size_t total = 0;
    for (int32_t i = 0; i < c->n_ws; i++) {
        struct fused_w *fw = &c->ws[i];
        fw->prep           = i;
        for (int32_t j = 0; j < i && fw->prep == i; j++)
            if (prep_shared(&c->ws[j], fw)) fw->prep = c->ws[j].prep;
        if (fw->prep == i) {
            fw->prep_off = total;
            total += prep_bytes(fw, c->n_rows);
        }
    }
    uint8_t *buf = total ? cpu_scratch(be, total) : NULL;
    for (int32_t i = 0; i < c->n_ws; i++) {
        struct fused_w *fw = &c->ws[i];
        fw->xp             = prep_bytes(fw, c->n_rows) ? buf + c->ws[fw->prep].prep_off : NULL;
    }
    if (total && nth > 1 && c->n_rows >= 4 * nth) coopt_threadpool_run(cb->tp, prep_task, c);
    else if (total) prep_rows(c, 0, c->n_rows);

    // chunks: decode by bytes over the whole call, prefill by each kernel's blocking
    int64_t call_bytes = 0;
    for (int32_t p = 0; p < c->n_parts; p++) {
        const struct fused_part *pt = &c->parts[p];
        call_bytes += bytes_of(&c->ws[pt->w]) + (pt->w2 >= 0 ? bytes_of(&c->ws[pt->w2]) : 0);
    }
    int64_t target = (call_bytes + 4 * nth - 1) / (4 * nth);
    c->n_chunks    = 0;
    c->guided      = FUSED_GUIDED > 0 && c->n_rows <= 8 && nth > 1;
    double left    = (double)call_bytes; // bytes of the call not yet in a chunk
    for (int32_t p = 0; p < c->n_parts; p++) {
        struct fused_part    *pt = &c->parts[p];
        const struct fused_w *fw = &c->ws[pt->w];
        int64_t               b  = bytes_of(fw) + (pt->w2 >= 0 ? bytes_of(&c->ws[pt->w2]) : 0);
        pt->units                = units_of(fw);
        if (c->guided) {
            // Guided self-scheduling: each chunk is a share of what is left of the whole call, so
            // the first chunks are long streams and the last ones short, and the threads end
            // within a short chunk of each other (equal chunks of 1/(4 threads) left up to ~10 %
            // of a small projection idle on one thread).
            // granule: one 16-column subtile for 1 row (the decode kernel's unit; the call's last
            // chunks are then short: ~0.4 us at 2048 inputs), the 4-subtile kernels' width for
            // more rows; 16 rows of the row kernel
            const int64_t g  = fw->kind == FUSED_GPTQ ? (c->n_rows == 1 ? 1 : 4) : 16;
            const double  bu = (double)b / (double)pt->units;  // bytes per unit
            pt->c0           = c->n_chunks;
            for (int64_t u = 0; u < pt->units;) {
                int64_t n = (int64_t)(left / (FUSED_GUIDED * nth) / bu) + 1;
                n         = COOPT_MAX(g, (n + g - 1) / g * g);
                if (c->n_chunks >= FUSED_GUIDED_MAX - (c->n_parts - p)) n = pt->units; // table full: the rest
                n = COOPT_MIN(n, pt->units - u);
                c->gu[c->n_chunks][0] = u, c->gu[c->n_chunks][1] = u + n;
                c->n_chunks++, u += n, left -= (double)n * bu;
            }
            pt->c1 = c->n_chunks;
            continue;
        }
        if (c->n_rows <= 8) {
            int64_t ch = (int64_t)(((double)pt->units * (double)target + (double)b - 1) / (double)b);
            pt->chunk  = fw->kind == FUSED_GPTQ ? COOPT_MAX((int64_t)4, (ch + 3) / 4 * 4) : COOPT_MAX((int64_t)16, ch);
        } else {
            pt->chunk = fw->kind == FUSED_GPTQ ? coopt_gptq_chunk(fw->w->gptq, nth)
                                               : cpu_mm_rows_chunk(fw->w, c->n_rows, nth);
        }
        pt->chunk = COOPT_MIN(pt->chunk, pt->units);
        pt->c0    = c->n_chunks;
        pt->c1    = pt->c0 + (pt->units + pt->chunk - 1) / pt->chunk;
        c->n_chunks = pt->c1;
    }
    atomic_init(&c->next, 0);
    if (c->n_chunks == 1 || nth == 1) fused_task(c, 0, 1);
    else coopt_threadpool_run(cb->tp, fused_task, c);
}

static void ctx_add_w(struct fused_ctx *c, const struct coopt_weight *w, enum fused_kind kind) {
    COOPT_ASSERT(c->n_ws < FUSED_MAX);
    c->ws[c->n_ws++] = (struct fused_w){.w = w, .kind = kind};
}

static void ctx_add_part(struct fused_ctx *c, int32_t w, int32_t w2, float *out, float *tmp, bool add) {
    COOPT_ASSERT(c->n_parts < FUSED_MAX);
    c->parts[c->n_parts++] = (struct fused_part){.w = w, .w2 = w2, .out = out, .tmp = tmp, .add = add};
}

void cpu_matmul_fused(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                      int32_t n_rows) {
    COOPT_ASSERT(n_rows >= 0 && w->n_in > 0 && w->n_out > 0);
    if (n_rows == 0) return;
    enum fused_kind kind = kind_of(w, n_rows);
    if (kind == FUSED_NONE) {
        cpu_matmul(be, out, x, w, n_rows);
        return;
    }
    struct fused_ctx c = {.x = x, .n_rows = n_rows};
    ctx_add_w(&c, w, kind);
    ctx_add_part(&c, 0, -1, out, NULL, false);
    fused_run(be, &c);
}

void cpu_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                      const struct coopt_weight *const *ws, int32_t n_rows) {
    COOPT_ASSERT(n >= 1 && n <= FUSED_MAX && n_rows >= 0);
    if (n_rows == 0) return;
    struct fused_ctx c    = {.x = x, .n_rows = n_rows};
    bool             comp = false;
    for (int32_t j = 0; j < n; j++) {
        COOPT_ASSERT(ws[j]->n_in == ws[0]->n_in && ws[j]->n_out > 0);
        enum fused_kind kind = kind_of(ws[j], n_rows);
        comp                 = comp || kind == FUSED_NONE;
        ctx_add_w(&c, ws[j], kind);
        ctx_add_part(&c, j, -1, outs[j], NULL, false);
    }
    if (comp) {
        for (int32_t j = 0; j < n; j++) cpu_matmul_fused(be, outs[j], x, ws[j], n_rows);
        return;
    }
    fused_run(be, &c);
}

void cpu_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const struct coopt_weight *wg,
                       const struct coopt_weight *wu, int32_t n_rows) {
    COOPT_ASSERT(wg->n_in == wu->n_in && wg->n_out == wu->n_out && n_rows >= 0);
    if (n_rows == 0) return;
    enum fused_kind kg = kind_of(wg, n_rows), ku = kind_of(wu, n_rows);
    if (kg == FUSED_NONE || kg != ku) {
        cpu_matmul_fused(be, out, x, wg, n_rows);
        cpu_matmul_fused(be, tmp, x, wu, n_rows);
        be->ops->silu_mul(be, out, out, tmp, (int64_t)n_rows * wg->n_out);
        return;
    }
    struct fused_ctx c = {.x = x, .n_rows = n_rows};
    ctx_add_w(&c, wg, kg);
    ctx_add_w(&c, wu, ku);
    ctx_add_part(&c, 0, 1, out, tmp, false);
    fused_run(be, &c);
}

void cpu_matmul_add(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                    int32_t n_rows) {
    COOPT_ASSERT(n_rows >= 0 && w->n_in > 0 && w->n_out > 0);
    if (n_rows == 0) return;
    enum fused_kind kind = kind_of(w, n_rows);
    if (kind == FUSED_NONE) {
        struct cpu_backend *cb = be->impl;
        size_t              n  = (size_t)n_rows * (size_t)w->n_out;
        if (cb->fused_tmp_bytes < n * sizeof(float)) {
            coopt_aligned_free(cb->fused_tmp);
            cb->fused_tmp       = coopt_aligned_alloc(n * sizeof(float));
            cb->fused_tmp_bytes = cb->fused_tmp ? n * sizeof(float) : 0;
            COOPT_ASSERT(cb->fused_tmp != NULL);
        }
        cpu_matmul(be, cb->fused_tmp, x, w, n_rows);
        be->ops->add(be, out, out, cb->fused_tmp, (int64_t)n);
        return;
    }
    struct fused_ctx c = {.x = x, .n_rows = n_rows};
    ctx_add_w(&c, w, kind);
    ctx_add_part(&c, 0, -1, out, NULL, true);
    fused_run(be, &c);
}
