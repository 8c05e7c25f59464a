/*
 * forward.c -- the LLaMA forward pass over a ragged batch, written once against the backend ops
 * table (no SIMD or CUDA here):
 *
 *   x = embed(tokens)
 *   per layer: xb = rmsnorm(x); q,k,v = xb·Wq,Wk,Wv; rope + FP8/F16 store into the paged cache
 *              (fused); att = paged GQA attention(q, cache); x += att·Wo
 *              xb = rmsnorm(x); x += (silu(xb·Wgate) * xb·Wup)·Wdown
 *   logits = rmsnorm(x[out_rows])·Woutput
 *
 * No allocation happens here: every buffer comes from struct coopt_scratch.
 */
#include "forward.h"

#include <math.h>

enum coopt_status coopt_scratch_init(struct coopt_backend *be, const struct coopt_model_config *c, int32_t n,
                                     struct coopt_scratch *s) {
    *s                = (struct coopt_scratch){.n_tokens_max = n};
    size_t q_dim      = (size_t)c->n_heads * c->head_dim;
    size_t kv_dim     = (size_t)c->n_kv_heads * c->head_dim;
    struct {
        float **p;
        size_t  per_token;
    } bufs[] = {
        {&s->x, (size_t)c->dim},       {&s->xb, (size_t)c->dim},       {&s->q, q_dim},
        {&s->k, kv_dim},               {&s->v, kv_dim},                {&s->att, q_dim},
        {&s->hb, (size_t)c->ffn_dim},  {&s->hb2, (size_t)c->ffn_dim},  {&s->xo, (size_t)c->dim},
        {&s->logits, (size_t)c->n_vocab},
    };
    for (size_t i = 0; i < COOPT_ARRAY_LEN(bufs); i++) {
        enum coopt_status st = be->ops->alloc(be, bufs[i].per_token * (size_t)n * sizeof(float), (void **)bufs[i].p);
        if (st != COOPT_OK) {
            coopt_scratch_free(be, s);
            return st;
        }
    }
    return COOPT_OK;
}

void coopt_scratch_free(struct coopt_backend *be, struct coopt_scratch *s) {
    float *bufs[] = {s->x, s->xb, s->q, s->k, s->v, s->att, s->hb, s->hb2, s->xo, s->logits};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(bufs); i++) be->ops->free(be, bufs[i]);
    *s = (struct coopt_scratch){0};
}

void coopt_rope_init(const struct coopt_model_config *c, float *inv_freq) {
    int    hd   = c->head_dim;
    double pi   = 3.14159265358979323846;
    for (int i = 0; i < hd / 2; i++) {
        // HF computes base ** (2i/d) in f32; powf keeps us within an ulp of that.
        float f = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)hd);
        if (c->rope_scaling == COOPT_ROPE_SCALING_LINEAR && c->rope_factor > 0) {
            f /= c->rope_factor;
        } else if (c->rope_scaling == COOPT_ROPE_SCALING_LLAMA3 && c->rope_factor > 0) {
            double old_ctx = c->rope_orig_ctx > 0 ? c->rope_orig_ctx : 8192;
            double lo = c->rope_low_freq_factor > 0 ? c->rope_low_freq_factor : 1.0;
            double hi = c->rope_high_freq_factor > 0 ? c->rope_high_freq_factor : 4.0;
            double low_wavelen = old_ctx / lo, high_wavelen = old_ctx / hi;
            double wavelen = 2 * pi / f;
            if (wavelen > low_wavelen) {
                f = (float)(f / c->rope_factor);
            } else if (wavelen >= high_wavelen && hi != lo) {
                double smooth = (old_ctx / wavelen - lo) / (hi - lo);
                f = (float)((1 - smooth) * f / c->rope_factor + smooth * f);
            }
        }
        inv_freq[i] = f;
    }
}

// x += in·W, fused when the backend can (tmp: [n][w->n_out] scratch otherwise). next_norm: the
// norm weights of the fused norm op that reads x next (a backend may prepare its input), NULL if
// another op does.
static void project_add(struct coopt_backend *be, float *x, float *tmp, const float *in, const struct coopt_weight *w,
                        int32_t n, const float *next_norm) {
    if (be->ops->matmul_add_then_norm && next_norm) {
        be->ops->matmul_add_then_norm(be, x, in, w, n, next_norm);
    } else if (be->ops->matmul_add) {
        be->ops->matmul_add(be, x, in, w, n);
    } else {
        be->ops->matmul(be, tmp, in, w, n);
        be->ops->add(be, x, x, tmp, (int64_t)n * w->n_out);
    }
}

// q, k, v = rmsnorm(x)·Wq, Wk, Wv, fused as far as the backend offers (hooks observe the normed
// input xb, so with a hook the norm is materialized).
static void qkv_in(struct coopt_backend *be, struct coopt_scratch *s, const float *norm, float eps,
                   const struct coopt_weight *wq, const struct coopt_weight *wk, const struct coopt_weight *wv,
                   int32_t n, const struct coopt_forward_hook *hook, int32_t l) {
    const struct coopt_ops    *op      = be->ops;
    float                     *outs[3] = {s->q, s->k, s->v};
    const struct coopt_weight *ws[3]   = {wq, wk, wv};
    if (op->norm_matmul_multi && !hook) {
        op->norm_matmul_multi(be, 3, outs, s->x, norm, eps, ws, n);
        return;
    }
    op->rmsnorm(be, s->xb, s->x, norm, n, (int32_t)wq->n_in, eps);
    if (hook) hook->fn(hook->ud, l, 0, s->xb, n, (int32_t)wq->n_in);
    if (op->matmul_multi) {
        op->matmul_multi(be, 3, outs, s->xb, ws, n);
    } else {
        for (int i = 0; i < 3; i++) op->matmul(be, outs[i], s->xb, ws[i], n);
    }
}

