/*
 * attn.cuh -- what the two attention kernels share: paged_attn.cu (decode and split-K, every KV
 * type and head_dim, on CUDA cores or, for query groups with head dims 64/128 and F16/FP8 KV, on
 * tensor cores) and attn_prefill.cu (chunked prefill on tensor cores, F16 and FP8 KV, head dims
 * 64/80/96/128). The argument block, the rule that splits one step's tokens between the two
 * kernels, and the cp.async / FP8 / ex2 / fragment helpers.
 *
 * Routing. When the launcher runs the tensor-core kernel (tc_tokens > 0), the step's tokens are
 * cut into query tiles of tc_tokens consecutive batch tokens. A tile whose tokens all belong to one
 * sequence is computed by the tensor-core kernel; every other tile (a tile that mixes sequences,
 * e.g. decode tokens of several sequences next to the end of a prefill chunk) by the decode kernel.
 * Both kernels evaluate the same predicate (attn_tile_is_tc) on device memory, so the split needs
 * no host knowledge of the batch and every token is written exactly once.
 *
 * Scores are kept in log2 units (q . k * scale * log2(e)) so softmax uses ex2 directly; the
 * split-K partials (max, sum) are in the same units.
 */
#ifndef COOPT_CUDA_ATTN_CUH
#define COOPT_CUDA_ATTN_CUH

#include "cuda/common.cuh"
#include "cuda/kv_dev.cuh"
#include "cuda/kv_store.cuh"

#define ATTN_LOG2E 1.4426950408889634f

struct attn_args {
    float         *out;     // [n_tokens][n_heads][hd]
    const float   *q;       // [n_tokens][n_heads][hd]
    const uint8_t *pool;    // the paged KV pool (kv_cache.h layout)
    const int32_t *pos;     // [n_tokens]
    const int32_t *tok_seq; // [n_tokens]
    const int32_t *block_tables; // [n_seqs][max_blocks], -1 = released
    float         *part_acc;     // split-K workspace: [n_tokens][n_heads][n_parts][hd] f32
    float         *part_ml;      //                    [n_tokens][n_heads][n_parts][2] (max, sum), log2 units
    int32_t        n_tokens, max_blocks, window, layer, n_heads;
    int32_t        group;     // query heads per KV head
    int32_t        n_sub;     // CTAs per KV head: ceil(group / heads per CTA)
    int32_t        n_parts;   // split-K partials per token (grid.z of the decode kernel; with kv_sep grid.z - 1)
    int32_t        part_size; // keys per partition (INT_MAX: no split)
    int32_t        tc_tokens; // tokens per tensor-core query tile; 0 = no tensor-core kernel this step
    float          scale;
    // Nonzero: every CTA of the merge kernel lets the kernel after it launch at once
    // (griddepcontrol.launch_dependents), so the o projection's GEMV (programmatic dependent
    // launch) takes the SMs the merge leaves idle and streams its first weights before it waits
    // (pdl_wait): +0.4-1.5 % tg128 at depths 512-16384 (llama2-7b, docs/BENCHMARKS.md). The decode
    // kernel does not: a GEMV resident beside it (one-partition ranges, no merge) made decode at
    // depth 0 5 % slower.
    int32_t        pdl_trigger;
    // One decode token: the output also staged for the GEMV that reads it next (xstage.cuh, by the
    // decode kernel where the token's range is one partition, else by the merge kernel); NULL =
    // none. Needs head_dim % 16 == 0 (a 16-element tile in one 16-lane half).
    __half        *xo;
    float2        *xo_part;
    // Fused Opt-KV write (decode kernel only; fk == NULL: off): q is unrotated and the step's
    // K/V rows are not stored yet. Every CTA rotates its q heads as it loads them; the CTA of the
    // last partition of each (token, KV head) rotates and stores the token's K row (fk, less the
    // K offset koff when set) and V row (fv) first. Needs one token per sequence, one CTA per
    // (token, KV head, partition) (n_sub == 1) and no tensor-core tiles.
    const float   *fk, *fv;     // [n_tokens][n_kv_heads][hd]
    const int64_t *slots;       // [n_tokens]
    const float   *koff;        // [n_seq_max][n_layers][n_kv_heads][hd] K offsets, or NULL
    const int32_t *seq_ids;     // [n_seqs] (with koff)
    uint8_t       *pool_w;      // the pool, written
    int32_t        n_layers;
    // With fk: nonzero = the stores go to two CTAs of their own after the token's partitions of
    // [lo, pos) (z = parts - 1 stores the K row, z = parts the V row; parts = attn_parts_of), which
    // also write the last partial, the token's own key (the K CTA its max and sum, the V CTA its
    // acc); the partitions never wait for a store, and the merge kernel always runs. Zero: the
    // last partition's CTA stores both rows before it walks [.., pos].
    int32_t        kv_sep;
    // With kv_sep and one partition: nonzero = the grid is (store K, store V, partition) in z, and
    // the partition's CTA waits for the store CTAs' partial (flags: a count per (token, KV head),
    // zero between kernels) and writes the output itself: no merge kernel. The store CTAs never
    // wait and precede every partition CTA in launch order.
    int32_t        kv_wait;
    int32_t       *flags;
    // With kv_wait (sm_90+): nonzero = each (store K, store V, partition) triple is one thread-block
    // cluster; the store CTAs write the own key's score per query head and its V row into the
    // partition CTA's shared memory (past the decode kernel's dynamic shared memory: dec_cfg::OWN)
    // and all three meet at a cluster barrier: no fence, count or L2 round trip (flags unused).
    int32_t        kv_cluster;
    // With fk (rows [lo, pos) were all stored by earlier steps, and the block tables, positions
    // and slots were uploaded before the step's first kernel): nonzero = a CTA that stores no row
    // issues its first sub-tiles' copies before it waits for the kernel before (pdl_wait), so
    // their latency overlaps that kernel's tail; only q, fk and fv come from that kernel.
    int32_t        pre;
    struct rope_params rope;
};

