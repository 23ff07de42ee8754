"""A pretrained LLM's tokenizer: GPT-2-style byte-level BPE from a GGUF vocabulary, run by tiktoken.

    tok = tokenizer_from_vocab(vocab)            # vocab: data.gguf.Vocab (tokens, types, merges, pre)
    save_llm_tokenizer(tok, DIR)                 # DIR/bpe.tiktoken (base64 token, space, id) + DIR/meta.json
    tok = load_llm_tokenizer(DIR / "bpe.tiktoken")

Ranks are the model's own token ids. A merge's result has an id that grows with the merge's position in
the merge list (checked when the tokenizer is built), so tiktoken's lowest-rank-first merging follows the
merge order and its ids are the model's ids: no translation table. Control tokens (<|endoftext|>,
<|im_start|>, ...) are special tokens, never produced from ordinary text.

The pre-tokenizer (how text is cut before BPE) is one tiktoken pattern per llama.cpp pre-tokenizer name:

    smollm  digits one by one, then GPT-2's pattern on what lies between (llama.cpp's "smollm", the
            SmolLM tokenizer's Digits + ByteLevel). As one pattern: \\p{N} first, and a whitespace run
            before a digit ends there, as it would at the end of the text.
    gpt2    GPT-2's pattern.

Bytes with no token in the vocabulary (SmolLM2 lacks 21: six ASCII control characters, 0xC0, 0xC1 and the
lead bytes of unassigned planes 4-11) cannot be encoded: a character that needs one is dropped, as the
Hugging Face and llama.cpp tokenizers drop it, and the text around it is encoded as if it were cut there.
"""
import base64
import hashlib
import json
import re
from pathlib import Path

from ..errors import RefimplError, require
from .tokenizer import Tokenizer

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
SPLITS = {"smollm": SMOLLM_SPLIT, "gpt2": GPT2_SPLIT}
CONTROL = 3                     # GGUF token type of special tokens
RANKS_FILE, META_FILE = "bpe.tiktoken", "meta.json"
REFETCH = "delete the model's cache folder (the one holding tokenizer/) and re-run `refimpl fetch NAME`"


class LLMTokenizer(Tokenizer):
    """refimpl's Tokenizer over a pretrained vocabulary: ids are the model's; unencodable characters dropped."""

    def __init__(self, mergeable_ranks, meta, sha256):
        super().__init__(mergeable_ranks, meta, sha256)
        self.pre_tokenizer, self.source = meta.get("pre_tokenizer"), meta.get("source", {})
        self.special_tokens = dict(meta["special_tokens"])
        self._unencodable = unencodable_pattern(mergeable_ranks)

    def encode(self, text):
        """str -> list[int] of the model's token ids; special tokens inside text are ordinary text."""
        require(isinstance(text, str), f"encode takes a str, got {type(text).__name__}; decode bytes to str first")
        if self._unencodable is None or not self._unencodable.search(text):
            return self._enc.encode_ordinary(text)
        return [i for part in self._unencodable.split(text) for i in self._enc.encode_ordinary(part)]


