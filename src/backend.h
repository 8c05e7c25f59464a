/*
 * backend.h -- the one contract between the forward pass and a device (STYLE 2.5).
 *
 * forward.c calls be->ops->X(be, ...) and never includes SIMD or CUDA headers. Every backend
 * implements every op; the CPU backend keeps a scalar reference for each (ops_cpu_ref.c) that
 * tests compare the fast paths against.
 *
 * Conventions: activations are f32, row-major [n_rows][n], in memory owned by the backend
 * (host memory for cpu, device memory for cuda). Weights are struct coopt_weight whose data
 * lives where the backend can read it (see upload_weight). An op enqueues work and returns;
 * shapes are checked with COOPT_ASSERT; only memory functions can fail at runtime, and an op
 * that needs device memory it cannot get (a workspace) reports it through take_error.
 */
#ifndef COOPT_BACKEND_H
#define COOPT_BACKEND_H

#include "batch.h"
#include "coopt.h"
#include "kv_cache.h"
#include "model.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct coopt_backend;
struct pick_state;

// RoPE parameters, precomputed once per model: inv_freq[i] for i < head_dim/2 already includes
// theta, linear and llama3 scaling.
struct coopt_rope {
    enum coopt_rope_layout layout;
    int32_t                head_dim;
    const float           *inv_freq; // [head_dim/2], host memory
};

struct coopt_ops {
    const char *name; // "cpu", "cuda"

    // ---- memory ----
    enum coopt_status (*alloc)(struct coopt_backend *be, size_t n_bytes, void **out);
    void (*free)(struct coopt_backend *be, void *p); // NULL ok
    void (*upload)(struct coopt_backend *be, void *dst, const void *src, size_t n_bytes);
    void (*download)(struct coopt_backend *be, void *dst, const void *src, size_t n_bytes);
    void (*sync)(struct coopt_backend *be);

    // ---- ops ----
    // out[t][:] = dequant(table row tokens[t]).            out: [n][table->n_in]
    void (*embed)(struct coopt_backend *be, float *out, const struct coopt_weight *table, const int32_t *tokens,
                  int32_t n);
    // out[r] = x[r] / rms(x[r]) * w.                       x, out: [n_rows][dim]; out may == x
    void (*rmsnorm)(struct coopt_backend *be, float *out, const float *x, const float *w, int32_t n_rows,
                    int32_t dim, float eps);
    // out[r][o] = sum_i x[r][i] * W[o][i] (+ bias[o]).      x: [n_rows][w->n_in], out: [n_rows][w->n_out]
    void (*matmul)(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                   int32_t n_rows);
    // Applies RoPE in place to q [n][n_heads*head_dim] at positions pos[n]. (Reference op; the
    // forward pass uses the fused rope_store.)
    void (*rope)(struct coopt_backend *be, float *q, int32_t n_heads, const int32_t *pos, int32_t n,
                 const struct coopt_rope *rope);
    // Fused Opt-KV write path for one layer: RoPE on q (in place) and on k, then k and v are
    // converted to the cache type and scattered into their slots. q: [n][n_heads*head_dim],
    // k, v: [n][n_kv_heads*head_dim]; k is left unrotated in memory.
    void (*rope_store)(struct coopt_backend *be, float *q, const float *k, const float *v, int32_t n_heads,
                       struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                       const struct coopt_rope *rope);
    // Paged grouped-query attention for one layer. out, q: [n_tokens][n_heads*head_dim].
    void (*attention)(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                      const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale);
    // out[i] = silu(gate[i]) * up[i].                      n elements; out may alias gate
    void (*silu_mul)(struct coopt_backend *be, float *out, const float *gate, const float *up, int64_t n);
    // out[i] = a[i] + b[i].                                n elements; out may alias a
    void (*add)(struct coopt_backend *be, float *out, const float *a, const float *b, int64_t n);
    // out[j][:] = x[rows[j]][:].                           gather rows (for the LM head)
    void (*get_rows)(struct coopt_backend *be, float *out, const float *x, const int32_t *rows, int32_t n,
                     int32_t dim);
    // out[r] = the index of the largest x[r][i], the lowest such index on ties; NaN and -inf are
    // never chosen, and a row with nothing else gives 0 (coopt_sampler_sample's greedy choice).
    // x: [n_rows][n]; out: [n_rows] int32 in backend memory; out_host (NULL = none): page-locked
    // host memory (host_alloc) that receives the same values directly
    void (*argmax)(struct coopt_backend *be, int32_t *out, int32_t *out_host, const float *x, int32_t n_rows,
                   int32_t n);
    // out[r] = the token coopt_sampler_sample draws from row x[r][0, n) for the sampler whose state
    // ps[r] holds (pick.h), for r < n_rows: the same token, and ps[r].rng advanced as the
    // sampler's would be; a row whose ps[r].p.top_k is 0 is skipped (nothing written). ps: [n_rows]
    // in backend memory; scratch: n_rows blocks of pick_scratch_bytes(n) bytes of backend memory,
    // zeroed once when allocated. out_host (NULL = none): page-locked host memory (host_alloc)
    // that receives, PICK_RESULT_BYTES per row, the token at byte 0 and ps[r].rng after the draw at 8.
    void (*sample)(struct coopt_backend *be, int32_t *out, void *out_host, const float *x, int32_t n_rows,
                   int32_t n, struct pick_state *ps, uint8_t *scratch);

