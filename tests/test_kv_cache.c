/*
 * test_kv_cache.c -- the paged KV cache manager: page accounting, copy-on-write, forks, the
 * sliding window and the error paths.
 *
 * The random test drives the manager with thousands of operations and compares it after each
 * one against an independent model: every sequence holds "logical page" ids (a fork shares
 * them, a copy-on-write makes a new one), and the test keeps a fake pool of one int per slot
 * so that every position of every sequence can be read back through coopt_kv_slot().
 */
#include "kv_cache.h"
#include "test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- harness: a fake pool (one int per slot) and the callbacks ----

struct fake_pool {
    int32_t  page_size;
    int64_t  n_pages;
    uint32_t *data;      // [n_pages * page_size] value written at each slot
    uint8_t  *reported;  // [n_pages] 1 = freed and reported through on_page_free since last use
    int64_t   n_copies;
    int64_t   n_reports;
    int64_t   n_errors;  // callback misuse seen (double report, report of a referenced page)
    bool      strict;    // checked after every operation: a second report without reuse is an error
    bool      fail_copy; // fake_copy_page fails (out of device memory for the new page)
    struct coopt_kv_cache *kv;
};

static enum coopt_status fake_copy_page(void *ud, int32_t dst, int32_t src) {
    struct fake_pool *fp = ud;
    if (fp->fail_copy) return COOPT_ERR_NOMEM;
    memcpy(fp->data + (size_t)dst * fp->page_size, fp->data + (size_t)src * fp->page_size,
           (size_t)fp->page_size * sizeof(uint32_t));
    fp->n_copies++;
    return COOPT_OK;
}

static void fake_on_page_free(void *ud, int32_t page) {
    struct fake_pool *fp = ud;
    if (page < 0 || page >= fp->n_pages || (fp->strict && fp->reported[page]) || fp->kv->refcount[page] != 0 ||
        fp->kv->free_list[fp->kv->n_free - 1] != page) {
        fp->n_errors++;
        return;
    }
    fp->reported[page] = 1;
    fp->n_reports++;
    // poison the freed page: a sequence still reading it would see the wrong values
    for (int32_t i = 0; i < fp->page_size; i++) fp->data[(size_t)page * fp->page_size + i] = 0xdeadbeef;
}

static struct coopt_kv_cache *make_cache(struct fake_pool *fp, int32_t page_size, int64_t n_pages,
                                         int32_t n_seq, int32_t max_pages) {
    struct coopt_kv_layout l;
    if (coopt_kv_layout_init(&l, COOPT_DTYPE_FP8_E4M3, 2, 2, 8, page_size) != COOPT_OK) return NULL;
    struct coopt_kv_cache *kv = NULL;
    if (coopt_kv_cache_init(&l, n_pages, n_seq, max_pages, &kv) != COOPT_OK) return NULL;
    memset(fp, 0, sizeof(*fp));
    fp->page_size = page_size;
    fp->n_pages   = n_pages;
    fp->data      = calloc((size_t)n_pages * page_size, sizeof(uint32_t));
    fp->reported  = malloc((size_t)n_pages);
    memset(fp->reported, 1, (size_t)n_pages); // every page starts free
    fp->kv              = kv;
    kv->on_page_free    = fake_on_page_free;
    kv->on_page_free_ud = fp;
    return kv;
}

static void fake_pool_free(struct fake_pool *fp) {
    free(fp->data);
    free(fp->reported);
}

// Reserve + write values + advance: what one forward step does to the cache.
static enum coopt_status append(struct coopt_kv_cache *kv, struct fake_pool *fp, int32_t seq, int64_t n,
                                const uint32_t *vals) {
    enum coopt_status st = coopt_kv_seq_reserve(kv, seq, n, fake_copy_page, fp);
    if (st != COOPT_OK) return st;
    int64_t start = kv->seqs[seq].n_tokens;
    for (int64_t i = 0; i < n; i++) fp->data[coopt_kv_slot(kv, seq, start + i)] = vals ? vals[i] : (uint32_t)(start + i);
    coopt_kv_seq_advance(kv, seq, n);
    return COOPT_OK;
}

