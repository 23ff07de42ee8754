"""Byte-level BPE tokenizers run by tiktoken, read from a .tiktoken file (base64 token, space, id) and the
meta.json beside it (its sha256, split pattern, special tokens); nothing is ever downloaded. The shipped one
(tiny_data/tokenizer, made by tools/make_tiny_data.py): 2048 ranks plus <|endoftext|>, GPT-2's split pattern
but every digit its own pre-token (as in Llama): "348+275" -> 3 4 8 + 2 7 5. An LLM's: llm_tokenizer.py.
"""
import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import tiktoken

from refimpl.data.corpus import TINY_DATA
from refimpl.errors import RefimplError, require

PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
N_RANKS = 2048
REBUILD = "re-run `python tools/make_tiny_data.py` or restore the file"
# the UTF-8 lead bytes of 2-, 3- and 4-byte characters: [lo, hi), the payload mask, the payload's shift
UTF8_LEADS = ((0xC2, 0xE0, 0x1F, 6), (0xE0, 0xF0, 0x0F, 12), (0xF0, 0xF5, 0x07, 18))


class Tokenizer:
    """A thin wrapper around tiktoken.Encoding; two tokenizers are equal if their files are."""

    def __init__(self, mergeable_ranks, meta, sha256):
        self.sha256, self.pat_str, self.mergeable_ranks = sha256, meta["pat_str"], mergeable_ranks
        self.special_tokens = dict(meta["special_tokens"])
        self.pre_tokenizer, self.source = meta.get("pre_tokenizer"), meta.get("source", {})  # an LLM's
        self._enc = tiktoken.Encoding(name=f"refimpl-bpe-{sha256[:12]}", pat_str=self.pat_str,
                                      mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        self.n_vocab, self.eot_id = self._enc.n_vocab, self._enc.eot_token
        self._unencodable = unencodable_pattern(mergeable_ranks)

    def encode(self, text):
        """str -> list[int]; "<|endoftext|>" inside text is ordinary text. A character that needs a byte
        with no token (SmolLM2 lacks 21) is dropped, the text around it encoded as if cut there (as in HF)."""
        require(isinstance(text, str), f"encode takes a str, got {type(text).__name__}; "
                                       "decode bytes to str first")
        if self._unencodable is None or not self._unencodable.search(text):
            return self._enc.encode_ordinary(text)
        return [i for part in self._unencodable.split(text) for i in self._enc.encode_ordinary(part)]

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


def unencodable_pattern(ranks):
    """A compiled re matching every character whose UTF-8 needs a byte with no token (None if none does)."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    require(not any(0x80 <= b < 0xC0 for b in missing), "the vocabulary lacks a UTF-8 continuation byte: "
            "refimpl's tokenizer cannot encode most non-ASCII text with it")
    spans = [(b, b) for b in missing if b < 0x80]                # 0xC0, 0xC1, 0xF5-0xFF never occur in UTF-8
    for lo, hi, mask, shift in UTF8_LEADS:                        # a lead byte: every character it starts
        firsts = [(b & mask) << shift for b in missing if lo <= b < hi]
        spans += [(first, first | ((1 << shift) - 1)) for first in firsts]
    return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in spans) + "]+") if spans else None


def ranks_blob(ranks):
    """The .tiktoken bytes of {token bytes: rank}: base64 token, space, rank; in rank order."""
    return "".join(f"{base64.b64encode(t).decode()} {i}\n"
                   for t, i in sorted(ranks.items(), key=lambda kv: kv[1])).encode("ascii")


def write_ranks(ranks, path):
    """Write {token bytes: rank} as a .tiktoken file."""
    Path(path).write_bytes(ranks_blob(ranks))


def read_tokenizer(path, fix):
    """The Tokenizer of a .tiktoken file and the meta.json beside it, whose sha256 the file must have and
    whose n_vocab its ids and special ids must cover exactly; every problem is one line ending in fix."""
    meta_path = path.with_name("meta.json")
    for p, what in ((path, "file"), (meta_path, "metadata")):
        require(p.is_file(), f"tokenizer {what} {p} is missing; {fix}")
    blob = path.read_bytes()
    sha256 = hashlib.sha256(blob).hexdigest()
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise RefimplError(f"tokenizer metadata {meta_path} is corrupt ({e}); {fix}") from None
    require(sha256 == expected, f"tokenizer file {path} has sha256 {sha256[:12]}..., but "
                                f"meta.json expects {str(expected)[:12]}...; {fix}")
    try:  # a line that is not "base64 id", meta that tiktoken refuses (e.g. a pat_str that is not a regex)
        ranks = {base64.b64decode(token, validate=True): int(rank)
                 for token, rank in (line.split() for line in blob.decode("ascii").splitlines() if line)}
        ids = sorted([*ranks.values(), *meta["special_tokens"].values()])
        require(ids == list(range(meta["n_vocab"])), f"tokenizer {path} has {len(ranks)} tokens and "
                f"{len(meta['special_tokens'])} special tokens whose ids are not 0..n_vocab-1 (n_vocab "
                f"{meta['n_vocab']} in meta.json); {fix}")
        return Tokenizer(ranks, meta, sha256)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RefimplError(f"tokenizer {path} or its meta.json is corrupt ({e}); {fix}") from None


def load_tokenizer(path=None):
    """Load the .tiktoken file at path (default: the shipped one), checked against meta.json."""
    path = Path(path) if path is not None else TINY_DATA / "tokenizer" / "bpe.tiktoken"
    tok = read_tokenizer(path, REBUILD)
    n = len(tok.mergeable_ranks)
    require(all(bytes([b]) in tok.mergeable_ranks for b in range(256)) and tok.special_tokens == {EOT: n},
            f"tokenizer {path} lacks a rank for some single byte, or its special_tokens are not "
            f"{{{EOT!r}: {n}}} (after the ranks); {REBUILD}")
    return tok
