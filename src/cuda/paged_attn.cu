/*
 * paged_attn.cu -- paged grouped-query attention over the KV cache (Opt-KV read, Opt-GQA,
 * Opt-Pa) for ragged batches mixing decode tokens and prefill chunks: the decode / split-K kernel
 * on CUDA cores, its merge, and the launcher that also routes prefill tiles to the tensor-core
 * kernel of attn_prefill.cu (routing rule in attn.cuh).
 *
 * Token t (sequence s = tok_seq[t], position pos[t]) attends to positions
 * [lo, pos] with lo = max(0, pos - window + 1) (window 0: lo = 0), whose rows live in pages
 * block_tables[s][p / page_size] (batch.h). All tokens of the step were stored by rope_store
 * before this runs, so causality inside a prefill chunk needs no special case.
 *
 * attn_decode_kernel<HD, KT, G>: one CTA per (token, KV head, query-head subgroup, partition).
 *   Grid: (n_tokens, n_kv_heads * n_sub, n_parts); Block: 128 threads = 4 warps. A programmatic
 *   dependent launch with cuda_backend.attn_pdl (sm_90, the default): its CTAs are resident
 *   while the kernel before (rope_store, or the q/k/v GEMV) finishes, and wait for it first.
 *   Opt-GQA: the CTA serves G (1, 2, 4 or 8) query heads of its KV group from ONE read of each K
 *   and V row; larger groups are split into n_sub = ceil(group / G) subgroups (each reads the rows
 *   once); groups that are not a power of two leave the last heads of a subgroup idle.
 *   Opt-Pa (flash-decoding): the key range is cut into partitions (512 positions of an F16
 *   cache by default, the same bytes for other types; fewer while the grid would leave SMs idle,
 *   more while it would be very large; see cuda_attention); each CTA writes an unnormalized
 *   partial (acc, max, sum) to the workspace and
 *   attn_merge_kernel combines them with log-sum-exp weights.
 *   Inside a partition, warp w takes sub-tiles w, w+4, w+8, ... of SK keys and runs its own
 *   online softmax over them (no block-wide barrier in the key loop):
 *     load:    cp.async copies the sub-tile's K and V rows (16-byte chunks, coalesced: a row is
 *              contiguous) and, for FP8, their f32 scales into the warp's ring of NST shared-memory
 *              stages, NST - 1 sub-tiles ahead of the one being computed (their block-table
 *              entries read three sub-tiles before that); keys past the range or on released
 *              pages (-1 in the block table) are zero-filled and masked.
 *     compute: the warp is cut into KG key groups of LPK lanes; lane i of a group holds dims
 *              [8i, 8i + 8) of q (all G heads, in registers) and reads the same 8 dims of K and V
 *              (16 bytes of F16, 8 of FP8: dequantized in registers; FP8 scales multiply the
 *              score and the probability, not the elements). Scores are reduced over the LPK
 *              lanes with shuffles; each key group keeps its own running max / sum / acc.
 *   At the end the key groups (shuffles) and the 4 warps (shared memory) are merged.
 *   Tensor-core walk (TC; head dims 64 and 128, F16 and FP8 caches, cuda_attn_tc_decode: by
 *   default where a CTA serves 2 or more query heads): the same grid, stages and merges, but each
 *   warp computes a sub-tile (32 FP8 / 16 F16 keys, rows swizzled: dec_cfg::at) with mma m16n8k16
 *   whose rows are the CTA's query heads (F16) or the sub-tile's keys (FP8: S^T = K Q^T, O^T =
 *   V^T P^T, no padding rows): q rounded to f16 (as the prefill kernel), K and V exact in f16, P
 *   rounded to f16 (FP8: times vs / the largest V scale seen, see the walk). On
 *   CUDA cores every key costs G dot products of shuffled partial sums; a GQA group of 4 (llama3-8b)
 *   left the walk instruction-bound at 0.9-1.5 TB/s at 16k (docs/BENCHMARKS.md).
 *   Fused Opt-KV write (cuda_rope_store_attention, attn_args.fk; decode steps): before its first
 *   load, the CTA of a (token, KV head)'s last partition rotates the token's K row, converts K
 *   and V to the cache type (kv_store_rows, as rope_store) and stores them; every CTA rotates its
 *   q heads while loading them (cos/sin of the token's angles computed once in shared memory).
 *   FP8 caches below CUDA_ATTN_STORE_CTA_BOUND (attn_args.kv_sep): two store CTAs per (token, KV
 *   head) after the partitions, one per row, take the write off the walks (the partitions then
 *   cover [lo, pos)); each reads its row back as stored, and together they write the last
 *   partial, the token's own key: its score per query head (K CTA) and its V row (V CTA). Over
 *   one partition (attn_args.kv_wait) they come first in z, count their part as written (a fence
 *   and an atomic add per (token, KV head)), and the partition's CTA waits for both counts after
 *   its walk and merges that partial itself, so no merge kernel runs. On sm_90 the three CTAs
 *   are one thread-block cluster (attn_args.kv_cluster): the store CTAs write the partial into the
 *   partition CTA's shared memory and all three meet at the cluster barrier instead.
 *   Head dims 64, 80, 96, 128 are template parameters (LPK = 8 or 16 lanes per key); any other
 *   even head_dim up to 256 (the test models' 8 and 16 included) runs the generic path HD = 0:
 *   one key per warp, lane i holds dims {2i, 2i+1, 2i+64, ...}, rows read straight from global
 *   memory (no staging; slow but exact).
 *   Shared memory (dynamic): NST stages of [K SK rows][V SK rows][K scales][V scales][mask] per
 *   warp; reused at the end for the cross-warp merge. CUDA-core walk hd 128: F16 65 KiB, FP8 50 KiB;
 *   tensor-core walk (three stages): F16 99 KiB (rows swizzled), FP8 111 KiB (padded).
 *   Staged output (attn_args.xo; rope_store_attention_then_matmul, one decode token): the kernel
 *   that writes a head's output (this one for a one-partition range, else the merge) also stores
 *   it in the o projection GEMV's staged-input format (xstage.cuh), each 16-lane half a tile.
 *
 * attn_merge_kernel (merging in the decode kernel's last CTA per KV head instead, counted with a
 *   fence and an atomic, measured 5-13 % slower at depth on llama3-8b; docs/BENCHMARKS.md):
 *   Grid (n_tokens, n_heads); Block 128 threads. With attn_args.pdl_trigger it first lets the
 *   next kernel (the o projection) launch; then it waits for the decode kernel (a programmatic
 *   dependent launch with cuda_backend.attn_merge_pdl, the default on sm_90). Skips tokens whose
 *   range fits in one partition without store CTAs (the decode kernel wrote them directly) and
 *   tokens of tensor-core tiles. (Not launched for attn_args.kv_wait.)
 *   Warp w takes partitions w, w + 4, ..., lanes over dims, with a running (max, sum, acc) per
 *   warp; shared memory merges the four warps. Its first round of partials (up to 64 at head dim
 *   128) is loaded together with the token's position, before the range is known, so the
 *   partials cost one round trip (a max pass, then a sum pass, cost two more before: llama3-8b
 *   gptq4 tg128 at depth 16384 +2.8 % fp8 / +2.9 % f16, docs/BENCHMARKS.md).
 *
 * Numerics: f32 throughout; q is pre-multiplied by scale * log2(e) so probabilities are ex2 of
 * score differences. Same cache bytes as the CPU reference, different summation order.
 */
#include "cuda/attn.cuh"
#include "cuda/gptq_dev.h"
#include "cuda/xstage.cuh"

#include <limits.h>
#include <math.h>

TRACE_TU(paged_attn)

#define ATTN_WARPS   4
#define ATTN_THREADS (ATTN_WARPS * WARP_SIZE)
#define ATTN_MAX_G   8
#define ATTN_MAX_HD  256
#define ATTN_PART    512 // default keys per split-K partition
#define ATTN_PART_MIN 64
#define ATTN_NOSPLIT  256 // bounds up to this many positions are not split (see the launcher)
#define ATTN_BUCKET_MIN 128
#define ATTN_TC_LONG  4 // sub-tiles a warp (see attn_geometry)
// The tensor-core walk's stage rows swizzled (dec_cfg::at): 1 F16 caches (FP8 keeps rows padded
// by 16 bytes: swizzled, its walk measured 0.2-0.3 % slower at depth 16384 on llama3-8b while F16's
// gained 2.1 %; docs/BENCHMARKS.md), 2 both, 0 neither
#ifndef ATTN_TC_SWZ
#define ATTN_TC_SWZ 1
#endif
// Stages of the tensor-core walk's copy ring (dec_cfg::NST; 2 measured slower, docs/BENCHMARKS.md)
#ifndef ATTN_TC_NST
#define ATTN_TC_NST 3
#endif

// Trace builds with -DATTN_TRACE_PHASES=n: the decode kernel's wait stamp moves to point n (1:
// store CTAs the rows stored, walking CTAs the walk done, before the cross-warp merge; 2: store CTAs
// the rows rotated, before kv_store_rows, a waiting CTA past the cluster barrier; 3: store CTAs at
// the cluster barrier, walking CTAs with q loaded, before the key loop), so dev/trace.py --phases
// shows where a CTA's time goes.
#if defined(COOPT_TRACE) && defined(ATTN_TRACE_PHASES)
#define ATTN_PHASE(n) ((n) == ATTN_TRACE_PHASES ? trace_cta_.on_wait() : (void)0)
#else
#define ATTN_PHASE(n) ((void)0)
#endif

static constexpr int pow2ceil_c(int x) { return x <= 1 ? 1 : 2 * pow2ceil_c((x + 1) / 2); }

