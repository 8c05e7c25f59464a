/*
 * tokenizer.h -- internal tokenizer construction. Every source of a vocabulary (GGUF metadata,
 * tokenizer.json, SentencePiece tokenizer.model, llama2.c tokenizer.bin) is read into a
 * struct coopt_vocab_desc and handed to coopt_tokenizer_init_vocab(), so the encoder and
 * decoder exist once.
 */
#ifndef COOPT_TOKENIZER_H
#define COOPT_TOKENIZER_H

#include "coopt.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum coopt_tok_type {
    COOPT_TOK_SPM = 0,    // SentencePiece-style BPE over '▁'-joined text with <0xXX> byte fallback
    COOPT_TOK_BPE_BYTES,  // byte-level BPE (GPT-2 / LLaMA 3): bytes mapped to printable chars
};

// Token attributes, GGUF's tokenizer.ggml.token_type values.
enum coopt_token_attr {
    COOPT_TOKEN_NORMAL       = 1,
    COOPT_TOKEN_UNKNOWN      = 2,
    COOPT_TOKEN_CONTROL      = 3,
    COOPT_TOKEN_USER_DEFINED = 4,
    COOPT_TOKEN_UNUSED       = 5,
    COOPT_TOKEN_BYTE         = 6,
};

enum coopt_pretok {
    COOPT_PRETOK_DEFAULT = 0, // SPM: none; BPE: GPT-2 regex
    COOPT_PRETOK_LLAMA3,      // LLaMA 3 regex (digits split in groups of 1-3, contractions case-insensitive)
    COOPT_PRETOK_GPT2,
};

// Everything is borrowed; coopt_tokenizer_init_vocab copies what it keeps.
struct coopt_vocab_desc {
    enum coopt_tok_type      type;
    int32_t                  n_tokens;
    const char *const       *tokens;      // [n_tokens] piece text (not NUL-terminated if token_lens)
    const uint32_t          *token_lens;  // [n_tokens] or NULL (then NUL-terminated)
    const float             *scores;      // [n_tokens] or NULL (SPM merge priority: higher first)
    const int32_t           *token_attrs; // [n_tokens] enum coopt_token_attr or NULL (all normal)
    int32_t                  n_merges;    // BPE merges "a b", rank = index; 0 for score-based SPM
    const char *const       *merges;      // [n_merges]
    const uint32_t          *merge_lens;  // [n_merges] or NULL
    int32_t                  bos_id, eos_id, unk_id, pad_id; // -1 if absent
    const int32_t           *eog_ids;     // extra end-of-generation ids, may be NULL
    int32_t                  n_eog;
    bool                     add_bos, add_eos;
    bool                     add_space_prefix; // SPM: prepend '▁' to the text (LLaMA 1/2 default)
    enum coopt_pretok        pretok;
};

// Builds a tokenizer; validates ids (bos/eos in range, merges reference known tokens) and
// returns COOPT_ERR_FORMAT with a message on bad data.
enum coopt_status coopt_tokenizer_init_vocab(const struct coopt_vocab_desc *d, struct coopt_tokenizer **out);

// Raw piece bytes of a token as stored in the vocabulary (borrowed). NULL if out of range.
const char *coopt_tokenizer_piece(const struct coopt_tokenizer *tok, int32_t id, size_t *len);

// Readers for each vocabulary source (implemented by the tokenizer module).
enum coopt_status coopt_tokenizer_load_json(const char *path, struct coopt_tokenizer **out);
enum coopt_status coopt_tokenizer_load_spm(const char *path, struct coopt_tokenizer **out);
// llama2.c tokenizer.bin: header int32 max_token_length, then per token: f32 score, int32 len, bytes.
enum coopt_status coopt_tokenizer_load_llama2c(const char *path, int32_t n_vocab, struct coopt_tokenizer **out);

// ---- export (for writers such as coopt convert) ----

// The vocabulary as the tokenizer holds it. Pointers borrow from tok (valid while it lives).
struct coopt_vocab_info {
    enum coopt_tok_type type;
    enum coopt_pretok   pretok;
    int32_t             n_tokens;
    const float        *scores;  // [n_tokens]
    const uint8_t      *attrs;   // [n_tokens] enum coopt_token_attr
    int32_t             n_merges; // entries coopt_tokenizer_get_merges writes (0: score-based SPM)
    int32_t             bos_id, eos_id, unk_id, pad_id; // -1 if absent
    bool                add_bos, add_eos, add_space_prefix;
};
void coopt_tokenizer_get_vocab(const struct coopt_tokenizer *tok, struct coopt_vocab_info *out);
// Writes the merges ordered by rank: merge i joins token left[i] and right[i] into merged[i].
// Each array holds info.n_merges entries. COOPT_ERR_NOMEM if scratch memory runs out.
enum coopt_status coopt_tokenizer_get_merges(const struct coopt_tokenizer *tok, int32_t *left, int32_t *right,
                                             int32_t *merged);

#endif // COOPT_TOKENIZER_H
