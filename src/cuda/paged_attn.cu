/*
 * paged_attn.cu -- paged grouped-query attention over the KV cache (Opt-KV read, Opt-GQA,
 * Opt-Pa), for ragged batches mixing decode tokens and prefill chunks.
 *
 * Token t (sequence s = tok_seq[t], position pos[t]) attends to positions
 * [lo, pos] with lo = max(0, pos - window + 1) (window 0: lo = 0), whose rows live in pages
 * block_tables[s][p / page_size] (batch.h). All tokens of the step were stored by rope_store
 * before this runs, so causality inside a prefill chunk needs no special case.
 *
 * attn_kernel: one CTA per (token, KV head, query-head subgroup, partition).
 *   Grid: (n_tokens, n_kv_heads * n_sub, n_parts); Block: 128 threads.
 *   Opt-GQA: the CTA serves the (up to ATTN_MAX_G = 8) query heads of its KV group that share
 *   the KV head from ONE read of each K and V row; groups larger than 8 are split into n_sub
 *   subgroups (each reads the rows once).
 *   Opt-Pa (flash-decoding): the key range is cut into partitions of ATTN_PART = 512 positions
 *   when the batch alone cannot fill the GPU (halved down to one 128-key tile while the grid
 *   would still have fewer than 2 CTAs per SM); each CTA writes an unnormalized partial (acc, max,
 *   sum) to the workspace and attn_merge_kernel combines them with log-sum-exp weights. When the
 *   batch has enough (token, head) CTAs the split is skipped and each CTA walks its whole range.
 *   Inside a partition keys go in tiles of 128:
 *     1. thread j takes key j of the tile: finds its page through the block table, reads the K
 *        row with 16-byte loads (head dims 64/80/96/128; element loads for the generic path),
 *        dequantizes in registers (FP8 rows times their f32 scale) and forms the scores of all
 *        the CTA's query heads against q in shared memory (broadcast reads);
 *     2. one warp per query head updates the running max and sum (online softmax, expf);
 *     3. thread d accumulates output dim d of every query head over the tile's V rows
 *        (coalesced: consecutive threads read consecutive elements of a row).
 *   Shared memory: q [8][256] f32 + probabilities [8][128] f32 + per-key V offsets and scales,
 *   about 14 KiB static.
 *   Head dims 64, 80, 96, 128 are compiled as template parameters; any other even head_dim up
 *   to 256 (the test models' 8 and 16 included) runs the generic path (runtime head_dim).
 *
 * attn_merge_kernel: Grid (n_tokens, n_heads); Block 128 threads over head_dim. Skips tokens
 *   whose range fits in one partition (attn_kernel wrote them directly).
 *
 * Workspace layout (split only): acc [n_tokens][n_heads][n_parts][head_dim] f32, then
 * (max, sum) [n_tokens][n_heads][n_parts][2] f32.
 */
#include "cuda/common.cuh"
#include "cuda/kv_dev.cuh"

#include <limits.h>
#include <math.h>

#define ATTN_THREADS 128
#define ATTN_TILE    128
#define ATTN_MAX_G   8
#define ATTN_MAX_HD  256
#define ATTN_PART    512

struct attn_args {
    float         *out;           // [n_tokens][n_heads][hd]
    const float   *q;             // [n_tokens][n_heads][hd]
    const uint8_t *pool;
    const int32_t *pos, *tok_seq, *block_tables;
    float         *part_acc;      // workspace (split only)
    float         *part_ml;
    int32_t        max_blocks, window, layer, n_heads, group, n_sub, sub_g, n_parts, part_size;
    float          scale;
};