// Compile-time geometry of one decode kernel instance (TC: the tensor-core key walk).
template <int HD, int KT, int G, bool TC> struct dec_cfg {
    static constexpr bool FAST   = HD > 0;
    static constexpr int  EB     = kv_type_info<KT>::EB;
    static constexpr bool SCALED = kv_type_info<KT>::SCALED;
    static constexpr int  LPK    = FAST ? pow2ceil_c(HD / 8) : WARP_SIZE; // lanes per key
    static constexpr int  KG     = WARP_SIZE / LPK;                       // key groups per warp
    static constexpr int  NKB    = G <= 4 ? 8 : 4;                        // keys per group per sub-tile
    static constexpr int  SK     = TC ? (EB == 1 ? 32 : 16) : KG * NKB;   // keys per sub-tile
    static constexpr int  RB     = FAST ? HD * EB : 0;                    // bytes per cache row
    // TC: rows swizzled (at, below) or, with ATTN_TC_SWZ=0, padded by 16 bytes
    static constexpr bool SWZ    = TC && (ATTN_TC_SWZ == 2 || (ATTN_TC_SWZ == 1 && EB == 2));
    static constexpr int  RS     = TC && !SWZ ? RB + 16 : RB; // row stride in a stage
    static constexpr int  CPR    = RB / 16;                   // 16-byte chunks per row
    // stage: [K SK*RS][V SK*RS][K scales SK*4][V scales SK*4][valid mask 16] (128-byte multiple when swizzled)
    static constexpr int  OFF_V  = SK * RS;
    static constexpr int  OFF_KS = 2 * SK * RS;
    static constexpr int  OFF_VS = OFF_KS + SK * 4;
    static constexpr int  OFF_M  = OFF_VS + SK * 4;
    static constexpr int  STAGE  = FAST ? (SWZ ? (OFF_M + 16 + 127) / 128 * 128 : OFF_M + 16) : 0;
    // Where byte b (< RB) of row j of a stage's K or V region lives. Swizzled: rows unpadded, and
    // the index of each 16-byte chunk within its 128-byte line XORed with a function of the row
    // (j & 7 for rows of 128 bytes or more; ((j >> 1) & 3) * 2 for 64-byte rows, two a line), so
    // each fragment read of the walks (ldmatrix's 8 rows at one column; FP8's 16-byte reads of 2 x
    // 4 rows, 8-byte V reads of 4 x 4) hits distinct banks, while each 8-lane phase of a copy fills
    // one whole line. Padded rows straddle two lines: twice the shared-memory wavefronts and 1.5 times the
    // L2 sectors a copy instruction (ncu, docs/BENCHMARKS.md).
    static __device__ __forceinline__ int at(int j, int b) {
        const int o = j * RS + b;
        if constexpr (!SWZ) return o;
        const int h = RB >= 128 ? j & 7 : ((j >> 1) & 3) << 1;
        return o ^ (h << 4);
    }
    static constexpr int  NST    = TC ? ATTN_TC_NST : STAGE <= 6144 ? 3 : 2;
    static constexpr int  HDP    = FAST ? HD : ATTN_MAX_HD;
    // cross-warp merge buffers: acc rows of HDS floats, dim d at d + d / 32 (red_at), so the
    // tensor-core walk's scattered writes (lanes of 4 heads x 4 column groups) hit 16 banks, not one
    static constexpr int  HDS    = HDP + HDP / 32 + 8;
    static constexpr int  RED    = ATTN_WARPS * G * (HDS + 2) * 4;
    static constexpr int  SMEM0  = ATTN_WARPS * NST * STAGE > RED ? ATTN_WARPS * NST * STAGE : RED;
    // the fused K/V store (attn_args.fk) uses the space first: two rows and kv_store_rows' scratch
    static constexpr int  FUSE   = 2 * ATTN_MAX_HD * 4 + (int)sizeof(kv_store_smem);
    static constexpr int  SMEM   = SMEM0 > FUSE ? SMEM0 : FUSE;
    // attn_args.kv_cluster: the own key's V row and score per query head, past SMEM
    static constexpr int  OWN    = (HDP + ATTN_MAX_G) * 4;
    static_assert(!FAST || (HD % 8 == 0 && RB % 16 == 0), "fast path needs 16-byte rows of 8-dim chunks");
    static_assert(SK <= WARP_SIZE, "one lane per key of a sub-tile");
    static_assert(!SWZ || RB == 64 || RB % 128 == 0, "swizzled rows: 64 bytes or whole 128-byte lines");
    static_assert(!TC || ((HD == 64 || HD == 128) && (KT == COOPT_DTYPE_F16 || SCALED)),
                  "tensor-core walk: head dims 64, 128; F16 or FP8 caches");
};

// The 8 elements at p (8-dim chunk of a row in shared memory) as f32.
template <int KT> __device__ __forceinline__ void kv_load8(const uint8_t *p, float f[8]) {
    if constexpr (KT == COOPT_DTYPE_F32) {
        float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
        f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
    } else if constexpr (KT == COOPT_DTYPE_F16) {
        uint4    u    = *(const uint4 *)p;
        uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 x     = __half22float2(*(const __half2 *)&w[i]);
            f[2 * i]     = x.x;
            f[2 * i + 1] = x.y;
        }
    } else if constexpr (KT == COOPT_DTYPE_BF16) {
        uint4    u    = *(const uint4 *)p;
        uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            f[2 * i]     = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    } else {
        uint2    u    = *(const uint2 *)p;
        uint32_t w[2] = {u.x, u.y};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 x     = __half22float2(fp8x2_to_half2<KT>((uint16_t)(w[i / 2] >> (16 * (i % 2)))));
            f[2 * i]     = x.x;
            f[2 * i + 1] = x.y;
        }
    }
}

// Elements d and d + 1 of a cache row in global memory (generic path; d even).
template <int KT> __device__ __forceinline__ float2 kv_load2(const uint8_t *row, int d) {
    if constexpr (KT == COOPT_DTYPE_F32) {
        return *(const float2 *)(row + (size_t)d * 4);
    } else if constexpr (KT == COOPT_DTYPE_F16) {
        return __half22float2(*(const __half2 *)(row + (size_t)d * 2));
    } else if constexpr (KT == COOPT_DTYPE_BF16) {
        uint32_t w = *(const uint32_t *)(row + (size_t)d * 2);
        return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
    } else {
        return __half22float2(fp8x2_to_half2<KT>(*(const uint16_t *)(row + d)));
    }
}

__device__ __forceinline__ uint64_t shfl_u64(uint64_t v, int src) {
    uint32_t lo = __shfl_sync(0xffffffffu, (uint32_t)v, src), hi = __shfl_sync(0xffffffffu, (uint32_t)(v >> 32), src);
    return ((uint64_t)hi << 32) | lo;
}

// Where dim d sits in a row of the decode kernel's cross-warp merge buffer (dec_cfg::HDS).
__device__ __forceinline__ int red_at(int d) { return d + (d >> 5); }

// Thread-block clusters (sm_90+; attn_args.kv_cluster): *p = v in the shared memory of CTA `rank`
// of this CTA's cluster (p: this CTA's address of the same variable), and the cluster barrier
// (every thread of every CTA of the cluster; shared-memory writes before it, release, are seen
// after it, acquire).
__device__ __forceinline__ void cluster_store(float *p, uint32_t rank, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"((uint32_t)__cvta_generic_to_shared(p)), "r"(rank));
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(r), "f"(v) : "memory");
#else
    (void)p, (void)rank, (void)v;
#endif
}
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// Dim held by element e (0..7) of lane `lig` in its key group.
template <int HD> __device__ __forceinline__ int dec_dim(int lig, int e) {
    if constexpr (HD > 0) return lig * 8 + e;
    else return 2 * lig + 64 * (e / 2) + (e % 2);
}

static_assert(ATTN_THREADS == KV_STORE_THREADS, "the fused write runs kv_store_rows on the attention block");

