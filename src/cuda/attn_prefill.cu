/*
 * attn_prefill.cu -- paged attention for prefill chunks on tensor cores (mma.sync m16n8k16,
 * f16 inputs, f32 accumulation), flash-attention style: the query tile stays in registers, key
 * tiles stream through shared memory, softmax is online.
 *
 * attn_prefill_kernel<HD, KT, GS>: one CTA per (query tile, KV head, query-head subgroup).
 *   Grid: (ceil(n_tokens / TT), n_kv_heads * n_sub); Block: 128 threads = 4 warps.
 *   A query tile is BM = 64 rows: TT = 64 / GS consecutive batch tokens times the GS query heads
 *   of the subgroup that share one KV head (Opt-GQA: one K/V tile read serves all of them); row
 *   r = (token t0 + r / GS, head h0 + r % GS); warp w owns rows [16w, 16w + 16). Only tiles whose
 *   tokens all belong to one sequence are computed here (attn.cuh, Routing); the CTA of any other
 *   tile exits and the decode kernel computes its tokens.
 *   Keys [min lo, max pos] of the tile's rows go in tiles of BN = 64 positions through the
 *   sequence's block table: cp.async copies each key's K and V row (16-byte chunks; released
 *   pages and positions past the range are zero-filled and masked) into a double-buffered stage,
 *   one tile ahead of the one computed. F16 rows land directly in the padded f16 tiles that
 *   ldmatrix reads; FP8 rows land as bytes and are converted to f16 (exact: every E4M3/E5M2 value
 *   is an f16 value; V rows are multiplied by their f32 scale first, rounded once) in a second
 *   buffer; the K scales stay per key and multiply the scores.
 *   Per tile and warp: S = Q K^T (HD/16 x 8 MMAs), times scale * log2(e) and the FP8 K scale of
 *   each key, masked by position (causal: key <= pos of the row, key >= lo for a window) and by
 *   key validity; online softmax on the S fragments (each row's 4 owning lanes reduce with two
 *   shuffles); P is rounded to f16 and multiplied with V straight from the accumulator layout
 *   (O += P V, ldmatrix.trans for V).
 *   Shared memory (dynamic, HD 128): Q 17 KiB, two stages of K and V (F16 70 KiB; FP8 34 KiB
 *   raw + 34 KiB converted), per-key offsets: about 90 KiB, two CTAs per SM.
 *
 * Numerics (the tolerance of test cuda_attention_prefill): q is rounded to f16 (K is exact: F16
 * cache or FP8 values), scores accumulate in f32, and the probabilities are rounded to f16 before
 * the PV product while the softmax denominator sums them in f32. With f16-representable q the
 * roundings beyond the decode kernel's are those of P (2^-11 relative per term) and, for FP8, of
 * V times its scale (another 2^-11). The V scale is not folded into P: p * scale would fall into
 * f16's subnormal range for most keys (scales are ~amax / 448, or / 57344 for E5M2).
 *
 * Compiled for head dims 64, 80, 96, 128 and F16 / FP8 E4M3 / FP8 E5M2 caches; BF16 and F32
 * caches (and other head dims) run on the decode kernel (paged_attn.cu decides).
 */
#include "cuda/attn.cuh"

#include <limits.h>

#define PF_BM      64 // query rows per CTA
#define PF_BN      64 // keys per tile
#define PF_WARPS   4
#define PF_THREADS (PF_WARPS * WARP_SIZE)

