/*
 * quantize.h -- GPTQ (Frantar et al., 2022) and round-to-nearest 4-bit weight quantization, the
 * calibration Hessian, and packing into the standard GPTQ checkpoint tensors (layout in gptq.h).
 *
 * The quantization grid follows AutoGPTQ / GPTQModel (quant.py, gptq.py), per group of input
 * columns and per output row:
 *   asym: scale = (max(xmax,0) - min(xmin,0)) / maxq, zero = round(-xmin / scale)
 *   sym:  scale = 2 * max|x| / maxq,                     zero = (maxq + 1) / 2  (8 for 4 bits)
 *   q = clamp(round(x / scale) + zero, 0, maxq),  x_hat = scale * (q - zero)
 * Three deliberate differences, all in the direction of exactness:
 *   - scales are rounded to f16 when they are computed, so the error GPTQ propagates is the
 *     error of the weights the checkpoint actually stores (AutoGPTQ rounds afterwards, at pack
 *     time, and re-derives q from the f16 scale);
 *   - a group's scale/zero come from its columns as they are at the group's first column, all
 *     earlier updates applied (AutoGPTQ reads the block's not-yet-updated copy for groups that
 *     start inside a block; GPTQModel does the same);
 *   - the zero point is kept in [1, maxq] (asym) because the v1 checkpoint format ("gptq", the
 *     one transformers reads) stores zero - 1 in 4 bits: a group whose minimum is ~0 gets
 *     scale = xmax / (maxq - 1), zero = 1 instead of zero = 0 (AutoGPTQ writes -1 there, which
 *     corrupts the neighbouring nibbles). Sym groups whose values are all >= 0 use -xmax as
 *     their minimum (AutoGPTQ keeps 0 and clips the top half).
 *
 * GPTQ, per linear layer W [n_out][n_in] with H = 2 X^T X / n_tokens [n_in][n_in]:
 *   dead inputs (H_ii == 0): W[:, i] = 0, H_ii = 1; act-order: columns sorted by descending
 *   diag(H) (stable); H += damp * mean(diag H) * I; U = upper Cholesky factor of H^-1;
 *   columns are quantized left to right in blocks of 128 (a multiple of the group size): the
 *   error e_i = (w_i - q_i) / U_ii is propagated to the block's later columns at once
 *   (W[:, j] -= e_i U_ij) and, at the end of the block, to all later columns in one
 *   rank-128 update. With act-order, g_idx[c] = (position of column c in the order) / group_size
 *   and q, g_idx are returned in the original column order (AutoGPTQ's desc_act semantics).
 *   RTN is the same loop without H (no propagation; act-order is meaningless and rejected).
 */
#ifndef COOPT_QUANTIZE_H
#define COOPT_QUANTIZE_H

#include "coopt.h"

#include <stdbool.h>
#include <stdint.h>

struct coopt_threadpool;

struct coopt_quant_params {
    int32_t     bits;       // 2..8 (the checkpoint writer handles 4)
    int32_t     group_size; // > 0, or -1 for one group over all inputs
    bool        act_order;  // GPTQ only
    bool        sym;
    double      damp;       // fraction of mean(diag H) added to the diagonal (0.01)
    int32_t     block_size; // GPTQ lazy-batch block (0 = 128); rounded to a multiple of group_size
    const char *name;       // layer name for messages (may be NULL)
};
struct coopt_quant_params coopt_quant_default_params(void);

// One quantized matrix, every array in the ORIGINAL input-column order. Owns its arrays.
struct coopt_quant_result {
    int64_t  n_in, n_out;
    int32_t  n_groups;   // ceil(n_in / group_size), or 1
    int32_t  group_size; // as requested (-1 = one group)
    int32_t  bits;
    uint8_t *q;          // [n_out][n_in] integers 0..maxq
    uint16_t *scale;     // [n_groups][n_out] f16 bits
    uint8_t *zero;       // [n_groups][n_out] real zero point 1..maxq (sym: 2^(bits-1))
    int32_t *g_idx;      // [n_in] group of each input column
    double   loss;       // GPTQ's running loss sum((w - q)^2 / U_ii^2) / 2 (RTN: sum (w-q)^2 / 2)
    double   damp_used;  // the dampening that made H positive definite
};
void coopt_quant_result_free(struct coopt_quant_result *r); // zeroes it; NULL ok

// Quantizes w [n_out][n_in] (f32, row-major). h [n_in][n_in] is the symmetric calibration
// Hessian (only read; NULL = round to nearest). Errors: COOPT_ERR_INVALID for bad parameters
// (bits, group size, act-order without H), COOPT_ERR_FORMAT naming the layer when H is not
// positive definite even after raising the dampening 4 times (x10 each), COOPT_ERR_NOMEM.
// tp (may be NULL) parallelises the column updates over output rows. *r is zeroed on failure.
enum coopt_status coopt_quant_gptq(const float *w, const double *h, int64_t n_out, int64_t n_in,
                                   const struct coopt_quant_params *p, struct coopt_threadpool *tp,
                                   struct coopt_quant_result *r);

