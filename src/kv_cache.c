/*
 * kv_cache.c -- page layout sizes and the host-side page manager (see kv_cache.h).
 *
 * The manager is a pool of n_pages page ids with a free-list stack, a reference count per page
 * and a block table per sequence (all allocated once in coopt_kv_cache_init). Invariants,
 * checked by tests/test_kv_cache.c after every operation of a random workload:
 *   - refcount[p] == number of (sequence, block) table entries that hold p;
 *   - a page is on the free list exactly once iff its refcount is 0;
 *   - pages_used == n_pages - n_free == number of distinct pages referenced.
 * A sequence's table: blocks [0, n_blocks) hold its n_tokens positions (entries before a
 * sliding window may be -1, released); blocks [n_blocks, n_blocks + r) are pages reserved
 * ahead by coopt_kv_seq_reserve and not yet advanced into; every later entry is -1.
 * The block index of position pos is always pos / page_size.
 *
 * Sharing (fork): full pages are shared for good (nobody writes into them again). A partial
 * last page is shared until a sequence appends into it; reserve then copies it first
 * (copy-on-write), so rows below any sharer's n_tokens are never written in a shared page.
 *
 * KV_FULL and CTX_FULL are expected runtime conditions (the scheduler preempts or finishes a
 * sequence), so they are returned silently; bad arguments are logged.
 */
#include "kv_cache.h"

#include "dtype.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

enum coopt_status coopt_kv_layout_init(struct coopt_kv_layout *l, enum coopt_dtype dtype, int32_t n_layers,
                                       int32_t n_kv_heads, int32_t head_dim, int32_t page_size) {
    memset(l, 0, sizeof(*l));
    switch (dtype) {
    case COOPT_DTYPE_F32:
    case COOPT_DTYPE_F16:
    case COOPT_DTYPE_BF16: break;
    case COOPT_DTYPE_FP8_E4M3:
    case COOPT_DTYPE_FP8_E5M2: l->has_scales = true; break;
    default: return coopt_fail(COOPT_ERR_UNSUPPORTED, "KV cache type %s is not supported", coopt_dtype_name(dtype));
    }
    if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0 || page_size <= 0)
        return coopt_fail(COOPT_ERR_INVALID, "KV layout: bad shape (layers %d, kv heads %d, head dim %d, page %d)",
                          n_layers, n_kv_heads, head_dim, page_size);
    l->dtype      = dtype;
    l->n_layers   = n_layers;
    l->n_kv_heads = n_kv_heads;
    l->head_dim   = head_dim;
    l->page_size  = page_size;
    l->elem_bytes = coopt_dtype_block_bytes(dtype);
    l->scale_search = COOPT_KV_SCALE_SEARCH;
    l->head_bytes = (size_t)page_size * (size_t)head_dim * l->elem_bytes;
    l->data_bytes = (size_t)n_layers * 2 * (size_t)n_kv_heads * l->head_bytes;
    size_t scale_bytes = l->has_scales ? (size_t)n_layers * 2 * (size_t)n_kv_heads * (size_t)page_size * sizeof(float) : 0;
    l->page_bytes = (l->data_bytes + scale_bytes + 63) & ~(size_t)63;
    return COOPT_OK;
}

// ---- page manager ----

static bool kv_seq_valid(const struct coopt_kv_cache *kv, int32_t seq) {
    return seq >= 0 && seq < kv->n_seq_max;
}

static const struct coopt_kv_seq *kv_seq_live(const struct coopt_kv_cache *kv, int32_t seq) {
    if (!kv_seq_valid(kv, seq) || !kv->seqs[seq].live) return NULL;
    return &kv->seqs[seq];
}

static int32_t kv_page_alloc(struct coopt_kv_cache *kv) {
    COOPT_ASSERT(kv->n_free > 0);
    int32_t page = kv->free_list[--kv->n_free];
    COOPT_ASSERT(kv->refcount[page] == 0);
    kv->refcount[page] = 1;
    return page;
}

static void kv_page_unref(struct coopt_kv_cache *kv, int32_t page) {
    COOPT_ASSERT(page >= 0 && page < kv->n_pages && kv->refcount[page] > 0);
    if (--kv->refcount[page] > 0) return;
    COOPT_ASSERT(kv->n_free < kv->n_pages);
    kv->free_list[kv->n_free++] = page;
    if (kv->on_page_free) kv->on_page_free(kv->on_page_free_ud, page);
}

// Blocks that hold a page: n_blocks plus the pages reserved ahead.
static int32_t kv_seq_blocks_held(const struct coopt_kv_cache *kv, const struct coopt_kv_seq *s) {
    int32_t b = s->n_blocks;
    while (b < kv->max_pages_per_seq && s->pages[b] >= 0) b++;
    return b;
}

static int64_t kv_blocks_for(const struct coopt_kv_cache *kv, int64_t n_tokens) {
    int64_t ps = kv->layout.page_size;
    return (n_tokens + ps - 1) / ps;
}

