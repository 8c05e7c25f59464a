/*
 * rope_store.cu -- RoPE (the reference op) and the fused Opt-KV write path rope_store: for a
 * whole batch in one launch, rotate q in place, rotate k (in registers/shared memory; k stays
 * unrotated in memory), convert k and v to the cache type and scatter them into their slots.
 *
 * Semantics are those of the CPU reference (ops_cpu_ref.c): angle = (float)pos * inv_freq[i]
 * in f32, then cosf/sinf; rotation products rounded without FMA contraction (the CPU build is
 * ISO C, -ffp-contract=off); FP8 rows carry one f32 scale per (token, head) chosen exactly as
 * coopt_fp8_quant_row (dtype.h) chooses it, values fp8(x * (1/scale)) rounded to nearest even and
 * saturated; an all-zero row stores scale 0.
 *
 * Cache layout (kv_cache.h): page [n_layers][2][n_kv_heads][page_size][head_dim] of the cache
 * type, then FP8 scales [n_layers][2][n_kv_heads][page_size] f32; kv_offset/kv_scale_offset
 * below are coopt_kv_offset/coopt_kv_scale_offset ported to device code.
 *
 * rope_kernel       Grid: (n_tokens); Block: 128 threads over the n_heads * head_dim/2 pairs.
 * rope_store_kernel Grid: (n_tokens, 2 * n_kv_heads); Block: 128 threads = 4 warps.
 *                   Block y rotates its share of q's heads and handles the cache row y (kv head
 *                   y/2, K or V) of the token: rotated row into shared memory (thread i rotates
 *                   pair i of the K row and of the q heads with one cos/sin, every load issued
 *                   before them), then kv_store_rows (kv_store.cuh): amax per warp, FP8 scale
 *                   search over all 128 threads (a thread per candidate and partial sum), quantized
 *                   store.
 *                   Shared memory: head_dim floats (<= 256) + kv_store_smem (FP8).
 *                   With cuda_backend.attn_pdl (sm_90, the default) it is a programmatic
 *                   dependent launch, and every block first lets the next kernel (the attention,
 *                   which waits for it) launch, then waits for the kernel before it.
 * Decode steps with 16/32-bit caches, and with FP8 caches over long ranges, do this write inside
 * the attention kernel instead (cuda_rope_store_attention, paged_attn.cu).
 */
#include "cuda/kv_store.cuh"

TRACE_TU(rope_store)

// Rotates heads [h0, h1) of one token's row x in place (all threads of the block).
__device__ __forceinline__ void rope_row(float *x, int32_t h0, int32_t h1, int32_t pos, const struct rope_params &p) {
    int half = p.head_dim / 2;
    for (int idx = threadIdx.x + h0 * half; idx < h1 * half; idx += blockDim.x) {
        int   h = idx / half, i = idx % half, i0, i1;
        float a = (float)pos * p.inv_freq[i];
        float c = cosf(a), s = sinf(a);
        rope_pair(p, i, &i0, &i1);
        float *xh = x + (size_t)h * p.head_dim;
        float  y0, y1;
        rope_rotate(xh[i0], xh[i1], c, s, &y0, &y1);
        // each (i0, i1) pair is owned by exactly one thread
        xh[i0] = y0;
        xh[i1] = y1;
    }
}

__global__ void rope_kernel(float *q, int32_t n_heads, const int32_t *__restrict__ pos, const struct rope_params p) {
    int32_t t = blockIdx.x;
    rope_row(q + (size_t)t * n_heads * p.head_dim, 0, n_heads, pos[t], p);
}

void cuda_rope(struct coopt_backend *be, float *q, int32_t n_heads, const int32_t *pos, int32_t n,
               const struct coopt_rope *rope) {
    if (n <= 0) return;
    struct rope_params p = rope_params_make(rope);
    rope_kernel<<<n, 128, 0, cuda_impl(be)->stream>>>(q, n_heads, pos, p);
    CUDA_CHECK_LAUNCH();
}

