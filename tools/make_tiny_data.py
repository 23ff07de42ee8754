"""Rebuild the shipped data in tiny_data/ from scratch, deterministically and offline.

    python tools/make_tiny_data.py     # about 3 minutes on 2 cores; --keep-tokenizer: seconds

It rewrites tiny_data/{text,reasoning,tokenizer,licenses}/, LICENSES.md and MANIFEST.json (never
golden/ or checkpoints/); docs/data.md describes them. English: CPython's reference topics
(`pydoc_data.topics`), whole topics (about 5%) held out for val. Reasoning: problems of
tools/reasoning.py, no two splits sharing a prompt. Tokenizer: `tiktoken._educational.bpe_train`
to 2048 ranks on a fixed sample, then `<|endoftext|>` = 2048. The output depends only on this file,
tools/reasoning.py and the Python version (its pydoc_data): the shipped files come from 3.11.7.
"""

import argparse
import hashlib
import json
import pydoc_data.topics
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from tiktoken._educational import bpe_encode, bpe_train

import reasoning  # tools/reasoning.py, beside this script
from refimpl.data.corpus import DATA_FILES, DOC_SEPARATOR, EVAL_FILES, TINY_DATA
from refimpl.data.tokenizer import EOT, N_RANKS, PAT_STR, write_ranks

SEED = 2412
BUILT_WITH = "3.11.7"
VAL_FRACTION = 0.05
N_EVAL = 500            # problems in each of eval_val.jsonl and eval_test.jsonl
N_LONG = 300            # problems in eval_long.jsonl
LONG_SEED = SEED + 1    # its own generator: the other files stay as they were before it existed
N_FEWSHOT = 50          # problems per (task, difficulty) in eval_fewshot.jsonl
FEWSHOT_SEED = SEED + 2
N_TRAIN_LINES = 16000   # reasoning lines in the train mixture; val gets the same ratio to text
BPE_TEXT_CHARS = 240_000
BPE_REASONING_LINES = 2000
ASCII_PUNCT = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
               "\u2014": "--", "\u2013": "-"}
UNDERLINE = re.compile(r"^([*=\-^~])\1{2,}$")


