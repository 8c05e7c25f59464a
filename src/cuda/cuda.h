/*
 * cuda.h -- the plain-C entry points of the CUDA backend (STYLE 2.5): backend.c and the tests
 * include this; everything else of the backend is internal to src/cuda/.
 */
#ifndef COOPT_CUDA_CUDA_H
#define COOPT_CUDA_CUDA_H

#include "backend.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Creates the CUDA backend on device 0: one stream, one cuBLAS handle, all state in the
// returned backend (no file statics). n_threads is ignored. Returns COOPT_ERR_UNSUPPORTED with
// a message when there is no usable CUDA device, COOPT_ERR_NOMEM when its resources cannot be
// created.
enum coopt_status coopt_cuda_backend_init(int32_t n_threads, struct coopt_backend **out);

// Number of CUDA devices; 0 when the driver or runtime is missing or reports an error. Prints
// nothing (tests call it to decide whether to skip).
int coopt_cuda_device_count(void);

// Free and total memory of the current device (cudaMemGetInfo); returns 0 on success, -1 after
// an error (both set to 0).
int coopt_cuda_mem_info(size_t *free_bytes, size_t *total_bytes);

// Step recording counters of a CUDA backend (step.cu): steps run op by op, recorded into a CUDA
// graph, and replayed from one. Returns -1 (all 0) when be is not a CUDA backend.
int coopt_cuda_step_stats(struct coopt_backend *be, int64_t *eager, int64_t *captures, int64_t *replays);

// Device memory bandwidth of GPU 0 over n_bytes buffers, best of reps: a device-to-device
// cudaMemcpy (bytes read + written) and a read-only kernel. Returns 0, or -1 after a CUDA error.
int coopt_cuda_membw(size_t n_bytes, int reps, double *copy_gbs, double *read_gbs);

// Test hook: how attention routes prefill tiles. 0 (default) = the tensor-core kernel for steps
// that carry prefill chunks, 1 = the tensor-core kernel wherever it is compiled (head dims 64, 80,
// 96, 128 with F16/FP8 KV), even for one-token tiles, 2 = always the decode kernel.
void cuda_attn_set_route(struct coopt_backend *be, int route);
// Test hook: the decode attention's tensor-core key walk (head dims 64, 128 with F16/FP8 KV):
// 0 (default) for 2 or more query heads per CTA, 1 for every group, -1 never. Route 2 (above)
// keeps it off too.
void cuda_attn_set_tc_decode(struct coopt_backend *be, int mode);
// Whether the decode attention walks the keys on tensor cores for this shape (heads_per_cta: the
// query heads one CTA serves, a power of two up to 8).
bool cuda_attn_tc_decode(const struct coopt_backend *be, int32_t head_dim, enum coopt_dtype kv_type, int32_t heads_per_cta);
// Test hook: the next recording of a decode step fails as if the device were out of memory for
// the CUDA graph (the step then runs op by op, and so do later steps of its shape).
void cuda_step_fail_next_graph(struct coopt_backend *be);
// Test hook: a workspace that would grow past n_bytes fails as if the device were out of memory
// (0 = no limit).
void cuda_set_workspace_limit(struct coopt_backend *be, size_t n_bytes);
// Test hook: rope_store_attention fuses the write of FP8 caches into the decode attention (true,
// the default) or runs rope_store and the attention as two kernels (false).
void cuda_attn_set_fuse_fp8(struct coopt_backend *be, bool fuse);
// Test hook: the fused decode attention stores the token's K and V rows from two CTAs of their
// own (1), from the last partition's CTA (-1), or (0, the default) the first for FP8 caches where
// the step's key-range bound (cuda_attn_bound) is below CUDA_ATTN_STORE_CTA_BOUND, else the second
// (see paged_attn.cu).
void cuda_attn_set_store_cta(struct coopt_backend *be, int mode);
#define CUDA_ATTN_STORE_CTA_BOUND 16384
// Test hook: over one partition, the store CTAs' partial is merged by the partition's CTA, which
// waits for it (true, the default), or by the merge kernel (false).
void cuda_attn_set_store_wait(struct coopt_backend *be, bool wait);
// Test hook: with that wait, the store CTAs hand their partial to the partition's CTA through a
// thread-block cluster's shared memory (true, the default on sm_90+; attn_args.kv_cluster) or
// through global memory and a count (false; always below sm_90).
void cuda_attn_set_cluster(struct coopt_backend *be, bool cluster);
// Test hook: the fused decode attention's CTAs that store no row issue their first copies before
// they wait for the kernel before (true, the default; attn_args.pre) or after (false).
void cuda_attn_set_prefetch(struct coopt_backend *be, bool pre);
// Whether a fused decode step of this shape writes the token's K/V rows from two store CTAs (under
// the setting above) rather than from the last partition's CTA.
bool cuda_attn_store_ctas(const struct coopt_backend *be, const struct coopt_kv_cache *kv, const struct coopt_batch *b,
                          int32_t n_heads);
// The key-range bucket (a power of two, at least 128) that fixes the attention's launch geometry
// for a key-range bound; a step's bucket (cuda_attn_bound) is also what CUDA graphs are keyed on.
int64_t cuda_attn_bound_bucket(int64_t bound);

#ifdef __cplusplus
}
#endif

#endif // COOPT_CUDA_CUDA_H