// Structural invariants that need no model. Returns NULL or a description of the violation.
// Then marks the pages now referenced as in use (for the "reported once" check).
static const char *check_invariants(const struct coopt_kv_cache *kv, struct fake_pool *fp) {
    static char msg[256];
    if (fp && fp->n_errors) return "on_page_free called twice, for a referenced page, or before the push";
    int64_t     n  = kv->n_pages;
    int32_t    *rc = calloc((size_t)n, sizeof(int32_t));
    int8_t     *on_free = calloc((size_t)n, 1);
    const char *err = NULL;
    for (int32_t s = 0; s < kv->n_seq_max && !err; s++) {
        const struct coopt_kv_seq *q = &kv->seqs[s];
        if (!q->live) {
            for (int32_t b = 0; b < kv->max_pages_per_seq; b++)
                if (q->pages[b] != -1) err = "dead sequence holds a page";
            continue;
        }
        int64_t want_blocks = (q->n_tokens + kv->layout.page_size - 1) / kv->layout.page_size;
        if (q->n_blocks != want_blocks) err = "n_blocks != ceil(n_tokens / page_size)";
        bool tail = false; // past the reserved-ahead run every entry must be -1
        for (int32_t b = 0; b < kv->max_pages_per_seq; b++) {
            int32_t p = q->pages[b];
            if (b >= q->n_blocks && p < 0) tail = true;
            if (p < -1 || p >= n) err = "page id out of range";
            else if (p >= 0 && tail) err = "page after the reserved run";
            else if (p >= 0) rc[p]++;
        }
    }
    for (int64_t i = 0; i < kv->n_free && !err; i++) {
        int32_t p = kv->free_list[i];
        if (p < 0 || p >= n) err = "free list entry out of range";
        else if (on_free[p]++) err = "duplicate page on the free list";
    }
    int64_t distinct = 0;
    for (int64_t p = 0; p < n && !err; p++) {
        distinct += rc[p] > 0;
        if (rc[p] != kv->refcount[p]) {
            snprintf(msg, sizeof(msg), "page %lld: refcount %d, referenced by %d table entries", (long long)p,
                     kv->refcount[p], rc[p]);
            err = msg;
        } else if ((rc[p] == 0) != (on_free[p] == 1)) err = "page free iff unreferenced violated";
        else if (fp && rc[p] == 0 && !fp->reported[p]) err = "freed page not reported through on_page_free";
    }
    if (!err && coopt_kv_pages_used(kv) != distinct) err = "pages_used != distinct pages referenced";
    if (!err && fp && fp->n_errors) err = "on_page_free called twice or for a referenced page";
    for (int64_t p = 0; p < n && fp; p++)
        if (rc[p] > 0) fp->reported[p] = 0;
    free(rc);
    free(on_free);
    return err;
}

// ---- the model ----

#define M_SEQ   12
#define M_PAGES 24
#define M_PS    4
#define M_MAXB  10

struct model_seq {
    bool     live;
    int64_t  n_tokens;
    int32_t  n_reserved;              // blocks reserved ahead
    int32_t  block[M_MAXB];           // logical page id, -1 none
    uint32_t val[M_MAXB * M_PS];      // expected value at each position
};

struct model {
    struct model_seq seq[M_SEQ];
    int32_t          next_id;
};

static int32_t model_refs(const struct model *m, int32_t id) {
    int32_t r = 0;
    for (int s = 0; s < M_SEQ; s++) {
        const struct model_seq *q = &m->seq[s];
        if (!q->live) continue;
        int64_t nb = (q->n_tokens + M_PS - 1) / M_PS + q->n_reserved;
        for (int64_t b = 0; b < nb; b++) r += q->block[b] == id;
    }
    return r;
}

static int64_t model_used(const struct model *m) {
    int64_t n = 0;
    for (int32_t id = 0; id < m->next_id; id++) n += model_refs(m, id) > 0;
    return n;
}

