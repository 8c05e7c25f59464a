/*
 * sampler.c -- picks the next token from a row of logits on the host.
 *
 * The chain is llama.cpp's default order: repetition penalty -> top-k -> top-p -> min-p ->
 * temperature -> softmax -> draw. temp <= 0 is greedy: the argmax after the penalty (the
 * filters never remove the largest logit, so they cannot change it).
 *   - repetition penalty (llama.cpp semantics): every distinct token among the last
 *     repeat_last_n accepted tokens gets logit / penalty if its logit is > 0, else logit * penalty.
 *   - top-k keeps the k largest logits; top-p keeps the smallest prefix (by descending logit)
 *     whose softmax mass (at temperature 1, over the tokens still in) reaches top_p; min-p keeps
 *     tokens with p >= min_p * p_max, i.e. logit >= max + log(min_p). Each keeps at least one token.
 *   - temperature scales the survivors' logits; the draw walks the cumulative weights with a
 *     uniform double from xoshiro256** (seeded through splitmix64), so a seed fixes the sequence.
 *
 * Cost per call is O(n_vocab) expected, and the vocabulary is never sorted: candidates are
 * ordered by (logit descending, id ascending), a total order, so ties always resolve to the lower
 * token id. Top-k with k <= 64 or k <= n_vocab/16 is one pass with a bounded heap; without a
 * penalty it first takes the maxima of k slices of the row (vector loads), whose smallest bounds
 * the k-th largest logit from below, and skips every 64-logit block whose maximum is under that
 * bound, so the heap sees a few hundred logits instead of the vocabulary; the k are then sorted,
 * so the draw does not depend on the order the heap saw them in (defaults, 32000 logits: 106 ->
 * 13 us per call on the development machine, 128256: 391 -> 25 us; test sampler_bench). A larger
 * k is a quickselect. With k <= 64 (PICK_MAX_K) the rest of the chain is pick.h's, the code the
 * backends' sample op runs on the same sorted candidates (top-p as the shortest prefix by a
 * running sum, its own expf), so a draw made where the logits are is this draw, bit for bit
 * (coopt_ctx_generate with a sampler; coopt_pick_row is the host version of the op). Greedy
 * without a penalty takes vector maxima of 64-logit blocks, then the first index of the
 * largest in the first block holding it. Otherwise top-p is a quickselect on mass: partition
 * around a pivot, sum the weights ahead of it, and recurse into the side that holds the cut.
 * -inf and NaN logits are never candidates. Nothing is allocated per call: the buffers are sized
 * n_vocab at init.
 *
 * Seed 0 means "seed from the clock"; any other value is used as is. coopt_sampler_reset()
 * clears the penalty history and restarts the random sequence from the same seed.
 */
#include "coopt.h"
#include "pick.h"
#include "sampler.h"
#include "util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define SAMPLER_BLOCK 64 // logits per block of the top-k scan's skip test

struct sampler_cand {
    float   logit;
    float   w;  // exp weight, filled by the step that needs it
    int32_t id;
};

struct coopt_sampler {
    struct coopt_sampler_params p;
    int32_t                     n_vocab;
    uint64_t                    seed;     // resolved seed (never 0 after init)
    uint64_t                    rng[4];   // xoshiro256** state
    struct sampler_cand        *cand;     // [n_vocab] working candidate set
    float                      *penalized; // [n_vocab] logit after the penalty (only where stamp matches)
    uint32_t                   *stamp;    // [n_vocab] call number that penalized each token
    uint32_t                    n_calls;
    int32_t                    *hist;     // [repeat_last_n] ring of accepted tokens
    int32_t                     n_hist, i_hist;
};

// ---- random numbers: splitmix64 seeding, xoshiro256** ----

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void sampler_seed(struct coopt_sampler *s) {
    uint64_t x = s->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
}

// ---- candidate ordering: logit descending, then id ascending (a total order) ----

