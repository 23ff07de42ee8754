"""`refimpl pretrain`: train the decoder from scratch on the pretraining mixture.

The objective is next-token cross-entropy: every batch holds B windows of T + 1 tokens; the
decoder reads tokens 0..T-1 and is scored on tokens 1..T. The loop is the plainest one that can
be checkpointed and resumed exactly:

    batch   = data.sample_batch(train, B, T + 1, rng)             # [B, T + 1]
    loss, g = autodiff.value_and_grad(lm_loss, params)            # over the Hugging Face names
    g, norm = optim.clip_by_global_norm(g, clip)
    params, adam = optim.adam_update(params, g, adam, lr_schedule(step, ...), ...)

A checkpoint (DIR/ckpt.npz + DIR/ckpt.json) holds the weights, Adam's moments and step, and the
state of the batch sampler's random generator, so `--resume` continues bit for bit as if the run
had never stopped. A run can be split on purpose with `--stop-after`, which stops early but keeps
the learning-rate schedule of `--steps`. Held-out loss is measured on the first `--eval-batches`
fixed windows of the val split. DIR/metrics.json records every evaluation and every step's
training loss. A non-finite loss or gradient norm stops the run before it touches the last good
checkpoint.
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import DTYPES, get_dtype, get_xp, to_xp
from ..config import PRESETS, get_preset
from ..core.decoder import flatten_params, forward, init_params, param_shapes, unflatten_params
from ..core.ops import cross_entropy, mean
from ..data.corpus import data_hash, iter_eval_batches, load_tokens, sample_batch
from ..data.tokenizer import load_tokenizer
from ..errors import RefimplError, require
from .autodiff import value_and_grad
from .checkpoint import (
    atomic_write_json,
    check_decoder_shapes,
    checkpoint_exists,
    checkpoint_paths,
    decoder_config,
    load_checkpoint,
    save_decoder,
    state_from_arrays,
    state_to_arrays,
)
from .optim import adam_init, adam_update, clip_by_global_norm, lr_schedule
from .progress import Progress

BETAS, ADAM_EPS = (0.9, 0.95), 1e-8
DEFAULTS = {"preset": "nano", "steps": 2000, "batch_size": 16, "seq_len": None, "lr": 3e-3,
            "warmup": None, "weight_decay": 0.1, "clip": 1.0, "eval_every": 100,
            "eval_batches": 8, "save_every": 500, "seed": 0, "dtype": "float32"}
# Hyperparameters that change the arithmetic: a resumed run must keep the checkpoint's values.
FIXED_ON_RESUME = ("preset", "batch_size", "seq_len", "lr", "warmup", "weight_decay", "clip",
                   "seed", "dtype")


# ---------------------------------------------------------------------------------------------
# The objective
def lm_loss(params, cfg, batch):
    """Mean next-token cross-entropy of the decoder on token windows [B, T + 1] -> scalar."""
    logits, _, _ = forward(params, cfg, batch[:, :-1])                # [B, T, V]
    return mean(cross_entropy(logits, batch[:, 1:]))                  # [B, T] -> []


def evaluate(params, cfg, batches):
    """Token-weighted mean loss over fixed batches (no gradients), a Python float."""
    total, count = 0.0, 0
    for batch in batches:
        logits, _, _ = forward(params, cfg, batch[:, :-1])
        total += float(cross_entropy(logits, batch[:, 1:]).astype(np.float64).sum())
        count += batch[:, 1:].size
    return total / count


# ---------------------------------------------------------------------------------------------
# Data
@dataclass(frozen=True)
class Corpus:
    n_vocab: int
    tokenizer_sha256: str
    data_hash: str
    train: np.ndarray   # int32 [N]
    val: np.ndarray     # int32 [M]


def load_corpus():
    """The pretraining mixture (train and val) and the hashes a checkpoint records."""
    tok = load_tokenizer()
    return Corpus(tok.n_vocab, tok.sha256, data_hash(), load_tokens("train", tok),
                  load_tokens("val", tok))


def eval_batches(tokens, hp, xp):
    """The first eval_batches fixed [B, T + 1] windows of the val split, on backend xp."""
    it = iter_eval_batches(tokens, hp["batch_size"], hp["seq_len"] + 1)
    return [xp.asarray(b) for _, b in zip(range(hp["eval_batches"]), it)]


# ---------------------------------------------------------------------------------------------
# The run
def resolve_hparams(given, saved=None):
    """Fill defaults (or, on resume, the checkpoint's values); explicit conflicts are errors."""
    if saved is None:
        hp = {**DEFAULTS, **given}
        cfg = get_preset(hp["preset"])
        hp["seq_len"] = hp["seq_len"] or cfg.max_seq_len
        if hp["warmup"] is None:
            hp["warmup"] = min(100, hp["steps"] // 10)
        require(hp["seq_len"] <= cfg.max_seq_len,
                f"--seq-len {hp['seq_len']} exceeds the {hp['preset']} preset's max_seq_len "
                f"{cfg.max_seq_len}: use --seq-len {cfg.max_seq_len} or less")
        return hp
    for key in FIXED_ON_RESUME:
        require(key not in given or given[key] == saved[key],
                f"--{key.replace('_', '-')} {given.get(key)} differs from the resumed run's "
                f"{saved[key]}: drop it to resume exactly, or start a new run in another --out")
    return {**saved, **{k: v for k, v in given.items() if k not in FIXED_ON_RESUME}}


@dataclass(frozen=True)
class RunState:
    """Everything a run needs to continue after `step` updates (replaced, never mutated)."""
    step: int
    params: dict      # flat, by Hugging Face name
    adam: dict        # optim.adam_init / adam_update state
    rng_state: dict   # bit_generator state of the batch sampler


def new_run(hp, corpus, xp):
    """(cfg, RunState at step 0): fresh weights from the seed; vocab from the tokenizer."""
    cfg = get_preset(hp["preset"], vocab_size=corpus.n_vocab)
    params = flatten_params(init_params(cfg, seed=hp["seed"], dtype=get_dtype(hp["dtype"]), xp=xp))
    rng = np.random.default_rng([1, hp["seed"]])
    return cfg, RunState(0, params, adam_init(params), rng.bit_generator.state)


def resume_run(ckpt, given, corpus, xp):
    """(hp, cfg, RunState) from the checkpoint in the output directory."""
    arrays, meta = load_checkpoint(ckpt)
    npz = checkpoint_paths(ckpt)[0]
    require(meta.get("kind") == "decoder" and "step" in meta and _hparams_ok(meta.get("extra")),
            f"checkpoint {npz} was not written by `refimpl pretrain` (or its metadata is corrupt): "
            "pass its own --out to resume")
    for key, now in (("tokenizer_sha256", corpus.tokenizer_sha256), ("data_hash", corpus.data_hash)):
        require(meta.get(key) == now, f"checkpoint {npz} was trained with other data ({key} "
                f"{str(meta.get(key))[:12]}... vs {now[:12]}...): restore that data, or start a new run")
    hp = resolve_hparams(given, meta["extra"]["hparams"])
    cfg = decoder_config(meta, npz)
    check_decoder_shapes(arrays, cfg, npz)
    params = flatten_params(unflatten_params({n: to_xp(arrays[n], xp) for n in param_shapes(cfg)},
                                             cfg.n_layers))
    optimizer = meta.get("optimizer") if isinstance(meta.get("optimizer"), dict) else {}
    adam = state_from_arrays(arrays, list(params), optimizer.get("step"), xp, where=npz)
    try:
        _sampler(meta["rng"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RefimplError(f"checkpoint {npz} has no usable rng state ({type(e).__name__}): "
                           "it cannot be resumed exactly; start a new run") from None
    return hp, cfg, RunState(int(meta["step"]), params, adam, meta["rng"])


def _hparams_ok(extra):
    """True if checkpoint metadata "extra" holds hparams of the shape pretrain writes."""
    hp = extra.get("hparams") if isinstance(extra, dict) else None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    return (isinstance(hp, dict) and hp.get("preset") in PRESETS and hp.get("dtype") in DTYPES
            and all(number(hp.get(k)) for k in DEFAULTS if k not in ("preset", "dtype")))


def _sampler(rng_state):
    """A numpy Generator positioned at rng_state."""
    name = rng_state["bit_generator"]
    if name not in ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937"):
        raise ValueError(f"unknown bit generator {name!r}")
    rng = np.random.Generator(getattr(np.random, name)())
    rng.bit_generator.state = rng_state
    return rng


def train_step(state, cfg, hp, tokens, xp, decay):
    """One Adam update on a fresh batch -> (new RunState, loss, gradient norm before clipping).

    The new state is None when the loss or the gradient norm is not finite.
    """
    rng = _sampler(state.rng_state)
    batch = xp.asarray(sample_batch(tokens, hp["batch_size"], hp["seq_len"] + 1, rng))  # [B, T+1]
    loss, grads, _ = value_and_grad(
        lambda boxed: lm_loss(unflatten_params(boxed, cfg.n_layers), cfg, batch), state.params)
    loss = float(loss)
    grads, norm = clip_by_global_norm(grads, hp["clip"])
    if not (math.isfinite(loss) and math.isfinite(norm)):
        return None, loss, norm
    lr = lr_schedule(state.step, hp["lr"], hp["warmup"], hp["steps"])
    params, adam = adam_update(state.params, grads, state.adam, lr, *BETAS, ADAM_EPS,
                               hp["weight_decay"], decay)
    return RunState(state.step + 1, params, adam, rng.bit_generator.state), loss, norm


def save_run(ckpt, state, cfg, hp, corpus):
    """Write the checkpoint pair of a RunState (weights, Adam state, sampler state, hparams)."""
    meta = {"step": state.step, "rng": state.rng_state, "dtype": hp["dtype"],
            "tokenizer_sha256": corpus.tokenizer_sha256, "data_hash": corpus.data_hash,
            "optimizer": {"name": "adam", "step": state.adam["step"], "beta1": BETAS[0],
                          "beta2": BETAS[1], "eps": ADAM_EPS},
            "extra": {"command": "pretrain", "hparams": hp}}
    save_decoder(ckpt, state.params, cfg, meta, state_to_arrays(state.adam))


def eval_record(state, cfg, val, metrics, tokens_per_s):
    """Held-out loss at state.step, with the mean training loss since the previous record."""
    val_loss = evaluate(unflatten_params(state.params, cfg.n_layers), cfg, val)
    prev = metrics["evals"][-1]["step"] if metrics["evals"] else 0
    window = [x for x in metrics["train_loss"][prev:state.step] if x is not None]
    return {"step": state.step, "train_loss": sum(window) / len(window) if window else None,
            "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
            "tokens_per_s": tokens_per_s}


def pretrain(out, resume=False, stop_after=None, backend="numpy", stream=None, **given):
    """Train (or resume) a decoder in directory `out`; returns the metrics dict."""
    xp, out = get_xp(backend), Path(out)
    ckpt, metrics_path = out / "ckpt", out / "metrics.json"
    require(checkpoint_exists(ckpt) == resume, (
        f"no checkpoint in {out} to resume: drop --resume to start a new run, or pass the right --out"
        if resume else f"{out} already holds a checkpoint: pass --resume to continue it, or "
                       "choose another --out"))
    hp = None if resume else resolve_hparams(given)   # bad options fail before data loads
    corpus = load_corpus()
    if resume:
        hp, cfg, state = resume_run(ckpt, given, corpus, xp)
        metrics = _resumed_metrics(metrics_path, state.step)
    else:
        cfg, state = new_run(hp, corpus, xp)
        metrics = {"evals": [], "train_loss": []}
    metrics["hparams"] = hp
    stop = min(hp["steps"], stop_after or hp["steps"])
    require(state.step < stop, f"{out} is already at step {state.step} (of --steps {hp['steps']}): "
                               "pass a larger --steps (or --stop-after) to train further")
    val = eval_batches(corpus.val, hp, xp)
    decay = {n for n, p in state.params.items() if p.ndim == 2}   # no decay on norm weights
    bar = Progress(hp["steps"], start=state.step, label="pretrain", stream=stream)
    bar.write(f"pretrain: {hp['preset']} decoder ({sum(int(p.size) for p in state.params.values()):,} "
              f"params, vocab {cfg.vocab_size}), batch {hp['batch_size']}x{hp['seq_len']}, steps "
              f"{state.step}->{stop} of {hp['steps']}, {hp['dtype']}, {backend}; writing {out}/")
    out.mkdir(parents=True, exist_ok=True)

    def evaluate_now(tokens_per_s):
        rec = eval_record(state, cfg, val, metrics, tokens_per_s)
        metrics["evals"].append(rec)
        atomic_write_json(metrics_path, metrics)
        train = "" if rec["train_loss"] is None else f"train loss {rec['train_loss']:.4f} | "
        bar.write(f"step {rec['step']}: {train}val loss {rec['val_loss']:.4f} | "
                  f"val ppl {rec['val_ppl']:.2f}")

    if state.step == 0:
        evaluate_now(None)
    saved_step = state.step if resume else None
    n_tokens, seconds = 0, 0.0
    try:
        while state.step < stop:
            t0 = time.perf_counter()
            new, loss, norm = train_step(state, cfg, hp, corpus.train, xp, decay)
            if new is None:
                raise RefimplError(_nonfinite_message(state.step + 1, loss, norm, ckpt, saved_step))
            metrics["train_loss"].append(loss)
            state = new                       # the one commit point of a step (Ctrl-C safe)
            n_tokens += hp["batch_size"] * hp["seq_len"]
            seconds += time.perf_counter() - t0
            tok_s = n_tokens / seconds
            bar.update(state.step, loss=loss, **{"tok/s": f"{tok_s:,.0f}"})
            if state.step % hp["eval_every"] == 0 or state.step == hp["steps"]:
                evaluate_now(tok_s)
                n_tokens, seconds = 0, 0.0
            if state.step % hp["save_every"] == 0 or state.step == stop:
                atomic_write_json(metrics_path, metrics)   # first: a resume cuts it back
                save_run(ckpt, state, cfg, hp, corpus)
                saved_step = state.step
    except KeyboardInterrupt:
        bar.close()
        del metrics["train_loss"][state.step:]
        if saved_step != state.step:
            atomic_write_json(metrics_path, metrics)
            save_run(ckpt, state, cfg, hp, corpus)
        raise RefimplError(f"interrupted after step {state.step}: checkpoint saved in {out}/; "
                           f"continue with `refimpl pretrain --out {out} --resume`") from None
    bar.close()
    last = metrics["evals"][-1] if metrics["evals"] else {"val_loss": math.nan, "step": None}
    bar.write(f"pretrain: done at step {state.step}; val loss {last['val_loss']:.4f} at step "
              f"{last['step']}; checkpoint {checkpoint_paths(ckpt)[0]}")
    return metrics



def _nonfinite_message(step, loss, norm, ckpt, saved_step):
    what, value = ("training loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    kept = (f"the last good checkpoint {checkpoint_paths(ckpt)[0]} (step {saved_step}) is "
            "untouched" if saved_step is not None else "no checkpoint was written")
    return (f"step {step}: the {what} is {value} (not finite); training stopped and {kept}: "
            "lower --lr or --clip and start again (or --resume)")


def _resumed_metrics(path, step):
    """The metrics of the run so far, cut back to the checkpoint's step."""
    try:
        metrics = json.loads(path.read_text())
        metrics["evals"] = [e for e in metrics["evals"] if e["step"] <= step]
        metrics["train_loss"] = metrics["train_loss"][:step]
        if len(metrics["train_loss"]) == step:
            return metrics
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {"evals": [], "train_loss": [None] * step}  # history lost; the training stays exact
