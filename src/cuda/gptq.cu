/*
 * gptq.cu -- GPTQ int4 weights on the GPU: the upload (repack into the kernels' layout), a GEMV
 * for decode and small batches, a tensor-core kernel and dequantize + cuBLAS for prefill.
 *
 * Rows. The host weight (src/gptq.h) already has its input rows in "padded order": act-order
 * rows sorted by group, every group a run of whole 32-row blocks, so no kernel ever gathers a
 * weight. Here the rows are padded further to a multiple of 64 (zero codes). x is read in place
 * when the order is the identity and n_in == k_pad ("direct", every non-act-order checkpoint of
 * a real model); otherwise one gather kernel per call writes x_p[r][k] = x[r][perm[k]] (0 for
 * padding rows) into the workspace first -- the only gather, once per call, as the CPU does.
 *
 * Codes: the mma fragment layout. Output columns come in tiles of 16 (the host's subtiles), rows
 * in chunks of 64. For tile t, chunk c, lane l = 4 gid + tq (gid 0..7, tq 0..3) and dword j
 * (0..3), with o0 = 16 t and k0 = 64 c + 16 j, the dword qw[t][c][l][j] holds
 *     nibble 0: W[o0+gid  ][k0+2tq]    nibble 4: W[o0+gid  ][k0+2tq+1]
 *     nibble 1: W[o0+gid+8][k0+2tq]    nibble 5: W[o0+gid+8][k0+2tq+1]
 *     nibble 2: W[o0+gid  ][k0+2tq+8]  nibble 6: W[o0+gid  ][k0+2tq+9]
 *     nibble 3: W[o0+gid+8][k0+2tq+8]  nibble 7: W[o0+gid+8][k0+2tq+9]
 * which is exactly that lane's A fragment of mma.m16n8k16 (rows = output columns, k = input
 * rows): (dw & 0x000f000f), (dw & 0x00f000f0) and the same of dw >> 8, OR'ed into the f16
 * magic 0x6400 (1024), are its registers a0..a3. One 16-byte load per lane covers 64 rows of
 * 16 columns, and a warp reads 512 contiguous bytes. Scales and zeros: sz[t][g][16] = f16 scale
 * bits | real zero point << 16 (4 bytes per column and group). A group can change at any 32-row
 * boundary (act-order groups, group size 32): kb_grp[k / 32] is the group of each 32-row block
 * (GEMV), kc_grp[c] the groups of the two halves of 64-row chunk c, lo | hi << 16 (MMA).
 *
 * Paths (cuda_gptq_matmul picks by n_rows; thresholds measured on an H100, docs/BENCHMARKS.md):
 *  - tensor-core GEMV (decode, 1 row: the default; up to 8 rows when asked for;
 *    gptq_hgemv_kernel, described at the kernel): exact f16 (q - z) x f16 x in mma.m16n8k16,
 *    f32 sums, codes through a register ring; also the fused decode ops of backend.h (RMS norm
 *    in, residual add or silu * up in the store: cuda_gptq_gemv_fused), at one row passing x on
 *    to the next GEMV ready-staged (struct cuda_gptq_xstage). On an H100 the four
 *    fused GEMVs of a decode layer run at 48-80 % of the bandwidth (kernel bench, docs/BENCHMARKS.md).
 *  - int8 GEMV (decode, 1-8 rows a launch; opt-in with COOPT_GPTQ_GEMV=i8, see "Measured"
 *    below for why it is not the default): per call, gptq_quant_x_kernel quantizes x to int8
 *    exactly as the CPU kernels do
 *    (src/cpu/matmul_gptq.c: per block of 32 padded rows, d = amax / 127, round to nearest even,
 *    the act-order gather in the same pass) into the workspace, already in the byte order of the
 *    code dwords: the 64 bytes of a chunk are [tq][j][e], e = rows 16j + 2tq + {0, 8, 1, 9},
 *    which is the order of the bytes of dw & 0x0f0f0f0f (column gid) and (dw >> 4) & 0x0f0f0f0f
 *    (column gid+8). With it the block's scale d and the sum of its int8 values sx per token.
 *    gptq_i8_gemv_kernel then needs no dequantization at all: per 32-row block, a lane's two
 *    code dwords, masked, ARE the s8 A fragment of mma.m16n8k32 (rows = columns gid, gid+8, k in
 *    the permuted order above) and its 16-byte x piece of token gid the B fragment, so one
 *    tensor-core instruction does 16 columns x 32 rows x 8 tokens in exact int32. The zero point
 *    enters through the accumulator's initial value (sum (q - z) xq = sum q xq - z sx), and so
 *    does the int -> f32 conversion (the magic 1.5 * 2^23: the bits of the result read as f32
 *    are 1.5 * 2^23 + the sum, exactly); per block one FADD and one FFMA by d, per group one
 *    FFMA by the column's scale. By our count that is ~50 instructions per lane and 16 bytes of
 *    codes (64 weights, for any number of tokens up to 8; 5 of them loads), against ~120 for
 *    the f32 GEMV at one token. The only approximation is x's int8 rounding:
 *    |error| <= sum_i |W[o][i]| d_b(i) / 2 (the CPU's bound, docs/QUANTIZE.md), plus f32 rounding.
 *    Grid: (column tiles of all weights of the call, K splits); Block: 4, 8 or 16 warps that
 *    split the split's chunks into contiguous ranges; each lane keeps I8_U chunks of codes in
 *    flight (16-byte L1-bypassing loads, a register ring). Warps reduce through shared memory in
 *    a fixed order; with several K splits (only when asked for: they measured slower) each block
 *    writes its partial sums to the workspace and the last block of a tile to arrive (an atomic
 *    counter per tile, kept in the weight's allocation and reset by that block) adds them in
 *    split order: deterministic. The two kernels use programmatic dependent launch on sm_90
 *    (COOPT_GPTQ_PDL=0 turns it off): the GEMV's blocks start and issue their first code loads
 *    while the quantization (and, before it, the previous kernel) finishes, and wait
 *    (griddepcontrol.wait) before they read anything another kernel writes.
 *    Measured (H100, docs/BENCHMARKS.md): correct (every test, compute-sanitizer clean) and
 *    flat from 1 to 8 tokens, but not memory-bound: with its best configuration (8 warps, no K
 *    split, now the automatic one) time against bytes is ~1.8 TB/s marginal plus ~4.5 us per
 *    call, close to the f32 GEMV's ~2.0 TB/s + ~3.9 us, so at 1 row it ranges from 3 % faster
 *    to 38 % slower than the f32 GEMV by shape, and end to end llama2-7b gptq4 decodes at 147
 *    t/s against 164. At 8 rows (measured with the earlier automatic K splits, which cost
 *    0.5-2 us at 1 row) it is 1.6-3.3x faster than the f32 GEMV and 0.84-1.11x the MMA
 *    kernel's speed; a q/k/v multi call 1.4-1.8x the MMA kernel's. That two GEMVs with very
 *    different instruction counts stall at the same ~50 % suggests too few bytes in flight
 *    (I8_U = 3 chunks per lane, ~24 warps per SM: ~36 KiB) and per-kernel ramp and tail, not
 *    instruction issue; not verified (no profiler run).
 *  - f32 GEMV (decode, 1 row with COOPT_GPTQ_GEMV=f32, exact products; up to 8 rows a launch
 *    when asked for; the fused ops as the tensor-core GEMV, x * norm staged in shared memory):
 *    f32 throughout. A nibble
 *    becomes an exact f32 without a conversion instruction: OR'ed into the exponent of 2^e
 *    (e = 23, 19, 15, 11, 7 for the nibbles at bits 0, 4, 8, 12, 16; dw >> 20 brings nibbles
 *    5..7 to bits 0..8) it reads 2^e + q, and one FADD of the per-group constant 2^e + z gives
 *    q - z exactly. So per weight: LOP3, FADD and one
 *    FFMA per row; W = s (q - z) is applied as y += s * sum_group (q - z) x, i.e. every product
 *    is exact and the only rounding is f32 accumulation (the same error as the F32 GEMV).
 *    Grid: one block per 16-column tile (of all weights of a multi call); Block: NW warps that
 *    split the 64-row chunks into contiguous ranges; each lane loads runs of 4 chunks (64 bytes)
 *    with L1-bypassing loads, then multiplies them, with the scale/zero words of the run's last
 *    group fetched alongside; x (L1-resident) is read as float2 pairs. The 4 lanes of a column
 *    pair reduce with shuffles, the warps through shared memory, in a fixed order
 *    (deterministic). Measured: ~1.4 TB/s in steady state (time against bytes over the real
 *    shapes), so it is not memory-bound; our reading is instruction issue (~30 instructions per
 *    8 weights: LOP3 + FADD + FFMA each, the x loads, addressing) with too few warps to hide the
 *    L1 latency of x. A double-buffered variant with twice the registers measured 10-25 %
 *    slower (lower occupancy). The MMA kernel below is 5-35 % slower at 1 row, about as fast or
 *    faster at 2 rows and 1.4-3.5x faster at 8.
 *  - MMA (tensor cores, f16 x; 2-159 rows): x is gathered/converted to f16 once per call; Grid:
 *    (ceil(n_tiles/4), ceil(n_rows/BN), K splits); Block: 4 warps, warp w owns column tile
 *    4 blockIdx.x + w, all share a BN-token x tile in shared memory (double-buffered, rows padded
 *    to 72 halves so ldmatrix is conflict-free). A lane's dword is dequantized in registers to
 *    f16 s (q - z) (exact q - z via the magic, one rounding in the scale multiply) and fed
 *    straight to mma.sync as A. K is split over enough blocks for ~3 per SM; the splits' partial
 *    sums go to the workspace and one small kernel adds them in a fixed order.
 *  - cuBLAS (prefill, >= 160 rows): the same f16 weights written to a scratch matrix (a
 *    shared-memory transpose of the fragment order into rows), then cublasGemmEx (f32 compute).
 * Accuracy of the f16 paths: x and s (q - z) are each rounded to f16 once (2^-11 relative,
 * 2^-25 absolute below the f16 normal range), products and sums in f32: |error| <= (2^-10 +
 * 2^-22) sum_i |W x| + 2^-25 sum_i |W| + the f32 accumulation error.
 */
#include "cuda/common.cuh"

#include "cuda/gptq_dev.h"
#include "cuda/xstage.cuh"

#include <stdlib.h>
#include <string.h>

TRACE_TU(gptq)

#define GPTQ_GEMV_MAX_ROWS 8   // rows per GEMV launch (template R = 1, 2, 4, 8)
#define GPTQ_U             4   // 64-row chunks each GEMV lane loads before using them
#define GPTQ_MAX_MULTI     4
#define GPTQ_MMA_WARPS     4

// Row thresholds of the automatic choice, from the kernel timings on an H100 (docs/BENCHMARKS.md):
// at 1 row the GEMV is 5-35 % faster than the MMA kernel and exact in f32; the MMA kernel costs
// about the same from 1 to 16 rows while the GEMV grows with every row (equal or slower from 2
// rows on the real shapes but 1024x4096, 1.4-3.5x slower at 8); dequantize + cuBLAS wins
// at 512 rows and loses at 128 on every real shape (crossover interpolated at 170-330).
#ifndef GPTQ_MMA_MIN_ROWS
#define GPTQ_MMA_MIN_ROWS 2 // n_rows below: GEMV
#endif
#ifndef GPTQ_I8_MAX_ROWS
#define GPTQ_I8_MAX_ROWS 8 // n_rows up to here: the int8 GEMV, when it is the chosen GEMV
#endif
// The decode GEMV without COOPT_GPTQ_GEMV: the tensor-core one (H), measured fastest at 1 row on
// the real shapes and end to end (docs/BENCHMARKS.md, "tensor-core GPTQ GEMV"); the f32 and int8
// ones are opt-in (COOPT_GPTQ_GEMV=f32|i8).
#ifndef GPTQ_GEMV_BUILTIN
#define GPTQ_GEMV_BUILTIN CUDA_GPTQ_GEMV_MODE_H
#endif
#ifndef GPTQ_CUBLAS_MIN_ROWS
#define GPTQ_CUBLAS_MIN_ROWS 160 // n_rows from here: dequantize + cuBLAS
#endif

// ---- device helpers ----

// 16-byte load that does not allocate in L1 (weights are read once; x stays in L1). volatile:
// issued where it is written, so a prefetch is not sunk next to its use.
__device__ __forceinline__ uint4 ld_stream(const uint4 *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ __half2 u32_as_h2(uint32_t u) {
    __half2 h;
    memcpy(&h, &u, 4);
    return h;
}
__device__ __forceinline__ uint32_t h2_as_u32(__half2 h) {
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
}

// The four f16x2 A-fragment registers s (q - z) of one code dword (see the file comment). Row
// gid uses (scale sA, 1024 + zA), row gid+8 (scale sB, -(64 + zB)): the 0x00f0 nibbles read
// 1024 + 16 q, so (v / 16) - (64 + z) = q - z, exact in one HFMA2; 1024 + q - (1024 + z) too.
__device__ __forceinline__ void dequant_frag(uint32_t q, __half2 sA, __half2 zA, __half2 sB, __half2 zBn,
                                             uint32_t (&a)[4]) {
    const __half2 sixteenth = __float2half2_rn(0.0625f);
    const uint32_t h = q >> 8;
    a[0] = h2_as_u32(__hmul2(__hsub2(u32_as_h2((q & 0x000f000fu) | 0x64006400u), zA), sA));
    a[1] = h2_as_u32(__hmul2(__hfma2(u32_as_h2((q & 0x00f000f0u) | 0x64006400u), sixteenth, zBn), sB));
    a[2] = h2_as_u32(__hmul2(__hsub2(u32_as_h2((h & 0x000f000fu) | 0x64006400u), zA), sA));
    a[3] = h2_as_u32(__hmul2(__hfma2(u32_as_h2((h & 0x00f000f0u) | 0x64006400u), sixteenth, zBn), sB));
}

// f16x2 constants of a column pair from its two sz words.
__device__ __forceinline__ void frag_consts(uint32_t va, uint32_t vb, __half2 &sA, __half2 &zA, __half2 &sB,
                                            __half2 &zBn) {
    sA  = __half2half2(__ushort_as_half((unsigned short)(va & 0xffffu)));
    sB  = __half2half2(__ushort_as_half((unsigned short)(vb & 0xffffu)));
    zA  = __float2half2_rn(1024.0f + (float)(va >> 16));
    zBn = __float2half2_rn(-64.0f - (float)(vb >> 16));
}

// ---- upload: repack kernels ----

// dst: the fragment layout [n_ot][n_kc][32][4] dwords; src: the host layout [n_ot][k_src/8][16]
// (nibble n of a dword = row 8r + n). One thread per destination dword.
__global__ void gptq_repack_kernel(uint32_t *__restrict__ dst, const uint32_t *__restrict__ src, int64_t k_src,
                                   int32_t n_kc, int64_t n_dw) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_dw; i += (int64_t)gridDim.x * blockDim.x) {
        const int     j = (int)(i & 3), lane = (int)((i >> 2) & 31);
        const int64_t rest = i >> 7, kc = rest % n_kc, ot = rest / n_kc;
        const int     gid = lane >> 2, tq = lane & 3;
        const int64_t k0 = kc * 64 + 16 * j + 2 * tq; // rows k0, k0+1 share an octet; k0+8, k0+9 the next
        const uint32_t *s = src + ot * (k_src / 8) * 16;
        const uint32_t a0 = k0 < k_src ? s[(k0 >> 3) * 16 + gid] : 0u, b0 = k0 < k_src ? s[(k0 >> 3) * 16 + gid + 8] : 0u;
        const uint32_t a1 = k0 + 8 < k_src ? s[((k0 + 8) >> 3) * 16 + gid] : 0u;
        const uint32_t b1 = k0 + 8 < k_src ? s[((k0 + 8) >> 3) * 16 + gid + 8] : 0u;
        const int      sh = 4 * (int)(k0 & 7), sh1 = sh + 4;
        dst[i] = ((a0 >> sh) & 15u) | ((b0 >> sh) & 15u) << 4 | ((a1 >> sh) & 15u) << 8 | ((b1 >> sh) & 15u) << 12 |
                 ((a0 >> sh1) & 15u) << 16 | ((b0 >> sh1) & 15u) << 20 | ((a1 >> sh1) & 15u) << 24 |
                 ((b1 >> sh1) & 15u) << 28;
    }
}

// sz[i] = scale[i] | zero[i] << 16 (same [n_ot][n_groups][16] indexing as the host arrays).
__global__ void gptq_sz_kernel(uint32_t *__restrict__ sz, const uint16_t *__restrict__ scale,
                               const uint8_t *__restrict__ zero, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        sz[i] = (uint32_t)scale[i] | (uint32_t)zero[i] << 16;
}

