"""A pretrained LLM's tokenizer: GPT-2-style byte-level BPE from a GGUF vocabulary (data.gguf.Vocab).

Ranks are the model's own token ids: a merge's result has an id that grows with the merge's position in the
merge list (checked), so tiktoken's lowest-rank-first merging follows the merge order. Control tokens
(<|endoftext|>, <|im_start|>, ...) are special tokens, never produced from ordinary text.
"""
import hashlib
import json
from pathlib import Path

from ..errors import require
from .tokenizer import Tokenizer, ranks_blob, read_tokenizer

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# llama.cpp's "smollm" (the SmolLM tokenizer's Digits + ByteLevel): digits one by one, then GPT-2's pattern
# on what lies between. As one pattern: \p{N} first, and a whitespace run before a digit ends there, as it
# would at the end of the text.
SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
SPLITS = {"smollm": SMOLLM_SPLIT, "gpt2": GPT2_SPLIT}
CONTROL = 3                     # GGUF token type of special tokens
RANKS_FILE, META_FILE = "bpe.tiktoken", "meta.json"
REFETCH = "delete the model's cache folder (the one holding tokenizer/) and re-run `refimpl fetch NAME`"


def byte_spelling():
    """GPT-2's table {unicode char: byte} that spells every byte as a printable character in vocab files."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def tokenizer_from_vocab(vocab, source=None):
    """The Tokenizer of a data.gguf.Vocab; a one-line error if it is not ordered as tiktoken needs."""
    require(vocab.pre in SPLITS, f"the vocabulary's pre-tokenizer {vocab.pre!r} is unknown to refimpl (it "
            f"knows {', '.join(SPLITS)}): add its pattern to refimpl.data.llm_tokenizer.SPLITS")
    spelling = byte_spelling()
    ranks, specials = {}, {}            # {token bytes: id} of ordinary tokens, {token: id} of control ones
    for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind == CONTROL:
            specials[token] = i
            continue
        require(all(c in spelling for c in token), f"vocabulary token {i} ({token!r}) is not byte-level BPE "
                "spelling: refimpl reads GPT-2-style (tokenizer.ggml.model gpt2) vocabularies only")
        ranks[bytes(spelling[c] for c in token)] = i
    _check_merge_order(vocab, ranks, spelling)
    sha = hashlib.sha256(ranks_blob(ranks)).hexdigest()
    meta = {"n_vocab": len(vocab.tokens), "pat_str": SPLITS[vocab.pre], "pre_tokenizer": vocab.pre,
            "special_tokens": specials, "sha256": sha, "source": source or {}}
    return Tokenizer(ranks, meta, sha)


def _check_merge_order(vocab, ranks, spelling):
    """Every multi-byte token is made by exactly one merge, and ids grow with the merge order."""
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


def save_llm_tokenizer(tok, directory):
    """Write DIR/bpe.tiktoken and DIR/meta.json; returns the path of the ranks file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RANKS_FILE).write_bytes(ranks_blob(tok.mergeable_ranks))
    meta = {"kind": "gguf-bpe", "n_vocab": tok.n_vocab, "pat_str": tok.pat_str, "sha256": tok.sha256,
            "pre_tokenizer": tok.pre_tokenizer, "special_tokens": tok.special_tokens, "source": tok.source}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return directory / RANKS_FILE


def load_llm_tokenizer(path):
    """The tokenizer saved at path (DIR/bpe.tiktoken, with DIR/meta.json), checked against its sha256."""
    return read_tokenizer(Path(path), REFETCH)