def clean_topic(text):
    """ASCII punctuation, no trailing spaces, no heading underlines, at most one blank line."""
    for src, dst in ASCII_PUNCT.items():
        text = text.replace(src, dst)
    lines = [line.rstrip() for line in text.splitlines()]
    lines = [line for line in lines if not UNDERLINE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def english_splits(rng):
    """(train_docs, val_docs): whole topics go to val in a seeded order until 5% of the text."""
    docs = [clean_topic(pydoc_data.topics.topics[k]) for k in sorted(pydoc_data.topics.topics)]
    assert not any(DOC_SEPARATOR in d for d in docs)
    target, val_chars, val_ids = VAL_FRACTION * sum(map(len, docs)), 0, set()
    for i in rng.permutation(len(docs)):
        if val_chars < target and val_chars + len(docs[i]) <= 1.5 * target:
            val_ids.add(int(i))
            val_chars += len(docs[i])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    return train, [d for i, d in enumerate(docs) if i in val_ids]


def reasoning_splits(rng, n_val_lines):
    """Disjoint problem sets drawn in this order with one set of seen prompts: eval_test, eval_val
    (jsonl), then the val and train streams."""
    seen = set()
    sizes = {"eval_test": N_EVAL, "eval_val": N_EVAL, "val": n_val_lines, "train": N_TRAIN_LINES}
    return {name: reasoning.generate(n, rng, exclude=seen) for name, n in sizes.items()}


def long_split(problems):
    """N_LONG problems with 3..5-digit answers, none sharing a prompt with the other splits."""
    seen = {p["prompt"] for split in problems.values() for p in split}
    return reasoning.generate(N_LONG, np.random.default_rng(LONG_SEED), exclude=seen,
                              tasks=tuple(reasoning.LONG_DIFFICULTIES),
                              difficulties=reasoning.LONG_DIFFICULTIES)


def fewshot_split(problems, long):
    """N_FEWSHOT problems per (task, difficulty) of FEWSHOT_DIFFICULTIES, none sharing a prompt with
    the other splits, each with its few-shot prompt (reasoning.fewshot)."""
    seen = {p["prompt"] for split in (*problems.values(), long) for p in split}
    rng = np.random.default_rng(FEWSHOT_SEED)
    cells = [(t, d) for t, ds in reasoning.FEWSHOT_DIFFICULTIES.items() for d in ds]
    drawn = [p for t, d in cells for p in reasoning.generate(N_FEWSHOT, rng, exclude=seen, tasks=(t,),
                                                              difficulties={t: (d,)})]
    return reasoning.fewshot(drawn, rng)


def bpe_sample(train_docs, train_lines, rng):
    """A fixed subsample: random train paragraphs (kept in order) plus the first reasoning lines."""
    paragraphs = [p for d in train_docs for p in d.split("\n\n")]
    chosen, chars = [], 0
    for i in rng.permutation(len(paragraphs)):
        if chars >= BPE_TEXT_CHARS:
            break
        chosen.append(int(i))
        chars += len(paragraphs[i]) + 2
    text = "\n\n".join(paragraphs[i] for i in sorted(chosen))
    return text + "\n\n" + "".join(train_lines[:BPE_REASONING_LINES])


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def write_jsonl(path, problems):
    write_text(path, "".join(json.dumps(p, sort_keys=True) + "\n" for p in problems))


def write_tokenizer(out, sample):
    """2048 ranks by bpe_train; each token must encode to itself (so tiktoken == the oracle)."""
    start = time.perf_counter()
    ranks = bpe_train(sample, N_RANKS, PAT_STR, visualise=None)
    print(f"bpe_train: {len(ranks)} ranks from {len(sample)} characters "
          f"in {time.perf_counter() - start:.0f} s")
    bad = [tok for tok, rank in ranks.items() if bpe_encode(ranks, tok, visualise=None) != [rank]]
    assert not bad, f"tokens not reachable by their own merges: {bad[:5]}"
    path = out / "tokenizer" / "bpe.tiktoken"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ranks(ranks, path)
    meta = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "pat_str": PAT_STR,
            "special_tokens": {EOT: N_RANKS}, "n_vocab": N_RANKS + 1,
            "trained_with": "tiktoken._educational.bpe_train",
            "training_sample_chars": len(sample),
            "training_sample_sha256": hashlib.sha256(sample.encode("utf-8")).hexdigest()}
    write_text(out / "tokenizer" / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")


def write_manifest(out):
    def entries(rels):
        return {rel: {"sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest(),
                      "bytes": (out / rel).stat().st_size} for rel in rels}
    manifest = {"files": entries(DATA_FILES), "eval_files": entries(EVAL_FILES), "seed": SEED,
                "long_seed": LONG_SEED, "fewshot_seed": FEWSHOT_SEED, "reasoning_version": reasoning.VERSION,
                "python": BUILT_WITH, "made_by": "python tools/make_tiny_data.py"}
    write_text(out / "MANIFEST.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")


LICENSES = """\
# Licences of the data in tiny_data/

- `text/` is extracted from CPython's documentation as shipped in `pydoc_data/topics.py`
  (CPython 3.11.7), lightly cleaned (see docs/data.md). Copyright (c) 2001-2023 Python Software
  Foundation; All Rights Reserved. Used and redistributed under the PSF License Agreement
  (version 2); the full text is in `licenses/CPython-LICENSE.txt`.
- `reasoning/` is synthetic, generated by `tools/reasoning.py`; it is part of this project
  (MIT licence).
- `tokenizer/` holds BPE ranks trained on the two sources above by this project (MIT licence).
- `checkpoints/decoder-demo.{npz,json}` is a decoder trained by this project on the data above
  (MIT licence); `shipped-coprocessor/` is a coprocessor trained by this project against it (MIT
  licence); `golden/` holds generated golden vectors (MIT licence).
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-tokenizer", action="store_true",
                        help="reuse tiny_data/tokenizer/ instead of retraining the BPE ranks")
    args = parser.parse_args(argv)
    if sys.version.split()[0] != BUILT_WITH:
        print(f"warning: the shipped data was made with Python {BUILT_WITH}; this is "
              f"{sys.version.split()[0]}, so the English text may differ", file=sys.stderr)
    out, rng = TINY_DATA, np.random.default_rng(SEED)
    for sub in ("text", "reasoning", "licenses") + (() if args.keep_tokenizer else ("tokenizer",)):
        shutil.rmtree(out / sub, ignore_errors=True)
    train_docs, val_docs = english_splits(rng)
    n_val_lines = round(N_TRAIN_LINES * sum(map(len, val_docs)) / sum(map(len, train_docs)))
    problems = reasoning_splits(rng, n_val_lines)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        write_text(out / "text" / f"{split}.txt", DOC_SEPARATOR.join(docs))
        write_text(out / "reasoning" / f"{split}.txt", "".join(map(reasoning.problem_line, problems[split])))
    for split in ("val", "test"):
        write_jsonl(out / "reasoning" / f"eval_{split}.jsonl", problems[f"eval_{split}"])
    long = long_split(problems)
    write_jsonl(out / "reasoning" / "eval_long.jsonl", long)
    write_jsonl(out / "reasoning" / "eval_fewshot.jsonl", fewshot_split(problems, long))
    if not args.keep_tokenizer:
        train_lines = [reasoning.problem_line(p) for p in problems["train"]]
        write_tokenizer(out, bpe_sample(train_docs, train_lines, rng))
    write_text(out / "LICENSES.md", LICENSES)
    (out / "licenses").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(sysconfig.get_path("stdlib")) / "LICENSE.txt",
                    out / "licenses" / "CPython-LICENSE.txt")
    write_manifest(out)
    print(f"wrote {out}: {len(train_docs)}/{len(val_docs)} train/val topics, "
          f"{N_TRAIN_LINES}/{n_val_lines} train/val reasoning lines, 2 x {N_EVAL} eval problems, "
          f"{N_LONG} long-answer problems, {N_FEWSHOT} few-shot problems per task and difficulty")


if __name__ == "__main__":
    main()
