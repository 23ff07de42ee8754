"""`refimpl train`: the frozen decoder stays frozen, resume is exact, bad checkpoints are refused."""
import json

import numpy as np
import pytest

from refimpl.cli import main
from refimpl.errors import RefimplError
from refimpl.training.checkpoint import load_checkpoint, load_coprocessor
from refimpl.training.train import TrainConfig, train

SMALL = dict(n_latents=2, n_ahead=3, n_traces=4, batch_size=2, seq_len=24, eval_every=3, eval_batches=1)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("dec")
    assert main(["pretrain", "--preset", "nano", "--steps", "4", "--batch-size", "2", "--seq-len", "24",
                 "--eval-batches", "1", "--out", str(out)]) == 0
    return out / "ckpt.npz"


def _decoder_bytes(path):
    arrays, meta = load_checkpoint(path)
    return {k: v.tobytes() for k, v in arrays.items() if k.startswith("model.")}, meta["decoder_hash"]


def test_train_leaves_decoder_bit_identical(decoder, tmp_path):
    before = _decoder_bytes(decoder)
    m = train(decoder, TrainConfig(steps=5, **SMALL), tmp_path, quiet=True)
    assert _decoder_bytes(decoder) == before
    assert len(m["baseline_ahead_loss"]) == len(m["augmented_ahead_loss"]) == 3
    assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in m["history"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["augmented_ahead_loss"] == m["augmented_ahead_loss"]
    trainable, adam, meta = load_coprocessor(tmp_path / "coprocessor.npz", before[1])
    assert adam["step"] == 5 and "soft_tokens" in trainable
    assert not any(k == "model.embed_tokens.weight" for k in trainable)


@pytest.mark.parametrize("mode", ["coprocessor", "pause"])
def test_resume_is_exact(decoder, tmp_path, mode):
    full = train(decoder, TrainConfig(steps=6, mode=mode, **SMALL), tmp_path / "full", quiet=True)
    train(decoder, TrainConfig(steps=6, mode=mode, **SMALL), tmp_path / "part", quiet=True, stop_after=3)
    part = train(decoder, TrainConfig(steps=6, mode=mode, **SMALL), tmp_path / "part", resume=True, quiet=True)
    assert [h["loss"] for h in part["history"]] == [h["loss"] for h in full["history"]]
    a, _ = load_checkpoint(tmp_path / "full" / "coprocessor.npz")
    b, _ = load_checkpoint(tmp_path / "part" / "coprocessor.npz")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_numbers(decoder, tmp_path):
    a = train(decoder, TrainConfig(steps=3, **SMALL), tmp_path / "a", quiet=True)
    b = train(decoder, TrainConfig(steps=3, **SMALL), tmp_path / "b", quiet=True)
    assert a["history"] == b["history"] and a["augmented_ahead_loss"] == b["augmented_ahead_loss"]


def test_coprocessor_for_another_decoder_is_refused(decoder, tmp_path):
    train(decoder, TrainConfig(steps=1, **SMALL), tmp_path, quiet=True)
    with pytest.raises(RefimplError, match="another decoder"):
        load_coprocessor(tmp_path / "coprocessor.npz", "0" * 64)


def test_nan_guard_keeps_last_good_checkpoint(decoder, tmp_path, monkeypatch):
    import refimpl.training.loop as loop_module
    real, calls = loop_module.value_and_grad, []

    def poisoned(fn, trainable):           # the 5th step's loss comes back as NaN
        loss, grads, aux = real(fn, trainable)
        calls.append(1)
        return (loss * np.nan if len(calls) == 5 else loss), grads, aux
    monkeypatch.setattr(loop_module, "value_and_grad", poisoned)
    with pytest.raises(RefimplError, match="diverged at step 5: the training loss is nan"):
        train(decoder, TrainConfig(steps=8, **SMALL), tmp_path, quiet=True)
    trainable, adam, _ = load_coprocessor(tmp_path / "coprocessor.npz", _decoder_bytes(decoder)[1])
    assert adam["step"] == 3                # the checkpoint of step 3 (eval_every=3) is intact
    assert all(np.isfinite(v).all() for v in trainable.values())


@pytest.mark.parametrize("override, words", [
    (dict(n_latents=0), "n_latents=0 must be >= 1"), (dict(n_ahead=0), "n_ahead=0 must be >= 1"),
    (dict(n_traces=40), "n_traces=40"), (dict(mode="bogus"), "mode='bogus' is unknown"),
    (dict(init="zeros"), "init='zeros' is unknown"), (dict(lr=-1.0), "lr=-1.0"),
])
def test_bad_options(decoder, tmp_path, override, words):
    with pytest.raises(RefimplError, match=words):
        train(decoder, TrainConfig(steps=1, **{**SMALL, **override}), tmp_path, quiet=True)


def test_cli_train(decoder, tmp_path, capsys):
    rc = main(["train", "--decoder", str(decoder), "--out", str(tmp_path), "--steps", "2", "--quiet",
               "--n-latents", "2", "--n-ahead", "3", "--n-traces", "4", "--batch-size", "2",
               "--seq-len", "24", "--eval-batches", "1"])
    assert rc == 0 and "held-out ahead-token loss" in capsys.readouterr().out
    assert main(["train", "--decoder", str(tmp_path / "missing.npz"), "--out", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err


def test_data_source_is_recorded_and_defaults_by_decoder(decoder, tmp_path, capsys):
    """--data: the windows' source, in metrics.json; by default text for a converted LLM, else mixture."""
    import argparse
    import json
    import shutil

    from refimpl.cli import _data
    rc = main(["train", "--decoder", str(decoder), "--out", str(tmp_path / "r"), "--steps", "1", "--quiet",
               "--n-latents", "2", "--n-ahead", "3", "--n-traces", "4", "--batch-size", "2",
               "--seq-len", "24", "--eval-batches", "1", "--data", "reasoning"])
    assert rc == 0 and json.loads((tmp_path / "r" / "metrics.json").read_text())["train_config"]["data"] == \
        "reasoning"
    assert _data(argparse.Namespace(decoder=str(decoder), data=None)) == "mixture"
    llm = tmp_path / "llm.npz"                                       # a decoder converted from a named LLM
    shutil.copy(decoder, llm)
    meta = json.loads(decoder.with_suffix(".json").read_text())
    llm.with_suffix(".json").write_text(json.dumps({**meta, "model": "smollm2-135m"}))
    assert _data(argparse.Namespace(decoder=str(llm), data=None)) == "text"
    assert _data(argparse.Namespace(decoder=str(llm), data="mixture")) == "mixture"
    for command in ("train", "eval"):
        assert main([command, "--help"]) == 0 and "--data {mixture,text,reasoning}" in capsys.readouterr().out


def test_decoder_arrays_bit_identical_after_train_steps(decoder):
    """docs/method.md §6, invariant 2: the in-memory decoder arrays never change, whatever the steps do."""
    from refimpl.core.coprocessor import init_coprocessor
    from refimpl.core.decoder import flatten_params
    from refimpl.core.layout import sample_trace_positions
    from refimpl.training.checkpoint import load_decoder
    from refimpl.training.optim import adam_init
    from refimpl.training.train import train_step
    params, cfg, _ = load_decoder(decoder)
    before = {k: v.copy() for k, v in flatten_params(params).items()}
    tc = TrainConfig(steps=3, **SMALL)
    trainable = init_coprocessor(params, cfg, tc.n_latents)
    adam = adam_init(trainable)
    rng = np.random.default_rng(0)
    first = {k: v.copy() for k, v in trainable.items()}
    for _ in range(3):
        tokens = rng.integers(0, cfg.vocab_size, (tc.batch_size, tc.seq_len))
        positions = sample_trace_positions(rng, tc.batch_size, tc.seq_len, tc.n_traces, tc.n_ahead)
        trainable, adam, _ = train_step(params, trainable, adam, cfg, tc, tokens, positions, 1e-2)
    for k, v in flatten_params(params).items():
        assert v.tobytes() == before[k].tobytes(), f"decoder array {k} changed"
    assert all(not np.array_equal(trainable[k], first[k]) for k in trainable)   # the coprocessor did move


def test_one_host_read_per_step(decoder, monkeypatch):
    """The GPU path: the loss, the gradient norm, whether the weights are finite and the latent norm reach
    the host in ONE transfer."""
    from refimpl.core.coprocessor import init_coprocessor
    from refimpl.core.layout import sample_trace_positions
    from refimpl.training import loop
    from refimpl.training.checkpoint import load_decoder
    from refimpl.training.optim import adam_init
    from refimpl.training.train import train_step
    params, cfg, _ = load_decoder(decoder)
    tc = TrainConfig(steps=3, **SMALL)
    trainable = init_coprocessor(params, cfg, tc.n_latents)
    adam, rng, reads = adam_init(trainable), np.random.default_rng(0), []
    real = loop.to_numpy
    monkeypatch.setattr(loop, "to_numpy", lambda x: reads.append(x.shape) or real(x))
    for _ in range(3):
        tokens = rng.integers(0, cfg.vocab_size, (tc.batch_size, tc.seq_len))
        positions = sample_trace_positions(rng, tc.batch_size, tc.seq_len, tc.n_traces, tc.n_ahead)
        trainable, adam, stats = train_step(params, trainable, adam, cfg, tc, tokens, positions, 1e-2)
    assert reads == [(4,)] * 3 and set(stats) == {"loss", "grad_norm", "latent_norm"}


def test_ctrl_c_saves_and_resumes_exactly(decoder, tmp_path, monkeypatch):
    from refimpl.training import loop
    full = train(decoder, TrainConfig(steps=6, **SMALL), tmp_path / "full", quiet=True)
    real, calls = loop.value_and_grad, []

    def interrupted(fn, trainable):        # Ctrl-C during the 5th step
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(fn, trainable)
    monkeypatch.setattr(loop, "value_and_grad", interrupted)
    with pytest.raises(RefimplError, match="interrupted after step 4: checkpoint saved"):
        train(decoder, TrainConfig(steps=6, **SMALL), tmp_path / "part", quiet=True)
    monkeypatch.undo()
    part = train(decoder, TrainConfig(steps=6, **SMALL), tmp_path / "part", resume=True, quiet=True)
    assert part["history"] == full["history"] and part["evals"] == full["evals"]
    a, _ = load_checkpoint(tmp_path / "full" / "coprocessor.npz")
    b, _ = load_checkpoint(tmp_path / "part" / "coprocessor.npz")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_zero_steps_writes_the_untrained_coprocessor(decoder, tmp_path):
    m = train(decoder, TrainConfig(steps=0, **SMALL), tmp_path, quiet=True)
    assert m["steps"] == 0 and m["evals"] == m["history"] == [] and len(m["augmented_ahead_loss"]) == 3
    assert load_checkpoint(tmp_path / "coprocessor.npz")[1]["step"] == 0


def _forget_fields(ckpt, names):
    """Rewrite a coprocessor checkpoint as one saved before TrainConfig had `names`."""
    from refimpl.training.checkpoint import save_checkpoint
    arrays, meta = load_checkpoint(ckpt)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "npz_file", "npz_sha256", "arrays",
                                                       "meta_sha256")}
    meta["train_config"] = {k: v for k, v in meta["train_config"].items() if k not in names}
    save_checkpoint(ckpt, arrays, meta)


def test_resume_of_a_checkpoint_that_predates_latent_positions_is_refused(decoder, tmp_path):
    """A checkpoint without latent_positions was trained with the latents 'after' the point: resuming
    it is refused in one line that names what changed (the same for any removed option)."""
    tc = TrainConfig(steps=6, latent_positions="after", **SMALL)
    train(decoder, tc, tmp_path / "old", quiet=True, stop_after=3)
    _forget_fields(tmp_path / "old" / "coprocessor.npz", ("latent_positions",))
    with pytest.raises(RefimplError, match="before the latents' position ids were recorded.*commit 2d4e58e"):
        train(decoder, tc, tmp_path / "old", resume=True, quiet=True)


def test_latent_positions_reach_the_loss(decoder, tmp_path):
    from refimpl.core.coprocessor import init_coprocessor
    from refimpl.core.layout import sample_trace_positions
    from refimpl.core.objective import loss_cached
    from refimpl.training.checkpoint import load_decoder
    from refimpl.training.train import coprocessor_loss
    params, cfg, _ = load_decoder(decoder)
    tc = TrainConfig(**SMALL)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 24))
    positions = sample_trace_positions(rng, 2, 24, 4, 3)
    trainable = init_coprocessor(params, cfg, 2)
    got = coprocessor_loss(params, trainable, cfg, tc, (tokens, positions))[0]
    behind, after = (loss_cached(params, trainable, cfg, tokens, positions, 2, 3, lp)[0]
                     for lp in ("behind", "after"))
    assert tc.latent_positions == "behind" and got == behind != after


def test_partial_metrics_hold_the_baseline(decoder, tmp_path, monkeypatch):
    """metrics.json while training holds the decoder alone's held-out loss: the break-even curve's zero."""
    from refimpl.training import loop
    written, real = [], loop.atomic_write_json
    monkeypatch.setattr(loop, "atomic_write_json", lambda path, obj: written.append(obj) or real(path, obj))
    m = train(decoder, TrainConfig(steps=3, latent_positions="after", **SMALL), tmp_path, quiet=True)
    partial = written[0]
    assert partial["partial"] and partial["baseline_ahead_loss"] == m["baseline_ahead_loss"]
    assert partial["train_config"]["latent_positions"] == "after"