// Compares cache and model: same lengths, logical <-> physical pages a bijection, values readable.
static const char *check_model(const struct coopt_kv_cache *kv, const struct fake_pool *fp, const struct model *m) {
    static char msg[256];
    int32_t     log2phys[4096], phys2log[M_PAGES];
    if (m->next_id > 4096) return "model ran out of ids";
    for (int i = 0; i < m->next_id; i++) log2phys[i] = -1;
    for (int i = 0; i < M_PAGES; i++) phys2log[i] = -1;
    for (int s = 0; s < M_SEQ; s++) {
        const struct model_seq    *q = &m->seq[s];
        const struct coopt_kv_seq *k = &kv->seqs[s];
        if (q->live != k->live) return "live flag differs from the model";
        if (!q->live) continue;
        if (q->n_tokens != k->n_tokens) return "n_tokens differs from the model";
        int64_t nb = (q->n_tokens + M_PS - 1) / M_PS + q->n_reserved;
        for (int64_t b = 0; b < M_MAXB; b++) {
            int32_t L = b < nb ? q->block[b] : -1, P = k->pages[b];
            if ((L < 0) != (P < 0)) {
                snprintf(msg, sizeof(msg), "seq %d block %lld: model page %d, cache page %d", s, (long long)b, L, P);
                return msg;
            }
            if (L < 0) continue;
            if (log2phys[L] == -1 && phys2log[P] == -1) log2phys[L] = P, phys2log[P] = L;
            if (log2phys[L] != P || phys2log[P] != L) return "logical and physical pages are not a bijection";
        }
        for (int64_t pos = 0; pos < q->n_tokens; pos++) {
            if (q->block[pos / M_PS] < 0) continue; // released by the sliding window
            int64_t slot = coopt_kv_slot(kv, s, pos);
            if (slot / M_PS != k->pages[pos / M_PS]) return "slot not in the block's page";
            if (fp->data[slot] != q->val[pos]) {
                snprintf(msg, sizeof(msg), "seq %d pos %lld reads %08x, expected %08x", s, (long long)pos,
                         fp->data[slot], q->val[pos]);
                return msg;
            }
        }
    }
    if (coopt_kv_pages_used(kv) != model_used(m)) return "pages_used differs from the model";
    return NULL;
}