template <int HD, int KT, int G, bool TC>
__global__ void __launch_bounds__(ATTN_THREADS) attn_decode_kernel(const struct attn_args a, const struct kv_dev_layout L) {
    using C = dec_cfg<HD, KT, G, TC>;
    extern __shared__ __align__(128) uint8_t smem[]; // (the swizzled stages want 128-byte lines)
    float *const own = (float *)(smem + C::SMEM); // kv_cluster: [V row, HDP][score per head], in CTA 2 (z)
    TRACE_CTA(TRACE_ATTN | (TC ? 1u : 0u) << 16 | (unsigned)KT << 17 | (unsigned)blockIdx.z << 24);
    // (launched early with cuda_backend.attn_pdl: everything after pdl_wait may read the previous
    // kernel's output; with attn_args.pre a CTA that stores no row waits after issuing its first copies)
    if (!a.pre) pdl_wait();
    const int     tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int32_t t   = blockIdx.x;
    if (a.tc_tokens > 0 && attn_tile_is_tc(a, t / a.tc_tokens)) return; // computed by the tensor-core kernel
    const int32_t kvh = blockIdx.y / a.n_sub, sub = blockIdx.y % a.n_sub;
    const int32_t g0 = sub * G, ng = min(G, a.group - g0);
    const int32_t hd  = HD > 0 ? HD : L.head_dim;
    const int32_t pos = a.pos[t];
    const int32_t lo  = attn_lo(a, pos);
    const int32_t parts_t = attn_parts_of(a, pos);
    // kv_wait (one partition): z 0 and 1 are the store CTAs (dispatched before the walk, which
    // waits for them), z 2 the partition
    const bool    waits   = a.kv_wait && blockIdx.z == 2;
    const int32_t part    = a.kv_wait ? (waits ? 0 : parts_t - 1 + (int32_t)blockIdx.z) : (int32_t)blockIdx.z;
    if (part >= parts_t + (a.kv_sep ? 1 : 0)) return; // past this token's range (bucketed grid)
    const int32_t  k_begin = (int32_t)((int64_t)lo + (int64_t)part * a.part_size);
    const int32_t  k_end   = (int32_t)min((int64_t)pos + (a.kv_sep ? 0 : 1), (int64_t)k_begin + a.part_size);
    const int32_t  h0      = kvh * a.group + g0; // first query head of the CTA
    const int32_t *bt      = a.block_tables + (size_t)a.tok_seq[t] * (size_t)a.max_blocks;
    const int      kg = lane / C::LPK, lig = lane % C::LPK;
    const bool     fused = a.fk != nullptr;
    // this CTA writes the token's K/V rows (both, or with kv_sep the K row in CTA parts_t - 1 and
    // the V row in CTA parts_t, the store CTAs, which walk no keys)
    const bool     store = fused && !waits && part >= parts_t - 1;
    const bool     sep   = store && a.kv_sep;
    const int      srow  = sep ? part - (parts_t - 1) : 0; // the store CTA's row: 0 K, 1 V
    const bool     pre   = a.pre && C::FAST && !store;
    // a CTA that stores waits once it has its rope table and slot (the rows it stores, fk and fv,
    // are the kernel before's; pos, the slots and the K offsets are older)
    if (a.pre && !pre && !store) pdl_wait();
    // Fused: cos / sin of the token's angles, computed once for the CTA (pair i of every head);
    // a pre CTA computes them after its first copies are out (only its q rotation needs them)
    __shared__ float rope_c[ROPE_MAX_HALF], rope_s[ROPE_MAX_HALF];
    auto rope_table = [&]() {
        if (!fused) return;
        for (int i = tid; i < hd / 2; i += ATTN_THREADS) {
            const float an = (float)pos * a.rope.inv_freq[i];
            rope_c[i] = cosf(an), rope_s[i] = sinf(an);
        }
        __syncthreads();
    };
    // (the CUDA-core walk measured 0.6 % slower with the table late and the entries read ahead)
    const bool late = pre && TC;
    if (!late) rope_table();

    // Element d of query head h0 + g (g < ng, row q_head(g)), unscaled; fused: rotated here, with
    // the same operations as rope_store (the element and its pair partner, one cos/sin per dim).
    // q_partner gives the dim to read beside d (d itself when not fused) and q_rot the value from
    // the two, so callers issue all their loads first: q comes from L2 or DRAM, and a load per
    // element used at once made the prologue a chain of round trips (3-4.5 us on an H100).
    auto q_head    = [&](int g) -> const float * { return a.q + ((size_t)t * a.n_heads + h0 + g) * hd; };
    auto q_pairing = [&](int d, int *pd, bool *first) -> int { // d's angle, its partner, whether d is i0
        const int i = min(a.rope.layout == COOPT_ROPE_INTERLEAVED ? d / 2 : d % (hd / 2), ROPE_MAX_HALF - 1);
        int       i0, i1;
        rope_pair(a.rope, i, &i0, &i1);
        *first = d == i0, *pd = d == i0 ? i1 : i0;
        return i;
    };
    auto q_partner = [&](int d) -> int {
        int  pd = d;
        bool first;
        if (fused) q_pairing(d, &pd, &first);
        return pd;
    };
    auto q_rot = [&](int d, float x, float xp) -> float {
        if (fused) {
            int         pd;
            bool        first;
            const int   i = q_pairing(d, &pd, &first);
            float       y0, y1;
            if (first) rope_rotate(x, xp, rope_c[i], rope_s[i], &y0, &y1);
            else rope_rotate(xp, x, rope_c[i], rope_s[i], &y0, &y1);
            x = first ? y0 : y1;
        }
        return x;
    };
    // The K store CTA's q (its warp's heads g = warp, warp + ATTN_WARPS, ...), loaded before the
    // scale search so the own key's score (below) waits for no load.
    constexpr int NI = (HD > 0 ? HD + WARP_SIZE - 1 : ATTN_MAX_HD) / WARP_SIZE, NGW = (G + ATTN_WARPS - 1) / ATTN_WARPS;
    float         sqx[NGW][NI], sqp[NGW][NI];
    // Fused write: the last partition's CTA stores the token's K and V rows of this KV head (as
    // rope_store_kernel: rotated K less its offset, V as is, then kv_store_rows) before any of
    // its loads; the barrier orders them before its cp.async copies. With kv_sep each store CTA
    // stores its row (at rows, as the first of the two) and keeps it as a reader dequantizes it.
    if (store) {
        float         *rows = (float *)smem; // [2][hd]; the stages are not in use yet
        kv_store_smem &sm   = *(kv_store_smem *)(smem + 2 * ATTN_MAX_HD * 4);
        const float   *kr = a.fk + ((size_t)t * L.n_kv_heads + kvh) * hd, *vr = a.fv + ((size_t)t * L.n_kv_heads + kvh) * hd;
        const float   *c  = a.koff ? a.koff + kv_koff_index(a.n_layers, L.n_kv_heads, hd, a.seq_ids[a.tok_seq[t]],
                                                            a.layer, kvh)
                                   : nullptr;
        const int64_t  slot = a.slots[t];
        const float    step = C::SCALED ? kv_store_step(L.scale_search) : 0.0f; // (before the wait: see there)
        if (a.pre) pdl_wait();
        for (int i = tid; i < hd / 2 && srow == 0; i += ATTN_THREADS) {
            int i0, i1;
            rope_pair(a.rope, i, &i0, &i1);
            float y0, y1;
            rope_rotate(kr[i0], kr[i1], rope_c[i], rope_s[i], &y0, &y1);
            rows[i0] = c ? __fsub_rn(y0, c[i0]) : y0;
            rows[i1] = c ? __fsub_rn(y1, c[i1]) : y1;
        }
        float *vrow = rows + (sep ? 0 : hd);
        for (int i = tid; i < hd && (!sep || srow == 1); i += ATTN_THREADS) vrow[i] = vr[i];
        __syncthreads();
        const int64_t page = kv_slot_page(L, slot);
        const int32_t row  = kv_slot_row(L, slot);
        uint8_t      *dst[2]  = {a.pool_w + kv_offset(L, page, a.layer, 0, kvh, row),
                                 a.pool_w + kv_offset(L, page, a.layer, 1, kvh, row)};
        float        *sdst[2] = {nullptr, nullptr};
        if (C::SCALED)
            sdst[0] = (float *)(a.pool_w + kv_scale_offset(L, page, a.layer, 0, kvh, row)),
            sdst[1] = (float *)(a.pool_w + kv_scale_offset(L, page, a.layer, 1, kvh, row));
        const int nr = sep ? 1 : 2;
        if (sep && srow == 0) {
#pragma unroll
            for (int j = 0; j < NGW; j++) {
                const float *qh = q_head(min(warp + j * ATTN_WARPS, ng - 1));
#pragma unroll
                for (int i = 0; i < NI; i++) {
                    const int d = min(lane + i * WARP_SIZE, hd - 1);
                    sqx[j][i] = qh[d], sqp[j][i] = qh[q_partner(d)];
                }
            }
        }
        // (sep: the row comes back as the walk would read it, in place)
        ATTN_PHASE(2);
        kv_store_rows<KT>(rows, nr, hd, dst + srow, sdst + srow, L.scale_search, step, sm, sep ? rows : nullptr);
        __syncthreads(); // (CTA-scope ordering: the stores before this CTA's later copies)
        ATTN_PHASE(1);   // (the rows stored)
    }

    // The store CTAs: the last partial, the token's own key, for each query head: (max, sum) =
    // (score, 1) in log2 units from the K CTA (the tensor-core walk's q rounded to f16 as that
    // walk rounds it), acc = v from the V CTA.
    if (sep) {
        const float *row = (const float *)smem; // the CTA's row as stored, dequantized (kv_store_rows)
#pragma unroll
        for (int j = 0; j < NGW; j++) {
            const int g = warp + j * ATTN_WARPS;
            if (g >= ng) break;
            const size_t pi = ((size_t)t * a.n_heads + h0 + g) * a.n_parts + parts_t - 1;
            if (srow == 1) {
                if (!a.kv_cluster)
                    for (int d = lane; d < hd; d += WARP_SIZE) a.part_acc[pi * hd + d] = row[d];
                else if (g == 0) // (one V row serves every head)
                    for (int d = lane; d < hd; d += WARP_SIZE) cluster_store(own + d, 2, row[d]);
                continue;
            }
            float sc = 0.0f;
#pragma unroll
            for (int i = 0; i < NI; i++) {
                const int d = lane + i * WARP_SIZE;
                if (d < hd) {
                    const float x = q_rot(d, sqx[j][i], sqp[j][i]);
                    sc            = fmaf(TC ? __half2float(__float2half_rn(x)) : x, row[d], sc);
                }
            }
            sc = warp_sum(sc);
            if (lane == 0 && a.kv_cluster) cluster_store(own + C::HDP + g, 2, sc * (a.scale * ATTN_LOG2E));
            else if (lane == 0) a.part_ml[pi * 2] = sc * (a.scale * ATTN_LOG2E), a.part_ml[pi * 2 + 1] = 1.0f;
        }
        if (a.kv_wait && a.kv_cluster) { // the partition's CTA reads it after the cluster barrier (see there)
            ATTN_PHASE(3);
            cluster_barrier();
        } else if (a.kv_wait) { // the partition's CTA waits for both counts (see there)
            __threadfence();
            __syncthreads();
            if (tid == 0) atomicAdd(a.flags + (size_t)t * L.n_kv_heads + kvh, 1);
        }
        return;
    }
    // q of the CTA's heads at this lane's 8 dims, in log2 units (loaded after the first K/V
    // copies are issued, so the two latencies overlap; a head's 16 loads before any use: staged
    // as the tensor-core walk stages them, llama2-7b decoded no faster); fused: rotated by q_rot.
    float qr[G][8];
    auto  load_q = [&]() {
        const float qs = a.scale * ATTN_LOG2E;
        int         dd[8], pd[8]; // the dims (clamped: lanes past head_dim hold zeros) and their partners
#pragma unroll
        for (int e = 0; e < 8; e++) dd[e] = min(dec_dim<HD>(lig, e), hd - 1), pd[e] = q_partner(dd[e]);
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float *qh = q_head(min(g, ng - 1));
            float        x[8], xp[8];
#pragma unroll
            for (int e = 0; e < 8; e++) x[e] = qh[dd[e]], xp[e] = qh[pd[e]]; // (all loads first)
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const int d = dec_dim<HD>(lig, e);
                qr[g][e]    = g < ng && d < hd ? q_rot(d, x[e], xp[e]) * qs : 0.0f;
            }
        }
    };
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY, l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    }
    // the tensor-core walk's state: F16 row lane / 4's output dims (see there), max, sum; FP8
    // (tc_o, tc_m8, tc_l8) heads 2 (lane % 4), +1; the largest V scale seen
    float tc_o[TC ? HD / 8 : 1][2];
    float tc_m = -INFINITY, tc_l = 0.0f, tc_sig = 0.0f;
    float tc_m8[2] = {-INFINITY, -INFINITY}, tc_l8[2] = {0.0f, 0.0f}; // FP8: heads 2 tq, 2 tq + 1 (see there)

    const uint64_t vdelta = (uint64_t)L.n_kv_heads * L.head_bytes;              // K row -> V row
    const uint64_t sdelta = (uint64_t)L.n_kv_heads * (uint64_t)L.page_size * 4; // K scale -> V scale
    const int32_t  n_st   = (k_end - k_begin + C::SK - 1) / C::SK;             // sub-tiles of the partition
    const int32_t  my_n   = warp < n_st ? (n_st - 1 - warp) / ATTN_WARPS + 1 : 0;

    // Lane j < SK: the position of key j of sub-tile k (the warp's k-th); its block-table entry,
    // -1 past the range (as a released page); where it lives given that entry (false if masked).
    // The row offsets are (page * page_bytes + k_row0 + row * row bytes): k_row0 is row 0 of this
    // (layer, K, KV head) in page 0.
    const uint64_t k_row0 = kv_offset(L, 0, a.layer, 0, kvh, 0), s_row0 = C::SCALED ? kv_scale_offset(L, 0, a.layer, 0, kvh, 0) : 0;
    const uint64_t row_bytes = (uint64_t)L.head_dim * L.elem_bytes;
    auto key_pos  = [&](int32_t k) -> int32_t { return k_begin + (warp + k * ATTN_WARPS) * C::SK + lane; };
    auto key_page = [&](int32_t k) -> int32_t {
        const int32_t p = key_pos(k);
        return lane < C::SK && p < k_end ? bt[kv_page_of(L, p)] : -1;
    };
    auto key_loc = [&](int32_t k, int32_t page, uint64_t *off, uint64_t *soff) -> bool {
        *off = 0, *soff = 0;
        if (page < 0) return false; // past the range, or a released page: never read
        const int32_t row = kv_row_of(L, key_pos(k));
        *off              = (uint64_t)page * L.page_bytes + k_row0 + (uint64_t)row * row_bytes;
        if (C::SCALED) *soff = (uint64_t)page * L.page_bytes + s_row0 + (uint64_t)row * 4;
        return true;
    };

    // The online-softmax update of one sub-tile: s[g][i] holds the scores (log2 units, -inf for
    // masked keys) of key kg + KG*i; returns them as probabilities (times the V scale, vs).
    auto softmax_update = [&](float (&s)[G][C::NKB]) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mb = s[g][0];