// K smoothing (kv_cache.h): for each batch sequence whose step writes position 0, its offset for
// this layer becomes the mean roped K of its tokens in the step (same order of summation as the
// CPU: tokens in batch order, one f32 accumulator per channel).
// Grid: (n_seqs, n_kv_heads, ceil(head_dim / 2 / KO_PAIRS)); Block: KO_THREADS. A CTA owns
// KO_PAIRS rotation pairs (2 * KO_PAIRS channels) of one (sequence, KV head). The step's tokens go
// in chunks of KO_CHUNK: all threads rotate the chunk's rows of the sequence at the CTA's pairs in
// parallel into shared memory (independent loads and cos/sin), then thread i < KO_PAIRS adds pair
// i of the chunk's rows in token order: the sums stay sequential, so the result is bit-identical
// to one thread walking all tokens, but nothing slow sits on that chain. Shared memory:
// KO_CHUNK x 2 * KO_PAIRS f32 = 32 KiB.
#define KO_THREADS 256
#define KO_PAIRS   8
#define KO_CHUNK   512
__global__ void __launch_bounds__(KO_THREADS)
    kv_offsets_kernel(const float *__restrict__ k, int32_t n_tokens, int32_t nkv, const int32_t *__restrict__ pos,
                      const int32_t *__restrict__ tok_seq, const int32_t *__restrict__ seq_ids,
                      float *__restrict__ koff, const struct kv_dev_layout L, int32_t n_layers, int32_t layer,
                      const struct rope_params p) {
    const int32_t    s = blockIdx.x, h = blockIdx.y, hd = p.head_dim, half = hd / 2, pair0 = blockIdx.z * KO_PAIRS;
    __shared__ float buf[KO_CHUNK][2 * KO_PAIRS];
    __shared__ int   mine[KO_CHUNK];
    int              first = 0;
    for (int32_t t = threadIdx.x; t < n_tokens; t += blockDim.x) first |= tok_seq[t] == s && pos[t] == 0;
    if (!__syncthreads_or(first)) return;
    const int i = threadIdx.x; // the pair (pair0 + i) this thread sums, i < KO_PAIRS
    int       i0 = 0, i1 = 0;
    if (i < KO_PAIRS && pair0 + i < half) rope_pair(p, pair0 + i, &i0, &i1);
    float   s0 = 0.0f, s1 = 0.0f;
    int32_t cnt = 0;
    for (int32_t c0 = 0; c0 < n_tokens; c0 += KO_CHUNK) {
        const int n = min(KO_CHUNK, n_tokens - c0);
        for (int tt = threadIdx.x; tt < n; tt += blockDim.x) mine[tt] = tok_seq[c0 + tt] == s;
        for (int idx = threadIdx.x; idx < n * KO_PAIRS; idx += blockDim.x) {
            const int32_t t = c0 + idx / KO_PAIRS;
            const int     j = pair0 + idx % KO_PAIRS;
            if (j >= half || tok_seq[t] != s) continue;
            int j0, j1;
            rope_pair(p, j, &j0, &j1);
            const float *kr = k + ((size_t)t * nkv + h) * hd;
            float        a = (float)pos[t] * p.inv_freq[j], y0, y1;
            rope_rotate(kr[j0], kr[j1], cosf(a), sinf(a), &y0, &y1);
            buf[idx / KO_PAIRS][2 * (idx % KO_PAIRS)]     = y0;
            buf[idx / KO_PAIRS][2 * (idx % KO_PAIRS) + 1] = y1;
        }
        __syncthreads();
        if (i < KO_PAIRS && pair0 + i < half)
            for (int tt = 0; tt < n; tt++) {
                if (!mine[tt]) continue;
                s0 = __fadd_rn(s0, buf[tt][2 * i]);
                s1 = __fadd_rn(s1, buf[tt][2 * i + 1]);
                cnt++;
            }
        __syncthreads(); // buf and mine are rewritten by the next chunk
    }
    if (i < KO_PAIRS && pair0 + i < half) {
        float *c = koff + kv_koff_index(n_layers, nkv, hd, seq_ids[s], layer, h);
        c[i0]    = __fdiv_rn(s0, (float)cnt);
        c[i1]    = __fdiv_rn(s1, (float)cnt);
    }
}

