/*
 * kv_cache.h -- the paged KV cache: page layout (declared once, here, with its one offset
 * function) and the host-side page manager (pool, free list, per-sequence block tables,
 * reference counts for shared prefix pages).
 *
 * Layout. The pool is an array of n_pages pages. One page holds page_size consecutive token
 * positions of one sequence for every layer, K and V:
 *
 *     page: [n_layers][2 (K=0, V=1)][n_kv_heads][page_size][head_dim]  elements of `dtype`
 *     then, for scaled types (FP8), scales: [n_layers][2][n_kv_heads][page_size] f32
 *
 * so (layer, K/V, head) is one contiguous run of page_size*head_dim elements: attention for a
 * KV head streams page_size rows of head_dim with no stride, and all query heads of the group
 * are served from that one read (Opt-GQA). A whole page is contiguous, so a page that is freed
 * can be returned to the OS (lazy mapping, Opt-Pa). page_bytes is rounded up to 64 bytes.
 *
 * The manager is pure host logic: backends see only page ids, slots and the pool pointer.
 * A slot is page * page_size + (pos % page_size).
 */
#ifndef COOPT_KV_CACHE_H
#define COOPT_KV_CACHE_H

#include "coopt.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// FP8 rows carry one f32 scale each, chosen by coopt_fp8_quant_row (dtype.h) among this many
// candidates in [amax/fp8_max, 2*amax/fp8_max) for the smallest squared error of the row
// (measured against plain amax scaling in docs/BENCHMARKS.md, "FP8 KV scaling").
#define COOPT_KV_SCALE_SEARCH 16

struct coopt_kv_layout {
    enum coopt_dtype dtype;       // F32, F16, BF16, FP8_E4M3, FP8_E5M2
    int32_t          n_layers, n_kv_heads, head_dim, page_size;
    size_t           elem_bytes;
    size_t           head_bytes;  // page_size * head_dim * elem_bytes: one (layer, kv, head) run
    size_t           data_bytes;  // n_layers * 2 * n_kv_heads * head_bytes
    bool             has_scales;  // FP8 types carry one f32 scale per (layer, kv, head, slot)
    int32_t          scale_search; // FP8 scale candidates per row: COOPT_KV_SCALE_SEARCH or 1 (plain amax)
    size_t           page_bytes;  // data + scales, rounded up to 64
};

// Fills the layout for the given shape. Returns COOPT_ERR_UNSUPPORTED for a non-KV dtype.
enum coopt_status coopt_kv_layout_init(struct coopt_kv_layout *l, enum coopt_dtype dtype, int32_t n_layers,
                                       int32_t n_kv_heads, int32_t head_dim, int32_t page_size);

// Byte offset, within the pool, of the head_dim elements of (page, layer, kv, head, row).
static inline size_t coopt_kv_offset(const struct coopt_kv_layout *l, int64_t page, int32_t layer, int32_t kv,
                                     int32_t head, int32_t row) {
    return (size_t)page * l->page_bytes +
           (((size_t)layer * 2 + (size_t)kv) * (size_t)l->n_kv_heads + (size_t)head) * l->head_bytes +
           (size_t)row * (size_t)l->head_dim * l->elem_bytes;
}

// Byte offset of the f32 scale of (page, layer, kv, head, row); only when has_scales.
static inline size_t coopt_kv_scale_offset(const struct coopt_kv_layout *l, int64_t page, int32_t layer,
                                           int32_t kv, int32_t head, int32_t row) {
    return (size_t)page * l->page_bytes + l->data_bytes +
           ((((size_t)layer * 2 + (size_t)kv) * (size_t)l->n_kv_heads + (size_t)head) * (size_t)l->page_size +
            (size_t)row) * sizeof(float);
}

// K smoothing (FP8 caches only). Each sequence has a per-(layer, KV head) offset vector c that
// is subtracted from every roped K row before quantization: q.(k - c) = q.k - q.c shifts all of a
// query's scores by the same amount, so softmax and the attention output are unchanged, while
// the rows to quantize lose their common component and FP8 rounds them more finely. c is the
// mean roped K of the sequence's first forward step (the one that writes position 0) and stays
// fixed for the sequence's life (forks inherit it). Layout, in backend memory:
//     k_offset: [n_seq_max][n_layers][n_kv_heads][head_dim] f32
static inline size_t coopt_kv_koff_index(const struct coopt_kv_layout *l, int32_t seq, int32_t layer, int32_t head) {
    return (((size_t)seq * (size_t)l->n_layers + (size_t)layer) * (size_t)l->n_kv_heads + (size_t)head) *
           (size_t)l->head_dim;
}