static inline bool cand_before(struct sampler_cand a, struct sampler_cand b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

static int cand_cmp(const void *a, const void *b) {
    const struct sampler_cand *x = a, *y = b;
    return cand_before(*x, *y) ? -1 : cand_before(*y, *x) ? 1 : 0;
}

static void cand_swap(struct sampler_cand *a, struct sampler_cand *b) {
    struct sampler_cand t = *a;
    *a                    = *b;
    *b                    = t;
}

static void cand_insertion_sort(struct sampler_cand *c, int64_t n) {
    for (int64_t i = 1; i < n; i++) {
        struct sampler_cand x = c[i];
        int64_t             j = i - 1;
        for (; j >= 0 && cand_before(x, c[j]); j--) c[j + 1] = c[j];
        c[j + 1] = x;
    }
}

// Lomuto partition of c[lo, hi] around a median-of-3 pivot; returns the pivot's final index
// and, in *mass, the summed w of the entries that end up before it.
static int64_t cand_partition(struct sampler_cand *c, int64_t lo, int64_t hi, double *mass) {
    int64_t mid = lo + (hi - lo) / 2;
    if (cand_before(c[mid], c[lo])) cand_swap(&c[mid], &c[lo]);
    if (cand_before(c[hi], c[lo])) cand_swap(&c[hi], &c[lo]);
    if (cand_before(c[hi], c[mid])) cand_swap(&c[hi], &c[mid]);
    cand_swap(&c[mid], &c[hi]); // median to the end as the pivot
    struct sampler_cand pivot = c[hi];
    int64_t             i     = lo;
    double              m     = 0;
    for (int64_t j = lo; j < hi; j++) {
        if (cand_before(c[j], pivot)) {
            m += c[j].w;
            cand_swap(&c[i++], &c[j]);
        }
    }
    cand_swap(&c[i], &c[hi]);
    *mass = m;
    return i;
}

// Reorders c[0, n) so that its first k entries are the k first in candidate order (unsorted).
// Expected O(n): the keys are distinct and the pivot is a median of three.
static void cand_select(struct sampler_cand *c, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    double  mass;
    if (k <= 0 || k >= n) return;
    while (hi - lo > 16) {
        int64_t p = cand_partition(c, lo, hi, &mass);
        if (p == k || p == k - 1) return;
        if (p < k) lo = p + 1;
        else hi = p - 1;
    }
    cand_insertion_sort(c + lo, hi - lo + 1);
}

// Top-p without sorting: reorders c[0, n) and returns the smallest k such that the k first
// entries in candidate order have summed w >= target (n if rounding never gets there). The
// k entries end up in c[0, k), unsorted. Expected O(n), like cand_select. Needs target > 0.
static int64_t cand_select_mass(struct sampler_cand *c, int64_t n, double target) {
    int64_t lo = 0, hi = n - 1;
    double  acc = 0; // mass of c[0, lo): kept for sure, and < target
    while (hi - lo > 16) {
        double  mass;
        int64_t p = cand_partition(c, lo, hi, &mass);
        if (acc + mass >= target) {
            hi = p - 1;
        } else if (acc + mass + c[p].w >= target) {
            return p + 1;
        } else {
            acc += mass + c[p].w;
            lo = p + 1;
        }
    }
    cand_insertion_sort(c + lo, hi - lo + 1);
    for (int64_t i = lo; i <= hi; i++) {
        acc += c[i].w;
        if (acc >= target) return i + 1;
    }
    return COOPT_MAX(hi + 1, 1);
}

// Bounded min-heap of the k best candidates (root: the worst kept), for top-k with k << n_vocab:
// one pass over the logits, almost every token rejected by one comparison with the root.
static void heap_sift_down(struct sampler_cand *h, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && cand_before(h[w], h[l])) w = l;
        if (r < n && cand_before(h[w], h[r])) w = r;
        if (w == i) return;
        cand_swap(&h[i], &h[w]);
        i = w;
    }
}

