"""Robustness: a run killed in the middle of a checkpoint write loses nothing, and bad inputs to the
Python API get one-line RefimplErrors (the CLI sweep is in test_cli_errors.py).

The kill tests run `python -m refimpl` as a subprocess with REFIMPL_TEST_HOOK_SAVE_PAUSE set (see
refimpl/training/checkpoint.py): every atomic write then pauses after its temporary file is complete and
before os.replace, and names its destination in a flag file. The test releases the writes it does
not want (by deleting the flag) and sends SIGKILL at the one it wants. Every process runs with
OPENBLAS_NUM_THREADS=1, so that the uninterrupted and the resumed runs do the same arithmetic.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import refimpl
from refimpl.cli import main
from refimpl.config import get_preset
from refimpl.core.decoder import extend, forward, init_params, prefill
from refimpl.core.layout import build_layout
from refimpl.errors import RefimplError
from refimpl.evaluation.generate import generate
from refimpl.training import loop as loop_module
from refimpl.training import pretrain as pretrain_module
from refimpl.files import TEST_HOOK_SAVE_PAUSE, run_lock
from refimpl.training.checkpoint import (
    load_checkpoint,
    load_coprocessor,
    load_decoder,
    meta_sha256,
    save_checkpoint,
    save_decoder,
)
from refimpl.training.train import TrainConfig, train

ROOT = Path(refimpl.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
ENV.pop(TEST_HOOK_SAVE_PAUSE, None)
PRETRAIN = ["pretrain", "--preset", "nano", "--steps", "8", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "1", "--eval-every", "3", "--save-every", "2"]
TRAIN = ["train", "--steps", "6", "--eval-every", "2", "--n-latents", "2", "--n-ahead", "3",
         "--n-traces", "4", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--quiet"]


def refimpl_cli(*argv, cwd, env=ENV):
    """`python -m refimpl argv` to the end; asserts success."""
    proc = subprocess.run([sys.executable, "-m", "refimpl", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def kill_during_save(argv, cwd, should_kill):
    """Run `python -m refimpl argv` with the save-pause hook and SIGKILL it at the first paused
    write for which should_kill(names of the paused destinations so far) is true."""
    flag = Path(cwd) / "pause.flag"
    log = open(Path(cwd) / "killed.log", "w")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen([sys.executable, "-m", "refimpl", *map(str, argv)], cwd=cwd,
                            env={**ENV, TEST_HOOK_SAVE_PAUSE: str(flag)}, stdout=log, stderr=log)
    paused, deadline = [], time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"the run ended before the kill point (paused at {paused})"
            assert time.monotonic() < deadline, f"no kill point reached (paused at {paused})"
            if flag.exists():
                paused.append(Path(flag.read_text()).name)
                if should_kill(paused):
                    proc.send_signal(signal.SIGKILL)
                    assert proc.wait(timeout=30) == -signal.SIGKILL
                    flag.unlink()
                    return paused
                flag.unlink()                                   # release this write
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def nth(name, n):
    return lambda paused: paused.count(name) == n


def assert_same_files(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def without_timing(evals):
    return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in evals]


# ---------------------------------------------------------------------------------------------
# A real SIGKILL during a checkpoint write
@pytest.mark.parametrize("kill_at, step_left", [
    ("ckpt.npz", 2),    # before the npz rename: the old pair (step 2) is untouched
    ("ckpt.json", 4),   # between the renames: the new npz + the new JSON's temp file (step 4)
])
def test_pretrain_killed_during_checkpoint_write_resumes_exactly(tmp_path, kill_at, step_left):
    refimpl_cli(*PRETRAIN, "--out", "straight", cwd=tmp_path)
    paused = kill_during_save([*PRETRAIN, "--out", "killed"], tmp_path, nth(kill_at, 2))
    assert paused.count("ckpt.npz") == 2 and "metrics.json" in paused     # metrics go before
    killed = tmp_path / "killed"
    assert any(p.name.endswith(".tmp") for p in killed.iterdir())         # the save never finished
    arrays, meta = load_checkpoint(killed / "ckpt")                       # still loads
    assert meta["step"] == step_left
    assert all(np.isfinite(a).all() for a in arrays.values())
    load_decoder(killed / "ckpt.npz")

    refimpl_cli("pretrain", "--out", "killed", "--resume", cwd=tmp_path)   # the lock died with it
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]  # stale temps removed
    a, meta_a = load_checkpoint(tmp_path / "straight" / "ckpt")
    b, meta_b = load_checkpoint(killed / "ckpt")
    assert meta_a["step"] == meta_b["step"] == 8 and meta_a["rng"] == meta_b["rng"]
    assert_same_files(a, b)                                               # weights and Adam moments
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "killed"))
    assert ma["train_loss"] == mb["train_loss"]                           # bit-identical losses
    assert without_timing(ma["evals"]) == without_timing(mb["evals"])


def test_train_killed_during_checkpoint_write_resumes_exactly(tmp_path):
    refimpl_cli("pretrain", "--preset", "nano", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                "--eval-batches", "1", "--out", "dec", cwd=tmp_path)
    common = [*TRAIN, "--decoder", "dec/ckpt.npz"]
    refimpl_cli(*common, "--out", "straight", cwd=tmp_path)
    kill_during_save([*common, "--out", "killed"], tmp_path, nth("coprocessor.npz", 2))  # at step 4
    decoder_hash = load_checkpoint(tmp_path / "dec" / "ckpt")[1]["decoder_hash"]
    _, adam, _ = load_coprocessor(tmp_path / "killed" / "coprocessor.npz", decoder_hash)
    assert adam["step"] == 2
    partial = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert partial["partial"] and partial["step"] == 4 and "steps" not in partial  # ahead, cut back

    refimpl_cli(*common, "--out", "killed", "--resume", cwd=tmp_path)
    a, _ = load_checkpoint(tmp_path / "straight" / "coprocessor.npz")
    b, _ = load_checkpoint(tmp_path / "killed" / "coprocessor.npz")
    assert_same_files(a, b)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "killed"))
    assert [h["step"] for h in mb["history"]] == list(range(1, 7))        # nothing lost
    assert ma["history"] == mb["history"] and ma["evals"] == mb["evals"]
    assert ma["augmented_ahead_loss"] == mb["augmented_ahead_loss"]


# ---------------------------------------------------------------------------------------------
# Checkpoint metadata: edits are detected, a second writer is refused
def test_edited_metadata_is_detected_and_older_files_still_load(tmp_path):
    cfg = get_preset("nano", vocab_size=50)
    save_decoder(tmp_path / "dec", init_params(cfg), cfg, {"step": 3})
    json_path = tmp_path / "dec.json"
    meta = json.loads(json_path.read_text())
    assert meta["meta_sha256"] == meta_sha256(meta)
    json_path.write_text(json.dumps({**meta, "step": 4}))                 # a hand edit
    with pytest.raises(RefimplError, match="modified or damaged after it was saved"):
        load_checkpoint(tmp_path / "dec")
    del meta["meta_sha256"]                                               # written before the field
    json_path.write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path / "dec")[1]["step"] == 3


def test_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    with run_lock(tmp_path / "run"):
        assert main(["pretrain", "--preset", "nano", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another refimpl run is writing to" in err
    with run_lock(tmp_path / "run"):                                      # released: free again
        pass
    with run_lock(tmp_path / "fresh"):
        pass
    assert not (tmp_path / "fresh").exists()                              # nothing left behind


# ---------------------------------------------------------------------------------------------
# NaN/inf guard: it names the step and the quantity, and the last good checkpoint survives
def test_pretrain_infinite_gradient_norm_names_step_and_quantity(tmp_path, monkeypatch):
    real, calls = loop_module.global_norm, []

    def exploding(grads):
        calls.append(1)
        norm = real(grads)
        return norm * np.inf if len(calls) == 3 else norm
    monkeypatch.setattr(loop_module, "global_norm", exploding)
    with pytest.raises(RefimplError) as e:
        pretrain_module.pretrain(tmp_path, preset="nano", steps=6, batch_size=2, seq_len=16,
                                 eval_every=100, eval_batches=1, save_every=2)
    assert "step 3: the gradient norm is inf (not finite)" in str(e.value)
    assert "(step 2) is untouched" in str(e.value) and "\n" not in str(e.value)
    assert load_checkpoint(tmp_path / "ckpt")[1]["step"] == 2


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("dec")
    assert main(["pretrain", "--preset", "nano", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--eval-batches", "1", "--out", str(out)]) == 0
    return out / "ckpt.npz"


SMALL = {"n_latents": 2, "n_ahead": 3, "n_traces": 4, "batch_size": 2, "seq_len": 16, "eval_batches": 1}


@pytest.mark.parametrize("bad_step, eval_every, kept", [
    (1, 2, "no checkpoint was written"),
    (4, 2, "coprocessor.npz (step 2) is untouched"),
])
def test_train_nan_guard_says_which_checkpoint_is_left(decoder, tmp_path, monkeypatch, bad_step,
                                                       eval_every, kept):
    real, calls = loop_module.value_and_grad, []

    def poisoned(fn, trainable):
        loss, grads, aux = real(fn, trainable)
        calls.append(1)
        return (loss * np.inf if len(calls) == bad_step else loss), grads, aux
    monkeypatch.setattr(loop_module, "value_and_grad", poisoned)
    with pytest.raises(RefimplError) as e:
        train(decoder, TrainConfig(steps=6, eval_every=eval_every, **SMALL), tmp_path, quiet=True)
    msg = str(e.value)
    assert f"diverged at step {bad_step}: the training loss is" in msg and kept in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# The Python API: one-line RefimplErrors (cases not already in test_decoder/test_traces/test_train)
NANO = get_preset("nano", vocab_size=29)


@pytest.fixture(scope="module")
def params():
    return init_params(NANO, seed=0)


def api_cases(p, decoder_path=None):
    """{name: (call, words the one-line message must hold)}; also printed in docs/robustness.md."""
    tok = np.array([[1, 2, 3]])
    cache = prefill(p, NANO, tok)[1]
    fits = NANO.max_seq_len - 3 + 1                                    # prompt [B, 3] + new tokens
    return {
        "forward: positions as a Python list": (
            lambda: forward(p, NANO, tok, positions=[[0, 1, 2]]), ["position ids must be an array", "list"]),
        "forward: mask as a Python list": (
            lambda: forward(p, NANO, tok, may_attend=[[[True] * 3] * 3]), ["mask must be an array"]),
        "forward: cache of the wrong type": (
            lambda: forward(p, NANO, tok, cache=(1, 2)), ["cache must be a KVCache", "tuple"]),
        "extend: cache for another batch size": (
            lambda: extend(p, NANO, cache, np.ones((2, 1), int)), ["cache holds 1 sequences", "hold 2"]),
        "prefill: tokens as a Python list": (
            lambda: prefill(p, NANO, [[1, 2, 3]]), ["token ids must be an array", "list"]),
        "prefill: float token array": (
            lambda: prefill(p, NANO, tok.astype(np.float32)), ["input embeddings", "[B, T, 48]"]),
        "generate: runs past max_seq_len": (
            lambda: generate(p, NANO, [[1, 2, 3]], max_new_tokens=fits + 1),
            ["runs past the decoder's max_seq_len=64", f"max_new_tokens={fits} or less"]),
        "generate: token id out of range": (
            lambda: generate(p, NANO, [[1, 29]], max_new_tokens=1), ["token id 29", "out of range"]),
        "build_layout: no traces (K = 0)": (
            lambda: build_layout(np.zeros((1, 8), int), np.zeros((1, 0), int), 1, 2), ["K >= 1"]),
        "build_layout: float trace positions": (
            lambda: build_layout(np.zeros((1, 8), int), np.array([[1.5]]), 1, 2), ["float64", "int [1, K]"]),
        "build_layout: 1-D tokens": (
            lambda: build_layout(np.zeros(8, int), np.array([[1]]), 1, 2), ["tokens have shape (8,)"]),
        "TrainConfig: negative seed": (lambda: TrainConfig(seed=-1).validate(), ["seed=-1 must be >= 0"]),
        "TrainConfig: negative warmup": (lambda: TrainConfig(warmup=-1).validate(), ["warmup=-1 must be >= 0"]),
        "TrainConfig: infinite lr": (lambda: TrainConfig(lr=float("inf")).validate(), ["lr=inf", "finite"]),
        "TrainConfig: negative weight decay": (
            lambda: TrainConfig(weight_decay=-0.1).validate(), ["weight_decay=-0.1", "weight_decay finite and >= 0"]),
    }


@pytest.mark.parametrize("name", list(api_cases(init_params(NANO))))
def test_api_bad_inputs_raise_one_line_errors(params, name):
    call, words = api_cases(params)[name]
    with pytest.raises(RefimplError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, f"{name}: {word!r} not in {msg!r}"


def test_generate_fills_max_seq_len_exactly(params):
    fits = NANO.max_seq_len - 3 + 1
    dec = generate(params, NANO, [[1, 2, 3]], max_new_tokens=fits)
    assert len(dec.tokens[0]) == fits and dec.cache.positions.max() == NANO.max_seq_len - 1


def test_train_refuses_bad_stop_after_and_foreign_tokenizer(decoder, tmp_path):
    with pytest.raises(RefimplError, match="stop_after=0 must be >= 1"):
        train(decoder, TrainConfig(steps=2, **SMALL), tmp_path / "a", quiet=True, stop_after=0)
    params, cfg, _ = load_decoder(decoder)
    save_decoder(tmp_path / "foreign", params, cfg, {"tokenizer_sha256": "f" * 64})
    with pytest.raises(RefimplError, match="trained with another tokenizer"):
        train(tmp_path / "foreign.npz", TrainConfig(steps=2, **SMALL), tmp_path / "b", quiet=True)
    with pytest.raises(RefimplError, match="no coprocessor checkpoint in .* to resume"):
        train(decoder, TrainConfig(steps=2, **SMALL), tmp_path / "c", quiet=True, resume=True)


def test_coprocessor_with_inconsistent_metadata_is_refused(decoder, tmp_path):
    train(decoder, TrainConfig(steps=1, eval_every=0, **SMALL), tmp_path, quiet=True)
    arrays, meta = load_checkpoint(tmp_path / "coprocessor.npz")
    dec_hash = meta["decoder_hash"]
    for field, value, words in (("n_latents", 3, "n_latents 3 vs soft_tokens"), ("mode", "lora", "mode 'lora'")):
        save_checkpoint(tmp_path / "edited", arrays, {**meta, field: value})
        with pytest.raises(RefimplError, match=words):
            load_coprocessor(tmp_path / "edited.npz", dec_hash)