    // ---- fused ops (optional: NULL = the forward pass composes them from the ops above) ----
    // outs[j][r][:] = x[r] · ws[j] for j < n (1 <= n <= 4): several projections of one input in
    // one call (q/k/v), so a backend prepares x once and dispatches once.
    void (*matmul_multi)(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                         const struct coopt_weight *const *ws, int32_t n_rows);
    // out[r][o] = silu(x[r]·Wg[o]) * (x[r]·Wu[o]).  out, tmp: [n_rows][wg->n_out]; tmp is scratch the
    // backend may use (its contents are undefined afterwards); out may not alias x or tmp.
    void (*matmul_swiglu)(struct coopt_backend *be, float *out, float *tmp, const float *x,
                          const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t n_rows);
    // out[r][o] += x[r]·W[o] (+ bias[o]): the residual add fused into the projection.
    void (*matmul_add)(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                       int32_t n_rows);
    // The same two with the block's input RMS norm fused in: x [n_rows][n_in] is the un-normed
    // residual stream (not modified) and the projections read rmsnorm(x, norm, eps) -- as rmsnorm
    // into a scratch buffer followed by matmul_multi / matmul_swiglu, without the buffer.
    void (*norm_matmul_multi)(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                              const float *norm, float eps, const struct coopt_weight *const *ws, int32_t n_rows);
    void (*norm_matmul_swiglu)(struct coopt_backend *be, float *out, float *tmp, const float *x, const float *norm,
                               float eps, const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t n_rows);
    // matmul_add / norm_matmul_swiglu with a promise about the op that follows, so a backend can
    // prepare that op's input as it writes out: after matmul_add_then_norm the next op is
    // norm_matmul_multi or norm_matmul_swiglu(_then_add) reading x = out with norm = next_norm;
    // after norm_matmul_swiglu_then_add it is matmul_add or matmul_add_then_norm reading x = out.
    // Results as the plain ops up to f32 rounding (the order of the norm's sum of squares).
    void (*matmul_add_then_norm)(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                                 int32_t n_rows, const float *next_norm);
    void (*norm_matmul_swiglu_then_add)(struct coopt_backend *be, float *out, float *tmp, const float *x,
                                        const float *norm, float eps, const struct coopt_weight *wg,
                                        const struct coopt_weight *wu, int32_t n_rows);
    // rope_store followed by attention for one layer, in one call so a backend can fuse the two:
    // the same cache contents and out as the pair; q is scratch afterwards (rotated or not).
    void (*rope_store_attention)(struct coopt_backend *be, float *out, float *q, const float *k, const float *v,
                                 int32_t n_heads, struct coopt_kv_cache *kv, int32_t layer,
                                 const struct coopt_batch *b, const struct coopt_rope *rope, float scale);
    // The same with a promise (as the *_then_* ops above): the next op is matmul_add or
    // matmul_add_then_norm reading x = out. Same results as rope_store_attention.
    void (*rope_store_attention_then_matmul)(struct coopt_backend *be, float *out, float *q, const float *k,
                                             const float *v, int32_t n_heads, struct coopt_kv_cache *kv,
                                             int32_t layer, const struct coopt_batch *b, const struct coopt_rope *rope,
                                             float scale);