static void heap_push(struct sampler_cand *h, int64_t n, struct sampler_cand x) {
    int64_t i = n;
    h[i]      = x;
    while (i > 0 && cand_before(h[(i - 1) / 2], h[i])) {
        cand_swap(&h[i], &h[(i - 1) / 2]);
        i = (i - 1) / 2;
    }
}

// Offers x to the bounded heap c[0..*n) of the best k (worst at the root); true if it entered.
static bool heap_offer(struct sampler_cand *c, int64_t *n, int64_t k, struct sampler_cand x) {
    if (*n < k) {
        heap_push(c, (*n)++, x);
        return true;
    }
    if (!cand_before(x, c[0])) return false;
    c[0] = x;
    heap_sift_down(c, *n, 0);
    return true;
}

// The largest x[i] by `>` (NaN never; -inf when there is nothing else). With AVX2, MAXPS keeps
// its second operand (the running maximum) when the first is NaN, so NaN never enters it.
static float max_of(const float *x, int32_t n) {
    float   r = -INFINITY;
    int32_t i = 0;
#if defined(__AVX2__)
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
        m1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), m1);
        m2 = _mm256_max_ps(_mm256_loadu_ps(x + i + 16), m2);
        m3 = _mm256_max_ps(_mm256_loadu_ps(x + i + 24), m3);
    }
    float l[8];
    _mm256_storeu_ps(l, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    for (int j = 0; j < 8; j++) r = l[j] > r ? l[j] : r;
#endif
    for (; i < n; i++) r = x[i] > r ? x[i] : r;
    return r;
}

// The k first logits in candidate order, sorted, into c[0, k') (k' <= k: fewer where the row
// has fewer that are not -inf or NaN); returns k'. One pass with the bounded heap, which sees
// only the 64-logit blocks that can hold one of the k: thr starts as the smallest of the maxima
// of k slices of the row, at most the k-th largest logit (the slices' maxima are k distinct
// elements >= thr), and rises to the heap's worst logit once the heap is full (the scan is in id
// order, so a later equal logit cannot enter either). So no skipped logit is among the k, and
// the heap sees the others in id order, as a plain scan does: the same k.
static int64_t topk_scan(const float *logits, int32_t n_vocab, int64_t k, struct sampler_cand *c) {
    int64_t n = 0;
    k         = COOPT_MIN(k, (int64_t)n_vocab);
    float thr = INFINITY;
    for (int64_t j = 0; j < k; j++) {
        const int32_t lo = (int32_t)(n_vocab * j / k), hi = (int32_t)(n_vocab * (j + 1) / k);
        const float   m  = max_of(logits + lo, hi - lo);
        thr              = m < thr ? m : thr;
    }
    for (int32_t i0 = 0; i0 < n_vocab; i0 += SAMPLER_BLOCK) {
        const int32_t i1 = i0 + SAMPLER_BLOCK < n_vocab ? i0 + SAMPLER_BLOCK : n_vocab;
        if (max_of(logits + i0, i1 - i0) < thr) continue;
        for (int32_t i = i0; i < i1; i++) {
            const struct sampler_cand x = {logits[i], 0, i};
            if (x.logit >= thr && x.logit > -INFINITY && heap_offer(c, &n, k, x) && n == k && c[0].logit > thr)
                thr = c[0].logit;
        }
    }
    // the heap's order depends on what it saw; sorted, the k are the same array either way
    qsort(c, (size_t)n, sizeof(*c), cand_cmp);
    return n;
}

static struct pick_params pick_params_of(const struct coopt_sampler_params *sp) {
    return (struct pick_params){
        .inv_temp  = 1.0f / sp->temp,
        .top_p     = sp->top_p,
        .log_min_p = sp->min_p > 0.0f ? logf(sp->min_p) : 0.0f,
        .top_k     = sp->top_k,
        .has_min_p = sp->min_p > 0.0f,
    };
}