// ---- per-call x preparation ----

// xp[r][k] = x[r][perm[k]] (perm NULL: x[r][k] for k < n_in), 0 for padding rows; T = float or
// __half (round to nearest). Grid-stride over n_rows * k_pad.
template <typename T>
__global__ void gptq_gather_kernel(T *__restrict__ xp, const float *__restrict__ x, const int32_t *__restrict__ perm,
                                   int64_t n_in, int64_t k_pad, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / k_pad, k = i - r * k_pad;
        const int64_t s = perm ? (int64_t)perm[k] : (k < n_in ? k : -1);
        const float   v = s >= 0 ? x[r * n_in + s] : 0.0f;
        if constexpr (sizeof(T) == 4)
            xp[i] = v;
        else
            xp[i] = __float2half_rn(v);
    }
}

// ---- GEMV ----

// Epilogue of the f32 GEMV (backend.h's fused ops at decode): store, out += (matmul_add: the
// residual add in the store), or silu(gate) * up (matmul_swiglu: weight 0 = gate, 1 = up, one
// block computes the same tile of both).
enum gemv_mode { GEMV_STORE = 0, GEMV_ACCUMULATE = 1, GEMV_SWIGLU = 2 };

// What gemv_store (below) writes, given the value it adds to (GEMV_ACCUMULATE; loaded by the caller).
__device__ __forceinline__ float gemv_value(float s, float u, const float *bias, const float *bias_u, int32_t o, int mode,
                                            float prev) {
    s += bias ? bias[o] : 0.0f;
    if (mode == GEMV_SWIGLU) {
        u += bias_u ? bias_u[o] : 0.0f;
        return s / (1.0f + expf(-s)) * u;
    }
    return mode == GEMV_ACCUMULATE ? prev + s : s;
}

// The GEMVs' store of column o: sum s (+ bias[o]) by mode; swiglu: silu(s + bias[o]) * (u +
// bias_u[o]) (as silu_mul_kernel).
__device__ __forceinline__ void gemv_store(float *p, float s, float u, const float *bias, const float *bias_u,
                                           int32_t o, int mode) {
    *p = gemv_value(s, u, bias, bias_u, o, mode, mode == GEMV_ACCUMULATE ? *p : 0.0f);
}

// Up to GPTQ_MAX_MULTI weights of one input; block b belongs to weight j when
// ot_end[j-1] <= b < ot_end[j] (swiglu: every block does weights 0 and 1). Passed by value
// (kernel parameter space).
struct gemv_args {
    const uint4    *qw[GPTQ_MAX_MULTI];
    const uint32_t *sz[GPTQ_MAX_MULTI];
    const int32_t  *kb_grp[GPTQ_MAX_MULTI];
    const float    *x[GPTQ_MAX_MULTI];    // [n_rows][ldx]: x in place or the gathered copy
    const float    *bias[GPTQ_MAX_MULTI]; // [n_out] or NULL
    float          *out[GPTQ_MAX_MULTI];  // [n_rows][n_out]
    int32_t         n_out[GPTQ_MAX_MULTI];
    int32_t         n_groups[GPTQ_MAX_MULTI];
    int32_t         ot_end[GPTQ_MAX_MULTI];
    int32_t         n;
    int32_t         n_kc; // common to all weights
    int64_t         ldx;
    int32_t         n_rows; // <= R
    int32_t         mode;   // enum gemv_mode
    const float    *norm;   // [ldx] RMS norm weights (NORM kernels): x is taken as x * norm, and the
    float           eps;    //       sums are scaled by 1 / sqrt(mean(x^2) + eps) at the end
};

// acc[r] (columns gid: A, gid+8: B) += the tile's codes of chunks [kc0, kc1) against x rows xr[r]
// (lane-offset by 2 tq). LDX(r, k) returns the float2 of row r at k, k + 1.
// The sums of (row r, column c) over the NW warps' partial sums, in warp order (deterministic):
// s of weight 0, u of weight 1 when swiglu (else 0).
template <int M, int NW, int R>
__device__ __forceinline__ void sum_warps(const float (&red)[M][NW][R][16], int r, int c, bool swiglu, float &s,
                                          float &u) {
    s = 0.0f, u = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; w++) s += red[0][w][r][c];
    if (M > 1 && swiglu)
#pragma unroll
        for (int w = 0; w < NW; w++) u += red[M - 1][w][r][c];
}

template <int R, typename LDX>
__device__ __forceinline__ void gemv_tile(const uint4 *__restrict__ wp, const uint32_t *__restrict__ szp,
                                          const int32_t *__restrict__ kb_grp, int32_t kc0, int32_t kc1, int gid,
                                          LDX ldx, float (&yA)[R], float (&yB)[R]) {
    float aA[R], aB[R];
#pragma unroll
    for (int r = 0; r < R; r++) aA[r] = aB[r] = 0.0f;
    float sA = 0.0f, sB = 0.0f;
    float cA0 = 0.0f, cA2 = 0.0f, cA4 = 0.0f, cA6 = 0.0f, cB1 = 0.0f, cB3 = 0.0f, cB5 = 0.0f, cB7 = 0.0f;
    int   gcur = -1;
    for (int32_t kc = kc0; kc < kc1; kc += GPTQ_U) {
        uint4 w[GPTQ_U];
#pragma unroll
        for (int u = 0; u < GPTQ_U; u++)
            if (kc + u < kc1) w[u] = ld_stream(wp + (int64_t)(kc + u) * 32);
        // scales/zeros of the chunk run's last group, fetched with the codes: a run of 4 chunks
        // (256 rows) rarely spans more than two groups, so a group change seldom waits
        const int      gpf = __ldg(kb_grp + 2 * min(kc + GPTQ_U, kc1) - 1);
        const uint32_t pfA = __ldg(szp + gpf * 16 + gid), pfB = __ldg(szp + gpf * 16 + gid + 8);
#pragma unroll
        for (int u = 0; u < GPTQ_U; u++) {
            if (kc + u < kc1) {
                const int32_t  kcu    = kc + u;
                const uint32_t dws[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    if ((j & 1) == 0) {
                        const int g = __ldg(kb_grp + 2 * kcu + (j >> 1));
                        if (g != gcur) {
#pragma unroll
                            for (int r = 0; r < R; r++) {
                                yA[r] = fmaf(sA, aA[r], yA[r]);
                                yB[r] = fmaf(sB, aB[r], yB[r]);
                                aA[r] = aB[r] = 0.0f;
                            }
                            uint32_t va = pfA, vb = pfB;
                            if (g != gpf) va = __ldg(szp + g * 16 + gid), vb = __ldg(szp + g * 16 + gid + 8);
                            sA = f16_bits_to_f32((uint16_t)(va & 0xffffu));
                            sB = f16_bits_to_f32((uint16_t)(vb & 0xffffu));
                            const float zA = (float)(va >> 16), zB = (float)(vb >> 16);
                            cA0 = 8388608.0f + zA, cA6 = 524288.0f + zA, cA2 = 32768.0f + zA, cA4 = 128.0f + zA;
                            cB5 = 8388608.0f + zB, cB1 = 524288.0f + zB, cB7 = 32768.0f + zB, cB3 = 2048.0f + zB;
                            gcur = g;
                        }
                    }
                    const uint32_t dw = dws[j], hi = dw >> 20;
                    // q - z of the 8 nibbles, exact (see the file comment)
                    const float w0 = __uint_as_float((dw & 0xfu) | 0x4b000000u) - cA0;     // A, row 2tq
                    const float w1 = __uint_as_float((dw & 0xf0u) | 0x49000000u) - cB1;    // B, row 2tq
                    const float w2 = __uint_as_float((dw & 0xf00u) | 0x47000000u) - cA2;   // A, row 2tq+8
                    const float w3 = __uint_as_float((dw & 0xf000u) | 0x45000000u) - cB3;  // B, row 2tq+8
                    const float w4 = __uint_as_float((dw & 0xf0000u) | 0x43000000u) - cA4; // A, row 2tq+1
                    const float w5 = __uint_as_float((hi & 0xfu) | 0x4b000000u) - cB5;     // B, row 2tq+1
                    const float w6 = __uint_as_float((hi & 0xf0u) | 0x49000000u) - cA6;    // A, row 2tq+9
                    const float w7 = __uint_as_float((hi & 0xf00u) | 0x47000000u) - cB7;   // B, row 2tq+9
                    const int32_t k = kcu * 64 + j * 16;
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const float2 xa = ldx(r, k), xb = ldx(r, k + 8);
                        aA[r] = fmaf(w6, xb.y, fmaf(w2, xb.x, fmaf(w4, xa.y, fmaf(w0, xa.x, aA[r]))));
                        aB[r] = fmaf(w7, xb.y, fmaf(w3, xb.x, fmaf(w5, xa.y, fmaf(w1, xa.x, aB[r]))));
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        yA[r] = fmaf(sA, aA[r], yA[r]);
        yB[r] = fmaf(sB, aB[r], yB[r]);
    }
}

// out[r][o] for the 16 columns of one tile and R rows; see the file comment for the mapping.
// Lane (gid, tq) accumulates columns o0+gid (A) and o0+gid+8 (B) over rows 2tq, 2tq+1, 2tq+8,
// 2tq+9 of every 16-row step of its warp's chunks.
// NORM: warp w first writes x * norm of its own chunks' rows into shared memory (dynamic,
// R x 64 n_kc floats) and sums x^2 there; the inner loop then reads x from shared memory, and
// the block's sum of squares scales the finished dot products (as rmsnorm_kernel, applied after
// the dot). Swiglu mode: the block computes its tile of weight 0 (gate) and of weight 1 (up).
// PDL (launched with programmatic stream serialization on sm_90): before waiting for the
// previous kernel, every warp asks L2 for the first chunks of its codes (they do not depend on
// it); the next kernel may launch once every warp has finished its loads.
template <int R, int NW, bool NORM>
__global__ void __launch_bounds__(NW *WARP_SIZE) gptq_gemv_kernel(const gemv_args a) {
    __shared__ float red[2][NW][R][16];
    __shared__ float red_ss[NW][R];
    extern __shared__ float xs_dyn[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tq = lane & 3;
    const bool swiglu = a.mode == GEMV_SWIGLU;
    // which weight (unrolled selects: no dynamic indexing of the parameter arrays)
    int     wsel = 0;
    int32_t ot   = (int32_t)blockIdx.x;
#pragma unroll
    for (int j = 1; j < GPTQ_MAX_MULTI; j++)
        if (!swiglu && j < a.n && (int32_t)blockIdx.x >= a.ot_end[j - 1]) wsel = j, ot = (int32_t)blockIdx.x - a.ot_end[j - 1];
    const uint4    *qw = a.qw[0], *qw1 = a.qw[1];
    const uint32_t *sz = a.sz[0];
    const int32_t  *kb_grp = a.kb_grp[0];
    const float    *x = a.x[0], *bias = a.bias[0];
    float          *out = a.out[0];
    int32_t         n_out = a.n_out[0], n_groups = a.n_groups[0];
#pragma unroll
    for (int j = 1; j < GPTQ_MAX_MULTI; j++)
        if (wsel == j) {
            qw = a.qw[j], sz = a.sz[j], kb_grp = a.kb_grp[j], x = a.x[j], bias = a.bias[j], out = a.out[j];
            n_out = a.n_out[j], n_groups = a.n_groups[j];
        }
    const int32_t n_kc = a.n_kc, per = (n_kc + NW - 1) / NW;
    const int32_t kc0 = min(n_kc, warp * per), kc1 = min(n_kc, kc0 + per);
    // L2 prefetch of this warp's first chunks (8 of them: 4 KiB) before the wait
    {
        const char *p0 = (const char *)(qw + ((int64_t)ot * n_kc + kc0) * 32);
        if (kc0 + (lane >> 2) < kc1) prefetch_l2(p0 + lane * 128);
        if (swiglu) {
            const char *p1 = (const char *)(qw1 + ((int64_t)ot * n_kc + kc0) * 32);
            if (kc0 + (lane >> 2) < kc1) prefetch_l2(p1 + lane * 128);
        }
    }
    pdl_wait();
    float ss[R];
    if constexpr (NORM) { // x * norm of this warp's rows into shared memory, sum of x^2 on the way
        const int64_t k0 = (int64_t)kc0 * 64, k1 = (int64_t)kc1 * 64;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float *xr = x + (int64_t)min(r, a.n_rows - 1) * a.ldx;
            float        s  = 0.0f;
            for (int64_t k = k0 + 4 * lane; k < k1; k += 4 * WARP_SIZE) {
                const float4 v = __ldg((const float4 *)(xr + k)), g = __ldg((const float4 *)(a.norm + k));
                s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
                *(float4 *)(xs_dyn + (int64_t)r * n_kc * 64 + k) = make_float4(v.x * g.x, v.y * g.y, v.z * g.z, v.w * g.w);
            }
            ss[r] = warp_sum(s);
        }
        __syncwarp();
    }
    float yA[2][R], yB[2][R];
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int r = 0; r < R; r++) yA[m][r] = yB[m][r] = 0.0f;
#pragma unroll
    for (int m = 0; m < 2; m++) {
        if (m == 1 && !swiglu) break;
        const uint4    *q   = m ? qw1 : qw;
        const uint32_t *szm = m ? a.sz[1] : sz;
        const int32_t  *kbm = m ? a.kb_grp[1] : kb_grp;
        const int32_t   ngm = m ? a.n_groups[1] : n_groups;
        const uint4    *wp  = q + (int64_t)ot * n_kc * 32 + lane;
        const uint32_t *szp = szm + (int64_t)ot * ngm * 16;
        if constexpr (NORM) {
            const float *xs = xs_dyn + 2 * tq;
            gemv_tile<R>(wp, szp, kbm, kc0, kc1, gid,
                         [&](int r, int32_t k) { return *(const float2 *)(xs + (int64_t)r * n_kc * 64 + k); }, yA[m], yB[m]);
        } else {
            const float *xm = m ? a.x[1] : x;
            const float *xr[R];
#pragma unroll
            for (int r = 0; r < R; r++) xr[r] = xm + (int64_t)min(r, a.n_rows - 1) * a.ldx + 2 * tq;
            gemv_tile<R>(wp, szp, kbm, kc0, kc1, gid, [&](int r, int32_t k) { return __ldg((const float2 *)(xr[r] + k)); },
                         yA[m], yB[m]);
        }
    }
    pdl_launch_dependents();
#pragma unroll
    for (int m = 0; m < 2; m++) {
        if (m == 1 && !swiglu) break;
#pragma unroll
        for (int r = 0; r < R; r++) {
            float va = yA[m][r], vb = yB[m][r];
            va += __shfl_xor_sync(0xffffffffu, va, 1);
            vb += __shfl_xor_sync(0xffffffffu, vb, 1);
            va += __shfl_xor_sync(0xffffffffu, va, 2);
            vb += __shfl_xor_sync(0xffffffffu, vb, 2);
            if (tq == 0) red[m][warp][r][gid] = va, red[m][warp][r][gid + 8] = vb;
        }
    }
    if constexpr (NORM) {
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < R; r++) red_ss[warp][r] = ss[r];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < R * 16; i += NW * WARP_SIZE) {
        const int r = i >> 4, c = i & 15;
        float     s, u;
        sum_warps(red, r, c, swiglu, s, u);
        if constexpr (NORM) { // 1 / sqrt(mean(x^2) + eps), as rmsnorm_kernel, over the block's warps in order
            float t = 0.0f;
#pragma unroll
            for (int w = 0; w < NW; w++) t += red_ss[w][r];
            const float inv = 1.0f / sqrtf(t / (float)a.ldx + a.eps);
            s *= inv;
            u *= inv;
        }
        const int32_t o = ot * 16 + c;
        if (r >= a.n_rows || o >= n_out) continue;
        gemv_store(out + (int64_t)r * n_out + o, s, u, bias, a.bias[1], o, a.mode);
    }
}

// ---- tensor-core GEMV (decode, 1-8 rows): int4 codes -> exact f16 (q - z), x f16, f32 sums ----

// (a & mask) | c in one LOP3 (with both constants as immediates the compiler emits two).
template <uint32_t MASK> __device__ __forceinline__ uint32_t and_or_t(uint32_t a, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "n"(MASK), "r"(c));
    return d;
}
#define and_or(a, mask, c) and_or_t<(mask)>((a), (c))

