"""The latents' read-out (`--readout`) and the soft tokens' learning rate (`--soft-lr-scale`).

The read-out is told by the trainable arrays (coprocessor.readout_of): "norm" (default) is today's
coprocessor, "prenorm" leaves out model.norm.weight, "scaled" adds latent_scale [N_L]. Checked: the
default is unchanged, "scaled" at scale 1 is "norm" exactly, "prenorm" is another function whose
gradient reaches every trainable array, the three loss forms agree for both, checkpoints round-trip
and refuse malformed arrays, and `refimpl train` takes both flags (and resumes exactly).
"""
import json

import numpy as np
import pytest

from refimpl.cli import main
from refimpl.config import get_preset
from refimpl.core.coprocessor import (
    FINAL_NORM,
    LATENT_SCALE,
    SOFT_TOKENS,
    augment,
    init_coprocessor,
    readout_of,
)
from refimpl.core.decoder import flatten_params, init_params, prefill
from refimpl.core.layout import sample_trace_positions
from refimpl.core.objective import FORMS, loss_cached
from refimpl.errors import RefimplError
from refimpl.training.autodiff import value_and_grad
from refimpl.training.checkpoint import (
    load_checkpoint,
    load_coprocessor,
    save_checkpoint,
    save_coprocessor,
    save_decoder,
)
from refimpl.training.optim import adam_init
from refimpl.training.train import TrainConfig, saved_train_config, train

V = 37
CFG = get_preset("nano", vocab_size=V, init_std=0.2)
DEC = init_params(CFG, seed=0, dtype=np.float64)
SMALL = dict(n_latents=2, n_ahead=3, n_traces=4, batch_size=2, seq_len=24, eval_every=3, eval_batches=1)


def _problem(seed=1, B=2, T=12, K=3, n_ahead=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), sample_trace_positions(rng, B, T, K, n_ahead)


def _loss_and_grads(trainable, form="cached", latent_positions="behind", seed=1):
    tokens, positions = _problem(seed)
    n = trainable[SOFT_TOKENS].shape[0]

    def loss_fn(t):
        loss, out = FORMS[form](DEC, t, CFG, tokens, positions, n, 3, "original", latent_positions)
        return loss, {k: np.asarray(getattr(v, "_value", v)) for k, v in out.items()}
    return value_and_grad(loss_fn, trainable)


def test_default_readout_is_unchanged():
    """The default read-out is "norm": the same arrays (in the same order, bit for bit) as before the
    option existed, a copy of the decoder's blocks and final norm, then the soft tokens."""
    for init in ("copy", "random"):
        default = init_coprocessor(DEC, CFG, 3, init, seed=2)
        norm = init_coprocessor(DEC, CFG, 3, init, seed=2, readout="norm")
        blocks = [k for k in flatten_params(DEC) if k != "model.embed_tokens.weight"]
        assert list(default) == list(norm) == blocks + [SOFT_TOKENS]
        assert all(default[k].tobytes() == norm[k].tobytes() for k in default)
        assert readout_of(default) == "norm"
    assert readout_of(init_coprocessor(DEC, CFG, 3, mode="pause")) == "norm"
    t = init_coprocessor(DEC, CFG, 3, seed=2)
    assert all(t[k].tobytes() == DEC_k.tobytes() for k, DEC_k in flatten_params(DEC).items() if k in t)
    tc = TrainConfig()
    assert tc.readout == "norm" and tc.soft_lr_scale == 1.0 and tc.lr_scales() == {}


def test_scaled_at_one_is_norm_exactly_and_prenorm_is_not():
    norm, scaled, prenorm = (init_coprocessor(DEC, CFG, 3, seed=2, readout=r)
                             for r in ("norm", "scaled", "prenorm"))
    assert set(scaled) == set(norm) | {LATENT_SCALE} and set(prenorm) == set(norm) - {FINAL_NORM}
    assert scaled[LATENT_SCALE].shape == (3,) and (scaled[LATENT_SCALE] == 1).all()
    assert [readout_of(t) for t in (norm, scaled, prenorm)] == ["norm", "scaled", "prenorm"]
    loss_n, grads_n, out_n = _loss_and_grads(norm)
    loss_s, grads_s, out_s = _loss_and_grads(scaled)
    assert loss_s == loss_n and out_s["latents"].tobytes() == out_n["latents"].tobytes()
    assert all(grads_s[k].tobytes() == grads_n[k].tobytes() for k in norm)
    assert np.abs(grads_s[LATENT_SCALE]).min() > 0
    loss_p, _, out_p = _loss_and_grads(prenorm)
    assert abs(loss_p - loss_n) > 1e-6
    # before the norm: the residual stream, whose row norms are not the final norm's
    rms = lambda z: np.sqrt((z * z).mean(-1))                                          # noqa: E731
    assert not np.allclose(rms(out_p["latents"]), rms(out_n["latents"]))
    twice = {**scaled, LATENT_SCALE: np.array([2.0, 1.0, 0.5])}
    z2 = _loss_and_grads(twice)[2]["latents"]
    np.testing.assert_allclose(z2, out_n["latents"] * np.array([2.0, 1.0, 0.5])[:, None], rtol=1e-15)