// The tail of the chain (pick.h) over n <= PICK_MAX_K sorted candidates; 0 when there are none.
static int32_t pick_cands(const struct sampler_cand *c, int64_t n, const struct pick_params *pp, uint64_t rng[4]) {
    float   l[PICK_MAX_K], w[2 * PICK_MAX_K];
    int32_t id[PICK_MAX_K];
    if (n == 0) return 0; // nothing is possible: every logit is -inf or NaN
    for (int64_t i = 0; i < n; i++) l[i] = c[i].logit, id[i] = c[i].id;
    return pick_sorted(l, id, w, (int32_t)n, pp, rng);
}

// ---- the chain ----

struct coopt_sampler_params coopt_sampler_default_params(void) {
    return (struct coopt_sampler_params){
        .temp           = 0.8f,
        .top_k          = 40,
        .top_p          = 0.95f,
        .min_p          = 0.05f,
        .repeat_penalty = 1.0f,
        .repeat_last_n  = 64,
        .seed           = 0, // from the clock
    };
}

enum coopt_status coopt_sampler_init(const struct coopt_sampler_params *p, int32_t n_vocab,
                                     struct coopt_sampler **out) {
    *out = NULL;
    if (n_vocab <= 0) return coopt_fail(COOPT_ERR_INVALID, "sampler: n_vocab %d must be > 0", n_vocab);
    if (isnan(p->temp) || isnan(p->top_p) || isnan(p->min_p) || !(p->repeat_penalty > 0) ||
        !isfinite(p->repeat_penalty) || p->repeat_last_n < 0)
        return coopt_fail(COOPT_ERR_INVALID,
                          "sampler: bad parameters (temp %g, top_p %g, min_p %g, repeat_penalty %g, repeat_last_n %d)",
                          p->temp, p->top_p, p->min_p, p->repeat_penalty, p->repeat_last_n);
    struct coopt_sampler *s = coopt_calloc(1, sizeof(*s));
    if (!s) return COOPT_ERR_NOMEM;
    s->p         = *p;
    s->n_vocab   = n_vocab;
    s->cand      = coopt_malloc((size_t)n_vocab * sizeof(*s->cand));
    s->penalized = coopt_malloc((size_t)n_vocab * sizeof(float));
    s->stamp     = coopt_calloc((size_t)n_vocab, sizeof(uint32_t));
    s->hist      = coopt_malloc((size_t)(p->repeat_last_n > 0 ? p->repeat_last_n : 1) * sizeof(int32_t));
    if (!s->cand || !s->penalized || !s->stamp || !s->hist) {
        coopt_sampler_free(s);
        return COOPT_ERR_NOMEM;
    }
    s->seed = p->seed;
    if (s->seed == 0) {
        uint64_t x = (uint64_t)coopt_time_us() ^ ((uint64_t)(uintptr_t)s << 17);
        s->seed    = splitmix64(&x) | 1;
    }
    sampler_seed(s);
    *out = s;
    return COOPT_OK;
}

void coopt_sampler_free(struct coopt_sampler *s) {
    if (!s) return;
    free(s->cand);
    free(s->penalized);
    free(s->stamp);
    free(s->hist);
    free(s);
}

void coopt_sampler_accept(struct coopt_sampler *s, int32_t token) {
    if (token < 0 || token >= s->n_vocab || s->p.repeat_last_n <= 0) return;
    s->hist[s->i_hist] = token;
    s->i_hist          = (s->i_hist + 1) % s->p.repeat_last_n;
    if (s->n_hist < s->p.repeat_last_n) s->n_hist++;
}

void coopt_sampler_reset(struct coopt_sampler *s) {
    s->n_hist = 0;
    s->i_hist = 0;
    sampler_seed(s);
}

