/*
 * pick.h -- the tail of the sampler (top-p, min-p, temperature, draw) over top-k candidates
 * already sorted, written once for the host and the device, so that a token drawn on a GPU
 * (the backend's sample op, coopt_ctx_generate with a sampler) is bit for bit the token the
 * host sampler draws from the same logits with the same random state.
 *
 * What makes the two agree: the same operations in the same order on IEEE values -- float
 * arithmetic with every fused multiply-add written out (pick_expf; the host is built with
 * -std=c11, which contracts nothing, and no expression here has a product feeding an add that
 * nvcc could contract), sums in double in candidate order, the same xoshiro256** stream --
 * and nothing from a math library whose last bit differs between the two (expf, logf: the
 * host computes log(min_p) once and passes it in).
 *
 * Candidates are sorted by logit descending, then id ascending (the host sampler's total
 * order; ties resolve to the lower id), and are never -inf or NaN.
 */
#ifndef COOPT_PICK_H
#define COOPT_PICK_H

#include <math.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define PICK_FN __host__ __device__ __forceinline__
#else
#define PICK_FN static inline
#endif

// The largest top_k the chained path takes (the host sampler takes any). The device sorts the
// k candidates of every PICK_SEG-logit segment of a row and then the union of those, which it
// holds in PICK_SEG slots: a row of n logits needs ceil(n / PICK_SEG) * top_k <= PICK_SEG.
#define PICK_MAX_K 64
#define PICK_SEG   4096

// The sample op's scratch for one row of n logits, in backend memory (zeroed once when
// allocated; the CUDA kernel's): a counter of the segments done at 0 (zero between calls), at
// PICK_CANDS_OFF the candidates of every segment (PICK_MAX_K 64-bit keys each).
#define PICK_CANDS_OFF    64
#define PICK_RESULT_BYTES 40 // what the op writes to out_host per row: the token (int32) at 0, the random state at 8
PICK_FN size_t pick_scratch_bytes(int32_t n) {
    return PICK_CANDS_OFF + (size_t)((n + PICK_SEG - 1) / PICK_SEG) * PICK_MAX_K * sizeof(uint64_t);
}

struct pick_params {
    float   inv_temp;  // 1 / temperature (> 0)
    float   top_p;     // >= 1: off
    float   log_min_p; // log(min_p), computed on the host; min_p <= 0: off (has_min_p false)
    int32_t top_k;     // 1 .. PICK_MAX_K; 0: the sample op skips the row (writes nothing)
    int32_t has_min_p;
};

// The sampler's state where the sample op runs: parameters and the random stream, which each
// draw advances in place.
struct pick_state {
    struct pick_params p;
    uint32_t           pad;
    uint64_t           rng[4]; // xoshiro256**
};

// xoshiro256**: the next 64 bits of the stream.
PICK_FN uint64_t pick_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
PICK_FN uint64_t pick_next(uint64_t s[4]) {
    const uint64_t r = pick_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = pick_rotl(s[3], 45);
    return r;
}
// A uniform double in [0, 1) from the top 53 bits.
PICK_FN double pick_uniform(uint64_t s[4]) { return (double)(pick_next(s) >> 11) * 0x1.0p-53; }

