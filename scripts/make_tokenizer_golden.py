#!/usr/bin/env python3
"""Golden files for tests/test_tokenizer.c, made with the reference libraries.

  python3 scripts/make_tokenizer_golden.py      (COOPT_MODELS, COOPT_DATA as for the tests)

Writes tests/golden/tok_<name>.txt: a header line "#parse_special 0|1", then one case per line:
    hex(input utf-8) TAB ids (space separated, BOS included) TAB hex(reference decode of the ids)
The reference decode is sentencepiece's decode(ids), or HF tokenizers' decode(ids,
skip_special_tokens=True). HF tokenizers always split added tokens out of the text, so its files
are tested with COOPT_TOKENIZE_PARSE_SPECIAL; sentencepiece never does.

Also trains two small byte-level BPE tokenizers with `tokenizers` (LLaMA 3 Split regex and GPT-2
ByteLevel regex) on a slice of wiki.test.raw plus code/emoji text, saved as
tests/golden/tok_bytelevel.json and tests/golden/tok_gpt2.json.
"""
import os
import sys

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.environ.get("COOPT_MODELS", os.path.join(ROOT, "..", "shared", "models"))
DATA = os.environ.get("COOPT_DATA", os.path.join(ROOT, "..", "shared", "data"))
OUT = os.path.join(ROOT, "tests", "golden")

LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

wiki = open(os.path.join(DATA, "wiki.test.raw"), encoding="utf-8").read()

CASES = [
    "",
    "Once upon a time",
    "Hello world",
    " Hello world",
    "  leading and trailing  ",
    "Hello\n\nworld\n",
    "tabs\tand\t\tspaces   here\r\nCRLF",
    "\n",
    " ",
    "   ",
    "I'll go, you'd've, they're, DON'T, she'S, it'LL",
    "The year 2024 had 1234567890 numbers and 3.14159 and 1,000,000.",
    "Café naïve résumé über Ærøskøbing",
    "Привет, как дела? Москва",
    "日本語のテキストと中文字符，以及한국어",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️",
    "def f(x):\n    return x**2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))",
    "int main(void) { printf(\"%d\\n\", a[i] << 2); return 0; }",
    "Lily and Tom went to the park. They saw a big, red ball!",
    "a" * 50,
    "!!!???...---",
    "x" + " " * 7 + "y",
    "mixed ١٢٣ digits ½ and Ⅻ",
    "\u00a0non-breaking\u3000ideographic space\u2028line sep",
    wiki[2000:3200],
    wiki[50000:50600],
]


def write(name, parse_special, rows):
    path = os.path.join(OUT, f"tok_{name}.txt")
    with open(path, "w") as f:
        f.write(f"#parse_special {int(parse_special)}\n")
        for text, ids, dec in rows:
            f.write(text.encode("utf-8").hex() + "\t" + " ".join(map(str, ids)) + "\t" + dec.encode("utf-8").hex() + "\n")
    print(f"{path}: {len(rows)} cases")


def spm_rows(model_path, extra):
    sp = spm.SentencePieceProcessor(model_file=model_path)
    rows = []
    for t in CASES + extra:
        ids = [sp.bos_id()] + sp.encode(t)
        rows.append((t, ids, sp.decode(ids)))
    return rows


def hf_rows(tok, extra):
    # NOTE: tokenizers 0.23 does not skip special added tokens with normalized=true (story-lmrs)
    # in decode(skip_special_tokens=True); drop them first, which is what skipping means.
    special = {i for i, a in tok.get_added_tokens_decoder().items() if a.special}
    rows = []
    for t in CASES + extra:
        ids = tok.encode(t).ids
        rows.append((t, ids, tok.decode([i for i in ids if i not in special], skip_special_tokens=True)))
    return rows


def train(pre, vocab_size, specials):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    code = open(os.path.abspath(__file__), encoding="utf-8").read()
    extra = ["I'll be there. You're right, we've done it! 😀👍 ❤️ 日本語 Привет"] * 20
    tok.train_from_iterator([wiki[:200000], code] + extra, trainer)
    return tok


def main():
    os.makedirs(OUT, exist_ok=True)
    spm_extra = ["<s>literal</s> text", "<unk>"]
    write("llama2", False, spm_rows(os.path.join(MODELS, "llama2-tokenizer", "tokenizer.model"), spm_extra))
    write("tinystories_spm", False, spm_rows(os.path.join(MODELS, "tinystories-mha-25m", "tokenizer.model"), spm_extra))

    ts = Tokenizer.from_file(os.path.join(MODELS, "tinystories-mha-25m", "tokenizer.json"))
    write("tinystories_json", True, hf_rows(ts, ["<s>Once</s> upon<unk>", "x </s> y"]))
    sl = Tokenizer.from_file(os.path.join(MODELS, "story-lmrs", "tokenizer.json"))
    write("story_lmrs", True, hf_rows(sl, ["<|start_story|>Once upon<|end_story|>", "a <|end_story|> b"]))

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    bl = train(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_RE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), 1500, specials)
    bl.add_tokens(["[NOTE]"])  # a non-special added token (always split out, decoded as text)
    bos = bl.token_to_id("<|begin_of_text|>")
    bl.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    bl.save(os.path.join(OUT, "tok_bytelevel.json"))
    bl = Tokenizer.from_file(os.path.join(OUT, "tok_bytelevel.json"))
    write("bytelevel", True, hf_rows(bl, ["<|begin_of_text|>hi<|eot_id|>\n[NOTE] x[NOTE]y", "<|eot_id|"]))

    g2 = train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), 700, ["<|endoftext|>"])
    g2.save(os.path.join(OUT, "tok_gpt2.json"))
    g2 = Tokenizer.from_file(os.path.join(OUT, "tok_gpt2.json"))
    write("gpt2", True, hf_rows(g2, ["a<|endoftext|>b"]))
    for f in sorted(os.listdir(OUT)):
        if f.startswith("tok_"):
            print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    sys.exit(main())