// Reads 16 bytes of a cache row starting at element e and converts them to f32.
template <int KT> struct kv_chunk {
    static constexpr int N = KT == COOPT_DTYPE_F32 ? 4 : (KT == COOPT_DTYPE_F16 || KT == COOPT_DTYPE_BF16) ? 8 : 16;
    __device__ __forceinline__ static void load(const uint8_t *row, int e, float *f) {
        uint4    u    = *(const uint4 *)(row + (size_t)e * (16 / N));
        uint32_t w[4] = {u.x, u.y, u.z, u.w};
        if constexpr (KT == COOPT_DTYPE_F32) {
#pragma unroll
            for (int i = 0; i < 4; i++) f[i] = __uint_as_float(w[i]);
        } else if constexpr (KT == COOPT_DTYPE_F16) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                f[2 * i]     = f16_bits_to_f32((uint16_t)(w[i] & 0xffff));
                f[2 * i + 1] = f16_bits_to_f32((uint16_t)(w[i] >> 16));
            }
        } else if constexpr (KT == COOPT_DTYPE_BF16) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                f[2 * i]     = __uint_as_float(w[i] << 16);
                f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 16; i++) {
                uint8_t b = (uint8_t)(w[i / 4] >> (8 * (i % 4)));
                f[i]      = KT == COOPT_DTYPE_FP8_E4M3 ? fp8_e4m3_to_f32(b) : fp8_e5m2_to_f32(b);
            }
        }
    }
};

template <int HD, int KT>
__global__ void __launch_bounds__(ATTN_THREADS) attn_kernel(const struct attn_args a, const struct kv_dev_layout L) {
    constexpr int DPT = ATTN_MAX_HD / ATTN_THREADS; // output dims per thread (upper bound)
    __shared__ float    q_s[ATTN_MAX_G][ATTN_MAX_HD];
    __shared__ float    p_s[ATTN_MAX_G][ATTN_TILE];
    __shared__ uint64_t vofs_s[ATTN_TILE];
    __shared__ float    vsc_s[ATTN_TILE];
    __shared__ float    m_s[ATTN_MAX_G], l_s[ATTN_MAX_G], corr_s[ATTN_MAX_G];

    const int     tid = threadIdx.x;
    const int32_t t   = blockIdx.x;
    const int32_t kvh = blockIdx.y / a.n_sub, sub = blockIdx.y % a.n_sub;
    const int32_t g0 = sub * a.sub_g, ng = min(a.sub_g, a.group - g0);
    const int32_t hd  = HD > 0 ? HD : L.head_dim;
    const int32_t pos = a.pos[t];
    const int32_t lo  = a.window > 0 ? max(0, pos - a.window + 1) : 0;
    const int32_t n_keys  = pos - lo + 1;
    const int32_t parts_t = (int32_t)(((int64_t)n_keys + a.part_size - 1) / a.part_size);
    const int32_t part    = blockIdx.z;
    if (part >= parts_t) return;
    const int32_t  k_begin = lo + part * a.part_size;
    const int32_t  k_end   = (int32_t)min((int64_t)pos + 1, (int64_t)k_begin + a.part_size);
    const int32_t  h0      = kvh * a.group + g0; // first query head of the CTA
    const int32_t *bt      = a.block_tables + (size_t)a.tok_seq[t] * (size_t)a.max_blocks;

    for (int i = tid; i < ng * hd; i += ATTN_THREADS)
        q_s[i / hd][i % hd] = a.q[((size_t)t * a.n_heads + h0) * hd + i];
    if (tid < ATTN_MAX_G) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.0f;
    }
    float acc[ATTN_MAX_G][DPT];
#pragma unroll
    for (int g = 0; g < ATTN_MAX_G; g++)