#pragma unroll
            for (int i = 1; i < C::NKB; i++) mb = fmaxf(mb, s[g][i]);
            const float mn = fmaxf(m[g], mb), base = mn == -INFINITY ? 0.0f : mn;
            const float corr = fast_exp2(m[g] - base);
            m[g]             = mn;
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= corr;
#pragma unroll
            for (int i = 0; i < C::NKB; i++) {
                s[g][i] = fast_exp2(s[g][i] - base);
                l[g] += s[g][i];
            }
        }
    };

    if constexpr (C::FAST) {
        uint8_t *wsm = smem + (size_t)warp * C::NST * C::STAGE;
        // Tensor-core walk: the block-table entries of the warp's next three sub-tiles are loaded
        // three sub-tiles before their copies go out (load takes k = 0, 1, 2, ... in order); an
        // entry read where it is used put a round trip in front of every sub-tile's copies
        // (cuda_attn_bench, 32/8 heads, FP8, 16384 positions: 27.4 -> 24.6 us a call). The
        // CUDA-core walk measured 0.6 % slower with it (llama2-7b), so it reads them in place.
        int32_t pg0 = TC ? key_page(0) : 0, pg1 = TC ? key_page(1) : 0, pg2 = TC ? key_page(2) : 0;
        auto     load = [&](int32_t k) {
            uint8_t       *st = wsm + (k % C::NST) * C::STAGE;
            uint64_t       off, soff;
            const bool     valid = key_loc(k, TC ? pg0 : key_page(k), &off, &soff);
            if (TC) pg0 = pg1, pg1 = pg2, pg2 = key_page(k + 3);
            const uint32_t vm    = __ballot_sync(0xffffffffu, valid);
            if (lane == 0) *(uint32_t *)(st + C::OFF_M) = vm;
            // K and V rows of the sub-tile, 16-byte chunks, whole rows per instruction (coalesced;
            // four lanes a key, each instruction reading half rows of eight keys, measured 5-12 %
            // slower on F16 caches). A masked key's offset is 0, so its (zero-filled, never read)
            // addresses stay inside the pool with no selects. (uniform trip count: shuffles inside)
#pragma unroll
            for (int c0 = 0; c0 < C::SK * C::CPR; c0 += WARP_SIZE) {
                const int      c   = c0 + lane;
                const int      j   = min(c / C::CPR, C::SK - 1), ch = c % C::CPR;
                const uint8_t *src = a.pool + shfl_u64(off, j) + ch * 16;
                const bool     v   = (vm >> j) & 1;
                if (c < C::SK * C::CPR) {
                    cp_async16(st + C::at(j, ch * 16), src, v);
                    cp_async16(st + C::OFF_V + C::at(j, ch * 16), src + vdelta, v);
                }
            }
            if (C::SCALED && lane < C::SK) {
                cp_async4(st + C::OFF_KS + lane * 4, a.pool + (valid ? soff : 0), valid);
                cp_async4(st + C::OFF_VS + lane * 4, a.pool + (valid ? soff + sdelta : 0), valid);
            }
        };
        // Sub-tile k of the warp, landed: first the copies of sub-tile k + NST - 1 go out (into
        // the stage computed at k - 1), then the wait for k's group.
        auto stage_in = [&](int32_t k) -> const uint8_t * {
            if (k + C::NST - 1 < my_n) load(k + C::NST - 1);
            cp_async_commit();
            cp_async_wait<C::NST - 1>();
            __syncwarp();
            return wsm + (k % C::NST) * C::STAGE;
        };
        // prologue: NST - 1 sub-tiles in flight (empty groups keep the group count uniform)
#pragma unroll
        for (int k = 0; k < C::NST - 1; k++) {
            if (k < my_n) load(k);
            cp_async_commit();
        }
        if (late) rope_table();
        if (pre) pdl_wait();
        if constexpr (TC) {
            // Tensor-core walk (mma m16n8k16, f16 in, f32 accumulators); gq = lane / 4, tq = lane % 4.
            //   F16: rows of A are the CTA's query heads (gq < G <= 8; rows 8-15 are zero), so lane
            //   (gq, tq) holds row gq's scores of keys 8j + 2tq, +1 (S = Q K^T, one MMA per 8 keys
            //   and 16 dims) and its output dims (O = P V, one MMA per 16 keys and 8 dims); K and V
            //   fragments by ldmatrix (V transposed), dims in natural order.
            //   FP8: the keys are the rows (S^T = K Q^T, O^T = V^T P^T; see there); each lane reads
            //   its bytes itself and converts them (exact in f16); the mma's 16-dim step kk pairs
            //   with dims tq * HD/4 + 4 kk + {0..3} (q is loaded in the same order: a dot product
            //   does not care). The K scale multiplies the score; the V scale goes into P relative
            //   to the largest V scale seen so far (sigma, folded into the running rescale like a
            //   new maximum), so P stays in f16's normal range.
            // qa[kk] holds head gq's dims of step kk: F16 A's row gq (a0, a2), FP8 B's column gq.
            const int gq = lane >> 2, tq = lane & 3;
            uint32_t  qa[HD / 16][2]; // head gq's fragments of each 16-dim step (above), unscaled f16
            {
                // The CTA's q rows staged in warp 0's last stage (no copy lands there before that
                // warp's walk starts): one 16-byte load per thread, rotated in place, rows padded
                // as the merge buffer (red_at) so the fragment reads below spread over the banks.
                constexpr int NIT = (G * HD + 4 * ATTN_THREADS - 1) / (4 * ATTN_THREADS);
                static_assert(G * C::HDS * 4 <= C::STAGE, "q rows fit a stage");
                float       *qs = (float *)(smem + (C::NST - 1) * C::STAGE);
                const float *qb = q_head(0);
#pragma unroll
                for (int it = 0; it < NIT; it++) {
                    const int i = 4 * (tid + it * ATTN_THREADS);
                    if (i < ng * HD) {
                        const float4 v = *(const float4 *)(qb + i);
                        float       *r = qs + (i / HD) * C::HDS;
                        const int    d = i % HD;
                        r[red_at(d)] = v.x, r[red_at(d + 1)] = v.y, r[red_at(d + 2)] = v.z, r[red_at(d + 3)] = v.w;
                    }
                }
                __syncthreads();
                if (fused) {
                    float y[NIT][4];
#pragma unroll
                    for (int it = 0; it < NIT; it++) {
                        const int    i = 4 * (tid + it * ATTN_THREADS), d = i % HD;
                        const float *r = qs + min(i / HD, ng - 1) * C::HDS;
#pragma unroll
                        for (int e = 0; e < 4; e++) y[it][e] = q_rot(d + e, r[red_at(d + e)], r[red_at(q_partner(d + e))]);
                    }
                    __syncthreads();
#pragma unroll
                    for (int it = 0; it < NIT; it++) {
                        const int i = 4 * (tid + it * ATTN_THREADS);
                        if (i < ng * HD) {
                            float *r = qs + (i / HD) * C::HDS;
#pragma unroll
                            for (int e = 0; e < 4; e++) r[red_at(i % HD + e)] = y[it][e];
                        }
                    }
                    __syncthreads();
                }
                const float *r = qs + min(gq, ng - 1) * C::HDS;
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++)
#pragma unroll
                    for (int hf = 0; hf < 2; hf++) {
                        const int d = C::EB == 1 ? tq * (HD / 4) + 4 * kk + 2 * hf : 16 * kk + 8 * hf + 2 * tq;
                        qa[kk][hf]  = gq < ng ? pack_half2(r[red_at(d)], r[red_at(d + 1)]) : 0u;
                    }
                __syncthreads(); // (warp 0's walk fills the stage next)
            }
            ATTN_PHASE(3); // (q loaded)
            const float qk = a.scale * ATTN_LOG2E;
            if constexpr (C::EB == 1) {
                // FP8: keys are the MMAs' rows, so no row is padding. S^T = K Q^T (A: 16 keys x 16
                // dims, converted from the lane's own bytes; B: qa, head gq's column): lane (gq, tq)
                // holds the scores of keys 16 mt + gq (+8) for heads 2 tq, 2 tq + 1. Its key row
                // bytes [tq * HD/4, +HD/4) give dims tq * HD/4 + 4 kk + {0, 1} (a0, a1) and {2, 3}
                // (a2, a3) of step kk, the order qa was loaded in. Per-head softmax state reduces
                // over the 8 lanes of a tq (shuffles 4, 8, 16). P^T (B of O^T = V^T P^T) is S^T's
                // fragment transposed by movmatrix; V^T (A: 16 dims x 16 keys) comes from the
                // lane's 16 bytes of keys 2 tq, +1, +8, +9 paired by PRMT, so row gq + 8 h of M-tile
                // mt is dim gq * HD/8 + 2 mt + h, and tc_o[2 mt + h][e] = O[that dim][head 2 tq + e].
                // 16 + 16 MMAs a sub-tile for HD 128 (32 + 32 with the heads as rows, 3/4 of them
                // padding at 4 heads, each re-pairing its fragments with zero registers).
                constexpr int MT = C::SK / 16, NKK = HD / 16;
                static_assert(C::SK == WARP_SIZE, "FP8 walk: one V scale per lane (the sigma reduction)");
#pragma unroll
                for (int n = 0; n < HD / 8; n++) tc_o[n][0] = tc_o[n][1] = 0.0f;
                for (int32_t k = 0; k < my_n; k++) {
                    const uint8_t *st = stage_in(k);
                    const uint32_t vm = *(const uint32_t *)(st + C::OFF_M);
                    uint32_t       kw[2 * MT][NKK]; // key 8 j + gq, bytes [tq * HD/4, +HD/4)
#pragma unroll
                    for (int j = 0; j < 2 * MT; j++) {
#pragma unroll
                        for (int u = 0; u < HD / 64; u++) {
                            const uint4 x = *(const uint4 *)(st + C::at(8 * j + gq, tq * (HD / 4) + 16 * u));
                            kw[j][4 * u] = x.x, kw[j][4 * u + 1] = x.y, kw[j][4 * u + 2] = x.z, kw[j][4 * u + 3] = x.w;
                        }
                    }
                    float sc[MT][2][4]; // [M-tile][step parity]: two accumulator chains per tile
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
#pragma unroll
                        for (int i = 0; i < 8; i++) sc[mt][i / 4][i % 4] = 0.0f;
#pragma unroll
                    for (int kk = 0; kk < NKK; kk++)
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            const uint32_t w0 = kw[2 * mt][kk], w1 = kw[2 * mt + 1][kk];
                            const uint32_t af[4] = {half2_bits(fp8x2_to_half2<KT>((uint16_t)w0)),
                                                    half2_bits(fp8x2_to_half2<KT>((uint16_t)w1)),
                                                    half2_bits(fp8x2_to_half2<KT>((uint16_t)(w0 >> 16))),
                                                    half2_bits(fp8x2_to_half2<KT>((uint16_t)(w1 >> 16)))};
                            mma_16816_nv(sc[mt][kk & 1], af, qa[kk][0], qa[kk][1]);
                        }
                    // scale (log2 units, times each key's K scale), mask; s[mt][h][e]: key 16 mt +
                    // 8 h + gq, head 2 tq + e
                    const float *ksc = (const float *)(st + C::OFF_KS), *vsc = (const float *)(st + C::OFF_VS);
                    float        s[MT][2][2], mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const int   key = 16 * mt + 8 * h + gq;
                            const float f   = qk * ksc[key];
                            const bool  ok  = (vm >> key) & 1;
#pragma unroll
                            for (int e = 0; e < 2; e++) {
                                s[mt][h][e] = ok ? (sc[mt][0][2 * h + e] + sc[mt][1][2 * h + e]) * f : -INFINITY;
                                mx[e]       = fmaxf(mx[e], s[mt][h][e]);
                            }
                        }
                    float corr[2], base[2];
#pragma unroll
                    for (int e = 0; e < 2; e++) {
#pragma unroll
                        for (int o = 4; o < WARP_SIZE; o <<= 1) mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], o));
                        const float mn = fmaxf(tc_m8[e], mx[e]);
                        base[e]        = mn == -INFINITY ? 0.0f : mn;
                        corr[e]        = fast_exp2(tc_m8[e] - base[e]);
                        tc_m8[e]       = mn;
                        tc_l8[e] *= corr[e];
                    }
                    // P times vs / sigma, sigma the largest V scale seen (see above)
                    const float smx = __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(vsc[lane])));
                    if (smx > tc_sig) {
                        corr[0] *= tc_sig / smx, corr[1] *= tc_sig / smx;
                        tc_sig = smx;
                    }
                    const float inv = tc_sig > 0.0f ? __frcp_rn(tc_sig) : 0.0f;
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const float vs = vsc[16 * mt + 8 * h + gq] * inv;
#pragma unroll
                            for (int e = 0; e < 2; e++) {
                                const float p = fast_exp2(s[mt][h][e] - base[e]);
                                tc_l8[e] += p;
                                s[mt][h][e] = p * vs;
                            }
                        }
#pragma unroll
                    for (int n = 0; n < HD / 8; n++) tc_o[n][0] *= corr[0], tc_o[n][1] *= corr[1];
                    // O^T += V^T P^T, 16 keys at a time
#pragma unroll
                    for (int c = 0; c < MT; c++) {
                        const uint32_t pb0 = movmatrix_t(pack_half2(s[c][0][0], s[c][0][1])); // keys 16c + 2tq, +1
                        const uint32_t pb1 = movmatrix_t(pack_half2(s[c][1][0], s[c][1][1])); // keys 16c + 8 + 2tq, +1
                        // rows 16c + 2tq + {0, 1, 8, 9}, bytes [gq * HD/8, +HD/8)
                        uint32_t       x[4][HD / 32];
#pragma unroll
                        for (int r = 0; r < 4; r++) {
                            const uint8_t *row = st + C::OFF_V + C::at(16 * c + 2 * tq + (r & 1) + (r >> 1) * 8, gq * (HD / 8));
                            if constexpr (HD == 128) {
                                const uint4 u = *(const uint4 *)row;
                                x[r][0] = u.x, x[r][1] = u.y, x[r][2] = u.z, x[r][3] = u.w;
                            } else {
                                const uint2 u = *(const uint2 *)row;
                                x[r][0] = u.x, x[r][1] = u.y;
                            }
                        }
#pragma unroll
                        for (int w = 0; w < HD / 32; w++) {
                            // bytes b of keys (r0, r1) and (r2, r3) paired: dims gq * HD/8 + 4w + b,
                            // M-tiles 2w (b = 0, 1) and 2w + 1 (b = 2, 3)
                            const uint32_t l01 = __byte_perm(x[0][w], x[1][w], 0x5140), h01 = __byte_perm(x[0][w], x[1][w], 0x7362);
                            const uint32_t l23 = __byte_perm(x[2][w], x[3][w], 0x5140), h23 = __byte_perm(x[2][w], x[3][w], 0x7362);
                            const uint32_t pr[2][2] = {{l01, l23}, {h01, h23}};
#pragma unroll
                            for (int hb = 0; hb < 2; hb++) {
                                const int      mt   = 2 * w + hb;
                                const uint32_t af[4] = {half2_bits(fp8x2_to_half2<KT>((uint16_t)pr[hb][0])),
                                                        half2_bits(fp8x2_to_half2<KT>((uint16_t)(pr[hb][0] >> 16))),
                                                        half2_bits(fp8x2_to_half2<KT>((uint16_t)pr[hb][1])),
                                                        half2_bits(fp8x2_to_half2<KT>((uint16_t)(pr[hb][1] >> 16)))};
                                float          o[4] = {tc_o[2 * mt][0], tc_o[2 * mt][1], tc_o[2 * mt + 1][0], tc_o[2 * mt + 1][1]};
                                mma_16816_nv(o, af, pb0, pb1);
                                tc_o[2 * mt][0] = o[0], tc_o[2 * mt][1] = o[1], tc_o[2 * mt + 1][0] = o[2], tc_o[2 * mt + 1][1] = o[3];
                            }
                        }
                    }
                    __syncwarp(); // the stage is overwritten by the load issued next iteration
                }
                cp_async_wait<0>();
