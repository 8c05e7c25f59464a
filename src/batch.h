/*
 * batch.h -- the device-independent description of one forward step: a ragged set of tokens
 * from several sequences (prefill chunks and decode tokens mixed), with everything attention
 * needs to find each token's context in the paged KV cache.
 *
 * Token t belongs to batch sequence s = tok_seq[t], sits at position pos[t] and is written to
 * KV slot slots[t]. It attends to positions [max(0, pos[t] - window + 1), pos[t]] of its
 * sequence (window 0 = unlimited), whose pages are block_tables[s * max_blocks + pos / page_size].
 * Because all tokens of the step are stored before attention runs, causal attention inside a
 * prefill chunk needs no special case.
 */
#ifndef COOPT_BATCH_H
#define COOPT_BATCH_H

#include <stdbool.h>
#include <stdint.h>

struct pick_state;

struct coopt_batch {
    int32_t        n_tokens;
    const int32_t *tokens;       // [n_tokens]
    const int32_t *pos;          // [n_tokens]
    const int32_t *tok_seq;      // [n_tokens] index into this batch's sequences
    const int64_t *slots;        // [n_tokens] KV slot = page * page_size + pos % page_size
    int32_t        n_seqs;       // sequences in this step
    int32_t        max_blocks;   // row length of block_tables
    const int32_t *block_tables; // [n_seqs][max_blocks] page ids, -1 = released / none
    const int32_t *seq_lens;     // [n_seqs] positions held after this step
    const int32_t *seq_ids;      // [n_seqs] KV sequence id of each batch sequence; NULL = no K offsets
    int32_t        window;       // sliding window (0 = full)
    bool           no_seq_start; // true: no token of the step is at position 0 (K offsets stay as they are)
    int32_t        n_out;        // tokens whose logits are computed
    const int32_t *out_rows;     // [n_out] token indices, ascending
    int32_t       *next_tokens;  // [n_out] backend memory, or NULL: receives the argmax of each output
                                 // row's logits (the greedy choice, see the argmax op), which may be
                                 // this step's own tokens array (the next step's input)
    int32_t       *next_tokens_host; // [n_out] page-locked host memory the backend also writes them to, or NULL
    struct pick_state *pick;     // [n_out] or NULL; with next_tokens: the tokens are drawn by the sample
                                 // op from these sampler states (pick.h) instead of the argmax (a row
                                 // whose top_k is 0 gets none), and next_tokens_host is the op's
                                 // out_host (token and random state, PICK_RESULT_BYTES a row)
    uint8_t       *pick_scratch; // with pick: the op's scratch (n_out blocks of pick_scratch_bytes)
};

#endif // COOPT_BATCH_H