template <int HD, int KT, int GS> struct pf_cfg {
    static constexpr bool F8  = KT != COOPT_DTYPE_F16;
    static constexpr int  EB  = F8 ? 1 : 2;
    static constexpr int  TT  = PF_BM / GS;   // tokens per query tile
    static constexpr int  LDS = HD + 8;       // f16 row stride of the Q, K, V tiles (conflict-free ldmatrix)
    static constexpr int  CPR = HD * EB / 16; // 16-byte chunks per cache row
    static constexpr int  TILE_H = PF_BN * LDS * 2;              // one f16 K or V tile
    static constexpr int  KSZ    = F8 ? PF_BN * HD : TILE_H;     // K (or V) part of a stage
    // stage: [K KSZ][V KSZ][valid mask, 64 bits (BN * 4 reserved)][K scale BN f32][V scale BN f32]
    static constexpr int  ST_V   = KSZ;
    static constexpr int  ST_OK  = 2 * KSZ;
    static constexpr int  ST_KS  = ST_OK + PF_BN * 4;
    static constexpr int  ST_VS  = ST_KS + PF_BN * 4;
    static constexpr int  STAGE  = ST_VS + PF_BN * 4;
    static constexpr int  OFF_Q  = 0;
    static constexpr int  OFF_ST = OFF_Q + PF_BM * LDS * 2;
    static constexpr int  OFF_CV = OFF_ST + 2 * STAGE;                 // FP8: converted K, V tiles
    static constexpr int  OFF_OF = OFF_CV + (F8 ? 2 * TILE_H : 0);    // [2][BN] u64 row offsets, [2][BN] u64 scale offsets
    static constexpr int  OFF_RW = OFF_OF + 4 * PF_BN * 8;            // rpos [BM], rlo [BM]
    static constexpr int  OFF_RD = OFF_RW + 2 * PF_BM * 4;            // [8] i32 block reduction
    static constexpr int  SMEM   = OFF_RD + 8 * 4;
    static_assert(HD % 16 == 0 && (HD * EB) % 16 == 0 && PF_BM % GS == 0, "tensor-core tile shape");
    static_assert(STAGE % 16 == 0 && TILE_H % 16 == 0, "16-byte aligned buffers");
};

#define PF_NO_ROW 0xffffffffffffffffull // offset of a masked key

