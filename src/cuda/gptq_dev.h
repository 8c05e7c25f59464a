/*
 * gptq_dev.h -- GPTQ int4 weights on the CUDA backend (src/cuda/gptq.cu): the device form of a
 * repacked weight and the plain-C entry points (model upload, matmul dispatch, tests, benches).
 *
 * A Q4_GPTQ struct coopt_weight of a CUDA device model has `data` = the packed int4 codes on the
 * device and `gptq` = a host struct cuda_gptq_weight (below) describing them; the host model's
 * struct coopt_gptq_weight (src/gptq.h) is the source, repacked once at upload into the layout
 * the kernels want (file comment of gptq.cu).
 */
#ifndef COOPT_CUDA_GPTQ_DEV_H
#define COOPT_CUDA_GPTQ_DEV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" { // the C headers below too (C linkage when a .cu file includes this first)
#endif

#include "backend.h"
#include "gptq.h"

// One GPTQ weight on the device. Host struct, device arrays (one allocation, `buf`).
struct cuda_gptq_weight {
    int64_t         n_in, n_out;
    int64_t         k_pad;     // padded input rows, a multiple of 64 (>= the host weight's k_pad)
    int32_t         n_ot;      // column tiles of 16: ceil(n_out / 16)
    int32_t         n_kc;      // 64-row chunks: k_pad / 64
    int32_t         n_groups;
    bool            direct;    // no permutation and k_pad == n_in: the kernels read x in place
    uint64_t        perm_hash; // 0 for the identity; equal hashes = equal row orders (x gathered once)
    const void     *qw;        // uint32 [n_ot][n_kc][32 lanes][4]: the mma fragment layout (gptq.cu)
    const uint32_t *sz;        // [n_ot][n_groups][16] f16 scale bits | zero point << 16
    const int32_t  *kb_grp;    // [k_pad / 32] group of each 32-row block (GEMV)
    const uint32_t *kc_grp;    // [k_pad / 64] groups of the two 32-row halves of a chunk: lo | hi << 16
    const int32_t  *perm;      // [k_pad] input row of each padded row, -1 = zero row; NULL = identity
    int32_t        *cnt;       // [n_ot] arrival counters of the int8 GEMV's K splits, 0 between calls
    void           *buf;       // the device allocation holding the arrays above (cudaFree)
    size_t          bytes;     // its size
};

// Device bytes cuda_gptq_upload will allocate for hw.
size_t cuda_gptq_dev_bytes(const struct coopt_gptq_weight *hw);

// Repacks hw onto the device (the backend's stream; returns after the copy is done). Fills *dw;
// the caller owns dw->buf and frees it with cuda_gptq_release. Errors: COOPT_ERR_NOMEM (device
// memory, logged), COOPT_ERR_UNSUPPORTED (shapes beyond int32 tile counts).
enum coopt_status cuda_gptq_upload(struct coopt_backend *be, const struct coopt_gptq_weight *hw,
                                   struct cuda_gptq_weight *dw);
void cuda_gptq_release(struct cuda_gptq_weight *dw); // NULL / empty ok

// out [n_rows][n_out] = x [n_rows][n_in] @ W^T (+ bias [n_out]); x, out, bias device memory.
// Picks the f32 GEMV (1 row; the int8 GEMV for 1-8 rows with COOPT_GPTQ_GEMV=i8), the
// tensor-core kernel (2-159 rows) or dequantize + cuBLAS (see gptq.cu).
void cuda_gptq_matmul(struct coopt_backend *be, float *out, const float *x, const struct cuda_gptq_weight *w,
                      const float *bias, int32_t n_rows);

// n (1..4) projections of one input, outs[j] = x @ Wj^T (+ biases[j], NULL entries ok): every
// weight must have the same n_in. For one row (decode; 1-8 rows with the int8 GEMV) one GEMV
// launch covers all of them and x is gathered (quantized) once per distinct act-order
// permutation; more rows run them one by one. For the
// fused q/k/v of backend.h's matmul_multi.
void cuda_gptq_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                            const struct cuda_gptq_weight *const *ws, const float *const *biases, int32_t n_rows);

