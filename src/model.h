/*
 * model.h -- the in-memory LLaMA model: configuration, weights (views into mmap'ed files) and
 * the loaders that fill them.
 *
 * Weight matrices are row-major [n_out][n_in] in their storage type (one row per output
 * feature, GGML's ne[0] = n_in), which is how GGUF, safetensors (nn.Linear) and llama2.c all
 * store them, so no loader transposes anything. Norm vectors are converted to owned f32 at
 * load. Q/K projection rows stay in the file's RoPE layout; config.rope_layout says which.
 */
#ifndef COOPT_MODEL_H
#define COOPT_MODEL_H

#include "coopt.h"
#include "util.h"

#include <stdbool.h>
#include <stdint.h>

enum coopt_rope_layout {
    COOPT_ROPE_INTERLEAVED = 0, // rotate pairs (2i, 2i+1): GGUF, llama2.c
    COOPT_ROPE_HALF,            // rotate (i, i + d/2): Hugging Face ("rotate_half", NEOX)
};

enum coopt_rope_scaling {
    COOPT_ROPE_SCALING_NONE = 0,
    COOPT_ROPE_SCALING_LINEAR,
    COOPT_ROPE_SCALING_LLAMA3,
};

struct coopt_model_config {
    int32_t n_vocab;
    int32_t dim;          // hidden size
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;     // usually dim / n_heads
    int32_t ffn_dim;      // intermediate size
    int32_t n_ctx_train;  // max_position_embeddings / context_length
    int32_t sliding_window; // 0 = full attention
    float   norm_eps;
    float   rope_theta;
    enum coopt_rope_layout  rope_layout;
    enum coopt_rope_scaling rope_scaling;
    float   rope_factor;            // linear / llama3 factor
    float   rope_low_freq_factor;   // llama3
    float   rope_high_freq_factor;  // llama3
    int32_t rope_orig_ctx;          // llama3 original_max_position_embeddings
    bool    tied_embeddings;        // output == token embedding
};

// A weight matrix [n_out][n_in] or a vector (n_out == 1).
struct coopt_weight {
    enum coopt_dtype dtype;
    int64_t          n_in, n_out;
    const void      *data;    // row-major, rows of coopt_dtype_row_bytes(dtype, n_in) bytes
    // GPTQ (dtype == COOPT_DTYPE_Q4_GPTQ); filled by the GPTQ loader, NULL otherwise.
    const void      *gptq;    // struct coopt_gptq_weight *, see gptq.h
    const float     *bias;    // [n_out] or NULL
};

struct coopt_layer {
    const float        *attn_norm; // [dim] f32 (owned by the model)
    const float        *ffn_norm;  // [dim] f32
    struct coopt_weight wq;        // [n_heads*head_dim][dim]
    struct coopt_weight wk;        // [n_kv_heads*head_dim][dim]
    struct coopt_weight wv;        // [n_kv_heads*head_dim][dim]
    struct coopt_weight wo;        // [dim][n_heads*head_dim]
    struct coopt_weight w_gate;    // [ffn_dim][dim]  (w1)
    struct coopt_weight w_up;      // [ffn_dim][dim]  (w3)
    struct coopt_weight w_down;    // [dim][ffn_dim]  (w2)
};

#define COOPT_MAX_FILES 64

struct coopt_model {
    struct coopt_model_config config;
    struct coopt_model_info   info;
    struct coopt_weight       tok_embd; // [n_vocab][dim]
    const float              *out_norm; // [dim] f32
    struct coopt_weight       output;   // [n_vocab][dim] (== tok_embd when tied)
    struct coopt_layer       *layers;   // [n_layers], coopt_calloc'ed by the loader, freed by coopt_model_free
    struct coopt_tokenizer   *tokenizer;
    // generation defaults from the file (generation_config.json); NAN / -1 if absent
    float                     gen_temp, gen_top_p;
    int32_t                   gen_top_k;
    // owned resources
    struct coopt_mmap         files[COOPT_MAX_FILES];
    int                       n_files;
    struct coopt_gptq_weight **gptq;    // [n_gptq] repacked GPTQ weights owned by the model
    int                        n_gptq, cap_gptq;
    void                    **allocs;   // owned allocations freed with the model
    int                       n_allocs, cap_allocs;
    struct coopt_model_params params;
};

// ---- helpers for loaders ----

// Allocates memory owned by the model (freed by coopt_model_free). NULL on failure (logged).
void *coopt_model_alloc(struct coopt_model *m, size_t n);
struct coopt_gptq_weight;
// Hands a repacked GPTQ weight to the model (freed by coopt_model_free; also on failure).
enum coopt_status coopt_model_own_gptq(struct coopt_model *m, struct coopt_gptq_weight *w);
// Maps a file and records it in m->files. The mapping lives until coopt_model_free.
enum coopt_status coopt_model_map_file(struct coopt_model *m, const char *path, struct coopt_mmap **out);
// Converts a norm vector of `n` elements (type t at src) into owned f32.
enum coopt_status coopt_model_f32_vector(struct coopt_model *m, enum coopt_dtype t, const void *src,
                                         int64_t n, const float **out);
// Checks every weight's presence, dtype and shape against m->config; prints
// "<file>: tensor '<name>' shape [a,b], expected [c,d]"-style errors (names in the loader's
// own convention come from `file`, which may be NULL). Fills m->info. Returns FORMAT on error.
enum coopt_status coopt_model_finish(struct coopt_model *m, const char *file);

// Loaders: fill config, weights and tokenizer of a zeroed model. Each returns a status and
// leaves partial state for coopt_model_free to release.
enum coopt_status coopt_gguf_load_model(struct coopt_model *m, const char *path);
enum coopt_status coopt_hf_load_model(struct coopt_model *m, const char *dir);
enum coopt_status coopt_llama2c_load_model(struct coopt_model *m, const char *path);

#endif // COOPT_MODEL_H