// True if appending to s writes into a partial last page that other sequences share.
static bool kv_seq_needs_cow(const struct coopt_kv_cache *kv, const struct coopt_kv_seq *s) {
    if (s->n_tokens % kv->layout.page_size == 0) return false;
    int32_t page = s->pages[s->n_blocks - 1];
    COOPT_ASSERT(page >= 0); // the partial last block is never released
    return kv->refcount[page] > 1;
}

enum coopt_status coopt_kv_cache_init(const struct coopt_kv_layout *layout, int64_t n_pages, int32_t n_seq_max,
                                      int32_t max_pages_per_seq, struct coopt_kv_cache **out) {
    *out = NULL;
    if (!layout || layout->page_size <= 0)
        return coopt_fail(COOPT_ERR_INVALID, "KV cache: layout not initialized (page size %d)",
                          layout ? layout->page_size : 0);
    if (n_pages <= 0 || n_pages > INT32_MAX || n_seq_max <= 0 || max_pages_per_seq <= 0)
        return coopt_fail(COOPT_ERR_INVALID,
                          "KV cache: bad size (pages %lld, max sequences %d, max pages per sequence %d)",
                          (long long)n_pages, n_seq_max, max_pages_per_seq);
    size_t n_table;
    if (!coopt_mul_ok((size_t)n_seq_max, (size_t)max_pages_per_seq, &n_table))
        return coopt_fail(COOPT_ERR_NOMEM, "KV cache: block tables too large (%d x %d)", n_seq_max,
                          max_pages_per_seq);

    struct coopt_kv_cache *kv = coopt_calloc(1, sizeof(*kv));
    if (!kv) return COOPT_ERR_NOMEM;
    kv->layout            = *layout;
    kv->n_pages           = n_pages;
    kv->n_seq_max         = n_seq_max;
    kv->max_pages_per_seq = max_pages_per_seq;
    kv->free_list         = coopt_malloc((size_t)n_pages * sizeof(int32_t));
    kv->refcount          = coopt_calloc((size_t)n_pages, sizeof(int32_t));
    kv->seqs              = coopt_calloc((size_t)n_seq_max, sizeof(struct coopt_kv_seq));
    // one allocation for every block table, split per sequence below
    int32_t *tables = coopt_malloc(n_table * sizeof(int32_t));
    if (!kv->free_list || !kv->refcount || !kv->seqs || !tables) {
        free(tables);
        coopt_kv_cache_free(kv);
        return COOPT_ERR_NOMEM;
    }
    for (size_t i = 0; i < n_table; i++) tables[i] = -1;
    for (int32_t i = 0; i < n_seq_max; i++) kv->seqs[i].pages = tables + (size_t)i * (size_t)max_pages_per_seq;
    // stack order: page 0 is handed out first
    for (int64_t i = 0; i < n_pages; i++) kv->free_list[i] = (int32_t)(n_pages - 1 - i);
    kv->n_free = n_pages;
    *out       = kv;
    return COOPT_OK;
}

void coopt_kv_cache_free(struct coopt_kv_cache *kv) {
    if (!kv) return;
    if (kv->seqs) free(kv->seqs[0].pages); // the block tables are one allocation
    free(kv->seqs);
    free(kv->refcount);
    free(kv->free_list);
    free(kv);
}

enum coopt_status coopt_kv_seq_init(struct coopt_kv_cache *kv, int32_t seq) {
    if (!kv_seq_valid(kv, seq))
        return coopt_fail(COOPT_ERR_INVALID, "KV cache: sequence id %d out of range [0, %d)", seq, kv->n_seq_max);
    struct coopt_kv_seq *s = &kv->seqs[seq];
    if (s->live) return coopt_fail(COOPT_ERR_INVALID, "KV cache: sequence %d is already in use", seq);
    s->live     = true;
    s->n_tokens = 0;
    s->n_blocks = 0;
    return COOPT_OK;
}

void coopt_kv_seq_free(struct coopt_kv_cache *kv, int32_t seq) {
    if (!kv_seq_live(kv, seq)) return;
    struct coopt_kv_seq *s = &kv->seqs[seq];
    int32_t held = kv_seq_blocks_held(kv, s);
    for (int32_t b = 0; b < held; b++) {
        if (s->pages[b] >= 0) kv_page_unref(kv, s->pages[b]);
        s->pages[b] = -1;
    }
    s->live     = false;
    s->n_tokens = 0;
    s->n_blocks = 0;
}

int64_t coopt_kv_pages_needed(const struct coopt_kv_cache *kv, int32_t seq, int64_t n) {
    const struct coopt_kv_seq *s = kv_seq_live(kv, seq);
    if (!s || n < 0) {
        coopt_log_error("KV cache: pages_needed for %s sequence %d (n %lld)", s ? "live" : "unknown", seq,
                        (long long)n);
        return -1;
    }
    if (n == 0) return 0;
    int64_t blocks = kv_blocks_for(kv, s->n_tokens + n);
    int64_t held   = kv_seq_blocks_held(kv, s);
    return (blocks > held ? blocks - held : 0) + (kv_seq_needs_cow(kv, s) ? 1 : 0);
}

