"""`refimpl train`: train the coprocessor (or pause tokens) against a FROZEN decoder with the cached form
of the loss (paper §3.2; docs/method.md §4); loop.run does the loop. The held-out ahead-token loss (the
decoder alone once: the baseline) every eval_every steps and at the stop, each with DIR/coprocessor.npz +
.json; DIR/metrics.json is partial while training (docs/robustness.md), the full record at the end.
"""
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..backend import get_dtype, get_xp
from ..core.coprocessor import INITS, MODES, init_coprocessor
from ..core.layout import LATENT_POSITIONS, sample_trace_positions
from ..core.objective import loss_cached
from ..data.corpus import SOURCES, sample_batch
from ..errors import require
from ..files import NUMBER, atomic_write_json
from . import loop
from .checkpoint import check_train_config, load_coprocessor, load_model, save_coprocessor
from .heldout import ahead_nll, embedding_norm, heldout_set, relative_ppl_change
from .optim import adam_init


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
    latent_positions: str = "behind"    # latent j at max(0, p-N_L+1+j); "after": p+1+j (the ablation)
    data: str = "mixture"               # the windows' source (corpus.SOURCES); the CLI picks text for an LLM
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8

    def validate(self):
        for name in ("n_latents", "n_ahead", "n_traces", "batch_size", "eval_batches"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("steps", "seq_len", "eval_every", "warmup", "seed"):
            require(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        require(0 < self.lr < math.inf and 0 < self.clip < math.inf and 0 <= self.weight_decay < math.inf,
                f"lr={self.lr}, clip={self.clip}, weight_decay={self.weight_decay}: lr and clip must be "
                "finite and > 0, weight_decay finite and >= 0")
        for name, known in (("mode", MODES), ("init", INITS), ("latent_positions", LATENT_POSITIONS),
                            ("data", SOURCES)):
            require(getattr(self, name) in known, f"{name}={getattr(self, name)!r} is unknown: use one of "
                                                  f"{', '.join(known)}")


def saved_train_config(saved, source="the run"):
    """A run's saved train_config as today's TrainConfig fields (after checkpoint.check_train_config)."""
    return {**asdict(TrainConfig()), **check_train_config(saved, source)}


def coprocessor_loss(dec_params, trainable, cfg, tc, batch):
    """(loss, latents [B, K, N_L, D]) of the cached form on a batch (tokens [B, T], positions [B, K])."""
    tokens, positions = batch
    loss, out = loss_cached(dec_params, trainable, cfg, tokens, positions, tc.n_latents, tc.n_ahead,
                            tc.latent_positions)
    return loss, out["latents"]


def train_step(dec_params, trainable, adam, cfg, tc, tokens, positions, lr):
    """One update of the trainable arrays -> (trainable, adam, stats {"loss", "grad_norm", "latent_norm"})."""
    return loop.update(lambda t: coprocessor_loss(dec_params, t, cfg, tc, (tokens, positions)), trainable,
                       adam, lr, tc.clip, tc.weight_decay)


METRICS = {"evals": [{"step": int, "ahead_loss": [NUMBER], "heldout_loss": NUMBER}], "steps": int,  # as read
           "history": [{"step": int, "loss": NUMBER}], "baseline_ahead_loss": [NUMBER],
           "train_config": dict}


class CoprocessorTraining:
    unit, METRICS = "slot", METRICS

    def __init__(self, out, tc, T, stop, dec_params, cfg, meta, corpus):
        self.out, self.tc, self.T, self.dec_params, self.cfg, self.meta = out, tc, T, dec_params, cfg, meta
        self.label = f"train {tc.mode} N_L={tc.n_latents}"
        self.ckpt, self.metrics_path, self.corpus = out / "coprocessor.npz", out / "metrics.json", corpus
        self.slots = tc.batch_size * tc.n_traces * (tc.n_latents + tc.n_ahead)
        self.heldout = heldout_set(corpus.val, tc.eval_batches, tc.batch_size, T, tc.n_traces, tc.n_ahead)
        self.schedule = loop.Schedule(tc.steps, stop, tc.lr, tc.warmup, tc.clip, tc.weight_decay,
                                      tc.eval_every, save_every=tc.eval_every, eval_at=stop)
        self.baseline = None      # the decoder alone on the held-out set, [N_A] (set before the loop)

    def first_state(self, resume, dtype, xp):
        """The checkpoint's State (checked against this run), or a new one."""
        tc, ckpt = self.tc, self.ckpt
        if not resume:
            trainable = init_coprocessor(self.dec_params, self.cfg, tc.n_latents, tc.init, tc.mode, tc.seed)
            rng = np.random.default_rng(tc.seed)
            return loop.State(0, trainable, adam_init(trainable), rng.bit_generator.state)
        trainable, adam, old = load_coprocessor(ckpt, self.meta["decoder_hash"], dtype, xp)
        saved = saved_train_config(old["train_config"], str(ckpt))
        loop.check_resumed(old, self.corpus, asdict(tc), saved, ckpt)
        return loop.resumed_state(adam["step"], trainable, adam, old.get("rng_state"), f"coprocessor {ckpt}")

    def ahead_nll(self, trainable):
        """Held-out nll per ahead position [N_A]: with these latents, or the decoder alone (None)."""
        n_latents = 0 if trainable is None else self.tc.n_latents
        return ahead_nll(self.dec_params, trainable, self.cfg, self.heldout, n_latents, self.tc.n_ahead,
                         self.tc.latent_positions)

    def header(self, state):
        n, tc = sum(int(a.size) for a in state.trainable.values()), self.tc
        return (f"train: {tc.mode} N_L={tc.n_latents} N_A={tc.n_ahead} ({n:,} trainable values), batch "
                f"{tc.batch_size}x{self.T}, K={tc.n_traces}, steps {state.step}->{self.schedule.stop} of "
                f"{tc.steps}; writing {self.out}/")

    def sample(self, rng):
        tokens = sample_batch(self.corpus.train, self.tc.batch_size, self.T, rng)                  # [B, T]
        return tokens, sample_trace_positions(rng, self.tc.batch_size, self.T, self.tc.n_traces,
                                              self.tc.n_ahead)                                    # [B, K]

    def loss(self, trainable, batch):
        return coprocessor_loss(self.dec_params, trainable, self.cfg, self.tc, batch)

    def evaluate(self, state, metrics, rate):
        aug = self.ahead_nll(state.trainable)
        return {"step": state.step, "heldout_loss": float(aug.mean()), "ahead_loss": aug.tolist()}

    def describe(self, rec):
        return f"held-out ahead loss {rec['heldout_loss']:.4f}"

    def metrics_json(self, metrics, step):   # no "steps" until the run is done
        base = {} if self.baseline is None else {"baseline_ahead_loss": self.baseline.tolist()}
        return {"partial": True, "step": step, "train_config": asdict(self.tc), **base, **metrics}

    def read_metrics(self, saved):
        return saved.get("evals", []), saved["history"]

    def save(self, state):
        save_coprocessor(self.ckpt, state.trainable, state.adam, {**self.meta, "rng_state": state.rng_state})


def train(decoder_path, tc, out_dir, backend="numpy", dtype="float32", resume=False, quiet=False,
          stop_after=None):
    """Train, evaluate, write out_dir/{coprocessor.npz, .json, metrics.json}. stop_after: stop (and save)
    there, keeping tc.steps' LR schedule; resume=True goes on, bit-identical to an uninterrupted run."""
    tc.validate()
    require(stop_after is None or stop_after >= 1, f"stop_after={stop_after} must be >= 1")
    xp, dt = get_xp(backend), get_dtype(dtype)
    dec_params, cfg, dec_meta, tokenizer = load_model(decoder_path, dt, xp)    # a real LLM brings its own
    T = tc.seq_len or cfg.max_seq_len
    require(T <= cfg.max_seq_len, f"seq_len={T} exceeds the decoder's max_seq_len={cfg.max_seq_len}")
    sample_trace_positions(np.random.default_rng(0), 1, T, tc.n_traces, tc.n_ahead)  # validates K, N_A vs T
    out_dir = Path(out_dir)
    loop.check_out(out_dir, out_dir / "coprocessor.npz", resume, "coprocessor checkpoint")
    corpus = loop.load_corpus(tokenizer, tc.data)
    meta = {"train_config": asdict(tc), "config": cfg.to_dict(), "decoder_hash": dec_meta["decoder_hash"],
            "decoder_path": str(decoder_path), "mode": tc.mode, "init": tc.init, "n_latents": tc.n_latents,
            "n_ahead": tc.n_ahead, "seq_len": T, "tokenizer_sha256": corpus.tokenizer_sha256,
            "data_hash": corpus.data_hash}
    task = CoprocessorTraining(out_dir, tc, T, min(tc.steps, stop_after or tc.steps), dec_params, cfg, meta,
                               corpus)
    first = [task.first_state(resume, dt, xp)]  # the loop then holds the only reference: step 1 frees it
    if resume:
        loop.check_unfinished(out_dir, first[0].step, task.schedule.stop, tc.steps, "steps also set the LR "
                              "schedule, so a longer run starts anew in another directory")
    base_nll = task.baseline = task.ahead_nll(None)
    t0 = time.perf_counter()
    state, metrics, saved = loop.run(task, first.pop(), resume, io.StringIO() if quiet else None)
    last = metrics["evals"][-1] if metrics["evals"] else {"step": None}
    aug_nll = np.array(last["ahead_loss"]) if last["step"] == state.step else task.ahead_nll(state.trainable)
    final = {
        **{k: meta[k] for k in ("mode", "init", "n_latents", "n_ahead", "train_config", "decoder_path")},
        "steps": state.step, "baseline_ahead_loss": base_nll.tolist(),
        "augmented_ahead_loss": aug_nll.tolist(),
        "baseline_heldout_loss": float(base_nll.mean()), "augmented_heldout_loss": float(aug_nll.mean()),
        "relative_ppl_change_pct": relative_ppl_change(base_nll, aug_nll).tolist(),
        "embedding_norm": embedding_norm(dec_params), **metrics, "train_seconds": time.perf_counter() - t0,
    }
    atomic_write_json(task.metrics_path, final)
    if saved != state.step:
        task.save(state)
    return final