#ifndef HG_RU
#define HG_RU 4 // 64-row chunks of codes each lane keeps in flight (a register ring; the loop is unrolled by it)
#endif
#define HG_ROWS 8 // tokens per launch: the n = 8 of the mma
// Where the next kernel may launch: after the chunk stream (0), or at the start in the SwiGLU
// instances (1) or in all (2) -- a compile-time switch for measurements.
#ifndef HG_TRIGGER_AT
#define HG_TRIGGER_AT 0
#endif
#define HG_TRIGGER_EARLY(sw) (HG_TRIGGER_AT == 2 || (HG_TRIGGER_AT == 1 && (sw)))
#ifndef HG_MIN_TURNS
#define HG_MIN_TURNS 2 // turns of the register ring a warp's range must make for 8- and 16-warp blocks (hgemv_auto_config)
#endif
// Register caps: every instance is compiled with both, and hgemv_auto_config takes the larger
// where the grid still fits the GPU in one wave. With one cap for all, 80 was 4 % faster end to
// end on llama2-7b and 72 4-7 % faster on llama3-8b / llama2-13b, whose 4-warp gate/up grids fit
// one wave only at 72 (28 warps an SM); 96 was slower still (docs/BENCHMARKS.md). The instances
// without norm or SwiGLU (o, down) take 64 as their low cap (HG_REGS_LO_PLAIN, no spills since
// the one-pass staging): a 256-tile grid of 16-warp blocks then fits one wave (32 warps an SM),
// which made llama2-7b / llama3-8b's down GEMV 11 / 13 % faster.
#ifndef HG_REGS_HI
#define HG_REGS_HI 80
#endif
#ifndef HG_REGS_LO
#define HG_REGS_LO 72
#endif
#ifndef HG_REGS_LO_PLAIN
#define HG_REGS_LO_PLAIN 64
#endif

// Up to GPTQ_MAX_MULTI weights of one input (as gemv_args); x is one matrix for all of them:
// in place (direct weights) or the gathered copy (one permutation for all).
struct hgemv_args {
    const uint4    *qw[GPTQ_MAX_MULTI];
    const uint32_t *sz[GPTQ_MAX_MULTI];
    const uint32_t *kc_grp[GPTQ_MAX_MULTI]; // groups of each chunk's two 32-row halves: lo | hi << 16
    const float    *bias[GPTQ_MAX_MULTI];
    float          *out[GPTQ_MAX_MULTI];
    int32_t         n_out[GPTQ_MAX_MULTI];
    int32_t         n_groups[GPTQ_MAX_MULTI];
    int32_t         ot_end[GPTQ_MAX_MULTI];
    const float    *x;    // [n_rows][ldx], padded order, rows k_pad wide (zeros past n_in)
    const float    *norm; // [n_in] RMS norm weights (NORM kernels; x in place), else NULL
    int64_t         ldx;
    float           eps;
    int32_t         n_in; // the norm's mean divides by it
    int32_t         n, n_kc, n_rows, mode;
    int32_t         ng_smem; // scale/zero groups staged per block: both weights' (swiglu), else the largest
    // one row only (cuda_gptq_xstage): x already staged by the GEMV before, else NULL; and where this
    // GEMV stages its output for the next one (x * xo_norm; ADD and SWIGLU modes), else NULL
    const uint4  *xi;      // [n_kc * 64] f16, hg_pos order, times 2^HG_XS
    const float2 *xi_part; // [n_kc * 4] per 16 rows: {sum of x^2, amax(x * norm)}
    __half       *xo;      // [out columns] as xi
    float2       *xo_part; // [column tiles] as xi_part
    const float  *xo_norm; // [out columns] the next GEMV's norm weights, NULL = none
};

// out[r][o] for the 16 columns of tile blockIdx.x and up to 8 rows (see the file comment for the
// code layout). Block: NW warps splitting the tile's chunks into contiguous ranges (swiglu: each
// warp runs its range of the gate and then of the up codes as one stream). Per block, first (one
// cp.async group, waited for by the block's one barrier before griddepcontrol.wait: none of it
// depends on the previous kernel): the tile's scale/zero words of every group and the weights'
// group words of every chunk, into shared memory (a DRAM read per group change stalled the warps
// before, ncu: L1TEX scoreboard).
// Per warp and lane:
//   - codes: a register ring of HG_RU chunks (16 bytes per lane per chunk, L1-bypassing loads);
//     the first HG_RU are requested before griddepcontrol.wait, then each chunk used is replaced
//     by the one HG_RU ahead. The chunk loop is unrolled by HG_RU so every ring index is static.
//   - x, one row after a GEMV that staged it (cuda_gptq_xstage: that GEMV's epilogue wrote its
//     output, times this GEMV's norm weights, as the f16 below in hg_pos order, with each 16-row
//     tile's sum of x^2 and amax of the staged value): each warp copies its range into shared
//     memory with cp.async and sums its tiles' partials instead of converting x; where the range's
//     amax falls outside the window below it stages from x as follows. The staged bits are the
//     ones the warp would write; only the order of the sum of squares differs.
//   - x: each warp stages the rows of its own range as f16 in shared memory, in one pass (hg_pos
//     order: two 16-byte loads give a lane its 8 B-fragment registers of a chunk); token gid's
//     row (clamped to n_rows - 1: the columns of absent tokens are computed and dropped). The
//     staged value is v = x, or x * norm with NORM (whose 1 / rms, from the warps' sums of
//     squares of the same pass, multiplies the result instead: no pass over the whole row before
//     staging), times 2^HG_XS; where the warp's amax(v) falls outside [2^(-1-HG_XS), 2^(15-HG_XS))
//     (f16 overflow, or subnormals coarser than the bound below) it stages again from L1 with 2^-e,
//     2^e > amax(v). Each warp's sums are multiplied back by its power of two (exact) before the
//     reduction.
//   - per 16-row step: A = the dword's exact f16 (q - z) (dequant_frag without the scale), one
//     mma.m16n8k16 into f32 accumulators; at each group change they are multiplied by the
//     columns' f32 scales into the running sums. One compare per chunk finds a group change.
// Registers are capped at REGS (HG_REGS_HI or HG_REGS_LO; HG_REGS_LO_PLAIN for LO without NORM or
// SWIGLU); hgemv_auto_config picks the cap and the block size from the occupancy they leave.
// Executed instructions (ncu, llama2-7b gate/up, group 128, measured with the earlier two-pass
// staging): ~94 per 64-row chunk in the loop, group changes included (4 mma, 17 dequantization,
// the rest addressing, the ring and the scale/zero updates), plus ~760 per warp for the x staging.
// Accumulator c[i]: c0, c1 = column gid, tokens 2tq, 2tq+1; c2, c3 = column gid+8. Warps reduce
// through shared memory in a fixed order (deterministic).
// Error: v rounded to f16 once (2^-11 relative; below the f16 normal range an absolute 2^-25 of
// the scaled v, which the range above keeps <= 2^-24 amax(v)), products exact, sums f32: |err| <=
// 2^-11 sum |W v| + 2^-24 amax(v) sum |W| + the f32 accumulation error (NORM: v = rmsnorm(x)).
// Shared memory (dynamic): x [n_rows][k_pad] f16, the scale/zero words [ng_smem][16], the group
// words [2][n_kc].
template <int NW, bool NORM, bool SWIGLU, int REGS>
__global__ void __maxnreg__(REGS == HG_REGS_LO && !NORM && !SWIGLU ? HG_REGS_LO_PLAIN : REGS)
    gptq_hgemv_kernel(const hgemv_args a) {
    __shared__ float red[SWIGLU ? 2 : 1][NW][HG_ROWS][16];
    __shared__ float red_x[NW][HG_ROWS]; // NORM: each warp's sum of squares of its x range
    __shared__ float row_f[NW][HG_ROWS]; // the power of two each warp's staged x was multiplied by, inverted
    // (128-byte aligned: a dynamic part that started 16 bytes past a 128-byte boundary, after 16 bytes
    // more static shared memory, made the gate/up GEMV 20-24 % slower; docs/BENCHMARKS.md)
    extern __shared__ __align__(128) uint4 hg_dyn[];
    TRACE_CTA(TRACE_HGEMV | (NORM ? 1u : 0u) << 16 | (SWIGLU ? 2u : 0u) << 16 | (unsigned)a.n_kc << 18);
    if (HG_TRIGGER_EARLY(SWIGLU)) pdl_launch_dependents();
    const int  lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tq = lane & 3;
    const bool swiglu = SWIGLU; // (a.mode == GEMV_SWIGLU)
    int        wsel   = 0;
    int32_t    ot     = (int32_t)blockIdx.x;
#pragma unroll
    for (int j = 1; j < GPTQ_MAX_MULTI; j++)
        if (!swiglu && j < a.n && (int32_t)blockIdx.x >= a.ot_end[j - 1]) wsel = j, ot = (int32_t)blockIdx.x - a.ot_end[j - 1];
    const uint4 *qw0 = a.qw[0];
    const uint32_t *sz0 = a.sz[0], *kc0g = a.kc_grp[0];
    int32_t         ng0 = a.n_groups[0];
#pragma unroll
    for (int j = 1; j < GPTQ_MAX_MULTI; j++)
        if (wsel == j) qw0 = a.qw[j], sz0 = a.sz[j], kc0g = a.kc_grp[j], ng0 = a.n_groups[j];
    const int32_t n_kc = a.n_kc, per = (n_kc + NW - 1) / NW;
    const int32_t kc0 = min(n_kc, warp * per), kc1 = min(n_kc, kc0 + per), nper = kc1 - kc0;
    const int32_t total = SWIGLU ? 2 * nper : nper;
    const uint4  *wp0   = qw0 + (int64_t)ot * n_kc * 32 + lane;
    const uint4  *wp1   = a.qw[1] + (int64_t)ot * n_kc * 32 + lane; // swiglu only
    uint32_t     *xs    = (uint32_t *)hg_dyn;
    const int32_t xrow  = n_kc * 32; // half2 per staged token row
    uint32_t     *szs   = xs + (int64_t)a.n_rows * xrow; // the tile's scale/zero words [weight][group][16]
    uint32_t     *kcs   = szs + a.ng_smem * 16;          // group words of the chunks [weight][n_kc]
    const int32_t ng1   = SWIGLU ? a.n_groups[1] : ng0;

    // the tile's scale/zero words and the chunks' group words (see above)
    {
        const uint32_t *s0 = sz0 + (int64_t)ot * ng0 * 16;
        for (int32_t i = (int32_t)threadIdx.x; i < ng0 * 4; i += NW * WARP_SIZE) cp_async16(szs + 4 * i, s0 + 4 * i);
        for (int32_t i = (int32_t)threadIdx.x; i < n_kc; i += NW * WARP_SIZE) cp_async4(kcs + i, kc0g + i, true);
        if (SWIGLU) {
            const uint32_t *s1 = a.sz[1] + (int64_t)ot * ng1 * 16;
            for (int32_t i = (int32_t)threadIdx.x; i < ng1 * 4; i += NW * WARP_SIZE)
                cp_async16(szs + ng0 * 16 + 4 * i, s1 + 4 * i);
            for (int32_t i = (int32_t)threadIdx.x; i < n_kc; i += NW * WARP_SIZE)
                cp_async4(kcs + n_kc + i, a.kc_grp[1] + i, true);
        }
        cp_async_commit();
    }

    // codes of the next chunk to request (chunk kc0 + s of weight 0, then of weight 1)
    uint4        ring[HG_RU];
    const uint4 *fs = wp0 + (int64_t)kc0 * 32;
    // weight 1's chunks follow weight 0's in the stream: one fixed jump after chunk nper - 1
    const int64_t jump    = SWIGLU ? (int64_t)(wp1 - wp0) - (int64_t)nper * 32 : 0;
    auto          advance = [&](int32_t s) {
        fs += 32;
        if (SWIGLU && s + 1 == nper) fs += jump;
    };
#pragma unroll
    for (int s = 0; s < HG_RU; s++) {
        if (s < total) ring[s] = ld_stream(fs);
        advance(s);
    }
    cp_async_wait<0>(); // this thread's scale/zero and group words have landed
    __syncthreads();    // and everyone's (the only block barrier before the epilogue)
    pdl_wait();
    // the epilogue's output (thread i < n_rows * 16: row i / 16, column i % 16 of the tile) and, for
    // GEMV_ACCUMULATE, the value it adds to, loaded now so its round trip overlaps the chunk stream
    // instead of sitting in the epilogue (every kernel before has completed: pdl_wait)
    static_assert(HG_ROWS * 16 <= 4 * WARP_SIZE, "one epilogue element per thread");
    // (the weight's output and its length, selected again in the epilogue: only e_prev stays live)
    auto out_of = [&](int32_t *n_out) -> float * {
        float *o = a.out[0];
        *n_out   = a.n_out[0];
#pragma unroll
        for (int j = 1; j < GPTQ_MAX_MULTI; j++)
            if (wsel == j) *n_out = a.n_out[j], o = a.out[j];
        return o;
    };
    float e_prev = 0.0f;
    if (!SWIGLU && a.mode == GEMV_ACCUMULATE) {
        int32_t      n_out;
        const float *out = out_of(&n_out);
        const int    r = (int)threadIdx.x >> 4, o = ot * 16 + ((int)threadIdx.x & 15);
        if (r < a.n_rows && o < n_out) e_prev = out[(int64_t)r * n_out + o];
    }

    // ---- stage x (this warp's rows of every token; see above) ----
    const float fx     = (float)(1 << HG_XS);
    bool        staged = false;
    if (a.xi) { // (one row) staged by the GEMV before: copy this warp's range, check its amax window
        const uint4 *src = a.xi + (int64_t)kc0 * 8;
        for (int32_t i = lane; i < nper * 8; i += WARP_SIZE) cp_async16(xs + (int64_t)kc0 * 32 + 4 * i, src + i);
        cp_async_commit();
        float am = 0.0f, ss = 0.0f;
        for (int32_t i = lane; i < nper * 4; i += WARP_SIZE) {
            const float2 p = __ldg(a.xi_part + (int64_t)kc0 * 4 + i);
            ss += p.x, am = fmaxf(am, p.y);
        }
        am = warp_max(am), ss = warp_sum(ss);
        int e = 0;
        (void)frexpf(am, &e);
        staged = am == 0.0f || (e + HG_XS >= 0 && e + HG_XS <= 15); // (warp-uniform) else staged again below
        cp_async_wait<0>();
        if (staged && lane == 0) red_x[warp][0] = ss, row_f[warp][0] = 1.0f / fx;
    }
    const int64_t k0 = (int64_t)kc0 * 64, k1 = (int64_t)kc1 * 64;
    for (int r = 0; r < a.n_rows && !staged; r++) {
        const float *xr = a.x + (int64_t)r * a.ldx;
        uint32_t    *xd = xs + (int64_t)r * xrow;
        float        am = 0.0f, ss = 0.0f;
#pragma unroll 8
        for (int64_t k = k0 + 4 * lane; k < k1; k += 4 * WARP_SIZE) {
            float4 q = __ldg((const float4 *)(xr + k));
            if constexpr (NORM) {
                ss += q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w;
                const float4 g = __ldg((const float4 *)(a.norm + k));
                q = make_float4(q.x * g.x, q.y * g.y, q.z * g.z, q.w * g.w);
            }
            am = fmaxf(am, fmaxf(fmaxf(fabsf(q.x), fabsf(q.y)), fmaxf(fabsf(q.z), fabsf(q.w))));
            const int32_t p = hg_pos((int32_t)k); // k, k+1 -> p; k+2, k+3 -> the next tq's slot
            xd[p]     = h2_as_u32(__floats2half2_rn(q.x * fx, q.y * fx));
            xd[p + 8] = h2_as_u32(__floats2half2_rn(q.z * fx, q.w * fx));
        }
        am = warp_max(am);
        if constexpr (NORM) ss = warp_sum(ss);
        int e = 0;
        (void)frexpf(am, &e); // am < 2^e (e = 0 for am == 0)
        const bool again = am != 0.0f && (e + HG_XS < 0 || e + HG_XS > 15); // (warp-uniform)
        if (lane == 0) red_x[warp][r] = ss, row_f[warp][r] = again ? ldexpf(1.0f, e) : 1.0f / fx;
        if (!again) continue;
        // (rare) stage (x [* g]) * 2^-e instead, x and g again from L1
        const float f = ldexpf(1.0f, -e);
#pragma unroll 4
        for (int64_t k = k0 + 4 * lane; k < k1; k += 4 * WARP_SIZE) {
            float4 q = __ldg((const float4 *)(xr + k));
            if constexpr (NORM) {
                const float4 g = __ldg((const float4 *)(a.norm + k));
                q = make_float4(q.x * g.x, q.y * g.y, q.z * g.z, q.w * g.w);
            }
            const int32_t p = hg_pos((int32_t)k);
            xd[p]     = h2_as_u32(__floats2half2_rn(q.x * f, q.y * f));
            xd[p + 8] = h2_as_u32(__floats2half2_rn(q.z * f, q.w * f));
        }
    }
    __syncwarp(); // each warp reads only the x rows it staged

    // ---- the chunk stream ----
    const uint4 *xq = (const uint4 *)(xs + (int64_t)min(gid, a.n_rows - 1) * xrow) + tq * 2;
    float        c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, y[2][4];
#pragma unroll
    for (int m = 0; m < 2; m++) y[m][0] = y[m][1] = y[m][2] = y[m][3] = 0.0f;
    float    sA = 0.0f, sB = 0.0f;
    __half2  zA = __float2half2_rn(0.0f), zBn = zA;
    int      mcur = 0;
    const __half2 sixteenth = __float2half2_rn(0.0625f);
    // the group's products, times the columns' scales, into the sums of weight mcur (selects, not
    // indexing: y stays in registers)
    auto flush = [&]() {
#pragma unroll
        for (int m = 0; m < (SWIGLU ? 2 : 1); m++)
            if (m == mcur) {
                y[m][0] = fmaf(sA, c[0], y[m][0]), y[m][1] = fmaf(sA, c[1], y[m][1]);
                y[m][2] = fmaf(sB, c[2], y[m][2]), y[m][3] = fmaf(sB, c[3], y[m][3]);
            }
        c[0] = c[1] = c[2] = c[3] = 0.0f;
    };
    // Register ring: chunk i's codes sit in ring[i % HG_RU], requested HG_RU chunks ahead; the loop
    // is unrolled by HG_RU so every index is static (no copies between steps). The x fragments
    // and group words of the unrolled steps are independent loads the compiler hoists.
    const uint32_t  magic = 0x64006400u;
    const uint32_t *gb0 = kcs + kc0, *gb1 = kcs + n_kc + kc0; // group words (gb1: swiglu only)
    const uint4    *xb0 = xq + kc0 * 8;
    // the step's x fragments and group word, advanced step by step (back to the range's start, in
    // weight 1's group words, after chunk nper - 1)
    const uint4    *xp = xb0;
    const uint32_t *gp = gb0;
    int             mw = 0; // the weight of the step's chunk
    uint32_t        gword = 0xffffffffu; // the current group in both halves (none yet)
    // the group of the next 32 rows is g: flush the products so far, take g's scales/zeros. z is
    // an integer below 64 (4-bit codes: at most 16), so f16(1024 + z) = 0x6400 | z and
    // f16(-64 - z) = 0xd400 | z << 4 are bit operations.
    auto set_group = [&](int g, int m) {
        flush();
        const uint32_t *szm = szs + (m ? ng0 * 16 : 0) + g * 16 + gid;
        const uint32_t  va = szm[0], vb = szm[8];
        sA   = f16_bits_to_f32((uint16_t)(va & 0xffffu));
        sB   = f16_bits_to_f32((uint16_t)(vb & 0xffffu));
        zA   = u32_as_h2(__byte_perm((va >> 16) | 0x6400u, 0, 0x1010));
        zBn  = u32_as_h2(__byte_perm(((vb >> 12) & 0xfff0u) | 0xd400u, 0, 0x1010));
        mcur = m, gword = (uint32_t)g | (uint32_t)g << 16;
    };
    auto step = [&](int32_t i, uint4 &slot, bool refill) {
        const uint4 v = slot;
        if (refill) slot = ld_stream(fs), advance(i + HG_RU);
        const int      m  = mw;
        const uint4    xa = xp[0], xb = xp[1];
        const uint32_t gw = *gp;
        xp += 8, gp += 1;
        if (SWIGLU && i + 1 == nper) xp = xb0, gp = gb1, mw = 1;
        const uint32_t dws[4] = {v.x, v.y, v.z, v.w};
        const uint32_t bx[8]  = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        if (gw != gword || m != mcur) set_group((int)(gw & 0xffffu), m);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (j == 2 && gw != gword) set_group((int)(gw >> 16), m); // the chunk's halves differ
            const uint32_t q = dws[j], h = q >> 8;
            const uint32_t a0 = h2_as_u32(__hsub2(u32_as_h2(and_or(q, 0x000f000fu, magic)), zA));
            const uint32_t a1 = h2_as_u32(__hfma2(u32_as_h2(and_or(q, 0x00f000f0u, magic)), sixteenth, zBn));
            const uint32_t a2 = h2_as_u32(__hsub2(u32_as_h2(and_or(h, 0x000f000fu, magic)), zA));
            const uint32_t a3 = h2_as_u32(__hfma2(u32_as_h2(and_or(h, 0x00f000f0u, magic)), sixteenth, zBn));
            const uint32_t af[4] = {a0, a1, a2, a3};
            mma_16816_nv(c, af, bx[2 * j], bx[2 * j + 1]);
        }
    };
    int32_t i0 = 0;
    for (; i0 + 2 * HG_RU <= total; i0 += HG_RU) { // every step refills its slot
#pragma unroll
        for (int u = 0; u < HG_RU; u++) step(i0 + u, ring[u], true);
    }
    for (; i0 + HG_RU <= total; i0 += HG_RU) { // (once at most) the last refills
#pragma unroll
        for (int u = 0; u < HG_RU; u++) step(i0 + u, ring[u], i0 + u + HG_RU < total);
    }