template <int HD, int KT, int GS>
__global__ void __launch_bounds__(PF_THREADS) attn_prefill_kernel(const struct attn_args a, const struct kv_dev_layout L) {
    using C = pf_cfg<HD, KT, GS>;
    extern __shared__ __align__(16) uint8_t smem[];
    const int     tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int32_t tile = blockIdx.x;
    if (!attn_tile_is_tc(a, tile)) return; // tokens of several sequences: the decode kernel's
    const int32_t  kvh = blockIdx.y / a.n_sub, sub = blockIdx.y % a.n_sub;
    const int32_t  g0 = sub * GS, ng = min(GS, a.group - g0), h0 = kvh * a.group + g0;
    const int32_t  t0 = tile * C::TT, nt = min(C::TT, a.n_tokens - t0);
    const int32_t *bt = a.block_tables + (size_t)a.tok_seq[t0] * (size_t)a.max_blocks;
    __half        *Qs   = (__half *)(smem + C::OFF_Q);
    uint64_t      *offs = (uint64_t *)(smem + C::OFF_OF); // [2][BN] K row, then [2][BN] K scale
    int32_t       *rpos = (int32_t *)(smem + C::OFF_RW), *rlo = rpos + PF_BM;
    int32_t       *red  = (int32_t *)(smem + C::OFF_RD);

    // rows: position (-1: padding row, masks every key) and first key of each
    int32_t my_lo = INT_MAX, my_hi = -1;
    if (tid < PF_BM) {
        const int tt = tid / GS, g = tid % GS;
        int32_t   p = -1, lo = INT_MAX;
        if (tt < nt && g < ng) {
            p     = a.pos[t0 + tt];
            lo    = attn_lo(a, p);
            my_lo = lo, my_hi = p;
        }
        rpos[tid] = p, rlo[tid] = lo;
    }
    my_lo = __reduce_min_sync(0xffffffffu, my_lo);
    my_hi = __reduce_max_sync(0xffffffffu, my_hi);
    if (lane == 0) red[warp] = my_lo, red[4 + warp] = my_hi;
    // the query tile in f16 (unscaled: f16-representable q passes exactly)
    for (int idx = tid; idx < PF_BM * HD / 2; idx += PF_THREADS) {
        const int r = idx / (HD / 2), d = (idx % (HD / 2)) * 2, tt = r / GS, g = r % GS;
        float2    v = make_float2(0.0f, 0.0f);
        if (tt < nt && g < ng) v = *(const float2 *)(a.q + ((size_t)(t0 + tt) * a.n_heads + h0 + g) * HD + d);
        *(__half2 *)(Qs + r * C::LDS + d) = __floats2half2_rn(v.x, v.y);
    }
    __syncthreads();
    const int32_t kmin    = min(min(red[0], red[1]), min(red[2], red[3]));
    const int32_t kmax    = max(max(red[4], red[5]), max(red[6], red[7]));
    const int32_t n_tiles = kmax >= kmin ? (kmax - kmin) / PF_BN + 1 : 0;

    // this lane's two rows of the warp's 16 (accumulator layout: rows lane/4 and lane/4 + 8)
    const int     gq = lane >> 2, cq = lane & 3;
    const int     r0 = warp * 16 + gq, r1 = r0 + 8;
    const int32_t p0 = rpos[r0], p1 = rpos[r1], lo0 = rlo[r0], lo1 = rlo[r1];
    const int32_t w_hi = __reduce_max_sync(0xffffffffu, max(p0, p1));   // the warp's rows see keys in [w_lo, w_hi]
    const int32_t w_lo = __reduce_min_sync(0xffffffffu, min(lo0, lo1));
    const int32_t w_pmin  = __reduce_min_sync(0xffffffffu, min(p0, p1)); // ... and all of them see [w_lomax, w_pmin]
    const int32_t w_lomax = __reduce_max_sync(0xffffffffu, max(lo0, lo1));

    uint32_t qa[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++)
        ldsm_x4(qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], Qs + (warp * 16 + (lane & 15)) * C::LDS + kk * 16 + (lane >> 4) * 8);

    float O[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) O[j][0] = O[j][1] = O[j][2] = O[j][3] = 0.0f;
    float         mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
    const float   qk      = a.scale * ATTN_LOG2E;
    const uint64_t vdelta = (uint64_t)L.n_kv_heads * L.head_bytes;
    const uint64_t sdelta = (uint64_t)L.n_kv_heads * (uint64_t)L.page_size * 4;

    // Offsets of tile i's keys into slot i & 1 (threads < BN, one key each).
    auto tile_offsets = [&](int32_t i) {
        if (tid >= PF_BN) return;
        const int32_t p  = kmin + i * PF_BN + tid;
        uint64_t      o  = PF_NO_ROW, so = 0;
        if (p <= kmax) {
            const int32_t page = bt[kv_page_of(L, p)];
            if (page >= 0) { // released pages are never read
                const int32_t row = kv_row_of(L, p);
                o                 = kv_offset(L, page, a.layer, 0, kvh, row);
                if (C::F8) so = kv_scale_offset(L, page, a.layer, 0, kvh, row);
            }
        }
        offs[(i & 1) * PF_BN + tid]           = o;
        offs[2 * PF_BN + (i & 1) * PF_BN + tid] = so;
    };
    // Copies tile i into stage i & 1.
    auto tile_issue = [&](int32_t i) {
        uint8_t        *st = smem + C::OFF_ST + (i & 1) * C::STAGE;
        const uint64_t *of = offs + (i & 1) * PF_BN;
        for (int c = tid; c < PF_BN * C::CPR; c += PF_THREADS) {
            const int      key = c / C::CPR, ch = c % C::CPR;
            const uint64_t o   = of[key];
            const bool     v   = o != PF_NO_ROW;
            const int      dst = C::F8 ? key * HD + ch * 16 : (key * C::LDS + ch * 8) * 2;
            cp_async16(st + dst, a.pool + (v ? o + ch * 16 : 0), v);
            cp_async16(st + C::ST_V + dst, a.pool + (v ? o + vdelta + ch * 16 : 0), v);
        }
        if (tid < PF_BN) { // warps 0 and 1: the tile's validity mask, one bit per key
            const bool     v   = of[tid] != PF_NO_ROW;
            const uint32_t bal = __ballot_sync(0xffffffffu, v);
            if (lane == 0) ((uint32_t *)(st + C::ST_OK))[warp] = bal;
            if (C::F8) {
                const uint64_t so = offs[2 * PF_BN + (i & 1) * PF_BN + tid];
                cp_async4(st + C::ST_KS + tid * 4, a.pool + (v ? so : 0), v);
                cp_async4(st + C::ST_VS + tid * 4, a.pool + (v ? so + sdelta : 0), v);
            }
        }
    };

    if (n_tiles > 0) tile_offsets(0);
    if (n_tiles > 1) tile_offsets(1);
    __syncthreads();
    if (n_tiles > 0) tile_issue(0);
    cp_async_commit();
    for (int32_t i = 0; i < n_tiles; i++) {
        if (i + 1 < n_tiles) tile_issue(i + 1); // stage (i+1)&1 was last read by tile i-1 (barrier below)
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads(); // tile i has landed for every thread
        if (i + 2 < n_tiles) tile_offsets(i + 2); // slot i&1: tile i's copies were issued last iteration
        const uint8_t *st = smem + C::OFF_ST + (i & 1) * C::STAGE;
        const __half  *Kt, *Vt;
        if constexpr (C::F8) {
            __half *ck = (__half *)(smem + C::OFF_CV), *cv = ck + PF_BN * C::LDS;
            for (int c = tid; c < PF_BN * HD / 16; c += PF_THREADS) {
                const int key = c / (HD / 16), ch = c % (HD / 16);
#pragma unroll
                for (int kvi = 0; kvi < 2; kvi++) {
                    const uint4 u    = *(const uint4 *)(st + kvi * C::ST_V + key * HD + ch * 16);
                    uint32_t    w[4] = {u.x, u.y, u.z, u.w}, h[8];
                    const float vs   = ((const float *)(st + C::ST_VS))[key];
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        __half2 x = fp8x2_to_half2<KT>((uint16_t)(w[e / 2] >> (16 * (e % 2))));
                        if (kvi) { // V times its scale, rounded once (K stays exact; its scale multiplies the score)
                            float2 f = __half22float2(x);
                            x        = __floats2half2_rn(f.x * vs, f.y * vs);
                        }
                        h[e] = *(uint32_t *)&x;
                    }
                    __half *dst              = (kvi ? cv : ck) + key * C::LDS + ch * 16;
                    *(uint4 *)dst            = make_uint4(h[0], h[1], h[2], h[3]);
                    *(uint4 *)(dst + 8)      = make_uint4(h[4], h[5], h[6], h[7]);
                }
            }
            __syncthreads();
            Kt = ck, Vt = cv;
        } else {
            Kt = (const __half *)st, Vt = (const __half *)(st + C::ST_V);
        }
        const int32_t k0 = kmin + i * PF_BN;
        if (k0 <= w_hi && k0 + PF_BN - 1 >= w_lo) { // some row of the warp sees a key of the tile
            const uint64_t vm  = *(const uint64_t *)(st + C::ST_OK);
            const float   *ksc = (const float *)(st + C::ST_KS);
            float          S[PF_BN / 8][4];
#pragma unroll
            for (int j = 0; j < PF_BN / 8; j++) S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++)