enum coopt_status coopt_kv_seq_reserve(struct coopt_kv_cache *kv, int32_t seq, int64_t n,
                                       enum coopt_status (*copy_page)(void *ud, int32_t dst, int32_t src), void *ud) {
    if (!kv_seq_live(kv, seq))
        return coopt_fail(COOPT_ERR_INVALID, "KV cache: reserve on unknown sequence %d", seq);
    if (n < 0 || n > INT64_MAX / 2)
        return coopt_fail(COOPT_ERR_INVALID, "KV cache: reserve of %lld tokens for sequence %d", (long long)n, seq);
    if (n == 0) return COOPT_OK;
    struct coopt_kv_seq *s = &kv->seqs[seq];
    int64_t blocks = kv_blocks_for(kv, s->n_tokens + n);
    if (blocks > kv->max_pages_per_seq) return COOPT_ERR_CTX_FULL;
    int32_t held = kv_seq_blocks_held(kv, s);
    bool    cow  = kv_seq_needs_cow(kv, s);
    int64_t need = (blocks > held ? blocks - held : 0) + (cow ? 1 : 0);
    if (need > kv->n_free) return COOPT_ERR_KV_FULL; // nothing changed yet
    if (cow) {
        int32_t b   = s->n_blocks - 1;
        int32_t src = s->pages[b];
        int32_t           dst = kv_page_alloc(kv);
        enum coopt_status st  = copy_page ? copy_page(ud, dst, src) : COOPT_OK;
        if (st != COOPT_OK) {
            kv_page_unref(kv, dst);
            return st;
        }
        s->pages[b] = dst;
        kv_page_unref(kv, src); // refcount was > 1: never freed here
    }
    for (int32_t b = held; b < blocks; b++) s->pages[b] = kv_page_alloc(kv);
    return COOPT_OK;
}

void coopt_kv_seq_advance(struct coopt_kv_cache *kv, int32_t seq, int64_t n) {
    COOPT_ASSERT(kv_seq_live(kv, seq) && n >= 0);
    struct coopt_kv_seq *s = &kv->seqs[seq];
    int64_t blocks = kv_blocks_for(kv, s->n_tokens + n);
    COOPT_ASSERT(blocks <= kv_seq_blocks_held(kv, s)); // call only after a successful reserve
    s->n_tokens += n;
    s->n_blocks = (int32_t)blocks;
}

int64_t coopt_kv_slot(const struct coopt_kv_cache *kv, int32_t seq, int64_t pos) {
    const struct coopt_kv_seq *s = kv_seq_live(kv, seq);
    COOPT_ASSERT(s && pos >= 0);
    int64_t ps = kv->layout.page_size;
    int64_t b  = pos / ps;
    COOPT_ASSERT(b < kv->max_pages_per_seq && s->pages[b] >= 0);
    return (int64_t)s->pages[b] * ps + pos % ps;
}

enum coopt_status coopt_kv_seq_fork(struct coopt_kv_cache *kv, int32_t src, int32_t dst) {
    if (!kv_seq_live(kv, src)) return coopt_fail(COOPT_ERR_INVALID, "KV cache: fork from unknown sequence %d", src);
    if (!kv_seq_valid(kv, dst) || kv->seqs[dst].live)
        return coopt_fail(COOPT_ERR_INVALID, "KV cache: fork target %d is out of range or in use", dst);
    const struct coopt_kv_seq *s = &kv->seqs[src];
    struct coopt_kv_seq       *d = &kv->seqs[dst];
    // only blocks holding tokens are shared; pages src reserved ahead stay its own
    for (int32_t b = 0; b < s->n_blocks; b++) {
        d->pages[b] = s->pages[b];
        if (d->pages[b] >= 0) kv->refcount[d->pages[b]]++;
    }
    d->live     = true;
    d->n_tokens = s->n_tokens;
    d->n_blocks = s->n_blocks;
    return COOPT_OK;
}

void coopt_kv_seq_release_before(struct coopt_kv_cache *kv, int32_t seq, int64_t first_pos) {
    if (!kv_seq_live(kv, seq)) {
        coopt_log_error("KV cache: release on unknown sequence %d", seq);
        return;
    }
    struct coopt_kv_seq *s = &kv->seqs[seq];
    // never past n_tokens: the partial last page and pages reserved ahead stay
    int64_t end = COOPT_MIN(first_pos, s->n_tokens) / kv->layout.page_size;
    for (int64_t b = 0; b < end; b++) {
        if (s->pages[b] < 0) continue;
        kv_page_unref(kv, s->pages[b]);
        s->pages[b] = -1;
    }
}

void coopt_kv_seq_truncate(struct coopt_kv_cache *kv, int32_t seq, int64_t n) {
    struct coopt_kv_seq *s = &kv->seqs[seq];
    COOPT_ASSERT(kv_seq_live(kv, seq) && n >= 0 && n <= s->n_tokens);
    // the blocks past the new end stay with the sequence, reserved ahead (it wrote them after
    // any copy-on-write, so they are its own)
    s->n_tokens = n;
    s->n_blocks = (int32_t)kv_blocks_for(kv, n);
}

int64_t coopt_kv_pages_used(const struct coopt_kv_cache *kv) { return kv->n_pages - kv->n_free; }
