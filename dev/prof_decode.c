/*
 * prof_decode.c -- where a CPU decode step spends its time, op by op. Loads a model, wraps every
 * op of the fast CPU table with a timer (the wrapper calls the real op, so the forward pass and
 * the kernels are the production ones), prefills 32 tokens, then times N single-token decode
 * steps. Prints per op: calls and microseconds per token, the bytes the op must read (matmul
 * weights; K/V rows for attention) and the achieved GB/s, plus the time between ops (the
 * forward pass itself). COMPOSED=1 removes the fused ops from the table (the forward pass
 * composes them), to compare.
 *
 *   make CUDA=0 build/libcoopt.a && cc -O3 -march=native -std=c11 -D_GNU_SOURCE -Iinclude -Isrc \
 *       dev/prof_decode.c build/libcoopt.a -lcjson -lm -lpthread -o build/prof_decode
 *   ./build/prof_decode MODEL [threads=2] [steps=64]
 */
#include "backend.h"
#include "dtype.h"
#include "forward.h"
#include "gptq.h"
#include "kv_cache.h"
#include "model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

enum { P_EMBED, P_RMSNORM, P_MATMUL, P_MULTI, P_SWIGLU, P_ADDMM, P_ROPE_STORE, P_ATTN, P_SILU, P_ADD, P_ROWS, P_N };
static const char *k_names[P_N] = {"embed",      "rmsnorm",   "matmul",   "matmul_multi", "matmul_swiglu", "matmul_add",
                                   "rope_store", "attention", "silu_mul", "add",          "get_rows"};
static double           g_us[P_N], g_bytes[P_N];
static long             g_calls[P_N];
static bool             g_on;
static const struct coopt_ops *g_real;
static double           g_kv_bytes; // K/V bytes one attention call reads (set per step)

static double w_bytes(const struct coopt_weight *w) {
    if (w->dtype == COOPT_DTYPE_Q4_GPTQ) return (double)coopt_gptq_weight_bytes(w->gptq);
    return (double)coopt_dtype_row_bytes(w->dtype, w->n_in) * (double)w->n_out;
}

#define TIMED(id, bytes, call)                                                                                     \
    do {                                                                                                           \
        double t0_ = now_us();                                                                                     \
        call;                                                                                                      \
        if (g_on) g_us[id] += now_us() - t0_, g_bytes[id] += (bytes), g_calls[id]++;                               \
    } while (0)