TEST(kv_cache_random_ops) {
    struct fake_pool       fp;
    struct coopt_kv_cache *kv = make_cache(&fp, M_PS, M_PAGES, M_SEQ, M_MAXB);
    CHECK(t, kv != NULL);
    fp.strict = true;
    struct model m;
    memset(&m, 0, sizeof(m));
    uint64_t rng = 12345;
    int64_t  n_ok[8] = {0}, n_kv_full = 0, n_ctx_full = 0, n_cow = 0;
    for (int it = 0; it < 6000; it++) {
        int     op  = (int)(test_rand_u64(&rng) % 8);
        int32_t s   = (int32_t)(test_rand_u64(&rng) % M_SEQ);
        struct model_seq *q = &m.seq[s];
        int64_t copies_before = fp.n_copies;
        bool    expect_cow    = false;
        if (op == 0) { // init
            enum coopt_status st = coopt_kv_seq_init(kv, s);
            CHECK(t, (st == COOPT_OK) == !q->live);
            if (st == COOPT_OK) {
                memset(q, 0, sizeof(*q));
                q->live = true;
                for (int b = 0; b < M_MAXB; b++) q->block[b] = -1;
                n_ok[op]++;
            }
        } else if (op == 1 || op == 2 || op == 3) { // append (op 3: reserve ahead only)
            if (!q->live) continue;
            int64_t n  = op == 1 ? 1 + (int64_t)(test_rand_u64(&rng) % 3) : (int64_t)(test_rand_u64(&rng) % 9);
            int64_t nb = (q->n_tokens + M_PS - 1) / M_PS;
            int64_t total = (q->n_tokens + n + M_PS - 1) / M_PS, held = nb + q->n_reserved;
            bool    cow   = n > 0 && q->n_tokens % M_PS && model_refs(&m, q->block[nb - 1]) > 1;
            int64_t need  = (total > held ? total - held : 0) + cow;
            CHECK(t, n == 0 || coopt_kv_pages_needed(kv, s, n) == need);
            enum coopt_status want = total > M_MAXB                     ? COOPT_ERR_CTX_FULL
                                     : need > M_PAGES - model_used(&m) ? COOPT_ERR_KV_FULL
                                                                       : COOPT_OK;
            uint32_t vals[16];
            for (int64_t i = 0; i < n; i++) vals[i] = (uint32_t)test_rand_u64(&rng);
            enum coopt_status st = op == 3 ? coopt_kv_seq_reserve(kv, s, n, fake_copy_page, &fp)
                                           : append(kv, &fp, s, n, vals);
            CHECKF(t, st == want, "it %d: status %d, model says %d", it, st, want);
            n_kv_full += st == COOPT_ERR_KV_FULL;
            n_ctx_full += st == COOPT_ERR_CTX_FULL;
            if (st != COOPT_OK) { // nothing changed: checked against the model below
                CHECK(t, fp.n_copies == copies_before);
                continue;
            }
            expect_cow = cow;
            if (cow) q->block[nb - 1] = m.next_id++;
            for (int64_t b = held; b < total; b++) q->block[b] = m.next_id++;
            int64_t new_held = held > total ? held : total;
            if (op == 3) {
                q->n_reserved = (int32_t)(new_held - nb);
            } else {
                for (int64_t i = 0; i < n; i++) q->val[q->n_tokens + i] = vals[i];
                q->n_tokens += n;
                q->n_reserved = (int32_t)(new_held - total);
            }
            n_ok[op]++;
        } else if (op == 4) { // free
            if (test_rand_u64(&rng) % 3) continue; // keep sequences around long enough to fill up
            coopt_kv_seq_free(kv, s);
            q->live = false;
            n_ok[op]++;
        } else if (op == 5) { // fork s -> d
            int32_t           d  = (int32_t)(test_rand_u64(&rng) % M_SEQ);
            enum coopt_status st = coopt_kv_seq_fork(kv, s, d);
            CHECK(t, (st == COOPT_OK) == (q->live && !m.seq[d].live && d != s));
            if (st != COOPT_OK) continue;
            struct model_seq *r = &m.seq[d];
            *r            = *q;
            r->n_reserved = 0;
            int64_t nb    = (q->n_tokens + M_PS - 1) / M_PS;
            for (int64_t b = nb; b < M_MAXB; b++) r->block[b] = -1;
            n_ok[op]++;
        } else if (op == 6) { // sliding window
            if (!q->live || q->n_tokens == 0) continue;
            int64_t first = (int64_t)(test_rand_u64(&rng) % (uint64_t)(q->n_tokens + 6));
            coopt_kv_seq_release_before(kv, s, first);
            int64_t end = (first < q->n_tokens ? first : q->n_tokens) / M_PS;
            for (int64_t b = 0; b < end; b++) q->block[b] = -1;
            n_ok[op]++;
        } else { // occasionally free everything
            if (test_rand_u64(&rng) % 50) continue;
            for (int32_t i = 0; i < M_SEQ; i++) {
                coopt_kv_seq_free(kv, i);
                m.seq[i].live = false;
            }
            CHECK(t, kv->n_free == kv->n_pages);
            n_ok[op]++;
        }
        CHECKF(t, fp.n_copies - copies_before == (expect_cow ? 1 : 0), "it %d op %d: %lld copies, expected %d", it,
               op, (long long)(fp.n_copies - copies_before), expect_cow);
        n_cow += expect_cow;
        const char *err = check_invariants(kv, &fp);
        CHECKF(t, !err, "it %d op %d: %s", it, op, err);
        err = check_model(kv, &fp, &m);
        CHECKF(t, !err, "it %d op %d: %s", it, op, err);
    }
    // the workload exercised every path
    for (int op = 0; op < 8; op++) CHECKF(t, n_ok[op] > 0, "op %d never succeeded", op);
    CHECKF(t, n_kv_full > 20 && n_ctx_full > 20 && n_cow > 20, "kv_full %lld ctx_full %lld cow %lld",
           (long long)n_kv_full, (long long)n_ctx_full, (long long)n_cow);
    for (int32_t i = 0; i < M_SEQ; i++) coopt_kv_seq_free(kv, i);
    CHECK(t, kv->n_free == kv->n_pages && coopt_kv_pages_used(kv) == 0);
    CHECK(t, !check_invariants(kv, &fp));
    for (int64_t p = 0; p < kv->n_pages; p++) CHECK(t, fp.reported[p] == 1);
    coopt_kv_cache_free(kv);
    fake_pool_free(&fp);
}

// ---- targeted tests ----

struct snapshot {
    int64_t n_free;
    int32_t free_list[64], refcount[64], pages[8][16];
    int64_t n_tokens[8];
};

static void take_snapshot(const struct coopt_kv_cache *kv, struct snapshot *s) {
    memset(s, 0, sizeof(*s));
    s->n_free = kv->n_free;
    memcpy(s->free_list, kv->free_list, (size_t)kv->n_pages * sizeof(int32_t));
    memcpy(s->refcount, kv->refcount, (size_t)kv->n_pages * sizeof(int32_t));
    for (int i = 0; i < kv->n_seq_max; i++) {
        memcpy(s->pages[i], kv->seqs[i].pages, (size_t)kv->max_pages_per_seq * sizeof(int32_t));
        s->n_tokens[i] = kv->seqs[i].n_tokens;
    }
}

