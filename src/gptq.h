/*
 * gptq.h -- GPTQ 4-bit weights: validation of the standard checkpoint tensors, repacking into
 * the layout the CPU kernels stream, and the scalar references.
 *
 * On disk (AutoGPTQ / GPTQModel / transformers), for a linear layer y = x W^T with W [out][in]:
 *   qweight int32 [in/8][out]        8 4-bit values along the INPUT dim, low nibble = row 8r+0
 *   qzeros  int32 [groups][out/8]    8 4-bit zeros along the OUTPUT dim, low nibble first
 *   scales  f16   [groups][out]
 *   g_idx   int32 [in]               optional (act-order / desc_act): group of each input row
 *   W[o][i] = scales[g][o] * (q[i][o] - zero[g][o]),  g = g_idx[i] or i / group_size
 * groups = ceil(in / group_size), or 1 for group_size -1. Zero-point convention: v1 checkpoints
 * ("checkpoint_format": "gptq", the AutoGPTQ/transformers default) store zero - 1, so the real
 * zero is stored + 1 (range 1..16, as the AutoGPTQ/exllama kernels compute it); v2 ("gptq_v2",
 * GPTQModel's internal format) stores the real zero.
 *
 * In memory (struct coopt_gptq_weight): input rows are reordered ONCE at load so that every
 * group is a contiguous run of whole 32-row blocks (act-order rows sorted by group; a group
 * whose size is not a multiple of 32 is padded with zero rows). `perm` maps a padded row back to
 * its input index, and the kernels apply it when they quantize the activation row (one pass
 * per call), so the hot loop has no gather. Output columns are cut into 16-wide "subtiles"
 * (one AVX-512 register of f32 / int32 lanes); each subtile's weights are contiguous:
 *
 *   qw    uint32 [n_sub][k_pad/8][16]   dword of padded rows 8r..8r+7 of column 16t+j, with
 *                                       GPTQ's nibble order (nibble n = row 8r+n), so a
 *                                       non-act-order checkpoint repacks by plain copies
 *   scale uint16 [n_sub][groups][16]    f16 bits (0 in padded columns)
 *   zero  uint8  [n_sub][groups][16]    real zero point, 0..16
 *
 * The kernels read the dword with lo = dw & 0x0f0f0f0f (rows 0,2,4,6) and hi = (dw >> 4) &
 * 0x0f0f0f0f (rows 1,3,5,7), and lay the int8 activations out in that order.
 */
#ifndef COOPT_GPTQ_H
#define COOPT_GPTQ_H

#include "coopt.h"
#include "model.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define COOPT_GPTQ_SUB 16 // output columns per subtile
#define COOPT_GPTQ_BLK 32 // input rows per activation quantization block

// The checkpoint tensors of one linear layer: borrowed pointers (e.g. into an mmap'ed
// safetensors file), their shapes and dtypes as the file declares them. Nothing is trusted:
// coopt_gptq_repack checks every shape and value range against n_in / n_out.
struct coopt_gptq_src {
    const char      *name;          // tensor name prefix for messages, e.g. "model.layers.0.mlp.up_proj"
    int64_t          n_in, n_out;   // expected shape of W [n_out][n_in]
    int32_t          bits;          // 4 (anything else: COOPT_ERR_UNSUPPORTED)
    int32_t          group_size;    // 32, 64, 128, ... or -1 (one group over all inputs)
    bool             zeros_v1;      // true: stored zero = real zero - 1 ("gptq"), false: "gptq_v2"
    const int32_t   *qweight;       // [qweight_shape[0]][qweight_shape[1]] = [n_in/8][n_out]
    int64_t          qweight_shape[2];
    enum coopt_dtype qweight_dtype; // must be I32
    const int32_t   *qzeros;        // [groups][n_out/8]
    int64_t          qzeros_shape[2];
    enum coopt_dtype qzeros_dtype;  // must be I32
    const uint16_t  *scales;        // [groups][n_out]
    int64_t          scales_shape[2];
    enum coopt_dtype scales_dtype;  // must be F16
    const int32_t   *g_idx;         // [g_idx_len] = [n_in], or NULL
    int64_t          g_idx_len;
    enum coopt_dtype g_idx_dtype;   // must be I32 when g_idx != NULL
};

// The repacked weight (see the file comment). Owns all of its arrays; free with
// coopt_gptq_weight_free. Immutable after coopt_gptq_repack, so threads share it freely.
struct coopt_gptq_weight {
    int64_t   n_in, n_out;
    int64_t   k_pad;      // padded input rows, a multiple of 32 (>= n_in)
    int64_t   n_sub;      // ceil(n_out / 16)
    int32_t   n_groups;
    int32_t   group_size; // as in the checkpoint (-1 = one group)
    bool      sym_hint;   // every zero point is 8 (informational)
    int32_t  *grp_blk;    // [n_groups + 1] first 32-row block of each group in padded rows
    int32_t  *perm;       // [k_pad] input row of each padded row, -1 = padding; NULL = identity
                          //         (padded row k < n_in is input row k, rows >= n_in are zero)
    uint32_t *qw;         // [n_sub][k_pad/8][16]
    uint16_t *scale;      // [n_sub][n_groups][16] f16
    uint8_t  *zero;       // [n_sub][n_groups][16]
};