#pragma unroll
                for (int e = 0; e < 2; e++)
#pragma unroll
                    for (int o = 4; o < WARP_SIZE; o <<= 1) tc_l8[e] += __shfl_xor_sync(0xffffffffu, tc_l8[e], o);
            } else {
                // F16: the CTA's query heads are the MMAs' rows (S = Q K^T, O = P V), K and V
                // fragments by ldmatrix (V transposed), dims in natural order.
#pragma unroll
                for (int n = 0; n < HD / 8; n++) tc_o[n][0] = tc_o[n][1] = 0.0f;
                for (int32_t k = 0; k < my_n; k++) {
                    const uint8_t *st = stage_in(k);
                    const uint32_t vm = *(const uint32_t *)(st + C::OFF_M);
                    float          s[C::SK / 8][2];
#pragma unroll
                    for (int j = 0; j < C::SK / 8; j++) s[j][0] = s[j][1] = 0.0f;
#pragma unroll
                    for (int kk = 0; kk < HD / 16; kk++)
#pragma unroll
                        for (int j = 0; j < C::SK / 8; j += 2) {
                            uint32_t b0, b1, b2, b3;
                            ldsm_x4(b0, b1, b2, b3,
                                    st + C::at(8 * j + (lane & 7) + (lane >> 4) * 8, 2 * (kk * 16 + ((lane >> 3) & 1) * 8)));
                            mma_16816_top(s[j], qa[kk][0], qa[kk][1], b0, b1);
                            mma_16816_top(s[j + 1], qa[kk][0], qa[kk][1], b2, b3);
                        }
                    // scale (log2 units), mask, online softmax of row gq (its four lanes reduce the
                    // maximum with two shuffles)
                    float mx = -INFINITY;
#pragma unroll
                    for (int j = 0; j < C::SK / 8; j++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const int key = 8 * j + 2 * tq + e;
                            s[j][e]       = (vm >> key) & 1 ? s[j][e] * qk : -INFINITY;
                            mx            = fmaxf(mx, s[j][e]);
                        }
                    mx               = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx               = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float mn   = fmaxf(tc_m, mx), base = mn == -INFINITY ? 0.0f : mn;
                    const float corr = fast_exp2(tc_m - base);
                    tc_m             = mn;
                    tc_l *= corr;
#pragma unroll
                    for (int j = 0; j < C::SK / 8; j++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            s[j][e] = fast_exp2(s[j][e] - base);
                            tc_l += s[j][e];
                        }
#pragma unroll
                    for (int n = 0; n < HD / 8; n++) tc_o[n][0] *= corr, tc_o[n][1] *= corr;
                    // O += P V, 16 keys at a time
#pragma unroll
                    for (int c = 0; c < C::SK / 16; c++) {
                        const uint32_t pa0 = pack_half2(s[2 * c][0], s[2 * c][1]), pa2 = pack_half2(s[2 * c + 1][0], s[2 * c + 1][1]);
#pragma unroll
                        for (int n = 0; n < HD / 8; n += 2) {
                            uint32_t b0, b1, b2, b3;
                            ldsm_x4_t(b0, b1, b2, b3,
                                      st + C::OFF_V + C::at(16 * c + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * (n * 8 + (lane >> 4) * 8)));
                            mma_16816_top(tc_o[n], pa0, pa2, b0, b1);
                            mma_16816_top(tc_o[n + 1], pa0, pa2, b2, b3);
                        }
                    }
                    __syncwarp(); // the stage is overwritten by the load issued next iteration
                }
                cp_async_wait<0>();
                tc_l += __shfl_xor_sync(0xffffffffu, tc_l, 1);
                tc_l += __shfl_xor_sync(0xffffffffu, tc_l, 2);
            }
        } else {
        load_q();
        const bool lane_dims = lig * 8 < (HD > 0 ? HD : 1); // lanes past head_dim (hd 80, 96) hold zeros
        for (int32_t k = 0; k < my_n; k++) {
            const uint8_t *st = stage_in(k);
            const uint32_t vm = *(const uint32_t *)(st + C::OFF_M);
            float          s[G][C::NKB];
#pragma unroll
            for (int i = 0; i < C::NKB; i++) {
                const int j = kg + C::KG * i;
                float     kf[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                if (lane_dims) kv_load8<KT>(st + j * C::RB + lig * 8 * C::EB, kf);
#pragma unroll
                for (int g = 0; g < G; g++) {
                    float d = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; e++) d = fmaf(qr[g][e], kf[e], d);
#pragma unroll
                    for (int o = C::LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                    s[g][i] = d;
                }
                const float ks = C::SCALED ? *(const float *)(st + C::OFF_KS + j * 4) : 1.0f;
                const bool  ok = (vm >> j) & 1;
#pragma unroll
                for (int g = 0; g < G; g++) s[g][i] = ok ? s[g][i] * ks : -INFINITY;
            }
            softmax_update(s);
#pragma unroll
            for (int i = 0; i < C::NKB; i++) {
                const int j = kg + C::KG * i;
                float     vf[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                if (lane_dims) kv_load8<KT>(st + C::OFF_V + j * C::RB + lig * 8 * C::EB, vf);
                const float vs = C::SCALED ? *(const float *)(st + C::OFF_VS + j * 4) : 1.0f;
#pragma unroll
                for (int g = 0; g < G; g++) {
                    const float p = s[g][i] * vs;
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
                }
            }
            __syncwarp(); // the stage is overwritten by the load issued next iteration
        }
        cp_async_wait<0>();
        // merge the key groups of the warp (lanes lig, lig + LPK, ... hold the same dims)
#pragma unroll
        for (int o = C::LPK; o < WARP_SIZE; o <<= 1) {
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float mo = __shfl_xor_sync(0xffffffffu, m[g], o), lo_ = __shfl_xor_sync(0xffffffffu, l[g], o);
                const float mn = fmaxf(m[g], mo), base = mn == -INFINITY ? 0.0f : mn;
                const float fa = fast_exp2(m[g] - base), fb = fast_exp2(mo - base);
                l[g]           = l[g] * fa + lo_ * fb;
                m[g]           = mn;
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] = acc[g][e] * fa + __shfl_xor_sync(0xffffffffu, acc[g][e], o) * fb;
            }
        }
        } // (TC)
    } else {
        // generic head_dim: one key at a time for the whole warp, rows read from global memory
        load_q();
        for (int32_t k = 0; k < my_n; k++) {
            uint64_t       off, soff;
            const bool     valid = key_loc(k, key_page(k), &off, &soff);
            const uint32_t vm    = __ballot_sync(0xffffffffu, valid);
            float          ksc = 1.0f, vsc = 1.0f;
            if (C::SCALED && valid) {
                ksc = *(const float *)(a.pool + soff);
                vsc = *(const float *)(a.pool + soff + sdelta);
            }
            float s[G][C::NKB];
#pragma unroll
            for (int i = 0; i < C::NKB; i++) {
                const uint64_t o  = shfl_u64(off, i);
                const float    ks = __shfl_sync(0xffffffffu, ksc, i);
                const bool     ok = (vm >> i) & 1;
                float          kf[8];
#pragma unroll
                for (int e = 0; e < 8; e += 2) {
                    const int d = dec_dim<HD>(lane, e);
                    float2    x = ok && d < hd ? kv_load2<KT>(a.pool + o, d) : make_float2(0.0f, 0.0f);
                    kf[e] = x.x, kf[e + 1] = x.y;
                }
#pragma unroll
                for (int g = 0; g < G; g++) {
                    float d = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; e++) d = fmaf(qr[g][e], kf[e], d);
                    d       = warp_sum(d);
                    s[g][i] = ok ? d * ks : -INFINITY;
                }
            }
            softmax_update(s);
#pragma unroll
            for (int i = 0; i < C::NKB; i++) {
                const uint64_t o  = shfl_u64(off, i);
                const float    vs = __shfl_sync(0xffffffffu, vsc, i);
                const bool     ok = (vm >> i) & 1;
                float          vf[8];
#pragma unroll
                for (int e = 0; e < 8; e += 2) {
                    const int d = dec_dim<HD>(lane, e);
                    float2    x = ok && d < hd ? kv_load2<KT>(a.pool + o + vdelta, d) : make_float2(0.0f, 0.0f);
                    vf[e] = x.x, vf[e + 1] = x.y;
                }
#pragma unroll
                for (int g = 0; g < G; g++) {
                    const float p = s[g][i] * vs;
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
                }
            }
        }
    }

    // merge the 4 warps through shared memory (the stages are dead: every copy has landed)
    __syncthreads();
    float *red_acc = (float *)smem;                            // [W][G][HDS], dim d at red_at(d)
    float *red_m   = red_acc + ATTN_WARPS * G * C::HDS;        // [W][G]
    float *red_l   = red_m + ATTN_WARPS * G;                   // [W][G]
    if constexpr (TC) {
        const int gq = lane >> 2, tq = lane & 3;
        if constexpr (C::EB == 1) { // tc_o[n][e]: dim gq * HD/8 + n, head 2 tq + e
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int hq = 2 * tq + e;
                if (hq >= G) continue;
#pragma unroll
                for (int n = 0; n < HD / 8; n++) red_acc[(warp * G + hq) * C::HDS + red_at(gq * (HD / 8) + n)] = tc_o[n][e] * tc_sig;
                if (gq == 0) red_m[warp * G + hq] = tc_m8[e], red_l[warp * G + hq] = tc_l8[e];
            }
        } else if (gq < G) { // tc_o[n][e]: head gq, dim 8 n + 2 tq + e
#pragma unroll
            for (int n = 0; n < HD / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) red_acc[(warp * G + gq) * C::HDS + red_at(8 * n + 2 * tq + e)] = tc_o[n][e];
            if (tq == 0) red_m[warp * G + gq] = tc_m, red_l[warp * G + gq] = tc_l;
        }
    } else {
        if (kg == 0) {
#pragma unroll
            for (int g = 0; g < G; g++)
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    const int d = dec_dim<HD>(lig, e);
                    if (d < hd) red_acc[(warp * G + g) * C::HDS + red_at(d)] = acc[g][e];
                }
        }
        if (lane == 0)