#pragma unroll
        for (int j = 0; j < DPT; j++) acc[g][j] = 0.0f;
    __syncthreads();

    for (int32_t t0 = k_begin; t0 < k_end; t0 += ATTN_TILE) {
        // 1. scores: thread tid <-> key t0 + tid
        const int32_t p     = t0 + tid;
        bool          valid = p < k_end;
        int32_t       page  = valid ? bt[p / L.page_size] : -1;
        valid               = valid && page >= 0; // never read a released page
        float dot[ATTN_MAX_G];
#pragma unroll
        for (int g = 0; g < ATTN_MAX_G; g++) dot[g] = 0.0f;
        if (valid) {
            const int32_t  row  = p % L.page_size;
            const uint8_t *krow = a.pool + kv_offset(L, page, a.layer, 0, kvh, row);
            vofs_s[tid]         = kv_offset(L, page, a.layer, 1, kvh, row);
            float ksc = 1.0f, vsc = 1.0f;
            if (L.has_scales) {
                ksc = *(const float *)(a.pool + kv_scale_offset(L, page, a.layer, 0, kvh, row));
                vsc = *(const float *)(a.pool + kv_scale_offset(L, page, a.layer, 1, kvh, row));
            }
            vsc_s[tid] = vsc;
            if constexpr (HD > 0) {
                constexpr int N = kv_chunk<KT>::N;
#pragma unroll 2
                for (int e = 0; e < HD; e += N) {
                    float kf[N];
                    kv_chunk<KT>::load(krow, e, kf);
#pragma unroll
                    for (int g = 0; g < ATTN_MAX_G; g++) {
                        if (g < ng) {
#pragma unroll
                            for (int i = 0; i < N; i++) dot[g] += q_s[g][e + i] * kf[i];
                        }
                    }
                }
            } else {
                for (int e = 0; e < hd; e++) {
                    float kf = load_elem<KT>(krow, e);
#pragma unroll
                    for (int g = 0; g < ATTN_MAX_G; g++)
                        if (g < ng) dot[g] += q_s[g][e] * kf;
                }
            }
#pragma unroll
            for (int g = 0; g < ATTN_MAX_G; g++) dot[g] *= ksc * a.scale;
        } else {
            vofs_s[tid] = 0;
            vsc_s[tid]  = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < ATTN_MAX_G; g++)
            if (g < ng) p_s[g][tid] = valid ? dot[g] : -INFINITY;
        __syncthreads();

        // 2. online softmax: warp w updates query heads w, w + 4
        const int warp = tid >> 5, lane = tid & 31;
        for (int g = warp; g < ng; g += ATTN_THREADS / 32) {
            float mx = -INFINITY;
            for (int j = lane; j < ATTN_TILE; j += 32) mx = fmaxf(mx, p_s[g][j]);
            mx            = warp_max(mx);
            float m_old   = m_s[g];
            float m_new   = fmaxf(m_old, mx);
            float sum     = 0.0f;
            for (int j = lane; j < ATTN_TILE; j += 32) {
                float e     = m_new == -INFINITY ? 0.0f : expf(p_s[g][j] - m_new);
                p_s[g][j]   = e;
                sum        += e;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                float corr = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                corr_s[g]  = corr;
                l_s[g]     = l_s[g] * corr + sum;
                m_s[g]     = m_new;
            }
        }
        __syncthreads();

        // 3. acc[g][d] = acc * corr + sum_j p[g][j] * scale_v[j] * V[j][d]
        const int n_tile = min(ATTN_TILE, k_end - t0);
#pragma unroll
        for (int jd = 0; jd < DPT; jd++) {
            const int d = tid + jd * ATTN_THREADS;
            if (d >= hd) break;
#pragma unroll
            for (int g = 0; g < ATTN_MAX_G; g++)
                if (g < ng) acc[g][jd] *= corr_s[g];
            for (int j = 0; j < n_tile; j++) {
                float w = vsc_s[j];
                if (w == 0.0f) continue; // masked key (or an all-zero FP8 row: contributes 0 anyway)
                float v = load_elem<KT>(a.pool + vofs_s[j], d) * w;
#pragma unroll
                for (int g = 0; g < ATTN_MAX_G; g++)
                    if (g < ng) acc[g][jd] += p_s[g][j] * v;
            }
        }
        __syncthreads(); // p_s, vofs_s, vsc_s are rewritten by the next tile
    }

    // 4. write: normalized output, or the partial for the merge
#pragma unroll
    for (int jd = 0; jd < DPT; jd++) {
        const int d = tid + jd * ATTN_THREADS;
        if (d >= hd) break;
#pragma unroll
        for (int g = 0; g < ATTN_MAX_G; g++) {
            if (g >= ng) continue;
            size_t th = (size_t)t * a.n_heads + h0 + g;
            if (parts_t == 1)
                a.out[th * hd + d] = l_s[g] > 0.0f ? acc[g][jd] / l_s[g] : 0.0f;
            else
                a.part_acc[(th * a.n_parts + part) * hd + d] = acc[g][jd];
        }
    }
    if (parts_t > 1 && tid < ng) {
        size_t th = (size_t)t * a.n_heads + h0 + tid;
        a.part_ml[(th * a.n_parts + part) * 2]     = m_s[tid];
        a.part_ml[(th * a.n_parts + part) * 2 + 1] = l_s[tid];
    }
}

