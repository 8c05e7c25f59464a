/*
 * ops_cpu.h -- internals shared by the CPU backend's files: the backend's private state, the
 * memory and KV-pool ops (identical in the reference and fast tables), the one function that
 * converts a K/V row to the cache type (scale handling lives only there), and the fast kernels
 * that live in their own files.
 */
#ifndef COOPT_CPU_OPS_CPU_H
#define COOPT_CPU_OPS_CPU_H

#include "backend.h"
#include "cpu/threads.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cpu_backend {
    struct coopt_threadpool *tp;            // NULL for the reference backend
    void                    *scratch;       // quantized activations of matmul (grown on demand)
    size_t                   scratch_bytes;
    void                    *attn_scratch;  // attention split-K partials and work plan (attn_cpu.c)
    size_t                   attn_scratch_bytes;
    float                   *fused_tmp;     // matmul_add composed from matmul + add (matmul_fused.c)
    size_t                   fused_tmp_bytes;
};

extern const struct coopt_ops coopt_cpu_ref_ops;
extern const struct coopt_ops coopt_cpu_fast_ops;

// ---- shared memory / KV pool ops (ops_cpu_ref.c) ----
enum coopt_status cpu_alloc(struct coopt_backend *be, size_t n_bytes, void **out);
void cpu_free(struct coopt_backend *be, void *p);
void cpu_copy(struct coopt_backend *be, void *dst, const void *src, size_t n_bytes);
void cpu_sync(struct coopt_backend *be);
enum coopt_status cpu_kv_pool_init(struct coopt_backend *be, size_t n_bytes, void **out);
void cpu_kv_pool_free(struct coopt_backend *be, void *pool, size_t n_bytes);
void cpu_kv_pool_release(struct coopt_backend *be, void *pool, size_t off, size_t n_bytes);
void cpu_kv_page_copy(struct coopt_backend *be, void *pool, size_t page_bytes, int32_t dst, int32_t src);
void cpu_destroy(struct coopt_backend *be);
// argmax (backend.h): one scalar loop, the same in both tables (it reads n floats once)
void cpu_argmax(struct coopt_backend *be, int32_t *out, int32_t *out_host, const float *x, int32_t n_rows, int32_t n);
void cpu_sample(struct coopt_backend *be, int32_t *out, void *out_host, const float *x, int32_t n_rows, int32_t n,
                struct pick_state *ps, uint8_t *scratch);

// Largest finite value of an FP8 cache type (448 for E4M3, 57344 for E5M2), 0 for other types.
float cpu_kv_fp8_max(enum coopt_dtype t);
// Writes the f32 row x[head_dim] into the cache at `dst` (type l->dtype). For FP8 types the
// row's scale is amax(x) / fp8_max, stored as an f32 at `scale` (any alignment), and the values are fp8(x / scale); an
// all-zero row stores scale 0 and zeros. `scale` is unused for F32/F16/BF16.
// K smoothing (kv_cache.h): sets the offsets of the batch sequences whose step writes position 0
// (mean roped K of their tokens in the step). No-op unless the cache is FP8 and b->seq_ids is set.
void cpu_kv_offsets_update(struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, const float *k,
                           const struct coopt_rope *rope);
// The offset to subtract from token t's roped K row of KV head h, or NULL (no smoothing).
const float *cpu_kv_offset_row(const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, int32_t t,
                               int32_t h);
void cpu_kv_store_row(const struct coopt_kv_layout *l, int32_t kv, const float *x, void *dst, void *scale);

// Angles of RoPE for one position: cs[2*i] = cos(pos * inv_freq[i]), cs[2*i+1] = sin(...),
// computed like Hugging Face (angle in f32, then f32 cos/sin).
void cpu_rope_angles(const struct coopt_rope *rope, int32_t pos, float *cs);
// Rotates one head vector x[head_dim] in place with the angles from cpu_rope_angles.
void cpu_rope_apply(const struct coopt_rope *rope, const float *cs, float *x);

// Grows the backend's scratch to at least n_bytes (asserts on allocation failure).
void *cpu_scratch(struct coopt_backend *be, size_t n_bytes);

// ---- fast kernels ----
void cpu_matmul(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                int32_t n_rows);
// out[i] = silu(gate[i]) * up[i] on the calling thread (out may alias gate or up).
void cpu_silu_mul(float *out, const float *gate, const float *up, int64_t n);

// The row kernel of cpu_matmul (matmul_cpu.c) as building blocks for the fused ops:
// whether it takes w at n_rows in this build (else cpu_matmul uses its tiles), the bytes of x
// prepared for it (0: x is read as given), whether two weights read the same prepared x, the
// preparation of rows [r_lo, r_hi), output rows [o0, o1) of W for all x rows (stored as
// x·W[o] + bias[o], added to out when `add`), and weight rows per chunk of work for nth threads.
bool    cpu_mm_rows_ok(const struct coopt_weight *w, int32_t n_rows);
size_t  cpu_mm_rows_prep_bytes(const struct coopt_weight *w, int32_t n_rows);
bool    cpu_mm_rows_prep_shared(const struct coopt_weight *a, const struct coopt_weight *b);
void    cpu_mm_rows_prep(const struct coopt_weight *w, const float *x, int32_t r_lo, int32_t r_hi, void *xp);
void    cpu_mm_rows_run(const struct coopt_weight *w, const float *x, const void *xp, int32_t n_rows, int64_t o0,
                        int64_t o1, float *out, bool add);
int64_t cpu_mm_rows_chunk(const struct coopt_weight *w, int32_t n_rows, int32_t nth);

// The fused matmul ops (matmul_fused.c), with the contracts of backend.h; cpu_matmul_fused is
// the plain matmul through the same path (GPTQ and the row kernel; cpu_matmul otherwise).
void cpu_matmul_fused(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                      int32_t n_rows);
void cpu_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                      const struct coopt_weight *const *ws, int32_t n_rows);
void cpu_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const struct coopt_weight *wg,
                       const struct coopt_weight *wu, int32_t n_rows);
void cpu_matmul_add(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                    int32_t n_rows);
void cpu_attention(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                   const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale);

#endif // COOPT_CPU_OPS_CPU_H
