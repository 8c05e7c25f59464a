#!/usr/bin/env python3
"""
check_gptq_checkpoint.py -- an independent reader for the GPTQ checkpoints `coopt quantize`
writes. Never needed at runtime; run it by hand after quantizing.

It reads the directory with numpy + safetensors only, following the format as AutoGPTQ /
GPTQModel / transformers define it (not coopt's code):

  config.json   quantization_config {quant_method "gptq", bits 4, group_size, desc_act, sym,
                checkpoint_format "gptq"}; quantize_config.json (AutoGPTQ) must agree with it.
  per linear    qweight int32 [in/8, out]: nibble n (bits 4n..4n+3) of qweight[r, o] is the
                integer weight of input row 8r+n, output column o
                qzeros  int32 [groups, out/8]: nibble n of qzeros[g, c] is (zero - 1) of output
                column 8c+n (v1, "checkpoint_format": "gptq")
                scales  f16   [groups, out]
                g_idx   int32 [in]: group of each input row (i // group_size unless desc_act)
                W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])
  others        embeddings, lm_head, norms (f16); safetensors metadata {"format": "pt"}.

Checks (each prints one line; any failure exits with status 1):
  * config fields, tensor presence, dtypes, shapes, g_idx range (and g_idx == i // group_size
    without desc_act; equal group sizes with it), sym => every zero is 8;
  * --dequant FILE: the unpacked weights equal, bit for bit, the f32 weights that `coopt quantize
    --dump-dequant FILE` wrote (what the quantizer computed and ran in its sequential passes);
  * --float MODEL: relative Frobenius error of each layer against the float model (HF dir, or a
    GGUF / llama2.c file whose Q/K rows are compared in rotate-half order; an intermediate size
    padded to a multiple of 8 must be padded with zeros);
  * --text FILE --tokenizer T: llama-perplexity over --chunks windows of --ctx tokens with the
    unpacked weights through scripts/ref_llama.py (float64); with --coopt BIN the same windows
    run through `coopt perplexity` on the checkpoint and the two PPLs must agree within --tol
    (relative; coopt's int4 kernels quantize activations to int8, so they agree to ~0.1%).

Example:
  ./build/coopt quantize -m ../shared/models/story-lmrs -o /tmp/q --calib ../shared/data/tinystories-sample.txt \\
      --n-calib 8 --calib-len 64 --act-order --dump-dequant /tmp/q.deq.safetensors
  python3 scripts/check_gptq_checkpoint.py /tmp/q --dequant /tmp/q.deq.safetensors \\
      --float ../shared/models/story-lmrs --text ../shared/data/tinystories-valid-excerpt.txt \\
      --tokenizer ../shared/models/story-lmrs/tokenizer.json --ctx 256 --chunks 4 --coopt ./build/coopt
"""
import argparse
import json
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
FAILED = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILED.append(what)
    return cond


def read_safetensors(path):
    from safetensors import safe_open
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    with safe_open(path, framework="np") as st:
        for k in st.keys():
            out[k] = st.get_tensor(k)
    return header, out