# ---------------------------------------------------------------------------------------------
# From a GGUF vocabulary
def byte_spelling():
    """GPT-2's table {unicode char: byte} that spells every byte as a printable character in vocab files."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def tokenizer_from_vocab(vocab, source=None):
    """LLMTokenizer of a data.gguf.Vocab; a one-line error if the vocabulary is not ordered as tiktoken needs."""
    require(vocab.pre in SPLITS, f"the vocabulary's pre-tokenizer {vocab.pre!r} is unknown to refimpl (it knows "
                                 f"{', '.join(SPLITS)}): add its pattern to refimpl.data.llm_tokenizer.SPLITS")
    ranks, specials = ranks_from_vocab(vocab)
    blob = ranks_blob(ranks)
    sha = hashlib.sha256(blob).hexdigest()
    meta = {"n_vocab": len(vocab.tokens), "pat_str": SPLITS[vocab.pre], "pre_tokenizer": vocab.pre,
            "special_tokens": specials, "sha256": sha, "source": source or {}}
    return LLMTokenizer(ranks, meta, sha)


def ranks_from_vocab(vocab):
    """({token bytes: id} of the ordinary tokens, {special token: id} of the control tokens)."""
    spelling = byte_spelling()
    ranks, specials = {}, {}
    for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind == CONTROL:
            specials[token] = i
            continue
        require(all(c in spelling for c in token), f"vocabulary token {i} ({token!r}) is not byte-level BPE "
                "spelling: refimpl reads GPT-2-style (tokenizer.ggml.model gpt2) vocabularies only")
        ranks[bytes(spelling[c] for c in token)] = i
    _check_merge_order(vocab, ranks, spelling)
    return ranks, specials


def _check_merge_order(vocab, ranks, spelling):
    """Every multi-byte token is made by exactly one merge, and ids grow with the merge order."""
    made, last = set(), -1
    for n, merge in enumerate(vocab.merges):
        left, _, right = merge.partition(" ")
        token = bytes(spelling[c] for c in left + right)
        i = ranks.get(token)
        require(i is not None and i > last and i not in made, f"merge {n} ({merge!r}) makes a token whose id "
                "is missing or out of merge order: refimpl's tokenizer needs token ids in merge order")
        made.add(i)
        last = i
    orphans = [t for t, i in ranks.items() if len(t) > 1 and i not in made]
    require(not orphans, f"vocabulary token {orphans[:1]} is made by no merge: refimpl's tokenizer needs every "
                         "multi-byte token to come from a merge")


def unencodable_pattern(ranks):
    """A compiled re matching every character whose UTF-8 needs a byte with no token, or None if there are none."""
    missing = sorted(b for b in range(256) if bytes([b]) not in ranks)
    require(not any(0x80 <= b < 0xC0 for b in missing), "the vocabulary lacks a UTF-8 continuation byte: "
            "refimpl's tokenizer cannot encode most non-ASCII text with it")
    spans = []
    for b in missing:
        if b < 0x80:
            spans.append((b, b))
        elif 0xC2 <= b < 0xE0:                                 # lead of 2-byte sequences
            spans.append(((b & 0x1F) << 6, ((b & 0x1F) << 6) | 0x3F))
        elif 0xE0 <= b < 0xF0:                                 # lead of 3-byte sequences
            spans.append(((b & 0x0F) << 12, ((b & 0x0F) << 12) | 0xFFF))
        elif 0xF0 <= b < 0xF5:                                 # lead of 4-byte sequences
            spans.append(((b & 0x07) << 18, ((b & 0x07) << 18) | 0x3FFFF))
        # 0xC0, 0xC1, 0xF5-0xFF never occur in UTF-8
    if not spans:
        return None
    return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in spans) + "]+")


# ---------------------------------------------------------------------------------------------
# Files: DIR/bpe.tiktoken and DIR/meta.json
def ranks_blob(ranks):
    """The .tiktoken bytes of {token bytes: id}: base64 token, space, id; in id order."""
    return "".join(f"{base64.b64encode(t).decode()} {i}\n"
                   for t, i in sorted(ranks.items(), key=lambda kv: kv[1])).encode("ascii")


def save_llm_tokenizer(tok, directory):
    """Write DIR/bpe.tiktoken and DIR/meta.json; returns the path of the ranks file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RANKS_FILE).write_bytes(ranks_blob(tok.mergeable_ranks))
    meta = {"kind": "gguf-bpe", "n_vocab": tok.n_vocab, "pat_str": tok.pat_str, "pre_tokenizer": tok.pre_tokenizer,
            "special_tokens": tok.special_tokens, "sha256": tok.sha256, "source": tok.source}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return directory / RANKS_FILE


def load_llm_tokenizer(path):
    """The LLMTokenizer saved at path (DIR/bpe.tiktoken, with DIR/meta.json), checked against its sha256."""
    path = Path(path)
    meta_path = path.with_name(META_FILE)
    for p in (path, meta_path):
        require(p.is_file(), f"tokenizer file {p} is missing; {REFETCH}")
    blob = path.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    try:
        meta = json.loads(meta_path.read_text())
        expected, specials = meta["sha256"], meta["special_tokens"]
        ranks = {base64.b64decode(t, validate=True): int(i)
                 for t, i in (line.split() for line in blob.decode("ascii").splitlines() if line)}
        tok = LLMTokenizer(ranks, meta, sha)
    except (ValueError, KeyError, TypeError) as e:
        raise RefimplError(f"tokenizer {path} or its {META_FILE} is corrupt ({e}); {REFETCH}") from None
    require(sha == expected, f"tokenizer file {path} has sha256 {sha[:12]}..., but {META_FILE} expects "
                             f"{expected[:12]}...; {REFETCH}")
    require(len(ranks) + len(specials) == meta.get("n_vocab") == tok.n_vocab,
            f"tokenizer {path} has {len(ranks)} tokens and {len(specials)} special tokens, not the n_vocab "
            f"{meta.get('n_vocab')} of its {META_FILE}; {REFETCH}")
    return tok