// ---- page manager ----

struct coopt_kv_seq {
    bool     live;
    int64_t  n_tokens;   // positions held (next position to write)
    int32_t *pages;      // [max_pages_per_seq] page id per block, -1 = none (released/unused)
    int32_t  n_blocks;   // blocks in use: ceil(n_tokens / page_size)
};

struct coopt_kv_cache {
    struct coopt_kv_layout layout;
    int64_t              n_pages;
    int32_t              n_seq_max;
    int32_t              max_pages_per_seq;
    uint8_t             *pool;      // [n_pages * page_bytes], owned by the backend that allocated it
    float               *k_offset;  // K smoothing offsets (see above), backend memory; NULL = none
    int32_t             *free_list; // [n_pages] stack of free page ids
    int64_t              n_free;
    int32_t             *refcount;  // [n_pages] sequences referencing each page
    struct coopt_kv_seq *seqs;      // [n_seq_max]
    // Called when a page's refcount drops to 0 (the backend may return its memory to the OS).
    void               (*on_page_free)(void *ud, int32_t page);
    void                *on_page_free_ud;
};

// Creates the manager (pool pointer is set by the caller). Returns NOMEM on failure.
enum coopt_status coopt_kv_cache_init(const struct coopt_kv_layout *layout, int64_t n_pages, int32_t n_seq_max,
                                      int32_t max_pages_per_seq, struct coopt_kv_cache **out);
void coopt_kv_cache_free(struct coopt_kv_cache *kv);

// Marks sequence `seq` live and empty. Returns INVALID if out of range or already live.
enum coopt_status coopt_kv_seq_init(struct coopt_kv_cache *kv, int32_t seq);
// Releases every page of the sequence and marks it dead. Ignores dead sequences.
void coopt_kv_seq_free(struct coopt_kv_cache *kv, int32_t seq);
// Number of free pages needed to append n tokens to seq (counts a copy-on-write of a shared
// partial last page, and nothing for pages already reserved). -1 for a dead/unknown seq.
int64_t coopt_kv_pages_needed(const struct coopt_kv_cache *kv, int32_t seq, int64_t n);
// Makes room for n more tokens: allocates pages, and copies a shared partial last page
// (copy-on-write; `copy_page(ud, dst, src)` copies page contents, NULL = no copy). Does not
// advance n_tokens. Returns KV_FULL (nothing changed) if not enough free pages, CTX_FULL
// (nothing changed) past max_pages_per_seq; both silently (expected at runtime). INVALID
// (logged) for a dead seq. A copy that fails (e.g. out of device memory for the new page) makes
// the reserve fail with its status, nothing changed (the new page goes back to the free list).
enum coopt_status coopt_kv_seq_reserve(struct coopt_kv_cache *kv, int32_t seq, int64_t n,
                                       enum coopt_status (*copy_page)(void *ud, int32_t dst, int32_t src), void *ud);
// Advances the sequence by n tokens (after a successful reserve and forward).
void coopt_kv_seq_advance(struct coopt_kv_cache *kv, int32_t seq, int64_t n);
// Slot of position pos of seq: page * page_size + pos % page_size. Page must be allocated.
int64_t coopt_kv_slot(const struct coopt_kv_cache *kv, int32_t seq, int64_t pos);
// Makes dst (dead) share all of src's pages (refcounts++); dst gets src's length. Pages src
// reserved ahead are not shared. Allocates nothing, so it cannot fail for lack of pages.
enum coopt_status coopt_kv_seq_fork(struct coopt_kv_cache *kv, int32_t src, int32_t dst);
// Releases pages wholly before position `first_pos` (sliding window); their table entries become -1.
// Never releases the partial last page (first_pos is clamped to n_tokens).
void coopt_kv_seq_release_before(struct coopt_kv_cache *kv, int32_t seq, int64_t first_pos);
// Drops the positions from n on (n <= n_tokens; a generation taking back a step it ran ahead).
// Pages past the new end stay reserved to the sequence; the slots are written again later.
void coopt_kv_seq_truncate(struct coopt_kv_cache *kv, int32_t seq, int64_t n);
int64_t coopt_kv_pages_used(const struct coopt_kv_cache *kv);

#endif // COOPT_KV_CACHE_H