#pragma unroll
                for (int j = 0; j < PF_BN / 8; j += 2) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, Kt + (8 * j + (lane & 7) + (lane >> 4) * 8) * C::LDS + kk * 16 + ((lane >> 3) & 1) * 8);
                    mma_16816(S[j], qa[kk], b0, b1);
                    mma_16816(S[j + 1], qa[kk], b2, b3);
                }
            // scale (and the FP8 K scale of each key column), mask; a tile inside every row's
            // range with no released page (most tiles of a long context) needs no mask
            const bool interior = vm == ~0ull && k0 + PF_BN - 1 <= w_pmin && k0 >= w_lomax;
#pragma unroll
            for (int j = 0; j < PF_BN / 8; j++) {
                float2 f = make_float2(qk, qk);
                if (C::F8) {
                    const float2 ks = *(const float2 *)(ksc + 8 * j + 2 * cq);
                    f               = make_float2(qk * ks.x, qk * ks.y);
                }
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = 8 * j + 2 * cq + (e & 1);
                    bool      ok  = true;
                    if (!interior) {
                        const int32_t kp = k0 + key, rp = e < 2 ? p0 : p1, rl = e < 2 ? lo0 : lo1;
                        ok               = ((vm >> key) & 1) && kp <= rp && kp >= rl;
                    }
                    S[j][e] = ok ? S[j][e] * ((e & 1) ? f.y : f.x) : -INFINITY;
                }
            }
#pragma unroll
            for (int rr = 0; rr < 2; rr++) {
                float mx = -INFINITY;
#pragma unroll
                for (int j = 0; j < PF_BN / 8; j++) mx = fmaxf(mx, fmaxf(S[j][2 * rr], S[j][2 * rr + 1]));
                mx             = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx             = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mn = fmaxf(mrow[rr], mx), base = mn == -INFINITY ? 0.0f : mn;
                const float corr = fast_exp2(mrow[rr] - base);
                mrow[rr]         = mn;
                lrow[rr] *= corr;
#pragma unroll
                for (int j = 0; j < HD / 8; j++) O[j][2 * rr] *= corr, O[j][2 * rr + 1] *= corr;
#pragma unroll
                for (int j = 0; j < PF_BN / 8; j++)
#pragma unroll
                    for (int e = 2 * rr; e < 2 * rr + 2; e++) {
                        S[j][e] = fast_exp2(S[j][e] - base);
                        lrow[rr] += S[j][e];
                    }
            }
            // O += P V
