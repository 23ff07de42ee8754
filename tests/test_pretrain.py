"""`refimpl pretrain`: the loss falls, runs are reproducible, and --resume is bit-exact."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import refimpl
from refimpl import cli
from refimpl.errors import RefimplError
from refimpl.training import loop, pretrain
from refimpl.training.checkpoint import load_checkpoint, load_decoder


@pytest.fixture(autouse=True)
def corpus(monkeypatch):
    """The real pretraining mixture; a synthetic Markov-chain corpus while tiny_data/ is absent."""
    try:
        loop.load_corpus()
        return
    except RefimplError:
        pass
    rng = np.random.default_rng(0)
    tokens = np.zeros(60_000, dtype=np.int32)
    steps = rng.integers(0, 3, size=len(tokens))
    for i in range(1, len(tokens)):                 # each token has 3 likely successors
        tokens[i] = (tokens[i - 1] * 7 + 1 + steps[i]) % 64
    fake = loop.Corpus(2049, "0" * 64, "1" * 64, tokens[:50_000], tokens[50_000:])
    monkeypatch.setattr(loop, "load_corpus", lambda: fake)


SMALL = ["--preset", "nano", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2"]


def cli_run(capsys, *argv):
    """(exit status, stderr) of `refimpl ...` run in-process."""
    status = cli.main([str(a) for a in argv])
    return status, capsys.readouterr().err


def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


def without_timing(metrics):
    return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in metrics["evals"]]


def test_nano_pretrain_loss_falls(tmp_path, capsys):
    out = tmp_path / "run"
    status, err = cli_run(capsys, "pretrain", "--preset", "nano", "--steps", 50, "--out", out,
                          "--eval-every", 25)
    assert status == 0, err
    m = metrics_of(out)
    assert [e["step"] for e in m["evals"]] == [0, 25, 50]
    first, last = m["evals"][0]["val_loss"], m["evals"][-1]["val_loss"]
    assert first == pytest.approx(np.log(2049), abs=0.3)                 # a uniform guess at start
    assert last < first - 2.0
    assert len(m["train_loss"]) == 50 and np.mean(m["train_loss"][-10:]) < m["train_loss"][0] - 2
    assert m["evals"][-1]["tokens_per_s"] > 0
    params, cfg, meta = load_decoder(out / "ckpt.npz")
    assert meta["step"] == 50 and cfg.vocab_size == 2049 and params["norm"].dtype == np.float32
    assert meta["extra"]["hparams"]["steps"] == 50 and meta["optimizer"]["step"] == 50


def test_resume_is_bit_exact(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*SMALL, "--steps", 20, "--eval-every", 5, "--save-every", 3]
    assert cli_run(capsys, "pretrain", *common, "--out", straight)[0] == 0
    assert cli_run(capsys, "pretrain", *common, "--out", split, "--stop-after", 10)[0] == 0
    assert load_checkpoint(split / "ckpt")[1]["step"] == 10
    status, err = cli_run(capsys, "pretrain", "--out", split, "--resume")
    assert status == 0, err
    a, meta_a = load_checkpoint(straight / "ckpt")
    b, meta_b = load_checkpoint(split / "ckpt")
    assert meta_a["step"] == meta_b["step"] == 20 and meta_a["rng"] == meta_b["rng"]
    assert set(a) == set(b)
    for name in a:                                                      # weights and Adam moments
        assert a[name].tobytes() == b[name].tobytes(), name
    ma, mb = metrics_of(straight), metrics_of(split)
    assert ma["train_loss"] == mb["train_loss"]                         # bit-identical losses
    assert without_timing(ma) == without_timing(mb)


def test_same_seed_same_metrics_other_seed_differs(tmp_path, capsys):
    runs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        assert cli_run(capsys, "pretrain", *SMALL, "--steps", 6, "--eval-every", 3,
                       "--seed", seed, "--out", out)[0] == 0
        runs.append(metrics_of(out))
    assert runs[0]["train_loss"] == runs[1]["train_loss"]
    assert without_timing(runs[0]) == without_timing(runs[1])
    assert runs[0]["train_loss"] != runs[2]["train_loss"]


def test_nonfinite_loss_stops_without_touching_last_checkpoint(tmp_path, monkeypatch):
    out, calls = tmp_path / "run", []
    real_loss = pretrain.lm_loss

    def poisoned(params, cfg, batch):
        calls.append(1)
        loss = real_loss(params, cfg, batch)
        return loss * np.nan if len(calls) == 5 else loss
    monkeypatch.setattr(pretrain, "lm_loss", poisoned)
    before = None
    with pytest.raises(RefimplError) as e:
        pretrain.pretrain(out, preset="nano", steps=10, batch_size=2, seq_len=16, eval_every=100,
                          eval_batches=1, save_every=2)
    msg = str(e.value)
    assert "step 5: the training loss is nan" in msg and "(step 4) is untouched" in msg
    arrays, meta = load_checkpoint(out / "ckpt")
    assert meta["step"] == 4
    before = {k: v.tobytes() for k, v in arrays.items()}
    assert all(np.isfinite(v).all() for v in arrays.values())
    assert before == {k: v.tobytes() for k, v in load_checkpoint(out / "ckpt")[0].items()}


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, monkeypatch):
    small = dict(preset="nano", steps=8, batch_size=2, seq_len=16, eval_every=4, eval_batches=1,
                 save_every=100)
    pretrain.pretrain(tmp_path / "straight", **small)
    calls, real_loss = [], pretrain.lm_loss

    def interrupted(params, cfg, batch):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_loss(params, cfg, batch)
    monkeypatch.setattr(pretrain, "lm_loss", interrupted)
    with pytest.raises(RefimplError, match="interrupted after step 5: checkpoint saved"):
        pretrain.pretrain(tmp_path / "split", **small)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "split" / "ckpt")[1]["step"] == 5
    assert len(metrics_of(tmp_path / "split")["train_loss"]) == 5
    pretrain.pretrain(tmp_path / "split", resume=True)
    a, b = (load_checkpoint(tmp_path / d / "ckpt")[0] for d in ("straight", "split"))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    ma, mb = metrics_of(tmp_path / "straight"), metrics_of(tmp_path / "split")
    assert ma["train_loss"] == mb["train_loss"] and without_timing(ma) == without_timing(mb)


@pytest.mark.parametrize("argv, expected", [
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--steps", "-5"], "--steps: must be a positive integer, got '-5'"),
    (["--lr", "abc"], "--lr: must be a positive number"),
    (["--seq-len", "999"], "exceeds the nano preset's max_seq_len 64"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, expected):
    status, err = cli_run(capsys, "pretrain", *argv, "--out", tmp_path / "x")
    assert status == 2
    assert err.startswith("refimpl: error: ") and err.count("\n") == 1 and expected in err


def test_resume_misuse_is_reported(tmp_path, capsys):
    out = tmp_path / "run"
    status, err = cli_run(capsys, "pretrain", *SMALL, "--steps", 2, "--out", out, "--resume")
    assert status == 2 and "no checkpoint in" in err
    assert cli_run(capsys, "pretrain", *SMALL, "--steps", 2, "--out", out)[0] == 0
    status, err = cli_run(capsys, "pretrain", *SMALL, "--steps", 2, "--out", out)
    assert status == 2 and "already holds a checkpoint" in err
    status, err = cli_run(capsys, "pretrain", "--out", out, "--resume", "--lr", "0.1")
    assert status == 2 and "--lr 0.1 differs" in err
    status, err = cli_run(capsys, "pretrain", "--out", out, "--resume")
    assert status == 2 and "already at step 2" in err


def test_python_dash_m_refimpl(tmp_path):
    root = os.path.dirname(os.path.dirname(refimpl.__file__))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "refimpl", "pretrain", "--steps", "0"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("refimpl: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "refimpl", "--help"], capture_output=True,
                          text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "pretrain" in proc.stdout