__global__ void attn_merge_kernel(const struct attn_args a, int32_t hd) {
    const int32_t t = blockIdx.x, h = blockIdx.y;
    const int32_t pos = a.pos[t];
    const int32_t lo  = a.window > 0 ? max(0, pos - a.window + 1) : 0;
    const int32_t parts_t = (int32_t)(((int64_t)(pos - lo + 1) + a.part_size - 1) / a.part_size);
    if (parts_t <= 1) return;
    const size_t th = (size_t)t * a.n_heads + h;
    const float *ml = a.part_ml + th * a.n_parts * 2;
    float        M  = -INFINITY;
    for (int i = 0; i < parts_t; i++) M = fmaxf(M, ml[2 * i]);
    float den = 0.0f;
    for (int i = 0; i < parts_t; i++)
        if (ml[2 * i] != -INFINITY) den += ml[2 * i + 1] * expf(ml[2 * i] - M);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.0f;
        for (int i = 0; i < parts_t; i++)
            if (ml[2 * i] != -INFINITY) num += a.part_acc[(th * a.n_parts + i) * hd + d] * expf(ml[2 * i] - M);
        a.out[th * hd + d] = den > 0.0f ? num / den : 0.0f;
    }
}

template <int HD>
static void attn_launch_hd(dim3 grid, cudaStream_t st, const struct attn_args &a, const struct kv_dev_layout &L) {
    switch (L.dtype) {
    case COOPT_DTYPE_F32: attn_kernel<HD, COOPT_DTYPE_F32><<<grid, ATTN_THREADS, 0, st>>>(a, L); break;
    case COOPT_DTYPE_F16: attn_kernel<HD, COOPT_DTYPE_F16><<<grid, ATTN_THREADS, 0, st>>>(a, L); break;
    case COOPT_DTYPE_BF16: attn_kernel<HD, COOPT_DTYPE_BF16><<<grid, ATTN_THREADS, 0, st>>>(a, L); break;
    case COOPT_DTYPE_FP8_E4M3: attn_kernel<HD, COOPT_DTYPE_FP8_E4M3><<<grid, ATTN_THREADS, 0, st>>>(a, L); break;
    case COOPT_DTYPE_FP8_E5M2: attn_kernel<HD, COOPT_DTYPE_FP8_E5M2><<<grid, ATTN_THREADS, 0, st>>>(a, L); break;
    default:
        coopt_log_error("cuda attention: KV type %s is not supported", coopt_dtype_name((enum coopt_dtype)L.dtype));
        COOPT_ASSERT(!"unsupported KV type");
    }
    CUDA_CHECK_LAUNCH();
}

// The launch geometry below depends on the key-range bound only through this bucket (a power
// of two, at least one tile), so a step recorded into a CUDA graph replays correctly for every
// later step whose bound falls in the same bucket: the kernels read the real positions from
// device memory, and partitions past a token's range exit at once.
int64_t cuda_attn_bound_bucket(int64_t bound) {
    int64_t b = ATTN_TILE;
    while (b < bound) b *= 2;
    return b;
}

// Longest key range any token of the step can have, bucketed: positions held before the step
// plus the step's tokens (when the page manager is there), the block table's span, the window.
// Host-side only; step recording (step.cu) keys CUDA graphs on it.
int64_t cuda_attn_bound(const struct coopt_kv_cache *kv, const struct coopt_batch *b) {
    int64_t bound = (int64_t)b->max_blocks * kv->layout.page_size;
    if (kv->seqs) {
        int64_t mx = 0;
        for (int32_t s = 0; s < kv->n_seq_max; s++)
            if (kv->seqs[s].live) mx = COOPT_MAX(mx, kv->seqs[s].n_tokens);
        bound = COOPT_MIN(bound, mx + b->n_tokens);
    }
    if (b->window > 0) bound = COOPT_MIN(bound, (int64_t)b->window);
    return cuda_attn_bound_bucket(bound);
}