// True when query tile `tile` (tokens [tile*tc_tokens, ...)) is computed by the tensor-core
// kernel: all its tokens belong to one sequence. Every thread of the (1-D) block must call it.
__device__ __forceinline__ bool attn_tile_is_tc(const struct attn_args &a, int32_t tile) {
    const int32_t t0 = tile * a.tc_tokens, t1 = min(a.n_tokens, t0 + a.tc_tokens);
    const int32_t s0   = a.tok_seq[t0];
    int           diff = 0;
    for (int32_t t = t0 + (int32_t)threadIdx.x; t < t1; t += (int32_t)blockDim.x) diff |= a.tok_seq[t] != s0;
    return !__syncthreads_or(diff);
}

// First key position of token t's range (sliding window).
__device__ __forceinline__ int32_t attn_lo(const struct attn_args &a, int32_t pos) {
    return a.window > 0 ? max(0, pos - a.window + 1) : 0;
}

// Number of split-K partials of token t: the partitions of its range [lo, pos], or with kv_sep
// those of [lo, pos) plus the store CTA's (the last).
__device__ __forceinline__ int32_t attn_parts_of(const struct attn_args &a, int32_t pos) {
    const int64_t n_keys = (int64_t)pos - attn_lo(a, pos) + 1 - (a.kv_sep ? 1 : 0);
    return (int32_t)((n_keys + a.part_size - 1) / a.part_size) + (a.kv_sep ? 1 : 0);
}

// 2^x (ex2.approx: relative error ~2^-22; ex2(-inf) = +0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ---- FP8 -> f16 / f32 in pairs ----

template <int KT> __device__ __forceinline__ __half2 fp8x2_to_half2(uint16_t v) {
    static_assert(KT == COOPT_DTYPE_FP8_E4M3 || KT == COOPT_DTYPE_FP8_E5M2, "fp8x2_to_half2: not an FP8 type");
    __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)v, KT == COOPT_DTYPE_FP8_E4M3 ? __NV_E4M3 : __NV_E5M2);
    return __half2(h);
}

// ---- tensor-core operands (both kernels) ----

// Four 8x8 b16 matrices from shared memory (lane l gives the address of row l % 8 of matrix l / 8),
// as mma fragments; _t: transposed.
__device__ __forceinline__ void ldsm_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
}
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi); // .x (low 16 bits) = lo
    return *(uint32_t *)&h;
}
// The 8x8 b16 matrix whose row lane / 4 holds elements 2 (lane % 4), +1 in each lane's x,
// transposed in the same layout (movmatrix, sm_75+).
__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}
// The f16x2 bits of h.
__device__ __forceinline__ uint32_t half2_bits(__half2 h) { return *(uint32_t *)&h; }

// Bytes per element of a KV type.
template <int KT> struct kv_type_info {
    static constexpr int  EB     = KT == COOPT_DTYPE_F32 ? 4 : (KT == COOPT_DTYPE_F16 || KT == COOPT_DTYPE_BF16) ? 2 : 1;
    static constexpr bool SCALED = KT == COOPT_DTYPE_FP8_E4M3 || KT == COOPT_DTYPE_FP8_E5M2;
};

// ---- launchers (attn_prefill.cu) ----

// True when the tensor-core kernel is compiled for this head_dim and KV type.
bool cuda_attn_prefill_supported(int32_t head_dim, enum coopt_dtype kv_type);
// Launches the tensor-core kernel for the uniform tiles of the step (see Routing above): grid
// (ceil(n_tokens / a.tc_tokens), n_kv_heads * a.n_sub), heads_per_cta = 64 / a.tc_tokens.
void cuda_attn_prefill_launch(cudaStream_t st, const struct attn_args &a, const struct kv_dev_layout &L,
                              int32_t heads_per_cta);

#endif // COOPT_CUDA_ATTN_CUH