static void embed_w(struct coopt_backend *be, float *out, const struct coopt_weight *t, const int32_t *tok, int32_t n) {
    TIMED(P_EMBED, 0, g_real->embed(be, out, t, tok, n));
}
static void rmsnorm_w(struct coopt_backend *be, float *out, const float *x, const float *w, int32_t r, int32_t d, float e) {
    TIMED(P_RMSNORM, 0, g_real->rmsnorm(be, out, x, w, r, d, e));
}
static void matmul_w(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n) {
    TIMED(P_MATMUL, w_bytes(w), g_real->matmul(be, out, x, w, n));
}
static void multi_w(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                    const struct coopt_weight *const *ws, int32_t rows) {
    double b = 0;
    for (int32_t j = 0; j < n; j++) b += w_bytes(ws[j]);
    TIMED(P_MULTI, b, g_real->matmul_multi(be, n, outs, x, ws, rows));
}
static void swiglu_w(struct coopt_backend *be, float *out, float *tmp, const float *x, const struct coopt_weight *wg,
                     const struct coopt_weight *wu, int32_t n) {
    TIMED(P_SWIGLU, w_bytes(wg) + w_bytes(wu), g_real->matmul_swiglu(be, out, tmp, x, wg, wu, n));
}
static double g_add_us[2], g_add_b[2];
static void addmm_w(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n) {
    double t0 = now_us();
    TIMED(P_ADDMM, w_bytes(w), g_real->matmul_add(be, out, x, w, n));
    if (g_on) g_add_us[w->n_in > w->n_out] += now_us() - t0, g_add_b[w->n_in > w->n_out] += w_bytes(w);
}
static void rope_store_w(struct coopt_backend *be, float *q, const float *k, const float *v, int32_t nh,
                         struct coopt_kv_cache *kv, int32_t l, const struct coopt_batch *b, const struct coopt_rope *r) {
    TIMED(P_ROPE_STORE, 0, g_real->rope_store(be, q, k, v, nh, kv, l, b, r));
}
static void attn_w(struct coopt_backend *be, float *out, const float *q, int32_t nh, const struct coopt_kv_cache *kv,
                   int32_t l, const struct coopt_batch *b, float s) {
    TIMED(P_ATTN, g_kv_bytes, g_real->attention(be, out, q, nh, kv, l, b, s));
}
static void silu_w(struct coopt_backend *be, float *out, const float *g, const float *u, int64_t n) {
    TIMED(P_SILU, 0, g_real->silu_mul(be, out, g, u, n));
}
static void add_w(struct coopt_backend *be, float *out, const float *a, const float *b, int64_t n) {
    TIMED(P_ADD, 0, g_real->add(be, out, a, b, n));
}
static void rows_w(struct coopt_backend *be, float *out, const float *x, const int32_t *r, int32_t n, int32_t d) {
    TIMED(P_ROWS, 0, g_real->get_rows(be, out, x, r, n, d));
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [threads=2] [steps=64]\n", argv[0]);
        return 1;
    }
    int32_t nth = argc > 2 ? atoi(argv[2]) : 2, steps = argc > 3 ? atoi(argv[3]) : 64, prompt = 32;
    struct coopt_model *m = NULL;
    if (coopt_model_load(argv[1], NULL, &m) != COOPT_OK) return 1;
    const struct coopt_model_config *c = &m->config;
    struct coopt_backend            *be;
    if (coopt_cpu_backend_init(nth, false, &be) != COOPT_OK) return 1;
    g_real              = be->ops;
    struct coopt_ops ops = *be->ops;
    ops.embed = embed_w, ops.rmsnorm = rmsnorm_w, ops.matmul = matmul_w, ops.rope_store = rope_store_w;
    ops.attention = attn_w, ops.silu_mul = silu_w, ops.add = add_w, ops.get_rows = rows_w;
    bool composed = getenv("COMPOSED") && atoi(getenv("COMPOSED"));
    ops.matmul_multi  = g_real->matmul_multi && !composed ? multi_w : NULL;
    ops.matmul_swiglu = g_real->matmul_swiglu && !composed ? swiglu_w : NULL;
    ops.matmul_add    = g_real->matmul_add && !composed ? addmm_w : NULL;
    be->ops           = &ops;

    int32_t                max_tok = prompt + steps, mb = (max_tok + 15) / 16;
    struct coopt_kv_layout l;
    struct coopt_kv_cache *kv;
    if (coopt_kv_layout_init(&l, COOPT_DTYPE_FP8_E4M3, c->n_layers, c->n_kv_heads, c->head_dim, 16) != COOPT_OK ||
        coopt_kv_cache_init(&l, mb, 1, mb, &kv) != COOPT_OK)
        return 1;
    void *pool;
    if (be->ops->kv_pool_init(be, l.page_bytes * (size_t)mb, &pool) != COOPT_OK) return 1;
    kv->pool = pool;
    struct coopt_scratch s;
    if (coopt_scratch_init(be, c, prompt, &s) != COOPT_OK || coopt_kv_seq_init(kv, 0) != COOPT_OK) return 1;
    float *inv = malloc(sizeof(float) * (size_t)c->head_dim / 2);
    coopt_rope_init(c, inv);
    struct coopt_rope rope = {.layout = c->rope_layout, .head_dim = c->head_dim, .inv_freq = inv};

    double t_total = 0;
    for (int step = 0; step <= steps; step++) {
        int32_t n = step == 0 ? prompt : 1;
        int32_t toks[64], pos[64], ts[64], rows[64], len;
        int64_t slots[64];
        if (coopt_kv_seq_reserve(kv, 0, n, NULL, NULL) != COOPT_OK) return 1;
        for (int32_t i = 0; i < n; i++) {
            toks[i] = (step * 31 + i * 7 + 1) % c->n_vocab, pos[i] = (int32_t)kv->seqs[0].n_tokens + i;
            ts[i] = 0, rows[i] = i, slots[i] = coopt_kv_slot(kv, 0, pos[i]);
        }
        len = pos[n - 1] + 1;
        struct coopt_batch b = {.n_tokens = n, .tokens = toks, .pos = pos, .tok_seq = ts, .slots = slots, .n_seqs = 1,
                                .max_blocks = mb, .block_tables = kv->seqs[0].pages, .seq_lens = &len,
                                .n_out = 1, .out_rows = &rows[n - 1]};
        g_kv_bytes = (double)len * 2 * c->n_kv_heads * (c->head_dim + 4); // FP8 rows + f32 scales
        g_on       = step > 0;
        double t0  = now_us();
        coopt_forward(m, be, kv, &rope, &s, &b, NULL);
        if (g_on) t_total += now_us() - t0;
        coopt_kv_seq_advance(kv, 0, n);
    }
    double sum = 0, bytes = 0;
    printf("decode, %d steps after a %d-token prompt, %d threads%s: %.1f us/token (%.2f tok/s)\n", steps, prompt, nth,
           composed ? ", composed ops" : "", t_total / steps, 1e6 * steps / t_total);
    printf("%-14s %8s %10s %10s %8s\n", "op", "calls/t", "us/token", "MB/token", "GB/s");
    for (int i = 0; i < P_N; i++) {
        if (!g_calls[i]) continue;
        double us = g_us[i] / steps, mb_ = g_bytes[i] / steps / 1e6;
        sum += us, bytes += mb_;
        printf("%-14s %8.1f %10.1f %10.2f %8.1f\n", k_names[i], (double)g_calls[i] / steps, us, mb_,
               mb_ > 0 ? mb_ * 1e6 / us / 1e3 : 0.0);
    }
    for (int k = 0; k < 2; k++)
        if (g_add_us[k] > 0)
            printf("  %-12s %8s %10.1f %10s %8.1f\n", k ? "(n_in>n_out)" : "(n_in<=n_out)", "", g_add_us[k] / steps, "",
                   g_add_b[k] / g_add_us[k] / 1e3); // matmul_add split: o (square) and down projections
    printf("%-14s %8s %10.1f\n", "between ops", "", t_total / steps - sum);
    printf("%-14s %8s %10.1f %10.2f %8.1f\n", "total", "", t_total / steps, bytes, bytes * 1e6 / (t_total / steps) / 1e3);
    return 0;
}
