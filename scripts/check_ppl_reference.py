#!/usr/bin/env python3
"""
check_ppl_reference.py -- independent numpy checks of `coopt perplexity` and `coopt lambada`.
Never needed at runtime; run it by hand and compare its numbers with the tool's.

  baseline FILE
      Reads a --save-logits / llama.cpp --kl-divergence-base file, checks its layout, and
      recomputes PPL and its "+/-" from the stored target log-probs with numpy. Must agree with the
      `Final estimate` of the run that saved it to ~1e-4 relative (the records quantize log-probs
      in steps of <= 16/65535).

  ppl --model M --tokenizer T --text FILE [--ctx 512] [--chunks N]
      llama-perplexity arithmetic on top of scripts/ref_llama.py (float64 forward): tokens =
      [BOS] + tokenize(text); windows of ctx tokens, the first replaced by BOS; logits at
      ctx/2 .. ctx-2 score the next token; PPL = exp(mean nll), err = PPL*sqrt(var/(count-1)).

  lambada --model M --tokenizer T --jsonl FILE [--limit N] [--no-bos]
      lm-evaluation-harness lambada_openai: context = text.rsplit(' ', 1)[0], target = ' ' + last
      word, HFLM._encode_pair (trailing whitespace moved to the continuation, continuation_enc =
      tok(whole)[len(tok(context)):]), acc = all target tokens greedy, ppl = exp(-mean loglik).

T is a SentencePiece .model or a Hugging Face tokenizer.json (encoded without special tokens;
BOS is prepended from --bos, default 1). Example (stories260K uses the 512-piece vocabulary that
tinystories-mha-25m ships as tokenizer.model):

  python3 scripts/check_ppl_reference.py ppl --model ../shared/models/stories260K.gguf \
      --tokenizer ../shared/models/tinystories-mha-25m/tokenizer.model \
      --text ../shared/data/tinystories-valid-excerpt.txt --chunks 4
  ./build/coopt perplexity -m ../shared/models/stories260K.gguf \
      -f ../shared/data/tinystories-valid-excerpt.txt --chunks 4
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def lp_record_len(n_vocab):
    return 2 * ((n_vocab + 1) // 2) + 4


def check_baseline(path):
    raw = open(path, "rb").read()
    if raw[:8] != b"_logits_":
        sys.exit(f"{path}: bad magic")
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<3i", raw, 8)
    first = n_ctx // 2
    n_scored = n_ctx - 1 - first
    nv = lp_record_len(n_vocab)
    off = 20
    tokens = np.frombuffer(raw, dtype="<i4", count=n_chunk * n_ctx, offset=off)
    off += 4 * n_chunk * n_ctx
    expected = off + 2 * n_chunk * n_scored * nv
    if len(raw) != expected:
        sys.exit(f"{path}: {len(raw)} bytes, header implies {expected}")
    recs = np.frombuffer(raw, dtype="<u2", offset=off).reshape(n_chunk, n_scored, nv)
    head = recs[:, :, :4].copy().view("<f4")  # [chunk, scored, 2] = scale, min_log_prob
    scale, min_lp = head[..., 0].astype(np.float64), head[..., 1].astype(np.float64)
    tok = tokens.reshape(n_chunk, n_ctx)[:, first + 1:]  # targets of positions first .. n_ctx-2
    q = np.take_along_axis(recs[:, :, 4:4 + n_vocab], tok[:, :, None].astype(np.int64), axis=2)[..., 0]
    nll = -(scale * q + min_lp)
    report("baseline", nll.ravel())
    print(f"n_ctx {n_ctx}, n_vocab {n_vocab}, {n_chunk} chunks, {n_scored} scored per chunk")


def report(what, nll):
    nll = np.asarray(nll, dtype=np.float64)
    mean = nll.mean()
    var = (nll * nll).mean() - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (len(nll) - 1)) if len(nll) > 1 and var > 0 else float("nan")
    print(f"{what}: {len(nll)} tokens, Final estimate: PPL = {ppl:.4f} +/- {err:.5f}")


class Tok:
    def __init__(self, path, bos):
        self.bos = bos
        if path.endswith(".json"):
            from tokenizers import Tokenizer
            t = Tokenizer.from_file(path)
            self.enc = lambda s: t.encode(s, add_special_tokens=False).ids
        else:
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=path)
            self.enc = lambda s: sp.encode(s)

    def __call__(self, s, bos=True):
        return ([self.bos] if bos else []) + list(self.enc(s))


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def check_ppl(a):
    import ref_llama
    m = ref_llama.load(a.model)
    tok = Tok(a.tokenizer, a.bos)
    tokens = tok(open(a.text, encoding="utf-8", errors="surrogateescape", newline="").read())  # keep \r\n
    n_chunk = len(tokens) // a.ctx
    if a.chunks:
        n_chunk = min(n_chunk, a.chunks)
    first = a.ctx // 2
    nll = []
    for c in range(n_chunk):
        w = tokens[c * a.ctx:(c + 1) * a.ctx]
        inp = [a.bos] + w[1:]
        lp = log_softmax(ref_llama.forward(m, inp))
        nll += [-lp[p, w[p + 1]] for p in range(first, a.ctx - 1)]
        print(f"[{c + 1}]{math.exp(np.mean(nll)):.4f},", end="", flush=True)
    print()
    report("reference", nll)


def check_lambada(a):
    import ref_llama
    m = ref_llama.load(a.model)
    tok = Tok(a.tokenizer, a.bos)
    use_bos = not a.no_bos
    n = correct = 0
    lls = []
    for line in open(a.jsonl, encoding="utf-8", newline=""):
        if not line.strip():
            continue
        text = json.loads(line)["text"]
        context, target = " ".join(text.split(" ")[:-1]), " " + text.split(" ")[-1]
        if context == "":
            ctx_enc, cont_enc = [a.bos if use_bos else a.eos], tok(target, bos=False)
        else:
            n_sp = len(context) - len(context.rstrip())
            if n_sp:
                target, context = context[-n_sp:] + target, context[:-n_sp]
            whole = tok(context + target, bos=use_bos)
            ctx_enc = tok(context, bos=use_bos)
            cont_enc = whole[len(ctx_enc):]
            if not cont_enc:  # the harness asserts here; coopt splits at the common prefix
                lcp = 0
                while lcp < min(len(ctx_enc), len(whole)) and ctx_enc[lcp] == whole[lcp]:
                    lcp += 1
                ctx_enc, cont_enc = whole[:lcp], whole[lcp:]
        inp = (ctx_enc + cont_enc)[:-1]
        lp = log_softmax(ref_llama.forward(m, inp))[len(inp) - len(cont_enc):]
        ll = sum(lp[i, t] for i, t in enumerate(cont_enc))
        greedy = all(int(lp[i].argmax()) == t for i, t in enumerate(cont_enc))
        n += 1
        correct += greedy
        lls.append(ll)
        if a.limit and n >= a.limit:
            break
    acc = correct / n
    se = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0
    print(f"reference: acc = {acc:.4f} ± {se:.4f}, ppl = {math.exp(-np.mean(lls)):.2f} ({n} documents)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("baseline")
    b.add_argument("file")
    for name in ("ppl", "lambada"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--tokenizer", required=True)
        p.add_argument("--bos", type=int, default=1)
        p.add_argument("--eos", type=int, default=2)
        if name == "ppl":
            p.add_argument("--text", required=True)
            p.add_argument("--ctx", type=int, default=512)
            p.add_argument("--chunks", type=int, default=0)
        else:
            p.add_argument("--jsonl", required=True)
            p.add_argument("--limit", type=int, default=0)
            p.add_argument("--no-bos", action="store_true")
    a = ap.parse_args()
    if a.cmd == "baseline":
        check_baseline(a.file)
    elif a.cmd == "ppl":
        check_ppl(a)
    else:
        check_lambada(a)


if __name__ == "__main__":
    main()
