/*
 * xstage.cuh -- the device side of a decode GEMV's staged input (gptq_dev.h, struct
 * cuda_gptq_xstage): the element order the tensor-core GEMV stages x in (hg_pos), its scaling, and
 * the store of one element with its 16-element tile's partials, shared by the producers (the GEMV's
 * epilogue in gptq.cu, the decode attention kernels in paged_attn.cu) so they write exactly the
 * bits the consuming GEMV would write itself.
 *
 * Layout for n values (n a multiple of 64): [n] f16 at 2 * hg_pos(k & ~1) + (k & 1), each the
 * value (times the consumer's norm weight) times 2^HG_XS, rounded to nearest even; then at
 * cuda_gptq_xstage_part(n) one float2 per 16 values {sum of the values' squares, amax of the
 * staged values before scaling}, the sum in the order of xstage_put's butterfly.
 */
#ifndef COOPT_CUDA_XSTAGE_CUH
#define COOPT_CUDA_XSTAGE_CUH

#include "cuda/common.cuh"

#ifndef HG_XS
#define HG_XS 4 // x is staged as f16(x * 2^HG_XS) where a warp's amax is in [2^(-1-HG_XS), 2^(15-HG_XS))
#endif

// Index (in half2 units) of padded row k's pair inside the staged x of one token: chunk c = k / 64,
// then [tq][j][hi] with k % 64 = 16 j + 8 hi + 2 tq + e (e: the half of the pair). Lane (gid, tq)
// of the GEMV then finds its B fragments b0 (hi 0) and b1 (hi 1) of the chunk's four 16-row steps
// j in 32 contiguous bytes.
__device__ __forceinline__ int32_t hg_pos(int32_t k) {
    const int m = k & 63;
    return (k >> 6) * 32 + (((m & 7) >> 1) << 3) + ((m >> 4) << 1) + ((m >> 3) & 1);
}

// Stages element o = v (g = v times the consumer's norm weight, or v) where `in`. Each 16-lane half
// of the warp holds one 16-element tile (o = 16 t + lane % 16 where in); every lane of the warp
// must call it (shuffles). The half's first lane writes the tile's partials where `own` is set
// (false for a half past the producer's range: its o may name another producer's tile).
__device__ __forceinline__ void xstage_put(__half *xo, float2 *xo_part, int32_t o, bool in, bool own, float v,
                                           float g) {
    if (in) xo[2 * hg_pos(o & ~1) + (o & 1)] = __float2half_rn(g * (float)(1 << HG_XS));
    float ss = in ? v * v : 0.0f, am = in ? fabsf(g) : 0.0f;
#pragma unroll
    for (int m = 8; m > 0; m >>= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, m);
        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, m));
    }
    if (own && (threadIdx.x & 15) == 0) xo_part[o >> 4] = make_float2(ss, am);
}

#endif // COOPT_CUDA_XSTAGE_CUH