// The fused ops of backend.h on GPTQ weights in one GEMV launch, where a decode GEMV applies: one
// row; the tensor-core GEMV: one act-order permutation for all weights, and with norm none at all
// (direct weights) and x and norm 16-byte aligned; the f32 GEMV (COOPT_GPTQ_GEMV=f32): with norm,
// direct weights, x and norm 16-byte aligned, n_in <= 12288.
// STORE outs[j] = norm(x) @ Wj^T + biases[j] (n = 1..4); ADD outs[0] += x @ W0^T + bias (n = 1);
// SWIGLU outs[0] = silu(x @ W0^T + b0) * (x @ W1^T + b1) (n = 2, W0 gate, W1 up).
// norm: RMS norm weights [n_in] (x * 1/sqrt(mean(x^2) + eps) * norm), NULL = x as it is.
// Returns false (nothing enqueued) when the fused GEMV does not apply; the caller composes the op.
// xst (NULL = none): the input staged by the GEMV before and where to stage this one's output;
// see struct cuda_gptq_xstage.
enum cuda_gptq_fused { CUDA_GPTQ_FUSED_STORE = 0, CUDA_GPTQ_FUSED_ADD, CUDA_GPTQ_FUSED_SWIGLU };
struct cuda_gptq_xstage;
bool cuda_gptq_gemv_fused(struct coopt_backend *be, enum cuda_gptq_fused mode, int32_t n, float *const *outs,
                          const float *x, const float *norm, float eps, const struct cuda_gptq_weight *const *ws,
                          const float *const *biases, int32_t n_rows, struct cuda_gptq_xstage *xst);

// A decode GEMV's input prepared by the GEMV before it (backend.h: matmul_add_then_norm,
// norm_matmul_swiglu_then_add). With one row, the tensor-core GEMV in ADD or SWIGLU mode can write
// its output y, times the next GEMV's norm weights, as f16 in the order that GEMV stages x in
// shared memory, followed by one float2 per 16 columns {sum of y^2, amax(y * norm)}; the next
// GEMV (direct weights, n_in == the staged length) then copies its rows instead of converting x
// (gptq_hgemv_kernel). Buffer layout for n values: cuda_gptq_xstage_bytes(n), partials at
// cuda_gptq_xstage_part(n), 16-byte aligned.
struct cuda_gptq_xstage {
    const void  *in;        // staged input for this call, NULL = none
    int64_t      n_in;      // its length (the call uses it only when it equals the weights' k_pad)
    void        *out;       // where this call may stage its output, NULL = nowhere
    size_t       out_bytes; // room there
    const float *out_norm;  // the next GEMV's norm weights [n_out], NULL = none (SwiGLU -> down)
    bool         staged;    // set when this call's launch writes `out`
};
static inline size_t cuda_gptq_xstage_part(int64_t n) { return ((size_t)n * 2 + 15) & ~(size_t)15; }
static inline size_t cuda_gptq_xstage_bytes(int64_t n) { return cuda_gptq_xstage_part(n) + (size_t)((n + 15) / 16) * 8; }
// Launches so far that staged their output / used a staged input (tests).
void cuda_gptq_xstage_counts(int64_t *made, int64_t *used);
// (tests) The staged copy of x that the next GEMV op would take, if any: its device address and
// length (layout of struct cuda_gptq_xstage). Returns false (NULL, 0) when none is recorded for x.
bool cuda_xstage_peek(struct coopt_backend *be, const float *x, const void **buf, int64_t *n);

// ---- for tests and benches ----

