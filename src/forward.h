/*
 * forward.h -- the transformer forward pass, written once against struct coopt_ops.
 */
#ifndef COOPT_FORWARD_H
#define COOPT_FORWARD_H

#include "backend.h"
#include "batch.h"
#include "kv_cache.h"
#include "model.h"

// Activation buffers in backend memory, sized for n_tokens_max tokens of one step.
struct coopt_scratch {
    int32_t n_tokens_max;
    float  *x;      // [n][dim]        residual stream
    float  *xb;     // [n][dim]        normed input / attention output projection
    float  *q;      // [n][n_heads*head_dim]
    float  *k;      // [n][n_kv_heads*head_dim]
    float  *v;      // [n][n_kv_heads*head_dim]
    float  *att;    // [n][n_heads*head_dim]
    float  *hb;     // [n][ffn_dim]
    float  *hb2;    // [n][ffn_dim]
    float  *xo;     // [n][dim]        rows whose logits are wanted
    float  *logits; // [n][n_vocab]
};

// Allocates the scratch buffers through the backend. Returns NOMEM on failure.
enum coopt_status coopt_scratch_init(struct coopt_backend *be, const struct coopt_model_config *c, int32_t n_tokens_max,
                                     struct coopt_scratch *s);
void coopt_scratch_free(struct coopt_backend *be, struct coopt_scratch *s);

// Fills inv_freq[head_dim/2] for the model's RoPE (theta, linear or llama3 scaling).
void coopt_rope_init(const struct coopt_model_config *c, float *inv_freq);

// Optional observer of matmul inputs (calibration for `coopt quantize`). `which` names the
// linear layers that read x: 0 = wq/wk/wv, 1 = wo, 2 = w_gate/w_up, 3 = w_down. x is in backend
// memory ([n_rows][n_in]); only host-memory backends support hooks.
struct coopt_forward_hook {
    void (*fn)(void *ud, int32_t layer, int32_t which, const float *x, int32_t n_rows, int32_t n_in);
    void *ud;
};

// One forward step over batch b (arrays in backend memory). Writes K/V of every token into the
// cache, and logits of the b->n_out requested rows into s->logits [n_out][n_vocab].
// `m` holds weights readable by `be`.
void coopt_forward(const struct coopt_model *m, struct coopt_backend *be, struct coopt_kv_cache *kv,
                   const struct coopt_rope *rope, struct coopt_scratch *s, const struct coopt_batch *b,
                   const struct coopt_forward_hook *hook);

#endif // COOPT_FORWARD_H
