"""The tiny data of `tiny_data/` (docs/data.md), every file checked against its sha256 in MANIFEST.json: the
pretraining mixture as token ids, random windows of it, the reasoning evals, the data hash."""
import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from refimpl.errors import require
from refimpl.files import read_json

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = Path(os.environ.get("REFIMPL_DATA") or REPO / "tiny_data")
SHIPPED_DECODER = TINY_DATA / "checkpoints" / "decoder-demo.npz"
DATA_FILES = ("text/train.txt", "text/val.txt", "reasoning/train.txt", "reasoning/val.txt",
              "reasoning/eval_val.jsonl", "reasoning/eval_test.jsonl",
              "tokenizer/bpe.tiktoken", "tokenizer/meta.json")
EVAL_FILES = ("reasoning/eval_long.jsonl", "reasoning/eval_fewshot.jsonl")  # evaluation's: not in data_hash
EVAL_SPLITS = ("val", "test", "long", "fewshot")
DOC_SEPARATOR = "\f\n"
MIXTURE_SEED = 0
FIX = "re-run `python tools/make_tiny_data.py`, restore the file, or set REFIMPL_DATA"


def _read_bytes(rel):
    """The bytes of tiny_data/rel, checked against MANIFEST.json."""
    path = TINY_DATA / rel
    require(path.is_file(), f"data file {path} is missing; {FIX}")
    blob = path.read_bytes()
    manifest = _manifest()
    expected = {**manifest.get("eval_files", {}), **manifest["files"]}.get(rel, {}).get("sha256")
    require(hashlib.sha256(blob).hexdigest() == expected,
            f"data file {path} does not match its sha256 in MANIFEST.json; {FIX}")
    return blob


@functools.cache
def _manifest():
    path = TINY_DATA / "MANIFEST.json"
    require(path.is_file(), f"{path} is missing; {FIX}")
    manifest = read_json(path, "data manifest", FIX)
    files = manifest.get("files")
    require(isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()),
            f"{path} is corrupt (no 'files' table of {{name: {{sha256}}}}); {FIX}")
    return manifest


SOURCES = ("mixture", "text", "reasoning")   # `--data`: both, the English text alone, the reasoning lines alone


@functools.lru_cache(maxsize=4)
def _documents(split, tokenizer):
    """[(ids with a closing eot, is a reasoning line)] of "train" or "val", in the mixture's fixed order."""
    require(split in ("train", "val"), f"unknown split {split!r}; use 'train' or 'val'")
    text = _read_bytes(f"text/{split}.txt").decode("utf-8").split(DOC_SEPARATOR)
    lines = _read_bytes(f"reasoning/{split}.txt").decode("utf-8").splitlines(keepends=True)
    docs = [(d, False) for d in text] + [(d, True) for d in lines]
    order = np.random.default_rng(MIXTURE_SEED).permutation(len(docs))
    return [(tokenizer.encode(docs[i][0]) + [tokenizer.eot_id], docs[i][1]) for i in order]


@functools.lru_cache(maxsize=16)
def load_tokens(split, tokenizer, source="mixture", reasoning_mask=False):
    """The documents of `source` in split, each followed by eot, as int32 [N] (cached): "mixture" is every
    reference topic and reasoning line in a fixed shuffled order; "text" and "reasoning" keep one kind, in
    that order. reasoning_mask: instead, bool [N], True where a token belongs to a reasoning line."""
    require(source in SOURCES, f"unknown data source {source!r}: use one of {', '.join(SOURCES)}")
    docs = [(ids, r) for ids, r in _documents(split, tokenizer) if source == "mixture" or r == (source != "text")]
    out = np.concatenate([np.full(len(ids), r) if reasoning_mask else ids for ids, r in docs])
    out = out.astype(bool if reasoning_mask else np.int32)
    out.flags.writeable = False  # the cached array is shared
    return out


def _check_windows(tokens, batch_size, seq_len):
    for name, n in (("batch_size", batch_size), ("seq_len", seq_len)):
        require(isinstance(n, (int, np.integer)) and n >= 1, f"{name} must be a positive int, got {n!r}")
    require(np.ndim(tokens) == 1, f"tokens must be 1-D, got shape {np.shape(tokens)} (use load_tokens)")
    require(len(tokens) >= seq_len, f"the corpus has {len(tokens)} tokens, fewer than "
                                    f"seq_len={seq_len}; use a shorter seq_len or more data")


def sample_batch(tokens, batch_size, seq_len, rng):
    """int64 [B, T]: B windows of T consecutive tokens at uniform random starts."""
    _check_windows(tokens, batch_size, seq_len)
    require(isinstance(rng, np.random.Generator), "rng must be a Generator: np.random.default_rng(seed)")
    starts = rng.integers(0, len(tokens) - seq_len + 1, size=batch_size)  # [B]
    return np.asarray(tokens)[starts[:, None] + np.arange(seq_len)].astype(np.int64)  # [B, T]


def iter_eval_batches(tokens, batch_size, seq_len):
    """Yield int64 [<=B, T] batches of the windows tokens[i*T:(i+1)*T] in order (a short tail dropped)."""
    _check_windows(tokens, batch_size, seq_len)
    n = len(tokens) // seq_len
    windows = np.asarray(tokens)[: n * seq_len].reshape(n, seq_len).astype(np.int64)  # [n, T]
    return (windows[i:i + batch_size] for i in range(0, n, batch_size))


def load_reasoning_eval(split="test"):
    """The held-out problems of an eval split (docs/data.md): dicts with task, difficulty, prompt, answer."""
    require(split in EVAL_SPLITS, f"unknown eval split {split!r}; use 'val' or 'test' (or 'long', 'fewshot')")
    lines = _read_bytes(f"reasoning/eval_{split}.jsonl").decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


@functools.cache
def data_hash():
    """sha256 over the names and contents of every shipped data file (for checkpoints)."""
    h = hashlib.sha256()
    for rel in DATA_FILES:
        h.update(f"{rel} {hashlib.sha256(_read_bytes(rel)).hexdigest()}\n".encode())
    return h.hexdigest()