@pytest.mark.parametrize("readout", ["prenorm", "scaled"])
def test_gradient_reaches_every_trainable_array_and_no_decoder_array(readout):
    trainable = init_coprocessor(DEC, CFG, 2, seed=1, readout=readout)
    before = {k: v.copy() for k, v in flatten_params(DEC).items()}
    tokens, positions = _problem(3)
    seen = []

    def loss_fn(t):
        seen.extend(k for k, v in flatten_params(DEC).items() if hasattr(v, "_node"))
        return loss_cached(DEC, t, CFG, tokens, positions, 2, 3)[0]
    _, grads, _ = value_and_grad(loss_fn, trainable)
    assert seen == [] and set(grads) == set(trainable)
    for name, g in grads.items():
        assert g is not None and g.shape == trainable[name].shape and np.abs(g).max() > 0, name
    assert all(np.array_equal(v, before[k]) for k, v in flatten_params(DEC).items())


@pytest.mark.parametrize("readout", ["prenorm", "scaled"])
@pytest.mark.parametrize("latent_positions", ["behind", "after"])
def test_augment_equals_the_cached_latents(readout, latent_positions):
    """augment (inference) reads out like training; the three loss forms agreeing under every
    read-out is tests/test_objective.py's property."""
    trainable = init_coprocessor(DEC, CFG, 2, seed=4, readout=readout)
    if readout == "scaled":
        trainable[LATENT_SCALE] = np.array([1.5, 0.7])
    tokens = _problem(5)[0]
    _, cache = prefill(DEC, CFG, tokens[:1, :7])
    _, out = loss_cached(DEC, trainable, CFG, tokens[:1], np.array([[6]]), 2, 1, "original", latent_positions)
    np.testing.assert_allclose(augment(trainable, CFG, cache, latent_positions), out["latents"][:, 0],
                               rtol=1e-12, atol=1e-14)


def test_pause_mode_takes_only_the_default_readout():
    with pytest.raises(RefimplError, match="readout='scaled' needs mode='coprocessor'"):
        init_coprocessor(DEC, CFG, 2, mode="pause", readout="scaled")
    with pytest.raises(RefimplError, match="readout='prenorm' needs mode='coprocessor'"):
        TrainConfig(mode="pause", readout="prenorm").validate()
    with pytest.raises(RefimplError, match="readout='post' is unknown: use one of norm, prenorm, scaled"):
        TrainConfig(readout="post").validate()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(RefimplError, match=f"soft_lr_scale={bad} must be finite and > 0"):
            TrainConfig(soft_lr_scale=bad).validate()


def test_older_train_configs_load_with_the_defaults():
    old = {k: v for k, v in TrainConfig().__dict__.items() if k not in ("readout", "soft_lr_scale")}
    full = saved_train_config(old)
    assert full["readout"] == "norm" and full["soft_lr_scale"] == 1.0


def _meta(cfg, tc):
    from dataclasses import asdict
    return {"decoder_hash": "h", "train_config": asdict(tc), "config": cfg.to_dict(), "mode": tc.mode,
            "init": tc.init, "n_latents": tc.n_latents, "n_ahead": tc.n_ahead}