// Marks each distinct token of the history with this call's stamp and stores its penalized
// logit. Returns false when the penalty is off.
static bool sampler_penalize(struct coopt_sampler *s, const float *logits) {
    if (s->p.repeat_penalty == 1.0f || s->n_hist == 0) return false;
    if (++s->n_calls == 0) { // stamp wrapped: clear so that old stamps cannot match
        memset(s->stamp, 0, (size_t)s->n_vocab * sizeof(uint32_t));
        s->n_calls = 1;
    }
    float pen = s->p.repeat_penalty;
    for (int32_t i = 0; i < s->n_hist; i++) {
        int32_t tok = s->hist[i];
        if (s->stamp[tok] == s->n_calls) continue; // distinct tokens only
        s->stamp[tok]     = s->n_calls;
        float l           = logits[tok];
        s->penalized[tok] = l > 0 ? l / pen : l * pen;
    }
    return true;
}

// Logit of token i after the repetition penalty.
static inline float sampler_logit(const struct coopt_sampler *s, const float *logits, bool pen, int32_t i) {
    return pen && s->stamp[i] == s->n_calls ? s->penalized[i] : logits[i];
}

int32_t coopt_sampler_sample(struct coopt_sampler *s, const float *logits) {
    COOPT_ASSERT(s && logits);
    const int32_t n_vocab = s->n_vocab;
    const bool    pen     = sampler_penalize(s, logits);

    // greedy: the first in candidate order (largest logit, lowest id); NaN never wins
    if (!(s->p.temp > 0) && !pen) { // block maxima (vectors): the first block holding the largest, its first index
        float   m  = -INFINITY;
        int32_t b0 = -1;
        for (int32_t i0 = 0; i0 < n_vocab; i0 += SAMPLER_BLOCK) {
            const float bm = max_of(logits + i0, COOPT_MIN(SAMPLER_BLOCK, n_vocab - i0));
            if (bm > m) m = bm, b0 = i0;
        }
        if (b0 < 0) return 0; // every logit is -inf or NaN
        int32_t i = b0;
        while (logits[i] != m) i++;
        return i;
    }
    if (!(s->p.temp > 0)) {
        int32_t best   = 0;
        float   best_l = -INFINITY;
        for (int32_t i = 0; i < n_vocab; i++) {
            float l = sampler_logit(s, logits, pen, i);
            if (l > best_l) best = i, best_l = l;
        }
        return best;
    }

    // candidates (-inf and NaN never are), cut to the top k
    struct sampler_cand *c     = s->cand;
    int64_t              n     = 0;
    const int64_t        top_k = s->p.top_k;
    if (top_k > 0 && (top_k <= PICK_MAX_K || top_k <= n_vocab / 16)) {
        if (pen) {
            for (int32_t i = 0; i < n_vocab; i++) {
                const struct sampler_cand x = {sampler_logit(s, logits, pen, i), 0, i};
                if (x.logit > -INFINITY) heap_offer(c, &n, top_k, x);
            }
            qsort(c, (size_t)n, sizeof(*c), cand_cmp);
        } else {
            n = topk_scan(logits, n_vocab, top_k, c);
        }
        if (top_k <= PICK_MAX_K) {
            const struct pick_params pp = pick_params_of(&s->p);
            return pick_cands(c, n, &pp, s->rng);
        }
    } else {
        for (int32_t i = 0; i < n_vocab; i++) {
            float l = sampler_logit(s, logits, pen, i);
            if (l > -INFINITY) c[n++] = (struct sampler_cand){l, 0, i};
        }
        if (top_k > 0 && top_k < n) {
            cand_select(c, n, top_k);
            n = top_k;
        }
    }
    if (n == 0) return 0; // nothing is possible: every logit is -inf or NaN
    float max_l = c[0].logit;
    for (int64_t i = 1; i < n; i++) max_l = c[i].logit > max_l ? c[i].logit : max_l;
    if (isinf(max_l)) { // +inf logits take all the mass: draw uniformly among them
        int64_t m = 0;
        for (int64_t i = 0; i < n; i++)
            if (c[i].logit == max_l) c[m++] = c[i];
        n = m;
    }
    // top-p over the softmax at temperature 1
    if (s->p.top_p < 1.0f && n > 1 && !isinf(max_l)) {
        double sum = 0;
        for (int64_t i = 0; i < n; i++) sum += c[i].w = expf(c[i].logit - max_l);
        double target = (double)s->p.top_p * sum;
        if (target > 0) {
            n = cand_select_mass(c, n, target);
        } else { // top_p <= 0: only the best
            cand_select(c, n, 1);
            n = 1;
        }
    }
    // min-p: p >= min_p * p_max  <=>  logit >= max + log(min_p)
    if (s->p.min_p > 0.0f && n > 1 && !isinf(max_l)) {
        float   thresh = max_l + logf(s->p.min_p);
        int64_t m      = 0;
        for (int64_t i = 0; i < n; i++)
            if (c[i].logit >= thresh) c[m++] = c[i];
        if (m == 0) { // min_p > 1: nothing passes (c is untouched); keep the best one
            cand_select(c, n, 1);
            m = 1;
        }
        n = m;
    }
    if (n == 1) return c[0].id;

    // temperature, softmax, draw
    const float inv_t = 1.0f / s->p.temp;
    double      sum   = 0;
    for (int64_t i = 0; i < n; i++) {
        c[i].w = isinf(max_l) ? 1.0f : expf((c[i].logit - max_l) * inv_t);
        sum += c[i].w;
    }
    double u = pick_uniform(s->rng) * sum, cum = 0;
    for (int64_t i = 0; i < n; i++) {
        cum += c[i].w;
        if (u < cum) return c[i].id;
    }
    // rounding left u just past the total: the last candidate with weight
    for (int64_t i = n - 1; i > 0; i--)
        if (c[i].w > 0) return c[i].id;
    return c[0].id;
}