TEST(kv_cache_full_leaves_unchanged) {
    struct fake_pool       fp;
    struct coopt_kv_cache *kv = make_cache(&fp, 4, 6, 4, 16);
    CHECK(t, kv != NULL);
    CHECK(t, coopt_kv_seq_init(kv, 0) == COOPT_OK);
    CHECK(t, append(kv, &fp, 0, 10, NULL) == COOPT_OK); // 3 pages, last partial
    CHECK(t, coopt_kv_seq_fork(kv, 0, 1) == COOPT_OK);
    CHECK(t, coopt_kv_seq_init(kv, 2) == COOPT_OK);
    CHECK(t, coopt_kv_seq_reserve(kv, 2, 12, fake_copy_page, &fp) == COOPT_OK); // 3 more: pool full
    CHECK(t, kv->n_free == 0 && coopt_kv_pages_used(kv) == 6);

    struct snapshot before, after;
    take_snapshot(kv, &before);
    // plain growth, and a copy-on-write that needs one page: both KV_FULL, nothing changes
    CHECK(t, coopt_kv_pages_needed(kv, 0, 1) == 1); // cow of the shared partial page
    CHECK(t, coopt_kv_seq_reserve(kv, 0, 1, fake_copy_page, &fp) == COOPT_ERR_KV_FULL);
    CHECK(t, coopt_kv_seq_reserve(kv, 1, 7, fake_copy_page, &fp) == COOPT_ERR_KV_FULL);
    CHECK(t, coopt_kv_seq_reserve(kv, 2, 13, fake_copy_page, &fp) == COOPT_ERR_KV_FULL);
    take_snapshot(kv, &after);
    CHECK(t, memcmp(&before, &after, sizeof(before)) == 0);
    CHECK(t, fp.n_copies == 0);
    // reserving within what is already held needs no page
    CHECK(t, coopt_kv_pages_needed(kv, 2, 12) == 0);
    CHECK(t, coopt_kv_seq_reserve(kv, 2, 12, fake_copy_page, &fp) == COOPT_OK);
    // freeing one sequence makes room again
    coopt_kv_seq_free(kv, 2);
    CHECK(t, coopt_kv_seq_reserve(kv, 0, 1, fake_copy_page, &fp) == COOPT_OK);
    CHECK(t, fp.n_copies == 1);
    CHECK(t, !check_invariants(kv, &fp));
    coopt_kv_cache_free(kv);
    fake_pool_free(&fp);
}

TEST(kv_cache_copy_on_write) {
    struct fake_pool       fp;
    struct coopt_kv_cache *kv = make_cache(&fp, 4, 16, 4, 8);
    CHECK(t, kv != NULL);
    CHECK(t, coopt_kv_seq_init(kv, 0) == COOPT_OK);
    CHECK(t, append(kv, &fp, 0, 6, NULL) == COOPT_OK); // pages p0 (full), p1 (2 of 4)
    int32_t p0 = kv->seqs[0].pages[0], p1 = kv->seqs[0].pages[1];
    CHECK(t, coopt_kv_seq_fork(kv, 0, 1) == COOPT_OK);
    CHECK(t, kv->refcount[p0] == 2 && kv->refcount[p1] == 2 && coopt_kv_pages_used(kv) == 2);
    CHECK(t, fp.n_copies == 0);

    // a copy that fails (the backend is out of memory for the new page): the reserve fails with
    // its status and nothing changes -- the new page is free again, the fork still shares p1
    struct snapshot before, after;
    take_snapshot(kv, &before);
    fp.fail_copy = true;
    CHECK(t, coopt_kv_seq_reserve(kv, 1, 1, fake_copy_page, &fp) == COOPT_ERR_NOMEM);
    fp.fail_copy = false;
    take_snapshot(kv, &after);
    CHECK(t, memcmp(&before, &after, sizeof(before)) == 0 && fp.n_copies == 0 && !check_invariants(kv, &fp));

    // the fork appends into the shared partial page: exactly one copy, old page keeps one ref
    uint32_t v = 777;
    CHECK(t, append(kv, &fp, 1, 1, &v) == COOPT_OK);
    CHECK(t, fp.n_copies == 1);
    int32_t q1 = kv->seqs[1].pages[1];
    CHECK(t, q1 != p1 && kv->seqs[1].pages[0] == p0);
    CHECK(t, kv->refcount[p1] == 1 && kv->refcount[q1] == 1 && kv->refcount[p0] == 2);
    // the copy carried the shared rows; the source is untouched
    CHECK(t, fp.data[coopt_kv_slot(kv, 1, 4)] == 4 && fp.data[coopt_kv_slot(kv, 1, 5)] == 5);
    CHECK(t, fp.data[coopt_kv_slot(kv, 1, 6)] == 777);
    CHECK(t, coopt_kv_slot(kv, 0, 6) == (int64_t)p1 * 4 + 2);

    // the source now owns p1 alone: appending (even across a page boundary) copies nothing
    CHECK(t, append(kv, &fp, 0, 3, NULL) == COOPT_OK);
    CHECK(t, fp.n_copies == 1 && kv->seqs[0].pages[1] == p1);
    // appending into a shared FULL page never happens: new tokens go to a new page
    CHECK(t, coopt_kv_seq_fork(kv, 0, 2) == COOPT_OK); // seq 0 has 9 tokens: p0, p1 full, partial
    CHECK(t, append(kv, &fp, 2, 1, NULL) == COOPT_OK);
    CHECK(t, fp.n_copies == 2); // the partial third page was copied, p0/p1 stay shared
    CHECK(t, kv->seqs[2].pages[0] == p0 && kv->seqs[2].pages[1] == p1);
    CHECK(t, kv->refcount[p0] == 3 && kv->refcount[p1] == 2);
    CHECK(t, !check_invariants(kv, &fp));
    coopt_kv_cache_free(kv);
    fake_pool_free(&fp);
}

