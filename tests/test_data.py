"""The reasoning generator, the shipped data files, the token mixture and the batch samplers."""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.data.corpus import (
    DATA_FILES,
    EVAL_FILES,
    REPO,
    TINY_DATA,
    data_hash,
    iter_eval_batches,
    load_reasoning_eval,
    load_tokens,
    sample_batch,
)
from refimpl.data.tokenizer import load_tokenizer
from refimpl.errors import RefimplError

sys.path.insert(0, str(REPO / "tools"))
import reasoning  # noqa: E402  (tools/reasoning.py: the generator behind tiny_data/reasoning)

TOK = load_tokenizer()
ARITH = re.compile(r"Q: (\d+)([+*])(\d+)=\? A:")
VARS = re.compile(r"Q: ([a-z]=\d+(?: [a-z]=[a-z][-+*]\d+)+)\. ([a-z])=\? A:")


def solve(prompt):
    """Recompute the answer of a prompt independently of the generator."""
    if m := ARITH.fullmatch(prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a * b)
    m = VARS.fullmatch(prompt)
    env = {}
    for assignment in m[1].split():
        name, expr = assignment.split("=")
        if expr.isdigit():
            env[name] = int(expr)
        else:
            src, op, const = expr[0], expr[1], int(expr[2:])
            env[name] = {"+": env[src] + const, "-": env[src] - const, "*": env[src] * const}[op]
    return str(env[m[2]])


def split_line(line):
    cut = line.index(reasoning.ANSWER_MARKER) + len(reasoning.ANSWER_MARKER)
    return line[:cut], line[cut:]


def shipped_text(split):
    return (TINY_DATA / "text" / f"{split}.txt").read_text().split("\f\n")


def shipped_lines(split):
    return (TINY_DATA / "reasoning" / f"{split}.txt").read_text().splitlines(keepends=True)


# ---- the reasoning generator -------------------------------------------------------------------

def test_same_seed_same_lines_different_seeds_differ():
    def lines(seed):
        return [reasoning.problem_line(p) for p in reasoning.generate(300, np.random.default_rng(seed))]
    assert lines(7) == lines(7) and lines(7) != lines(8)


@given(st.integers(0, 2**32 - 1))
def test_generated_answers_are_correct(seed):
    for p in reasoning.generate(40, np.random.default_rng(seed)):
        assert p["prompt"].endswith(" A:") and p["answer"].startswith(" ")
        assert solve(p["prompt"]) == p["answer"].strip()
        assert TOK.encode(reasoning.problem_line(p))[-1] == TOK.encode("\n")[0]


@given(st.sampled_from(reasoning.TASKS), st.integers(0, 2**32 - 1), st.data())
def test_difficulty_knob(task, seed, data):
    difficulty = data.draw(st.sampled_from(reasoning.DIFFICULTIES[task]))
    p = reasoning.make_problem(task, difficulty, np.random.default_rng(seed))
    if task == "vars":
        assert p["prompt"].count("=") == difficulty + 1
        assert 0 <= int(p["answer"]) <= 99
    else:
        assert len(ARITH.fullmatch(p["prompt"])[1]) == difficulty


def test_bad_task_or_difficulty():
    rng = np.random.default_rng(0)
    with pytest.raises(RefimplError, match="unknown reasoning task"):
        reasoning.make_problem("div", 2, rng)
    with pytest.raises(RefimplError, match="difficulty"):
        reasoning.make_problem("add", 9, rng)


def test_generate_excludes_and_dedupes():
    seen = set()
    a = reasoning.generate(300, np.random.default_rng(1), exclude=seen)
    b = reasoning.generate(300, np.random.default_rng(1), exclude=seen)
    prompts = [p["prompt"] for p in a + b]
    assert len(set(prompts)) == 600 and seen == set(prompts)


# ---- the shipped files -------------------------------------------------------------------------

