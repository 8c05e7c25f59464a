/*
 * tokenizer.c -- the encoder and the streaming decoder, shared by every vocabulary source.
 *
 * Two model types (enum coopt_tok_type):
 *  - COOPT_TOK_SPM: SentencePiece-style BPE. The text is normalized (optional dummy prefix,
 *    spaces -> U+2581 '▁'), split into UTF-8 characters, and adjacent symbols are merged by
 *    priority: the merge rank when the vocabulary has merges (Hugging Face tokenizer.json,
 *    "a b" rank = index), else the score of the merged piece (sentencepiece / GGUF / llama2.c:
 *    higher first). Ties go to the leftmost pair, exactly as sentencepiece's bpe_model.cc and
 *    HF tokenizers' Word::merge_all. Unknown characters fall back to <0xXX> byte tokens.
 *  - COOPT_TOK_BPE_BYTES: byte-level BPE (GPT-2, LLaMA 3). The text is split by a hand-written
 *    version of the pre-tokenizer regex (GPT-2 or LLaMA 3), every byte of a chunk is mapped to
 *    a printable character (GPT-2 bytes_to_unicode) and the chunk is merged by rank.
 *
 * The merge loop is a binary heap of candidate pairs over a doubly linked list of symbols, so
 * encoding is O(n log n) in the length of a word. SentencePiece BPE is not splittable in general;
 * an SPM text is cut only where the vocabulary proves no piece can span the cut (no piece has
 * "x▁" inside it, as in LLaMA's vocabulary: 1 MB in ~0.13 s), else it is one word (~1 s for 1 MB).
 * Stale heap entries are detected by re-checking that the pair is still adjacent and still has
 * the byte length recorded when it was pushed.
 *
 * Special tokens: before encoding, the text is split on the text of added tokens (leftmost,
 * longest match). USER_DEFINED tokens are always matched; CONTROL and UNKNOWN ones only with
 * COOPT_TOKENIZE_PARSE_SPECIAL. Each remaining fragment is encoded on its own; the SPM dummy
 * prefix is added to every fragment (HF and llama.cpp do the same), or only the first one for
 * Metaspace prepend_scheme "first".
 *
 * Decoding: SPM '▁' -> ' ', <0xXX> -> the raw byte; byte-level characters map back to bytes;
 * CONTROL/UNKNOWN/UNUSED tokens produce nothing; USER_DEFINED tokens produce their raw text.
 * Leading space (our choice, see coopt.h): for SPM vocabularies that add a dummy prefix, the
 * token right after BOS drops one leading space -- this is what HF tokenizer.decode and
 * sentencepiece decode give for an encoded prompt ("<s> Once" decodes to "Once"); any other
 * token keeps its space, so a stream of generated tokens continuing a prompt reads correctly.
 * Bytes pass through a UTF-8 validator that holds an incomplete character in struct
 * coopt_detok and replaces each maximal invalid subsequence by U+FFFD (Python's
 * errors="replace"), so streaming output equals a one-shot decode of the same ids.
 */
#include "tokenizer.h"
#include "unicode_tables.h"
#include "util.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Implemented by the GGUF module (src/gguf.c): reads tokenizer.ggml.* metadata.
enum coopt_status coopt_gguf_load_tokenizer(const char *path, struct coopt_tokenizer **out);

#define TOK_FLAG_EOG     1u
#define TOK_FLAG_SPECIAL 2u // matched in text (with PARSE_SPECIAL unless USER_DEFINED)

// Loader-only options that struct coopt_vocab_desc does not carry.
struct tok_options {
    bool spm_prefix_first_only; // Metaspace prepend_scheme "first": dummy prefix on fragment 0 only
    bool remove_extra_ws;       // sentencepiece normalizer remove_extra_whitespaces
    bool ignore_merges;         // HF BPE ignore_merges: a chunk that is a whole token is kept
    bool fuse_unk;              // HF BPE fuse_unk: consecutive unknown characters give one unk
    // HF Prepend("▁") normalizer with normalized=true added tokens: tokens are matched in the
    // normalized text as "▁<tok>", i.e. only at the start or after a space, which they consume.
    bool specials_eat_space;
};

struct merge_entry {
    uint64_t key; // (left id << 32) | right id; 0 = empty slot (ids are offset by 1)
    int32_t  rank;
    int32_t  id;  // merged token
};

struct coopt_tokenizer {
    enum coopt_tok_type type;
    enum coopt_pretok   pretok;
    int32_t             n_vocab;
    char               *text;      // all pieces, each NUL-terminated
    uint32_t           *piece_off; // [n_vocab] offset into text
    uint32_t           *piece_len; // [n_vocab]
    float              *scores;    // [n_vocab]
    uint8_t            *attrs;     // [n_vocab] enum coopt_token_attr
    uint8_t            *flags;     // [n_vocab] TOK_FLAG_*
    int16_t            *byte_val;  // [n_vocab] byte of a BYTE token, else -1
    int32_t             bos, eos, unk, pad;
    bool                add_bos, add_eos, add_space_prefix;
    struct tok_options  opt;
    uint32_t            max_piece_len;
    // SPM: bit 0: no mergeable piece has '▁' right after another character, so the text can be
    // cut before every such '▁'; bit 1: no piece has a character right after '▁' (cut after it)
    unsigned            spm_split;

    int32_t            *hash; // piece text -> id, open addressing, -1 empty
    uint32_t            hash_mask;

    struct merge_entry *merges; // pair of ids -> (rank, merged id)
    uint32_t            merge_mask;
    int32_t             n_merges;

    char     byte_chr[256][2]; // byte-level: UTF-8 of the character byte b maps to
    uint8_t  byte_chr_len[256];
    int16_t  cp_byte[512];     // byte-level: codepoint (< 512) -> byte, -1 if not in the alphabet
    int32_t byte_ids[256]; // SPM: <0xXX> token; byte-level: token of the mapped character; -1

    int32_t *specials;       // [n_specials] ids matched in text, sorted by piece length, longest first
    int32_t  n_specials;
    uint8_t  special_first[256]; // 1 if some special token starts with this byte
};

// ---- small helpers ----

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; // FNV-1a
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static int32_t vocab_find(const struct coopt_tokenizer *tok, const char *s, size_t n) {
    if (n == 0 || n > tok->max_piece_len) return -1;
    uint32_t i = (uint32_t)hash_bytes(s, n) & tok->hash_mask;
    for (;;) {
        int32_t id = tok->hash[i];
        if (id < 0) return -1;
        if (tok->piece_len[id] == n && memcmp(tok->text + tok->piece_off[id], s, n) == 0) return id;
        i = (i + 1) & tok->hash_mask;
    }
}

static const struct merge_entry *merge_find(const struct coopt_tokenizer *tok, int32_t a, int32_t b) {
    if (!tok->merges) return NULL;
    uint64_t key = ((uint64_t)(uint32_t)(a + 1) << 32) | (uint32_t)(b + 1);
    uint32_t i   = (uint32_t)hash_u64(key) & tok->merge_mask;
    for (;;) {
        const struct merge_entry *e = &tok->merges[i];
        if (e->key == 0) return NULL;
        if (e->key == key) return e;
        i = (i + 1) & tok->merge_mask;
    }
}

// Length of the UTF-8 character starting at s[0] (1 for an invalid or truncated sequence),
// and its codepoint (the raw byte | 0x80000000 for invalid bytes, which no class contains).
static size_t utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t   len;
    uint32_t v;
    uint8_t  lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        v   = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        v   = c & 0x0f;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        v   = c & 0x07;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else {
        *cp = 0x80000000u | c;
        return 1;
    }
    if (len > n) {
        *cp = 0x80000000u | c;
        return 1;
    }
    for (size_t i = 1; i < len; i++) {
        uint8_t b = s[i];
        if (b < lo || b > hi) {
            *cp = 0x80000000u | c;
            return 1;
        }
        lo = 0x80;
        hi = 0xbf;
        v  = (v << 6) | (b & 0x3f);
    }
    *cp = v;
    return len;
}

static size_t utf8_put(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

static bool in_ranges(const uint32_t (*r)[2], size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return true;
    }
    return false;
}

static bool cp_is_letter(uint32_t cp) {
    if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in_ranges(unicode_letter_ranges, COOPT_ARRAY_LEN(unicode_letter_ranges), cp);
}

static bool cp_is_number(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in_ranges(unicode_number_ranges, COOPT_ARRAY_LEN(unicode_number_ranges), cp);
}

// \s of the regex engines HF tokenizers uses (Oniguruma, Rust regex): Unicode White_Space.
static bool cp_is_space(uint32_t cp) {
    if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0d);
    return cp == 0x85 || cp == 0xa0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

// GPT-2 bytes_to_unicode: printable latin-1 bytes map to themselves, the others to 256+k.
static uint32_t byte_to_cp(uint8_t b) {
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae)) return b;
    uint32_t k = 0;
    for (uint32_t x = 0; x < b; x++)
        if (!((x >= 0x21 && x <= 0x7e) || (x >= 0xa1 && x <= 0xac) || (x >= 0xae))) k++;
    return 256 + k;
}

