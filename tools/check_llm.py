"""Check refimpl's SmolLM2-135M against Hugging Face's load of the same GGUF, and time it.

    refimpl fetch smollm2-135m && python tools/check_llm.py [--threads N] [--json]

Needs torch, transformers, accelerate and gguf (`pip install -e .[interop]`). Prints, all in float32:
    1. logits on the first 256 tokens of tiny_data/text/val.txt: max |refimpl - HF| / max |HF|;
    2. token ids of every tiny_data text file: refimpl's tokenizer vs HF's GGUF tokenizer as loaded, and vs
       HF with the SmolLM tokenizer's own pre-tokenizer (Digits + ByteLevel, llama.cpp's "smollm");
    3. perplexity on the first 1,024 tokens of the first 20,000 characters of tiny_data/text/val.txt;
    4. greedy completions of two prompts;
    5. NumPy forward time over 256 tokens (median of 3, after one warm-up).
"""
import argparse
import json
import os
import statistics
import sys
import time

TEXTS = ("text/train.txt", "text/val.txt", "reasoning/train.txt", "reasoning/val.txt",
         "reasoning/eval_val.jsonl", "reasoning/eval_test.jsonl")
PROMPTS = ("The capital of France is", "def fibonacci(n):")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="BLAS and torch threads (default: as is)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    result = run(args.new_tokens, args.threads)
    if args.json:
        print(json.dumps(result, indent=1))


def run(new_tokens, threads):
    import numpy as np
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refimpl.core.decoder import decode, forward, prefill
    from refimpl.data.corpus import TINY_DATA
    from refimpl.data.pretrained import MODELS, decoder_file
    from refimpl.training.checkpoint import load_model

    if threads:
        torch.set_num_threads(threads)
    name, out = "smollm2-135m", {}
    gguf = decoder_file(name).parent / MODELS[name].gguf_file
    params, cfg, _, tok = load_model(name)
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_smol = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_smol.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    def hf_logits(ids):
        with torch.no_grad():
            return hf(torch.tensor(ids)).logits.numpy()

    val = (TINY_DATA / "text" / "val.txt").read_text(encoding="utf-8")
    ids = np.array([tok.encode(val)[:256]])                                            # [1, 256]
    ours, ref = forward(params, cfg, ids)[0], hf_logits(ids)
    out["logits_max_rel_diff"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
    out["logits_argmax_agree"] = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    say(f"1. logits, 256 val tokens, float32: max|refimpl-HF|/max|HF| = {out['logits_max_rel_diff']:.2e}, "
        f"argmax agrees at {out['logits_argmax_agree']:.1%} of positions")

    for rel in TEXTS:
        text = (TINY_DATA / rel).read_text(encoding="utf-8")
        mine = tok.encode(text)
        same = [mine == h.encode(text, add_special_tokens=False) for h in (hf_tok, hf_smol)]
        lines = [ln for ln in text.split("\n")
                 if tok.encode(ln) != hf_tok.encode(ln, add_special_tokens=False)]
        out[f"ids {rel}"] = {"tokens": len(mine), "same_as_hf_gguf": same[0], "same_as_hf_smollm": same[1],
                             "lines_differing_from_hf_gguf": len(lines)}
        say(f"2. {rel}: {len(mine)} tokens; same ids as HF GGUF tokenizer: {same[0]} "
            f"({len(lines)} lines differ); as HF with SmolLM's Digits+ByteLevel: {same[1]}")

    ppl_ids = np.array([tok.encode(val[:20000])[:1024]])                               # [1, 1024]
    for who, logits in (("refimpl", forward(params, cfg, ppl_ids)[0]), ("hf", hf_logits(ppl_ids))):
        z = logits[0, :-1].astype(np.float64)                                          # [1023, V]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        out[f"ppl_{who}"] = float(np.exp(-logp[np.arange(1023), ppl_ids[0, 1:]].mean()))
    say(f"3. perplexity, first 1,024 tokens of val[:20000]: refimpl {out['ppl_refimpl']:.3f}, "
        f"HF {out['ppl_hf']:.3f}")

    for prompt in PROMPTS:
        p = np.array([tok.encode(prompt)])
        logits, cache = prefill(params, cfg, p)
        new, _ = decode(params, cfg, cache, logits[:, -1], new_tokens)
        with torch.no_grad():
            hf_new = hf.generate(torch.tensor(p), max_new_tokens=new_tokens, do_sample=False)[0, p.shape[1]:]
        same = new[0].tolist() == hf_new.tolist()
        out[f"greedy {prompt}"] = {"refimpl": tok.decode(new[0]), "hf_same": same}
        say(f"4. {prompt!r} -> {tok.decode(new[0])!r} (HF greedy identical: {same})")

    def forward_s():
        start = time.perf_counter()
        forward(params, cfg, ids)
        return time.perf_counter() - start
    forward_s()                                                                         # warm-up
    out["forward_256_s"] = statistics.median(forward_s() for _ in range(3))
    say(f"5. NumPy float32 forward over 256 tokens: {out['forward_256_s']:.3f} s (median of 3; "
        f"{os.cpu_count()} cores, threads {threads or 'default'})")
    return out


def say(message):
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