#pragma unroll
            for (int g = 0; g < G; g++) red_m[warp * G + g] = m[g], red_l[warp * G + g] = l[g];
    }
    // kv_wait: the token's own key is the store CTAs' partial (index parts_t - 1); each counts
    // (a fence, then an atomic add) when its part is written. Thread 0 waits for both and resets
    // the count for the next layer (a later kernel); the partial is then read through L2.
    if (waits && !a.kv_cluster && tid == 0) {
        int32_t *f = a.flags + (size_t)t * L.n_kv_heads + kvh;
        while (ld_acquire_gpu(f) < 2) __nanosleep(32);
        *f = 0;
    }
    __syncthreads();
    ATTN_PHASE(1); // (the walk done)
    if (waits && a.kv_cluster) cluster_barrier(); // (kv_cluster: the partial is in this CTA's shared memory)
    ATTN_PHASE(2);
    const bool direct = parts_t == 1 || waits; // the output written here
    const bool stage  = a.xo != nullptr && direct;
    constexpr int NWI = (G * C::HDP + ATTN_THREADS - 1) / ATTN_THREADS;
    if constexpr (NWI > 1) {
        // Several heads a CTA (NWI > 1): thread g < ng takes query head g's weights -- the largest of
        // the warps' maxima and (waits) the own key's, each warp's weight exp2(m_w - M) and the own
        // key's (fo), their sum S; times 1 / S where the output is written here -- and writes them over
        // column g of red_m (the warps' weights) and of red_l (row 0 fo, 1 M, 2 S), so an output element
        // below is a dot product of 4 (5) values, and the staging runs after all the outputs (every
        // thread deriving its head's weights at each of its elements, then A / S, and the staging's
        // shuffles after each element made a depth-0 partition's tail a chain of ~2 us: llama3-8b tg128
        // +0.8-0.9 % at depth 0). One head a CTA keeps that per-element form (the pass by one thread
        // and its barrier measured 0.3-1.6 % slower on llama2-7b; docs/BENCHMARKS.md).
        float hw[ATTN_WARPS], hfo = 0.0f, hM = -INFINITY, hS = 0.0f;
        if (tid < ng) {
            const int g  = tid;
            float     om = -INFINITY; // (waits) the own key's partial: its score, one key
            if (waits && a.kv_cluster) om = own[C::HDP + g];
            else if (waits) om = __ldcg(a.part_ml + (((size_t)t * a.n_heads + h0 + g) * a.n_parts + parts_t - 1) * 2);
            hM = om;
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; w++) hw[w] = red_m[w * G + g], hM = fmaxf(hM, hw[w]);
            const float base = hM == -INFINITY ? 0.0f : hM;
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; w++) hw[w] = fast_exp2(hw[w] - base), hS += red_l[w * G + g] * hw[w];
            hfo = waits ? fast_exp2(om - base) : 0.0f;
            hS += hfo;
            const float r = direct ? (hS > 0.0f ? 1.0f / hS : 0.0f) : 1.0f;
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; w++) red_m[w * G + g] = hw[w] * r;
            red_l[g] = hfo * r, red_l[G + g] = hM, red_l[2 * G + g] = hS;
        }
        // (waits) the own key's V row at every element this thread merges, loaded at once (a load
        // inside the loop sits behind stores it cannot be moved across: llama2-7b FP8 at depth 0
        // +0.4 %, llama3-8b unchanged)
        float wacc[NWI], y[NWI];
#pragma unroll
        for (int it = 0; it < NWI; it++) {
            const int idx = it * ATTN_THREADS + tid;
            wacc[it]      = 0.0f;
            if (waits && idx < ng * hd && a.kv_cluster) {
                wacc[it] = own[idx % hd];
            } else if (waits && idx < ng * hd) {
                const size_t pi = ((size_t)t * a.n_heads + h0 + idx / hd) * a.n_parts + parts_t - 1;
                wacc[it] = __ldcg(a.part_acc + pi * hd + idx % hd);
            }
        }
        __syncthreads();
#pragma unroll
        for (int it = 0; it < NWI; it++) {
            const int    idx = it * ATTN_THREADS + tid;
            const bool   in  = idx < ng * hd;
            const int    g = in ? idx / hd : 0, d = in ? idx % hd : 0;
            const size_t th = (size_t)t * a.n_heads + h0 + g;
            float        A  = 0.0f;
            if (in) {
#pragma unroll
                for (int w = 0; w < ATTN_WARPS; w++) hw[w] = red_m[w * G + g];
                hfo = red_l[g], hM = red_l[G + g], hS = red_l[2 * G + g];
#pragma unroll
                for (int w = 0; w < ATTN_WARPS; w++) A += red_acc[(w * G + g) * C::HDS + red_at(d)] * hw[w];
                if (waits) A += wacc[it] * hfo;
                if (direct) {
                    a.out[th * hd + d] = A;
                } else {
                    a.part_acc[(th * a.n_parts + part) * hd + d] = A;
                    if (d == 0) a.part_ml[(th * a.n_parts + part) * 2] = hM, a.part_ml[(th * a.n_parts + part) * 2 + 1] = hS;
                }
            }
            y[it] = A;
        }
        // staged for the o projection, after all the outputs so the elements' shuffles interleave
        // (uniform trip count: they need every lane; ng * hd is a multiple of 16 where a.xo is set, so
        // each 16-lane half is all in or all out)
        if (stage) {
#pragma unroll
            for (int it = 0; it < NWI; it++) {
                const int  idx = it * ATTN_THREADS + tid;
                const bool in  = idx < ng * hd;
                const int  o   = (int32_t)(((size_t)t * a.n_heads + h0) * hd) + (in ? idx : 0);
                if (it * ATTN_THREADS < ng * hd) xstage_put(a.xo, a.xo_part, o, in, in, y[it], y[it]);
            }
        }
    } else {
        // (waits) the own key's partial at every element this thread merges, loaded at once (a load
        // inside the loop sits behind stores it cannot be moved across: llama2-7b FP8 at depth 0
        // +0.4 %, llama3-8b unchanged)
        float wml[NWI], wacc[NWI];
#pragma unroll
        for (int it = 0; it < NWI; it++) {
            const int idx = it * ATTN_THREADS + tid;
            wml[it] = -INFINITY, wacc[it] = 0.0f;
            if (waits && idx < ng * hd && a.kv_cluster) {
                wml[it] = own[C::HDP + idx / hd], wacc[it] = own[idx % hd];
            } else if (waits && idx < ng * hd) {
                const size_t pi = ((size_t)t * a.n_heads + h0 + idx / hd) * a.n_parts + parts_t - 1;
                wml[it] = __ldcg(a.part_ml + pi * 2), wacc[it] = __ldcg(a.part_acc + pi * hd + idx % hd);
            }
        }
        // (uniform trip count: the staging's shuffles need every lane; ng * hd is a multiple of 16
        // where a.xo is set, so each 16-lane half is all in or all out)
#pragma unroll
        for (int it = 0; it < NWI; it++) {
            const int i0 = it * ATTN_THREADS;
            if (i0 >= ng * hd) break;
            const int  idx = i0 + tid;
            const bool in  = idx < ng * hd;
            const int  g = in ? idx / hd : 0, d = in ? idx % hd : 0;
            const size_t th = (size_t)t * a.n_heads + h0 + g;
            float        y  = 0.0f;
            if (in) {
                float M = -INFINITY;
#pragma unroll
                for (int w = 0; w < ATTN_WARPS; w++) M = fmaxf(M, red_m[w * G + g]);
                const float om = wml[it]; // (waits; else -inf)
                M              = fmaxf(M, om);
                const float base = M == -INFINITY ? 0.0f : M;
                float       S = 0.0f, A = 0.0f;
#pragma unroll
                for (int w = 0; w < ATTN_WARPS; w++) {
                    const float f = fast_exp2(red_m[w * G + g] - base);
                    S += red_l[w * G + g] * f;
                    A += red_acc[(w * G + g) * C::HDS + red_at(d)] * f;
                }
                if (waits) {
                    const float f = fast_exp2(om - base);
                    S += f, A += wacc[it] * f;
                }
                if (direct) {
                    y                  = S > 0.0f ? A / S : 0.0f;
                    a.out[th * hd + d] = y;
                } else {
                    a.part_acc[(th * a.n_parts + part) * hd + d] = A;
                    if (d == 0) {
                        a.part_ml[(th * a.n_parts + part) * 2]     = M;
                        a.part_ml[(th * a.n_parts + part) * 2 + 1] = S;
                    }
                }
            }
            if (stage) xstage_put(a.xo, a.xo_part, (int32_t)(th * hd) + d, in, in, y, y);
        }
    }
}

// ND: dim pairs a lane holds (hd <= 64 * ND); MU: partitions a warp loads at once (MU *
// ATTN_WARPS a round: 128 / 64 / 32 for ND 1 / 2 / 4, 64 float2 registers of partials a lane).
template <int ND>
__global__ void __launch_bounds__(ATTN_THREADS) attn_merge_kernel(const struct attn_args a, int32_t hd) {
    constexpr int MU = 32 / ND;
    __shared__ float red[ATTN_WARPS][ATTN_MAX_HD];
    __shared__ float wred[2][ATTN_WARPS];
    TRACE_CTA(TRACE_MERGE);
    if (a.pdl_trigger) pdl_launch_dependents();
    pdl_wait(); // (cuda_backend.attn_merge_pdl: the decode kernel's partials)
    const int     tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int32_t t = blockIdx.x, h = blockIdx.y;
    if (a.tc_tokens > 0 && attn_tile_is_tc(a, t / a.tc_tokens)) return;
    const int32_t pos = a.pos[t];
    const size_t  th  = (size_t)t * a.n_heads + h;
    const float  *ml  = a.part_ml + th * a.n_parts * 2;
    const float  *pa  = a.part_acc + th * a.n_parts * hd;
    // Warp w takes partitions w, w + 4, ... (MU at a time), lanes dims 2 lane, +1 (+ 64, ...), and
    // keeps a running (max, sum, acc) in log2 units; the first round's loads go out with the load
    // of pos (every index below a.n_parts is inside the workspace; those past the token's range
    // are dropped once pos is in), so a range of up to MU * ATTN_WARPS partitions costs one round
    // trip.
    float         wm = -INFINITY, ws = 0.0f, wa[ND][2];
#pragma unroll
    for (int j = 0; j < ND; j++) wa[j][0] = wa[j][1] = 0.0f;
    int32_t parts_t = -1;
    for (int32_t i0 = 0; i0 < (parts_t < 0 ? a.n_parts : parts_t); i0 += MU * ATTN_WARPS) {
        float2 mli[MU], v[MU][ND];
#pragma unroll
        for (int u = 0; u < MU; u++) {
            const int32_t i = min(i0 + warp + u * ATTN_WARPS, a.n_parts - 1);
            mli[u]          = *(const float2 *)(ml + 2 * (size_t)i);
#pragma unroll
            for (int j = 0; j < ND; j++) {
                const int d = 2 * lane + 2 * WARP_SIZE * j;
                v[u][j]     = d < hd ? *(const float2 *)(pa + (size_t)i * hd + d) : make_float2(0.0f, 0.0f);
            }
        }
        if (parts_t < 0) {
            parts_t = attn_parts_of(a, pos);
            if (parts_t <= 1 && !a.kv_sep) return; // written by the decode kernel directly
        }
#pragma unroll
        for (int u = 0; u < MU; u++) {
            if (i0 + warp + u * ATTN_WARPS >= parts_t) break;
            const float mn = fmaxf(wm, mli[u].x), base = mn == -INFINITY ? 0.0f : mn;
            const float c = fast_exp2(wm - base), w = fast_exp2(mli[u].x - base);
            wm = mn, ws = ws * c + mli[u].y * w;
#pragma unroll
            for (int j = 0; j < ND; j++) wa[j][0] = wa[j][0] * c + w * v[u][j].x, wa[j][1] = wa[j][1] * c + w * v[u][j].y;
        }
    }
    if (lane == 0) wred[0][warp] = wm;
    __syncthreads();
    const float M    = fmaxf(fmaxf(wred[0][0], wred[0][1]), fmaxf(wred[0][2], wred[0][3]));
    const float base = M == -INFINITY ? 0.0f : M, f = fast_exp2(wm - base);
    if (lane == 0) wred[1][warp] = ws * f;
#pragma unroll
    for (int j = 0; j < ND; j++) {
        const int d = 2 * lane + 2 * WARP_SIZE * j;
        if (d < hd) red[warp][d] = wa[j][0] * f, red[warp][d + 1] = wa[j][1] * f;
    }
    __syncthreads();
    const float den = wred[1][0] + wred[1][1] + wred[1][2] + wred[1][3];
    for (int d0 = 0; d0 < hd; d0 += ATTN_THREADS) { // (uniform trip count, as in the decode kernel)
        const int  d  = d0 + tid;
        const bool in = d < hd;
        float      y  = 0.0f;
        if (in) {
            const float num    = red[0][d] + red[1][d] + red[2][d] + red[3][d];
            y                  = den > 0.0f ? num / den : 0.0f;
            a.out[th * hd + d] = y;
        }
        if (a.xo) xstage_put(a.xo, a.xo_part, (int32_t)(th * hd) + d, in, in, y, y);
    }
}

