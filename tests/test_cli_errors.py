"""The CLI never shows a traceback: every bad argument or bad file exits non-zero with exactly ONE
line on stderr, `refimpl: error: <what is wrong and how to fix it>`.

Three layers:
- CASES, a table of named bad inputs with the words their message must hold (the table at the
  end of docs/robustness.md is generated from it: `python tests/test_cli_errors.py` prints it);
- two hypothesis sweeps: random bad arguments for every command, and randomly damaged checkpoint,
  JSON and golden files;
- a few real `python -m refimpl` subprocesses, which prove that nothing reaches stderr but the line.

Everything runs in one scratch directory (the `world`), with paths relative to it, on nano models.
"""
import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import refimpl
from refimpl.cli import build_parser, main
from refimpl.core.decoder import init_params
from refimpl.data import corpus as data_module
from refimpl.data import tokenizer as tokenizer_module
from refimpl.files import TEST_HOOK_SAVE_PAUSE, run_lock
from refimpl.training import pretrain as pretrain_module
from refimpl.training.checkpoint import meta_sha256

ROOT = Path(refimpl.__file__).resolve().parents[1]
GOLDEN = ROOT / "tiny_data" / "golden"                # one set per position convention
GOLDEN_SET = GOLDEN / "default"
TINY = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]
EVAL_TINY = ["--limit", "1", "--eval-batches", "1", "--batch-size", "1", "--seq-len", "24", "--n-traces", "2",
             "--horizon", "4", "--latency-repeats", "1", "--delays", "0", "--max-new-tokens", "1", "--quiet"]
GEN = ["--prompt", "x", "--max-new-tokens", "1"]


# ---------------------------------------------------------------------------------------------
# The world: two nano decoders, a coprocessor for each, and damaged copies
def resign(json_path, **fields):
    """Rewrite checkpoint metadata with new field values and a matching meta_sha256, as a careful
    but wrong writer would: only the field checks can catch it."""
    meta = json.loads(Path(json_path).read_text())
    meta.update(fields)
    meta["meta_sha256"] = meta_sha256(meta)
    Path(json_path).write_text(json.dumps(meta))


def rehash(stem, change):
    """Rewrite the checkpoint pair stem.{npz,json} with its arrays changed by change({name: array}), its
    npz_sha256, array list and meta_sha256 made to match: only the checks of the values can catch it."""
    with np.load(f"{stem}.npz") as z:
        arrays = change({n: z[n] for n in z.files})
    np.savez(f"{stem}.npz", **arrays)
    meta = json.loads(Path(f"{stem}.json").read_text())
    resign(f"{stem}.json", npz_sha256=hashlib.sha256(Path(f"{stem}.npz").read_bytes()).hexdigest(),
           arrays={**meta["arrays"], **{n: f"{a.dtype.str}{list(a.shape)}" for n, a in arrays.items()}})


def poison(arrays, value=np.nan):
    """The arrays with `value` in the first element of the first float array."""
    name = next(n for n, a in arrays.items() if a.dtype.kind == "f")
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = value
    return arrays