// Validates src and builds the repacked weight. Errors: COOPT_ERR_FORMAT naming the tensor
// ("tensor 'P.qzeros' shape [4,48], expected [4,96]", "tensor 'P.g_idx' value 9 at 17 out of
// range [0,4)"), COOPT_ERR_UNSUPPORTED (bits != 4), COOPT_ERR_NOMEM; *out is NULL on failure.
// n_threads > 1 repacks act-order weights on that many threads (0 = 1).
enum coopt_status coopt_gptq_repack(const struct coopt_gptq_src *src, int n_threads,
                                    struct coopt_gptq_weight **out);
void coopt_gptq_weight_free(struct coopt_gptq_weight *w);

// Bytes the kernels read per full pass over the weight (weights + scales + zeros).
int64_t coopt_gptq_weight_bytes(const struct coopt_gptq_weight *w);

// Fills a coopt_weight view of w (dtype Q4_GPTQ). `bias` [n_out] or NULL; both are borrowed.
void coopt_gptq_as_weight(const struct coopt_gptq_weight *w, const float *bias, struct coopt_weight *out);

// Scalar reference: the dequantized matrix out [n_out][n_in] in f32, exact
// (f16 scale times a small integer is exact in f32).
void coopt_gptq_dequant_ref(const struct coopt_gptq_weight *w, float *out);

// ---- CPU matmul (src/cpu/matmul_gptq.c) ----

struct coopt_threadpool;

// Which code path runs the matmul. AUTO picks the best one compiled in (-march).
enum coopt_gptq_isa {
    COOPT_GPTQ_ISA_AUTO = 0,
    COOPT_GPTQ_ISA_SCALAR,     // portable C with the same int8 activation arithmetic
    COOPT_GPTQ_ISA_AVX2,       // AVX2 (+ AVX-VNNI when compiled with it)
    COOPT_GPTQ_ISA_AVX512VNNI, // AVX-512 + VNNI
};
// True if the path is compiled into this build (AUTO and SCALAR always are).
bool coopt_gptq_isa_available(enum coopt_gptq_isa isa);

// out [n_rows][n_out] = x [n_rows][n_in] @ W^T, f32 in and out; no bias (the caller adds
// coopt_weight.bias). Activations are quantized on the fly to int8 per block of 32 padded
// rows with an f32 scale (amax / 127, round to nearest even), then multiplied with the
// unsigned 4-bit weights in int32 and corrected for the zero point in f32:
//   sum_i s (q_i - z) x_i  ~=  s * sum_b d_b * (sum_{i in b} q_i xq_i)  -  s z * sum_b d_b sum xq_i
// The error against the exact f32 product is at most sum_b (d_b / 2) * sum_{i in b} |W[o][i]|
// (half a quantum per activation) plus f32 rounding. Columns are split over the pool's threads
// (tp may be NULL: single thread). Decode (n_rows small) streams every weight once; prefill
// processes rows in blocks so each weight tile is read once per block of up to 8 rows.
// Returns COOPT_ERR_NOMEM if the activation scratch cannot be allocated (large n_rows only).
enum coopt_status coopt_gptq_matmul_cpu(struct coopt_threadpool *tp, float *out, const float *x,
                                        const struct coopt_gptq_weight *w, int32_t n_rows);
// Same with an explicit code path (tests and benchmarks). An unavailable isa falls back to AUTO.
enum coopt_status coopt_gptq_matmul_cpu_isa(struct coopt_threadpool *tp, float *out, const float *x,
                                            const struct coopt_gptq_weight *w, int32_t n_rows,
                                            enum coopt_gptq_isa isa);
// The steps of coopt_gptq_matmul_cpu, for callers that schedule the work themselves (the fused
// CPU ops run several weights in one pool dispatch):
// Bytes of the prepared (int8) activations of n_rows rows for w (a multiple of 64).
size_t coopt_gptq_act_bytes(const struct coopt_gptq_weight *w, int32_t n_rows);
// True if a and b quantize an activation row identically (same padded rows and groups, no
// act-order permutation), so one prepared x serves both.
bool coopt_gptq_act_shared(const struct coopt_gptq_weight *a, const struct coopt_gptq_weight *b);
// Quantizes rows [r_lo, r_hi) of x [n_rows][n_in] into act (coopt_gptq_act_bytes(w, n_rows)
// bytes, 64-byte aligned); disjoint row ranges may be prepared by different threads.
void coopt_gptq_act_prepare(const struct coopt_gptq_weight *w, const float *x, int32_t n_rows, int32_t r_lo,
                            int32_t r_hi, void *act, enum coopt_gptq_isa isa);
// Output columns of subtiles [t_lo, t_hi) (16 columns each) for all rows: v = x·W[o] (+ bias[o]),
// stored as out[r][o] = v, or out[r][o] + v when `add` (the residual add fused into the store).
void coopt_gptq_run(const struct coopt_gptq_weight *w, const void *act, int32_t n_rows, int64_t t_lo, int64_t t_hi,
                    float *out, const float *bias, bool add, enum coopt_gptq_isa isa);
// Subtiles per chunk of work when nth threads share w (~4 chunks per thread, a multiple of 4).
int64_t coopt_gptq_chunk(const struct coopt_gptq_weight *w, int32_t nth);
// Exact f32 reference: out = x @ W^T with W dequantized, double accumulation. Slow.
void coopt_gptq_matmul_ref(float *out, const float *x, const struct coopt_gptq_weight *w, int32_t n_rows);

#endif // COOPT_GPTQ_H