#pragma unroll
    for (int u = 0; u < HG_RU - 1; u++)
        if (i0 + u < total) step(i0 + u, ring[u], false);
    flush();
    if (!HG_TRIGGER_EARLY(SWIGLU)) pdl_launch_dependents();

    // ---- reduce over the warps, epilogue ----
    {   // this warp's sums in the units of x: times the power of two its staged rows were divided by
        // (exact); tokens past n_rows (dropped below) read the clamped row's
        const float f0 = row_f[warp][min(2 * tq, a.n_rows - 1)], f1 = row_f[warp][min(2 * tq + 1, a.n_rows - 1)];
#pragma unroll
        for (int m = 0; m < (SWIGLU ? 2 : 1); m++) {
            red[m][warp][2 * tq][gid]         = y[m][0] * f0;
            red[m][warp][2 * tq + 1][gid]     = y[m][1] * f1;
            red[m][warp][2 * tq][gid + 8]     = y[m][2] * f0;
            red[m][warp][2 * tq + 1][gid + 8] = y[m][3] * f1;
        }
    }
    __syncthreads();
    int32_t       n_out;
    float        *out  = out_of(&n_out);
    const float  *bias = a.bias[0];
#pragma unroll
    for (int j = 1; j < GPTQ_MAX_MULTI; j++)
        if (wsel == j) bias = a.bias[j];
    const int     e_r = (int)threadIdx.x >> 4, e_col = (int)threadIdx.x & 15;
    const int32_t e_o  = ot * 16 + e_col;
    const bool    e_in = e_r < a.n_rows && e_o < n_out;
    float         v    = 0.0f; // the element this thread stores
    if (e_in) {
        float s, u;
        sum_warps(red, e_r, e_col, swiglu, s, u);
        if constexpr (NORM) { // the staged x was x * g: times 1 / sqrt(mean(x^2) + eps), the warps' sums in order
            float t = 0.0f;
#pragma unroll
            for (int w = 0; w < NW; w++) t += red_x[w][e_r];
            const float inv = 1.0f / sqrtf(t / (float)a.n_in + a.eps);
            s *= inv, u *= inv;
        }
        v = gemv_value(s, u, bias, a.bias[1], e_o, SWIGLU ? GEMV_SWIGLU : a.mode, e_prev);
        out[(int64_t)e_r * n_out + e_o] = v;
    }
    if (a.xo && warp == 0) { // (one row) the 16 values lanes 0-15 just stored, staged for the next GEMV
        const bool in = lane < 16 && e_in;
        xstage_put(a.xo, a.xo_part, e_o, in, lane < 16, in ? v : 0.0f, in ? v * (a.xo_norm ? a.xo_norm[e_o] : 1.0f) : 0.0f);
    }
}

// ---- int8 GEMV (decode): x quantized to int8 per call, int4 x int8 tensor-core products ----


// Byte offset of padded row k inside a quantized x row: the chunk's 64 bytes are [tq][j][e], with
// e = 0..3 holding rows 16j + 2tq + {0, 8, 1, 9} (the byte order of dw & 0x0f0f0f0f).
__device__ __forceinline__ int64_t i8_pos(int64_t k) {
    const int m = (int)(k & 15), j = (int)((k >> 4) & 3);
    return (k >> 6) * 64 + ((m & 7) >> 1) * 16 + j * 4 + (m & 1) * 2 + (m >> 3);
}

// Quantizes x for the int8 GEMV, exactly as the CPU kernels do (matmul_gptq.c quantize_row):
// per block of 32 padded rows, d = amax / 127, q = round-to-nearest-even(v * (127 / amax)) clamped
// to [-127, 127]. xq [n_rows][k_pad] int8 in the fragment byte order (i8_pos); xs [n_rows_pad / 8]
// [nblk][8] = {d bits, sum of the block's q} per row slot, zeros for rows n_rows .. n_rows_pad-1.
// One warp per (row, block), lane = row of the block; grid-stride over n_rows_pad * nblk warps.
__global__ void __launch_bounds__(256)
    gptq_quant_x_kernel(int8_t *__restrict__ xq, int2 *__restrict__ xs, const float *__restrict__ x,
                        const int32_t *__restrict__ perm, int64_t n_in, int64_t k_pad, int32_t nblk, int32_t n_rows,
                        int32_t n_rows_pad) {
    pdl_launch_dependents(); // the GEMV may start streaming its weights now; it waits for us before reading xq
    pdl_wait();              // x comes from the previous kernel, and the previous GEMV may still read xq
    const int     lane = threadIdx.x & 31;
    const int64_t n_w = (int64_t)n_rows_pad * nblk, step = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t wi = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); wi < n_w; wi += step) {
        const int32_t r = (int32_t)(wi / nblk), b = (int32_t)(wi % nblk);
        const int64_t k = (int64_t)b * 32 + lane;
        const int64_t s = perm ? (int64_t)perm[k] : (k < n_in ? k : -1);
        const float   v = r < n_rows && s >= 0 ? x[(int64_t)r * n_in + s] : 0.0f;
        float         amax = fabsf(v);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        const int   q = max(-127, min(127, __float2int_rn(v * id)));
        const int   sum = __reduce_add_sync(0xffffffffu, q);
        if (r < n_rows) xq[(int64_t)r * k_pad + i8_pos(k)] = (int8_t)q;
        if (lane == 0) xs[((int64_t)(r >> 3) * nblk + b) * 8 + (r & 7)] = make_int2(__float_as_int(d), sum);
    }
}

// D = A B + C, m16n8k32, s8 x s8 -> s32 (A: 16 output columns x 32 input rows, B: 32 x 8 tokens).
__device__ __forceinline__ void mma_s8_16832(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#define I8_MAGIC  0x4b400000 // f32 bits of 1.5 * 2^23: bits + n (|n| < 2^22) reads 1.5 * 2^23 + n
#define I8_MAGICF 12582912.0f
#define I8_ROWS   8 // tokens per launch: the n = 8 of the mma
#ifndef I8_U
#define I8_U 3 // 64-row chunks of codes each lane keeps in flight (78 registers, no spills on sm_90)
#endif

// Up to GPTQ_MAX_MULTI weights of one input (as gemv_args); block x belongs to weight j when
// ot_end[j-1] <= x < ot_end[j].
struct i8_args {
    const uint4    *qw[GPTQ_MAX_MULTI];
    const uint32_t *sz[GPTQ_MAX_MULTI];
    const uint32_t *kc_grp[GPTQ_MAX_MULTI];
    const int8_t   *xq[GPTQ_MAX_MULTI]; // [n_rows][k_pad] of this launch's rows (gptq_quant_x_kernel)
    const int2     *xs[GPTQ_MAX_MULTI]; // [nblk][8] of this launch's rows
    const float    *bias[GPTQ_MAX_MULTI];
    float          *out[GPTQ_MAX_MULTI]; // [n_rows][n_out]
    int32_t        *cnt[GPTQ_MAX_MULTI]; // [n_ot] split arrival counters (0 between calls)
    int32_t         n_out[GPTQ_MAX_MULTI];
    int32_t         n_groups[GPTQ_MAX_MULTI];
    int32_t         ot_end[GPTQ_MAX_MULTI];
    float          *part; // [gridDim.x][n_split][8][16] partial sums (n_split > 1)
    int32_t         n;
    int32_t         n_kc;
    int32_t         n_rows; // 1..8
    int32_t         n_split, kc_per;
};

// out[r][o] for the 16 columns of tile blockIdx.x and up to 8 rows, over the chunks of split
// blockIdx.y (see the file comment). Warp w takes a contiguous share of the split's chunks; lane
// (gid, tq) keeps U chunks of codes in flight (a ring: the load of chunk c + U is issued when
// chunk c is used), and per 32-row block feeds one m16n8k32: A = its two code dwords split into
// low and high nibbles (columns gid, gid+8), B = the int8 x of token gid at its tq. The
// accumulator starts at I8_MAGIC - z sx (sx: the block's x sum for the token, z: the column's
// zero point), so it ends as the f32 1.5 * 2^23 + sum (q - z) xq, exactly; minus the magic and
// times the block's x scale it goes into a per-group f32 sum, which is multiplied by the
// column's scale when the group changes.
template <int NW>
__global__ void __launch_bounds__(NW *WARP_SIZE, NW <= 8 ? 768 / (NW * WARP_SIZE) : 1)
    gptq_i8_gemv_kernel(const i8_args a) {
    __shared__ float red[NW][I8_ROWS][16];
    __shared__ int   s_last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tq = lane & 3;
    // which weight: the index is looked up once; the pointers are read from the parameter space
    // where they are used, so the epilogue's do not occupy registers during the main loop
    int jw = 0;
#pragma unroll
    for (int j = 1; j < GPTQ_MAX_MULTI; j++)
        if (j < a.n && (int32_t)blockIdx.x >= a.ot_end[j - 1]) jw = j;
    const int32_t ot = (int32_t)blockIdx.x - (jw ? a.ot_end[jw - 1] : 0);
    const uint4    *qw = a.qw[jw];
    const uint32_t *sz = a.sz[jw], *kc_grp = a.kc_grp[jw];
    const int32_t   n_groups = a.n_groups[jw];
    const int32_t n_kc = a.n_kc, z = (int32_t)blockIdx.y;
    const int32_t kb = min(n_kc, z * a.kc_per), ke = min(n_kc, kb + a.kc_per), per = (ke - kb + NW - 1) / NW;
    const int32_t kc0 = min(ke, kb + warp * per), kc1 = min(ke, kc0 + per);
    const uint4  *wp = qw + (int64_t)ot * n_kc * 32 + lane;

    // the codes do not depend on the previous kernel: start streaming them before waiting for it
    uint4 w[I8_U];
#pragma unroll
    for (int u = 0; u < I8_U; u++)
        if (kc0 + u < kc1) w[u] = ld_stream(wp + (int64_t)(kc0 + u) * 32);
    pdl_wait();

    const uint32_t *szp = sz + (int64_t)ot * n_groups * 16;
    const bool      xon = gid < a.n_rows;
    const uint4    *xp  = (const uint4 *)(a.xq[jw] + (int64_t)(xon ? gid : 0) * n_kc * 64) + tq; // chunk c: xp[4 c]
    const int4     *dsp = (const int4 *)a.xs[jw] + tq; // block b, tokens 2tq, 2tq+1: dsp[4 b]
    float           y[4] = {0.0f, 0.0f, 0.0f, 0.0f}, f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float           sA = 0.0f, sB = 0.0f;
    int             zA = 0, zB = 0, gcur = -1;

    for (int32_t kc = kc0; kc < kc1; kc += I8_U) {
#pragma unroll
        for (int u = 0; u < I8_U; u++) {
            const int32_t c = kc + u;
            if (c < kc1) {
                const uint4 cur = w[u];
                if (c + I8_U < kc1) w[u] = ld_stream(wp + (int64_t)(c + I8_U) * 32);
                const uint4    xv = xon ? __ldg(xp + (int64_t)c * 4) : make_uint4(0u, 0u, 0u, 0u);
                const uint32_t gp = __ldg(kc_grp + c);
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int g = h ? (int)(gp >> 16) : (int)(gp & 0xffffu);
                    if (g != gcur) {
                        y[0] = fmaf(sA, f[0], y[0]), y[1] = fmaf(sA, f[1], y[1]);
                        y[2] = fmaf(sB, f[2], y[2]), y[3] = fmaf(sB, f[3], y[3]);
                        f[0] = f[1] = f[2] = f[3] = 0.0f;
                        const uint32_t va = __ldg(szp + g * 16 + gid), vb = __ldg(szp + g * 16 + gid + 8);
                        sA = f16_bits_to_f32((uint16_t)(va & 0xffffu)), zA = (int)(va >> 16);
                        sB = f16_bits_to_f32((uint16_t)(vb & 0xffffu)), zB = (int)(vb >> 16);
                        gcur = g;
                    }
                    const int4     ds  = __ldg(dsp + (int64_t)(2 * c + h) * 4); // d, sx of tokens 2tq, 2tq+1
                    const uint32_t dw0 = h ? cur.z : cur.x, dw1 = h ? cur.w : cur.y;
                    const uint32_t b0 = h ? xv.z : xv.x, b1 = h ? xv.w : xv.y;
                    int acc[4] = {I8_MAGIC - zA * ds.y, I8_MAGIC - zA * ds.w, I8_MAGIC - zB * ds.y,
                                  I8_MAGIC - zB * ds.w};
                    mma_s8_16832(acc, dw0 & 0x0f0f0f0fu, (dw0 >> 4) & 0x0f0f0f0fu, dw1 & 0x0f0f0f0fu,
                                 (dw1 >> 4) & 0x0f0f0f0fu, b0, b1);
                    const float d0 = __int_as_float(ds.x), d1 = __int_as_float(ds.z);
                    f[0] = fmaf(__int_as_float(acc[0]) - I8_MAGICF, d0, f[0]);
                    f[1] = fmaf(__int_as_float(acc[1]) - I8_MAGICF, d1, f[1]);
                    f[2] = fmaf(__int_as_float(acc[2]) - I8_MAGICF, d0, f[2]);
                    f[3] = fmaf(__int_as_float(acc[3]) - I8_MAGICF, d1, f[3]);
                }
            }
        }
    }
    pdl_launch_dependents(); // the next kernel's prologue may start; it waits for our completion
    // C fragment: acc 0, 1 = column gid, tokens 2tq, 2tq+1; acc 2, 3 = column gid+8
    red[warp][2 * tq][gid]         = fmaf(sA, f[0], y[0]);
    red[warp][2 * tq + 1][gid]     = fmaf(sA, f[1], y[1]);
    red[warp][2 * tq][gid + 8]     = fmaf(sB, f[2], y[2]);
    red[warp][2 * tq + 1][gid + 8] = fmaf(sB, f[3], y[3]);
    __syncthreads();
    const int     t = threadIdx.x, r = t >> 4, col = t & 15; // t < 128: one (row, column) each
    const int32_t o = ot * 16 + col, n_out = a.n_out[jw];
    const float  *bias = a.bias[jw];
    float        *out = a.out[jw];
    int32_t      *cnt = a.cnt[jw];
    float         s = 0.0f;
    if (t < I8_ROWS * 16) {
#pragma unroll
        for (int wi = 0; wi < NW; wi++) s += red[wi][r][col];
    }
    if (a.n_split == 1) {
        if (t < I8_ROWS * 16 && r < a.n_rows && o < n_out) out[(int64_t)r * n_out + o] = s + (bias ? bias[o] : 0.0f);
        return;
    }
    // split K: publish the partial sums (of the launch's rows only); the last block of the tile
    // adds all splits in split order
    float *pt = a.part + (int64_t)blockIdx.x * a.n_split * (I8_ROWS * 16);
    if (t < a.n_rows * 16) pt[(int64_t)z * (I8_ROWS * 16) + t] = s;
    __threadfence();
    __syncthreads();
    if (t == 0) s_last = atomicAdd(cnt + ot, 1) == a.n_split - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    if (t < a.n_rows * 16 && o < n_out) {
        float v = 0.0f;
        for (int32_t zz = 0; zz < a.n_split; zz++) v += __ldcg(pt + (int64_t)zz * (I8_ROWS * 16) + t);
        out[(int64_t)r * n_out + o] = v + (bias ? bias[o] : 0.0f);
    }
    if (t == 0) cnt[ot] = 0; // ready for the next call (kernels on the stream run in order)
}