// Inverse of byte_to_cp; -1 if cp is not in the byte alphabet.
static int cp_to_byte(uint32_t cp) {
    if (cp < 256) {
        uint8_t b = (uint8_t)cp;
        return byte_to_cp(b) == cp ? b : -1;
    }
    if (cp >= 256 + 68) return -1; // 68 bytes are remapped
    uint32_t k = cp - 256;
    for (uint32_t x = 0; x < 256; x++)
        if (!((x >= 0x21 && x <= 0x7e) || (x >= 0xa1 && x <= 0xac) || (x >= 0xae)) && k-- == 0) return (int)x;
    return -1;
}

static int hex_val(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

// "<0xXX>" -> XX, else -1.
static int parse_byte_piece(const char *s, size_t n) {
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') return -1;
    int h = hex_val(s[3]), l = hex_val(s[4]);
    return (h < 0 || l < 0) ? -1 : h * 16 + l;
}

// ---- construction ----

void coopt_tokenizer_free(struct coopt_tokenizer *tok) {
    if (!tok) return;
    free(tok->text);
    free(tok->piece_off);
    free(tok->piece_len);
    free(tok->scores);
    free(tok->attrs);
    free(tok->flags);
    free(tok->byte_val);
    free(tok->hash);
    free(tok->merges);
    free(tok->specials);
    free(tok);
}

static uint32_t pow2_at_least(uint64_t n) {
    uint64_t p = 16;
    while (p < n) p <<= 1;
    return (uint32_t)p;
}

static size_t desc_len(const struct coopt_vocab_desc *d, int32_t i) {
    return d->token_lens ? d->token_lens[i] : strlen(d->tokens[i]);
}

static int cmp_special(const void *a, const void *b, void *ctx) {
    const struct coopt_tokenizer *tok = ctx;
    int32_t  x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx = tok->piece_len[x], ly = tok->piece_len[y];
    if (lx != ly) return lx > ly ? -1 : 1;
    return x < y ? -1 : (x > y);
}

static enum coopt_status tokenizer_init(const struct coopt_vocab_desc *d, const struct tok_options *opt,
                                        struct coopt_tokenizer **out) {
    *out = NULL;
    if (!d || d->n_tokens <= 0 || !d->tokens)
        return coopt_fail(COOPT_ERR_FORMAT, "tokenizer: empty vocabulary");
    if (d->type != COOPT_TOK_SPM && d->type != COOPT_TOK_BPE_BYTES)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "tokenizer: unknown type %d", (int)d->type);
    int32_t     n   = d->n_tokens;
    const char *ids[4] = {"bos", "eos", "unk", "pad"};
    int32_t     idv[4] = {d->bos_id, d->eos_id, d->unk_id, d->pad_id};
    for (int k = 0; k < 4; k++)
        if (idv[k] < -1 || idv[k] >= n)
            return coopt_fail(COOPT_ERR_FORMAT, "tokenizer: %s id %d out of range [0, %d)", ids[k], idv[k], n);
    if (d->n_merges < 0 || (d->n_merges > 0 && !d->merges))
        return coopt_fail(COOPT_ERR_FORMAT, "tokenizer: bad merges");

    struct coopt_tokenizer *tok = coopt_calloc(1, sizeof(*tok));
    if (!tok) return COOPT_ERR_NOMEM;
    enum coopt_status st = COOPT_ERR_NOMEM;
    tok->type             = d->type;
    tok->pretok           = d->pretok;
    tok->n_vocab          = n;
    tok->bos              = d->bos_id;
    tok->eos              = d->eos_id;
    tok->unk              = d->unk_id;
    tok->pad              = d->pad_id;
    tok->add_bos          = d->add_bos && d->bos_id >= 0;
    tok->add_eos          = d->add_eos && d->eos_id >= 0;
    tok->add_space_prefix = d->add_space_prefix;
    if (opt) tok->opt = *opt;

    size_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        if (!d->tokens[i]) {
            coopt_tokenizer_free(tok);
            return coopt_fail(COOPT_ERR_FORMAT, "tokenizer: token %d has no text", i);
        }
        size_t l = desc_len(d, i);
        if (l > 65536) {
            coopt_tokenizer_free(tok);
            return coopt_fail(COOPT_ERR_FORMAT, "tokenizer: token %d is %zu bytes long", i, l);
        }
        total += l + 1;
    }
    tok->text      = coopt_malloc(total);
    tok->piece_off = coopt_malloc((size_t)n * sizeof(uint32_t));
    tok->piece_len = coopt_malloc((size_t)n * sizeof(uint32_t));
    tok->scores    = coopt_malloc((size_t)n * sizeof(float));
    tok->attrs     = coopt_malloc((size_t)n);
    tok->flags     = coopt_calloc((size_t)n, 1);
    tok->byte_val  = coopt_malloc((size_t)n * sizeof(int16_t));
    tok->hash_mask = pow2_at_least((uint64_t)n * 2) - 1;
    tok->hash      = coopt_malloc(((size_t)tok->hash_mask + 1) * sizeof(int32_t));
    if (!tok->text || !tok->piece_off || !tok->piece_len || !tok->scores || !tok->attrs || !tok->flags ||
        !tok->byte_val || !tok->hash)
        goto fail;
    memset(tok->hash, 0xff, ((size_t)tok->hash_mask + 1) * sizeof(int32_t));

    size_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        size_t l = desc_len(d, i);
        memcpy(tok->text + off, d->tokens[i], l);
        tok->text[off + l] = 0;
        tok->piece_off[i]  = (uint32_t)off;
        tok->piece_len[i]  = (uint32_t)l;
        off += l + 1;
        tok->scores[i] = d->scores ? d->scores[i] : 0.0f;
        int32_t a      = d->token_attrs ? d->token_attrs[i] : COOPT_TOKEN_NORMAL;
        if (a < COOPT_TOKEN_NORMAL || a > COOPT_TOKEN_BYTE) a = COOPT_TOKEN_NORMAL;
        tok->attrs[i]    = (uint8_t)a;
        tok->byte_val[i] = -1;
        if (l > tok->max_piece_len) tok->max_piece_len = (uint32_t)l;
    }
    // hash: the first id wins for duplicated texts
    for (int32_t i = 0; i < n; i++) {
        uint32_t l = tok->piece_len[i];
        if (l == 0) continue;
        const char *s = tok->text + tok->piece_off[i];
        uint32_t    h = (uint32_t)hash_bytes(s, l) & tok->hash_mask;
        bool        dup = false;
        while (tok->hash[h] >= 0) {
            int32_t o = tok->hash[h];
            if (tok->piece_len[o] == l && memcmp(tok->text + tok->piece_off[o], s, l) == 0) {
                dup = true;
                break;
            }
            h = (h + 1) & tok->hash_mask;
        }
        if (!dup) tok->hash[h] = i;
    }

    // byte tokens
    for (int b = 0; b < 256; b++) tok->byte_ids[b] = -1;
    for (int32_t i = 0; i < n; i++) {
        int bv = parse_byte_piece(tok->text + tok->piece_off[i], tok->piece_len[i]);
        if (d->type == COOPT_TOK_SPM && bv >= 0 &&
            (tok->attrs[i] == COOPT_TOKEN_BYTE || !d->token_attrs)) {
            tok->attrs[i]    = COOPT_TOKEN_BYTE;
            tok->byte_val[i] = (int16_t)bv;
            if (tok->byte_ids[bv] < 0) tok->byte_ids[bv] = i;
        }
    }
    for (int c = 0; c < 512; c++) tok->cp_byte[c] = (int16_t)cp_to_byte((uint32_t)c);
    for (int b = 0; b < 256; b++) {
        char   buf[4];
        size_t l             = utf8_put(byte_to_cp((uint8_t)b), buf);
        tok->byte_chr_len[b] = (uint8_t)l;
        memcpy(tok->byte_chr[b], buf, l);
        if (d->type == COOPT_TOK_BPE_BYTES) tok->byte_ids[b] = vocab_find(tok, buf, l);
    }

    // merges
    if (d->n_merges > 0) {
        tok->n_merges   = d->n_merges;
        tok->merge_mask = pow2_at_least((uint64_t)d->n_merges * 2) - 1;
        tok->merges     = coopt_calloc((size_t)tok->merge_mask + 1, sizeof(struct merge_entry));
        if (!tok->merges) goto fail;
        char  *cat     = NULL;
        size_t cat_cap = 0;
        for (int32_t r = 0; r < d->n_merges; r++) {
            const char *m  = d->merges[r];
            size_t      ml = m ? (d->merge_lens ? d->merge_lens[r] : strlen(m)) : 0;
            int32_t     a = -1, b = -1;
            // "a b": split at the first space where both halves are tokens
            for (size_t k = 0; m && k < ml; k++) {
                if (m[k] != ' ') continue;
                a = vocab_find(tok, m, k);
                b = vocab_find(tok, m + k + 1, ml - k - 1);
                if (a >= 0 && b >= 0) break;
                a = b = -1;
            }
            if (a < 0) {
                free(cat);
                st = coopt_fail(COOPT_ERR_FORMAT, "tokenizer: merge #%d '%.*s' names an unknown token", r,
                                (int)COOPT_MIN(ml, 200), m ? m : "");
                goto fail;
            }
            size_t la = tok->piece_len[a], lb = tok->piece_len[b];
            if (la + lb > cat_cap) {
                cat_cap  = (la + lb) * 2;
                char *nc = realloc(cat, cat_cap);
                if (!nc) {
                    free(cat);
                    goto fail;
                }
                cat = nc;
            }
            memcpy(cat, tok->text + tok->piece_off[a], la);
            memcpy(cat + la, tok->text + tok->piece_off[b], lb);
            int32_t c = vocab_find(tok, cat, la + lb);
            if (c < 0) {
                free(cat);
                st = coopt_fail(COOPT_ERR_FORMAT, "tokenizer: merge #%d '%.*s': the merged token is not in the vocabulary",
                                r, (int)COOPT_MIN(ml, 200), m);
                goto fail;
            }
            uint64_t key = ((uint64_t)(uint32_t)(a + 1) << 32) | (uint32_t)(b + 1);
            uint32_t h   = (uint32_t)hash_u64(key) & tok->merge_mask;
            while (tok->merges[h].key != 0 && tok->merges[h].key != key) h = (h + 1) & tok->merge_mask;
            if (tok->merges[h].key == 0) { // duplicates keep the first (lowest) rank
                tok->merges[h].key  = key;
                tok->merges[h].rank = r;
                tok->merges[h].id   = c;
            }
        }
        free(cat);
    }

    // SPM segment boundaries that no symbol can span
    tok->spm_split = d->type == COOPT_TOK_SPM ? 3u : 0u;
    for (int32_t i = 0; i < n && tok->spm_split; i++) {
        uint8_t a = tok->attrs[i];
        if (a != COOPT_TOKEN_NORMAL && a != COOPT_TOKEN_USER_DEFINED && tok->n_merges == 0) continue;
        const uint8_t *p = (const uint8_t *)tok->text + tok->piece_off[i];
        uint32_t       l = tok->piece_len[i];
        bool           prev_sp = false;
        for (uint32_t k = 0; k < l;) {
            uint32_t cp;
            size_t   cl = utf8_next(p + k, l - k, &cp);
            bool     sp = cp == 0x2581;
            if (k > 0 && sp && !prev_sp) tok->spm_split &= ~1u;
            if (k > 0 && !sp && prev_sp) tok->spm_split &= ~2u;
            prev_sp = sp;
            k += (uint32_t)cl;
        }
    }

    // end of generation
    for (int32_t i = 0; i < d->n_eog && d->eog_ids; i++) {
        int32_t e = d->eog_ids[i];
        if (e < 0 || e >= n) {
            st = coopt_fail(COOPT_ERR_FORMAT, "tokenizer: end-of-generation id %d out of range [0, %d)", e, n);
            goto fail;
        }
        tok->flags[e] |= TOK_FLAG_EOG;
    }
    if (tok->eos >= 0) tok->flags[tok->eos] |= TOK_FLAG_EOG;
    static const char *const eog_names[] = {"<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "</s>",
                                            "<|endoftext|>", "<|eom_id|>", "<end_of_turn>"};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(eog_names); k++) {
        int32_t e = vocab_find(tok, eog_names[k], strlen(eog_names[k]));
        if (e >= 0 && (tok->attrs[e] == COOPT_TOKEN_CONTROL || tok->attrs[e] == COOPT_TOKEN_USER_DEFINED))
            tok->flags[e] |= TOK_FLAG_EOG;
    }

    // special tokens matched in text
    tok->specials = coopt_malloc((size_t)n * sizeof(int32_t));
    if (!tok->specials) goto fail;
    for (int32_t i = 0; i < n; i++) {
        uint8_t a = tok->attrs[i];
        if ((a == COOPT_TOKEN_CONTROL || a == COOPT_TOKEN_USER_DEFINED || a == COOPT_TOKEN_UNKNOWN) &&
            tok->piece_len[i] > 0) {
            tok->specials[tok->n_specials++] = i;
            tok->flags[i] |= TOK_FLAG_SPECIAL;
            tok->special_first[(uint8_t)tok->text[tok->piece_off[i]]] = 1;
        }
    }
    qsort_r(tok->specials, (size_t)tok->n_specials, sizeof(int32_t), cmp_special, tok);
    *out = tok;
    return COOPT_OK;