def unpack_linear(t, prefix, n_in, n_out, gs, desc_act, sym):
    qw, qz, sc, gi = (t.get(prefix + s) for s in (".qweight", ".qzeros", ".scales", ".g_idx"))
    if not check(all(x is not None for x in (qw, qz, sc, gi)), f"{prefix}: qweight, qzeros, scales, g_idx present"):
        return None
    groups = 1 if gs == -1 else -(-n_in // gs)
    ok = check(qw.dtype == np.int32 and qz.dtype == np.int32 and sc.dtype == np.float16 and gi.dtype == np.int32,
               f"{prefix}: dtypes int32/int32/float16/int32")
    ok &= check(qw.shape == (n_in // 8, n_out) and qz.shape == (groups, n_out // 8) and sc.shape == (groups, n_out)
                and gi.shape == (n_in,), f"{prefix}: shapes {qw.shape} {qz.shape} {sc.shape} {gi.shape}")
    if not ok:
        return None
    ok &= check(gi.min() >= 0 and gi.max() < groups, f"{prefix}: g_idx in [0, {groups})")
    if not desc_act:
        ok &= check(np.array_equal(gi, np.arange(n_in) // (n_in if gs == -1 else gs)), f"{prefix}: g_idx = i // group_size")
    elif gs != -1:
        counts = np.bincount(gi, minlength=groups)
        ok &= check(np.all(counts[:-1] == gs), f"{prefix}: act-order groups hold {gs} rows each")
    shifts = (4 * np.arange(8)).astype(np.uint32)
    q = (qw.view(np.uint32)[:, None, :] >> shifts[None, :, None]) & 15          # [in/8, 8, out]
    q = q.reshape(n_in, n_out).astype(np.float64)                                # [in, out]
    z = (qz.view(np.uint32)[:, :, None] >> shifts[None, None, :]) & 15           # [G, out/8, 8]
    z = z.reshape(groups, n_out).astype(np.float64) + 1                          # v1: stored zero - 1
    if sym:
        ok &= check(np.all(z == 8), f"{prefix}: sym zero points are 8")
    s = sc.astype(np.float64)
    w = (s[gi] * (q - z[gi])).T                                                  # [out, in]
    return w if ok else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--dequant")
    ap.add_argument("--float", dest="float_dir")
    ap.add_argument("--text")
    ap.add_argument("--tokenizer")
    ap.add_argument("--bos", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--coopt")
    ap.add_argument("--tol", type=float, default=0.005)
    a = ap.parse_args()

    cfg = json.load(open(os.path.join(a.ckpt, "config.json")))
    qc = cfg.get("quantization_config") or {}
    check(qc.get("quant_method") == "gptq" and qc.get("bits") == 4 and qc.get("checkpoint_format", "gptq") == "gptq",
          f"config.json quantization_config: {qc.get('quant_method')}, {qc.get('bits')} bits, {qc.get('checkpoint_format')}")
    check(isinstance(qc.get("group_size"), int) and isinstance(qc.get("desc_act"), bool)
          and isinstance(qc.get("sym"), bool), "group_size int, desc_act and sym bool")
    qf = os.path.join(a.ckpt, "quantize_config.json")
    if os.path.exists(qf):
        q2 = json.load(open(qf))
        check(all(q2.get(k) == qc.get(k) for k in ("bits", "group_size", "desc_act", "sym")),
              "quantize_config.json agrees with quantization_config")
    check(cfg.get("torch_dtype") == "float16", "torch_dtype float16")
    gs, desc_act, sym = qc["group_size"], qc["desc_act"], qc["sym"]

    header, t = read_safetensors(os.path.join(a.ckpt, "model.safetensors"))
    check((header.get("__metadata__") or {}).get("format") == "pt", 'safetensors metadata {"format": "pt"}')
    dim, ffn, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or dim // nh
    shapes = [(nh * hd, dim), (nkv * hd, dim), (nkv * hd, dim), (dim, nh * hd), (ffn, dim), (ffn, dim), (dim, ffn)]
    tied = cfg.get("tie_word_embeddings", False)
    check(t.get("model.embed_tokens.weight") is not None and t["model.embed_tokens.weight"].dtype == np.float16,
          "model.embed_tokens.weight f16")
    check(tied or (t.get("lm_head.weight") is not None and t["lm_head.weight"].dtype == np.float16),
          "lm_head.weight f16 (or tied)")

    import ref_llama
    m = ref_llama.Model()
    m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = dim, L, nh, nkv, hd, ffn
    m.n_vocab = cfg["vocab_size"]
    m.eps = cfg.get("rms_norm_eps", 1e-6)
    m.rope_theta = cfg.get("rope_theta", 10000.0)
    m.rope_scaling = cfg.get("rope_scaling")
    m.rope_layout = ref_llama.ROPE_HALF
    f64 = lambda x: np.asarray(x, dtype=np.float64)
    m.embed = f64(t["model.embed_tokens.weight"])
    m.lm_head = m.embed if tied else f64(t["lm_head.weight"])
    m.norm = f64(t["model.norm.weight"])
    keys = ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]
    deq = read_safetensors(a.dequant)[1] if a.dequant else None
    ref = ref_llama.load(a.float_dir) if a.float_dir else None
    if ref is not None and ref.rope_layout != ref_llama.ROPE_HALF:  # GGUF / llama2.c: compare in HF row order
        ref = ref_llama.hf_permute_qk_to_half(ref)
    for l in range(L):
        p = f"model.layers.{l}."
        layer = dict(attn_norm=f64(t[p + "input_layernorm.weight"]), ffn_norm=f64(t[p + "post_attention_layernorm.weight"]))
        rel = []
        for k, name, (n_out, n_in) in zip(keys, LINEARS, shapes):
            w = unpack_linear(t, p + name, n_in, n_out, gs, desc_act, sym)
            if w is None:
                sys.exit(1)
            layer[k] = w
            if deq is not None:
                d = deq.get(p + name + ".weight")
                check(d is not None and d.shape == w.shape and np.array_equal(d.astype(np.float64), w),
                      f"{p}{name}: unpacked == coopt's dequantized weights (bit exact)")
            if ref is not None:
                wf = np.zeros_like(w)  # the checkpoint may pad the intermediate size with zeros
                r0 = ref.layers[l][k]
                wf[:r0.shape[0], :r0.shape[1]] = r0
                check(np.all(w[r0.shape[0]:] == 0) and np.all(w[:, r0.shape[1]:] == 0),
                      f"{p}{name}: padding rows/columns are zero") if w.shape != r0.shape else None
                rel.append(f"{name.split('.')[1]} {np.linalg.norm(w - wf) / np.linalg.norm(wf):.4f}")
        if rel:
            print(f"     layer {l} rel. error vs float: " + ", ".join(rel))
        m.layers.append(layer)

    if a.text:
        from check_ppl_reference import Tok, log_softmax
        tok = Tok(a.tokenizer, a.bos)
        tokens = tok(open(a.text, encoding="utf-8", errors="surrogateescape", newline="").read())
        n_chunk = min(len(tokens) // a.ctx, a.chunks)
        first, nll = a.ctx // 2, []
        for c in range(n_chunk):
            w = tokens[c * a.ctx:(c + 1) * a.ctx]
            lp = log_softmax(ref_llama.forward(m, [a.bos] + w[1:]))
            nll += [-lp[i, w[i + 1]] for i in range(first, a.ctx - 1)]
        ppl = math.exp(np.mean(nll))
        print(f"     reference (unpacked weights, float64): {len(nll)} tokens, PPL = {ppl:.4f}")
        if a.coopt:
            out = subprocess.run([a.coopt, "perplexity", "-m", a.ckpt, "-f", a.text, "-c", str(a.ctx),
                                  "--chunks", str(a.chunks)], capture_output=True, text=True).stdout
            mm = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
            got = float(mm.group(1)) if mm else float("nan")
            check(abs(got - ppl) <= a.tol * ppl, f"coopt perplexity on the checkpoint: PPL = {got:.4f} "
                  f"(reference {ppl:.4f}, rel. diff {abs(got - ppl) / ppl:.2e} <= {a.tol})")
    if FAILED:
        print(f"{len(FAILED)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
