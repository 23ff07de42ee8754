"""`refimpl train`: train the coprocessor (or pause tokens) against a FROZEN decoder (SPEC §6).

Each step samples B windows of T tokens and K augmentation points per window, computes the
cached-form loss (objective.loss_cached) and its gradient with respect to the coprocessor's
arrays and soft tokens only; the decoder's arrays are constants that autograd never sees as
variables. Adam(W) with warmup and cosine decay, global-norm clipping, a NaN/inf guard.

A checkpoint holds only the trainable arrays, Adam's state, the step, the data RNG state, and
the hash of the frozen decoder; loading it against another decoder is refused.
"""
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from autograd.tracer import getval

from ..backend import get_dtype, get_xp, to_numpy
from ..core.coprocessor import INITS, MODES, init_coprocessor
from ..core.layout import AHEAD_POSITIONS, sample_trace_positions
from ..core.objective import loss_cached
from ..data.corpus import data_hash, load_tokens, sample_batch
from ..data.tokenizer import load_tokenizer
from ..errors import RefimplError, require
from .autodiff import value_and_grad
from .checkpoint import (
    atomic_write_json,
    check_tokenizer,
    checkpoint_exists,
    load_coprocessor,
    load_decoder,
    save_coprocessor,
)
from .heldout import ahead_nll, embedding_norm, heldout_set, mean_row_norm, relative_ppl_change
from .optim import adam_init, adam_update, clip_by_global_norm, lr_schedule
from .progress import Progress


