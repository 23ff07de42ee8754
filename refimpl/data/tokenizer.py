"""Byte-level BPE tokenizers run by tiktoken from a .tiktoken file (base64 token, space, id) and the meta.json
beside it (sha256, split pattern, special tokens). The shipped one: docs/data.md. An LLM's comes from its GGUF
vocabulary: its ranks are its token ids, which grow with the merge order (checked), so tiktoken's merging
follows the merges; its control tokens (<|im_start|>, ...) are special, never made from ordinary text."""
import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import tiktoken

from refimpl.data.corpus import TINY_DATA
from refimpl.errors import RefimplError, require
from refimpl.files import read_json

PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
N_RANKS = 2048
REBUILD = "re-run `python tools/make_tiny_data.py` or restore the file"
REFETCH = "delete the model's cache folder (the one holding tokenizer/) and re-run `refimpl fetch NAME`"
# the UTF-8 lead bytes of 2-, 3- and 4-byte characters: [lo, hi), the payload mask, the payload's shift
UTF8_LEADS = ((0xC2, 0xE0, 0x1F, 6), (0xE0, 0xF0, 0x0F, 12), (0xF0, 0xF5, 0x07, 18))
# an LLM's split pattern by its GGUF pre-tokenizer name. llama.cpp's "smollm" splits digits one by one, then
# GPT-2's pattern between them: as one pattern, \p{N} first, and a whitespace run before a digit ends there
SPLITS = {"smollm": r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""",
          "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""}
CONTROL = 3                     # GGUF token type of special tokens


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
        require(isinstance(text, str), f"encode takes a str, got {type(text).__name__}; decode bytes first")
        if self._unencodable is None or not self._unencodable.search(text):
            return self._enc.encode_ordinary(text)
        return [i for part in self._unencodable.split(text) for i in self._enc.encode_ordinary(part)]

    def decode(self, ids):
        """list or 1-D int array -> str (invalid UTF-8 byte runs become U+FFFD)."""
        arr = np.asarray(ids)
        require(arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)),
                f"decode takes one 1-D sequence of int token ids, got shape {arr.shape} dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self.n_vocab)]
        require(bad.size == 0, f"token id {bad[:1].tolist()} is outside the vocabulary [0, {self.n_vocab})")
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
    Path(path).write_bytes(ranks_blob(ranks))


def read_tokenizer(path, fix):
    """The Tokenizer of a .tiktoken file and the meta.json beside it, whose sha256 the file must have and
    whose n_vocab its ids and special ids must cover exactly; every problem is one line ending in fix."""
    meta_path = path.with_name("meta.json")
    for p, what in ((path, "file"), (meta_path, "metadata")):
        require(p.is_file(), f"tokenizer {what} {p} is missing; {fix}")
    blob = path.read_bytes()
    sha256 = hashlib.sha256(blob).hexdigest()
    meta = read_json(meta_path, "tokenizer metadata", fix)
    expected = meta.get("sha256")
    require(sha256 == expected, f"tokenizer file {path} has sha256 {sha256[:12]}..., but "
                                f"meta.json expects {str(expected)[:12]}...; {fix}")
    try:  # a line that is not "base64 id", meta that tiktoken refuses (e.g. a pat_str that is not a regex)
        ranks = {base64.b64decode(token, validate=True): int(rank)
                 for token, rank in (line.split() for line in blob.decode("ascii").splitlines() if line)}
        ids = sorted([*ranks.values(), *meta["special_tokens"].values()])
        require(ids == list(range(meta["n_vocab"])), f"tokenizer {path}: its token and special ids are not "
                f"0..n_vocab-1 (n_vocab {meta['n_vocab']} in meta.json); {fix}")
        return Tokenizer(ranks, meta, sha256)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RefimplError(f"tokenizer {path} or its meta.json is corrupt ({e}); {fix}") from None


def load_tokenizer(path=None):
    path = Path(path) if path is not None else TINY_DATA / "tokenizer" / "bpe.tiktoken"
    tok = read_tokenizer(path, REBUILD)
    n = len(tok.mergeable_ranks)
    require(all(bytes([b]) in tok.mergeable_ranks for b in range(256)) and tok.special_tokens == {EOT: n},
            f"tokenizer {path} lacks a byte's rank or its special_tokens are not {{{EOT!r}: {n}}}; {REBUILD}")
    return tok


def save_llm_tokenizer(tok, directory):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_ranks(tok.mergeable_ranks, directory / "bpe.tiktoken")
    meta = {"kind": "gguf-bpe", "n_vocab": tok.n_vocab, "pat_str": tok.pat_str, "sha256": tok.sha256,
            "pre_tokenizer": tok.pre_tokenizer, "special_tokens": tok.special_tokens, "source": tok.source}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return directory / "bpe.tiktoken"


def byte_spelling():
    """GPT-2's table {unicode char: byte} that spells every byte as a printable character in vocab files."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def tokenizer_from_vocab(vocab, source=None):
    """The Tokenizer of a data.gguf.Vocab; a one-line error if it is not ordered as tiktoken needs: every
    multi-byte token made by exactly one merge, and ids growing with the merge order."""
    require(vocab.pre in SPLITS, f"the vocabulary's pre-tokenizer {vocab.pre!r} is unknown to refimpl (it "
            f"knows {', '.join(SPLITS)}): add its pattern to refimpl.data.tokenizer.SPLITS")
    spelling = byte_spelling()
    ranks, specials = {}, {}            # {token bytes: id} of ordinary tokens, {token: id} of control ones
    for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind == CONTROL:
            specials[token] = i
            continue
        require(all(c in spelling for c in token), f"vocabulary token {i} ({token!r}) is not byte-level BPE "
                "spelling: refimpl reads GPT-2-style (tokenizer.ggml.model gpt2) vocabularies only")
        ranks[bytes(spelling[c] for c in token)] = i
    made, last = set(), -1
    for n, merge in enumerate(vocab.merges):
        left, _, right = merge.partition(" ")
        i = ranks.get(bytes(spelling[c] for c in left + right))
        require(i is not None and i > last and i not in made, f"merge {n} ({merge!r}) makes a token whose id "
                "is missing or out of merge order: refimpl's tokenizer needs token ids in merge order")
        made.add(i)
        last = i
    orphans = [t for t, i in ranks.items() if len(t) > 1 and i not in made]
    require(not orphans, f"vocabulary token {orphans[:1]} is made by no merge: refimpl's tokenizer needs "
                         "every multi-byte token to come from a merge")
    sha = hashlib.sha256(ranks_blob(ranks)).hexdigest()
    meta = {"n_vocab": len(vocab.tokens), "pat_str": SPLITS[vocab.pre], "pre_tokenizer": vocab.pre,
            "special_tokens": specials, "sha256": sha, "source": source or {}}
    return Tokenizer(ranks, meta, sha)
