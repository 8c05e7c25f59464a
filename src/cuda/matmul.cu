/*
 * matmul.cu -- out[r][o] = sum_i x[r][i] * W[o][i] (+ bias[o]) for W in F32, F16, BF16, Q8_0, Q4_0
 * (GGML block layout, used in place), x and out f32 row-major; and the fused forms of backend.h:
 * matmul_multi (q/k/v of one input in one launch), matmul_swiglu (silu(x·Wg) * (x·Wu) in one
 * launch), matmul_add (out += x·W, the residual add in the GEMV's store).
 *
 * Two paths:
 *   - gemv_kernel (every type; all of Q8_0/Q4_0): decode-sized batches. One launch covers up to
 *     GEMV_MAX_SEG weight matrices of equal type and n_in ("segments", q/k/v). A warp owns a
 *     task = two weight rows: rows o, o+1 of one segment (store / accumulate modes), or row o of
 *     the gate and of the up matrix (swiglu mode). It streams both rows once per group of NR
 *     activation rows and keeps 2 x NR f32 accumulators per lane; two independent weight streams
 *     per warp and an unrolled loop keep enough bytes in flight at batch 1, and each x load feeds
 *     two rows.
 *       F32/F16/BF16: 16-byte weight loads (ld.global.nc.L1::no_allocate: weights are read once,
 *       x stays in L1) when n_in % (16 / elem) == 0 so every row starts 16-byte aligned; element
 *       loads otherwise. f32 math against f32 x.
 *       Q8_0/Q4_0: x is first quantized to int8 blocks of 32 with an f32 scale (quant_x_kernel:
 *       d = amax / 127, round to nearest even, the CPU fast path's activations) and each block
 *       product is an exact int32 dp4a dot scaled by d_w * d_x. Weight blocks (34 / 18 bytes,
 *       only 2-byte aligned) are staged per warp through shared memory, 32 blocks per row at a
 *       time, double-buffered with cp.async 16-byte copies when rows are a multiple of 16 bytes
 *       (n_in % 256 == 0: every real model), 2-byte copies otherwise; lane i then reads block i
 *       as aligned 32-bit words (funnel-shifted by 2 bytes for odd blocks). x traffic per weight
 *       byte is ~1 (int8 x) instead of 4-8 (f32 x): the old kernel was bound by it.
 *       NOTE: int8 activations move each x element by at most amax(block) / 254, a relative error
 *       of ~0.4 % of sum|w*x| at worst (matmul_cpu.c makes the same trade; tests check the bound).
 *     Grid: (ceil(n_tasks / GEMV_WARPS)); Block: GEMV_WARPS * 32 threads, warp w of block b runs
 *     task b * GEMV_WARPS + w. Shared memory (quantized only): 2 buffers x 2 rows x (32 blocks +
 *     16 bytes) per warp, 17.3 KiB per block for Q8_0.
 *   - cuBLAS (F16/BF16 for n_rows > 2, F32 for n_rows > 8): F32 through cublasSgemm (no TF32);
 *     F16/BF16 convert x into the weight's type in the backend workspace, then cublasGemmEx with
 *     f32 accumulation and f32 output (beta = 1 for matmul_add). The rounding of x to 16 bits is
 *     the only extra error (2^-11 relative for F16, 2^-8 for BF16, per element).
 *   Quantized prefill loops the GEMV over groups of 8 rows: correct, not yet fast (TODO(cuda): a
 *   tensor-core GEMM or dequantize-to-F16 + cuBLAS for large n_rows).
 *   Weight types the GEMV does not know (e.g. GPTQ, added to cuda_matmul elsewhere) make the
 *   fused ops fall back to cuda_matmul per weight plus the element-wise ops.
 *
 * Measured on an H100 before this version (W [32768][4096], 1 row): F16/BF16 2.86 TB/s, F32
 * 2.94 TB/s; Q8_0 0.86 TB/s, Q4_0 0.49 TB/s (f32 x re-read per block). Current figures:
 * docs/BENCHMARKS.md.
 */
#include "cuda/common.cuh"
#include "cuda/gptq_dev.h"

#include <string.h>

TRACE_TU(matmul)

#define GEMV_WARPS   4
#define GEMV_MAX_SEG 4

enum gemv_mode { GEMV_STORE = 0, GEMV_ACCUMULATE = 1, GEMV_SWIGLU = 2 };

struct gemv_seg {
    const uint8_t *w;     // [n_out][row_bytes]
    const float   *bias;  // [n_out] or NULL
    float         *out;   // [n_rows][n_out]
    int32_t        n_out;
    int32_t        task0; // first task of this segment
};

struct gemv_args {
    struct gemv_seg seg[GEMV_MAX_SEG]; // swiglu: seg[0] gate (its out receives the result), seg[1] up
    int32_t         n_seg, n_tasks, mode;
    int32_t         rows_per_task; // store / accumulate: 1 or 2 rows of a segment per warp
    int32_t         n_rows;
    int64_t         n_in;
    size_t          row_bytes;
    const float    *x;    // [n_rows][n_in] f32 (F32/F16/BF16 weights)
    const float    *norm; // [n_in] RMS norm weights applied to x on the fly (NORM kernels), else NULL
    float           eps;
    const int8_t   *xq;   // [n_rows][n_in] int8 (Q8_0/Q4_0 weights; any norm already applied)
    const float2   *xds;  // [n_rows][n_in / 32] (d, sum of the block's int8 values)
};

// ---- loads ----