TEST(kv_cache_fork_aligned_no_copy) {
    struct fake_pool       fp;
    struct coopt_kv_cache *kv = make_cache(&fp, 4, 16, 4, 8);
    CHECK(t, kv != NULL);
    CHECK(t, coopt_kv_seq_init(kv, 0) == COOPT_OK);
    CHECK(t, append(kv, &fp, 0, 8, NULL) == COOPT_OK);
    for (int32_t d = 1; d < 4; d++) CHECK(t, coopt_kv_seq_fork(kv, 0, d) == COOPT_OK);
    CHECK(t, coopt_kv_pages_used(kv) == 2);
    for (int32_t d = 0; d < 4; d++) {
        CHECK(t, coopt_kv_pages_needed(kv, d, 1) == 1);
        CHECK(t, append(kv, &fp, d, 1, NULL) == COOPT_OK);
    }
    CHECK(t, fp.n_copies == 0);
    CHECK(t, coopt_kv_pages_used(kv) == 2 + 4);
    CHECK(t, kv->refcount[kv->seqs[3].pages[0]] == 4 && kv->refcount[kv->seqs[3].pages[1]] == 4);
    CHECK(t, !check_invariants(kv, &fp));
    coopt_kv_cache_free(kv);
    fake_pool_free(&fp);
}

TEST(kv_cache_n_samples_share_prompt) {
    // 8 samples of one 100-token prompt (page 16): the prompt is stored once
    struct fake_pool       fp;
    struct coopt_kv_cache *kv = make_cache(&fp, 16, 64, 9, 16);
    CHECK(t, kv != NULL);
    CHECK(t, coopt_kv_seq_init(kv, 0) == COOPT_OK);
    CHECK(t, append(kv, &fp, 0, 100, NULL) == COOPT_OK);
    CHECK(t, coopt_kv_pages_used(kv) == 7);
    for (int32_t d = 1; d <= 8; d++) CHECK(t, coopt_kv_seq_fork(kv, 0, d) == COOPT_OK);
    coopt_kv_seq_free(kv, 0);
    CHECK(t, coopt_kv_pages_used(kv) == 7); // not 8 * 7
    for (int32_t d = 1; d <= 8; d++) CHECK(t, append(kv, &fp, d, 1, NULL) == COOPT_OK);
    // 6 full pages shared; 7 samples copied the partial page, the last one took it over
    CHECK(t, fp.n_copies == 7);
    CHECK(t, coopt_kv_pages_used(kv) == 6 + 8);
    for (int32_t d = 1; d <= 8; d++)
        for (int64_t pos = 0; pos < 101; pos++) CHECK(t, fp.data[coopt_kv_slot(kv, d, pos)] == (uint32_t)pos);
    CHECK(t, !check_invariants(kv, &fp));
    coopt_kv_cache_free(kv);
    fake_pool_free(&fp);
}