fail:
    coopt_tokenizer_free(tok);
    return st;
}

enum coopt_status coopt_tokenizer_init_vocab(const struct coopt_vocab_desc *d, struct coopt_tokenizer **out) {
    return tokenizer_init(d, NULL, out);
}

const char *coopt_tokenizer_piece(const struct coopt_tokenizer *tok, int32_t id, size_t *len) {
    if (!tok || id < 0 || id >= tok->n_vocab) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = tok->piece_len[id];
    return tok->text + tok->piece_off[id];
}

int32_t coopt_tokenizer_n_vocab(const struct coopt_tokenizer *tok) { return tok ? tok->n_vocab : 0; }
int32_t coopt_tokenizer_bos(const struct coopt_tokenizer *tok) { return tok ? tok->bos : -1; }
int32_t coopt_tokenizer_eos(const struct coopt_tokenizer *tok) { return tok ? tok->eos : -1; }

bool coopt_tokenizer_is_eog(const struct coopt_tokenizer *tok, int32_t id) {
    return tok && id >= 0 && id < tok->n_vocab && (tok->flags[id] & TOK_FLAG_EOG);
}

// ---- encoding ----

struct bpe_sym {
    int32_t  id;    // token id of the symbol, -1 if its text is not a token (SPM score mode)
    uint32_t start; // byte offset in the working string
    uint32_t len;   // bytes; 0 once merged into its left neighbour
    int32_t  prev, next;
};

struct bpe_pair {
    float    key;         // lower merges first: merge rank, or -score of the merged piece
    int32_t  left, right; // symbol indices
    int32_t  id;          // merged token
    uint32_t size;        // left.len + right.len when pushed (detects stale entries)
};

// Scratch of one coopt_tokenize call; buffers grow and are reused across fragments and words.
struct enc {
    const struct coopt_tokenizer *tok;
    int32_t                      *ids;
    size_t                        n_ids, cap_ids;
    struct bpe_sym               *syms;
    size_t                        cap_syms;
    struct bpe_pair              *heap;
    size_t                        n_heap, cap_heap;
    char                         *buf; // working string (normalized / byte-mapped text)
    size_t                        cap_buf;
    uint32_t                     *cps;  // [cap_cps] codepoints of a fragment (pre-tokenizer)
    uint32_t                     *offs; // [cap_cps + 1] byte offset of each codepoint
    size_t                        cap_cps;
    bool                          oom;
};

static bool grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q) return false;
    *p   = q;
    *cap = n;
    return true;
}

static void enc_push(struct enc *e, int32_t id) {
    if (id < 0 || e->oom) return;
    if (!grow((void **)&e->ids, &e->cap_ids, e->n_ids + 1, sizeof(int32_t))) {
        e->oom = true;
        return;
    }
    e->ids[e->n_ids++] = id;
}

static bool pair_before(const struct bpe_pair *a, const struct bpe_pair *b) {
    return a->key < b->key || (a->key == b->key && a->left < b->left);
}

static void heap_push(struct enc *e, struct bpe_pair p) {
    if (!grow((void **)&e->heap, &e->cap_heap, e->n_heap + 1, sizeof(struct bpe_pair))) {
        e->oom = true;
        return;
    }
    size_t i = e->n_heap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!pair_before(&p, &e->heap[up])) break;
        e->heap[i] = e->heap[up];
        i          = up;
    }
    e->heap[i] = p;
}

static struct bpe_pair heap_pop(struct enc *e) {
    struct bpe_pair top  = e->heap[0];
    struct bpe_pair last = e->heap[--e->n_heap];
    size_t          i = 0, n = e->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && pair_before(&e->heap[c + 1], &e->heap[c])) c++;
        if (!pair_before(&e->heap[c], &last)) break;
        e->heap[i] = e->heap[c];
        i          = c;
    }
    if (n > 0) e->heap[i] = last;
    return top;
}

static void try_pair(struct enc *e, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const struct coopt_tokenizer *tok = e->tok;
    const struct bpe_sym         *l = &e->syms[left], *r = &e->syms[right];
    struct bpe_pair               p = {.left = left, .right = right, .size = l->len + r->len};
    if (tok->n_merges > 0) {
        if (l->id < 0 || r->id < 0) return;
        const struct merge_entry *m = merge_find(tok, l->id, r->id);
        if (!m) return;
        p.key = (float)m->rank;
        p.id  = m->id;
    } else {
        int32_t id = vocab_find(tok, e->buf + l->start, p.size);
        if (id < 0) return;
        uint8_t a = tok->attrs[id];
        if (a != COOPT_TOKEN_NORMAL && a != COOPT_TOKEN_USER_DEFINED) return;
        p.key = -tok->scores[id];
        p.id  = id;
    }
    heap_push(e, p);
}

// Merges e->syms[0..n) (a linked list over e->buf) until no pair applies.
static void bpe_merge(struct enc *e, int32_t n) {
    e->n_heap = 0;
    for (int32_t i = 0; i + 1 < n; i++) try_pair(e, i, i + 1);
    while (e->n_heap > 0 && !e->oom) {
        struct bpe_pair p = heap_pop(e);
        struct bpe_sym *l = &e->syms[p.left], *r = &e->syms[p.right];
        if (l->len == 0 || r->len == 0 || l->next != p.right || l->len + r->len != p.size) continue;
        l->len += r->len;
        l->id   = p.id;
        l->next = r->next;
        if (r->next >= 0) e->syms[r->next].prev = p.left;
        r->len = 0;
        try_pair(e, l->prev, p.left);
        try_pair(e, p.left, l->next);
    }
}