// hb = silu(rmsnorm(x)·Wgate) * (rmsnorm(x)·Wup), fused as far as the backend offers.
static void swiglu_in(struct coopt_backend *be, struct coopt_scratch *s, const float *norm, float eps,
                      const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t n,
                      const struct coopt_forward_hook *hook, int32_t l) {
    const struct coopt_ops *op = be->ops;
    if (op->norm_matmul_swiglu_then_add && op->matmul_add && !hook) { // (project_add reads hb next)
        op->norm_matmul_swiglu_then_add(be, s->hb, s->hb2, s->x, norm, eps, wg, wu, n);
        return;
    }
    if (op->norm_matmul_swiglu && !hook) {
        op->norm_matmul_swiglu(be, s->hb, s->hb2, s->x, norm, eps, wg, wu, n);
        return;
    }
    op->rmsnorm(be, s->xb, s->x, norm, n, (int32_t)wg->n_in, eps);
    if (hook) hook->fn(hook->ud, l, 2, s->xb, n, (int32_t)wg->n_in);
    if (op->matmul_swiglu) {
        op->matmul_swiglu(be, s->hb, s->hb2, s->xb, wg, wu, n);
    } else {
        op->matmul(be, s->hb, s->xb, wg, n);
        op->matmul(be, s->hb2, s->xb, wu, n);
        op->silu_mul(be, s->hb, s->hb, s->hb2, (int64_t)n * wg->n_out);
    }
}

void coopt_forward(const struct coopt_model *m, struct coopt_backend *be, struct coopt_kv_cache *kv,
                   const struct coopt_rope *rope, struct coopt_scratch *s, const struct coopt_batch *b,
                   const struct coopt_forward_hook *hook) {
    const struct coopt_ops           *op = be->ops;
    const struct coopt_model_config *c  = &m->config;
    int32_t                          n  = b->n_tokens;
    COOPT_ASSERT(n > 0 && n <= s->n_tokens_max && b->n_out <= n);
    int64_t dim = c->dim, q_dim = (int64_t)c->n_heads * c->head_dim, ffn = c->ffn_dim;
    float   scale = 1.0f / sqrtf((float)c->head_dim);

    op->embed(be, s->x, &m->tok_embd, b->tokens, n);
    for (int32_t l = 0; l < c->n_layers; l++) {
        const struct coopt_layer *L = &m->layers[l];
        // attention block
        qkv_in(be, s, L->attn_norm, c->norm_eps, &L->wq, &L->wk, &L->wv, n, hook, l);
        if (op->rope_store_attention_then_matmul && op->matmul_add && !hook) { // (project_add reads att next)
            op->rope_store_attention_then_matmul(be, s->att, s->q, s->k, s->v, c->n_heads, kv, l, b, rope, scale);
        } else if (op->rope_store_attention) {
            op->rope_store_attention(be, s->att, s->q, s->k, s->v, c->n_heads, kv, l, b, rope, scale);
        } else {
            op->rope_store(be, s->q, s->k, s->v, c->n_heads, kv, l, b, rope);
            op->attention(be, s->att, s->q, c->n_heads, kv, l, b, scale);
        }
        if (hook) hook->fn(hook->ud, l, 1, s->att, n, (int32_t)q_dim);
        // the fused norm ops read x next where there is no hook (qkv_in, swiglu_in)
        const bool fused_next = !hook && op->norm_matmul_multi && op->norm_matmul_swiglu;
        project_add(be, s->x, s->xb, s->att, &L->wo, n, fused_next ? L->ffn_norm : NULL);
        // MLP block
        swiglu_in(be, s, L->ffn_norm, c->norm_eps, &L->w_gate, &L->w_up, n, hook, l);
        if (hook) hook->fn(hook->ud, l, 3, s->hb, n, (int32_t)ffn);
        project_add(be, s->x, s->xb, s->hb, &L->w_down, n,
                    fused_next && l + 1 < c->n_layers ? m->layers[l + 1].attn_norm : NULL);
    }
    if (b->n_out == 0) return;
    op->get_rows(be, s->xo, s->x, b->out_rows, b->n_out, (int32_t)dim);
    op->rmsnorm(be, s->xo, s->xo, m->out_norm, b->n_out, (int32_t)dim, c->norm_eps);
    op->matmul(be, s->logits, s->xo, &m->output, b->n_out);
    if (b->next_tokens && b->pick)
        op->sample(be, b->next_tokens, b->next_tokens_host, s->logits, b->n_out, (int32_t)m->output.n_out, b->pick,
                   b->pick_scratch);
    else if (b->next_tokens)
        op->argmax(be, b->next_tokens, b->next_tokens_host, s->logits, b->n_out, (int32_t)m->output.n_out);
}