TEST(kv_cache_page_waste) {
    // without sharing, every sequence wastes less than one page
    struct fake_pool       fp;
    const int32_t          ps = 16, n_seq = 32;
    struct coopt_kv_cache *kv = make_cache(&fp, ps, 1024, n_seq, 64);
    CHECK(t, kv != NULL);
    uint64_t rng = 7;
    for (int32_t s = 0; s < n_seq; s++) CHECK(t, coopt_kv_seq_init(kv, s) == COOPT_OK);
    for (int step = 0; step < 400; step++) {
        int32_t s = (int32_t)(test_rand_u64(&rng) % n_seq);
        int64_t n = 1 + (int64_t)(test_rand_u64(&rng) % 40);
        if (kv->seqs[s].n_tokens + n > 64 * ps) continue;
        CHECK(t, append(kv, &fp, s, n, NULL) == COOPT_OK);
    }
    int64_t tokens = 0;
    for (int32_t s = 0; s < n_seq; s++) {
        const struct coopt_kv_seq *q = &kv->seqs[s];
        CHECK(t, (int64_t)q->n_blocks * ps - q->n_tokens < ps);
        tokens += q->n_tokens;
    }
    CHECK(t, coopt_kv_pages_used(kv) * ps - tokens < (int64_t)n_seq * ps);
    int64_t blocks = 0;
    for (int32_t s = 0; s < n_seq; s++) blocks += kv->seqs[s].n_blocks;
    CHECK(t, coopt_kv_pages_used(kv) == blocks);
    CHECK(t, !check_invariants(kv, &fp));
    coopt_kv_cache_free(kv);
    fake_pool_free(&fp);
}

TEST(kv_cache_ctx_full) {
    struct fake_pool       fp;
    struct coopt_kv_cache *kv = make_cache(&fp, 4, 32, 2, 4); // at most 16 tokens per sequence
    CHECK(t, kv != NULL);
    CHECK(t, coopt_kv_seq_init(kv, 0) == COOPT_OK);
    CHECK(t, coopt_kv_seq_reserve(kv, 0, 17, fake_copy_page, &fp) == COOPT_ERR_CTX_FULL);
    CHECK(t, coopt_kv_pages_used(kv) == 0);
    CHECK(t, append(kv, &fp, 0, 10, NULL) == COOPT_OK);
    CHECK(t, coopt_kv_seq_reserve(kv, 0, 7, fake_copy_page, &fp) == COOPT_ERR_CTX_FULL);
    CHECK(t, coopt_kv_pages_used(kv) == 3 && kv->seqs[0].n_tokens == 10);
    CHECK(t, append(kv, &fp, 0, 6, NULL) == COOPT_OK);
    CHECK(t, coopt_kv_seq_reserve(kv, 0, 1, fake_copy_page, &fp) == COOPT_ERR_CTX_FULL);
    CHECK(t, coopt_kv_pages_used(kv) == 4 && kv->seqs[0].n_tokens == 16);
    // the sliding window frees pages but does not renumber blocks: still full
    coopt_kv_seq_release_before(kv, 0, 8);
    CHECK(t, coopt_kv_pages_used(kv) == 2);
    CHECK(t, coopt_kv_seq_reserve(kv, 0, 1, fake_copy_page, &fp) == COOPT_ERR_CTX_FULL);
    CHECK(t, !check_invariants(kv, &fp));
    coopt_kv_cache_free(kv);
    fake_pool_free(&fp);
}