def copy_pair(src, dst):
    """Copy the checkpoint pair src.{npz,json} to dst.{npz,json}."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    for ext in (".npz", ".json"):
        shutil.copy(str(src) + ext, str(dst) + ext)


@contextlib.contextmanager
def chdir(path):  # contextlib.chdir needs Python 3.11
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def build_world(root):
    root.mkdir(parents=True, exist_ok=True)
    with chdir(root), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        for out, seed in (("dec", "0"), ("dec2", "1")):
            assert main(["pretrain", "--preset", "nano", "--steps", "2", "--seed", seed, *TINY, "--out", out]) == 0
        for out, dec in (("run", "dec"), ("run2", "dec2")):
            assert main(["train", "--decoder", f"{dec}/ckpt.npz", "--out", out, "--steps", "1", "--n-latents",
                         "2", "--n-ahead", "3", "--n-traces", "4", *TINY, "--quiet"]) == 0
        bad = Path("bad")
        bad.mkdir()
        blob = Path("dec/ckpt.npz").read_bytes()
        rng = np.random.default_rng(0)
        (bad / "random.npz").write_bytes(rng.bytes(4000))
        shutil.copy("dec/ckpt.json", bad / "random.json")
        (bad / "lonely.npz").write_bytes(rng.bytes(100))
        shutil.copy("dec/ckpt.json", bad / "trunc.json")
        (bad / "trunc.npz").write_bytes(blob[: len(blob) // 2])
        shutil.copy("dec/ckpt.npz", bad / "truncjson.npz")
        text = Path("dec/ckpt.json").read_text()
        (bad / "truncjson.json").write_text(text[: len(text) // 2])
        (bad / "empty.npz").write_bytes(b"")
        (bad / "empty.json").write_text("")
        shutil.copy("dec/ckpt.npz", bad / "notckpt.npz")
        (bad / "notckpt.json").write_text("[1, 2, 3]")
        copy_pair("dec/ckpt", bad / "edited")
        meta = json.loads(text)
        (bad / "edited.json").write_text(json.dumps({**meta, "step": 99}))
        copy_pair("dec/ckpt", bad / "version")
        resign(bad / "version.json", format_version=2)
        copy_pair("dec/ckpt", bad / "config")
        resign(bad / "config.json", config={"d_model": 48, "n_heads": 5})
        copy_pair("dec/ckpt", bad / "tokenizer")
        resign(bad / "tokenizer.json", tokenizer_sha256="f" * 64)
        buf = io.BytesIO()
        np.savez(buf, evil=np.array([{"a": 1}], dtype=object))
        (bad / "pickled.npz").write_bytes(buf.getvalue())
        (bad / "pickled.json").write_text(json.dumps({**meta, "arrays": {"evil": "|O[1]"},
                                                      "npz_sha256": hashlib.sha256(buf.getvalue()).hexdigest()}))
        resign(bad / "pickled.json")
        shutil.copytree("run", "bad/coprun")
        resign("bad/coprun/coprocessor.json", mode="lora")
        shutil.copytree("run", "bad/datarun")
        resign("bad/datarun/coprocessor.json", data_hash="0" * 64)
        shutil.copytree("run", "bad/metricsrun")
        Path("bad/metricsrun/metrics.json").write_text('{"history": [')
        for name, src in (("deep", "dec/ckpt"), ("deepcop", "run/coprocessor")):
            copy_pair(src, bad / name)
            (bad / f"{name}.json").write_text("[" * 100_000)
        copy_pair("dec/ckpt", bad / "nanweights")
        rehash(bad / "nanweights", poison)
        copy_pair("run/coprocessor", bad / "nancop")
        rehash(bad / "nancop", lambda a: poison(a, np.inf))
        copy_pair("dec/ckpt", bad / "inftheta")
        resign(bad / "inftheta.json", config={**meta["config"], "rope_theta": float("inf")})
        copy_pair("dec/ckpt", bad / "hugevocab")
        resign(bad / "hugevocab.json", config={**meta["config"], "vocab_size": 10**18})
        shutil.copytree("run", "bad/typesrun")
        Path("bad/typesrun/metrics.json").write_text('{"evals": 5, "history": "x"}')
        shutil.copytree("run", "bad/deeprun")
        Path("bad/deeprun/metrics.json").write_text("[" * 100_000 + "]" * 100_000)
        Path("emptyruns").mkdir()
        Path("afile").write_text("not a directory\n")
        golden = Path("golden")
        for name, damage in (("nojson", lambda m: "{not json"),
                             ("noatol", lambda m: json.dumps({**m, "tensors": {
                                 k: {kk: vv for kk, vv in v.items() if kk != "atol"}
                                 for k, v in m["tensors"].items()}})),
                             ("v99", lambda m: json.dumps({**m, "format_version": 99}))):
            shutil.copytree(GOLDEN_SET, golden / name)
            m = json.loads((GOLDEN_SET / "manifest.json").read_text())
            (golden / name / "manifest.json").write_text(damage(m))
        for name, change in (("nantensors", poison), ("complextensor", lambda a: {
                **a, "loss": a["loss"] + 1j})):
            shutil.copytree(GOLDEN_SET, golden / name)
            with np.load(golden / name / "tensors.npz") as z:
                np.savez(golden / name / "tensors.npz", **change({n: z[n] for n in z.files}))
        shutil.copytree(GOLDEN / "gqa", golden / "gqa")
        shutil.copytree(GOLDEN_SET, golden / "truncnpz")
        t = (GOLDEN_SET / "tensors.npz").read_bytes()
        (golden / "truncnpz" / "tensors.npz").write_bytes(t[: len(t) // 3])
        shutil.copytree(ROOT / "tiny_data", "data", ignore=shutil.ignore_patterns("golden", "checkpoints"))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("cli") / "w")


@pytest.fixture(autouse=True)
def in_world(world, monkeypatch):
    """Run in the world, with CuPy unimportable (so `--backend cupy` fails the same on every machine)."""
    monkeypatch.chdir(world)
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.delenv(TEST_HOOK_SAVE_PAUSE, raising=False)


# ---------------------------------------------------------------------------------------------
# Setups some cases need (context managers run inside the world)
@contextlib.contextmanager
def damaged_data(rel, damage):
    """tiny_data copied to ./data with `rel` damaged (None: deleted), used as the data directory."""
    path = Path("data") / rel
    keep = path.read_bytes()
    path.unlink()
    if damage is not None:
        path.write_bytes(damage(keep))
    caches = (data_module._manifest, data_module.data_hash, data_module.load_tokens)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_module, "TINY_DATA", Path("data"))
        mp.setattr(tokenizer_module, "TINY_DATA", Path("data"))
        for c in caches:
            c.cache_clear()
        try:
            yield
        finally:
            path.write_bytes(keep)
            for c in caches:
                c.cache_clear()


@contextlib.contextmanager
def locked(directory):
    with run_lock(directory):
        yield


@contextlib.contextmanager
def nan_at_step(n):
    real, calls = pretrain_module.lm_loss, []

    def poisoned(params, cfg, batch):
        calls.append(1)
        loss = real(params, cfg, batch)
        return loss * np.nan if len(calls) == n else loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_module, "lm_loss", poisoned)
        yield
    shutil.rmtree("nanrun", ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The table: (id, argv, words the message must hold, setup or None)
TRAIN_OK = ["--steps", "1", "--n-latents", "2", "--n-ahead", "3", "--n-traces", "4", *TINY, "--quiet"]
CASES = [
    # the command line itself
    ("no command", [], "a command is required", None),
    ("unknown command", ["frobnicate"], "invalid choice: 'frobnicate'", None),
    ("unknown option", ["--bogus"], "unrecognized arguments: --bogus", None),
    ("unknown option of a command", ["generate", "--prompt", "x", "--bogus"], "unrecognized arguments", None),
    ("missing required option", ["train"], "required: --out", None),
    ("unknown golden action", ["golden", "frobnicate"], "invalid choice: 'frobnicate'", None),
    ("golden without action", ["golden"], "golden needs an action", None),
    ("unknown preset", ["pretrain", "--preset", "huge"], "invalid choice: 'huge'", None),
    ("unknown backend", ["train", "--decoder", "dec/ckpt.npz", "--out", "t", "--backend", "tpu"],
     "argument --backend: invalid choice: 'tpu' (choose from 'numpy', 'cupy')", None),
    ("backend cupy without CuPy", ["generate", *GEN, "--decoder", "dec/ckpt.npz", "--backend", "cupy"],
     "backend 'cupy' needs CuPy", None),
    ("unknown dtype", ["generate", *GEN, "--decoder", "dec/ckpt.npz", "--dtype", "float16"],
     "argument --dtype: invalid choice: 'float16' (choose from 'float32', 'float64')", None),
    # numbers
    ("zero steps", ["pretrain", "--steps", "0"], "--steps: must be a positive integer, got '0'", None),
    ("negative batch size", ["pretrain", "--batch-size", "-1"], "must be a positive integer, got '-1'", None),
    ("non-numeric lr", ["pretrain", "--lr", "abc"], "--lr: must be a positive number", None),
    ("pretrain seq-len > max_seq_len", ["pretrain", "--seq-len", "999", "--out", "t"],
     "exceeds the nano preset's max_seq_len 64", None),
    ("zero latents", ["train", "--out", "t", "--n-latents", "0"], "--n-latents: must be a positive integer", None),
    ("negative seed", ["train", "--out", "t", "--seed", "-1"], "--seed: must be an integer >= 0", None),
    ("negative warmup", ["train", "--out", "t", "--warmup", "-3"], "--warmup: must be an integer >= 0", None),
    ("infinite lr", ["train", "--out", "t", "--lr", "inf"], "--lr: must be a positive number, got 'inf'", None),
    ("zero stop-after", ["train", "--out", "t", "--stop-after", "0"], "--stop-after: must be a positive", None),
    ("train seq-len > max_seq_len", ["train", "--decoder", "dec/ckpt.npz", "--out", "t", "--seq-len", "999"],
     "--seq-len 999 exceeds the decoder's max_seq_len=64", None),
    ("no room for N_A targets", ["train", "--decoder", "dec/ckpt.npz", "--out", "t", "--seq-len", "16",
                                 "--n-ahead", "16"], "--n-ahead 16 leaves no augmentation point", None),
    ("too many traces", ["train", "--decoder", "dec/ckpt.npz", "--out", "t", "--n-traces", "100"],
     "--n-traces 100 does not fit: a sequence of 64 tokens with --n-ahead 16", None),
    ("negative max-new-tokens", ["generate", "--prompt", "x", "--max-new-tokens", "-1"],
     "--max-new-tokens: must be an integer >= 0", None),
    ("generate past max_seq_len", ["generate", "--prompt", "x", "--decoder", "dec/ckpt.npz", "--max-new-tokens",
                                   "100"], "runs past the decoder's max_seq_len=64", None),
    ("prompt longer than max_seq_len", ["generate", "--prompt", "x" * 200, "--decoder", "dec/ckpt.npz"],
     "longer than max_seq_len=64", None),
    ("eval horizon too long", ["eval", "--decoder", "dec/ckpt.npz", *EVAL_TINY, "--horizon", "60"],
     "horizon 60 does not fit", None),
    ("eval seq-len > max_seq_len", ["eval", "--decoder", "dec/ckpt.npz", *EVAL_TINY, "--seq-len", "999"],
     "--seq-len 999 exceeds", None),
    ("unknown eval split", ["eval", "--split", "train"], "invalid choice: 'train'", None),
    # missing, truncated, corrupt files
    ("missing decoder", ["generate", *GEN, "--decoder", "nope.npz"], "checkpoint file nope.json is missing", None),
    ("directory as decoder", ["generate", *GEN, "--decoder", "dec"], "is a directory", None),
    ("npz of random bytes", ["generate", *GEN, "--decoder", "bad/random.npz"], "sha256 mismatch", None),
    ("npz without its JSON", ["generate", *GEN, "--decoder", "bad/lonely.npz"], "lonely.json is missing", None),
    ("truncated npz", ["generate", *GEN, "--decoder", "bad/trunc.npz"], "trunc.npz is corrupt (sha256 mismatch", None),
    ("truncated JSON", ["generate", *GEN, "--decoder", "bad/truncjson.npz"], "is not valid JSON", None),
    ("empty files", ["generate", *GEN, "--decoder", "bad/empty.npz"], "is not valid JSON", None),
    ("JSON that is not a checkpoint", ["generate", *GEN, "--decoder", "bad/notckpt.npz"], "holds a JSON list, not a dict",
     None),
    ("hand-edited JSON", ["generate", *GEN, "--decoder", "bad/edited.npz"], "meta_sha256 mismatch", None),
    ("unknown format_version", ["generate", *GEN, "--decoder", "bad/version.npz"], "format_version 2", None),
    ("config that does not fit", ["generate", *GEN, "--decoder", "bad/config.npz"], "not divisible by n_heads", None),
    ("checkpoint JSON nested 100,000 deep", ["generate", *GEN, "--decoder", "bad/deep.npz"], "is nested too deep",
     None),
    ("NaN in a weight (hashes re-made)", ["generate", *GEN, "--decoder", "bad/nanweights.npz"],
     "holds NaN or infinity", None),
    ("config rope_theta Infinity (re-signed)", ["generate", *GEN, "--decoder", "bad/inftheta.npz"],
     "holds NaN or Infinity", None),
    ("config vocab_size 10**18 (re-signed)", ["generate", *GEN, "--decoder", "bad/hugevocab.npz"],
     "vocab_size=1000000000000000000 is invalid: it must be a positive int below 2**31", None),
    ("pickled array", ["generate", *GEN, "--decoder", "bad/pickled.npz"], "object (pickled) array", None),
    ("decoder of another tokenizer", ["generate", *GEN, "--decoder", "bad/tokenizer.npz"],
     "trained with another tokenizer", None),
    ("coprocessor where a decoder is expected", ["generate", *GEN, "--decoder", "run/coprocessor.npz"],
     "holds a 'coprocessor', not a decoder", None),
    ("decoder where a coprocessor is expected", ["eval", "--decoder", "dec/ckpt.npz", "--coprocessor",
                                                 "dec/ckpt.npz"], "not a coprocessor", None),
    ("coprocessor for another decoder", ["eval", "--decoder", "dec/ckpt.npz", "--coprocessor", "run2"],
     "trained against another decoder", None),
    ("coprocessor with inconsistent metadata", ["eval", "--decoder", "dec/ckpt.npz", "--coprocessor", "bad/coprun"],
     "corrupt metadata (mode 'lora'", None),
    ("corrupt run metrics.json", ["eval", "--decoder", "dec/ckpt.npz", "--coprocessor", "bad/metricsrun"],
     "metrics.json is not valid JSON", None),
    ("run metrics.json of the wrong types", ["eval", "--decoder", "dec/ckpt.npz", "--coprocessor",
                                              "bad/typesrun"], "field 'evals' is '5'", None),
    ("run metrics.json nested 100,000 deep", ["eval", "--decoder", "dec/ckpt.npz", "--coprocessor", "bad/deeprun"],
     "is nested too deep", None),
    ("missing runs directory", ["eval", "--decoder", "dec/ckpt.npz", "--runs", "nodir"], "is not a directory", None),
    ("runs directory without runs", ["eval", "--decoder", "dec/ckpt.npz", "--runs", "emptyruns"], "holds no run", None),
    ("golden: missing directory", ["golden", "verify", "nodir"], "golden file nodir/manifest.json not found", None),
    ("golden: manifest not JSON", ["golden", "verify", "golden/nojson"], "is not valid JSON", None),
    ("golden: manifest without tolerances", ["golden", "verify", "golden/noatol"], "numeric rtol/atol", None),
    ("golden: unknown format_version", ["golden", "verify", "golden/v99"], "format_version 99", None),
    ("golden: NaN in the golden tensors", ["golden", "verify", "golden/nantensors"], "hold NaN or infinity", None),
    ("golden: a complex golden tensor", ["golden", "verify", "golden/complextensor"], "another shape or dtype",
     None),
    ("golden: truncated tensors", ["golden", "verify", "golden/truncnpz"], "not a readable .npz", None),
    ("golden: --actual not a zip", ["golden", "verify", str(GOLDEN_SET), "--actual", "bad/random.npz"],
     "not a readable .npz (not a zip", None),
    ("golden: --actual against both sets", ["golden", "verify", str(GOLDEN), "--actual", "bad/random.npz"],
     "holds 3 golden sets (default, gqa, latents-after): compare the outputs with the one set", None),
    ("golden: export over a set made with other flags", ["golden", "export", "golden/gqa"],
     "golden/gqa holds a golden set made by `refimpl golden export DIR --gqa`", None),
    ("golden: export into an empty path", ["golden", "export", ""], "needs a directory to write", None),
    ("golden: directory without a set", ["golden", "verify", "emptyruns"],
     "holds no manifest.json, nor subfolders", None),
    # data and tokenizer files (tiny_data copied to ./data and damaged)
    ("tokenizer file modified", ["pretrain", "--preset", "nano", "--out", "t"],
     "has sha256", lambda: damaged_data("tokenizer/bpe.tiktoken", lambda b: b + b"QQ== 9999\n")),
    ("tokenizer metadata corrupt", ["pretrain", "--preset", "nano", "--out", "t"],
     "tokenizer metadata data/tokenizer/meta.json is not valid JSON",
     lambda: damaged_data("tokenizer/meta.json", lambda b: b[:40])),
    ("data file modified", ["pretrain", "--preset", "nano", "--out", "t"],
     "does not match its sha256 in MANIFEST.json", lambda: damaged_data("text/val.txt", lambda b: b[:-5])),
    ("data file missing", ["pretrain", "--preset", "nano", "--out", "t"],
     "data file data/reasoning/train.txt is missing", lambda: damaged_data("reasoning/train.txt", None)),
    ("MANIFEST.json of the wrong shape", ["pretrain", "--preset", "nano", "--out", "t"],
     "holds a JSON list, not a dict", lambda: damaged_data("MANIFEST.json", lambda b: b"[1, 2]")),
    # runs and resume
    ("pretrain --resume without a checkpoint", ["pretrain", "--out", "fresh", "--resume"], "no checkpoint in fresh",
     None),
    ("pretrain into a used --out", ["pretrain", "--preset", "nano", "--out", "dec"], "already holds a checkpoint",
     None),
    ("pretrain --resume of a finished run", ["pretrain", "--out", "dec", "--resume"], "already at step 2", None),
    ("pretrain --resume with another lr", ["pretrain", "--out", "dec", "--resume", "--lr", "0.1"],
     "--lr 0.1 differs", None),
    ("train --resume without a checkpoint", ["train", "--decoder", "dec/ckpt.npz", "--out", "fresh", "--resume",
                                             *TRAIN_OK],
     "no coprocessor checkpoint in fresh to resume", None),
    ("train --resume with other options", ["train", "--decoder", "dec/ckpt.npz", "--out", "run", "--resume",
                                           *TRAIN_OK, "--lr", "0.5"], "--lr 0.5 differs from the resumed run's 0.001", None),
    ("train --resume against another decoder", ["train", "--decoder", "dec2/ckpt.npz", "--out", "run", "--resume",
                                                *TRAIN_OK], "trained against another decoder", None),
    ("train --resume with other data", ["train", "--decoder", "dec/ckpt.npz", "--out", "bad/datarun", "--resume",
                                        *TRAIN_OK], "trained with other data (data_hash", None),
    ("train --out that holds a pretrain run", ["train", "--decoder", "dec/ckpt.npz", "--out", "dec", *TRAIN_OK],
     "dec holds a decoder run (`refimpl pretrain`), whose metrics.json this run would overwrite", None),
    ("pretrain --out that holds a coprocessor run", ["pretrain", "--preset", "nano", "--out", "run"],
     "run holds a coprocessor run (`refimpl train`)", None),
    ("train into a used --out", ["train", "--decoder", "dec/ckpt.npz", "--out", "run", *TRAIN_OK],
     "run already holds a coprocessor checkpoint: resume it, or choose another output directory", None),
    ("train --resume of a finished run", ["train", "--decoder", "dec/ckpt.npz", "--out", "run", "--resume",
                                          *TRAIN_OK], "run is already at step 1 of --steps 1: nothing was changed",
     None),
    ("weight decay that overflows the weights", ["train", "--decoder", "dec/ckpt.npz", "--out", "diverged",
                                                 *TRAIN_OK, "--weight-decay", "1e300"],
     ("diverged at step 1: its update left weights that are not finite; no checkpoint was written: lower "
      "--weight-decay 1e+300"), None),
    ("lr that overflows the weights", ["pretrain", "--preset", "nano", *TINY, "--steps", "3", "--lr", "1e38",
                                       "--out", "diverged"], "lower --lr 1e+38", None),
    ("pre-flight: an absurd batch size", ["train", "--decoder", "dec/ckpt.npz", "--out", "t", "--batch-size",
                                          "100000000"], "(--batch-size 100000000 dominates)", None),
    ("--seq-len 1", ["train", "--decoder", "dec/ckpt.npz", "--out", "t", "--seq-len", "1"],
     "use --seq-len 17 or more", None),
    ("prompt that is not UTF-8", ["generate", "--decoder", "dec/ckpt.npz", "--prompt", "x\udcff"],
     "is not UTF-8 text", None),
    ("--out is a file", ["pretrain", "--preset", "nano", "--out", "afile/run"], "cannot use afile/run", None),
    ("second run into a locked --out", ["pretrain", "--preset", "nano", "--out", "busy"],
     "another refimpl run is writing to busy", lambda: locked("busy")),
    ("training loss becomes NaN", ["pretrain", "--preset", "nano", "--steps", "6", "--save-every", "2", *TINY,
                                   "--out", "nanrun"], "step 5: the training loss is nan (not finite)",
     lambda: nan_at_step(5)),
]
# generate falls back to the decoder alone (exit 0) with ONE warning when --coprocessor is unusable
WARN_CASES = [
    ("generate: missing coprocessor", ["generate", *GEN, "--decoder", "dec/ckpt.npz", "--coprocessor", "nope"],
     "coprocessor nope not used"),
    ("generate: coprocessor for another decoder", ["generate", *GEN, "--decoder", "dec/ckpt.npz",
                                                   "--coprocessor", "run2"], "trained against another decoder"),
    ("generate: decoder given as coprocessor", ["generate", *GEN, "--decoder", "dec/ckpt.npz", "--coprocessor",
                                                "dec/ckpt.npz"], "not a coprocessor"),
    ("generate: coprocessor JSON nested 100,000 deep", ["generate", *GEN, "--decoder", "dec/ckpt.npz",
                                                         "--coprocessor", "bad/deepcop.npz"], "nested too deep"),
    ("generate: infinity in a coprocessor weight", ["generate", *GEN, "--decoder", "dec/ckpt.npz",
                                                    "--coprocessor", "bad/nancop.npz"], "holds NaN or infinity"),
]


def cli(argv):
    """(exit status, stdout, stderr) of refimpl.cli.main(argv) in-process; no exception may escape."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def assert_one_error_line(status, err, argv):
    assert status != 0, f"{argv} exited 0"
    assert "Traceback" not in err
    assert err.startswith("refimpl: error: ") and err.endswith("\n") and err.count("\n") == 1, (argv, err)