// ---- tensor cores ----

__device__ __forceinline__ void ldmatrix_x4(const void *smem, uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a)
                 : "memory");
}

#define MMA_LDS 72 // halves per shared x row: 64 + 8 of padding (conflict-free ldmatrix)

// out[n0 + n][o] for the BN tokens of blockIdx.y and the 16-column tile of each warp, over the
// 64-row chunks [z kc_per, (z+1) kc_per) of split z = blockIdx.z. xp is the f16 x [n_rows][k_pad]
// of the call. With one split the block writes out (+ bias); with several it writes its partial
// sums to part[z][n][o] and gptq_splitk_reduce_kernel adds them up. The next chunk's x tile
// (registers), codes and group words are loaded while the current one is multiplied.
template <int BN>
__global__ void __launch_bounds__(GPTQ_MMA_WARPS *WARP_SIZE)
    gptq_mma_kernel(float *__restrict__ out, float *__restrict__ part, const __half *__restrict__ xp,
                    const uint4 *__restrict__ qw, const uint32_t *__restrict__ sz, const uint32_t *__restrict__ kc_grp,
                    const float *__restrict__ bias, int32_t n_out, int32_t n_ot, int32_t n_kc, int32_t n_groups,
                    int32_t n_rows, int32_t kc_per) {
    constexpr int NT = BN / 8;                                // n-tiles of 8 tokens per warp
    constexpr int XL = BN * 8 / (GPTQ_MMA_WARPS * WARP_SIZE); // 16-byte x pieces per thread per chunk
    static_assert(NT % 2 == 0 && XL >= 1, "BN: 16, 32, 64 or 128");
    __shared__ __align__(16) __half xs[2][BN][MMA_LDS];
    const int     lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tq = lane & 3;
    const int32_t ot = (int32_t)blockIdx.x * GPTQ_MMA_WARPS + warp;
    const bool    active = ot < n_ot;
    const int32_t n0 = (int32_t)blockIdx.y * BN;
    const int64_t k_pad = (int64_t)n_kc * 64;
    const int32_t kb = (int32_t)blockIdx.z * kc_per, ke = min(n_kc, kb + kc_per);

    uint4 xr[XL];
    auto  load_x = [&](int32_t kc) {
#pragma unroll
        for (int i = 0; i < XL; i++) {
            const int     idx = threadIdx.x + i * GPTQ_MMA_WARPS * WARP_SIZE, row = idx >> 3, c = idx & 7;
            const int32_t tok = n0 + row;
            xr[i] = tok < n_rows ? __ldg((const uint4 *)(xp + (int64_t)tok * k_pad + (int64_t)kc * 64 + c * 8))
                                 : make_uint4(0, 0, 0, 0);
        }
    };
    auto store_x = [&](int b) {
#pragma unroll
        for (int i = 0; i < XL; i++) {
            const int idx = threadIdx.x + i * GPTQ_MMA_WARPS * WARP_SIZE, row = idx >> 3, c = idx & 7;
            *(uint4 *)&xs[b][row][c * 8] = xr[i];
        }
    };
    const uint4    *wp  = qw + (int64_t)(active ? ot : 0) * n_kc * 32 + lane;
    const uint32_t *szp = sz + (int64_t)(active ? ot : 0) * n_groups * 16;
    auto            load_g = [&](int32_t kc, uint32_t (&v)[2][2]) {
        const uint32_t gp = __ldg(kc_grp + kc);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int g = h ? (int)(gp >> 16) : (int)(gp & 0xffffu);
            v[h][0]     = __ldg(szp + g * 16 + gid);
            v[h][1]     = __ldg(szp + g * 16 + gid + 8);
        }
    };

    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    uint32_t gv[2][2] = {{0, 0}, {0, 0}};
    uint4    wcur     = make_uint4(0, 0, 0, 0);
    if (kb < ke) {
        load_x(kb);
        store_x(0);
        wcur = ld_stream(wp + (int64_t)kb * 32);
        load_g(kb, gv);
    }
    __syncthreads();
    for (int32_t kc = kb; kc < ke; kc++) {
        const int  b    = (kc - kb) & 1;
        const bool more = kc + 1 < ke;
        uint4      wnext = wcur;
        uint32_t   gn[2][2] = {{gv[0][0], gv[0][1]}, {gv[1][0], gv[1][1]}};
        if (more) {
            load_x(kc + 1);
            wnext = ld_stream(wp + (int64_t)(kc + 1) * 32);
            load_g(kc + 1, gn);
        }
        if (active) {
            const uint32_t dws[4] = {wcur.x, wcur.y, wcur.z, wcur.w};
#pragma unroll
            for (int h = 0; h < 2; h++) {
                __half2 sA, zA, sB, zBn;
                frag_consts(gv[h][0], gv[h][1], sA, zA, sB, zBn);
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {
                    const int j = 2 * h + jj;
                    uint32_t  af[4];
                    dequant_frag(dws[j], sA, zA, sB, zBn, af);
#pragma unroll
                    for (int p = 0; p < NT / 2; p++) {
                        const int mi = lane >> 3, r = lane & 7;
                        uint32_t  b0, b1, b2, b3;
                        ldmatrix_x4(&xs[b][(2 * p + (mi >> 1)) * 8 + r][j * 16 + (mi & 1) * 8], b0, b1, b2, b3);
                        mma_16816(acc[2 * p], af, b0, b1);
                        mma_16816(acc[2 * p + 1], af, b2, b3);
                    }
                }
            }
        }
        if (more) store_x(b ^ 1); // buffer b^1 was last read in the previous iteration, before its barrier
        __syncthreads();
        wcur = wnext;
#pragma unroll
        for (int h = 0; h < 2; h++) gv[h][0] = gn[h][0], gv[h][1] = gn[h][1];
    }
    if (!active) return;
    // C fragment: c0, c1 = (column gid, tokens 2tq, 2tq+1), c2, c3 = (column gid+8, same tokens)
    const int32_t oA = ot * 16 + gid, oB = oA + 8;
    float        *dst = part ? part + (int64_t)blockIdx.z * n_rows * n_out : out;
    const float   bA = !part && bias && oA < n_out ? bias[oA] : 0.0f, bB = !part && bias && oB < n_out ? bias[oB] : 0.0f;
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const int32_t t0 = n0 + t * 8 + 2 * tq;
        if (t0 < n_rows) {
            if (oA < n_out) dst[(int64_t)t0 * n_out + oA] = acc[t][0] + bA;
            if (oB < n_out) dst[(int64_t)t0 * n_out + oB] = acc[t][2] + bB;
        }
        if (t0 + 1 < n_rows) {
            if (oA < n_out) dst[(int64_t)(t0 + 1) * n_out + oA] = acc[t][1] + bA;
            if (oB < n_out) dst[(int64_t)(t0 + 1) * n_out + oB] = acc[t][3] + bB;
        }
    }
}

// out[i] = sum_z part[z][i] (+ bias[i % n_out]), in split order. Grid-stride over n = n_rows * n_out.
__global__ void gptq_splitk_reduce_kernel(float *__restrict__ out, const float *__restrict__ part,
                                          const float *__restrict__ bias, int64_t n_out, int64_t n, int32_t n_split) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int32_t z = 0; z < n_split; z++) s += part[(int64_t)z * n + i];
        out[i] = s + (bias ? bias[i % n_out] : 0.0f);
    }
}

// ---- dequantize for cuBLAS ----

#define DQ_LDS (256 + 8) // halves per shared row of the dequant tile (conflict-free 4-byte stores)

// wd [n_ot * 16][k_pad] f16 = s (q - z), the same values the MMA kernel feeds the tensor cores.
// Grid: (n_ot, ceil(n_kc / 4)); Block: 4 warps, warp w dequantizes chunk 4 blockIdx.y + w of tile
// blockIdx.x into a shared 16 x 256 tile (fragment order), which the block then writes out as
// contiguous 512-byte row pieces with 16-byte stores.
__global__ void __launch_bounds__(128)
    gptq_dequant_kernel(__half *__restrict__ wd, const uint4 *__restrict__ qw, const uint32_t *__restrict__ sz,
                        const uint32_t *__restrict__ kc_grp, int32_t n_kc, int32_t n_groups) {
    __shared__ __align__(16) __half tile[16][DQ_LDS];
    const int     lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tq = lane & 3;
    const int64_t ot = blockIdx.x, k_pad = (int64_t)n_kc * 64;
    const int32_t kc = (int32_t)blockIdx.y * 4 + warp;
    if (kc < n_kc) {
        const uint4     q4     = ld_stream(qw + (ot * n_kc + kc) * 32 + lane);
        const uint32_t  dws[4] = {q4.x, q4.y, q4.z, q4.w};
        const uint32_t  gp     = __ldg(kc_grp + kc);
        const uint32_t *s      = sz + ot * n_groups * 16;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int g = h ? (int)(gp >> 16) : (int)(gp & 0xffffu);
            __half2   sA, zA, sB, zBn;
            frag_consts(__ldg(s + g * 16 + gid), __ldg(s + g * 16 + gid + 8), sA, zA, sB, zBn);
#pragma unroll
            for (int jj = 0; jj < 2; jj++) {
                const int j = 2 * h + jj, k = warp * 64 + 16 * j + 2 * tq;
                uint32_t  af[4];
                dequant_frag(dws[j], sA, zA, sB, zBn, af);
                *(uint32_t *)&tile[gid][k]         = af[0];
                *(uint32_t *)&tile[gid + 8][k]     = af[1];
                *(uint32_t *)&tile[gid][k + 8]     = af[2];
                *(uint32_t *)&tile[gid + 8][k + 8] = af[3];
            }
        }
    }
    __syncthreads();
    const int32_t nk = min(4, n_kc - (int32_t)blockIdx.y * 4) * 64; // valid columns of the tile
    for (int i = threadIdx.x; i < 16 * 32; i += 128) {
        const int row = i >> 5, c = i & 31;
        if (c * 8 < nk)
            *(uint4 *)(wd + (ot * 16 + row) * k_pad + (int64_t)blockIdx.y * 256 + c * 8) = *(const uint4 *)&tile[row][c * 8];
    }
}

// out[r][o] += bias[o]. Grid-stride over n_rows * n_out.
__global__ void gptq_bias_kernel(float *out, const float *__restrict__ bias, int64_t n_out, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] += bias[i % n_out];
}

// ---- upload ----

struct dev_plan {
    int64_t k_pad, n_kc, n_ot;
    size_t  off_sz, off_kbg, off_kcg, off_perm, off_cnt, total;
};

static struct dev_plan plan_of(const struct coopt_gptq_weight *hw) {
    struct dev_plan p;
    p.k_pad     = (hw->k_pad + 63) / 64 * 64;
    p.n_kc      = p.k_pad / 64;
    p.n_ot      = hw->n_sub;
    size_t qw   = (size_t)p.n_ot * (size_t)p.n_kc * 512;
    size_t szb  = (size_t)p.n_ot * (size_t)hw->n_groups * 16 * 4;
    size_t kbg  = (size_t)(p.k_pad / 32) * 4;
    size_t kcg  = (size_t)p.n_kc * 4;
    size_t perm = hw->perm ? (size_t)p.k_pad * 4 : 0;
    p.off_sz    = align256(qw);
    p.off_kbg   = p.off_sz + align256(szb);
    p.off_kcg   = p.off_kbg + align256(kbg);
    p.off_perm  = p.off_kcg + align256(kcg);
    p.off_cnt   = p.off_perm + align256(perm);
    p.total     = p.off_cnt + align256((size_t)p.n_ot * 4); // int8 GEMV split counters
    return p;
}

size_t cuda_gptq_dev_bytes(const struct coopt_gptq_weight *hw) { return plan_of(hw).total; }

void cuda_gptq_release(struct cuda_gptq_weight *dw) {
    if (!dw) return;
    if (dw->buf) CUDA_CHECK(cudaFree(dw->buf));
    memset(dw, 0, sizeof(*dw));
}