// How the decode kernel is launched: grid, stream, and whether as a programmatic dependent launch
// (cuda_backend.attn_pdl).
struct dec_launch {
    dim3         grid;
    cudaStream_t st;
    bool         pdl;
};

template <int HD, int KT, int G, bool TC>
static void attn_decode_launch(const struct dec_launch &dl, const struct attn_args &a, const struct kv_dev_layout &L) {
    using C = dec_cfg<HD, KT, G, TC>;
    static bool opted[64];
    cuda_smem_opt_in(attn_decode_kernel<HD, KT, G, TC>, C::SMEM + C::OWN, opted);
    // kv_cluster: clusters of the (store K, store V, partition) CTAs in z, the own key's partial past SMEM
    CUDA_CHECK(cuda_launch_ex(dl.pdl, a.kv_cluster ? 3 : 1, attn_decode_kernel<HD, KT, G, TC>, dl.grid, dim3(ATTN_THREADS),
                              C::SMEM + (a.kv_cluster ? C::OWN : 0), dl.st, a, L));
    CUDA_CHECK_LAUNCH();
}

template <int HD, int KT, bool TC>
static void attn_decode_launch_g(int32_t g, const struct dec_launch &dl, const struct attn_args &a,
                                 const struct kv_dev_layout &L) {
    switch (g) {
    case 1: attn_decode_launch<HD, KT, 1, TC>(dl, a, L); break;
    case 2: attn_decode_launch<HD, KT, 2, TC>(dl, a, L); break;
    case 4: attn_decode_launch<HD, KT, 4, TC>(dl, a, L); break;
    default: attn_decode_launch<HD, KT, 8, TC>(dl, a, L); break;
    }
}

// True when the tensor-core key walk is compiled for the shape (dec_cfg): the prefill kernel's KV
// types, head dims 64 and 128 of its.
static bool attn_decode_tc_supported(int32_t hd, enum coopt_dtype dt) {
    return (hd == 64 || hd == 128) && cuda_attn_prefill_supported(hd, dt);
}

template <int HD>
static void attn_decode_launch_hd(int32_t g, bool tc, const struct dec_launch &dl, const struct attn_args &a,
                                  const struct kv_dev_layout &L) {
    if constexpr (HD == 64 || HD == 128) {
        if (tc) {
            switch (L.dtype) {
            case COOPT_DTYPE_F16: attn_decode_launch_g<HD, COOPT_DTYPE_F16, true>(g, dl, a, L); return;
            case COOPT_DTYPE_FP8_E4M3: attn_decode_launch_g<HD, COOPT_DTYPE_FP8_E4M3, true>(g, dl, a, L); return;
            case COOPT_DTYPE_FP8_E5M2: attn_decode_launch_g<HD, COOPT_DTYPE_FP8_E5M2, true>(g, dl, a, L); return;
            default: break;
            }
        }
    }
    switch (L.dtype) {
    case COOPT_DTYPE_F32: attn_decode_launch_g<HD, COOPT_DTYPE_F32, false>(g, dl, a, L); break;
    case COOPT_DTYPE_F16: attn_decode_launch_g<HD, COOPT_DTYPE_F16, false>(g, dl, a, L); break;
    case COOPT_DTYPE_BF16: attn_decode_launch_g<HD, COOPT_DTYPE_BF16, false>(g, dl, a, L); break;
    case COOPT_DTYPE_FP8_E4M3: attn_decode_launch_g<HD, COOPT_DTYPE_FP8_E4M3, false>(g, dl, a, L); break;
    case COOPT_DTYPE_FP8_E5M2: attn_decode_launch_g<HD, COOPT_DTYPE_FP8_E5M2, false>(g, dl, a, L); break;
    default:
        coopt_log_error("cuda attention: KV type %s is not supported", coopt_dtype_name((enum coopt_dtype)L.dtype));
        COOPT_ASSERT(!"unsupported KV type");
    }
}