// exp(x) in float, the same bits on host and device. Below -86 it returns 0 (the result would
// be within a factor 4 of the smallest normal float: such a weight is nothing next to the
// largest candidate's, which is 1); NaN gives 0. Range reduction x = n ln2 + r with ln2 in two
// parts (the first exact in n * C1), |r| <= ln2 / 2, then Cephes' degree-6 polynomial for
// exp(r), ~1 ulp (test pick_expf_accuracy), and an exact scaling by 2^n.
PICK_FN float pick_expf(float x) {
    if (!(x > -86.0f)) return 0.0f;
    if (x > 88.0f) return INFINITY;
    const float n = rintf(x * 1.44269504088896341f);
    float       r = fmaf(-n, 0.693359375f, x);
    r             = fmaf(n, 2.12194440e-4f, r);
    float p       = fmaf(1.9875691500e-4f, r, 1.3981999507e-3f);
    p             = fmaf(p, r, 8.3334519073e-3f);
    p             = fmaf(p, r, 4.1665795894e-2f);
    p             = fmaf(p, r, 1.6666665459e-1f);
    p             = fmaf(p, r, 5.0000001201e-1f);
    const float z = r * r;
    const float y = fmaf(p, z, r) + 1.0f;
    uint32_t    b = (uint32_t)((int32_t)n + 127) << 23; // n in [-124, 127]: 2^n is a normal float
    float       s;
    memcpy(&s, &b, sizeof(s));
    return y * s;
}

// The two weights of candidate i, each a function of its logit and the largest (logit[0]) only,
// so they can be computed in any order (on the device, one thread each): wp[i] for top-p, the
// softmax at temperature 1, and wt[i] for the draw, at the temperature (1 where the largest is
// +inf: the +inf logits share the mass).
PICK_FN void pick_weights(const float *logit, int32_t i, const struct pick_params *p, float *wp, float *wt) {
    const float max_l = logit[0];
    wp[i]             = pick_expf(logit[i] - max_l);
    wt[i]             = isinf(max_l) ? 1.0f : pick_expf((logit[i] - max_l) * p->inv_temp);
}

// The draw over n >= 1 candidates sorted as above (logit[i], id[i]) with their pick_weights.
// top-p keeps the shortest prefix whose softmax mass at temperature 1 reaches top_p, min-p the
// candidates with logit >= max + log(min_p) (each keeps at least one); then a draw from the
// softmax at the temperature, one value of the stream, and only where more than one is left.
// +inf logits take all the mass (top-p and min-p do not apply): a uniform draw among them. The
// sums are in double, in candidate order.
PICK_FN int32_t pick_sorted_w(const float *logit, const int32_t *id, const float *wp, const float *wt, int32_t n,
                              const struct pick_params *p, uint64_t rng[4]) {
    const float max_l = logit[0];
    const bool  inf   = isinf(max_l);
    if (inf) {
        int32_t m = 1;
        while (m < n && logit[m] == max_l) m++;
        n = m;
    }
    if (p->top_p < 1.0f && n > 1 && !inf) {
        double sum = 0;
        for (int32_t i = 0; i < n; i++) sum += (double)wp[i];
        const double target = (double)p->top_p * sum;
        int32_t      m      = 1;
        if (target > 0) {
            double acc = 0;
            for (m = 0; m < n;) {
                acc += (double)wp[m++];
                if (acc >= target) break;
            }
        }
        n = m;
    }
    if (p->has_min_p && n > 1 && !inf) {
        const float thresh = max_l + p->log_min_p;
        int32_t     m      = 1; // the best always passes (min_p > 1 keeps it alone)
        while (m < n && logit[m] >= thresh) m++;
        n = m;
    }
    if (n == 1) return id[0];
    double sum = 0;
    for (int32_t i = 0; i < n; i++) sum += (double)wt[i];
    const double u   = pick_uniform(rng) * sum;
    double       cum = 0;
    for (int32_t i = 0; i < n; i++) {
        cum += (double)wt[i];
        if (u < cum) return id[i];
    }
    for (int32_t i = n - 1; i > 0; i--) // rounding left u just past the total: the last with weight
        if (wt[i] > 0) return id[i];
    return id[0];
}

// pick_sorted_w with the weights computed here; w: scratch for 2n floats.
PICK_FN int32_t pick_sorted(const float *logit, const int32_t *id, float *w, int32_t n, const struct pick_params *p,
                            uint64_t rng[4]) {
    for (int32_t i = 0; i < n; i++) pick_weights(logit, i, p, w, w + n);
    return pick_sorted_w(logit, id, w, w + n, n, p, rng);
}

#endif // COOPT_PICK_H