template <int KT>
__global__ void __launch_bounds__(128)
    rope_store_kernel(float *q, const float *__restrict__ k, const float *__restrict__ v, int32_t n_heads,
                      uint8_t *__restrict__ pool, const struct kv_dev_layout L, int32_t layer,
                      const int32_t *__restrict__ pos, const int64_t *__restrict__ slots, const struct rope_params p,
                      const float *__restrict__ koff, const int32_t *__restrict__ tok_seq,
                      const int32_t *__restrict__ seq_ids, int32_t n_layers) {
    constexpr bool FP8 = KT == COOPT_DTYPE_FP8_E4M3 || KT == COOPT_DTYPE_FP8_E5M2;
    TRACE_CTA(TRACE_ROPE_STORE);
    pdl_launch_dependents(); // the attention may launch now; it waits for our completion
    pdl_wait();              // (launched early with cuda_backend.attn_pdl) q, k, v come from the kernel before
    __shared__ float b[2 * ROPE_MAX_HALF];
    __shared__ __align__(16) uint8_t sm_raw[FP8 ? sizeof(kv_store_smem) : 16];
    const int32_t    t = blockIdx.x, hd = L.head_dim, half = hd / 2, nkv = L.n_kv_heads;
    const int        tid = threadIdx.x;
    const int32_t    ps = pos[t];
    // this block's q heads [h0q, h1q) (split over the token's blocks: one block rotating all of
    // them was ~20 us at decode) and cache row: kv head h, K (kvi 0, rotated) or V
    const int32_t per = (n_heads + gridDim.y - 1) / gridDim.y, h0q = min(n_heads, (int32_t)blockIdx.y * per);
    const int32_t h1q = min(n_heads, h0q + per);
    const int32_t r = blockIdx.y, h = r >> 1, kvi = r & 1;
    const bool    row_here = r < 2 * nkv;
    const int64_t page = row_here ? kv_slot_page(L, slots[t]) : 0;
    const int32_t row  = row_here ? kv_slot_row(L, slots[t]) : 0;
    const float  *src  = (kvi ? v : k) + ((size_t)t * nkv + (row_here ? h : 0)) * hd;
    // K smoothing: the sequence's offset (kv_offsets_kernel)
    const float  *c    = row_here && kvi == 0 && koff
                             ? koff + kv_koff_index(n_layers, nkv, hd, seq_ids[tok_seq[t]], layer, h)
                             : NULL;
    float *qt = q + (size_t)t * n_heads * hd;
    // All loads first, then cos/sin, then the rotations (rope_row's operations), so the latencies
    // overlap: V row elements tid and tid + 128 (head_dim <= 256, 128 threads); per rotation pair
    // i, the K pair and the pairs of the first four q heads, which share the angle (same position).
    float      vr0 = 0.0f, vr1 = 0.0f;
    const bool vrow = row_here && kvi == 1;
    if (vrow && tid < hd) vr0 = src[tid];
    if (vrow && tid + 128 < hd) vr1 = src[tid + 128];
    for (int i = tid; i < half; i += blockDim.x) {
        int i0, i1;
        rope_pair(p, i, &i0, &i1);
        const bool kr = row_here && kvi == 0;
        const int  nq4 = min(4, h1q - h0q);
        float      k0 = 0.0f, k1 = 0.0f, c0 = 0.0f, c1 = 0.0f, qa[4][2];
        if (kr) k0 = src[i0], k1 = src[i1];
        if (kr && c) c0 = c[i0], c1 = c[i1];
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (j < nq4) qa[j][0] = qt[(size_t)(h0q + j) * hd + i0], qa[j][1] = qt[(size_t)(h0q + j) * hd + i1];
        const float a = (float)ps * p.inv_freq[i], cs = cosf(a), sn = sinf(a);
        float       y0, y1;
        if (kr) {
            rope_rotate(k0, k1, cs, sn, &y0, &y1);
            b[i0] = c ? __fsub_rn(y0, c0) : y0;
            b[i1] = c ? __fsub_rn(y1, c1) : y1;
        }
        // each (i0, i1) pair of a q head is owned by exactly one thread
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (j < nq4) {
                rope_rotate(qa[j][0], qa[j][1], cs, sn, &y0, &y1);
                qt[(size_t)(h0q + j) * hd + i0] = y0, qt[(size_t)(h0q + j) * hd + i1] = y1;
            }
        for (int32_t hq = h0q + 4; hq < h1q; hq++) {
            float *xh = qt + (size_t)hq * hd;
            rope_rotate(xh[i0], xh[i1], cs, sn, &y0, &y1);
            xh[i0] = y0, xh[i1] = y1;
        }
    }
    if (!row_here) return;
    if (vrow) {
        if (tid < hd) b[tid] = vr0;
        if (tid + 128 < hd) b[tid + 128] = vr1;
    }
    __syncthreads();
    uint8_t *dst  = pool + kv_offset(L, page, layer, kvi, h, row);
    float   *sdst = (float *)(pool + (FP8 ? kv_scale_offset(L, page, layer, kvi, h, row) : 0));
    kv_store_rows<KT>(b, 1, hd, &dst, &sdst, L.scale_search, FP8 ? kv_store_step(L.scale_search) : 0.0f,
                      *(kv_store_smem *)sm_raw);
}