enum cuda_gptq_path {
    CUDA_GPTQ_AUTO = 0,
    CUDA_GPTQ_GEMV,   // f32 GEMV, rows in groups of up to 8; `param` = warps per block (4, 8, 16; 0 = auto)
    CUDA_GPTQ_MMA,    // int4 -> f16 in registers + mma.sync m16n8k16; `param` = tokens per block (16, 32, 64,
                      // 128; 0 = auto) | K splits << 8 (0 = auto)
    CUDA_GPTQ_CUBLAS, // dequantize to an f16 scratch matrix + cublasGemmEx
    CUDA_GPTQ_GEMV_I8, // x quantized to int8 + int4 x int8 mma; rows in groups of up to 8; `param` = warps per
                       // block (4, 8, 16; 0 = auto) | K splits << 8 (0 = auto: 1)
    CUDA_GPTQ_HGEMV,   // exact f16 (q - z) x f16 x mma, f32 sums, codes through a register ring; 1-8 rows;
                       // `param` = warps per block (4, 8, 16; 0 = auto) | register cap << 8 (80, 72; 0 = auto)
};

// The GEMV decode uses (process-wide): H, the tensor-core GEMV (x rounded to f16, 1-8 rows), the
// f32 one (exact products, 1 row) or the int8 one (x quantized to int8 per 32 rows, as the CPU
// kernels do; 1-8 rows). DEFAULT = $COOPT_GPTQ_GEMV ("h", "f32" or "i8") when set, else the
// built-in choice (gptq.cu: H). Rows beyond the chosen GEMV's take the tensor-core kernel
// (MMA) or cuBLAS.
enum cuda_gptq_gemv {
    CUDA_GPTQ_GEMV_MODE_DEFAULT = 0,
    CUDA_GPTQ_GEMV_MODE_F32,
    CUDA_GPTQ_GEMV_MODE_I8,
    CUDA_GPTQ_GEMV_MODE_H,
};
void                cuda_gptq_set_gemv(enum cuda_gptq_gemv g);
// Changes with every cuda_gptq_set_gemv / cuda_gptq_set_pdl: recorded decode steps (step.cu) key
// on it, so a step recorded with other kernels is not replayed.
uint32_t            cuda_gptq_config_epoch(void);
enum cuda_gptq_gemv cuda_gptq_get_gemv(void); // the effective choice, never DEFAULT
// Programmatic dependent launch for the int8 GEMV's two kernels (sm_90 and later): 1 on, 0 off,
// -1 = default (on unless $COOPT_GPTQ_PDL=0). Process-wide.
void cuda_gptq_set_pdl(int on);
// Register cap of the tensor-core GEMV (its kernels exist for a high cap, 80, and a low one, 72;
// 64 for the instances without norm or SwiGLU): 0 = automatic (80 where the grid fits the GPU in
// one wave, else the low cap), 80 or 72 = that cap for every launch, -1 = the default
// ($COOPT_GPTQ_HGEMV_REGS if set, else automatic). Process-wide.
void cuda_gptq_set_hgemv_regs(int regs);
// Tests: lowers the dynamic shared memory the tensor-core GEMV may use per block below what the
// device gives (bytes; 0 = the device's limit), as on a GPU with less shared memory: launches
// needing more take the other GEMVs. Process-wide.
void cuda_gptq_set_hgemv_smem_limit(size_t bytes);
// The path cuda_gptq_matmul takes for n_rows (never CUDA_GPTQ_AUTO).
enum cuda_gptq_path cuda_gptq_auto_path(const struct cuda_gptq_weight *w, int32_t n_rows);
void cuda_gptq_matmul_path(struct coopt_backend *be, float *out, const float *x, const struct cuda_gptq_weight *w,
                           const float *bias, int32_t n_rows, enum cuda_gptq_path path, int param);

// The int8 GEMV's automatic launch configuration for `tiles` 16-column tiles of n_kc 64-row chunks:
// warps per block and K splits (what param 0 picks).
void cuda_gptq_i8_auto_config(struct coopt_backend *be, int64_t tiles, int32_t n_kc, int *nw, int *n_split);

// Times fn(arg, i) for i = 0..reps-1, captured once into a CUDA graph on the backend's stream and
// replayed (warm-up replay first): mean microseconds of device time per call, or -1 if capture or
// replay failed (then it falls back to nothing; the error is logged). fn must only enqueue work.
double cuda_bench_graph(struct coopt_backend *be, void (*fn)(void *arg, int i), void *arg, int reps);

#ifdef __cplusplus
}
#endif

#endif // COOPT_CUDA_GPTQ_DEV_H