// Emits the ids of a symbol; unknown text falls back to <0xXX> bytes, then to unk.
static void emit_sym(struct enc *e, const struct bpe_sym *s) {
    const struct coopt_tokenizer *tok = e->tok;
    if (s->id >= 0) {
        enc_push(e, s->id);
        return;
    }
    for (uint32_t k = 0; k < s->len; k++) {
        int32_t b = tok->byte_ids[(uint8_t)e->buf[s->start + k]];
        if (b < 0) { // no byte token: one unk for the whole symbol
            enc_push(e, tok->unk);
            return;
        }
    }
    for (uint32_t k = 0; k < s->len; k++) enc_push(e, tok->byte_ids[(uint8_t)e->buf[s->start + k]]);
}

static void emit_list(struct enc *e) {
    for (int32_t i = 0; i >= 0 && !e->oom; i = e->syms[i].next) emit_sym(e, &e->syms[i]);
}

// Merges and emits the normalized text e->buf[from, to).
static void spm_segment(struct enc *e, size_t from, size_t to) {
    const struct coopt_tokenizer *tok = e->tok;
    int32_t ns = 0;
    for (size_t i = from; i < to;) {
        uint32_t cp;
        size_t   cl = utf8_next((const uint8_t *)e->buf + i, to - i, &cp);
        int32_t  id = vocab_find(tok, e->buf + i, cl);
        if (id >= 0 && tok->attrs[id] != COOPT_TOKEN_NORMAL && tok->attrs[id] != COOPT_TOKEN_USER_DEFINED) id = -1;
        if (id < 0 && tok->n_merges > 0) { // merge mode works on ids: byte fallback now (HF BPE)
            bool all = true;
            for (size_t k = 0; k < cl; k++) all = all && tok->byte_ids[(uint8_t)e->buf[i + k]] >= 0;
            if (all) {
                for (size_t k = 0; k < cl; k++, ns++)
                    e->syms[ns] = (struct bpe_sym){tok->byte_ids[(uint8_t)e->buf[i + k]], (uint32_t)(i + k), 1,
                                                   ns - 1, ns + 1};
                i += cl;
                continue;
            }
            id = tok->unk;
            if (tok->opt.fuse_unk && id >= 0 && ns > 0 && e->syms[ns - 1].id == id &&
                tok->attrs[id] == COOPT_TOKEN_UNKNOWN) { // HF fuse_unk: a run of unknowns is one <unk>
                e->syms[ns - 1].len += (uint32_t)cl;
                i += cl;
                continue;
            }
        }
        e->syms[ns] = (struct bpe_sym){id, (uint32_t)i, (uint32_t)cl, ns - 1, ns + 1};
        ns++;
        i += cl;
    }
    e->syms[ns - 1].next = -1;
    bpe_merge(e, ns);
    emit_list(e);
}

// SentencePiece-style fragment: normalize into e->buf, one symbol per character, merge.
static void encode_spm(struct enc *e, const char *text, size_t len, bool prefix) {
    const struct coopt_tokenizer *tok = e->tok;
    if (!grow((void **)&e->buf, &e->cap_buf, len * 3 + 4, 1)) {
        e->oom = true;
        return;
    }
    size_t n = 0;
    if (tok->opt.remove_extra_ws) { // trim and collapse runs of ' '
        while (len > 0 && text[0] == ' ') text++, len--;
        while (len > 0 && text[len - 1] == ' ') len--;
    }
    if (len == 0) return;
    if (prefix) {
        memcpy(e->buf, "\xe2\x96\x81", 3);
        n = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            if (tok->opt.remove_extra_ws && i > 0 && text[i - 1] == ' ') continue;
            memcpy(e->buf + n, "\xe2\x96\x81", 3);
            n += 3;
        } else {
            e->buf[n++] = text[i];
        }
    }
    if (!grow((void **)&e->syms, &e->cap_syms, n, sizeof(struct bpe_sym))) {
        e->oom = true;
        return;
    }
    // Cut at boundaries no vocabulary piece spans (see spm_split in tokenizer_init): the
    // merges on each side are independent, so this gives the same ids with small heaps.
    size_t from = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t   cl = utf8_next((const uint8_t *)e->buf + i, n - i, &cp);
        if (i > from && ((cp == 0x2581 && (tok->spm_split & 1) && e->buf[i - 1] != (char)0x81) ||
                         (cp != 0x2581 && (tok->spm_split & 2) && i >= 3 && memcmp(e->buf + i - 3, "\xe2\x96\x81", 3) == 0))) {
            spm_segment(e, from, i);
            from = i;
        }
        i += cl;
    }
    spm_segment(e, from, n);
}

// One pre-tokenized chunk of byte-level BPE: map bytes to characters, merge by rank.
static void encode_bytes_word(struct enc *e, const uint8_t *s, size_t len) {
    const struct coopt_tokenizer *tok = e->tok;
    if (!grow((void **)&e->buf, &e->cap_buf, len * 2 + 1, 1) ||
        !grow((void **)&e->syms, &e->cap_syms, len, sizeof(struct bpe_sym))) {
        e->oom = true;
        return;
    }
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        e->syms[i] = (struct bpe_sym){tok->byte_ids[s[i]], (uint32_t)n, tok->byte_chr_len[s[i]], (int32_t)i - 1,
                                      (int32_t)i + 1};
        memcpy(e->buf + n, tok->byte_chr[s[i]], tok->byte_chr_len[s[i]]);
        n += tok->byte_chr_len[s[i]];
    }
    e->syms[len - 1].next = -1;
    if (tok->opt.ignore_merges || len == 1) {
        int32_t id = vocab_find(tok, e->buf, n);
        if (id >= 0) {
            enc_push(e, id);
            return;
        }
    }
    bpe_merge(e, (int32_t)len);
    for (int32_t i = 0; i >= 0 && !e->oom; i = e->syms[i].next) enc_push(e, e->syms[i].id >= 0 ? e->syms[i].id : tok->unk);
}

static inline uint32_t cp_at(const uint32_t *c, size_t n, size_t i) { return i < n ? c[i] : 0xffffffffu; }
#define CP_IS_OTHER(c) ((c) != 0xffffffffu && !cp_is_space(c) && !cp_is_letter(c) && !cp_is_number(c))

static uint32_t ascii_lower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// Length (in codepoints) of the next pre-token at pos, LLaMA 3 pattern:
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
static size_t pretok_llama3(const uint32_t *c, size_t n, size_t pos) {
    size_t   p  = pos;
    uint32_t c0 = c[p];
    if (c0 == '\'' && p + 1 < n) {
        uint32_t c1 = ascii_lower(c[p + 1]);
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
        if (p + 2 < n) {
            uint32_t c2 = ascii_lower(c[p + 2]);
            if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
        }
    }
    if (!(c0 == '\r' || c0 == '\n' || cp_is_number(c0)) && (cp_is_letter(c0) || cp_is_letter(cp_at(c, n, p + 1)))) {
        p++;
        while (p < n && cp_is_letter(c[p])) p++;
        return p - pos;
    }
    if (cp_is_number(c0)) {
        while (p < n && p - pos < 3 && cp_is_number(c[p])) p++;
        return p - pos;
    }
    uint32_t c2 = c0 == ' ' ? cp_at(c, n, p + 1) : c0;
    if (CP_IS_OTHER(c2)) {
        p += c0 == ' ';
        while (p < n && CP_IS_OTHER(c[p])) p++;
        while (p < n && (c[p] == '\r' || c[p] == '\n')) p++;
        return p - pos;
    }
    size_t n_ws = 0, last_nl = 0;
    while (p + n_ws < n && cp_is_space(c[p + n_ws])) {
        if (c[p + n_ws] == '\r' || c[p + n_ws] == '\n') last_nl = n_ws + 1;
        n_ws++;
    }
    if (last_nl > 0) return last_nl;
    if (n_ws > 1 && p + n_ws < n) return n_ws - 1;
    if (n_ws > 0) return n_ws;
    return 1;
}

// GPT-2 pattern: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
static size_t pretok_gpt2(const uint32_t *c, size_t n, size_t pos) {
    size_t   p  = pos;
    uint32_t c0 = c[p];
    if (c0 == '\'' && p + 1 < n) {
        uint32_t c1 = c[p + 1];
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
        if (p + 2 < n) {
            uint32_t c2 = c[p + 2];
            if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
        }
    }
    uint32_t c2 = c0 == ' ' ? cp_at(c, n, p + 1) : c0;
    if (cp_is_letter(c2)) {
        p += c0 == ' ';
        while (p < n && cp_is_letter(c[p])) p++;
        return p - pos;
    }
    if (cp_is_number(c2)) {
        p += c0 == ' ';
        while (p < n && cp_is_number(c[p])) p++;
        return p - pos;
    }
    if (CP_IS_OTHER(c2)) {
        p += c0 == ' ';
        while (p < n && CP_IS_OTHER(c[p])) p++;
        return p - pos;
    }
    size_t n_ws = 0;
    while (p + n_ws < n && cp_is_space(c[p + n_ws])) n_ws++;
    if (n_ws > 1 && p + n_ws < n) return n_ws - 1;
    if (n_ws > 0) return n_ws;
    return 1;
}