enum coopt_status cuda_gptq_upload(struct coopt_backend *be, const struct coopt_gptq_weight *hw,
                                   struct cuda_gptq_weight *dw) {
    memset(dw, 0, sizeof(*dw));
    struct cuda_backend *cb = cuda_impl(be);
    cudaStream_t         st = cb->stream;
    struct dev_plan      p  = plan_of(hw);
    // n_kc: grid.y of the dequantize kernel; n_groups: 16-bit fields of kc_grp
    if (p.n_ot > INT32_MAX / 2 || p.n_kc > 65535 * 4 || hw->n_out > INT32_MAX || hw->n_groups <= 0 || hw->n_groups > 65535)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "cuda: GPTQ weight [%lld,%lld] is too large for the kernels",
                          (long long)hw->n_out, (long long)hw->n_in);
    // staging: the host codes, scales and zeros as they are
    const size_t n_src_dw = (size_t)p.n_ot * (size_t)(hw->k_pad / 8) * 16;
    const size_t n_gs     = (size_t)p.n_ot * (size_t)hw->n_groups * 16;
    const size_t o_sc = align256(n_src_dw * 4), o_z = o_sc + align256(n_gs * 2), stage_bytes = o_z + align256(n_gs);
    uint32_t    *kcg  = (uint32_t *)coopt_malloc((size_t)p.n_kc * 4);
    int32_t     *kbg  = (int32_t *)coopt_malloc((size_t)(p.k_pad / 32) * 4);
    int32_t     *perm = hw->perm ? (int32_t *)coopt_malloc((size_t)p.k_pad * 4) : NULL;
    uint8_t     *stage = NULL, *buf = NULL;
    if (!kcg || !kbg || (hw->perm && !perm)) {
        free(kcg), free(kbg), free(perm);
        return coopt_fail(COOPT_ERR_NOMEM, "cuda: out of host memory repacking a GPTQ weight");
    }
    cudaError_t e = cudaMalloc((void **)&buf, p.total);
    if (e == cudaSuccess) e = cudaMalloc((void **)&stage, stage_bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (buf) cudaFree(buf);
        free(kcg), free(kbg), free(perm);
        return coopt_fail(COOPT_ERR_NOMEM, "cuda: out of GPU memory uploading a GPTQ weight [%lld,%lld] (%.1f MiB)",
                          (long long)hw->n_out, (long long)hw->n_in, (p.total + stage_bytes) / 1048576.0);
    }
    // group of every 32-row block; the blocks added here (rows k_pad_host .. k_pad) repeat the last
    int64_t nb_host = hw->k_pad / 32, nb = p.k_pad / 32;
    for (int32_t g = 0; g < hw->n_groups; g++)
        for (int64_t b = hw->grp_blk[g]; b < hw->grp_blk[g + 1]; b++) kbg[b] = g;
    for (int64_t b = nb_host; b < nb; b++) kbg[b] = nb_host > 0 ? kbg[nb_host - 1] : 0;
    for (int64_t c = 0; c < p.n_kc; c++) kcg[c] = (uint32_t)kbg[2 * c] | (uint32_t)kbg[2 * c + 1] << 16;
    uint64_t hash = 0;
    if (perm) {
        hash = 1469598103934665603ull; // FNV-1a over the padded order
        for (int64_t k = 0; k < p.k_pad; k++) {
            perm[k] = k < hw->k_pad ? hw->perm[k] : -1;
            hash    = (hash ^ (uint32_t)perm[k]) * 1099511628211ull;
        }
        hash = (hash ^ (uint64_t)p.k_pad) * 1099511628211ull;
        hash |= 1; // never 0 (the identity's)
    }
    enum coopt_status rc = COOPT_OK;
    // Pageable host sources: each copy is staged by the driver and done when the call returns.
    if (cudaMemcpyAsync(stage, hw->qw, n_src_dw * 4, cudaMemcpyHostToDevice, st) != cudaSuccess ||
        cudaMemcpyAsync(stage + o_sc, hw->scale, n_gs * 2, cudaMemcpyHostToDevice, st) != cudaSuccess ||
        cudaMemcpyAsync(stage + o_z, hw->zero, n_gs, cudaMemcpyHostToDevice, st) != cudaSuccess ||
        cudaMemcpyAsync(buf + p.off_kbg, kbg, (size_t)nb * 4, cudaMemcpyHostToDevice, st) != cudaSuccess ||
        cudaMemcpyAsync(buf + p.off_kcg, kcg, (size_t)p.n_kc * 4, cudaMemcpyHostToDevice, st) != cudaSuccess ||
        (perm && cudaMemcpyAsync(buf + p.off_perm, perm, (size_t)p.k_pad * 4, cudaMemcpyHostToDevice, st) != cudaSuccess) ||
        cudaMemsetAsync(buf + p.off_cnt, 0, (size_t)p.n_ot * 4, st) != cudaSuccess) {
        rc = coopt_fail(COOPT_ERR_NOMEM, "cuda: copying a GPTQ weight to the GPU failed (%s)",
                        cudaGetErrorName(cudaGetLastError()));
    } else {
        int64_t n_dw = p.n_ot * p.n_kc * 128;
        gptq_repack_kernel<<<cuda_grid_1d(n_dw, 256), 256, 0, st>>>((uint32_t *)buf, (const uint32_t *)stage,
                                                                     hw->k_pad, (int32_t)p.n_kc, n_dw);
        CUDA_CHECK_LAUNCH();
        gptq_sz_kernel<<<cuda_grid_1d((int64_t)n_gs, 256), 256, 0, st>>>(
            (uint32_t *)(buf + p.off_sz), (const uint16_t *)(stage + o_sc), stage + o_z, (int64_t)n_gs);
        CUDA_CHECK_LAUNCH();
        CUDA_CHECK(cudaStreamSynchronize(st));
    }
    CUDA_CHECK(cudaFree(stage));
    free(kcg), free(kbg), free(perm);
    if (rc != COOPT_OK) {
        CUDA_CHECK(cudaFree(buf));
        return rc;
    }
    dw->n_in      = hw->n_in;
    dw->n_out     = hw->n_out;
    dw->k_pad     = p.k_pad;
    dw->n_ot      = (int32_t)p.n_ot;
    dw->n_kc      = (int32_t)p.n_kc;
    dw->n_groups  = hw->n_groups;
    dw->direct    = !hw->perm && p.k_pad == hw->n_in;
    dw->perm_hash = hash;
    dw->qw        = buf;
    dw->sz        = (const uint32_t *)(buf + p.off_sz);
    dw->kb_grp    = (const int32_t *)(buf + p.off_kbg);
    dw->kc_grp    = (const uint32_t *)(buf + p.off_kcg);
    dw->perm      = hw->perm ? (const int32_t *)(buf + p.off_perm) : NULL;
    dw->cnt       = (int32_t *)(buf + p.off_cnt);
    dw->buf       = buf;
    dw->bytes     = p.total;
    return COOPT_OK;
}

// ---- launch options ----

// Process-wide choices (tests and the ablation; read from the environment on first use):
// which GEMV decode uses, and whether the int8 GEMV's kernels use programmatic dependent launch.
// Plain ints: written once (or by tests between calls), read on every matmul.
static int g_gemv_mode = CUDA_GPTQ_GEMV_MODE_DEFAULT; // set by cuda_gptq_set_gemv
static int g_gemv_env  = -1;                          // from $COOPT_GPTQ_GEMV, -1 = not read yet
static int64_t g_xstage_made = 0, g_xstage_used = 0; // launches that staged their output / used a staged input

void cuda_gptq_xstage_counts(int64_t *made, int64_t *used) { *made = g_xstage_made, *used = g_xstage_used; }

static int g_hgemv_regs = -1; // tensor-core GEMV register cap, 0 = automatic, -1 = $COOPT_GPTQ_HGEMV_REGS not read yet
static int g_pdl       = -1;                          // -1 = not read yet
static int g_pdl_fail  = 0;                           // a launch with it was refused: off for good

static uint32_t g_config_epoch = 0; // bumped by every set_* below (cuda_gptq_config_epoch)

uint32_t cuda_gptq_config_epoch(void) { return g_config_epoch; }

void cuda_gptq_set_gemv(enum cuda_gptq_gemv g) {
    g_gemv_mode = g;
    g_config_epoch++;
}

enum cuda_gptq_gemv cuda_gptq_get_gemv(void) {
    if (g_gemv_mode != CUDA_GPTQ_GEMV_MODE_DEFAULT) return (enum cuda_gptq_gemv)g_gemv_mode;
    if (g_gemv_env < 0) {
        const char *e = getenv("COOPT_GPTQ_GEMV");
        g_gemv_env    = GPTQ_GEMV_BUILTIN;
        if (e && strcmp(e, "f32") == 0) g_gemv_env = CUDA_GPTQ_GEMV_MODE_F32;
        else if (e && strcmp(e, "i8") == 0) g_gemv_env = CUDA_GPTQ_GEMV_MODE_I8;
        else if (e && strcmp(e, "h") == 0) g_gemv_env = CUDA_GPTQ_GEMV_MODE_H;
        else if (e && *e) coopt_log_error("COOPT_GPTQ_GEMV=%s: expected h, f32 or i8; using the default", e);
    }
    return (enum cuda_gptq_gemv)g_gemv_env;
}

void cuda_gptq_set_hgemv_regs(int regs) {
    g_hgemv_regs = regs == HG_REGS_HI || regs == HG_REGS_LO ? regs : regs < 0 ? -1 : 0;
    g_config_epoch++;
}

static int hgemv_regs_setting(void) {
    if (g_hgemv_regs < 0) {
        const char *e = getenv("COOPT_GPTQ_HGEMV_REGS");
        const int   r = e && *e ? atoi(e) : 0;
        if (e && *e && r != HG_REGS_HI && r != HG_REGS_LO)
            coopt_log_error("COOPT_GPTQ_HGEMV_REGS=%s: expected %d or %d; choosing automatically", e, HG_REGS_HI,
                            HG_REGS_LO);
        g_hgemv_regs = r == HG_REGS_HI || r == HG_REGS_LO ? r : 0;
    }
    return g_hgemv_regs;
}

void cuda_gptq_set_pdl(int on) {
    g_pdl = on < 0 ? -1 : on != 0;
    g_config_epoch++;
}

static bool pdl_enabled(const struct cuda_backend *cb) {
    if (g_pdl < 0) {
        const char *e = getenv("COOPT_GPTQ_PDL");
        g_pdl         = !(e && e[0] == '0');
    }
    return g_pdl && !g_pdl_fail && cb->cc_major >= 9; // (cuda_backend.cc_major: read at init, step.cu)
}

// Launches kern<<<grid, block, smem, st>>>(args...), with programmatic stream serialization when
// `pdl` (the kernel may start while the previous one in the stream finishes; it waits for it with
// griddepcontrol.wait before touching what that one writes). A launch refused with the
// attribute is retried without it, and PDL stays off for the process.
template <typename... P, typename... A>
static void launch_maybe_pdl(bool pdl, void (*kern)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                             A... args) {
    cudaError_t e = cuda_launch_pdl(pdl, kern, grid, block, smem, st, args...);
    if (e != cudaSuccess && pdl) {
        coopt_log_error("cuda: launch with programmatic dependent launch failed (%s); launching without it",
                        cudaGetErrorName(e));
        (void)cudaGetLastError();
        g_pdl_fail = 1;
        e          = cuda_launch_pdl(false, kern, grid, block, smem, st, args...);
    }
    CUDA_CHECK(e);
    CUDA_CHECK_LAUNCH();
}

// ---- launchers ----

template <int R, bool NORM>
static void gemv_launch_r(cudaStream_t st, bool pdl, const gemv_args &a, unsigned blocks, int nw) {
    const size_t smem = NORM ? (size_t)R * (size_t)a.n_kc * 64 * sizeof(float) : 0;
    switch (nw) {
    case 4: launch_maybe_pdl(pdl, gptq_gemv_kernel<R, 4, NORM>, dim3(blocks), dim3(4 * WARP_SIZE), smem, st, a); break;
    case 8: launch_maybe_pdl(pdl, gptq_gemv_kernel<R, 8, NORM>, dim3(blocks), dim3(8 * WARP_SIZE), smem, st, a); break;
    default: launch_maybe_pdl(pdl, gptq_gemv_kernel<R, 16, NORM>, dim3(blocks), dim3(16 * WARP_SIZE), smem, st, a); break;
    }
}

template <bool NORM> static void gemv_launch_n(cudaStream_t st, bool pdl, const gemv_args &a, unsigned blocks, int nw) {
    if (a.n_rows <= 1)
        gemv_launch_r<1, NORM>(st, pdl, a, blocks, nw);
    else if (a.n_rows <= 2)
        gemv_launch_r<2, NORM>(st, pdl, a, blocks, nw);
    else if (a.n_rows <= 4)
        gemv_launch_r<4, NORM>(st, pdl, a, blocks, nw);
    else
        gemv_launch_r<8, NORM>(st, pdl, a, blocks, nw);
}

static void gemv_launch(cudaStream_t st, bool pdl, const gemv_args &a, unsigned blocks, int nw) {
    if (a.norm)
        gemv_launch_n<true>(st, pdl, a, blocks, nw);
    else
        gemv_launch_n<false>(st, pdl, a, blocks, nw);
}

// Warps per GEMV block: more warps per tile when there are few tiles. Measured on an H100
// (docs/BENCHMARKS.md): with these choices every real shape ran within 2 % of its best block size.
static int gemv_auto_warps(const struct cuda_backend *cb, int64_t n_tiles) {
    if (n_tiles >= 4 * (int64_t)cb->n_sm) return 4;
    if (n_tiles >= 2 * (int64_t)cb->n_sm) return 8;
    return 16;
}

static void gather(cudaStream_t st, void *dst, bool half, const float *x, const struct cuda_gptq_weight *w,
                   int32_t n_rows) {
    int64_t n = (int64_t)n_rows * w->k_pad;
    if (half)
        gptq_gather_kernel<__half><<<cuda_grid_1d(n, 256), 256, 0, st>>>((__half *)dst, x, w->perm, w->n_in, w->k_pad, n);
    else
        gptq_gather_kernel<float><<<cuda_grid_1d(n, 256), 256, 0, st>>>((float *)dst, x, w->perm, w->n_in, w->k_pad, n);
    CUDA_CHECK_LAUNCH();
}

// The f32 GEMV over n weights of one input. mode: enum gemv_mode (swiglu: n == 2, outs[0] gets
// the result); norm (NULL = none): x is RMS-normed on the way in (every weight direct, x 16-byte
// aligned: checked by cuda_gptq_gemv_fused). nw: warps per block, 0 = automatic.
static void gemv_multi(struct cuda_backend *cb, int32_t n, float *const *outs, const float *x,
                       const struct cuda_gptq_weight *const *ws, const float *const *biases, int32_t n_rows, int nw,
                       int mode = GEMV_STORE, const float *norm = NULL, float eps = 0.0f) {
    const int64_t k_pad = ws[0]->k_pad, n_in = ws[0]->n_in;
    // distinct row orders that need a gathered copy of x (x read in place needs 8-byte pairs)
    const bool direct_ok = ((uintptr_t)x & 7) == 0;
    uint64_t   hashes[GPTQ_MAX_MULTI];
    int        n_h = 0, slot[GPTQ_MAX_MULTI];
    int64_t    tiles = 0;
    for (int32_t j = 0; j < n; j++) {
        COOPT_ASSERT(ws[j]->n_in == n_in && ws[j]->k_pad == k_pad);
        tiles += ws[j]->n_ot;
        slot[j] = -1;
        if (direct_ok && ws[j]->direct) continue;
        for (int h = 0; h < n_h; h++)
            if (hashes[h] == ws[j]->perm_hash) slot[j] = h;
        if (slot[j] < 0) hashes[n_h] = ws[j]->perm_hash, slot[j] = n_h++;
    }
    const size_t xp_bytes = align256((size_t)n_rows * (size_t)k_pad * 4);
    uint8_t     *wsp      = n_h ? (uint8_t *)cuda_workspace(cb, xp_bytes * n_h) : NULL;
    if (n_h && !wsp) return; // (out of memory: cb->op_error)
    for (int h = 0; h < n_h; h++)
        for (int32_t j = 0; j < n; j++)
            if (slot[j] == h) {
                gather(cb->stream, wsp + h * xp_bytes, false, x, ws[j], n_rows);
                break;
            }
    const int64_t blocks = mode == GEMV_SWIGLU ? ws[0]->n_ot : tiles;
    if (nw <= 0) nw = gemv_auto_warps(cb, blocks);
    const bool pdl = cb->pdl && pdl_enabled(cb);
    COOPT_ASSERT(!norm || n_h == 0);
    for (int32_t r0 = 0; r0 < n_rows; r0 += GPTQ_GEMV_MAX_ROWS) {
        gemv_args a;
        memset(&a, 0, sizeof(a));
        a.n      = n;
        a.mode   = mode;
        a.norm   = norm;
        a.eps    = eps;
        a.n_kc   = ws[0]->n_kc;
        a.n_rows = COOPT_MIN(GPTQ_GEMV_MAX_ROWS, n_rows - r0);
        int32_t end = 0;
        for (int32_t j = 0; j < n; j++) {
            const struct cuda_gptq_weight *w = ws[j];
            const float *xj = slot[j] < 0 ? x + (int64_t)r0 * n_in : (const float *)(wsp + slot[j] * xp_bytes) + (int64_t)r0 * k_pad;
            a.qw[j]       = (const uint4 *)w->qw;
            a.sz[j]       = w->sz;
            a.kb_grp[j]   = w->kb_grp;
            a.x[j]        = xj;
            a.bias[j]     = biases ? biases[j] : NULL;
            a.out[j]      = outs[j] + (int64_t)r0 * w->n_out;
            a.n_out[j]    = (int32_t)w->n_out;
            a.n_groups[j] = w->n_groups;
            end += w->n_ot;
            a.ot_end[j] = end;
        }
        // one stride for all: gathered copies are k_pad wide, and a direct weight has k_pad == n_in
        a.ldx = n_h ? k_pad : n_in;
        gemv_launch(cb->stream, pdl, a, (unsigned)blocks, nw);
    }
}