// out [n_out][n_in] = scale * (q - zero), exact in f32.
void coopt_quant_dequant(const struct coopt_quant_result *r, float *out);

// tr((W - Q) H (W - Q)^T) = sum_o d_o^T H d_o, d = w - wq (the GPTQ objective), in double.
double coopt_quant_proxy_loss(const float *w, const float *wq, const double *h, int64_t n_out, int64_t n_in);

// ---- calibration Hessian ----

// Adds the upper triangle of X^T X (x [n_rows][n] f32) into sum [n][n] (double, row-major).
// Threads of tp (may be NULL) split the rows of sum.
void coopt_quant_hessian_add(double *sum, int64_t n, const float *x, int32_t n_rows, struct coopt_threadpool *tp);
// sum (upper triangle filled) -> H = 2 * sum / n_tokens, symmetric.
void coopt_quant_hessian_finish(double *sum, int64_t n, int64_t n_tokens);

// ---- checkpoint tensors (GPTQ v1: stored zero = zero - 1) ----

// Packs r (bits must be 4, n_in and n_out multiples of 8) into qweight [n_in/8][n_out],
// qzeros [n_groups][n_out/8], scales [n_groups][n_out] (f16) and g_idx [n_in].
// COOPT_ERR_UNSUPPORTED naming the layer when the shape cannot be packed.
enum coopt_status coopt_quant_pack(const struct coopt_quant_result *r, const char *name, int32_t *qweight,
                                   int32_t *qzeros, uint16_t *scales, int32_t *g_idx);

// ---- whole model -> GPTQ checkpoint directory ----

enum coopt_quant_seq {
    COOPT_QUANT_SEQ_NONE = 0, // every Hessian from the float model (one calibration pass)
    COOPT_QUANT_SEQ_LAYER,    // layer l's Hessians with layers < l already quantized (default)
    COOPT_QUANT_SEQ_TRUE,     // also within a layer: q/k/v, then o, then gate/up, then down
};

struct coopt_quantize_opts {
    struct coopt_quant_params qp;        // bits (4), group size, act-order, sym, damp
    bool                      gptq;      // false: round to nearest (no calibration)
    enum coopt_quant_seq      sequential;
    const char *const        *calib_files; // [n_calib_files] text files, tokenized and concatenated
    int                       n_calib_files;
    int32_t                   n_calib;   // calibration sequences (128)
    int32_t                   calib_len; // tokens per sequence, BOS included (512)
    int32_t                   n_threads; // 0 = all cores
    const char               *dump_dequant; // optional: safetensors of the dequantized f32 weights
    const char               *tokenizer_dir; // tokenizer files to ship with a GGUF / llama2.c input
};
struct coopt_quantize_opts coopt_quantize_default_opts(void);

// Quantizes every linear layer of the model at `in_dir` and writes a GPTQ checkpoint (v1 zeros,
// "checkpoint_format": "gptq") to `out_dir` (created if missing): config.json (a Hugging Face
// input's own, plus quantization_config and torch_dtype float16), quantize_config.json
// (AutoGPTQ), model.safetensors (qweight/qzeros/scales/g_idx per linear; embeddings, LM head
// and norms in f16; "format": "pt" metadata) and the tokenizer files found in in_dir.
// A GGUF or llama2.c input needs o->tokenizer_dir (a Hugging Face directory whose tokenizer
// files encode exactly as the model's own vocabulary: checked on the calibration text); its
// config.json is synthesized and its Q/K rows are permuted from interleaved to the rotate-half
// RoPE layout. An intermediate size that is not a multiple of 8 (stories260K: 172) is padded
// with zero rows of gate/up and zero columns of down: the padded model computes exactly the
// same function, and its config.json says the padded size.
// GPTQ calibration runs the model over the calibration text through the forward hook; with
// sequential quantization the already quantized layers run with their dequantized weights.
// Progress (one line per layer) goes to the info log. Errors: COOPT_ERR_UNSUPPORTED for a
// non-HF input without tokenizer_dir, an already quantized model, bits != 4 or a hidden or
// attention size that is not a multiple of 8 (named); COOPT_ERR_INVALID for bad options, too
// little calibration text or a mismatching tokenizer; COOPT_ERR_IO for unwritable output.
enum coopt_status coopt_quantize_model(const char *in_dir, const char *out_dir, const struct coopt_quantize_opts *o);

#endif // COOPT_QUANTIZE_H