void cuda_rope_store(struct coopt_backend *be, float *q, const float *k, const float *v, int32_t n_heads,
                     struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                     const struct coopt_rope *rope) {
    const struct coopt_kv_layout *l = &kv->layout;
    COOPT_ASSERT(rope->head_dim == l->head_dim && layer >= 0 && layer < l->n_layers);
    if (b->n_tokens <= 0) return;
    // Commit physical memory for every page this step writes (lazy mapping, kv_pool.cu). Every
    // layer checks (a few table entries per live sequence): callers may start at any layer.
    if (!cuda_kv_pool_prepare(be, kv)) return; // (out of memory: cb->op_error)
    struct rope_params   p  = rope_params_make(rope);
    struct kv_dev_layout L  = kv_dev_layout_make(l);
    cudaStream_t         st = cuda_impl(be)->stream;
    const bool           pdl = cuda_impl(be)->attn_pdl;
    // Grid (n_tokens, 2 * n_kv_heads): one block per K or V row, so the FP8 scale searches of a
    // token's rows run in parallel, 4 warps each; each block also rotates its share of q's heads.
    dim3 n(b->n_tokens, 2 * l->n_kv_heads);
    const float *koff = (l->has_scales && kv->k_offset && b->seq_ids) ? kv->k_offset : NULL;
    if (koff && !b->no_seq_start) { // (skipped when the host knows no sequence starts here: decode)
        kv_offsets_kernel<<<dim3(b->n_seqs, l->n_kv_heads, (l->head_dim / 2 + KO_PAIRS - 1) / KO_PAIRS), KO_THREADS, 0, st>>>(
            k, b->n_tokens, l->n_kv_heads, b->pos, b->tok_seq, b->seq_ids, kv->k_offset, L, l->n_layers, layer, p);
        CUDA_CHECK_LAUNCH();
    }
#define ROPE_STORE_LAUNCH(KT)                                                                                          \
    CUDA_CHECK(cuda_launch_pdl(pdl, rope_store_kernel<KT>, n, dim3(128), 0, st, q, k, v, n_heads, kv->pool, L, layer,      \
                               b->pos, b->slots, p, koff, b->tok_seq, b->seq_ids, l->n_layers))
    switch (l->dtype) {
    case COOPT_DTYPE_F32: ROPE_STORE_LAUNCH(COOPT_DTYPE_F32); break;
    case COOPT_DTYPE_F16: ROPE_STORE_LAUNCH(COOPT_DTYPE_F16); break;
    case COOPT_DTYPE_BF16: ROPE_STORE_LAUNCH(COOPT_DTYPE_BF16); break;
    case COOPT_DTYPE_FP8_E4M3: ROPE_STORE_LAUNCH(COOPT_DTYPE_FP8_E4M3); break;
    case COOPT_DTYPE_FP8_E5M2: ROPE_STORE_LAUNCH(COOPT_DTYPE_FP8_E5M2); break;
    default:
        coopt_log_error("cuda rope_store: KV type %s is not supported", coopt_dtype_name(l->dtype));
        COOPT_ASSERT(!"unsupported KV type");
    }
#undef ROPE_STORE_LAUNCH
    CUDA_CHECK_LAUNCH();
}