@pytest.mark.parametrize("readout", ["prenorm", "scaled"])
def test_checkpoint_round_trip_and_malformed_arrays(tmp_path, readout):
    dec32 = init_params(CFG, seed=0, dtype=np.float32)
    tc = TrainConfig(n_latents=2, n_ahead=3, readout=readout)
    trainable = init_coprocessor(dec32, CFG, 2, seed=1, readout=readout)
    if readout == "scaled":
        trainable[LATENT_SCALE] = np.array([1.25, 0.5], np.float32)
    save_coprocessor(tmp_path / "c", trainable, adam_init(trainable), _meta(CFG, tc))
    got, adam, meta = load_coprocessor(tmp_path / "c.npz", "h")
    assert readout_of(got) == readout and set(got) == set(trainable) == set(adam["m"])
    assert all(got[k].tobytes() == trainable[k].tobytes() for k in trainable)
    arrays, meta = load_checkpoint(tmp_path / "c.npz")
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "npz_file", "npz_sha256", "arrays",
                                                       "meta_sha256")}
    broken = [  # (arrays, meta, words)
        (arrays, {**meta, "train_config": {**meta["train_config"], "readout": "norm"}},
         f"a '{readout}' read-out, but train_config says readout='norm'"),
        ({**arrays, SOFT_TOKENS: arrays[SOFT_TOKENS][:, :5]}, meta, "soft_tokens has shape [2, 5]"),
        ({k: v for k, v in arrays.items() if k != "model.layers.1.mlp.up_proj.weight"}, meta,
         "missing ['model.layers.1.mlp.up_proj.weight']"),
        ({**arrays, "model.layers.9.mlp.up_proj.weight": arrays["model.layers.1.mlp.up_proj.weight"]}, meta,
         "unknown ['model.layers.9.mlp.up_proj.weight']"),
        (arrays, {**meta, "mode": "pause"}, "pause tokens with ['"),
    ]
    if readout == "scaled":
        broken += [({**arrays, LATENT_SCALE: np.ones(3, np.float32)}, meta,
                    "latent_scale has shape [3], expected [2]"),
                   ({k: v for k, v in arrays.items() if k != FINAL_NORM}, meta,
                    "missing ['model.norm.weight']")]
    else:
        broken += [({**arrays, FINAL_NORM: dec32["norm"]}, meta, f"a 'norm' read-out, but train_config says "
                                                                 f"readout='{readout}'")]
    for i, (bad_arrays, bad_meta, words) in enumerate(broken):
        save_checkpoint(tmp_path / f"bad{i}", bad_arrays, bad_meta)
        with pytest.raises(RefimplError, match="holds the wrong arrays") as e:
            load_coprocessor(tmp_path / f"bad{i}.npz", "h")
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    cfg = get_preset("nano")        # the shipped tokenizer's vocab; random weights are enough here
    out = tmp_path_factory.mktemp("dec") / "dec"
    save_decoder(out, init_params(cfg, seed=0), cfg)
    return out.with_suffix(".npz")


def test_cli_train_with_both_levers(decoder, tmp_path, capsys):
    rc = main(["train", "--decoder", str(decoder), "--out", str(tmp_path), "--steps", "2", "--quiet",
               "--n-latents", "2", "--n-ahead", "3", "--n-traces", "4", "--batch-size", "2",
               "--seq-len", "24", "--eval-batches", "1", "--readout", "scaled", "--soft-lr-scale", "3"])
    assert rc == 0 and "held-out ahead-token loss" in capsys.readouterr().out
    trainable, adam, meta = load_coprocessor(tmp_path / "coprocessor.npz", meta_hash(decoder))
    assert readout_of(trainable) == "scaled" and adam["step"] == 2
    assert not (trainable[LATENT_SCALE] == 1).all()                   # latent_scale trains
    assert meta["train_config"]["readout"] == "scaled" and meta["train_config"]["soft_lr_scale"] == 3.0
    assert json.loads((tmp_path / "metrics.json").read_text())["train_config"]["soft_lr_scale"] == 3.0
    assert main(["train", "--decoder", str(decoder), "--out", str(tmp_path / "x"),
                 "--soft-lr-scale", "0"]) == 2
    assert "--soft-lr-scale: must be a positive number" in capsys.readouterr().err
    assert main(["train", "--decoder", str(decoder), "--out", str(tmp_path / "y"), "--mode", "pause",
                 "--readout", "prenorm"]) == 2
    err = capsys.readouterr().err
    assert "--readout 'prenorm' needs --mode 'coprocessor'" in err and err.count("\n") == 1


def meta_hash(decoder):
    return load_checkpoint(decoder)[1]["decoder_hash"]


@pytest.mark.parametrize("changes", [dict(readout="prenorm"), dict(readout="scaled", soft_lr_scale=3.0),
                                     dict(soft_lr_scale=0.3, weight_decay=0.1)])
def test_resume_is_exact_and_the_levers_change_the_run(decoder, tmp_path, changes):
    tc = TrainConfig(steps=4, **SMALL, **changes)
    full = train(decoder, tc, tmp_path / "full", quiet=True)
    train(decoder, tc, tmp_path / "part", quiet=True, stop_after=3)
    with pytest.raises(RefimplError, match="differs from the resumed run's"):
        train(decoder, TrainConfig(steps=4, **SMALL), tmp_path / "part", resume=True, quiet=True)
    part = train(decoder, tc, tmp_path / "part", resume=True, quiet=True)
    assert part["history"] == full["history"] and part["evals"] == full["evals"]
    a, _ = load_checkpoint(tmp_path / "full" / "coprocessor.npz")
    b, _ = load_checkpoint(tmp_path / "part" / "coprocessor.npz")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    same_decay = {k: v for k, v in changes.items() if k == "weight_decay"}
    base = train(decoder, TrainConfig(steps=4, **SMALL, **same_decay), tmp_path / "base", quiet=True)
    assert base["history"][0]["loss"] == full["history"][0]["loss"] or changes.get("readout") == "prenorm"
    assert base["history"][-1]["loss"] != full["history"][-1]["loss"]