static void encode_bytes(struct enc *e, const char *text, size_t len) {
    const struct coopt_tokenizer *tok = e->tok;
    if (len == 0) return;
    char *tmp = NULL;
    if (tok->add_space_prefix && text[0] != ' ') { // ByteLevel add_prefix_space
        tmp = malloc(len + 1);
        if (!tmp) {
            e->oom = true;
            return;
        }
        tmp[0] = ' ';
        memcpy(tmp + 1, text, len);
        text = tmp;
        len++;
    }
    if (!grow((void **)&e->cps, &e->cap_cps, len, sizeof(uint32_t))) goto oom;
    free(e->offs);
    e->offs = malloc((e->cap_cps + 1) * sizeof(uint32_t));
    if (!e->offs) goto oom;
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        e->offs[n] = (uint32_t)i;
        i += utf8_next((const uint8_t *)text + i, len - i, &e->cps[n]);
        n++;
    }
    e->offs[n] = (uint32_t)len;
    for (size_t p = 0; p < n && !e->oom;) {
        size_t k = tok->pretok == COOPT_PRETOK_LLAMA3 ? pretok_llama3(e->cps, n, p) : pretok_gpt2(e->cps, n, p);
        encode_bytes_word(e, (const uint8_t *)text + e->offs[p], e->offs[p + k] - e->offs[p]);
        p += k;
    }
    free(tmp);
    return;
oom:
    free(tmp);
    e->oom = true;
}

static void encode_fragment(struct enc *e, const char *text, size_t len, bool at_start) {
    const struct coopt_tokenizer *tok = e->tok;
    if (tok->type == COOPT_TOK_SPM)
        encode_spm(e, text, len, tok->add_space_prefix && (at_start || !tok->opt.spm_prefix_first_only));
    else
        encode_bytes(e, text, len);
}

enum coopt_status coopt_tokenize(const struct coopt_tokenizer *tok, const char *text, size_t len, unsigned flags,
                                 int32_t **out, size_t *n_out) {
    if (out) *out = NULL;
    if (n_out) *n_out = 0;
    if (!tok || !out || !n_out || (!text && len > 0)) return coopt_fail(COOPT_ERR_INVALID, "coopt_tokenize: bad argument");
    if (len > (size_t)INT32_MAX / 4) return coopt_fail(COOPT_ERR_INVALID, "coopt_tokenize: text of %zu bytes is too long", len);
    struct enc e = {.tok = tok};
    if ((flags & COOPT_TOKENIZE_ADD_BOS) && tok->add_bos) enc_push(&e, tok->bos);
    size_t frag = 0;
    for (size_t i = 0; i < len && !e.oom;) {
        int32_t match = -1;
        if (tok->special_first[(uint8_t)text[i]]) {
            for (int32_t k = 0; k < tok->n_specials; k++) {
                int32_t  id = tok->specials[k];
                uint32_t l  = tok->piece_len[id];
                if (l > len - i || (uint8_t)tok->text[tok->piece_off[id]] != (uint8_t)text[i]) continue;
                if (tok->attrs[id] != COOPT_TOKEN_USER_DEFINED && !(flags & COOPT_TOKENIZE_PARSE_SPECIAL)) continue;
                if (memcmp(tok->text + tok->piece_off[id], text + i, l) == 0) {
                    match = id;
                    break;
                }
            }
        }
        size_t frag_end = i;
        if (match >= 0 && tok->opt.specials_eat_space && i > 0) {
            if (i > frag && text[i - 1] == ' ') frag_end = i - 1;
            else match = -1;
        }
        if (match < 0) {
            i++;
            continue;
        }
        encode_fragment(&e, text + frag, frag_end - frag, frag == 0);
        enc_push(&e, match);
        i += tok->piece_len[match];
        frag = i;
    }
    if (frag < len) encode_fragment(&e, text + frag, len - frag, frag == 0);
    if ((flags & COOPT_TOKENIZE_ADD_BOS) && tok->add_eos) enc_push(&e, tok->eos);
    if (!e.oom && !e.ids) e.ids = malloc(sizeof(int32_t));
    free(e.syms);
    free(e.heap);
    free(e.buf);
    free(e.cps);
    free(e.offs);
    if (e.oom || !e.ids) {
        free(e.ids);
        return coopt_fail(COOPT_ERR_NOMEM, "coopt_tokenize: out of memory (%zu bytes of text)", len);
    }
    *out   = e.ids;
    *n_out = e.n_ids;
    return COOPT_OK;
}

// ---- decoding ----

void coopt_detok_reset(struct coopt_detok *d) {
    memset(d, 0, sizeof(*d));
    d->prev = -1;
}

struct out_buf {
    char  *p;
    size_t cap, n;
};

// Whole characters only: a character that does not fit (with the NUL) is dropped.
static void out_put(struct out_buf *o, const char *s, size_t n) {
    if (o->cap == 0 || o->n + n >= o->cap) {
        o->cap = o->n; // truncated: stop writing so the output stays a prefix
        return;
    }
    memcpy(o->p + o->n, s, n);
    o->n += n;
}

static void out_replacement(struct out_buf *o) { out_put(o, "\xef\xbf\xbd", 3); }

// Feeds one byte through the UTF-8 validator (maximal invalid subsequence -> one U+FFFD).
static void detok_byte(struct coopt_detok *d, struct out_buf *o, uint8_t b) {
    for (;;) {
        if (d->n_pending == 0) {
            if (b < 0x80) {
                char c = (char)b;
                out_put(o, &c, 1);
            } else if (b >= 0xc2 && b <= 0xf4) {
                d->pending[0] = (char)b;
                d->n_pending  = 1;
            } else {
                out_replacement(o);
            }
            return;
        }
        uint8_t lead = (uint8_t)d->pending[0];
        int     need = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : 2;
        uint8_t lo = 0x80, hi = 0xbf;
        if (d->n_pending == 1) {
            if (lead == 0xe0) lo = 0xa0;
            if (lead == 0xed) hi = 0x9f;
            if (lead == 0xf0) lo = 0x90;
            if (lead == 0xf4) hi = 0x8f;
        }
        if (b >= lo && b <= hi) {
            d->pending[d->n_pending++] = (char)b;
            if (d->n_pending == need) {
                out_put(o, d->pending, (size_t)need);
                d->n_pending = 0;
            }
            return;
        }
        out_replacement(o); // the pending prefix is invalid; b starts afresh
        d->n_pending = 0;
    }
}

size_t coopt_detok_push(struct coopt_detok *d, const struct coopt_tokenizer *tok, int32_t id, char *out, size_t cap) {
    struct out_buf o = {out, cap, 0};
    if (cap > 0) out[0] = 0;
    if (!d || !tok || id < 0 || id >= tok->n_vocab) return 0;
    int32_t prev = d->prev;
    d->prev      = id;
    d->n_tokens++;
    uint8_t     a = tok->attrs[id];
    const char *s = tok->text + tok->piece_off[id];
    size_t      n = tok->piece_len[id];
    if (a == COOPT_TOKEN_CONTROL || a == COOPT_TOKEN_UNKNOWN || a == COOPT_TOKEN_UNUSED) return 0;
    if (a == COOPT_TOKEN_USER_DEFINED) {
        for (size_t i = 0; i < n; i++) detok_byte(d, &o, (uint8_t)s[i]);
    } else if (tok->byte_val[id] >= 0) {
        detok_byte(d, &o, (uint8_t)tok->byte_val[id]);
    } else if (tok->type == COOPT_TOK_SPM) {
        size_t i = 0; // see the file comment: the token after BOS drops its dummy-prefix space
        if (tok->add_space_prefix && prev >= 0 && prev == tok->bos && n >= 3 && memcmp(s, "\xe2\x96\x81", 3) == 0)
            i = 3;
        for (; i < n; i++) {
            if (i + 3 <= n && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
                detok_byte(d, &o, ' ');
                i += 2;
            } else {
                detok_byte(d, &o, (uint8_t)s[i]);
            }
        }
    } else {
        for (size_t i = 0; i < n;) {
            uint32_t cp;
            size_t   cl = utf8_next((const uint8_t *)s + i, n - i, &cp);
            if (cp < 512 && tok->cp_byte[cp] >= 0) {
                detok_byte(d, &o, (uint8_t)tok->cp_byte[cp]);
            } else {
                for (size_t k = 0; k < cl; k++) detok_byte(d, &o, (uint8_t)s[i + k]);
            }
            i += cl;
        }
    }
    if (cap > 0) out[o.n] = 0;
    return o.n;
}

size_t coopt_detok_flush(struct coopt_detok *d, char *out, size_t cap) {
    struct out_buf o = {out, cap, 0};
    if (cap > 0) out[0] = 0;
    if (!d) return 0;
    if (d->n_pending > 0) out_replacement(&o);
    d->n_pending = 0;
    if (cap > 0) out[o.n] = 0;
    return o.n;
}

// ---- tokenizer.json (Hugging Face tokenizers) ----

