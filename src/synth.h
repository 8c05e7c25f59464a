/*
 * synth.h -- `coopt synth`: random-weight models in the exact shape and on-disk format of a
 * named LLaMA-family architecture, for benchmarks where real weights cannot be had.
 *
 * The output is a Hugging Face directory as the real checkpoints look: config.json (with a
 * transformers/AutoGPTQ quantization_config for GPTQ), quantize_config.json (GPTQ only, as
 * AutoGPTQ writes it), generation_config.json, model.safetensors or shards
 * model-0000i-of-0000N.safetensors + model.safetensors.index.json, the Llama 2 tokenizer.model
 * (copied), tokenizer_config.json, special_tokens_map.json and a README.md that says the weights
 * are random. Tensors are produced chunk by chunk inside the safetensors writer's callbacks, so
 * memory stays small whatever the model size (a 70B GPTQ is ~35 GB on disk).
 *
 * Determinism: every tensor's bytes are a function of (seed, tensor name, its shape and std)
 * only -- a counter-based splitmix64 stream indexed by the 8-byte word -- so the same seed gives
 * the same files for any shard size or chunking, and generation could be split over threads.
 *
 * Weight statistics (chosen so activations neither explode nor vanish over 80 layers):
 *   embed_tokens       N(0, 1)
 *   q/k/v/gate/up      N(0, 1/n_in)                        (unit-variance outputs for unit inputs)
 *   o_proj, down_proj  N(0, 1/n_in) std / sqrt(2 n_layers)  (the residual branches: 2L of them
 *                                                           add up to O(1) variance)
 *   norms              1
 *   lm_head            N(0, 1/dim)                          (logits ~ N(0, 1))
 * GPTQ weights are quantized by construction: 4-bit codes drawn from a discretized normal
 * (code - 8 in [-7, 7], std ~2.5 codes, as GPTQ's symmetric grid gives for Gaussian weights),
 * zero point 8 (sym; stored as 7 in the v1 format), per-group f16 scales varying +-12% around the
 * value that gives the target std above.
 */
#ifndef COOPT_SYNTH_H
#define COOPT_SYNTH_H

#include "coopt.h"

#include <stdbool.h>
#include <stdint.h>

// A named architecture with its Hugging Face config.json values.
struct coopt_synth_arch {
    const char *name;        // "llama2-7b"
    const char *hf_repo;     // the real checkpoint it mirrors, e.g. "meta-llama/Llama-2-7b-hf"
    int32_t     dim;         // hidden_size
    int32_t     ffn_dim;     // intermediate_size
    int32_t     n_layers;    // num_hidden_layers
    int32_t     n_heads;     // num_attention_heads
    int32_t     n_kv_heads;  // num_key_value_heads
    int32_t     n_vocab;     // vocab_size
    int32_t     n_ctx;       // max_position_embeddings
    double      rms_eps;     // rms_norm_eps
    double      rope_theta;  // rope_theta
    int32_t     bos_id, eos_id;
    const char *torch_dtype; // of the real f16/bf16 release ("float16", "bfloat16")
};

// Architecture by name, or NULL. The table is static.
const struct coopt_synth_arch *coopt_synth_arch_find(const char *name);
// Number of known architectures and the i-th one (0 <= i < count).
int                            coopt_synth_arch_count(void);
const struct coopt_synth_arch *coopt_synth_arch_at(int i);
// "llama2-7b, llama2-13b, ..." (static string).
const char *coopt_synth_arch_names(void);

struct coopt_synth_params {
    const char      *arch;            // architecture name (see coopt_synth_arch_names)
    enum coopt_dtype dtype;           // COOPT_DTYPE_F16, _BF16 or _Q4_GPTQ
    int32_t          group_size;      // GPTQ: a positive multiple of 8, or -1 (one group); default 128
    bool             act_order;       // GPTQ desc_act: g_idx is a random permutation-consistent map
    int32_t          n_layers;        // 0 = the architecture's
    int32_t          n_vocab;         // 0 = the architecture's; else the embedding / LM head rows
    uint64_t         seed;            // default 1
    const char      *out_dir;         // created if missing (one level)
    const char      *tokenizer;       // NULL: $COOPT_MODELS/llama2-tokenizer/tokenizer.model
                                      //       ($COOPT_MODELS defaults to ../shared/models)
    uint64_t         max_shard_bytes; // tensor bytes per shard; 0 = 5e9 (transformers' "5GB")
    bool             progress;        // tensor i/N, GB written, MB/s on stderr
};
struct coopt_synth_params coopt_synth_default_params(void);

// What a run wrote (or, for coopt_synth_plan, would write).
struct coopt_synth_result {
    char     model_name[128]; // e.g. "synth-llama2-7b-4L-gptq4-g128-act"
    int32_t  n_layers;
    int32_t  n_tensors;
    int32_t  n_shards;        // 1 = a single model.safetensors
    uint64_t n_params;        // parameters of the unquantized model
    uint64_t tensor_bytes;    // sum of tensor data bytes (the index's total_size)
    double   seconds;         // wall time of coopt_synth_write (0 for a plan)
};

// Validates p and computes the tensor list and shard plan without writing anything.
// COOPT_ERR_INVALID (one line naming the bad field; an unknown arch lists the known ones).
enum coopt_status coopt_synth_plan(const struct coopt_synth_params *p, struct coopt_synth_result *out);

// Writes the model directory. Files of a previous run in out_dir that this run might not
// overwrite (model.safetensors, model-*-of-*.safetensors, the index, quantize_config.json) are
// removed first so loaders never mix two runs; other files are left alone. Every safetensors file is written as "<name>.tmp" and renamed.
// Errors: COOPT_ERR_INVALID (parameters), COOPT_ERR_IO (directory not creatable/writable, short
// write, tokenizer missing), COOPT_ERR_NOMEM. res may be NULL.
enum coopt_status coopt_synth_write(const struct coopt_synth_params *p, struct coopt_synth_result *res);

#endif // COOPT_SYNTH_H
