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

from .autodiff import value_and_grad
from .backend import get_dtype, get_xp, to_numpy, to_xp
from .checkpoint import load_checkpoint, load_decoder, save_checkpoint
from .coprocessor import INITS, MODES, init_coprocessor
from .errors import RefimplError, require
from .evaluate import ahead_nll, embedding_norm, heldout_set, mean_row_norm, relative_ppl_change
from .objective import loss_cached
from .optim import adam_init, adam_update, clip_by_global_norm, lr_schedule
from .progress import Progress
from .traces import sample_trace_positions

ADAM_M, ADAM_V = "adam.m.", "adam.v."


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
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8

    def validate(self):
        for name in ("n_latents", "n_ahead", "n_traces", "batch_size", "eval_batches"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        require(self.steps >= 0 and self.seq_len >= 0 and self.eval_every >= 0,
                "--steps, --seq-len and --eval-every must be >= 0")
        require(self.lr > 0 and self.clip > 0, "--lr and --clip must be > 0")
        require(self.mode in MODES, f"unknown --mode {self.mode!r}: use one of {', '.join(MODES)}")
        require(self.init in INITS, f"unknown --init {self.init!r}: use one of {', '.join(INITS)}")


def train_step(dec_params, trainable, adam, cfg, tc, tokens, positions, lr):
    """One update. Returns new trainable, new adam state, and host stats (loss, norms)."""
    def loss_fn(t):
        loss, out = loss_cached(dec_params, t, cfg, tokens, positions, tc.n_latents, tc.n_ahead)
        return loss, {"latents": getval(out["latents"])}

    loss, grads, aux = value_and_grad(loss_fn, trainable)
    loss = float(to_numpy(loss))
    grads, grad_norm = clip_by_global_norm(grads, tc.clip)
    step = adam["step"]
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise RefimplError(f"training diverged at step {step + 1}: the {name} is {value}; the last good "
                               "checkpoint is kept; lower --lr or --clip and resume from it")
    trainable, adam = adam_update(trainable, grads, adam, lr, weight_decay=tc.weight_decay)
    return trainable, adam, {"loss": loss, "grad_norm": grad_norm,
                             "latent_norm": mean_row_norm(aux["latents"])}


# ---------------------------------------------------------------------------------------------
# Checkpoints of the trainable part
def save_coprocessor(path, trainable, adam, meta):
    arrays = {k: to_numpy(v) for k, v in trainable.items()}
    arrays.update({ADAM_M + k: to_numpy(v) for k, v in adam["m"].items()})
    arrays.update({ADAM_V + k: to_numpy(v) for k, v in adam["v"].items()})
    save_checkpoint(path, arrays, {**meta, "kind": "coprocessor", "step": adam["step"]})


def load_coprocessor(path, want_decoder_hash, dtype=np.float32, xp=np):
    """(trainable, adam state, meta) of a coprocessor checkpoint; refused unless it was trained
    against the decoder whose stored hash is want_decoder_hash (the decoder checkpoint's meta)."""
    arrays, meta = load_checkpoint(path)
    require(meta.get("kind") == "coprocessor",
            f"{path} is a {meta.get('kind')!r} checkpoint, not a coprocessor: pass a file written by `refimpl train`")
    want = want_decoder_hash
    require(meta.get("decoder_hash") == want,
            f"coprocessor {path} was trained against another decoder (hash {str(meta.get('decoder_hash'))[:12]}, "
            f"this one is {want[:12]}): pass the decoder it was trained with, or retrain it")
    load = lambda a: to_xp(a, xp, dtype)
    trainable = {k: load(v) for k, v in arrays.items() if not k.startswith(("adam.",))}
    adam = {"m": {k[len(ADAM_M):]: load(v) for k, v in arrays.items() if k.startswith(ADAM_M)},
            "v": {k[len(ADAM_V):]: load(v) for k, v in arrays.items() if k.startswith(ADAM_V)},
            "step": int(meta["step"])}
    return trainable, adam, meta


# ---------------------------------------------------------------------------------------------
# The run
def train(decoder_path, tc, out_dir, backend="numpy", dtype="float32", resume=False, quiet=False,
          stop_after=None):
    """Train, evaluate on held-out data, and write out_dir/{coprocessor.npz, .json, metrics.json}.

    stop_after: stop (and save) after this step, keeping the LR schedule of tc.steps; continue
    with resume=True. The resumed run is bit-identical to an uninterrupted one.
    """
    from .data import data_hash, load_tokens
    from .tokenizer import load_tokenizer
    tc.validate()
    xp, dt = get_xp(backend), get_dtype(dtype)
    dec_params, cfg, dec_meta = load_decoder(decoder_path, dt, xp)
    T = tc.seq_len or cfg.max_seq_len
    require(T <= cfg.max_seq_len, f"--seq-len {T} exceeds the decoder's max_seq_len={cfg.max_seq_len}")
    sample_trace_positions(np.random.default_rng(0), 1, T, tc.n_traces, tc.n_ahead)  # validates K, N_A vs T
    tok = load_tokenizer()
    train_tokens, val_tokens = load_tokens("train", tok), load_tokens("val", tok)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "coprocessor.npz"
    dec_hash = dec_meta["decoder_hash"]
    meta = {"train_config": asdict(tc), "config": cfg.to_dict(), "decoder_hash": dec_hash,
            "decoder_path": str(decoder_path), "mode": tc.mode, "init": tc.init,
            "n_latents": tc.n_latents, "n_ahead": tc.n_ahead, "seq_len": T,
            "tokenizer_sha256": tok.sha256, "data_hash": data_hash()}
    rng = np.random.default_rng(tc.seed)
    history = []
    if resume:
        trainable, adam, old = load_coprocessor(ckpt, dec_hash, dt, xp)
        require(old["train_config"] == asdict(tc), f"--resume with different options than {ckpt} was "
                f"trained with: rerun with the same options ({old['train_config']})")
        rng.bit_generator.state = old["rng_state"]
        history = json.loads((out_dir / "metrics.json").read_text())["history"] if (out_dir / "metrics.json").exists() else []
        history = [h for h in history if h["step"] <= adam["step"]]
    else:
        trainable = init_coprocessor(dec_params, cfg, tc.n_latents, tc.init, tc.mode, tc.seed)
        adam = adam_init(trainable)
    heldout = heldout_set(val_tokens, tc.eval_batches, tc.batch_size, T, tc.n_traces, tc.n_ahead)
    base_nll = ahead_nll(dec_params, None, cfg, heldout, 0, tc.n_ahead)
    evals = []
    progress = Progress(tc.steps, start=adam["step"], label=f"train {tc.mode} N_L={tc.n_latents}",
                        stream=io.StringIO() if quiet else None)
    t0, tokens_done = time.perf_counter(), 0
    end = min(tc.steps, stop_after or tc.steps)
    while adam["step"] < end:
        step = adam["step"]
        tokens = sample_batch_for(train_tokens, tc, T, rng)
        positions = sample_trace_positions(rng, tc.batch_size, T, tc.n_traces, tc.n_ahead)
        lr = lr_schedule(step, tc.lr, tc.warmup, tc.steps)
        trainable, adam, stats = train_step(dec_params, trainable, adam, cfg, tc,
                                            xp.asarray(tokens), positions, lr)
        tokens_done += tc.batch_size * tc.n_traces * (tc.n_latents + tc.n_ahead)
        history.append({"step": adam["step"], "lr": lr, **stats})
        elapsed = time.perf_counter() - t0
        progress.update(adam["step"], loss=stats["loss"], latent_norm=stats["latent_norm"],
                        grad_norm=stats["grad_norm"], slots_per_s=tokens_done / elapsed)
        last = adam["step"] == end
        if (tc.eval_every and adam["step"] % tc.eval_every == 0) or last:
            save_coprocessor(ckpt, trainable, adam, {**meta, "rng_state": rng.bit_generator.state})
            aug = ahead_nll(dec_params, trainable, cfg, heldout, tc.n_latents, tc.n_ahead)
            evals.append({"step": adam["step"], "heldout_loss": float(aug.mean()), "ahead_loss": aug.tolist()})
    progress.close()
    aug_nll = ahead_nll(dec_params, trainable, cfg, heldout, tc.n_latents, tc.n_ahead)
    metrics = {
        "mode": tc.mode, "init": tc.init, "n_latents": tc.n_latents, "n_ahead": tc.n_ahead,
        "steps": adam["step"], "train_config": asdict(tc), "decoder_path": str(decoder_path),
        "baseline_ahead_loss": base_nll.tolist(), "augmented_ahead_loss": aug_nll.tolist(),
        "baseline_heldout_loss": float(base_nll.mean()), "augmented_heldout_loss": float(aug_nll.mean()),
        "relative_ppl_change_pct": relative_ppl_change(base_nll, aug_nll).tolist(),
        "embedding_norm": embedding_norm(dec_params), "evals": evals, "history": history,
        "train_seconds": time.perf_counter() - t0,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if not resume or adam["step"] > 0:
        save_coprocessor(ckpt, trainable, adam, {**meta, "rng_state": rng.bit_generator.state})
    return metrics


def sample_batch_for(train_tokens, tc, T, rng):
    from .data import sample_batch
    return sample_batch(train_tokens, tc.batch_size, T, rng)


# ---------------------------------------------------------------------------------------------
# CLI
def add_arguments(p):
    d = TrainConfig()
    p.add_argument("--decoder", default=None, help="frozen decoder checkpoint (.npz); default: the shipped one")
    p.add_argument("--out", required=True, help="output directory")
    for name in ("n_latents", "n_ahead", "n_traces", "batch_size", "seq_len", "steps", "warmup",
                 "seed", "eval_every", "eval_batches"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "clip"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--init", choices=INITS, default=d.init, help="coprocessor init: copy of the decoder or random")
    p.add_argument("--mode", choices=MODES, default=d.mode, help="coprocessor, or the pause-token baseline")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop (and save) after this step, keeping the schedule of --steps")
    p.add_argument("--quiet", action="store_true")


def run(args):
    from .data import TINY_DATA
    names = [f for f in TrainConfig.__dataclass_fields__]
    tc = TrainConfig(**{k: getattr(args, k) for k in names})
    decoder = args.decoder or TINY_DATA / "checkpoints" / "decoder-demo.npz"
    m = train(decoder, tc, args.out, args.backend, args.dtype, args.resume, args.quiet, args.stop_after)
    print(f"held-out ahead-token loss: decoder alone {m['baseline_heldout_loss']:.4f}, "
          f"augmented {m['augmented_heldout_loss']:.4f} "
          f"(position 1: {m['relative_ppl_change_pct'][0]:+.2f}% perplexity)")
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'coprocessor.npz'}")
    return 0