#pragma unroll
            for (int kk = 0; kk < PF_BN / 16; kk++) {
                const uint32_t pa[4] = {pack_half2(S[2 * kk][0], S[2 * kk][1]), pack_half2(S[2 * kk][2], S[2 * kk][3]),
                                        pack_half2(S[2 * kk + 1][0], S[2 * kk + 1][1]),
                                        pack_half2(S[2 * kk + 1][2], S[2 * kk + 1][3])};
#pragma unroll
                for (int j = 0; j < HD / 8; j += 2) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4_t(b0, b1, b2, b3, Vt + (16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8) * C::LDS + j * 8 + (lane >> 4) * 8);
                    mma_16816(O[j], pa, b0, b1);
                    mma_16816(O[j + 1], pa, b2, b3);
                }
            }
        }
        __syncthreads(); // stage i&1 (and the converted tiles) are rewritten next iteration
    }
    cp_async_wait<0>();

    // normalize and write the valid rows
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        float l = lrow[rr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int r = rr ? r1 : r0;
        if ((rr ? p1 : p0) < 0) continue;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float      *o   = a.out + ((size_t)(t0 + r / GS) * a.n_heads + h0 + r % GS) * HD;
#pragma unroll
        for (int j = 0; j < HD / 8; j++)
            *(float2 *)(o + j * 8 + 2 * cq) = make_float2(O[j][2 * rr] * inv, O[j][2 * rr + 1] * inv);
    }
}

template <int HD, int KT, int GS>
static void pf_launch(cudaStream_t st, const struct attn_args &a, const struct kv_dev_layout &L) {
    using C = pf_cfg<HD, KT, GS>;
    static bool opted[64];
    cuda_smem_opt_in(attn_prefill_kernel<HD, KT, GS>, C::SMEM, opted);
    dim3 grid((unsigned)((a.n_tokens + C::TT - 1) / C::TT), (unsigned)(L.n_kv_heads * a.n_sub));
    attn_prefill_kernel<HD, KT, GS><<<grid, PF_THREADS, C::SMEM, st>>>(a, L);
    CUDA_CHECK_LAUNCH();
}

template <int HD, int KT>
static void pf_launch_gs(cudaStream_t st, const struct attn_args &a, const struct kv_dev_layout &L, int32_t gs) {
    switch (gs) {
    case 1: pf_launch<HD, KT, 1>(st, a, L); break;
    case 2: pf_launch<HD, KT, 2>(st, a, L); break;
    case 4: pf_launch<HD, KT, 4>(st, a, L); break;
    case 8: pf_launch<HD, KT, 8>(st, a, L); break;
    default: COOPT_ASSERT(!"tensor-core attention: heads per CTA must be 1, 2, 4 or 8");
    }
}

template <int HD>
static void pf_launch_kt(cudaStream_t st, const struct attn_args &a, const struct kv_dev_layout &L, int32_t gs) {
    switch (L.dtype) {
    case COOPT_DTYPE_F16: pf_launch_gs<HD, COOPT_DTYPE_F16>(st, a, L, gs); break;
    case COOPT_DTYPE_FP8_E4M3: pf_launch_gs<HD, COOPT_DTYPE_FP8_E4M3>(st, a, L, gs); break;
    case COOPT_DTYPE_FP8_E5M2: pf_launch_gs<HD, COOPT_DTYPE_FP8_E5M2>(st, a, L, gs); break;
    default: COOPT_ASSERT(!"tensor-core attention: KV type not compiled");
    }
}

bool cuda_attn_prefill_supported(int32_t head_dim, enum coopt_dtype kv_type) {
    return (head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128) &&
           (kv_type == COOPT_DTYPE_F16 || kv_type == COOPT_DTYPE_FP8_E4M3 || kv_type == COOPT_DTYPE_FP8_E5M2);
}

void cuda_attn_prefill_launch(cudaStream_t st, const struct attn_args &a, const struct kv_dev_layout &L,
                              int32_t heads_per_cta) {
    COOPT_ASSERT(a.tc_tokens * heads_per_cta == PF_BM);
    switch (L.head_dim) {
    case 64: pf_launch_kt<64>(st, a, L, heads_per_cta); break;
    case 80: pf_launch_kt<80>(st, a, L, heads_per_cta); break;
    case 96: pf_launch_kt<96>(st, a, L, heads_per_cta); break;
    case 128: pf_launch_kt<128>(st, a, L, heads_per_cta); break;
    default: COOPT_ASSERT(!"tensor-core attention: head_dim not compiled");
    }
}