// 16 bytes of weights: read once, so kept out of L1 (where x lives).
__device__ __forceinline__ uint4 ldg_stream16(const void *p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// 8 (F16/BF16) or 4 (F32) weights of a 16-byte load as f32.
template <int T> __device__ __forceinline__ void unpack16(uint4 u, float *w) {
    uint32_t p[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        if constexpr (T == COOPT_DTYPE_F32) {
            w[k] = __uint_as_float(p[k]);
        } else if constexpr (T == COOPT_DTYPE_F16) {
            w[2 * k]     = f16_bits_to_f32((uint16_t)(p[k] & 0xffff));
            w[2 * k + 1] = f16_bits_to_f32((uint16_t)(p[k] >> 16));
        } else {
            w[2 * k]     = __uint_as_float(p[k] << 16);
            w[2 * k + 1] = __uint_as_float(p[k] & 0xffff0000u);
        }
    }
}

// ---- dense rows (F32/F16/BF16) ----

// acc[0][j] += wa · x[j], and with TWO acc[1][j] += wb · x[j], for the NR rows xr[j]. NORM: x[j]
// is taken times g elementwise, and ss[j] accumulates this lane's share of sum x[j]^2 (the RMS
// norm's 1/rms is applied to the finished dot products).
template <int T, int NR, bool VEC, bool NORM, bool TWO>
__device__ __forceinline__ void dot2_dense(const uint8_t *__restrict__ wa, const uint8_t *__restrict__ wb,
                                           const float *const (&xr)[NR], const float *__restrict__ g, int64_t n_in,
                                           int lane, float (&acc)[2][NR], float (&ss)[NR]) {
    if constexpr (VEC) {
        constexpr int E = T == COOPT_DTYPE_F32 ? 4 : 8; // elements per 16 bytes
        constexpr int U = NR <= 2 ? 4 : 2;              // 16-byte loads per row in flight per lane
        constexpr int S = 16 / E;                        // bytes per element
        for (int64_t e0 = (int64_t)lane * E; e0 < n_in; e0 += (int64_t)WARP_SIZE * E * U) {
            uint4 ua[U], ub[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int64_t e = e0 + (int64_t)u * WARP_SIZE * E;
                if (e < n_in) {
                    ua[u] = ldg_stream16(wa + e * S);
                    if constexpr (TWO) ub[u] = ldg_stream16(wb + e * S);
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int64_t e = e0 + (int64_t)u * WARP_SIZE * E;
                if (e < n_in) {
                    float fa[E], fb[E];
                    unpack16<T>(ua[u], fa);
                    if constexpr (TWO) unpack16<T>(ub[u], fb);
#pragma unroll
                    for (int q = 0; q < E; q += 4) {
                        float4 gv = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
                        if constexpr (NORM) gv = __ldg((const float4 *)(g + e + q));
#pragma unroll
                        for (int j = 0; j < NR; j++) {
                            float4 xv = __ldg((const float4 *)(xr[j] + e + q));
                            if constexpr (NORM) {
                                ss[j] += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
                                xv = make_float4(xv.x * gv.x, xv.y * gv.y, xv.z * gv.z, xv.w * gv.w);
                            }
                            acc[0][j] += fa[q] * xv.x + fa[q + 1] * xv.y + fa[q + 2] * xv.z + fa[q + 3] * xv.w;
                            if constexpr (TWO)
                                acc[1][j] += fb[q] * xv.x + fb[q + 1] * xv.y + fb[q + 2] * xv.z + fb[q + 3] * xv.w;
                        }
                    }
                }
            }
        }
    } else { // any row length: one element per lane per step
        for (int64_t i = lane; i < n_in; i += WARP_SIZE) {
            float a = load_elem<T>(wa, i), b = TWO ? load_elem<T>(wb, i) : 0.0f;
#pragma unroll
            for (int j = 0; j < NR; j++) {
                float xv = xr[j][i];
                if constexpr (NORM) {
                    ss[j] += xv * xv;
                    xv *= g[i];
                }
                acc[0][j] += a * xv;
                if constexpr (TWO) acc[1][j] += b * xv;
            }
        }
    }
}

// ---- quantized rows (Q8_0/Q4_0) against int8 x ----

template <int T> struct qblock {
    static constexpr int BYTES = T == COOPT_DTYPE_Q8_0 ? 34 : 18;
    static constexpr int WORDS = T == COOPT_DTYPE_Q8_0 ? 9 : 5;  // aligned 32-bit words covering a block
    static constexpr int STAGE = 32 * BYTES + 16;                // 32 blocks + slack for the last block's words
};

// Block `lane` of a staged run: its scale and its 32 (Q8_0) / 16 (Q4_0) quant bytes as words.
template <int T>
__device__ __forceinline__ float qblock_read(const uint8_t *stage, int lane, uint32_t (&qs)[T == COOPT_DTYPE_Q8_0 ? 8 : 4]) {
    constexpr int   B   = qblock<T>::BYTES;
    const int       off = lane * B, s = off & 3; // 0 or 2: blocks are 2-byte aligned
    const uint32_t *w   = (const uint32_t *)(stage + off - s);
    uint32_t        v[qblock<T>::WORDS];
#pragma unroll
    for (int k = 0; k < qblock<T>::WORDS; k++) v[k] = w[k];
    const unsigned sh = 16 + 8 * s; // 16 or 32: the quants start 2 bytes after the scale
#pragma unroll
    for (int k = 0; k < qblock<T>::WORDS - 1; k++) qs[k] = __funnelshift_rc(v[k], v[k + 1], sh);
    return f16_bits_to_f32((uint16_t)((v[0] >> (8 * s)) & 0xffff));
}

// acc[0][j] += wa · x[j] (and with TWO acc[1][j] += wb · x[j]) over nb blocks, x rows r0..
// (clamped to n_rows).
template <int T, int NR, bool VEC, bool TWO>
__device__ __forceinline__ void dot2_quant(const uint8_t *__restrict__ wa, const uint8_t *__restrict__ wb,
                                           const struct gemv_args &a, int32_t r0, int lane,
                                           uint8_t (*stage)[2][qblock<T>::STAGE], float (&acc)[2][NR]) {
    constexpr int B  = qblock<T>::BYTES;
    const int64_t nb = a.n_in / COOPT_QK, nch = (nb + 31) / 32;
    const int8_t *xq[NR];
    const float2 *xd[NR];
#pragma unroll
    for (int j = 0; j < NR; j++) {
        int32_t r = min(r0 + j, a.n_rows - 1);
        xq[j]     = a.xq + (size_t)r * (size_t)a.n_in;
        xd[j]     = a.xds + (size_t)r * (size_t)nb;
    }
    // Stages blocks [32c, 32c + nblk) of both rows into buffer `buf`.
    auto issue = [&](int64_t c, int buf) {
        const int      nbytes = (int)min((int64_t)32, nb - 32 * c) * B;
        const uint8_t *src[2] = {wa + 32 * c * B, wb + 32 * c * B};
#pragma unroll
        for (int r = 0; r < (TWO ? 2 : 1); r++) {
            if constexpr (VEC) { // rows of 16n bytes: 32 blocks are 68 (Q8_0) / 36 (Q4_0) 16-byte pieces
                for (int off = lane * 16; off < nbytes; off += WARP_SIZE * 16) cp_async16(stage[buf][r] + off, src[r] + off);
            } else {
                for (int off = lane * 2; off < nbytes; off += WARP_SIZE * 2)
                    *(uint16_t *)(stage[buf][r] + off) = *(const uint16_t *)(src[r] + off);
            }
        }
        cp_async_commit();
    };
    issue(0, 0);
    for (int64_t c = 0; c < nch; c++) {
        if (c + 1 < nch) issue(c + 1, (int)((c + 1) & 1));
        else cp_async_commit(); // an empty group keeps the wait below uniform
        cp_async_wait<1>();     // this lane's copies of chunk c have landed
        __syncwarp();           // ... and every other lane's
        const int64_t blk = 32 * c + lane;
        if (blk < nb) {
            float    dw[2];
            uint32_t qs[2][T == COOPT_DTYPE_Q8_0 ? 8 : 4];
#pragma unroll
            for (int r = 0; r < (TWO ? 2 : 1); r++) dw[r] = qblock_read<T>(stage[c & 1][r], lane, qs[r]);
#pragma unroll
            for (int j = 0; j < NR; j++) {
                const int4 x0 = __ldg((const int4 *)(xq[j] + blk * COOPT_QK));
                const int4 x1 = __ldg((const int4 *)(xq[j] + blk * COOPT_QK + 16));
                const float2 ds = __ldg(xd[j] + blk);
                const int  xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
                for (int r = 0; r < (TWO ? 2 : 1); r++) {
                    int sumi = 0;
                    if constexpr (T == COOPT_DTYPE_Q8_0) {
#pragma unroll
                        for (int k = 0; k < 8; k++) sumi = __dp4a((int)qs[r][k], xw[k], sumi);
                        acc[r][j] += dw[r] * (ds.x * (float)sumi);
                    } else { // nibble k of byte m: element m (low) / m + 16 (high), stored + 8
#pragma unroll
                        for (int k = 0; k < 4; k++) {
                            sumi = __dp4a((int)(qs[r][k] & 0x0f0f0f0fu), xw[k], sumi);
                            sumi = __dp4a((int)((qs[r][k] >> 4) & 0x0f0f0f0fu), xw[k + 4], sumi);
                        }
                        acc[r][j] += dw[r] * (ds.x * (float)(sumi - 8 * (int)ds.y));
                    }
                }
            }
        }
        __syncwarp(); // everyone is done with buffer c & 1 before chunk c + 2 is staged into it
    }
}

// ---- the kernel ----

template <int T, int NR, bool VEC, bool NORM>
__global__ void __launch_bounds__(GEMV_WARPS * WARP_SIZE) gemv_kernel(const struct gemv_args a) {
    constexpr bool QUANT = T == COOPT_DTYPE_Q8_0 || T == COOPT_DTYPE_Q4_0;
    TRACE_CTA(TRACE_GEMV | (NORM ? 1u : 0u) << 16);
    __shared__ __align__(16) uint8_t stage[QUANT ? GEMV_WARPS : 1][2][2][QUANT ? qblock<T>::STAGE : 16];
    const int     lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int32_t task = blockIdx.x * GEMV_WARPS + warp;
    if (task >= a.n_tasks) return;
    // which rows: swiglu pairs gate row o with up row o; otherwise row o (and o + 1 with two rows
    // per task) of one segment
    int32_t s = 0, o;
    bool    has_b;
    const uint8_t *wa, *wb;
    if (a.mode == GEMV_SWIGLU) {
        o     = task;
        has_b = true;
        wa    = a.seg[0].w + (size_t)o * a.row_bytes;
        wb    = a.seg[1].w + (size_t)o * a.row_bytes;
    } else {
        while (s + 1 < a.n_seg && task >= a.seg[s + 1].task0) s++;
        o     = a.rows_per_task * (task - a.seg[s].task0);
        has_b = a.rows_per_task == 2 && o + 1 < a.seg[s].n_out;
        wa    = a.seg[s].w + (size_t)o * a.row_bytes;
        wb    = has_b ? wa + a.row_bytes : wa;
    }
    // The weights do not depend on the previous kernel: start pulling the first 2 KiB of both
    // rows into L2 while it finishes.
    for (int64_t off = (int64_t)lane * 64; off < (int64_t)min(a.row_bytes, (size_t)2048); off += WARP_SIZE * 64) {
        prefetch_l2(wa + off);
        if (has_b) prefetch_l2(wb + off);
    }
    pdl_wait();
    for (int32_t r0 = 0; r0 < a.n_rows; r0 += NR) {
        float acc[2][NR], ss[NR];
#pragma unroll
        for (int j = 0; j < NR; j++) acc[0][j] = acc[1][j] = ss[j] = 0.0f;
        if constexpr (QUANT) {
            if (has_b) dot2_quant<T, NR, VEC, true>(wa, wb, a, r0, lane, stage[warp], acc);
            else dot2_quant<T, NR, VEC, false>(wa, wb, a, r0, lane, stage[warp], acc);
        } else {
            const float *xr[NR];
#pragma unroll
            for (int j = 0; j < NR; j++) xr[j] = a.x + (size_t)min(r0 + j, a.n_rows - 1) * (size_t)a.n_in;
            if (has_b) dot2_dense<T, NR, VEC, NORM, true>(wa, wb, xr, a.norm, a.n_in, lane, acc, ss);
            else dot2_dense<T, NR, VEC, NORM, false>(wa, wb, xr, a.norm, a.n_in, lane, acc, ss);
        }
        // The next kernel may launch once every block got here (its weight prefetch then
        // overlaps this kernel's tail; triggered any earlier, it pulled rows into L2 that this
        // kernel's stream evicted again before use).
        if (r0 + NR >= a.n_rows) pdl_launch_dependents();
#pragma unroll
        for (int j = 0; j < NR; j++) {
            float va = warp_sum(acc[0][j]), vb = warp_sum(acc[1][j]);
            if constexpr (NORM) { // as rmsnorm_kernel: 1 / sqrt(mean(x^2) + eps), here after the dot
                const float inv = 1.0f / sqrtf(warp_sum(ss[j]) / (float)a.n_in + a.eps);
                va *= inv;
                vb *= inv;
            }
            if (lane != 0 || r0 + j >= a.n_rows) continue;
            if (a.mode == GEMV_SWIGLU) {
                const struct gemv_seg &g = a.seg[0], &u = a.seg[1];
                float gv = va + (g.bias ? g.bias[o] : 0.0f), uv = vb + (u.bias ? u.bias[o] : 0.0f);
                g.out[(size_t)(r0 + j) * g.n_out + o] = gv / (1.0f + expf(-gv)) * uv; // as silu_mul_kernel
            } else {
                const struct gemv_seg &g = a.seg[s];
                float                 *p = g.out + (size_t)(r0 + j) * g.n_out + o;
                va += g.bias ? g.bias[o] : 0.0f;
                vb += g.bias && has_b ? g.bias[o + 1] : 0.0f;
                if (a.mode == GEMV_ACCUMULATE) {
                    p[0] += va;
                    if (has_b) p[1] += vb;
                } else {
                    p[0] = va;
                    if (has_b) p[1] = vb;
                }
            }
        }
    }
}

// x (f32, [n_rows][n_in], n_in % 32 == 0) -> int8 blocks of 32 with (d, sum q) per block.
// Grid: ceil(n_blocks / 8); Block: 256 threads, warp w quantizes block blockIdx.x * 8 + w (lane =
// element). d = amax / 127, q = rint(x * (1 / d)) (round to nearest even), as matmul_cpu.c.
__global__ void quant_x_kernel(const float *__restrict__ x, int8_t *__restrict__ xq, float2 *__restrict__ xds,
                               int64_t n_blocks) {
    const int64_t blk = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (blk >= n_blocks) return;
    const int   lane = threadIdx.x & 31;
    const float v    = x[blk * COOPT_QK + lane];
    const float amax = warp_max(fabsf(v));
    const float d    = amax / 127.0f;
    const float id   = d != 0.0f ? 1.0f / d : 0.0f;
    const int   q    = __float2int_rn(v * id);
    xq[blk * COOPT_QK + lane] = (int8_t)q;
    const int sum = __reduce_add_sync(0xffffffffu, q);
    if (lane == 0) xds[blk] = make_float2(d, (float)sum);
}

// The same with the RMS norm first: x [n_rows][n_in] -> xn = (x * 1/rms(x)) * g (as
// rmsnorm_kernel), quantized as above. Grid: (n_rows); Block: 1024 threads (sum of squares over
// the row, block-reduced; then warp w quantizes blocks w, w + 32, ...).
__global__ void quant_norm_x_kernel(const float *__restrict__ x, const float *__restrict__ g, float eps, int64_t n_in,
                                    int8_t *__restrict__ xq, float2 *__restrict__ xds) {
    __shared__ float part[32];
    const float     *xr   = x + (size_t)blockIdx.x * (size_t)n_in;
    const int        lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    float            ss   = 0.0f;
    for (int64_t i = threadIdx.x; i < n_in; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float v = lane < n_warps ? part[lane] : 0.0f;
        v       = warp_sum(v);
        if (lane == 0) part[0] = v;
    }
    __syncthreads();
    const float   inv = 1.0f / sqrtf(part[0] / (float)n_in + eps);
    const int64_t nb = n_in / COOPT_QK, blk0 = (int64_t)blockIdx.x * nb;
    for (int64_t b = warp; b < nb; b += n_warps) {
        const int64_t i    = b * COOPT_QK + lane;
        const float   v    = (xr[i] * inv) * g[i];
        const float   amax = warp_max(fabsf(v));
        const float   d    = amax / 127.0f;
        const float   id   = d != 0.0f ? 1.0f / d : 0.0f;
        const int     q    = __float2int_rn(v * id);
        xq[(blk0 + b) * COOPT_QK + lane] = (int8_t)q;
        const int sum = __reduce_add_sync(0xffffffffu, q);
        if (lane == 0) xds[blk0 + b] = make_float2(d, (float)sum);
    }
}

// ---- GEMV launch ----

static bool gemv_type(enum coopt_dtype t) {
    return t == COOPT_DTYPE_F32 || t == COOPT_DTYPE_F16 || t == COOPT_DTYPE_BF16 || t == COOPT_DTYPE_Q8_0 ||
           t == COOPT_DTYPE_Q4_0;
}

// One launch; with cb->pdl as a programmatic dependent launch (the kernel's prologue overlaps the
// previous kernel's tail, see pdl_wait).
template <int T, int NR, bool VEC, bool NORM> static void gemv_launch_k(struct cuda_backend *cb, const struct gemv_args &a) {
    CUDA_CHECK(cuda_launch_pdl(cb->pdl, gemv_kernel<T, NR, VEC, NORM>,
                               dim3((unsigned)((a.n_tasks + GEMV_WARPS - 1) / GEMV_WARPS)), dim3(GEMV_WARPS * WARP_SIZE),
                               0, cb->stream, a));
}

template <int T, bool VEC, bool NORM> static void gemv_launch_t(struct cuda_backend *cb, const struct gemv_args &a, int nr) {
    constexpr bool HALF = T == COOPT_DTYPE_F16 || T == COOPT_DTYPE_BF16; // cuBLAS above 2 rows: no wider NR
    if (nr == 1) gemv_launch_k<T, 1, VEC, NORM>(cb, a);
    else if (nr == 2 || HALF) gemv_launch_k<T, 2, VEC, NORM>(cb, a);
    else if constexpr (!HALF) {
        if (nr <= 4) gemv_launch_k<T, 4, VEC, NORM>(cb, a);
        else gemv_launch_k<T, 8, VEC, NORM>(cb, a);
    }
}

template <int T, bool VEC> static void gemv_launch_n(struct cuda_backend *cb, const struct gemv_args &a, int nr) {
    constexpr bool QUANT = T == COOPT_DTYPE_Q8_0 || T == COOPT_DTYPE_Q4_0; // norm applied when quantizing x
    if (a.norm && !QUANT) gemv_launch_t<T, VEC, !QUANT>(cb, a, nr);
    else gemv_launch_t<T, VEC, false>(cb, a, nr);
}

// Runs one GEMV launch over a's segments (all of type dt, n_in a.n_in); fills the x fields.
// norm (NULL = none): x is RMS-normed with these weights on the way in.
static void gemv_run(struct cuda_backend *cb, enum coopt_dtype dt, struct gemv_args &a, const float *x,
                     const float *norm, float eps) {
    cudaStream_t st = cb->stream;
    int64_t      n_in = a.n_in;
    a.row_bytes       = coopt_dtype_row_bytes(dt, n_in);
    a.x               = x;
    a.norm            = norm;
    a.eps             = eps;
    a.xq              = NULL;
    a.xds             = NULL;
    int nr            = a.n_rows;
    if (dt == COOPT_DTYPE_Q8_0 || dt == COOPT_DTYPE_Q4_0) {
        COOPT_ASSERT(n_in % COOPT_QK == 0);
        int64_t nblk = (int64_t)a.n_rows * (n_in / COOPT_QK);
        size_t  qb   = ((size_t)nblk * COOPT_QK + 15) / 16 * 16;
        uint8_t *w   = (uint8_t *)cuda_workspace(cb, qb + (size_t)nblk * sizeof(float2));
        if (!w) return; // (out of memory: cb->op_error)
        a.xq         = (const int8_t *)w;
        a.xds        = (const float2 *)(w + qb);
        if (norm)
            quant_norm_x_kernel<<<(unsigned)a.n_rows, 1024, 0, st>>>(x, norm, eps, n_in, (int8_t *)w, (float2 *)(w + qb));
        else
            quant_x_kernel<<<(unsigned)((nblk + 7) / 8), 256, 0, st>>>(x, (int8_t *)w, (float2 *)(w + qb), nblk);
        CUDA_CHECK_LAUNCH();
    }
    switch (dt) {
    case COOPT_DTYPE_F32:
        if (n_in % 4 == 0) gemv_launch_n<COOPT_DTYPE_F32, true>(cb, a, nr);
        else gemv_launch_n<COOPT_DTYPE_F32, false>(cb, a, nr);
        break;
    case COOPT_DTYPE_F16:
        if (n_in % 8 == 0) gemv_launch_n<COOPT_DTYPE_F16, true>(cb, a, nr);
        else gemv_launch_n<COOPT_DTYPE_F16, false>(cb, a, nr);
        break;
    case COOPT_DTYPE_BF16:
        if (n_in % 8 == 0) gemv_launch_n<COOPT_DTYPE_BF16, true>(cb, a, nr);
        else gemv_launch_n<COOPT_DTYPE_BF16, false>(cb, a, nr);
        break;
    case COOPT_DTYPE_Q8_0: // rows of 16n bytes when n_in % 256 == 0
        if (n_in % 256 == 0) gemv_launch_n<COOPT_DTYPE_Q8_0, true>(cb, a, nr);
        else gemv_launch_n<COOPT_DTYPE_Q8_0, false>(cb, a, nr);
        break;
    case COOPT_DTYPE_Q4_0:
        if (n_in % 256 == 0) gemv_launch_n<COOPT_DTYPE_Q4_0, true>(cb, a, nr);
        else gemv_launch_n<COOPT_DTYPE_Q4_0, false>(cb, a, nr);
        break;
    default: COOPT_ASSERT(!"gemv: unsupported weight type");
    }
}

// Store / accumulate GEMV over n weights sharing x (1 <= n <= GEMV_MAX_SEG).
static void gemv_segments(struct cuda_backend *cb, int mode, int32_t n, float *const *outs, const float *x,
                          const float *norm, float eps, const struct coopt_weight *const *ws, int32_t n_rows) {
    struct gemv_args a;
    memset(&a, 0, sizeof(a));
    a.mode   = mode;
    a.n_rows = n_rows;
    a.n_in   = ws[0]->n_in;
    a.n_seg  = n;
    // Two rows per warp share the x loads and keep two weight streams in flight; but when that
    // leaves fewer warps than the GPU holds at once (q/k/v of GQA models, o and down projections),
    // one row per warp gives twice the warps and so more bytes in flight per SM.
    int64_t rows = 0;
    for (int32_t i = 0; i < n; i++) rows += ws[i]->n_out;
    a.rows_per_task = cb->gemv_rows_per_task ? cb->gemv_rows_per_task : rows / 2 < (int64_t)cb->n_sm * 32 ? 1 : 2;
    for (int32_t i = 0; i < n; i++) {
        a.seg[i] = {(const uint8_t *)ws[i]->data, ws[i]->bias, outs[i], (int32_t)ws[i]->n_out, a.n_tasks};
        a.n_tasks += (int32_t)((ws[i]->n_out + a.rows_per_task - 1) / a.rows_per_task);
    }
    gemv_run(cb, ws[0]->dtype, a, x, norm, eps);
}

// ---- cuBLAS path ----

// x (f32) -> 16-bit copy of type T in the workspace. Grid-stride, 256 threads.
template <int T> __global__ void convert_x_kernel(uint16_t *__restrict__ dst, const float *__restrict__ src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        if constexpr (T == COOPT_DTYPE_F16)
            dst[i] = __half_as_ushort(__float2half_rn(src[i]));
        else
            dst[i] = __bfloat16_as_ushort(__float2bfloat16_rn(src[i]));
    }
}

// out[r][o] += bias[o]. Grid-stride over n_rows * n_out.
__global__ void add_bias_kernel(float *out, const float *__restrict__ bias, int64_t n_out, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] += bias[i % n_out];
}