static const char *json_str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static bool json_bool(const cJSON *o, const char *key, bool dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

// Finds the first object with "type" == type in a normalizer / pre-tokenizer / decoder /
// post-processor tree (Sequence nodes hold their children in an array).
static const cJSON *json_find_type(const cJSON *node, const char *type) {
    if (!node) return NULL;
    if (cJSON_IsArray(node)) {
        const cJSON *c;
        cJSON_ArrayForEach(c, node) {
            const cJSON *r = json_find_type(c, type);
            if (r) return r;
        }
        return NULL;
    }
    if (!cJSON_IsObject(node)) return NULL;
    const char *t = json_str(node, "type");
    if (t && strcmp(t, type) == 0) return node;
    static const char *const kids[] = {"normalizers", "pretokenizers", "decoders", "processors"};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(kids); k++) {
        const cJSON *r = json_find_type(cJSON_GetObjectItemCaseSensitive(node, kids[k]), type);
        if (r) return r;
    }
    return NULL;
}

// bos_token / eos_token of tokenizer_config.json: a string or {"content": ...}.
static const char *config_token(const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v)) return json_str(v, "content");
    return NULL;
}

static int32_t json_token_id(const struct coopt_vocab_desc *d, const char *s) {
    if (!s) return -1;
    size_t l = strlen(s);
    for (int32_t i = 0; i < d->n_tokens; i++)
        if (d->tokens[i] && d->token_lens[i] == l && memcmp(d->tokens[i], s, l) == 0) return i;
    return -1;
}

#define TOK_MAX_VOCAB (1 << 22)

static enum coopt_status tokenizer_from_json(const cJSON *root, const cJSON *cfg, const char *name,
                                             struct coopt_tokenizer **out) {
    struct coopt_vocab_desc d   = {.bos_id = -1, .eos_id = -1, .unk_id = -1, .pad_id = -1};
    struct tok_options      opt = {0};
    const char            **toks  = NULL;
    uint32_t               *lens  = NULL;
    int32_t                *attrs = NULL;
    char                  **merges = NULL;
    int32_t                 n_merges = 0;
    bool                    any_normalized = false;
    enum coopt_status       st       = COOPT_ERR_NOMEM;

    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model)) return coopt_fail(COOPT_ERR_FORMAT, "%s: no 'model' object", name);
    const char *mtype = json_str(model, "type");
    if (mtype && strcmp(mtype, "BPE") != 0)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: model type '%s' is not supported (BPE only)", name, mtype);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    if (!cJSON_IsObject(vocab)) return coopt_fail(COOPT_ERR_FORMAT, "%s: model has no 'vocab' object", name);
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");

    // vocabulary size: largest id + 1 over vocab and added_tokens
    int64_t      n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble >= TOK_MAX_VOCAB ||
            it->valuedouble != (double)(int64_t)it->valuedouble)
            return coopt_fail(COOPT_ERR_FORMAT, "%s: vocab entry '%.100s' has a bad id", name, it->string);
        n = COOPT_MAX(n, (int64_t)it->valuedouble + 1);
    }
    cJSON_ArrayForEach(it, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= TOK_MAX_VOCAB || !json_str(it, "content"))
            return coopt_fail(COOPT_ERR_FORMAT, "%s: added_tokens entry without a valid id and content", name);
        n = COOPT_MAX(n, (int64_t)id->valuedouble + 1);
    }
    if (n == 0) return coopt_fail(COOPT_ERR_FORMAT, "%s: empty vocab", name);
    toks  = coopt_calloc((size_t)n, sizeof(*toks));
    lens  = coopt_calloc((size_t)n, sizeof(*lens));
    attrs = coopt_calloc((size_t)n, sizeof(*attrs));
    if (!toks || !lens || !attrs) goto done;
    cJSON_ArrayForEach(it, vocab) {
        int32_t id = (int32_t)it->valuedouble;
        toks[id]   = it->string;
        lens[id]   = (uint32_t)strlen(it->string);
        attrs[id]  = COOPT_TOKEN_NORMAL;
    }
    cJSON_ArrayForEach(it, added) {
        int32_t id = (int32_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
        toks[id]   = json_str(it, "content");
        lens[id]   = (uint32_t)strlen(toks[id]);
        attrs[id]  = json_bool(it, "special", false) ? COOPT_TOKEN_CONTROL : COOPT_TOKEN_USER_DEFINED;
        if (json_bool(it, "normalized", false)) any_normalized = true;
    }
    for (int32_t i = 0; i < n; i++) {
        if (!toks[i]) {
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: token id %d is missing from vocab (ids must be dense)", name, i);
            goto done;
        }
    }
    d.n_tokens    = (int32_t)n;
    d.tokens      = toks;
    d.token_lens  = lens;
    d.token_attrs = attrs;

    // merges: "a b" strings or ["a", "b"] pairs
    const cJSON *jm = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (jm && !cJSON_IsArray(jm)) {
        st = coopt_fail(COOPT_ERR_FORMAT, "%s: model.merges is not an array", name);
        goto done;
    }
    int nm = cJSON_GetArraySize(jm);
    merges = coopt_calloc((size_t)nm + 1, sizeof(char *));
    if (!merges) goto done;
    cJSON_ArrayForEach(it, jm) {
        const char *a = NULL, *b = NULL;
        if (cJSON_IsString(it)) {
            merges[n_merges] = coopt_strdup(it->valuestring);
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            a              = cJSON_GetArrayItem(it, 0)->valuestring;
            b              = cJSON_GetArrayItem(it, 1)->valuestring;
            size_t la = strlen(a), lb = strlen(b);
            merges[n_merges] = coopt_malloc(la + lb + 2);
            if (merges[n_merges]) {
                memcpy(merges[n_merges], a, la);
                merges[n_merges][la] = ' ';
                memcpy(merges[n_merges] + la + 1, b, lb + 1);
            }
        } else {
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: merge #%d is neither \"a b\" nor [\"a\", \"b\"]", name, n_merges);
            goto done;
        }
        if (!merges[n_merges]) goto done;
        n_merges++;
    }
    d.n_merges = n_merges;
    d.merges   = (const char *const *)merges;

    // model type and pre-tokenizer
    const cJSON *pre  = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    const cJSON *dec  = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    const cJSON *bl   = json_find_type(pre, "ByteLevel");
    if (!bl) bl = json_find_type(dec, "ByteLevel");
    opt.ignore_merges = json_bool(model, "ignore_merges", false);
    opt.fuse_unk      = json_bool(model, "fuse_unk", false);
    if (bl) {
        d.type             = COOPT_TOK_BPE_BYTES;
        d.add_space_prefix = json_find_type(pre, "ByteLevel") && json_bool(bl, "add_prefix_space", false);
        d.pretok           = COOPT_PRETOK_GPT2;
        const cJSON *split = json_find_type(pre, "Split");
        const cJSON *pat   = split ? cJSON_GetObjectItemCaseSensitive(split, "pattern") : NULL;
        const char  *re    = pat ? json_str(pat, "Regex") : NULL;
        if (re && (strstr(re, "{1,3}") || strstr(re, "(?i:"))) d.pretok = COOPT_PRETOK_LLAMA3;
        else if (re && !strstr(re, "'s|'t|'re|'ve|'m|'ll|'d"))
            coopt_log_info("%s: unrecognized Split regex, using the GPT-2 pre-tokenizer", name);
    } else {
        d.type              = COOPT_TOK_SPM;
        const cJSON *prep   = json_find_type(norm, "Prepend");
        const char  *prep_s = prep ? json_str(prep, "prepend") : NULL;
        if (prep_s && strcmp(prep_s, "\xe2\x96\x81") == 0) {
            d.add_space_prefix = true;
            if (any_normalized) opt.specials_eat_space = opt.spm_prefix_first_only = true;
        }
        const cJSON *meta = json_find_type(pre, "Metaspace");
        if (!meta) meta = json_find_type(norm, "Metaspace");
        if (meta) {
            const char *scheme = json_str(meta, "prepend_scheme");
            if (scheme) {
                d.add_space_prefix        = strcmp(scheme, "never") != 0;
                opt.spm_prefix_first_only = strcmp(scheme, "first") == 0;
            } else {
                d.add_space_prefix = json_bool(meta, "add_prefix_space", true);
            }
        }
        if (!json_bool(model, "byte_fallback", false)) // no <0xXX> fallback: those pieces are plain text
            for (int32_t i = 0; i < d.n_tokens; i++)
                if (attrs[i] == COOPT_TOKEN_NORMAL && parse_byte_piece(toks[i], lens[i]) >= 0) attrs[i] = COOPT_TOKEN_UNUSED;
        for (int32_t i = 0; i < d.n_tokens; i++)
            if (attrs[i] == COOPT_TOKEN_NORMAL && parse_byte_piece(toks[i], lens[i]) >= 0) attrs[i] = COOPT_TOKEN_BYTE;
    }
    d.unk_id = json_token_id(&d, json_str(model, "unk_token"));
    if (d.unk_id >= 0) attrs[d.unk_id] = COOPT_TOKEN_UNKNOWN;

    // BOS / EOS: the post-processor template, then tokenizer_config.json, then common names
    const cJSON *tp = json_find_type(cJSON_GetObjectItemCaseSensitive(root, "post_processor"), "TemplateProcessing");
    bool seen_seq = false;
    const cJSON *single   = tp ? cJSON_GetObjectItemCaseSensitive(tp, "single") : NULL;
    cJSON_ArrayForEach(it, single) {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
        if (cJSON_GetObjectItemCaseSensitive(it, "Sequence")) seen_seq = true;
        if (!sp) continue;
        int32_t id = json_token_id(&d, json_str(sp, "id"));
        if (id < 0) {
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: post_processor names an unknown special token", name);
            goto done;
        }
        if (!seen_seq) {
            d.bos_id  = id;
            d.add_bos = true;
        } else {
            d.eos_id  = id;
            d.add_eos = true;
        }
    }
    if (cfg) {
        int32_t b = json_token_id(&d, config_token(cfg, "bos_token"));
        int32_t e = json_token_id(&d, config_token(cfg, "eos_token"));
        if (b >= 0) d.bos_id = b;
        if (e >= 0) d.eos_id = e;
        const cJSON *ab = cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token");
        const cJSON *ae = cJSON_GetObjectItemCaseSensitive(cfg, "add_eos_token");
        if (cJSON_IsBool(ab)) d.add_bos = cJSON_IsTrue(ab);
        if (cJSON_IsBool(ae)) d.add_eos = cJSON_IsTrue(ae);
    }
    static const char *const bos_names[] = {"<s>", "<|begin_of_text|>", "<|startoftext|>"};
    static const char *const eos_names[] = {"</s>", "<|end_of_text|>", "<|endoftext|>"};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(bos_names) && d.bos_id < 0; k++) d.bos_id = json_token_id(&d, bos_names[k]);
    for (size_t k = 0; k < COOPT_ARRAY_LEN(eos_names) && d.eos_id < 0; k++) d.eos_id = json_token_id(&d, eos_names[k]);

    st = tokenizer_init(&d, &opt, out);
    if (st != COOPT_OK) coopt_log_error("%s: invalid tokenizer", name);