def run_case(argv, setup):
    with (setup() if setup else contextlib.nullcontext()):
        return cli(argv)


@pytest.mark.parametrize("name, argv, words, setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(name, argv, words, setup):
    status, _, err = run_case(argv, setup)
    assert_one_error_line(status, err, argv)
    assert status == 2 and words in err, err


@pytest.mark.parametrize("command", ["demo", "pretrain", "train", "eval", "generate", "bench"])
def test_backend_and_dtype_are_choices_in_every_command(command):
    """argparse refuses an unknown --backend (and --dtype) the same way in every command."""
    for flag, bad, choices in (("--backend", "tpu", "'numpy', 'cupy'"),
                               ("--dtype", "float16", "'float32', 'float64'")):
        if command == "demo" and flag == "--dtype":
            continue                                                        # demo has no --dtype
        status, _, err = cli([command, flag, bad])
        assert_one_error_line(status, err, [command, flag, bad])
        assert f"argument {flag}: invalid choice: '{bad}' (choose from {choices})" in err, err


@pytest.mark.parametrize("name, argv, words", WARN_CASES, ids=[c[0] for c in WARN_CASES])
def test_unusable_coprocessor_in_generate_is_one_warning(name, argv, words):
    status, out, err = cli(argv)
    assert status == 0 and out.startswith("x")
    assert err.startswith("refimpl: warning: ") and err.count("\n") == 1 and words in err, err


# ---------------------------------------------------------------------------------------------
# Every flag's help names its default, and does what it says
def commands(parser, prefix="refimpl"):
    """(name, parser) of every command, and of every action of a command that has actions (golden)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from commands(sub, f"{prefix} {name}")


HELP_WITHOUT_DEFAULT = set()


def test_every_flag_help_names_its_default():
    for name, parser in commands(build_parser()):
        formatter = parser._get_formatter()
        for action in (a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)):
            flag = f"{name} {(action.option_strings or [action.dest])[-1]}"
            assert action.help, f"{flag} has no help"
            if (not action.option_strings or action.nargs == 0 or action.required
                    or flag in HELP_WITHOUT_DEFAULT):           # positionals, store_true flags, --help, --out
                continue
            shown = formatter._expand_help(action)
            assert "default" in shown, f"{flag}: {shown!r}"
            if action.default not in (None, []):
                value = action.default
                value = " ".join(map(str, value)) if isinstance(value, list) else value
                assert f"default {value}" in shown, f"{flag}: {shown!r} does not name its default {value!r}"


def test_bench_memory_traces_none_skips_the_probe():
    assert build_parser().parse_args(["bench", "--memory-traces", "none"]).memory_traces == [None]
    status, out, err = cli(["bench", "--quick", "--preset", "nano", "--json", "--no-torch",
                            "--memory-traces", "none"])
    assert status == 0, err
    result = json.loads(out)
    assert result["bench_config"]["memory_traces"] == [] and result["peak_rss_mb_by_traces"] == {}


# ---------------------------------------------------------------------------------------------
# Hypothesis sweep 1: bad arguments (each draw holds at least one bad option)
_fresh = itertools.count()
NUMBERS = ["0", "-1", "-7", "abc", "1.5", "", "nan", "inf", "1e999", "99999999999999999999999"]
GOOD = {
    "pretrain": {"--preset": "nano", "--steps": "2", "--batch-size": "2", "--seq-len": "16", "--eval-batches": "1"},
    "train": {"--decoder": "dec/ckpt.npz", "--steps": "1", "--n-latents": "2", "--n-ahead": "3", "--n-traces": "4",
              "--batch-size": "2", "--seq-len": "16", "--eval-batches": "1", "--quiet": None},
    "generate": {"--prompt": "x", "--decoder": "dec/ckpt.npz", "--max-new-tokens": "1"},
    "eval": dict(zip(EVAL_TINY[0:-1:2], EVAL_TINY[1:-1:2]), **{"--decoder": "dec/ckpt.npz", "--quiet": None}),
}
BAD = {
    "pretrain": {"--preset": ["huge", "", "NANO"], "--steps": NUMBERS, "--batch-size": NUMBERS,
                 "--seq-len": ["0", "-1", "999", "x"], "--lr": ["0", "-1", "nan", "inf", "x"],
                 "--warmup": ["-1", "x"], "--weight-decay": ["-1", "inf"], "--clip": ["-1", "x"],
                 "--eval-every": ["0", "-1"], "--eval-batches": ["0"], "--save-every": ["0"], "--seed": ["-1"],
                 "--dtype": ["float16", ""], "--backend": ["tpu", "cupy"], "--stop-after": ["0", "-2"],
                 "--out": ["afile/x", "dec"], "--resume": None},
    "train": {"--n-latents": NUMBERS, "--n-ahead": ["0", "-1", "64"], "--n-traces": ["0", "100", "x"],
              "--batch-size": ["0", "-2"], "--seq-len": ["-1", "999"], "--steps": ["-1", "x"], "--warmup": ["-1"],
              "--seed": ["-1"], "--eval-every": ["-1"], "--eval-batches": ["0"], "--lr": ["0", "-1", "nan", "inf"],
              "--weight-decay": ["-1", "nan"], "--clip": ["0", "inf"], "--init": ["zeros"], "--mode": ["bogus"],
              "--backend": ["tpu", "cupy"], "--dtype": ["int8"], "--stop-after": ["0", "-1"],
              "--decoder": ["nope.npz", "bad/random.npz", "bad/trunc.npz", "run/coprocessor.npz", "dec",
                            "bad/edited.npz", "bad/tokenizer.npz"], "--resume": None},
    "generate": {"--max-new-tokens": ["-1", "1000", "x"], "--temperature": ["-1", "nan", "inf"], "--seed": ["-1"],
                 "--delay": ["-1"], "--backend": ["tpu", "cupy"], "--dtype": ["int8"], "--prompt": ["x" * 200],
                 "--decoder": ["nope.npz", "bad/random.npz", "bad/truncjson.npz", "bad/notckpt.npz",
                               "run/coprocessor.npz", "bad/pickled.npz"]},
    "eval": {"--eval-batches": ["0"], "--batch-size": ["0", "-1"], "--n-traces": ["0"], "--prompt-batch": ["0"],
             "--max-new-tokens": ["0"], "--latency-repeats": ["0"], "--seq-len": ["-1", "999"],
             "--horizon": ["-1", "60"], "--limit": ["-1"], "--split": ["train"], "--delays": ["-1", "x"],
             "--runs": ["nodir", "emptyruns", "afile"], "--coprocessor": ["dec/ckpt.npz", "run2", "nope", "bad/coprun"],
             "--decoder": ["nope.npz", "bad/empty.npz", "bad/version.npz"], "--backend": ["tpu"]},
}


def options(table, names, draw_value):
    argv = []
    for name in names:
        values = table[name]
        if values is None:
            argv.append(name)
        else:
            argv += [name, values if isinstance(values, str) else draw_value(name, values)]
    return argv


@given(data=st.data())
def test_sweep_bad_arguments(data):
    command = data.draw(st.sampled_from(sorted(BAD)), label="command")
    bad = data.draw(st.lists(st.sampled_from(sorted(BAD[command])), min_size=1, max_size=3, unique=True), label="bad")
    good = data.draw(st.lists(st.sampled_from(sorted(GOOD[command])), unique=True), label="good")
    junk = data.draw(st.lists(st.text("abcxyz0129/.:_", min_size=1, max_size=8), max_size=1), label="junk")
    pick = lambda name, values: data.draw(st.sampled_from(values), label=name)
    argv = [command, *options(GOOD[command], [g for g in good if g not in bad], pick),
            *options(BAD[command], bad, pick), *junk]
    if command != "generate" and "--out" not in argv:
        argv += ["--out", f"sweep/{next(_fresh)}"]
    if command == "generate" and "--prompt" not in argv:
        argv += ["--prompt", "x"]
    status, _, err = cli(argv)
    assert_one_error_line(status, err, argv)


# ---------------------------------------------------------------------------------------------
# Hypothesis sweep 2: damaged files
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=5)
TARGETS = {  # what is damaged, the command that reads it, and the metadata fields that command reads
    "decoder": ("dec/ckpt", lambda d: ["generate", *GEN, "--decoder", f"{d}/ckpt.npz"],
                ["arrays", "config", "decoder_hash", "format_version", "kind", "npz_sha256", "step",
                 "tokenizer_sha256"]),
    "coprocessor": ("run/coprocessor", lambda d: ["eval", "--decoder", "dec/ckpt.npz", "--coprocessor", d,
                                                  *EVAL_TINY],
                    ["decoder_hash", "init", "kind", "mode", "n_ahead", "n_latents", "step", "train_config"]),
    "resumed decoder": ("dec/ckpt", lambda d: ["pretrain", "--out", d, "--resume"],
                        ["config", "data_hash", "extra", "kind", "optimizer", "rng", "step", "tokenizer_sha256"]),
    "resumed coprocessor": ("run/coprocessor", lambda d: ["train", "--decoder", "dec/ckpt.npz", "--out", d,
                                                          "--resume", *TRAIN_OK],
                            ["data_hash", "decoder_hash", "rng_state", "step", "tokenizer_sha256", "train_config"]),
    "run metrics": ("run/metrics", lambda d: ["eval", "--decoder", "dec/ckpt.npz", "--coprocessor", d, *EVAL_TINY],
                    ["evals", "history", "baseline_ahead_loss", "train_config", "steps"]),
}
BAD_ARRAYS = {"complex": lambda a: a + 1j, "bool": lambda a: a > 0, "text": lambda a: a.astype(str),
              "NaN": lambda a: np.where(a == a.flat[0], np.nan, a), "infinity": lambda a: a * np.inf}


@given(data=st.data())
def test_sweep_damaged_files(data):
    target = data.draw(st.sampled_from(sorted(TARGETS) + ["golden"]), label="target")
    d = Path("fuzz") / str(next(_fresh))
    if target == "golden":
        shutil.copytree(GOLDEN / data.draw(st.sampled_from(["default", "gqa", "latents-after"]), label="set"), d)
        stem, argv = d / "tensors", ["golden", "verify", str(d)]
    else:
        src, make_argv, read_fields = TARGETS[target]
        stem, argv = d / Path(src).name, make_argv(str(d))
        shutil.copytree(Path(src).parent, d)
    npz = stem.with_suffix(".npz")
    jsn = d / "manifest.json" if target == "golden" else stem.with_suffix(".json")
    kinds = ["truncate json", "json field", "deep json", "json of any shape"] + ([] if target == "run metrics" else [
        "truncate npz", "flip npz", "random npz", "delete", "json field re-signed", "read field re-signed",
        "array of a bad dtype or value"])
    kind = data.draw(st.sampled_from(kinds), label="damage")
    must_fail = target != "run metrics"       # a metrics.json of other values may still be one refimpl wrote
    if kind == "deep json":
        depth = data.draw(st.integers(33, 200_000), label="depth")
        opener, closer = data.draw(st.sampled_from([("[", "]"), ('{"a":', "}")]), label="brackets")
        jsn.write_text(opener * depth + "1" + closer * depth)
    elif kind == "json of any shape":
        jsn.write_text(json.dumps(data.draw(JSON_VALUES, label="json")))
        must_fail = False                    # e.g. {} for metrics, or valid for nothing
    elif kind == "array of a bad dtype or value":
        bad = data.draw(st.sampled_from(sorted(BAD_ARRAYS)), label="array")

        def change(arrays):
            name = data.draw(st.sampled_from(sorted(n for n, a in arrays.items() if a.dtype.kind == "f")),
                             label="name")
            return {**arrays, name: BAD_ARRAYS[bad](arrays[name])}
        if target == "golden":
            with np.load(npz) as z:
                np.savez(npz, **change({n: z[n] for n in z.files}))
        else:
            rehash(stem, change)
    elif kind == "truncate npz":
        blob = npz.read_bytes()
        npz.write_bytes(blob[: data.draw(st.integers(0, len(blob) - 1), label="cut")])
    elif kind == "flip npz":
        blob = bytearray(npz.read_bytes())
        blob[data.draw(st.integers(0, len(blob) - 1), label="at")] ^= data.draw(st.integers(1, 255), label="mask")
        npz.write_bytes(bytes(blob))
        must_fail = target != "golden"          # a flip in a zip header field may leave a readable file
    elif kind == "random npz":
        npz.write_bytes(data.draw(st.binary(max_size=3000), label="bytes"))
    elif kind == "truncate json":
        text = jsn.read_text()
        jsn.write_text(text[: data.draw(st.integers(0, len(text.rstrip()) - 1), label="cut")])
    elif kind == "delete":
        data.draw(st.sampled_from([npz, jsn]), label="deleted").unlink()
    else:
        meta = json.loads(jsn.read_text())
        assume(meta)
        fields = read_fields if kind == "read field re-signed" and target != "golden" else sorted(meta)
        key = data.draw(st.sampled_from(fields), label="field")
        value = data.draw(JSON_VALUES, label="value")
        assume(value != meta[key])
        meta[key] = value
        jsn.write_text(json.dumps(meta))
        if kind.endswith("re-signed") and target != "golden":
            resign(jsn)
        must_fail = kind == "json field" and target not in ("golden", "run metrics")   # unused: may be harmless
    status, _, err = cli(argv)
    assert "Traceback" not in err
    if must_fail or status == 2:
        assert_one_error_line(status, err, argv)
    else:
        assert status in (0, 1) and not err.startswith("refimpl: error")  # 1: golden verify's FAIL


# ---------------------------------------------------------------------------------------------
# Finite or nothing: whatever the learning rate and weight decay, no command leaves a NaN or an infinity
# on disk, and a run that diverges names the step and the flag
@settings(max_examples=8)
@given(command=st.sampled_from(["pretrain", "train"]), lr=st.floats(1e2, 1e38),
       weight_decay=st.sampled_from([0.0, 0.1, 1e10, 1e300]))
def test_no_command_leaves_a_non_finite_array(command, lr, weight_decay):
    out = Path("finite") / str(next(_fresh))
    argv = (["pretrain", "--preset", "nano", *TINY] if command == "pretrain" else
            ["train", "--decoder", "dec/ckpt.npz", *TRAIN_OK]) + ["--steps", "3", "--eval-every", "2", "--lr",
                                                                   repr(lr), "--weight-decay", repr(weight_decay),
                                                                   "--out", str(out)]
    status, _, err = cli(argv)
    if status:
        assert_one_error_line(status, err, argv)
        assert "diverged at step" in err and ("lower --lr" in err or "lower --weight-decay" in err), err
    for npz in out.glob("*.npz"):
        with np.load(npz) as z:
            assert all(np.isfinite(z[n]).all() for n in z.files), npz
    for js in out.glob("*.json"):
        assert not {"NaN", "Infinity"} & set(re.findall(r"[A-Za-z]+", js.read_text())), js


@pytest.mark.parametrize("damage", ['{"evals": [', '{"evals": 5}', "[" * 100_000])
def test_resume_over_a_damaged_metrics_json_says_the_history_is_dropped(damage):
    """Training resumes exactly whatever metrics.json holds; an unreadable one is said, not silently lost."""
    shutil.copytree("dec", f"resumed{len(damage)}")
    Path(f"resumed{len(damage)}/metrics.json").write_text(damage)
    status, out, err = cli(["pretrain", "--out", f"resumed{len(damage)}", "--resume", "--steps", "3"])
    assert status == 0 and not err and "warning: run metrics" in out and "history before this resume" in out
    saved = json.loads(Path(f"resumed{len(damage)}/metrics.json").read_text())
    assert len(saved["train_loss"]) == 3 and saved["train_loss"][:2] == [None, None]


def test_a_tiny_temperature_samples_without_nan():
    status, out, err = cli(["generate", *GEN, "--decoder", "dec/ckpt.npz", "--max-new-tokens", "4",
                            "--temperature", "1e-308"])
    greedy = cli(["generate", *GEN, "--decoder", "dec/ckpt.npz", "--max-new-tokens", "4"])[1]
    assert status == 0 and not err and out == greedy and "\0" not in out


# ---------------------------------------------------------------------------------------------
# Real processes: nothing but the one line reaches stderr
SUBPROCESS_CASES = ["no command", "unknown command", "truncated npz", "coprocessor for another decoder",
                    "decoder where a coprocessor is expected", "negative seed"]


def test_python_dash_m_refimpl_prints_one_line(world):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OPENBLAS_NUM_THREADS": "1"}
    env.pop(TEST_HOOK_SAVE_PAUSE, None)
    cases = {c[0]: c for c in CASES}
    for name in SUBPROCESS_CASES:
        _, argv, words, _ = cases[name]
        proc = subprocess.run([sys.executable, "-m", "refimpl", *argv], cwd=world, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 2, (name, proc.stderr)
        assert "Traceback" not in proc.stderr and words in proc.stderr
        assert proc.stderr.startswith("refimpl: error: ") and proc.stderr.count("\n") == 1, (name, proc.stderr)


# ---------------------------------------------------------------------------------------------
# docs/robustness.md: the table of every case above and its message, generated by running them
def markdown_table(world):
    from test_robustness import NANO, api_cases  # the Python API's cases: only the doc needs them
    rows = ["| bad input | command (run in a scratch dir) | exit | message (stderr) |", "|---|---|---|---|"]
    esc = lambda s: s.replace("|", "\\|").replace(str(ROOT) + "/", "").encode("utf-8", "backslashreplace").decode()
    code = lambda s: f"`` {esc(s)} ``"  # double backticks: messages quote commands in single ones
    with chdir(world), pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", None)
        for name, argv, _, setup in CASES:
            status, _, err = run_case(argv, setup)
            shown = " ".join(a if len(a) < 40 else a[:12] + "...(x200)" for a in argv)
            rows.append(f"| {esc(name)} | {code('refimpl ' + shown)} | {status} | {code(err.strip())} |")
        for name, argv, _ in WARN_CASES:
            status, _, err = cli(argv)
            rows.append(f"| {esc(name)} | {code('refimpl ' + ' '.join(argv))} | {status} | {code(err.strip())} |")
    api = ["| bad input (Python API) | message of the RefimplError |", "|---|---|"]
    for name, (call, _) in api_cases(init_params(NANO, seed=0)).items():
        try:
            call()
            message = "(no error!)"
        except refimpl.errors.RefimplError as e:
            message = str(e)
        api.append(f"| {esc(name)} | {code(message)} |")
    return "\n".join(rows) + "\n\n" + "\n".join(api) + "\n"


def test_docs_list_every_case():
    doc = (ROOT / "docs" / "robustness.md").read_text()
    missing = [c[0] for c in CASES + WARN_CASES if f"| {c[0]} |" not in doc]
    assert not missing, f"docs/robustness.md lacks {missing}: regenerate its table with `python {__file__}`"


if __name__ == "__main__":  # print the tables of docs/robustness.md
    import tempfile
    print(markdown_table(build_world(Path(tempfile.mkdtemp()) / "w")))
