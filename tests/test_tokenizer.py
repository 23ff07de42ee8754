"""The offline BPE tokenizer: round trips, agreement with tiktoken's educational encoder, errors."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken._educational import SimpleBytePairEncoding

from refimpl.data.corpus import TINY_DATA, load_reasoning_eval
from refimpl.data.tokenizer import EOT, PAT_STR, load_tokenizer
from refimpl.errors import RefimplError

TOK = load_tokenizer()
ORACLE = SimpleBytePairEncoding(pat_str=TOK.pat_str, mergeable_ranks=TOK.mergeable_ranks)
ASCIIISH = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,:;=+*-?()'\"\n\t_é€😀"),
                   max_size=60)


def test_vocab_and_special_token():
    assert (TOK.n_vocab, TOK.eot_id) == (2049, 2048)
    assert TOK.pat_str == PAT_STR
    assert all(bytes([b]) in TOK.mergeable_ranks for b in range(256))
    assert sorted(TOK.mergeable_ranks.values()) == list(range(2048))
    assert TOK.decode([TOK.eot_id]) == EOT
    assert TOK.eot_id not in TOK.encode(f"a{EOT}b")  # special text in input stays ordinary
    assert TOK.decode(TOK.encode(f"a{EOT}b")) == f"a{EOT}b"


def test_meta_matches_file():
    meta = json.loads((TINY_DATA / "tokenizer" / "meta.json").read_text())
    assert meta["sha256"] == TOK.sha256
    assert meta["n_vocab"] == TOK.n_vocab and meta["special_tokens"] == {EOT: 2048}


@given(st.text())
def test_round_trip_unicode(text):
    assert TOK.decode(TOK.encode(text)) == text


@pytest.mark.parametrize("text", ["", "👩‍💻 emoji 🎉🇫🇷", "\x00\x01\x1b[0m\r\n\t\x7f\u200b",
                                  "naïve café ß ° 日本語", "  leading and trailing  \n\n\n",
                                  "x = 10**-3\n    return x\n"])
def test_round_trip_examples(text):
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.encode(text) == ORACLE.encode(text, visualise=None)


@settings(max_examples=200)
@given(st.one_of(ASCIIISH, st.text(max_size=30)))
def test_matches_educational_oracle(text):
    assert TOK.encode(text) == ORACLE.encode(text, visualise=None)


def test_matches_oracle_on_corpus_lines():
    lines = (TINY_DATA / "text" / "val.txt").read_text().splitlines(keepends=True)[:400]
    lines += [p["prompt"] + p["answer"] + "\n" for p in load_reasoning_eval("val")[:200]]
    for line in lines:
        assert TOK.encode(line) == ORACLE.encode(line, visualise=None), line


@given(st.integers(0, 10**12))
def test_digits_are_single_tokens(n):
    text = f"Q: {n}+7=? A: {n + 7}"
    pieces = [TOK.decode([i]) for i in TOK.encode(text)]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p) == 1 for p in digits)
    assert "".join(digits) == f"{n}7{n + 7}"


def test_decode_accepts_lists_and_arrays():
    ids = TOK.encode("hello world")
    assert TOK.decode(ids) == TOK.decode(np.array(ids, dtype=np.int32)) == "hello world"
    assert TOK.decode([]) == TOK.decode(np.array([])) == ""


@pytest.mark.parametrize("ids", [[2049], [-1], [5, 10**6], np.array([[1, 2]]), np.array([1.5])])
def test_decode_rejects_bad_ids(ids):
    with pytest.raises(RefimplError, match="token id|1-D"):
        TOK.decode(ids)


def test_encode_rejects_bytes():
    with pytest.raises(RefimplError, match="str"):
        TOK.encode(b"abc")


@pytest.fixture
def tok_copy(tmp_path):
    for name in ("bpe.tiktoken", "meta.json"):
        shutil.copy(TINY_DATA / "tokenizer" / name, tmp_path / name)
    return tmp_path / "bpe.tiktoken"


def test_load_from_copy_equals_default(tok_copy):
    assert load_tokenizer(tok_copy) == TOK
    assert load_tokenizer(str(tok_copy)).encode("x=1") == TOK.encode("x=1")


def test_sha256_mismatch_is_a_clear_error(tok_copy):
    tok_copy.write_bytes(tok_copy.read_bytes().replace(b" 300\n", b" 301\n", 1))
    with pytest.raises(RefimplError, match=r"sha256 .*make_tiny_data\.py"):
        load_tokenizer(tok_copy)


def test_missing_and_corrupt_files(tok_copy):
    meta_path = tok_copy.with_name("meta.json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text("{not json")
    with pytest.raises(RefimplError, match="corrupt"):
        load_tokenizer(tok_copy)
    tok_copy.write_bytes(b"!!notbase64 1\n")
    meta["sha256"] = hashlib.sha256(tok_copy.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RefimplError, match="corrupt"):
        load_tokenizer(tok_copy)
    tok_copy.unlink()
    with pytest.raises(RefimplError, match="missing"):
        load_tokenizer(tok_copy)
