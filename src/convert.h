/*
 * convert.h -- model conversion: format (GGUF <-> Hugging Face directory, llama2.c -> either),
 * weight type, and Opt-GQA restructuring of attention into fewer KV heads by mean pooling.
 *
 * The input is loaded with coopt_model_load (weights stay mmap'ed views) and the output is
 * written tensor by tensor through the streaming GGUF / safetensors writers: each output row is
 * produced on demand from the input rows, so no second copy of the model is ever held (a GPTQ
 * weight is dequantized one tensor at a time). Rows copied without change (same type, no
 * pooling) are copied byte for byte, so format round trips are bit-exact.
 *
 * RoPE layout: GGUF and llama2.c hold Q/K rows for interleaved pairs (2i, 2i+1), Hugging Face
 * for rotate-half pairs (i, i + d/2). Converting between them permutes the rows of each head of
 * Q and K (and their biases) exactly as llama.cpp's convert_hf_to_gguf.py `permute` does:
 * interleaved row 2i+s is rotate-half row s*d/2 + i (s = 0, 1). coopt_convert_rope_src_row()
 * is the one place that formula lives.
 */
#ifndef COOPT_CONVERT_H
#define COOPT_CONVERT_H

#include "coopt.h"
#include "model.h"

#include <stdbool.h>
#include <stdint.h>

enum coopt_convert_format {
    COOPT_CONVERT_AUTO = 0, // OUT ending in .gguf -> GGUF, else the input's format (llama2.c -> GGUF)
    COOPT_CONVERT_GGUF,
    COOPT_CONVERT_HF,       // directory: config.json + model.safetensors + tokenizer files
};

struct coopt_convert_params {
    enum coopt_convert_format to;
    int32_t                   kv_heads; // 0 = keep; else must divide the input's n_kv_heads
    int                       dtype;    // -1 = keep each tensor's type where the output format holds
                                        // it (else f16); or an enum coopt_dtype: f32 f16 bf16 (any
                                        // format), q8_0 q4_0 (GGUF only; rows not a multiple of 32
                                        // fall back to f16)
    bool                      verbose;  // one line per tensor on stderr
};
struct coopt_convert_params coopt_convert_default_params(void);

// Parses "gguf" / "hf"; false if unknown.
bool coopt_convert_format_parse(const char *s, enum coopt_convert_format *out);

// Converts the model at `in` (any format coopt_model_load reads) into `out` (a GGUF file or a
// Hugging Face directory, created if missing). Errors print one line and return:
// COOPT_ERR_INVALID (kv_heads not a divisor of n_kv_heads or larger, a dtype the output format
// cannot hold, out == in), COOPT_ERR_IO (output not writable), COOPT_ERR_UNSUPPORTED (e.g. a
// byte-level BPE vocabulary without tokenizer.json going to a Hugging Face directory), or the
// loader's status. A failed GGUF / safetensors write leaves no partial file behind.
enum coopt_status coopt_convert(const char *in, const char *out, const struct coopt_convert_params *p);

// RoPE row permutation within one head of head_dim (even) rows: the row of the `from` layout
// that becomes row `row` of the `to` layout. Identity when from == to.
int32_t coopt_convert_rope_src_row(int32_t row, int32_t head_dim, enum coopt_rope_layout from,
                                   enum coopt_rope_layout to);

#endif // COOPT_CONVERT_H