// ---- the sample op's state (sampler.h) ----

static bool sampler_no_penalty(const struct coopt_sampler_params *p) {
    return p->repeat_penalty == 1.0f || p->repeat_last_n <= 0;
}

bool coopt_sampler_greedy(const struct coopt_sampler *s) { return !(s->p.temp > 0) && sampler_no_penalty(&s->p); }

bool coopt_sampler_pick_state(const struct coopt_sampler *s, struct pick_state *out) {
    const struct coopt_sampler_params *p = &s->p;
    const int64_t segs = ((int64_t)s->n_vocab + PICK_SEG - 1) / PICK_SEG;
    if (coopt_sampler_greedy(s) && segs <= PICK_SEG) { // the argmax: the one largest candidate, no draw
        memset(out, 0, sizeof(*out));
        out->p = (struct pick_params){.inv_temp = 1.0f, .top_p = 1.0f, .top_k = 1};
        memcpy(out->rng, s->rng, sizeof(out->rng));
        return true;
    }
    if (!(p->temp > 0) || !sampler_no_penalty(p) || p->top_k < 1 ||
        p->top_k > PICK_MAX_K || segs * p->top_k > PICK_SEG)
        return false;
    memset(out, 0, sizeof(*out));
    out->p = pick_params_of(p);
    memcpy(out->rng, s->rng, sizeof(out->rng));
    return true;
}

bool coopt_sampler_chainable(const struct coopt_sampler *s) {
    struct pick_state ps;
    return coopt_sampler_greedy(s) || coopt_sampler_pick_state(s, &ps);
}

void coopt_sampler_set_rng(struct coopt_sampler *s, const uint64_t rng[4]) { memcpy(s->rng, rng, sizeof(s->rng)); }

void coopt_sampler_get_rng(const struct coopt_sampler *s, uint64_t rng[4]) { memcpy(rng, s->rng, sizeof(s->rng)); }

int32_t coopt_pick_row(const float *x, int32_t n, struct pick_state *ps) {
    struct sampler_cand c[PICK_MAX_K];
    COOPT_ASSERT(ps->p.top_k >= 1 && ps->p.top_k <= PICK_MAX_K); // (coopt_sampler_pick_state's)
    return pick_cands(c, topk_scan(x, n, ps->p.top_k, c), &ps->p, ps->rng);
}