    // ---- KV pool ----
    // Reserves address space for the pool; memory is committed on first write (lazy mapping).
    enum coopt_status (*kv_pool_init)(struct coopt_backend *be, size_t n_bytes, void **out);
    void (*kv_pool_free)(struct coopt_backend *be, void *pool, size_t n_bytes);
    // Returns the memory of [off, off + n_bytes) of the pool to the OS/driver (page freed).
    void (*kv_pool_release)(struct coopt_backend *be, void *pool, size_t off, size_t n_bytes);
    // Copies one page (copy-on-write of a shared partial page).
    void (*kv_page_copy)(struct coopt_backend *be, void *pool, size_t page_bytes, int32_t dst, int32_t src);
    // (optional) Commits the memory of one page, [off, off + n_bytes) with n_bytes = page_bytes as
    // for kv_pool_release, before it is first written (call it for each page a reserve hands out,
    // and roll the reserve back on failure). Returns COOPT_ERR_NOMEM with a message when the
    // device is out of memory, so running out is a status rather than a failure inside an op.
    // NULL for backends whose pool commits on first touch.
    enum coopt_status (*kv_pool_commit)(struct coopt_backend *be, void *pool, size_t off, size_t n_bytes);

    // ---- step recording (optional; NULL = every forward step runs op by op) ----
    // The context brackets each forward step with these. step_begin returns true when the backend
    // has launched a recorded copy of an earlier step of the same launch geometry (a CUDA graph);
    // the caller then skips coopt_forward. Otherwise the caller runs coopt_forward and then calls
    // step_end, which finishes a recording begun by step_begin (if any) and launches it. The
    // backend derives the geometry from b's sizes and kv (key-range bucket); the caller promises
    // that steps of equal sizes use the same model, scratch, cache and batch-array addresses, and
    // that every KV page the step writes is committed (kv_pool_commit) before step_begin, since
    // nothing host-side runs at replay. step_end returns false when the recording could not be
    // made launchable (the device out of memory for the graph): nothing of the step ran, and the
    // caller runs coopt_forward again (op by op; no step_end after it).
    bool (*step_begin)(struct coopt_backend *be, const struct coopt_kv_cache *kv, const struct coopt_batch *b);
    bool (*step_end)(struct coopt_backend *be);
    // (optional) Host memory the backend copies from fastest (page-locked). Uploads from it are
    // asynchronous: the caller must not rewrite it before the next sync. NULL = malloc/free.
    enum coopt_status (*host_alloc)(struct coopt_backend *be, size_t n_bytes, void **out);
    void (*host_free)(struct coopt_backend *be, void *p); // NULL ok
    // (optional) Fences, so the host can prepare step k+1 while the device runs step k: fence
    // enqueues a marker after the work enqueued so far and returns its number (> 0); fence_wait
    // blocks until the device has passed marker n (n = 0 returns at once). NULL = every op has
    // finished when it returns (host backends): nothing to wait for.
    uint64_t (*fence)(struct coopt_backend *be);
    void (*fence_wait)(struct coopt_backend *be, uint64_t n);

    // (optional) Makes a copy of the model whose weight pointers the backend can read (device
    // memory), with progress on stderr. NULL for host-memory backends (the model is used as is).
    enum coopt_status (*model_upload)(struct coopt_backend *be, const struct coopt_model *host,
                                      struct coopt_model **out);
    void (*model_release)(struct coopt_backend *be, struct coopt_model *dev); // NULL ok

    // (optional) The first failure an op met since the last call (COOPT_ERR_NOMEM: a workspace
    // could not grow; the message is logged) and COOPT_OK if none; the call clears it. An op that
    // failed enqueued nothing more, so the step's results are undefined: the context checks this
    // after each forward step and fails the step (the sequences keep their lengths). NULL = ops
    // cannot fail (host backends).
    enum coopt_status (*take_error)(struct coopt_backend *be);

    void (*destroy)(struct coopt_backend *be);
};

struct coopt_backend {
    const struct coopt_ops *ops;
    int32_t                 n_threads;
    int32_t                 attn_partition; // split-K partition in tokens, 0 = single pass (set by the context)
    bool                    attn_per_head;  // ablation: one K/V read per query head (no GQA sharing)
    void                   *impl; // backend private state (thread pool, streams, handles)
};

// Creates the backend named "cpu" (or "cuda" when built with CUDA). n_threads 0 = all cores.
enum coopt_status coopt_backend_init(const char *name, int32_t n_threads, struct coopt_backend **out);
void coopt_backend_free(struct coopt_backend *be);

// The CPU backend; `ref` selects the scalar reference ops (tests).
enum coopt_status coopt_cpu_backend_init(int32_t n_threads, bool ref, struct coopt_backend **out);

#endif // COOPT_BACKEND_H