// out = x·W^T (+ out when accumulate) (+ bias).
static void gemm_cublas(struct cuda_backend *cb, float *out, const float *x, const struct coopt_weight *w,
                        int32_t n_rows, bool accumulate) {
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    int         m = (int)w->n_out, n = n_rows, k = (int)w->n_in;
    // Column-major view: out^T [n_out x n_rows] = W [n_out x n_in] (row-major = col-major W^T,
    // hence OP_T) * x^T [n_in x n_rows] (row-major x = col-major x^T, OP_N).
    if (w->dtype == COOPT_DTYPE_F32) {
        CUBLAS_CHECK(cublasSgemm(cb->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, (const float *)w->data, k, x, k,
                                 &beta, out, m));
    } else {
        int64_t   nx = (int64_t)n_rows * w->n_in;
        uint16_t *xh = (uint16_t *)cuda_workspace(cb, (size_t)nx * sizeof(uint16_t));
        if (!xh) return; // (out of memory: cb->op_error)
        if (w->dtype == COOPT_DTYPE_F16)
            convert_x_kernel<COOPT_DTYPE_F16><<<cuda_grid_1d(nx, 256), 256, 0, cb->stream>>>(xh, x, nx);
        else
            convert_x_kernel<COOPT_DTYPE_BF16><<<cuda_grid_1d(nx, 256), 256, 0, cb->stream>>>(xh, x, nx);
        CUDA_CHECK_LAUNCH();
        cudaDataType t = w->dtype == COOPT_DTYPE_F16 ? CUDA_R_16F : CUDA_R_16BF;
        CUBLAS_CHECK(cublasGemmEx(cb->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, w->data, t, k, xh, t, k, &beta,
                                  out, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (w->bias) {
        int64_t nt = (int64_t)n_rows * w->n_out;
        add_bias_kernel<<<cuda_grid_1d(nt, 256), 256, 0, cb->stream>>>(out, w->bias, w->n_out, nt);
        CUDA_CHECK_LAUNCH();
    }
}

// Rows above which F16/BF16 and F32 go through cuBLAS instead of the GEMV (measured on an H100,
// W [32768][4096]: the GEMV streams F16 at ~2.9 TB/s for 1-2 rows but falls to ~0.9 TB/s at 8,
// where cuBLAS is close to weight bandwidth; the f32 GEMV stays ahead of Sgemm up to 8 rows).
#define GEMM_MIN_ROWS_16 2
#define GEMM_MIN_ROWS_32 8

static bool use_cublas(const struct coopt_weight *w, int32_t n_rows) {
    bool half  = w->dtype == COOPT_DTYPE_F16 || w->dtype == COOPT_DTYPE_BF16;
    bool dense = half || w->dtype == COOPT_DTYPE_F32;
    return dense && n_rows > (half ? GEMM_MIN_ROWS_16 : GEMM_MIN_ROWS_32) && w->n_in <= INT32_MAX &&
           w->n_out <= INT32_MAX;
}

// The GEMV handles w at this batch size (else cuBLAS, or another file's kernel for other types).
static bool gemv_ok(const struct coopt_weight *w, int32_t n_rows) {
    return gemv_type(w->dtype) && !use_cublas(w, n_rows) && w->n_in <= INT32_MAX && w->n_out <= INT32_MAX &&
           (!(w->dtype == COOPT_DTYPE_Q8_0 || w->dtype == COOPT_DTYPE_Q4_0) || w->n_in % COOPT_QK == 0);
}

// ---- inputs staged between decode GEMVs (backend.h: matmul_add_then_norm, norm_matmul_swiglu_then_add) ----
//
// A producing op passes the GPTQ GEMV a slot of cb->xst to stage its output in (struct
// cuda_gptq_xstage); when the launch does, the op records what the slot holds (out, the next op's
// norm). The next GEMV op takes the record: it passes the slot as its input if the record is
// exactly its x and norm, and drops the record either way. Producers write the other slot than
// the record's, so a GEMV that consumes and produces (gate/up) never writes what it reads, and
// every write happens after griddepcontrol.wait, when the kernels before have finished.

#define XST_MIN 32768 // values per slot at least (ffn widths up to llama3-70b's 28672)

static size_t xst_slot_bytes(const struct cuda_backend *cb) { return (cb->xst_bytes / 2) & ~(size_t)255; }

static void xst_drop(struct coopt_backend *be) { cuda_impl(be)->xst_valid = false; }

// The staged input for a GEMV op reading x normed with norm (NULL = none), and room for its output
// where n_out > 0 (n_out values; next_norm: the next op's norm weights).
static void xst_begin(struct cuda_backend *cb, struct cuda_gptq_xstage *st, const float *x, const float *norm,
                      int64_t n_out, const float *next_norm) {
    memset(st, 0, sizeof(*st));
    if (n_out > 0) { // room for at least XST_MIN values, so a model's first step sizes it once
        const size_t need = align256(cuda_gptq_xstage_bytes(COOPT_MAX(n_out, XST_MIN)));
        if (xst_slot_bytes(cb) < need) {
            (void)cuda_workspace_xstage(cb, 2 * need);
            cb->xst_valid = false; // (the contents are gone: that GEMV stages from x)
        }
    }
    const size_t slot = xst_slot_bytes(cb);
    if (cb->xst_valid && cb->xst_x == x && cb->xst_norm == norm)
        st->in = (const uint8_t *)cb->xst + (size_t)cb->xst_slot * slot, st->n_in = cb->xst_n;
    cb->xst_valid = false;
    if (n_out > 0 && slot) st->out = (uint8_t *)cb->xst + (size_t)(1 - cb->xst_slot) * slot, st->out_bytes = slot;
    st->out_norm = next_norm;
}

// Records what the op staged, if its launch did.
static void xst_end(struct cuda_backend *cb, const struct cuda_gptq_xstage *st, const float *out, int64_t n_out) {
    if (!st->staged) return;
    cb->xst_slot = 1 - cb->xst_slot, cb->xst_valid = true;
    cb->xst_x = out, cb->xst_norm = st->out_norm, cb->xst_n = n_out;
}

void *cuda_xstage_out_begin(struct cuda_backend *cb, int64_t n) {
    struct cuda_gptq_xstage st;
    xst_begin(cb, &st, NULL, NULL, n, NULL); // (drops the record)
    return st.out && cuda_gptq_xstage_bytes(n) <= st.out_bytes ? st.out : NULL;
}

void cuda_xstage_out_end(struct cuda_backend *cb, const float *x, int64_t n) {
    struct cuda_gptq_xstage st;
    memset(&st, 0, sizeof(st));
    st.staged = true;
    xst_end(cb, &st, x, n);
}

extern "C" bool cuda_xstage_peek(struct coopt_backend *be, const float *x, const void **buf, int64_t *n) {
    const struct cuda_backend *cb = cuda_impl(be);
    *buf = NULL, *n = 0;
    if (!cb->xst_valid || cb->xst_x != x) return false;
    *buf = (const uint8_t *)cb->xst + (size_t)cb->xst_slot * xst_slot_bytes(cb), *n = cb->xst_n;
    return true;
}

// ---- ops ----

void cuda_matmul(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n_rows) {
    xst_drop(be);
    if (n_rows <= 0 || w->n_out <= 0) return;
    if (w->dtype == COOPT_DTYPE_Q4_GPTQ) { // gptq.cu; w->gptq is the device form (gptq_dev.h)
        cuda_gptq_matmul(be, out, x, (const struct cuda_gptq_weight *)w->gptq, w->bias, n_rows);
        return;
    }
    struct cuda_backend *cb = cuda_impl(be);
    if (use_cublas(w, n_rows)) {
        gemm_cublas(cb, out, x, w, n_rows, false);
        return;
    }
    if (!gemv_type(w->dtype)) {
        coopt_log_error("cuda matmul: weight type %s is not supported", coopt_dtype_name(w->dtype));
        COOPT_ASSERT(!"unsupported matmul weight type");
    }
    if (w->dtype == COOPT_DTYPE_Q8_0 || w->dtype == COOPT_DTYPE_Q4_0) COOPT_ASSERT(w->n_in % COOPT_QK == 0);
    gemv_segments(cb, GEMV_STORE, 1, &out, x, NULL, 0.0f, &w, n_rows);
}

// The multi/swiglu GEMV of one launch applies to these weights at this batch size.
static bool multi_one_launch(int32_t n, const struct coopt_weight *const *ws, int32_t n_rows) {
    bool one = true;
    for (int32_t i = 0; i < n; i++)
        one = one && gemv_ok(ws[i], n_rows) && ws[i]->dtype == ws[0]->dtype && ws[i]->n_in == ws[0]->n_in &&
              ws[i]->n_out > 0;
    return one;
}

// GPTQ projections of one input (all Q4_GPTQ, same n_in): gptq.cu's multi entry, one GEMV launch
// at decode. Returns false when the weights are not all GPTQ.
static bool gptq_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                       const struct coopt_weight *const *ws, int32_t n_rows) {
    const struct cuda_gptq_weight *gw[GEMV_MAX_SEG];
    const float                   *bias[GEMV_MAX_SEG];
    for (int32_t i = 0; i < n; i++) {
        if (ws[i]->dtype != COOPT_DTYPE_Q4_GPTQ || ws[i]->n_in != ws[0]->n_in) return false;
        gw[i]   = (const struct cuda_gptq_weight *)ws[i]->gptq;
        bias[i] = ws[i]->bias;
    }
    cuda_gptq_matmul_multi(be, n, outs, x, gw, bias, n_rows);
    return true;
}

// The fused op in one GPTQ GEMV launch (gptq.cu), where it applies: all weights GPTQ, one row.
// Returns false when the caller must compose the op.
static bool gptq_fused(struct coopt_backend *be, enum cuda_gptq_fused mode, int32_t n, float *const *outs,
                       const float *x, const float *norm, float eps, const struct coopt_weight *const *ws,
                       int32_t n_rows, struct cuda_gptq_xstage *st) {
    const struct cuda_gptq_weight *gw[GEMV_MAX_SEG];
    const float                   *bias[GEMV_MAX_SEG];
    for (int32_t i = 0; i < n; i++) {
        if (ws[i]->dtype != COOPT_DTYPE_Q4_GPTQ) return false;
        gw[i]   = (const struct cuda_gptq_weight *)ws[i]->gptq;
        bias[i] = ws[i]->bias;
    }
    return cuda_gptq_gemv_fused(be, mode, n, outs, x, norm, eps, gw, bias, n_rows, st);
}

// x normed into the second workspace (for the paths that need it materialized); NULL when out of
// memory (cb->op_error).
static const float *normed_copy(struct coopt_backend *be, const float *x, const float *norm, float eps, int64_t n_in,
                                int32_t n_rows) {
    float *xn = (float *)cuda_workspace2(cuda_impl(be), (size_t)n_rows * (size_t)n_in * sizeof(float));
    if (xn) be->ops->rmsnorm(be, xn, x, norm, n_rows, (int32_t)n_in, eps);
    return xn;
}

void cuda_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                       const struct coopt_weight *const *ws, int32_t n_rows) {
    COOPT_ASSERT(n >= 1 && n <= GEMV_MAX_SEG);
    xst_drop(be);
    if (n_rows <= 0) return;
    if (multi_one_launch(n, ws, n_rows)) {
        gemv_segments(cuda_impl(be), GEMV_STORE, n, outs, x, NULL, 0.0f, ws, n_rows);
        return;
    }
    if (gptq_multi(be, n, outs, x, ws, n_rows)) return;
    for (int32_t i = 0; i < n; i++) cuda_matmul(be, outs[i], x, ws[i], n_rows);
}

void cuda_norm_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x, const float *norm,
                            float eps, const struct coopt_weight *const *ws, int32_t n_rows) {
    COOPT_ASSERT(n >= 1 && n <= GEMV_MAX_SEG);
    struct cuda_gptq_xstage st;
    xst_begin(cuda_impl(be), &st, x, norm, 0, NULL);
    if (n_rows <= 0) return;
    if (multi_one_launch(n, ws, n_rows)) {
        gemv_segments(cuda_impl(be), GEMV_STORE, n, outs, x, norm, eps, ws, n_rows);
        return;
    }
    if (gptq_fused(be, CUDA_GPTQ_FUSED_STORE, n, outs, x, norm, eps, ws, n_rows, &st)) return;
    const float *xn = normed_copy(be, x, norm, eps, ws[0]->n_in, n_rows);
    if (xn) cuda_matmul_multi(be, n, outs, xn, ws, n_rows);
}

