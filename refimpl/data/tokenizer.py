"""The offline byte-level BPE tokenizer: 2048 trained ranks plus <|endoftext|> (n_vocab 2049).

The ranks live in `tiny_data/tokenizer/bpe.tiktoken` (the standard tiktoken format: base64 token,
space, rank), next to `meta.json` (its sha256, the split pattern, the special tokens). Both are
made by `python tools/make_tiny_data.py` with `tiktoken._educational.bpe_train`. We parse the
file ourselves and build a `tiktoken.Encoding`; nothing is ever downloaded
(`tiktoken.get_encoding` is never called).

The split pattern is GPT-2's, except that every digit is its own pre-token (as in Llama's
tokenizer), so arithmetic is seen digit by digit: "348+275" -> 3 4 8 + 2 7 5.
"""

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import tiktoken

from refimpl.data.corpus import TINY_DATA
from refimpl.errors import RefimplError, require

PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
N_RANKS = 2048
REBUILD = "re-run `python tools/make_tiny_data.py` or restore the file"


class Tokenizer:
    """A thin wrapper around tiktoken.Encoding; two tokenizers are equal if their files are."""

    def __init__(self, mergeable_ranks, meta, sha256):
        self.sha256 = sha256
        self.pat_str = meta["pat_str"]
        self.mergeable_ranks = mergeable_ranks
        self._enc = tiktoken.Encoding(name=f"refimpl-bpe-{sha256[:12]}", pat_str=self.pat_str,
                                      mergeable_ranks=mergeable_ranks,
                                      special_tokens=meta["special_tokens"])
        self.n_vocab = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text):
        """str -> list[int]; "<|endoftext|>" inside text is ordinary text, never the special id."""
        require(isinstance(text, str), f"encode takes a str, got {type(text).__name__}; "
                                       "decode bytes to str first")
        return self._enc.encode_ordinary(text)

    def decode(self, ids):
        """list or 1-D int array -> str (invalid UTF-8 byte runs become U+FFFD)."""
        arr = np.asarray(ids)
        require(arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)),
                f"decode takes a 1-D sequence of int token ids, got shape {arr.shape} "
                f"dtype {arr.dtype}; pass one sequence of ints")
        bad = arr[(arr < 0) | (arr >= self.n_vocab)]
        require(bad.size == 0, f"token id {bad[:1].tolist()} is outside the vocabulary "
                               f"[0, {self.n_vocab}); check the model's vocab size")
        return self._enc.decode(arr.astype(np.int64).tolist())

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and other.sha256 == self.sha256

    def __hash__(self):
        return hash(self.sha256)

    def __repr__(self):
        return f"Tokenizer(n_vocab={self.n_vocab}, sha256={self.sha256[:12]}...)"


def parse_ranks(blob, path="<bytes>"):
    """The bytes of a .tiktoken file -> {token bytes: rank}; RefimplError if malformed."""
    ranks = {}
    try:
        for line in blob.decode("ascii").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError as e:
        raise RefimplError(f"tokenizer file {path} is corrupt ({e}); {REBUILD}") from None
    require(sorted(ranks.values()) == list(range(len(ranks))),
            f"tokenizer file {path} has duplicate or missing ranks; {REBUILD}")
    require(all(bytes([b]) in ranks for b in range(256)),
            f"tokenizer file {path} lacks a rank for some single byte; {REBUILD}")
    return ranks


def write_ranks(ranks, path):
    """Write {token bytes: rank} as a .tiktoken file, in rank order."""
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines), encoding="ascii")


def load_tokenizer(path=None):
    """Load the .tiktoken file at path (default: the shipped one), checked against meta.json."""
    path = Path(path) if path is not None else TINY_DATA / "tokenizer" / "bpe.tiktoken"
    meta_path = path.with_name("meta.json")
    require(path.is_file(), f"tokenizer file {path} is missing; {REBUILD}")
    require(meta_path.is_file(), f"tokenizer metadata {meta_path} is missing; {REBUILD}")
    blob = path.read_bytes()
    sha256 = hashlib.sha256(blob).hexdigest()
    try:
        meta = json.loads(meta_path.read_text())
        expected, _, _ = meta["sha256"], meta["pat_str"], meta["special_tokens"][EOT]
    except (ValueError, KeyError, TypeError) as e:
        raise RefimplError(f"tokenizer metadata {meta_path} is corrupt ({e}); {REBUILD}") from None
    require(sha256 == expected, f"tokenizer file {path} has sha256 {sha256[:12]}..., but "
                                f"meta.json expects {expected[:12]}...; {REBUILD}")
    ranks = parse_ranks(blob, path)
    require(isinstance(meta["pat_str"], str) and meta["special_tokens"] == {EOT: len(ranks)},
            f"tokenizer metadata {meta_path} is corrupt (pat_str must be a string and "
            f"special_tokens {{{EOT!r}: {len(ranks)}}}, after the ranks); {REBUILD}")
    try:
        return Tokenizer(ranks, meta, sha256)
    except ValueError as e:  # e.g. a pat_str that is not a valid regex
        raise RefimplError(f"tokenizer metadata {meta_path} is corrupt ({e}); {REBUILD}") from None