TEST(kv_cache_sliding_window) {
    struct fake_pool       fp;
    struct coopt_kv_cache *kv = make_cache(&fp, 4, 16, 2, 8);
    CHECK(t, kv != NULL);
    CHECK(t, coopt_kv_seq_init(kv, 0) == COOPT_OK);
    CHECK(t, append(kv, &fp, 0, 14, NULL) == COOPT_OK); // blocks 0..3, last holds 2
    int32_t p2 = kv->seqs[0].pages[2], p3 = kv->seqs[0].pages[3];
    int64_t slot13 = coopt_kv_slot(kv, 0, 13);
    coopt_kv_seq_release_before(kv, 0, 9); // blocks 0, 1 wholly before position 9
    CHECK(t, kv->seqs[0].pages[0] == -1 && kv->seqs[0].pages[1] == -1 && kv->seqs[0].pages[2] == p2);
    CHECK(t, coopt_kv_pages_used(kv) == 2 && fp.n_reports == 2);
    CHECK(t, coopt_kv_slot(kv, 0, 13) == slot13 && fp.data[slot13] == 13); // block index stays pos / page
    coopt_kv_seq_release_before(kv, 0, 9); // idempotent
    CHECK(t, coopt_kv_pages_used(kv) == 2 && fp.n_reports == 2);
    // a window past the end keeps the partial last page (it will be appended to)
    coopt_kv_seq_release_before(kv, 0, 100);
    CHECK(t, kv->seqs[0].pages[2] == -1 && kv->seqs[0].pages[3] == p3 && coopt_kv_pages_used(kv) == 1);
    CHECK(t, append(kv, &fp, 0, 3, NULL) == COOPT_OK);
    CHECK(t, fp.data[coopt_kv_slot(kv, 0, 16)] == 16 && fp.data[coopt_kv_slot(kv, 0, 13)] == 13);
    // a fork of a windowed sequence shares only what is left
    CHECK(t, coopt_kv_seq_fork(kv, 0, 1) == COOPT_OK);
    CHECK(t, kv->seqs[1].pages[0] == -1 && kv->refcount[p3] == 2 && coopt_kv_pages_used(kv) == 2);
    CHECK(t, !check_invariants(kv, &fp));
    coopt_kv_seq_free(kv, 0);
    coopt_kv_seq_free(kv, 1);
    CHECK(t, kv->n_free == 16 && fp.n_reports == 5); // 5 pages were ever allocated, each reported once
    CHECK(t, !check_invariants(kv, &fp));
    coopt_kv_cache_free(kv);
    fake_pool_free(&fp);
}

TEST(kv_cache_invalid_args) {
    struct coopt_kv_layout l;
    struct coopt_kv_cache *kv = (struct coopt_kv_cache *)1;
    CHECK(t, coopt_kv_layout_init(&l, COOPT_DTYPE_F16, 1, 1, 4, 4) == COOPT_OK);
    CHECK(t, coopt_kv_cache_init(&l, 0, 1, 1, &kv) == COOPT_ERR_INVALID && kv == NULL);
    CHECK(t, coopt_kv_cache_init(&l, 4, 0, 1, &kv) == COOPT_ERR_INVALID && kv == NULL);
    CHECK(t, coopt_kv_cache_init(&l, (int64_t)1 << 40, 1, 1, &kv) == COOPT_ERR_INVALID && kv == NULL);
    CHECK(t, coopt_kv_cache_init(&l, 4, 2, 2, &kv) == COOPT_OK && kv != NULL);
    CHECK(t, coopt_kv_seq_init(kv, -1) == COOPT_ERR_INVALID);
    CHECK(t, coopt_kv_seq_init(kv, 2) == COOPT_ERR_INVALID);
    CHECK(t, coopt_kv_seq_init(kv, 0) == COOPT_OK);
    CHECK(t, coopt_kv_seq_init(kv, 0) == COOPT_ERR_INVALID); // already live
    CHECK(t, coopt_kv_seq_reserve(kv, 1, 1, NULL, NULL) == COOPT_ERR_INVALID); // dead
    CHECK(t, coopt_kv_seq_reserve(kv, 5, 1, NULL, NULL) == COOPT_ERR_INVALID);
    CHECK(t, coopt_kv_seq_reserve(kv, 0, -1, NULL, NULL) == COOPT_ERR_INVALID);
    CHECK(t, coopt_kv_pages_needed(kv, 1, 1) == -1);
    CHECK(t, coopt_kv_seq_fork(kv, 1, 0) == COOPT_ERR_INVALID); // dead source
    CHECK(t, coopt_kv_seq_fork(kv, 0, 0) == COOPT_ERR_INVALID); // live target
    CHECK(t, coopt_kv_seq_fork(kv, 0, 9) == COOPT_ERR_INVALID);
    CHECK(t, coopt_kv_pages_used(kv) == 0);
    coopt_kv_seq_free(kv, 1);  // dead: ignored
    coopt_kv_seq_free(kv, 42); // out of range: ignored
    coopt_kv_seq_release_before(kv, 1, 10);
    CHECK(t, kv->seqs[0].live && !kv->seqs[1].live);
    coopt_kv_cache_free(kv);
    coopt_kv_cache_free(NULL);
}