// ---- tensor-core GEMV: launcher ----

#define HG_MAX_SMEM (200 * 1024) // dynamic shared memory above which the tensor-core GEMV is not used

// The kernel instance for nw warps (4, 8, else 16), norm, swiglu and register cap (HG_REGS_HI,
// else HG_REGS_LO), with its index in [0, HG_INSTANCES) for the per-instance tables below.
#define HG_INSTANCES 24
typedef void (*hgemv_fn)(const hgemv_args);
#define HG_ROW(NW, R)                                                                                              \
    {{gptq_hgemv_kernel<NW, false, false, R>, gptq_hgemv_kernel<NW, false, true, R>},                               \
     {gptq_hgemv_kernel<NW, true, false, R>, gptq_hgemv_kernel<NW, true, true, R>}}
static hgemv_fn hgemv_instance(int nw, bool norm, bool sw, int regs, int *idx) {
    static const hgemv_fn k[2][3][2][2] = {
        {HG_ROW(4, HG_REGS_LO), HG_ROW(8, HG_REGS_LO), HG_ROW(16, HG_REGS_LO)},
        {HG_ROW(4, HG_REGS_HI), HG_ROW(8, HG_REGS_HI), HG_ROW(16, HG_REGS_HI)},
    };
    const int r = regs == HG_REGS_HI ? 1 : 0, w = nw == 4 ? 0 : nw == 8 ? 1 : 2;
    *idx        = ((r * 3 + w) * 2 + (norm ? 1 : 0)) * 2 + (sw ? 1 : 0);
    return k[r][w][norm ? 1 : 0][sw ? 1 : 0];
}
#undef HG_ROW

// Dynamic shared memory a launch of instance f may use on the device: HG_MAX_SMEM, or less where
// the device's per-block opt-in limit minus the instance's static shared memory is lower (A100:
// 163 KiB in all; sm_86 / sm_89: 99 KiB). The instance is opted in to that much, once per instance
// and device; 0 when the device cannot be queried or refuses. A test limit
// (cuda_gptq_set_hgemv_smem_limit) lowers it further.
static size_t g_hgemv_smem_test_limit = 0; // 0 = none
static size_t hgemv_smem_limit(hgemv_fn f, int idx, int device) {
    static size_t limit[HG_INSTANCES][64];
    static bool   have[HG_INSTANCES][64];
    const int     d = device >= 0 && device < 64 ? device : 0;
    if (!have[idx][d]) {
        int                optin = 0;
        cudaFuncAttributes fa;
        size_t             lim = 0;
        if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
            cudaFuncGetAttributes(&fa, f) == cudaSuccess && (size_t)optin > fa.sharedSizeBytes) {
            lim = COOPT_MIN((size_t)HG_MAX_SMEM, (size_t)optin - fa.sharedSizeBytes);
            if (cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)lim) != cudaSuccess) lim = 0;
        }
        static bool logged[64];
        if (!lim) (void)cudaGetLastError();
        if (!lim && !logged[d]) {
            coopt_log_error("cuda gptq: no shared memory opt-in for the tensor-core GEMV on device %d; "
                            "using the other GEMVs", device);
            logged[d] = true;
        }
        limit[idx][d] = lim, have[idx][d] = true;
    }
    return g_hgemv_smem_test_limit ? COOPT_MIN(limit[idx][d], g_hgemv_smem_test_limit) : limit[idx][d];
}

void cuda_gptq_set_hgemv_smem_limit(size_t bytes) {
    g_hgemv_smem_test_limit = bytes;
    g_config_epoch++;
}

// Dynamic shared memory of a launch: x, the scale/zero words of ng_smem groups and two weights'
// group words (the same for any block size).
static size_t hgemv_smem(int32_t n_rows, int64_t k_pad, int32_t ng_smem) {
    return (size_t)n_rows * (size_t)k_pad * 2 + (size_t)ng_smem * 64 + (size_t)(k_pad / 64) * 8;
}

// Blocks of the instance with `smem` bytes of dynamic shared memory that fit one SM of the device
// (registers, shared memory, warps), from the occupancy calculator; cached per instance and device
// for the last smem asked about. 0 when it cannot be had, or smem is over the instance's limit.
static int hgemv_blocks_per_sm(int nw, bool norm, bool sw, int regs, int device, size_t smem) {
    static size_t last_smem[HG_INSTANCES][64];
    static int    last_n[HG_INSTANCES][64];
    static bool   have[HG_INSTANCES][64];
    int            idx;
    const hgemv_fn f = hgemv_instance(nw, norm, sw, regs, &idx);
    const int      d = device >= 0 && device < 64 ? device : 0;
    if (smem > hgemv_smem_limit(f, idx, device)) return 0;
    if (!have[idx][d] || smem != last_smem[idx][d]) {
        int n = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, f, nw * WARP_SIZE, smem) != cudaSuccess)
            n = 0, (void)cudaGetLastError();
        last_smem[idx][d] = smem, last_n[idx][d] = n, have[idx][d] = true;
    }
    return last_n[idx][d];
}

// Warps per block and register cap of the tensor-core GEMV: the most warps (16, 8, 4) whose blocks
// all fit the GPU at once (one wave: a second, partial wave costs as much as the first), at the
// larger cap where that fits, else 4 warps at the smaller cap. Measured on an H100 (register-ring
// sweeps of 2026-11-23): a block size leaving part of the grid to later waves was 5-60 % slower;
// among single-wave choices the larger blocks (more warps per tile, fewer chunks each) were as
// fast or faster, and 80 registers faster than 72 -- except where a warp's range is under two
// turns of the register ring (fewer than 2 HG_RU chunks, e.g. llama2-7b's o projection at 16 warps:
// 4 chunks a warp, 6.3 -> 6.7 us), which 8- and 16-warp blocks skip. nw or regs forced (tests, the
// environment): only that block size or cap (72 meaning the low cap, 64 for the plain instances).
static void hgemv_auto_config(const struct cuda_backend *cb, int64_t blocks, int32_t n_kc, bool norm, bool sw,
                              size_t smem, int nw_forced, int regs_forced, int *nw, int *regs) {
    static const int cand[3] = {16, 8, 4}, caps[2] = {HG_REGS_HI, HG_REGS_LO};
    *nw = nw_forced ? nw_forced : 4, *regs = regs_forced ? regs_forced : HG_REGS_LO;
    for (int i = 0; i < 3; i++)
        for (int r = 0; r < 2; r++) {
            if ((nw_forced && cand[i] != nw_forced) || (regs_forced && caps[r] != regs_forced)) continue;
            // fewer than two turns of the ring a warp: the prologue's latency is not amortized
            if (!nw_forced && cand[i] > 4 && (sw ? 2 : 1) * ((n_kc + cand[i] - 1) / cand[i]) < HG_MIN_TURNS * HG_RU) continue;
            if (blocks <= (int64_t)hgemv_blocks_per_sm(cand[i], norm, sw, caps[r], cb->device, smem) * cb->n_sm) {
                *nw = cand[i], *regs = caps[r];
                return;
            }
        }
}

// The tensor-core GEMV over n weights of one input, 1-8 rows, one launch. Returns false (nothing
// enqueued) when it does not apply: more than one act-order permutation among the weights, norm
// with a non-direct weight or unaligned x, or more shared memory than the device gives a block.
// mode, norm, eps: as gemv_multi; nw: warps per block (4, 8 or 16; 0 = automatic) | register cap
// << 8 (0 = the process-wide setting).
static bool hgemv_multi(struct cuda_backend *cb, int32_t n, float *const *outs, const float *x,
                        const struct cuda_gptq_weight *const *ws, const float *const *biases, int32_t n_rows, int nw,
                        int mode, const float *norm, float eps, struct cuda_gptq_xstage *xst) {
    const int64_t k_pad = ws[0]->k_pad, n_in = ws[0]->n_in;
    if (n_rows < 1 || n_rows > HG_ROWS || n < 1 || n > GPTQ_MAX_MULTI) return false;
    bool    direct = ((uintptr_t)x & 15) == 0 && (n_in & 3) == 0;
    int64_t tiles  = 0;
    for (int32_t j = 0; j < n; j++) {
        if (ws[j]->n_in != n_in || ws[j]->k_pad != k_pad || ws[j]->perm_hash != ws[0]->perm_hash) return false;
        direct = direct && ws[j]->direct;
        tiles += ws[j]->n_ot;
    }
    if (norm && (!direct || ((uintptr_t)norm & 15) != 0)) return false;
    const int64_t blocks = mode == GEMV_SWIGLU ? ws[0]->n_ot : tiles;
    int32_t       ng_smem = 0;
    for (int32_t j = 0; j < n; j++)
        ng_smem = mode == GEMV_SWIGLU ? ng_smem + ws[j]->n_groups : COOPT_MAX(ng_smem, ws[j]->n_groups);
    const size_t smem = hgemv_smem(n_rows, k_pad, ng_smem);
    if (smem > HG_MAX_SMEM || blocks > INT32_MAX) return false;
    int regs = (nw >> 8) & 0xff;
    if (!regs) regs = hgemv_regs_setting();
    if (regs && regs != HG_REGS_HI) regs = HG_REGS_LO;
    nw &= 0xff;
    if (nw > 0 && nw != 4 && nw != 8) nw = 16; // (the instances there are)
    hgemv_auto_config(cb, blocks, ws[0]->n_kc, norm != NULL, mode == GEMV_SWIGLU, smem, nw, regs, &nw, &regs);
    int            idx;
    const hgemv_fn f = hgemv_instance(nw, norm != NULL, mode == GEMV_SWIGLU, regs, &idx);
    if (smem > hgemv_smem_limit(f, idx, cb->device)) return false; // (before anything is enqueued)
    hgemv_args a;
    memset(&a, 0, sizeof(a));
    if (direct) {
        a.x = x, a.ldx = n_in;
    } else { // one gathered copy, k_pad wide with zero padding rows
        float *xp = (float *)cuda_workspace(cb, (size_t)n_rows * (size_t)k_pad * 4);
        if (!xp) return true; // handled: out of memory (cb->op_error)
        gather(cb->stream, xp, false, x, ws[0], n_rows);
        a.x = xp, a.ldx = k_pad;
    }
    a.norm = norm, a.eps = eps, a.n_in = (int32_t)n_in;
    a.n = n, a.n_kc = ws[0]->n_kc, a.n_rows = n_rows, a.mode = mode, a.ng_smem = ng_smem;
    if (xst && xst->in && n_rows == 1 && direct && xst->n_in == k_pad) {
        a.xi = (const uint4 *)xst->in, a.xi_part = (const float2 *)((const uint8_t *)xst->in + cuda_gptq_xstage_part(k_pad));
        g_xstage_used++;
    }
    // (a consumer's n_in is its k_pad, a multiple of 64: other lengths would never be read)
    if (xst && xst->out && n_rows == 1 && (mode == GEMV_ACCUMULATE || mode == GEMV_SWIGLU) &&
        ws[0]->n_out % 64 == 0 && cuda_gptq_xstage_bytes(ws[0]->n_out) <= xst->out_bytes) {
        a.xo      = (__half *)xst->out;
        a.xo_part = (float2 *)((uint8_t *)xst->out + cuda_gptq_xstage_part(ws[0]->n_out));
        a.xo_norm = xst->out_norm;
        xst->staged = true, g_xstage_made++;
    }
    int32_t end = 0;
    for (int32_t j = 0; j < n; j++) {
        a.qw[j]       = (const uint4 *)ws[j]->qw;
        a.sz[j]       = ws[j]->sz;
        a.kc_grp[j]   = ws[j]->kc_grp;
        a.bias[j]     = biases ? biases[j] : NULL;
        a.out[j]      = outs[j];
        a.n_out[j]    = (int32_t)ws[j]->n_out;
        a.n_groups[j] = ws[j]->n_groups;
        end += ws[j]->n_ot;
        a.ot_end[j] = end;
    }
    launch_maybe_pdl(cb->pdl && pdl_enabled(cb), f, dim3((unsigned)blocks), dim3((unsigned)(nw * WARP_SIZE)), smem,
                     cb->stream, a);
    return true;
}

bool cuda_gptq_gemv_fused(struct coopt_backend *be, enum cuda_gptq_fused mode, int32_t n, float *const *outs,
                          const float *x, const float *norm, float eps, const struct cuda_gptq_weight *const *ws,
                          const float *const *biases, int32_t n_rows, struct cuda_gptq_xstage *xst) {
    if (n < 1 || n > GPTQ_MAX_MULTI) return false;
    if (mode == CUDA_GPTQ_FUSED_SWIGLU && (n != 2 || ws[1]->n_out != ws[0]->n_out)) return false;
    if (mode == CUDA_GPTQ_FUSED_ADD && n != 1) return false;
    for (int32_t j = 0; j < n; j++)
        if (ws[j]->n_in != ws[0]->n_in || ws[j]->k_pad != ws[0]->k_pad) return false;
    const int m = mode == CUDA_GPTQ_FUSED_SWIGLU ? GEMV_SWIGLU : mode == CUDA_GPTQ_FUSED_ADD ? GEMV_ACCUMULATE : GEMV_STORE;
    struct cuda_backend *cb = cuda_impl(be);
    switch (cuda_gptq_auto_path(ws[0], n_rows)) {
    case CUDA_GPTQ_HGEMV: return hgemv_multi(cb, n, outs, x, ws, biases, n_rows, 0, m, norm, eps, xst);
    case CUDA_GPTQ_GEMV: {
        // the f32 GEMV at one row; with norm: direct weights, x and norm read in place as float4,
        // x * norm staged in 48 KiB of shared memory at most
        if (n_rows != 1) return false;
        if (norm) {
            bool ok = ((uintptr_t)x & 15) == 0 && ((uintptr_t)norm & 15) == 0 && ws[0]->k_pad * 4 <= 48 * 1024;
            for (int32_t j = 0; j < n; j++) ok = ok && ws[j]->direct;
            if (!ok) return false;
        }
        gemv_multi(cb, n, outs, x, ws, biases, n_rows, 0, m, norm, eps);
        return true;
    }
    default: return false; // the composed op (int8 GEMV, tensor-core kernel, cuBLAS)
    }
}

// ---- int8 GEMV: options, launch configuration, launcher ----

// Warps per block (4, 8 or 16) and K splits for `tiles` column tiles of n_kc chunks. param: warps
// in the low byte and splits above it, 0 = automatic: no K split, 8 warps per tile, 16 when there
// are fewer tiles than SMs. From the H100 sweep at 1 row (docs/BENCHMARKS.md): with 8 warps, 2
// K splits made 8 of the 9 real shapes 4-29 % slower and 8 splits 9-119 % (1024x4096 gained
// 4-18 %), and this choice ran within 6 % of the best of the 9 configurations on every shape
// (1024x4096: 16 warps, the best).
static void i8_config(const struct cuda_backend *cb, int64_t tiles, int32_t n_kc, int param, int *nw, int *n_split) {
    int w = param & 0xff, s = param >> 8;
    if (w != 4 && w != 8 && w != 16) w = tiles < cb->n_sm ? 16 : 8;
    if (s <= 0) s = 1;
    s = (int)COOPT_MAX(1, COOPT_MIN(s, n_kc));
    const int32_t kc_per = (n_kc + s - 1) / s;
    *nw = w, *n_split = (n_kc + kc_per - 1) / kc_per; // no empty split
}

void cuda_gptq_i8_auto_config(struct coopt_backend *be, int64_t tiles, int32_t n_kc, int *nw, int *n_split) {
    i8_config(cuda_impl(be), tiles, n_kc, 0, nw, n_split);
}