static void swiglu_launch(struct coopt_backend *be, float *out, const float *x, const float *norm, float eps,
                          const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t n_rows) {
    struct gemv_args a;
    memset(&a, 0, sizeof(a));
    a.mode    = GEMV_SWIGLU;
    a.rows_per_task = 2; // gate row o and up row o
    a.n_rows  = n_rows;
    a.n_in    = wg->n_in;
    a.n_seg   = 2;
    a.n_tasks = (int32_t)wg->n_out;
    a.seg[0]  = {(const uint8_t *)wg->data, wg->bias, out, (int32_t)wg->n_out, 0};
    a.seg[1]  = {(const uint8_t *)wu->data, wu->bias, NULL, (int32_t)wu->n_out, 0};
    gemv_run(cuda_impl(be), wg->dtype, a, x, norm, eps);
}

static bool swiglu_one_launch(const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t n_rows) {
    return gemv_ok(wg, n_rows) && gemv_ok(wu, n_rows) && wg->dtype == wu->dtype;
}

void cuda_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const struct coopt_weight *wg,
                        const struct coopt_weight *wu, int32_t n_rows) {
    COOPT_ASSERT(wg->n_out == wu->n_out && wg->n_in == wu->n_in);
    xst_drop(be);
    if (n_rows <= 0 || wg->n_out <= 0) return;
    if (swiglu_one_launch(wg, wu, n_rows)) {
        swiglu_launch(be, out, x, NULL, 0.0f, wg, wu, n_rows);
        return;
    }
    float *const                     outs[2] = {out, tmp};
    const struct coopt_weight *const ws[2]   = {wg, wu};
    if (gptq_fused(be, CUDA_GPTQ_FUSED_SWIGLU, 2, outs, x, NULL, 0.0f, ws, n_rows, NULL)) return;
    if (!gptq_multi(be, 2, outs, x, ws, n_rows)) {
        cuda_matmul(be, out, x, wg, n_rows);
        cuda_matmul(be, tmp, x, wu, n_rows);
    }
    be->ops->silu_mul(be, out, out, tmp, (int64_t)n_rows * wg->n_out);
}