void cuda_attention(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                    const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale) {
    const struct coopt_kv_layout *l  = &kv->layout;
    struct cuda_backend          *cb = cuda_impl(be);
    const int32_t                 nkv = l->n_kv_heads, hd = l->head_dim;
    COOPT_ASSERT(n_heads % nkv == 0 && layer >= 0 && layer < l->n_layers);
    if (b->n_tokens <= 0) return;
    if (hd <= 0 || hd > ATTN_MAX_HD) {
        coopt_log_error("cuda attention: head_dim %d is not supported (at most %d)", hd, ATTN_MAX_HD);
        COOPT_ASSERT(!"unsupported head_dim");
    }
    // Ablation switches (struct coopt_backend): per-head reads make every CTA serve one query
    // head (no sharing of K/V reads inside the group); partition 0 turns split-K off.
    const int32_t sub_g = be->attn_per_head ? 1 : ATTN_MAX_G;
    const int32_t group = n_heads / nkv, n_sub = (group + sub_g - 1) / sub_g;

    int64_t bound = cuda_attn_bound(kv, b);
    // Split the keys only when the batch alone leaves SMs idle (decode, small batches): 512
    // positions per partition, halved (down to one tile) while the grid would still be small.
    int64_t ctas      = (int64_t)b->n_tokens * nkv * n_sub;
    int32_t part_size = ATTN_PART;
    while (part_size > ATTN_TILE && ctas * ((bound + part_size - 1) / part_size) < 2LL * cb->n_sm) part_size /= 2;
    int64_t n_parts = (bound + part_size - 1) / part_size;
    if (ctas >= 2LL * cb->n_sm || n_parts <= 1 || be->attn_partition == 0) n_parts = 1;
    if (n_parts > 65535) { // grid.z limit: longer partitions
        part_size = (int32_t)((bound + 65534) / 65535 + ATTN_TILE - 1) / ATTN_TILE * ATTN_TILE;
        n_parts   = (bound + part_size - 1) / part_size;
    }

    struct attn_args a;
    a.out          = out;
    a.q            = q;
    a.pool         = kv->pool;
    a.pos          = b->pos;
    a.tok_seq      = b->tok_seq;
    a.block_tables = b->block_tables;
    a.part_acc     = NULL;
    a.part_ml      = NULL;
    a.max_blocks   = b->max_blocks;
    a.window       = b->window;
    a.layer        = layer;
    a.n_heads      = n_heads;
    a.group        = group;
    a.n_sub        = n_sub;
    a.sub_g        = sub_g;
    a.n_parts      = (int32_t)n_parts;
    a.part_size    = n_parts > 1 ? part_size : INT_MAX;
    a.scale        = scale;
    if (n_parts > 1) {
        size_t n_th = (size_t)b->n_tokens * (size_t)n_heads * (size_t)n_parts;
        float *w    = (float *)cuda_workspace(cb, n_th * ((size_t)hd + 2) * sizeof(float));
        a.part_acc  = w;
        a.part_ml   = w + n_th * (size_t)hd;
    }
    struct kv_dev_layout L = kv_dev_layout_make(l);
    dim3                 grid((unsigned)b->n_tokens, (unsigned)(nkv * n_sub), (unsigned)n_parts);
    switch (hd) {
    case 64: attn_launch_hd<64>(grid, cb->stream, a, L); break;
    case 80: attn_launch_hd<80>(grid, cb->stream, a, L); break;
    case 96: attn_launch_hd<96>(grid, cb->stream, a, L); break;
    case 128: attn_launch_hd<128>(grid, cb->stream, a, L); break;
    default: attn_launch_hd<0>(grid, cb->stream, a, L); break; // generic path: any head_dim <= 256
    }
    if (n_parts > 1) {
        attn_merge_kernel<<<dim3((unsigned)b->n_tokens, (unsigned)n_heads), 128, 0, cb->stream>>>(a, hd);
        CUDA_CHECK_LAUNCH();
    }
}