done:
    for (int32_t i = 0; merges && i < n_merges; i++) free(merges[i]);
    free(merges);
    free(toks);
    free(lens);
    free(attrs);
    return st;
}

static cJSON *json_load(const char *path, bool quiet_missing, enum coopt_status *st) {
    char  *data = NULL;
    size_t size = 0;
    if (quiet_missing && !coopt_path_exists(path)) {
        *st = COOPT_ERR_IO;
        return NULL;
    }
    *st = coopt_read_file(path, &data, &size);
    if (*st != COOPT_OK) return NULL;
    cJSON *root = cJSON_ParseWithLength(data, size);
    if (!root) {
        const char *e = cJSON_GetErrorPtr();
        coopt_log_error("%s: invalid JSON near byte %td", path, e && e >= data && e <= data + size ? e - data : (ptrdiff_t)-1);
        *st = COOPT_ERR_FORMAT;
    }
    free(data);
    return root;
}

enum coopt_status coopt_tokenizer_load_json(const char *path, struct coopt_tokenizer **out) {
    *out = NULL;
    enum coopt_status st;
    cJSON            *root = json_load(path, false, &st);
    if (!root) return st;
    // tokenizer_config.json beside it names bos/eos and add_bos_token
    char        dir[4096], cfg_path[4096];
    const char *base = coopt_path_basename(path);
    size_t      dl   = (size_t)(base - path);
    cJSON      *cfg  = NULL;
    if (dl < sizeof(dir)) {
        memcpy(dir, path, dl);
        dir[dl] = 0;
        if (coopt_path_join(cfg_path, sizeof(cfg_path), dl ? dir : ".", "tokenizer_config.json")) {
            enum coopt_status cst;
            cfg = json_load(cfg_path, true, &cst);
        }
    }
    st = tokenizer_from_json(root, cfg, path, out);
    cJSON_Delete(cfg);
    cJSON_Delete(root);
    return st;
}

// ---- tokenizer.model (SentencePiece ModelProto, protobuf wire format) ----

struct pb {
    const uint8_t *p, *end;
};

static bool pb_varint(struct pb *b, uint64_t *v) {
    uint64_t r = 0;
    for (int s = 0; s < 64; s += 7) {
        if (b->p >= b->end) return false;
        uint8_t c = *b->p++;
        r |= (uint64_t)(c & 0x7f) << s;
        if (c < 0x80) {
            *v = r;
            return true;
        }
    }
    return false;
}

// Next field: *v holds a varint / fixed value, or (*data, *len) a length-delimited one.
static bool pb_next(struct pb *b, uint32_t *field, uint32_t *wire, uint64_t *v, const uint8_t **data, size_t *len) {
    uint64_t key;
    if (!pb_varint(b, &key)) return false;
    *field = (uint32_t)(key >> 3);
    *wire  = (uint32_t)(key & 7);
    *v     = 0;
    switch (*wire) {
    case 0: return pb_varint(b, v);
    case 1:
        if (b->end - b->p < 8) return false;
        memcpy(v, b->p, 8);
        b->p += 8;
        return true;
    case 5: {
        if (b->end - b->p < 4) return false;
        uint32_t x;
        memcpy(&x, b->p, 4);
        *v = x;
        b->p += 4;
        return true;
    }
    case 2:
        if (!pb_varint(b, v) || *v > (uint64_t)(b->end - b->p)) return false;
        *data = b->p;
        *len  = (size_t)*v;
        b->p += *len;
        return true;
    default: return false;
    }
}

enum coopt_status coopt_tokenizer_load_spm(const char *path, struct coopt_tokenizer **out) {
    *out = NULL;
    char             *data = NULL;
    size_t            size = 0;
    enum coopt_status st   = coopt_read_file(path, &data, &size);
    if (st != COOPT_OK) return st;
    const char **toks   = NULL;
    uint32_t    *lens   = NULL;
    float       *scores = NULL;
    int32_t     *attrs  = NULL;
    int64_t      model_type = 1; // proto default: UNIGRAM
    int64_t      ids[4]     = {0, 1, 2, -1}; // unk, bos, eos, pad (proto defaults)
    bool         dummy_prefix = true, remove_ws = true, charsmap = false;
    int32_t      n = 0;
    uint32_t     field, wire;
    uint64_t     v;
    const uint8_t *fd = NULL;
    size_t         fl = 0;

    // pass 1: count pieces and read the specs
    struct pb b = {(const uint8_t *)data, (const uint8_t *)data + size};
    while (b.p < b.end) {
        if (!pb_next(&b, &field, &wire, &v, &fd, &fl)) goto corrupt;
        if (field == 1 && wire == 2) {
            if (++n > TOK_MAX_VOCAB) goto corrupt;
        } else if ((field == 2 || field == 3) && wire == 2) {
            struct pb s = {fd, fd + fl};
            while (s.p < s.end) {
                const uint8_t *sd;
                size_t         sl;
                uint32_t       f2, w2;
                if (!pb_next(&s, &f2, &w2, &v, &sd, &sl)) goto corrupt;
                if (field == 3 && f2 == 2 && w2 == 2 && sl > 0) charsmap = true;
                if (w2 != 0) continue;
                if (field == 2 && f2 == 3) model_type = (int64_t)v;
                if (field == 2 && f2 >= 40 && f2 <= 43) ids[f2 - 40] = (int32_t)(uint32_t)v;
                if (field == 3 && f2 == 3) dummy_prefix = v != 0;
                if (field == 3 && f2 == 4) remove_ws = v != 0;
            }
        }
    }
    if (charsmap) coopt_log_info("%s: the normalizer's precompiled_charsmap (NFKC) is not applied", path);
    if (n == 0) {
        st = coopt_fail(COOPT_ERR_FORMAT, "%s: no pieces in the SentencePiece model", path);
        goto done;
    }
    if (model_type != 2) {
        st = coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: SentencePiece model_type %d is not supported (BPE = 2 only)", path,
                        (int)model_type);
        goto done;
    }
    toks   = coopt_calloc((size_t)n, sizeof(*toks));
    lens   = coopt_calloc((size_t)n, sizeof(*lens));
    scores = coopt_calloc((size_t)n, sizeof(*scores));
    attrs  = coopt_calloc((size_t)n, sizeof(*attrs));
    st     = COOPT_ERR_NOMEM;
    if (!toks || !lens || !scores || !attrs) goto done;

    // pass 2: the pieces
    b          = (struct pb){(const uint8_t *)data, (const uint8_t *)data + size};
    int32_t i  = 0;
    while (b.p < b.end && pb_next(&b, &field, &wire, &v, &fd, &fl)) {
        if (field != 1 || wire != 2) continue;
        struct pb s  = {fd, fd + fl};
        toks[i]      = "";
        attrs[i]     = COOPT_TOKEN_NORMAL;
        while (s.p < s.end) {
            const uint8_t *sd = NULL;
            size_t         sl = 0;
            uint32_t       f2, w2;
            if (!pb_next(&s, &f2, &w2, &v, &sd, &sl)) goto corrupt;
            if (f2 == 1 && w2 == 2) {
                toks[i] = (const char *)sd;
                lens[i] = (uint32_t)sl;
            } else if (f2 == 2 && w2 == 5) {
                uint32_t x = (uint32_t)v;
                memcpy(&scores[i], &x, 4);
            } else if (f2 == 3 && w2 == 0) {
                if (v < 1 || v > 6) {
                    st = coopt_fail(COOPT_ERR_FORMAT, "%s: piece %d has unknown type %llu", path, i, (unsigned long long)v);
                    goto done;
                }
                attrs[i] = (int32_t)v; // NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6
            }
        }
        i++;
    }
    struct coopt_vocab_desc d = {
        .type = COOPT_TOK_SPM, .n_tokens = n, .tokens = toks, .token_lens = lens, .scores = scores,
        .token_attrs = attrs, .add_space_prefix = dummy_prefix,
    };
    const char *names[4] = {"unk_id", "bos_id", "eos_id", "pad_id"};
    for (int k = 0; k < 4; k++) {
        if (ids[k] < -1 || ids[k] >= n) {
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: trainer_spec %s %lld out of range [0, %d)", path, names[k],
                            (long long)ids[k], n);
            goto done;
        }
    }
    d.unk_id  = (int32_t)ids[0];
    d.bos_id  = (int32_t)ids[1];
    d.eos_id  = (int32_t)ids[2];
    d.pad_id  = (int32_t)ids[3];
    d.add_bos = d.bos_id >= 0;
    struct tok_options opt = {.remove_extra_ws = remove_ws};
    st                     = tokenizer_init(&d, &opt, out);
    goto done;