// norm_matmul_swiglu; then_add: and stage out for the next op (one row, GPTQ weights).
static void norm_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const float *norm,
                               float eps, const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t n_rows,
                               bool then_add) {
    COOPT_ASSERT(wg->n_out == wu->n_out && wg->n_in == wu->n_in);
    struct cuda_backend    *cb = cuda_impl(be);
    struct cuda_gptq_xstage st;
    const bool stage = then_add && n_rows == 1 && wg->dtype == COOPT_DTYPE_Q4_GPTQ && wu->dtype == COOPT_DTYPE_Q4_GPTQ;
    xst_begin(cb, &st, x, norm, stage ? wg->n_out : 0, NULL);
    if (n_rows <= 0 || wg->n_out <= 0) return;
    if (swiglu_one_launch(wg, wu, n_rows)) {
        swiglu_launch(be, out, x, norm, eps, wg, wu, n_rows);
        return;
    }
    float *const                     outs[2] = {out, tmp};
    const struct coopt_weight *const ws[2]   = {wg, wu};
    if (gptq_fused(be, CUDA_GPTQ_FUSED_SWIGLU, 2, outs, x, norm, eps, ws, n_rows, &st)) {
        xst_end(cb, &st, out, wg->n_out);
        return;
    }
    const float *xn = normed_copy(be, x, norm, eps, wg->n_in, n_rows);
    if (xn) cuda_matmul_swiglu(be, out, tmp, xn, wg, wu, n_rows);
}