@dataclass(frozen=True)
class TrainConfig:
    n_latents: int = 16
    n_ahead: int = 16
    n_traces: int = 16
    batch_size: int = 8
    seq_len: int = 0          # 0: the decoder's max_seq_len
    steps: int = 300
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    init: str = "copy"
    mode: str = "coprocessor"
    ahead_positions: str = "original"   # the ahead tokens keep their positions, or "continue" after the latents
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8

    def validate(self):
        for name in ("n_latents", "n_ahead", "n_traces", "batch_size", "eval_batches"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "seq_len", "eval_every", "warmup", "seed"):
            require(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        require(0 < self.lr < math.inf and 0 < self.clip < math.inf and 0 <= self.weight_decay < math.inf,
                "--lr and --clip must be finite and > 0, --weight-decay finite and >= 0")
        require(self.mode in MODES, f"unknown --mode {self.mode!r}: use one of {', '.join(MODES)}")
        require(self.init in INITS, f"unknown --init {self.init!r}: use one of {', '.join(INITS)}")
        require(self.ahead_positions in AHEAD_POSITIONS, f"unknown --ahead-positions {self.ahead_positions!r}: "
                f"use one of {', '.join(AHEAD_POSITIONS)}")


def train_step(dec_params, trainable, adam, cfg, tc, tokens, positions, lr,
               kept="the last good checkpoint is kept"):
    """One update. Returns new trainable, new adam state, and host stats (loss, norms).

    A non-finite loss or gradient norm raises RefimplError before any update; `kept` says which
    checkpoint is left (for the message)."""
    def loss_fn(t):
        loss, out = loss_cached(dec_params, t, cfg, tokens, positions, tc.n_latents, tc.n_ahead,
                                tc.ahead_positions)
        return loss, {"latents": getval(out["latents"])}

    loss, grads, aux = value_and_grad(loss_fn, trainable)
    loss = float(to_numpy(loss))
    grads, grad_norm = clip_by_global_norm(grads, tc.clip)
    step = adam["step"]
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise RefimplError(f"training diverged at step {step + 1}: the {name} is {value} (not finite); "
                               f"{kept}: lower --lr or --clip, then --resume or start again")
    trainable, adam = adam_update(trainable, grads, adam, lr, weight_decay=tc.weight_decay)
    return trainable, adam, {"loss": loss, "grad_norm": grad_norm,
                             "latent_norm": mean_row_norm(aux["latents"])}








# ---------------------------------------------------------------------------------------------
# The run
def train(decoder_path, tc, out_dir, backend="numpy", dtype="float32", resume=False, quiet=False,
          stop_after=None):
    """Train, evaluate on held-out data, and write out_dir/{coprocessor.npz, .json, metrics.json}.

    stop_after: stop (and save) after this step, keeping the LR schedule of tc.steps; continue
    with resume=True. The resumed run is bit-identical to an uninterrupted one.
    """
    tc.validate()
    require(stop_after is None or stop_after >= 1, f"--stop-after must be >= 1, got {stop_after}")
    xp, dt = get_xp(backend), get_dtype(dtype)
    dec_params, cfg, dec_meta = load_decoder(decoder_path, dt, xp)
    T = tc.seq_len or cfg.max_seq_len
    require(T <= cfg.max_seq_len, f"--seq-len {T} exceeds the decoder's max_seq_len={cfg.max_seq_len}")
    sample_trace_positions(np.random.default_rng(0), 1, T, tc.n_traces, tc.n_ahead)  # validates K, N_A vs T
    tok = load_tokenizer()
    check_tokenizer(dec_meta, tok.sha256, decoder_path)
    out_dir = Path(out_dir)
    ckpt, metrics_path = out_dir / "coprocessor.npz", out_dir / "metrics.json"
    require(not resume or checkpoint_exists(ckpt), f"no coprocessor checkpoint in {out_dir} to resume: "
            "drop --resume to start a new run, or pass the right --out")
    train_tokens, val_tokens = load_tokens("train", tok), load_tokens("val", tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    dec_hash = dec_meta["decoder_hash"]
    meta = {"train_config": asdict(tc), "config": cfg.to_dict(), "decoder_hash": dec_hash,
            "decoder_path": str(decoder_path), "mode": tc.mode, "init": tc.init,
            "n_latents": tc.n_latents, "n_ahead": tc.n_ahead, "seq_len": T,
            "tokenizer_sha256": tok.sha256, "data_hash": data_hash()}
    rng = np.random.default_rng(tc.seed)
    history, evals, saved_step = [], [], None
    if resume:
        trainable, adam, old = load_coprocessor(ckpt, dec_hash, dt, xp)
        now = asdict(tc)
        differ = [f"--{k.replace('_', '-')} {now.get(k)} vs {old['train_config'].get(k)}"
                  for k in sorted(set(now) | set(old["train_config"])) if now.get(k) != old["train_config"].get(k)]
        require(not differ, f"--resume with other options than {ckpt} was trained with "
                            f"({', '.join(differ)}): rerun with the options it was trained with")
        for key, current in (("tokenizer_sha256", tok.sha256), ("data_hash", meta["data_hash"])):
            require(old.get(key) == current, f"coprocessor {ckpt} was trained with other data ({key} "
                    f"{str(old.get(key))[:12]}... vs {current[:12]}...): restore that data, or start a new run")
        try:
            rng.bit_generator.state = old["rng_state"]
        except (KeyError, TypeError, ValueError) as e:
            raise RefimplError(f"coprocessor {ckpt} has no usable rng_state ({type(e).__name__}): it "
                               "cannot be resumed exactly; start a new run") from None
        history, evals = _resumed_metrics(metrics_path, adam["step"])
        saved_step = adam["step"]
    else:
        trainable = init_coprocessor(dec_params, cfg, tc.n_latents, tc.init, tc.mode, tc.seed)
        adam = adam_init(trainable)
    heldout = heldout_set(val_tokens, tc.eval_batches, tc.batch_size, T, tc.n_traces, tc.n_ahead)
    base_nll = ahead_nll(dec_params, None, cfg, heldout, 0, tc.n_ahead)
    progress = Progress(tc.steps, start=adam["step"], label=f"train {tc.mode} N_L={tc.n_latents}",
                        stream=io.StringIO() if quiet else None)
    t0, tokens_done = time.perf_counter(), 0
    end = min(tc.steps, stop_after or tc.steps)
    while adam["step"] < end:
        step = adam["step"]
        tokens = sample_batch(train_tokens, tc.batch_size, T, rng)
        positions = sample_trace_positions(rng, tc.batch_size, T, tc.n_traces, tc.n_ahead)
        lr = lr_schedule(step, tc.lr, tc.warmup, tc.steps)
        kept = ("no checkpoint was written" if saved_step is None else
                f"the last good checkpoint {ckpt} (step {saved_step}) is untouched")
        trainable, adam, stats = train_step(dec_params, trainable, adam, cfg, tc,
                                            xp.asarray(tokens), positions, lr, kept)
        tokens_done += tc.batch_size * tc.n_traces * (tc.n_latents + tc.n_ahead)
        history.append({"step": adam["step"], "lr": lr, **stats})
        elapsed = time.perf_counter() - t0
        progress.update(adam["step"], loss=stats["loss"], latent_norm=stats["latent_norm"],
                        grad_norm=stats["grad_norm"], slots_per_s=tokens_done / elapsed)
        last = adam["step"] == end
        if (tc.eval_every and adam["step"] % tc.eval_every == 0) or last:
            aug = ahead_nll(dec_params, trainable, cfg, heldout, tc.n_latents, tc.n_ahead, tc.ahead_positions)
            evals.append({"step": adam["step"], "heldout_loss": float(aug.mean()), "ahead_loss": aug.tolist()})
            # metrics first: a kill before the checkpoint leaves them ahead, and --resume cuts them back
            atomic_write_json(metrics_path, {"partial": True, "step": adam["step"], "train_config": asdict(tc),
                                             "evals": evals, "history": history})  # no "steps" until done
            save_coprocessor(ckpt, trainable, adam, {**meta, "rng_state": rng.bit_generator.state})
            saved_step = adam["step"]
    progress.close()
    aug_nll = ahead_nll(dec_params, trainable, cfg, heldout, tc.n_latents, tc.n_ahead, tc.ahead_positions)
    metrics = {
        "mode": tc.mode, "init": tc.init, "n_latents": tc.n_latents, "n_ahead": tc.n_ahead,
        "steps": adam["step"], "train_config": asdict(tc), "decoder_path": str(decoder_path),
        "baseline_ahead_loss": base_nll.tolist(), "augmented_ahead_loss": aug_nll.tolist(),
        "baseline_heldout_loss": float(base_nll.mean()), "augmented_heldout_loss": float(aug_nll.mean()),
        "relative_ppl_change_pct": relative_ppl_change(base_nll, aug_nll).tolist(),
        "embedding_norm": embedding_norm(dec_params), "evals": evals, "history": history,
        "train_seconds": time.perf_counter() - t0,
    }
    atomic_write_json(metrics_path, metrics)
    if not resume or adam["step"] > 0:
        save_coprocessor(ckpt, trainable, adam, {**meta, "rng_state": rng.bit_generator.state})
    return metrics


def _resumed_metrics(path, step):
    """(history, evals) of the run so far from metrics.json, cut back to the checkpoint's step."""
    try:
        m = json.loads(path.read_text())
        return ([h for h in m["history"] if h["step"] <= step],
                [e for e in m.get("evals", []) if e["step"] <= step])
    except (OSError, ValueError, KeyError, TypeError):
        return [], []   # history lost; the training itself stays exact