corrupt:
    st = coopt_fail(COOPT_ERR_FORMAT, "%s: truncated or corrupt SentencePiece protobuf (at byte %td of %zu)", path,
                    (const char *)b.p - data, size);
done:
    free(toks);
    free(lens);
    free(scores);
    free(attrs);
    free(data);
    return st;
}

// ---- llama2.c tokenizer.bin ----

enum coopt_status coopt_tokenizer_load_llama2c(const char *path, int32_t n_vocab, struct coopt_tokenizer **out) {
    *out = NULL;
    char             *data = NULL;
    size_t            size = 0;
    enum coopt_status st   = coopt_read_file(path, &data, &size);
    if (st != COOPT_OK) return st;
    char   **toks   = NULL;
    uint32_t *lens  = NULL;
    float    *scores = NULL;
    int32_t   n = 0, cap = 0, max_len = 0;
    size_t    off = 4;
    if (size < 4) goto trunc;
    memcpy(&max_len, data, 4);
    if (max_len <= 0 || max_len > 65536) {
        st = coopt_fail(COOPT_ERR_FORMAT, "%s: max_token_length %d is not plausible for a llama2.c tokenizer", path, max_len);
        goto done;
    }
    while (n_vocab > 0 ? n < n_vocab : off < size) {
        float   score;
        int32_t len;
        if (size - off < 8) goto trunc;
        memcpy(&score, data + off, 4);
        memcpy(&len, data + off + 4, 4);
        off += 8;
        if (len < 0 || len > 65536 || (size_t)len > size - off) goto trunc;
        if (n == cap) {
            cap = cap ? cap * 2 : 1024;
            if (cap > TOK_MAX_VOCAB) goto trunc;
            char   **nt = realloc(toks, (size_t)cap * sizeof(*toks));
            if (nt) toks = nt;
            uint32_t *nl = realloc(lens, (size_t)cap * sizeof(*lens));
            if (nl) lens = nl;
            float *ns = realloc(scores, (size_t)cap * sizeof(*scores));
            if (ns) scores = ns;
            if (!nt || !nl || !ns) {
                st = COOPT_ERR_NOMEM;
                goto done;
            }
        }
        // llama2.c exports '▁' as ' ' and BOS/EOS as "\n<s>\n" / "\n</s>\n": back to SentencePiece form
        const char *s   = data + off;
        size_t      n_sp = 0;
        for (int32_t k = 0; k < len; k++) n_sp += s[k] == ' ';
        char *t = coopt_malloc((size_t)len + 2 * n_sp + 1);
        if (!t) {
            st = COOPT_ERR_NOMEM;
            goto done;
        }
        size_t w = 0;
        for (int32_t k = 0; k < len; k++) {
            if (s[k] == ' ') {
                memcpy(t + w, "\xe2\x96\x81", 3);
                w += 3;
            } else {
                t[w++] = s[k];
            }
        }
        t[w] = 0;
        if (strcmp(t, "\n<s>\n") == 0) strcpy(t, "<s>");
        if (strcmp(t, "\n</s>\n") == 0) strcpy(t, "</s>");
        toks[n]   = t;
        lens[n]   = (uint32_t)strlen(t);
        scores[n] = score;
        n++;
        off += (size_t)len;
    }
    if (n < 3) {
        st = coopt_fail(COOPT_ERR_FORMAT, "%s: only %d tokens (need unk, bos, eos)", path, n);
        goto done;
    }
    int32_t *attrs = coopt_malloc((size_t)n * sizeof(int32_t));
    if (!attrs) {
        st = COOPT_ERR_NOMEM;
        goto done;
    }
    for (int32_t i = 0; i < n; i++) attrs[i] = parse_byte_piece(toks[i], lens[i]) >= 0 ? COOPT_TOKEN_BYTE : COOPT_TOKEN_NORMAL;
    attrs[0] = COOPT_TOKEN_UNKNOWN;
    attrs[1] = attrs[2] = COOPT_TOKEN_CONTROL;
    struct coopt_vocab_desc d = {
        .type = COOPT_TOK_SPM, .n_tokens = n, .tokens = (const char *const *)toks, .token_lens = lens,
        .scores = scores, .token_attrs = attrs, .unk_id = 0, .bos_id = 1, .eos_id = 2, .pad_id = -1,
        .add_bos = true, .add_space_prefix = true,
    };
    st = tokenizer_init(&d, NULL, out);
    free(attrs);
    goto done;
trunc:
    st = coopt_fail(COOPT_ERR_FORMAT, "%s: truncated or corrupt llama2.c tokenizer at token %d (byte %zu of %zu)", path,
                    n, off, size);
done:
    for (int32_t i = 0; toks && i < n; i++) free(toks[i]);
    free(toks);
    free(lens);
    free(scores);
    free(data);
    return st;
}

// ---- dispatch ----

enum coopt_status coopt_tokenizer_load(const char *path, struct coopt_tokenizer **out) {
    if (!out) return COOPT_ERR_INVALID;
    *out = NULL;
    if (!path) return coopt_fail(COOPT_ERR_INVALID, "tokenizer: no path");
    if (coopt_path_is_dir(path)) {
        char p[4096];
        static const char *const names[] = {"tokenizer.json", "tokenizer.model"};
        for (size_t k = 0; k < COOPT_ARRAY_LEN(names); k++)
            if (coopt_path_join(p, sizeof(p), path, names[k]) && coopt_path_exists(p)) return coopt_tokenizer_load(p, out);
        return coopt_fail(COOPT_ERR_IO, "%s: no tokenizer.json or tokenizer.model in this directory", path);
    }
    FILE *f = fopen(path, "rb");
    if (!f) return coopt_fail(COOPT_ERR_IO, "%s: cannot open tokenizer file", path);
    unsigned char head[16] = {0};
    size_t        nh       = fread(head, 1, sizeof(head), f);
    fclose(f);
    if (nh >= 4 && memcmp(head, "GGUF", 4) == 0) return coopt_gguf_load_tokenizer(path, out);
    if (coopt_str_ends_with(path, ".json")) return coopt_tokenizer_load_json(path, out);
    if (coopt_str_ends_with(path, ".model")) return coopt_tokenizer_load_spm(path, out);
    if (coopt_str_ends_with(path, ".bin")) return coopt_tokenizer_load_llama2c(path, 0, out);
    size_t k = 0;
    while (k < nh && (head[k] == ' ' || head[k] == '\n' || head[k] == '\r' || head[k] == '\t')) k++;
    if (k < nh && head[k] == '{') return coopt_tokenizer_load_json(path, out);
    if (nh > 0 && head[0] == 0x0a) return coopt_tokenizer_load_spm(path, out);
    return coopt_tokenizer_load_llama2c(path, 0, out);
}

// ---- export ----

void coopt_tokenizer_get_vocab(const struct coopt_tokenizer *tok, struct coopt_vocab_info *out) {
    *out = (struct coopt_vocab_info){
        .type = tok->type, .pretok = tok->pretok, .n_tokens = tok->n_vocab, .scores = tok->scores,
        .attrs = tok->attrs, .bos_id = tok->bos, .eos_id = tok->eos, .unk_id = tok->unk, .pad_id = tok->pad,
        .add_bos = tok->add_bos, .add_eos = tok->add_eos, .add_space_prefix = tok->add_space_prefix,
    };
    if (tok->merges)
        for (uint32_t i = 0; i <= tok->merge_mask; i++) out->n_merges += tok->merges[i].key != 0;
}

static int cmp_merge_rank(const void *a, const void *b) {
    const struct merge_entry *x = a, *y = b;
    return (x->rank > y->rank) - (x->rank < y->rank);
}

enum coopt_status coopt_tokenizer_get_merges(const struct coopt_tokenizer *tok, int32_t *left, int32_t *right,
                                             int32_t *merged) {
    if (!tok->merges) return COOPT_OK;
    int32_t n = 0;
    for (uint32_t i = 0; i <= tok->merge_mask; i++) n += tok->merges[i].key != 0;
    struct merge_entry *e = coopt_malloc((size_t)n * sizeof(*e) + 1);
    if (!e) return COOPT_ERR_NOMEM;
    for (uint32_t i = 0, k = 0; i <= tok->merge_mask; i++)
        if (tok->merges[i].key != 0) e[k++] = tok->merges[i];
    qsort(e, (size_t)n, sizeof(*e), cmp_merge_rank);
    for (int32_t i = 0; i < n; i++) {
        left[i]   = (int32_t)(e[i].key >> 32) - 1;
        right[i]  = (int32_t)(uint32_t)e[i].key - 1;
        merged[i] = e[i].id;
    }
    free(e);
    return COOPT_OK;
}