static void i8_multi(struct cuda_backend *cb, int32_t n, float *const *outs, const float *x,
                     const struct cuda_gptq_weight *const *ws, const float *const *biases, int32_t n_rows, int param) {
    const int64_t k_pad = ws[0]->k_pad, n_in = ws[0]->n_in;
    const int32_t n_kc = ws[0]->n_kc, nblk = (int32_t)(k_pad / 32), n_rg = (n_rows + I8_ROWS - 1) / I8_ROWS;
    // one quantized x per distinct row order (0: the identity, padded or not)
    uint64_t       hashes[GPTQ_MAX_MULTI];
    const int32_t *perms[GPTQ_MAX_MULTI];
    int            n_h = 0, slot[GPTQ_MAX_MULTI];
    int64_t        tiles = 0;
    for (int32_t j = 0; j < n; j++) {
        COOPT_ASSERT(ws[j]->n_in == n_in && ws[j]->k_pad == k_pad);
        tiles += ws[j]->n_ot;
        slot[j] = -1;
        for (int h = 0; h < n_h; h++)
            if (hashes[h] == ws[j]->perm_hash) slot[j] = h;
        if (slot[j] < 0) hashes[n_h] = ws[j]->perm_hash, perms[n_h] = ws[j]->perm, slot[j] = n_h++;
    }
    int nw, n_split;
    i8_config(cb, tiles, n_kc, param, &nw, &n_split);
    const size_t xq_bytes = align256((size_t)n_rows * (size_t)k_pad);
    const size_t xs_bytes = align256((size_t)n_rg * (size_t)nblk * I8_ROWS * sizeof(int2));
    const size_t pt_bytes = n_split > 1 ? (size_t)tiles * (size_t)n_split * I8_ROWS * 16 * 4 : 0;
    uint8_t     *wsp      = (uint8_t *)cuda_workspace(cb, (size_t)n_h * (xq_bytes + xs_bytes) + pt_bytes);
    if (!wsp) return; // (out of memory: cb->op_error)
    const bool   pdl      = pdl_enabled(cb);
    for (int h = 0; h < n_h; h++) {
        uint8_t      *base = wsp + (size_t)h * (xq_bytes + xs_bytes);
        const int64_t n_w  = (int64_t)n_rg * I8_ROWS * nblk; // warps
        launch_maybe_pdl(pdl, gptq_quant_x_kernel, dim3(cuda_grid_1d(n_w * WARP_SIZE, 256)), dim3(256), 0, cb->stream,
                         (int8_t *)base, (int2 *)(base + xq_bytes), x, perms[h], n_in, k_pad, nblk, n_rows,
                         n_rg * I8_ROWS);
    }
    for (int32_t rg = 0; rg < n_rg; rg++) {
        i8_args a;
        memset(&a, 0, sizeof(a));
        a.n       = n;
        a.n_kc    = n_kc;
        a.n_rows  = COOPT_MIN(I8_ROWS, n_rows - rg * I8_ROWS);
        a.n_split = n_split;
        a.kc_per  = (n_kc + n_split - 1) / n_split;
        a.part    = n_split > 1 ? (float *)(wsp + (size_t)n_h * (xq_bytes + xs_bytes)) : NULL;
        int32_t end = 0;
        for (int32_t j = 0; j < n; j++) {
            const struct cuda_gptq_weight *w    = ws[j];
            uint8_t                       *base = wsp + (size_t)slot[j] * (xq_bytes + xs_bytes);
            a.qw[j]       = (const uint4 *)w->qw;
            a.sz[j]       = w->sz;
            a.kc_grp[j]   = w->kc_grp;
            a.xq[j]       = (const int8_t *)base + (int64_t)rg * I8_ROWS * k_pad;
            a.xs[j]       = (const int2 *)(base + xq_bytes) + (int64_t)rg * nblk * I8_ROWS;
            a.bias[j]     = biases ? biases[j] : NULL;
            a.out[j]      = outs[j] + (int64_t)rg * I8_ROWS * w->n_out;
            a.cnt[j]      = w->cnt;
            a.n_out[j]    = (int32_t)w->n_out;
            a.n_groups[j] = w->n_groups;
            end += w->n_ot;
            a.ot_end[j] = end;
        }
        const dim3 grid((unsigned)end, (unsigned)n_split);
        switch (nw) {
        case 4: launch_maybe_pdl(pdl, gptq_i8_gemv_kernel<4>, grid, dim3(4 * WARP_SIZE), 0, cb->stream, a); break;
        case 16: launch_maybe_pdl(pdl, gptq_i8_gemv_kernel<16>, grid, dim3(16 * WARP_SIZE), 0, cb->stream, a); break;
        default: launch_maybe_pdl(pdl, gptq_i8_gemv_kernel<8>, grid, dim3(8 * WARP_SIZE), 0, cb->stream, a); break;
        }
    }
}

template <int BN>
static void mma_launch_bn(cudaStream_t st, dim3 grid, float *out, float *part, const __half *xp,
                          const struct cuda_gptq_weight *w, const float *bias, int32_t n_rows, int32_t kc_per) {
    gptq_mma_kernel<BN><<<grid, GPTQ_MMA_WARPS * WARP_SIZE, 0, st>>>(out, part, xp, (const uint4 *)w->qw, w->sz, w->kc_grp,
                                                                      bias, (int32_t)w->n_out, w->n_ot, w->n_kc,
                                                                      w->n_groups, n_rows, kc_per);
    CUDA_CHECK_LAUNCH();
}

// param: tokens per block in the low byte (16, 32, 64, 128; 0 = the smallest that covers n_rows,
// at most 128), K splits above it (0 = enough blocks for ~3 per SM, each split >= 2 chunks).
static void mma_launch(struct cuda_backend *cb, float *out, const float *x, const struct cuda_gptq_weight *w,
                       const float *bias, int32_t n_rows, int param) {
    int bn = param & 0xff, n_split = param >> 8;
    if (bn <= 0) bn = n_rows <= 16 ? 16 : n_rows <= 32 ? 32 : n_rows <= 64 ? 64 : 128;
    const int64_t col_blocks = (w->n_ot + GPTQ_MMA_WARPS - 1) / GPTQ_MMA_WARPS, row_blocks = (n_rows + bn - 1) / bn;
    if (n_split <= 0) n_split = (int)COOPT_MIN((int64_t)32, (3 * (int64_t)cb->n_sm + col_blocks * row_blocks - 1) / (col_blocks * row_blocks));
    n_split = (int)COOPT_MAX(1, COOPT_MIN((int64_t)n_split, (int64_t)w->n_kc / 2));
    const int32_t kc_per = (w->n_kc + n_split - 1) / n_split;
    n_split = (w->n_kc + kc_per - 1) / kc_per; // no empty split
    const size_t xp_bytes = align256((size_t)n_rows * (size_t)w->k_pad * 2);
    const size_t pt_bytes = n_split > 1 ? (size_t)n_split * (size_t)n_rows * (size_t)w->n_out * 4 : 0;
    uint8_t     *wsp      = (uint8_t *)cuda_workspace(cb, xp_bytes + pt_bytes);
    if (!wsp) return; // (out of memory: cb->op_error)
    __half      *xp = (__half *)wsp;
    float       *part = n_split > 1 ? (float *)(wsp + xp_bytes) : NULL;
    gather(cb->stream, xp, true, x, w, n_rows);
    dim3 grid((unsigned)col_blocks, (unsigned)row_blocks, (unsigned)n_split);
    switch (bn) {
    case 16: mma_launch_bn<16>(cb->stream, grid, out, part, xp, w, bias, n_rows, kc_per); break;
    case 32: mma_launch_bn<32>(cb->stream, grid, out, part, xp, w, bias, n_rows, kc_per); break;
    case 64: mma_launch_bn<64>(cb->stream, grid, out, part, xp, w, bias, n_rows, kc_per); break;
    default: mma_launch_bn<128>(cb->stream, grid, out, part, xp, w, bias, n_rows, kc_per); break;
    }
    if (part) {
        int64_t n = (int64_t)n_rows * w->n_out;
        gptq_splitk_reduce_kernel<<<cuda_grid_1d(n, 256), 256, 0, cb->stream>>>(out, part, bias, w->n_out, n, n_split);
        CUDA_CHECK_LAUNCH();
    }
}

static void cublas_launch(struct cuda_backend *cb, float *out, const float *x, const struct cuda_gptq_weight *w,
                          const float *bias, int32_t n_rows) {
    const size_t xp_bytes = align256((size_t)n_rows * (size_t)w->k_pad * 2);
    const size_t wd_bytes = (size_t)w->n_ot * 16 * (size_t)w->k_pad * 2;
    uint8_t     *wsp      = (uint8_t *)cuda_workspace(cb, xp_bytes + wd_bytes);
    if (!wsp) return; // (out of memory: cb->op_error)
    __half      *xp = (__half *)wsp, *wd = (__half *)(wsp + xp_bytes);
    gather(cb->stream, xp, true, x, w, n_rows);
    dim3 grid((unsigned)w->n_ot, (unsigned)((w->n_kc + 3) / 4));
    gptq_dequant_kernel<<<grid, 128, 0, cb->stream>>>(wd, (const uint4 *)w->qw, w->sz, w->kc_grp, w->n_kc, w->n_groups);
    CUDA_CHECK_LAUNCH();
    const float one = 1.0f, zero = 0.0f;
    // Column-major view as in matmul.cu: out^T [n_out x n_rows] = wd (row-major [o][k], OP_T) x xp^T
    CUBLAS_CHECK(cublasGemmEx(cb->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)w->n_out, n_rows, (int)w->k_pad, &one, wd,
                              CUDA_R_16F, (int)w->k_pad, xp, CUDA_R_16F, (int)w->k_pad, &zero, out, CUDA_R_32F,
                              (int)w->n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (bias) {
        int64_t nt = (int64_t)n_rows * w->n_out;
        gptq_bias_kernel<<<cuda_grid_1d(nt, 256), 256, 0, cb->stream>>>(out, bias, w->n_out, nt);
        CUDA_CHECK_LAUNCH();
    }
}

enum cuda_gptq_path cuda_gptq_auto_path(const struct cuda_gptq_weight *w, int32_t n_rows) {
    const enum cuda_gptq_gemv g = cuda_gptq_get_gemv();
    if (n_rows <= GPTQ_I8_MAX_ROWS && g == CUDA_GPTQ_GEMV_MODE_I8) return CUDA_GPTQ_GEMV_I8;
    // (1 row: at 2-8 rows the per-row x staging made it slower than the MMA kernel on most real
    // shapes, docs/BENCHMARKS.md; the path still takes up to 8 when asked for)
    // (the largest launch: swiglu, two weights of this shape)
    if (n_rows == 1 && g == CUDA_GPTQ_GEMV_MODE_H && hgemv_smem(n_rows, w->k_pad, 2 * w->n_groups) <= HG_MAX_SMEM)
        return CUDA_GPTQ_HGEMV;
    if (n_rows < GPTQ_MMA_MIN_ROWS) return CUDA_GPTQ_GEMV;
    // cuBLAS takes int dimensions, and the f16 scratch matrix stays under 16 GiB
    if (n_rows < GPTQ_CUBLAS_MIN_ROWS || w->k_pad > INT32_MAX || (int64_t)w->n_ot * 16 * w->k_pad > ((int64_t)1 << 33))
        return CUDA_GPTQ_MMA;
    return CUDA_GPTQ_CUBLAS;
}

void cuda_gptq_matmul_path(struct coopt_backend *be, float *out, const float *x, const struct cuda_gptq_weight *w,
                           const float *bias, int32_t n_rows, enum cuda_gptq_path path, int param) {
    if (n_rows <= 0 || w->n_out <= 0) return;
    struct cuda_backend *cb = cuda_impl(be);
    if (path == CUDA_GPTQ_AUTO) path = cuda_gptq_auto_path(w, n_rows);
    switch (path) {
    case CUDA_GPTQ_GEMV: {
        float *outs[1] = {out};
        const struct cuda_gptq_weight *ws[1] = {w};
        const float *bs[1] = {bias};
        gemv_multi(cb, 1, outs, x, ws, bs, n_rows, param);
        break;
    }
    case CUDA_GPTQ_HGEMV: {
        float *outs[1] = {out};
        const struct cuda_gptq_weight *ws[1] = {w};
        const float *bs[1] = {bias};
        if (hgemv_multi(cb, 1, outs, x, ws, bs, n_rows, param, GEMV_STORE, NULL, 0.0f, NULL)) break;
        if (n_rows == 1) gemv_multi(cb, 1, outs, x, ws, bs, n_rows, 0); // (shared memory: k_pad too large)
        else mma_launch(cb, out, x, w, bias, n_rows, 0);
        break;
    }
    case CUDA_GPTQ_GEMV_I8: {
        float *outs[1] = {out};
        const struct cuda_gptq_weight *ws[1] = {w};
        const float *bs[1] = {bias};
        i8_multi(cb, 1, outs, x, ws, bs, n_rows, param);
        break;
    }
    case CUDA_GPTQ_MMA:
        for (int32_t r0 = 0; r0 < n_rows; r0 += 65535 * 16) // grid.y limit at 16 tokens per block
            mma_launch(cb, out + (int64_t)r0 * w->n_out, x + (int64_t)r0 * w->n_in, w, bias,
                       COOPT_MIN(65535 * 16, n_rows - r0), param);
        break;
    default: cublas_launch(cb, out, x, w, bias, n_rows); break;
    }
}

void cuda_gptq_matmul(struct coopt_backend *be, float *out, const float *x, const struct cuda_gptq_weight *w,
                      const float *bias, int32_t n_rows) {
    cuda_gptq_matmul_path(be, out, x, w, bias, n_rows, CUDA_GPTQ_AUTO, 0);
}

void cuda_gptq_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                            const struct cuda_gptq_weight *const *ws, const float *const *biases, int32_t n_rows) {
    COOPT_ASSERT(n >= 1 && n <= GPTQ_MAX_MULTI);
    if (n_rows <= 0) return;
    bool same = true;
    for (int32_t j = 1; j < n; j++) same = same && ws[j]->n_in == ws[0]->n_in && ws[j]->k_pad == ws[0]->k_pad;
    COOPT_ASSERT(same);
    if (n_rows <= GPTQ_I8_MAX_ROWS && cuda_gptq_get_gemv() == CUDA_GPTQ_GEMV_MODE_I8) {
        i8_multi(cuda_impl(be), n, outs, x, ws, biases, n_rows, 0);
        return;
    }
    if (cuda_gptq_auto_path(ws[0], n_rows) == CUDA_GPTQ_HGEMV &&
        hgemv_multi(cuda_impl(be), n, outs, x, ws, biases, n_rows, 0, GEMV_STORE, NULL, 0.0f, NULL))
        return;
    if (n_rows < GPTQ_MMA_MIN_ROWS) {
        gemv_multi(cuda_impl(be), n, outs, x, ws, biases, n_rows, 0);
        return;
    }
    for (int32_t j = 0; j < n; j++) cuda_gptq_matmul(be, outs[j], x, ws[j], biases ? biases[j] : NULL, n_rows);
}

// ---- bench helper ----

double cuda_bench_graph(struct coopt_backend *be, void (*fn)(void *arg, int i), void *arg, int reps) {
    struct cuda_backend *cb = cuda_impl(be);
    cudaStream_t         st = cb->stream;
    cudaGraph_t          g  = NULL;
    cudaGraphExec_t      ge = NULL;
    cudaEvent_t          e0 = NULL, e1 = NULL;
    double               us = -1.0;
    fn(arg, 0); // grows workspaces outside the capture
    CUDA_CHECK(cudaStreamSynchronize(st));
    cudaError_t e = cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed);
    if (e == cudaSuccess) {
        for (int i = 0; i < reps; i++) fn(arg, i);
        e = cudaStreamEndCapture(st, &g);
    }
    if (e == cudaSuccess) e = cudaGraphInstantiate(&ge, g, 0);
    if (e == cudaSuccess) e = cudaGraphLaunch(ge, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);
    if (e == cudaSuccess) e = cudaEventCreate(&e0);
    if (e == cudaSuccess) e = cudaEventCreate(&e1);
    const int launches = 3;
    if (e == cudaSuccess) e = cudaEventRecord(e0, st);
    for (int i = 0; i < launches && e == cudaSuccess; i++) e = cudaGraphLaunch(ge, st);
    if (e == cudaSuccess) e = cudaEventRecord(e1, st);
    if (e == cudaSuccess) e = cudaEventSynchronize(e1);
    float ms = 0.0f;
    if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, e0, e1);
    if (e == cudaSuccess)
        us = 1000.0 * ms / (launches * reps);
    else
        coopt_log_error("cuda_bench_graph: %s", cudaGetErrorName(e));
    (void)cudaGetLastError();
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (ge) cudaGraphExecDestroy(ge);
    if (g) cudaGraphDestroy(g);
    return us;
}