def test_manifest_matches_files_and_hash_is_stable():
    manifest = json.loads((TINY_DATA / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == sorted(DATA_FILES) and sorted(manifest["eval_files"]) == sorted(EVAL_FILES)
    for rel, entry in {**manifest["files"], **manifest["eval_files"]}.items():
        assert hashlib.sha256((TINY_DATA / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    assert re.fullmatch("[0-9a-f]{64}", data_hash()) and data_hash() == data_hash()


def test_shipped_reasoning_is_correct_and_short():
    for split in ("train", "val"):
        for line in shipped_lines(split):
            prompt, answer = split_line(line)
            assert answer.endswith("\n") and solve(prompt) == answer.strip()
    lengths = [len(TOK.encode(line)) for line in shipped_lines("val")]
    assert max(lengths) < 40


def test_eval_splits_are_held_out():
    train = {split_line(line)[0] for line in shipped_lines("train")}
    val = {split_line(line)[0] for line in shipped_lines("val")}
    evals = {s: load_reasoning_eval(s) for s in ("val", "test")}
    prompts = {s: {p["prompt"] for p in problems} for s, problems in evals.items()}
    for s, problems in evals.items():
        assert len(problems) == len(prompts[s]) == 500
        assert {"task", "prompt", "answer"} <= set(problems[0])
        assert all(solve(p["prompt"]) == p["answer"].strip() for p in problems)
        assert not prompts[s] & train and not prompts[s] & val
    assert not prompts["val"] & prompts["test"] and not train & val
    assert {p["task"] for p in evals["test"]} == set(reasoning.TASKS)
    with pytest.raises(RefimplError, match="use 'val' or 'test'"):
        load_reasoning_eval("train")


NATURAL = re.compile(r"Question: What is (\d+[+*]\d+)\?\nAnswer:")


def test_natural_question_rewrites_every_task():
    assert reasoning.natural_question("Q: 3+4=? A:") == "Question: What is 3+4?\nAnswer:"
    assert reasoning.natural_question("Q: 47*6=? A:") == "Question: What is 47*6?\nAnswer:"
    assert reasoning.natural_question("Q: a=3 b=a+4 c=b*2. c=? A:") == "Question: a=3 b=a+4 c=b*2. What is c?\nAnswer:"


def test_fewshot_split_is_held_out_easy_and_solved_in_its_shots():
    """150 problems, 50 per (task, difficulty); each prompt: N_SHOTS correct solved problems of the same
    task and difficulty, never the question itself, then the question in the same format."""
    fewshot = load_reasoning_eval("fewshot")
    cells = [(p["task"], p["difficulty"]) for p in fewshot]
    assert {c: cells.count(c) for c in set(cells)} == {("add", 1): 50, ("add", 2): 50, ("mul", 1): 50}
    others = {split_line(line)[0] for split in ("train", "val") for line in shipped_lines(split)}
    others |= {p["prompt"] for split in ("val", "test", "long") for p in load_reasoning_eval(split)}
    assert len({p["question"] for p in fewshot}) == 150 and not {p["question"] for p in fewshot} & others
    for p in fewshot:
        assert solve(p["question"]) == p["answer"].strip()
        *shots, last = p["prompt"].split("\n\n")
        assert last == reasoning.natural_question(p["question"]) and len(shots) == reasoning.N_SHOTS
        for shot in shots:
            question, answer = shot.rsplit(" ", 1)
            expr = NATURAL.fullmatch(question)[1]
            assert eval(expr) == int(answer) and expr != p["question"][3:-5]
            assert len(re.findall(r"\d+", expr)[0]) == p["difficulty"]


def _load_builder():
    path = REPO / "tools" / "make_tiny_data.py"
    spec = importlib.util.spec_from_file_location("make_tiny_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(sys.version.split()[0] != "3.11.7",
                    reason="the shipped text comes from CPython 3.11.7's pydoc_data")
def test_builder_reproduces_shipped_files():
    """Everything but the (slow) bpe_train step: text, reasoning, and the BPE training sample."""
    build = _load_builder()
    rng = np.random.default_rng(build.SEED)
    train_docs, val_docs = build.english_splits(rng)
    assert build.DOC_SEPARATOR.join(train_docs) == (TINY_DATA / "text" / "train.txt").read_text()
    assert build.DOC_SEPARATOR.join(val_docs) == (TINY_DATA / "text" / "val.txt").read_text()
    problems = build.reasoning_splits(rng, len(shipped_lines("val")))
    train_lines = [reasoning.problem_line(p) for p in problems["train"]]
    assert train_lines == shipped_lines("train")
    assert problems["eval_test"] == load_reasoning_eval("test")
    long = build.long_split(problems)
    assert long == load_reasoning_eval("long")
    assert build.fewshot_split(problems, long) == load_reasoning_eval("fewshot")
    sample = build.bpe_sample(train_docs, train_lines, rng)
    meta = json.loads((TINY_DATA / "tokenizer" / "meta.json").read_text())
    assert hashlib.sha256(sample.encode()).hexdigest() == meta["training_sample_sha256"]


def test_refimpl_data_env_var(tmp_path):
    code = "import refimpl.data.corpus as d; print(d.TINY_DATA)"
    env = dict(os.environ, REFIMPL_DATA=str(tmp_path), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(tmp_path)


# ---- the token mixture and the samplers --------------------------------------------------------

def test_load_tokens_mixture():
    for split in ("train", "val"):
        tokens = load_tokens(split, TOK)
        assert tokens.dtype == np.int32 and tokens.ndim == 1 and tokens is load_tokens(split, TOK)
        assert tokens.min() >= 0 and tokens.max() == TOK.eot_id and tokens[-1] == TOK.eot_id
        n_docs = len(shipped_lines(split)) + len(shipped_text(split))
        assert int((tokens == TOK.eot_id).sum()) == n_docs
    assert len(load_tokens("val", TOK)) < len(load_tokens("train", TOK))
    with pytest.raises(RefimplError, match="'train' or 'val'"):
        load_tokens("test", TOK)


@pytest.mark.parametrize("split", ["train", "val"])
def test_each_source_keeps_its_documents_in_the_mixture_order(split):
    """`--data text` / `reasoning`: the mixture's documents of one kind, in the mixture's order; the
    reasoning mask marks exactly the reasoning lines' tokens (each with its closing eot)."""
    mixture, mask = load_tokens(split, TOK), load_tokens(split, TOK, "mixture", reasoning_mask=True)
    assert mask.dtype == bool and mask.shape == mixture.shape and 0 < mask.mean() < 1
    np.testing.assert_array_equal(load_tokens(split, TOK, "reasoning"), mixture[mask])
    np.testing.assert_array_equal(load_tokens(split, TOK, "text"), mixture[~mask])
    assert not load_tokens(split, TOK, "text", reasoning_mask=True).any()
    assert TOK.decode(mixture[mask][:40].tolist()).startswith("Q: ")
    with pytest.raises(RefimplError, match="unknown data source 'english'"):
        load_tokens(split, TOK, "english")


def test_val_mixture_decodes_to_its_documents():
    text = TOK.decode(load_tokens("val", TOK))
    docs = text.split("<|endoftext|>")[:-1]
    assert sorted(docs) == sorted(shipped_text("val") + shipped_lines("val"))


@given(st.integers(1, 8), st.integers(1, 130), st.integers(0, 2**32 - 1))
def test_sample_batch(batch_size, seq_len, seed):
    tokens = np.arange(1000, dtype=np.int32) * 3
    batch = sample_batch(tokens, batch_size, seq_len, np.random.default_rng(seed))
    assert batch.shape == (batch_size, seq_len) and batch.dtype == np.int64
    assert np.all(np.diff(batch, axis=1) == 3)  # each row is a contiguous window
    again = sample_batch(tokens, batch_size, seq_len, np.random.default_rng(seed))
    assert np.array_equal(batch, again)


def test_sample_batch_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(RefimplError, match="fewer than seq_len"):
        sample_batch(np.arange(10), 2, 11, rng)
    assert sample_batch(np.arange(10), 2, 10, rng).shape == (2, 10)
    with pytest.raises(RefimplError, match="Generator"):
        sample_batch(np.arange(10), 2, 4, 0)
    with pytest.raises(RefimplError, match="batch_size"):
        sample_batch(np.arange(10), 0, 4, rng)


@given(st.integers(1, 7), st.integers(1, 40), st.integers(1, 300))
def test_iter_eval_batches(batch_size, seq_len, n):
    tokens = np.arange(n)
    if n < seq_len:
        with pytest.raises(RefimplError, match="fewer than seq_len"):
            iter_eval_batches(tokens, batch_size, seq_len)
        return
    batches = list(iter_eval_batches(tokens, batch_size, seq_len))
    assert all(b.dtype == np.int64 and b.shape[1] == seq_len for b in batches)
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert np.array_equal(np.concatenate(batches).ravel(), tokens[: n // seq_len * seq_len])