// The launch geometry below depends on the key-range bound only through this bucket (a power
// of two, at least 128), so a step recorded into a CUDA graph replays correctly for every later
// step whose bound falls in the same bucket: the kernels read the real positions from device
// memory, and partitions past a token's range exit at once.
int64_t cuda_attn_bound_bucket(int64_t bound) {
    int64_t b = ATTN_BUCKET_MIN;
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

void cuda_attn_set_route(struct coopt_backend *be, int route) { cuda_impl(be)->attn_route = route; }
void cuda_attn_set_tc_decode(struct coopt_backend *be, int mode) { cuda_impl(be)->attn_tc_decode = mode; }

// Whether the decode kernel walks the keys on tensor cores (attn_decode_kernel's TC; route 2 and
// attn_tc_decode -1 keep it off; 0, the default, takes it for query groups of 2 or more heads per
// CTA, 1 for every group).
bool cuda_attn_tc_decode(const struct coopt_backend *be, int32_t head_dim, enum coopt_dtype kv_type, int32_t heads_per_cta) {
    const struct cuda_backend *cb = (const struct cuda_backend *)be->impl;
    return cb->attn_route != 2 && cb->attn_tc_decode >= 0 && attn_decode_tc_supported(head_dim, kv_type) &&
           (cb->attn_tc_decode == 1 || heads_per_cta >= 2);
}
void cuda_attn_set_fuse_fp8(struct coopt_backend *be, bool fuse) { cuda_impl(be)->attn_unfused_fp8 = !fuse; }
void cuda_attn_set_store_cta(struct coopt_backend *be, int mode) { cuda_impl(be)->attn_store_cta = mode; }
void cuda_attn_set_store_wait(struct coopt_backend *be, bool wait) { cuda_impl(be)->attn_store_nowait = !wait; }
void cuda_attn_set_cluster(struct coopt_backend *be, bool cluster) {
    cuda_impl(be)->attn_cluster = cluster && cuda_impl(be)->cc_major >= 9;
}
void cuda_attn_set_prefetch(struct coopt_backend *be, bool pre) { cuda_impl(be)->attn_no_pre = !pre; }

// Whether a fused decode step (cuda_rope_store_attention) stores the token's K and V rows from
// two CTAs of their own (attn_args.kv_sep) for a step of key-range bound `bound`: by default for
// FP8 caches, whose scale search would otherwise sit in front of a partition's key walk, where the
// bound is below CUDA_ATTN_STORE_CTA_BOUND. Measured (H100, gptq4, tg128, FP8, two rounds, store
// CTAs against the last partition's CTA storing): llama3-8b +3.3 / +4.2 / +4.0 / -0.7 / -4.8 %,
// llama2-7b +0.1 / +5.1 / +1.2 / +3.0 / -0.4 % at depths 0 / 512 / 1024 / 4096 / 16384 (the
// first two against two kernels, which were as fast there as the last partition storing;
// docs/BENCHMARKS.md); with the search as a tree (2656d70) llama3-8b +3.8 / +3.3 / +2.9 / +3.3 /
// +1.0 / +0.2 %, llama2-7b +2.9 / +3.5 / +3.5 / +3.4 / +2.9 / -0.1 % at 0 / 512 / 1024 / 2048 /
// 4096 / 8192. F16's store is cheap and stays in the last partition (-1.7 to +1.2 %).
static bool attn_store_cta(const struct cuda_backend *cb, const struct coopt_kv_layout *l, int64_t bound) {
    return cb->attn_store_cta > 0 || (cb->attn_store_cta == 0 && l->has_scales && bound < CUDA_ATTN_STORE_CTA_BOUND);
}

// The decode attention's launch geometry for a step (host side; depends on the key range only
// through its bucket, see cuda_attn_bound).
struct attn_geom {
    int32_t sub_g, n_sub; // query heads per CTA (a power of two), CTAs per KV head
    bool    tc_dec;       // the tensor-core key walk
    int64_t bound, part_size, n_parts;
    bool    store_ctas;   // a fused step writes the token's rows from two store CTAs (attn_store_cta)
};

static struct attn_geom attn_geometry(const struct coopt_backend *be, const struct coopt_kv_cache *kv,
                                      const struct coopt_batch *b, int32_t n_heads) {
    const struct coopt_kv_layout *l   = &kv->layout;
    const struct cuda_backend    *cb  = (const struct cuda_backend *)be->impl;
    const int32_t                 nkv = l->n_kv_heads, hd = l->head_dim;
    struct attn_geom              g;
    // Heads per CTA: the whole KV group up to 8 (Opt-GQA), rounded up to a power of two; the
    // per-head ablation (struct coopt_backend) makes every CTA serve one query head.
    const int32_t group = n_heads / nkv;
    g.sub_g             = 1;
    if (!be->attn_per_head)
        while (g.sub_g < group && g.sub_g < ATTN_MAX_G) g.sub_g *= 2;
    g.n_sub  = (group + g.sub_g - 1) / g.sub_g;
    g.bound  = cuda_attn_bound(kv, b);
    g.tc_dec = cuda_attn_tc_decode(be, hd, l->dtype, g.sub_g);
    const int64_t bound = g.bound;
    // Split-K (flash-decoding): partitions of ATTN_PART positions of an F16 cache (or the
    // context's attn_partition), i.e. a fixed number of bytes: twice the positions for FP8, half
    // for F32. Halved while the live CTAs would be fewer than 3 per SM (live: the bucket is up to
    // twice the real ranges, so half of it is what the grid is sure to cover); with the
    // tensor-core walk fewer than attn_tc_occ per SM (0.5 by default: 256 FP8 keys a CTA at 4k on
    // llama3-8b; 0.5-0.75 measured best there, 1-1.5 up to 4.5 % slower, 2 10-12 % slower, H100,
    // docs/BENCHMARKS.md) or twice that where long ranges allow (below), and never below one
    // sub-tile per warp. Doubled while the grid would
    // have more than 16 CTAs per SM (keeps the partial workspace small for big batches).
    // attn_partition 0 (the ablation) walks each range in one CTA. (A grid for the live half only,
    // ranges past it cut into longer partitions on the device so no CTA exits at once, measured no
    // faster on llama3-8b and 2.2 % slower on llama2-7b at 16k; docs/BENCHMARKS.md.)
    const int64_t ctas      = (int64_t)b->n_tokens * nkv * g.n_sub;
    int64_t       part_size = ATTN_PART;
    if (be->attn_partition > 0) {
        part_size = ATTN_PART_MIN;
        while (part_size * 2 <= be->attn_partition) part_size *= 2;
    }
    part_size       = part_size * 2 / (int64_t)l->elem_bytes;
    const int64_t live = bound / 2, part_min = g.tc_dec ? ATTN_PART_MIN * 2 / (int64_t)l->elem_bytes : ATTN_PART_MIN;
    auto halved = [&](float occ) {
        const int64_t min_ctas = (int64_t)(occ * (float)cb->n_sm);
        int64_t       ps       = part_size;
        while (ps > part_min && ctas * ((live + ps - 1) / ps) < min_ctas) ps /= 2;
        return ps;
    };
    // The tensor-core walk aims at twice attn_tc_occ where that leaves every warp at least
    // ATTN_TC_LONG sub-tiles (llama3-8b FP8 at depth 16384: 512-key partitions, 272 CTAs, +0.8 %;
    // at 4096 the same aim gives one sub-tile a warp, -4.5 %: docs/BENCHMARKS.md).
    const int64_t sk   = l->elem_bytes == 1 ? 32 : 16; // (dec_cfg::SK of the walk)
    const int64_t wide = g.tc_dec ? halved(2.0f * cb->attn_tc_occ) : 0;
    part_size = g.tc_dec && wide >= ATTN_TC_LONG * ATTN_WARPS * sk ? wide : halved(g.tc_dec ? cb->attn_tc_occ : 3.0f);
    while (part_size < bound && ctas * ((bound + part_size - 1) / part_size) > 16LL * cb->n_sm) part_size *= 2;
    int64_t n_parts = (bound + part_size - 1) / part_size;
    // Short ranges in one pass: up to ATTN_NOSPLIT positions a CTA walks them in about the time of
    // the merge kernel alone (llama2-7b decode at context <= 128: 2 parts 5.0 us + merge 2.8 us).
    if (n_parts <= 1 || be->attn_partition == 0 || bound <= ATTN_NOSPLIT) n_parts = 1;
    while (n_parts > 65533) { // grid.z limit (only for tiny grids over enormous bounds; two left for store CTAs)
        part_size *= 2;
        n_parts = (bound + part_size - 1) / part_size;
    }
    // A fused step's write: in two store CTAs (attn_args.kv_sep: one more partial per (token,
    // head), so the merge kernel always runs) or in the last partition's CTA.
    g.part_size = part_size, g.n_parts = n_parts;
    g.store_ctas = attn_store_cta(cb, l, bound);
    return g;
}

// (cuda.h) Whether a fused decode step of this shape writes the token's rows from two store CTAs.
bool cuda_attn_store_ctas(const struct coopt_backend *be, const struct coopt_kv_cache *kv, const struct coopt_batch *b,
                          int32_t n_heads) {
    return attn_geometry(be, kv, b, n_heads).store_ctas;
}

// cuda_attention; with fk != NULL, the fused write of cuda_rope_store_attention (attn_args.fk);
// stage: out is also staged for the GEMV that reads it next (attn_args.xo), where it applies.
static void attention_run(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                          const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale,
                          const float *fk, const float *fv, const struct coopt_rope *rope, bool stage) {
    const struct coopt_kv_layout *l  = &kv->layout;
    struct cuda_backend          *cb = cuda_impl(be);
    const int32_t                 nkv = l->n_kv_heads, hd = l->head_dim;
    COOPT_ASSERT(n_heads % nkv == 0 && layer >= 0 && layer < l->n_layers);
    if (b->n_tokens <= 0) return;
    if (hd <= 0 || hd > ATTN_MAX_HD || hd % 2) {
        coopt_log_error("cuda attention: head_dim %d is not supported (even, at most %d)", hd, ATTN_MAX_HD);
        COOPT_ASSERT(!"unsupported head_dim");
    }
    const struct attn_geom geo = attn_geometry(be, kv, b, n_heads);
    const int32_t group = n_heads / nkv, sub_g = geo.sub_g, n_sub = geo.n_sub;
    const int64_t n_parts = geo.n_parts, part_size = geo.part_size;
    const bool    tc_dec  = geo.tc_dec;
    const bool    sep     = fk && geo.store_ctas;
    const bool    wait    = sep && n_parts == 1 && !cb->attn_store_nowait; // attn_args.kv_wait: no merge kernel
    const int64_t n_grid = n_parts + (sep ? 1 : 0); // partials

    struct attn_args a;
    a.out          = out;
    a.q            = q;
    a.pool         = kv->pool;
    a.pos          = b->pos;
    a.tok_seq      = b->tok_seq;
    a.block_tables = b->block_tables;
    a.part_acc     = NULL;
    a.part_ml      = NULL;
    a.n_tokens     = b->n_tokens;
    a.max_blocks   = b->max_blocks;
    a.window       = b->window;
    a.layer        = layer;
    a.n_heads      = n_heads;
    a.group        = group;
    a.n_sub        = n_sub;
    a.n_parts      = (int32_t)n_grid;
    a.part_size    = n_parts > 1 ? (int32_t)part_size : INT_MAX;
    a.tc_tokens    = 0;
    a.scale        = scale;
    a.fk = fk, a.fv = fv, a.slots = b->slots, a.koff = NULL, a.seq_ids = b->seq_ids, a.kv_sep = sep, a.kv_wait = wait;
    a.pre = fk && !cb->attn_no_pre;
    a.kv_cluster = wait && cb->attn_cluster;
    a.flags      = wait && !a.kv_cluster ? cuda_attn_flags(cb, (size_t)b->n_tokens * (size_t)nkv) : NULL;
    if (wait && !a.kv_cluster && !a.flags) return; // (out of memory: cb->op_error)
    a.pool_w = (uint8_t *)kv->pool, a.n_layers = l->n_layers;
    a.xo = NULL, a.xo_part = NULL;
    a.pdl_trigger = cb->attn_trigger;
    // one decode token whose n_heads * hd outputs are whole 64-row chunks of the next GEMV's input
    const int64_t n_out = (int64_t)n_heads * hd;
    if (stage && b->n_tokens == 1 && hd % 16 == 0 && n_out % 64 == 0) {
        uint8_t *slot = (uint8_t *)cuda_xstage_out_begin(cb, n_out);
        if (slot) a.xo = (__half *)slot, a.xo_part = (float2 *)(slot + cuda_gptq_xstage_part(n_out));
    }
    memset(&a.rope, 0, sizeof(a.rope));
    if (fk) {
        a.rope = rope_params_make(rope);
        a.koff = (l->has_scales && kv->k_offset && b->seq_ids) ? kv->k_offset : NULL; // as cuda_rope_store
    }
    if (n_grid > 1) {
        size_t n_th = (size_t)b->n_tokens * (size_t)n_heads * (size_t)n_grid;
        float *w    = (float *)cuda_workspace(cb, n_th * ((size_t)hd + 2) * sizeof(float));
        if (!w) return; // (out of memory: cb->op_error)
        a.part_acc  = w;
        a.part_ml   = w + n_th * (size_t)hd;
    }
    struct kv_dev_layout L = kv_dev_layout_make(l);

    // Tensor cores for prefill: when the step carries chunks (on average at least 4 tokens per
    // sequence, 16 in all) and the kernel is compiled for the shape; tiles mixing sequences still
    // go to the decode kernel (attn.cuh). Route 1 forces it wherever compiled, 2 never (tests).
    const bool tc_shape = cuda_attn_prefill_supported(hd, l->dtype);
    const bool tc_auto  = b->n_tokens >= 16 && b->n_tokens >= 4LL * b->n_seqs;
    if (tc_shape && cb->attn_route != 2 && (cb->attn_route == 1 || tc_auto)) {
        COOPT_ASSERT(!fk); // (cuda_rope_store_attention does not fuse such steps)
        a.tc_tokens = 64 / sub_g;
        cuda_attn_prefill_launch(cb->stream, a, L, sub_g);
    }

    const struct dec_launch dl = {dim3((unsigned)b->n_tokens, (unsigned)(nkv * n_sub), (unsigned)(n_grid + (sep ? 1 : 0))),
                                  cb->stream, cb->attn_pdl};
    switch (hd) {
    case 64: attn_decode_launch_hd<64>(sub_g, tc_dec, dl, a, L); break;
    case 80: attn_decode_launch_hd<80>(sub_g, tc_dec, dl, a, L); break;
    case 96: attn_decode_launch_hd<96>(sub_g, tc_dec, dl, a, L); break;
    case 128: attn_decode_launch_hd<128>(sub_g, tc_dec, dl, a, L); break;
    default: attn_decode_launch_hd<0>(sub_g, false, dl, a, L); break; // generic: any even head_dim <= 256
    }
    if (n_grid > 1 && !wait) {
        const bool mpdl = cb->attn_pdl && cb->attn_merge_pdl;
        const dim3 mg((unsigned)b->n_tokens, (unsigned)n_heads);
        CUDA_CHECK(hd <= 64    ? cuda_launch_pdl(mpdl, attn_merge_kernel<1>, mg, dim3(ATTN_THREADS), 0, cb->stream, a, hd)
                   : hd <= 128 ? cuda_launch_pdl(mpdl, attn_merge_kernel<2>, mg, dim3(ATTN_THREADS), 0, cb->stream, a, hd)
                               : cuda_launch_pdl(mpdl, attn_merge_kernel<4>, mg, dim3(ATTN_THREADS), 0, cb->stream, a, hd));
        CUDA_CHECK_LAUNCH();
    }
    if (a.xo) cuda_xstage_out_end(cb, out, n_out);
}

void cuda_attention(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                    const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale) {
    attention_run(be, out, q, n_heads, kv, layer, b, scale, NULL, NULL, NULL, false);
}

// rope_store + attention. Decode steps (one token per sequence, none at position 0) run as one
// kernel (attn_args.fk): the launch and the drain of rope_store's kernel go, and q is read
// unrotated and left so. Other steps (prefill chunks, which read rows other CTAs store; sequence
// starts, whose K offsets come first; several CTAs per KV head; forced tensor cores) run the two.
// FP8 caches are fused too: their two rows' scale search would sit in front of a CTA's key walk,
// so the stores go to CTAs of their own (attn_store_cta) or, at depth, to the last partition's
// CTA, the shortest walk. (COOPT_CUDA_FUSED_ATTN_FP8=0 and cuda_attn_set_fuse_fp8: two kernels.)
static void rope_store_attention(struct coopt_backend *be, float *out, float *q, const float *k, const float *v,
                                 int32_t n_heads, struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                                 const struct coopt_rope *rope, float scale, bool then_matmul) {
    const struct coopt_kv_layout *l     = &kv->layout;
    struct cuda_backend          *cb    = cuda_impl(be);
    const int32_t                 group = n_heads / l->n_kv_heads;
    const bool fuse = b->n_tokens > 0 && b->n_tokens == b->n_seqs && b->no_seq_start && cb->attn_route != 1 &&
                      n_heads % l->n_kv_heads == 0 && group <= ATTN_MAX_G && (!be->attn_per_head || group == 1) &&
                      rope->head_dim == l->head_dim && layer >= 0 && layer < l->n_layers &&
                      (!l->has_scales || !cb->attn_unfused_fp8);
    if (!fuse) {
        cuda_rope_store(be, q, k, v, n_heads, kv, layer, b, rope);
        attention_run(be, out, q, n_heads, kv, layer, b, scale, NULL, NULL, NULL, then_matmul);
        return;
    }
    if (!cuda_kv_pool_prepare(be, kv)) return; // (as cuda_rope_store: the pages this step writes; out of memory: cb->op_error)
    attention_run(be, out, q, n_heads, kv, layer, b, scale, k, v, rope, then_matmul);
}

void cuda_rope_store_attention(struct coopt_backend *be, float *out, float *q, const float *k, const float *v,
                               int32_t n_heads, struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                               const struct coopt_rope *rope, float scale) {
    rope_store_attention(be, out, q, k, v, n_heads, kv, layer, b, rope, scale, false);
}

// The same, followed by a GEMV op reading out (backend.h): a decode token's output is also staged
// for it (attn_args.xo).
void cuda_rope_store_attention_then_matmul(struct coopt_backend *be, float *out, float *q, const float *k,
                                           const float *v, int32_t n_heads, struct coopt_kv_cache *kv, int32_t layer,
                                           const struct coopt_batch *b, const struct coopt_rope *rope, float scale) {
    rope_store_attention(be, out, q, k, v, n_heads, kv, layer, b, rope, scale, true);
}