void cuda_norm_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const float *norm,
                             float eps, const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t n_rows) {
    norm_matmul_swiglu(be, out, tmp, x, norm, eps, wg, wu, n_rows, false);
}

void cuda_norm_matmul_swiglu_then_add(struct coopt_backend *be, float *out, float *tmp, const float *x, const float *norm,
                                      float eps, const struct coopt_weight *wg, const struct coopt_weight *wu,
                                      int32_t n_rows) {
    norm_matmul_swiglu(be, out, tmp, x, norm, eps, wg, wu, n_rows, true);
}

// matmul_add; then_norm: and stage out (times next_norm) for the next op (one row, GPTQ weights).
static void matmul_add(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n_rows,
                       bool then_norm, const float *next_norm) {
    struct cuda_backend    *cb = cuda_impl(be);
    struct cuda_gptq_xstage st;
    const bool              stage = then_norm && n_rows == 1 && w->dtype == COOPT_DTYPE_Q4_GPTQ;
    xst_begin(cb, &st, x, NULL, stage ? w->n_out : 0, next_norm);
    if (n_rows <= 0 || w->n_out <= 0) return;
    if (use_cublas(w, n_rows)) {
        gemm_cublas(cb, out, x, w, n_rows, true);
    } else if (gemv_ok(w, n_rows)) {
        gemv_segments(cb, GEMV_ACCUMULATE, 1, &out, x, NULL, 0.0f, &w, n_rows);
    } else if (gptq_fused(be, CUDA_GPTQ_FUSED_ADD, 1, &out, x, NULL, 0.0f, &w, n_rows, &st)) {
        xst_end(cb, &st, out, w->n_out);
    } else {
        // another file's matmul (it may use the workspace): the product goes to the second one
        float *tmp = (float *)cuda_workspace2(cb, (size_t)n_rows * (size_t)w->n_out * sizeof(float));
        if (!tmp) return; // (out of memory: cb->op_error)
        cuda_matmul(be, tmp, x, w, n_rows);
        be->ops->add(be, out, out, tmp, (int64_t)n_rows * w->n_out);
    }
}

void cuda_matmul_add(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n_rows) {
    matmul_add(be, out, x, w, n_rows, false, NULL);
}

void cuda_matmul_add_then_norm(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                               int32_t n_rows, const float *next_norm) {
    matmul_add(be, out, x, w, n_rows, true, next_norm);
}
