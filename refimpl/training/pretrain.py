"""`refimpl pretrain`: train the decoder from scratch on the pretraining mixture (loop.run does the loop):
next-token cross-entropy on B windows of T + 1 tokens, weight decay on the matrices only, evaluated on the
first eval_batches val windows. DIR/ckpt.npz + .json (every save_every steps and at the stop): weights,
Adam's state, rng state, hyperparameters; DIR/metrics.json: {"evals", "train_loss" (per step), "hparams"}.
"""
import math
from pathlib import Path

import numpy as np

from ..backend import DTYPES, get_dtype, get_xp, to_numpy, to_xp, xp_of
from ..config import PRESETS, get_preset
from ..core.checks import host_tokens
from ..core.decoder import flatten_params, hidden, init_params, lm_head, param_shapes, unflatten_params
from ..core.ops import cross_entropy, mean
from ..data.corpus import iter_eval_batches, sample_batch
from ..errors import require
from ..files import NUMBER
from . import loop
from .checkpoint import adam_from_arrays, adam_to_arrays, read_decoder, save_decoder
from .optim import adam_init

DEFAULTS = {"preset": "nano", "steps": 2000, "batch_size": 16, "seq_len": None, "lr": 3e-3,
            "warmup": None, "weight_decay": 0.1, "clip": 1.0, "eval_every": 100,
            "eval_batches": 8, "save_every": 500, "seed": 0, "dtype": "float32"}
# what changes the arithmetic: a resumed run must keep the checkpoint's values
FIXED_ON_RESUME = [k for k in DEFAULTS if k not in ("steps", "eval_every", "eval_batches", "save_every")]


def lm_nll(params, cfg, batch):
    """Next-token cross-entropy of the decoder on host token windows int [B, T + 1] -> [B, T]."""
    batch = xp_of(params["embed_tokens"]).asarray(host_tokens(batch, cfg))   # checked on the host
    h, _ = hidden(params, cfg, batch[:, :-1])                                # [B, T, D]
    return cross_entropy(lm_head(params, h), batch[:, 1:])                   # [B, T, V] -> [B, T]


def lm_loss(params, cfg, batch):
    """Mean next-token cross-entropy on token windows [B, T + 1] -> scalar (the training loss)."""
    return mean(lm_nll(params, cfg, batch))


METRICS = {"evals": [{"step": int}], "train_loss": [(*NUMBER, type(None))], "hparams": dict}  # what is read


class Pretraining:
    label, unit, METRICS = "pretrain", "tok", METRICS

    def __init__(self, out, hp, cfg, corpus, stop, params):
        self.out, self.hp, self.cfg, self.corpus = out, hp, cfg, corpus
        self.ckpt, self.metrics_path = out / "ckpt.npz", out / "metrics.json"
        self.slots = hp["batch_size"] * hp["seq_len"]
        windows = iter_eval_batches(corpus.val, hp["batch_size"], hp["seq_len"] + 1)
        self.val = [b for _, b in zip(range(hp["eval_batches"]), windows)]      # host [B, T + 1] each
        matrices = frozenset(n for n, p in params.items() if p.ndim == 2)      # no decay on norm weights
        same = ("steps", "lr", "warmup", "clip", "weight_decay", "eval_every", "save_every")
        self.schedule = loop.Schedule(**{k: hp[k] for k in same}, stop=stop, eval_at=hp["steps"],
                                      eval_first=True, decay=matrices)

    def header(self, state):
        n, hp = sum(int(p.size) for p in state.trainable.values()), self.hp
        return (f"pretrain: {hp['preset']} decoder ({n:,} params, vocab {self.cfg.vocab_size}), batch "
                f"{hp['batch_size']}x{hp['seq_len']}, steps {state.step}->{self.schedule.stop} of "
                f"{hp['steps']}, {hp['dtype']}, {xp_of(*state.trainable.values()).__name__}; "
                f"writing {self.out}/")

    def sample(self, rng):
        return sample_batch(self.corpus.train, self.hp["batch_size"], self.hp["seq_len"] + 1, rng)  # [B, T+1]

    def loss(self, params, batch):
        return lm_loss(unflatten_params(params, self.cfg.n_layers), self.cfg, batch), None

    def evaluate(self, state, metrics, rate):
        """The token-weighted val loss, and the mean training loss since the last evaluation."""
        params = unflatten_params(state.trainable, self.cfg.n_layers)
        total = sum(float(to_numpy(lm_nll(params, self.cfg, b)).astype(np.float64).sum()) for b in self.val)
        val_loss = total / sum(b[:, 1:].size for b in self.val)
        prev = metrics["evals"][-1]["step"] if metrics["evals"] else 0
        window = [h["loss"] for h in metrics["history"] if prev < h["step"] <= state.step]
        return {"step": state.step, "train_loss": sum(window) / len(window) if window else None,
                "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "tokens_per_s": rate}

    def describe(self, rec):
        train = "" if rec["train_loss"] is None else f"train loss {rec['train_loss']:.4f} | "
        return f"{train}val loss {rec['val_loss']:.4f} | val ppl {rec['val_ppl']:.2f}"

    def metrics_json(self, metrics, step):
        losses = {h["step"]: h["loss"] for h in metrics["history"]}
        return {"evals": metrics["evals"], "train_loss": [losses.get(s) for s in range(1, step + 1)],
                "hparams": self.hp}

    def read_metrics(self, saved):
        losses = enumerate(saved["train_loss"], 1)
        return saved["evals"], [{"step": step, "loss": x} for step, x in losses if x is not None]

    def save(self, state):
        meta = {"step": state.step, "rng": state.rng_state, "dtype": self.hp["dtype"],
                "tokenizer_sha256": self.corpus.tokenizer_sha256, "data_hash": self.corpus.data_hash,
                "optimizer": {"name": "adam", "step": state.adam["step"], "beta1": loop.BETAS[0],
                              "beta2": loop.BETAS[1], "eps": loop.EPS},
                "extra": {"command": "pretrain", "hparams": self.hp}}
        save_decoder(self.ckpt, state.trainable, self.cfg, meta, adam_to_arrays(state.adam))


def new_hparams(given):
    hp = {**DEFAULTS, **given}
    cfg = get_preset(hp["preset"])
    hp["seq_len"] = hp["seq_len"] or cfg.max_seq_len
    hp["warmup"] = min(100, hp["steps"] // 10) if hp["warmup"] is None else hp["warmup"]
    require(hp["seq_len"] <= cfg.max_seq_len, f"seq_len={hp['seq_len']} exceeds the {hp['preset']} preset's"
            f" max_seq_len {cfg.max_seq_len}: use seq_len={cfg.max_seq_len} or less")
    return hp


def resume_run(ckpt, given, corpus, xp):
    """(hp, cfg, State) from the checkpoint in the output directory."""
    arrays, cfg, meta = read_decoder(ckpt)                 # metadata fields of the right types (or absent)
    saved = meta.get("extra", {}).get("hparams")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    require("step" in meta and isinstance(saved, dict)
            and saved.get("preset") in PRESETS and saved.get("dtype") in DTYPES
            and all(number(saved.get(k)) for k in DEFAULTS if k not in ("preset", "dtype"))
            and cfg == get_preset(saved["preset"], vocab_size=corpus.n_vocab),
            f"checkpoint {ckpt} was not written by `refimpl pretrain` (or its metadata is corrupt: hparams, "
            "or a config that is not its preset's): resume a directory that pretraining wrote")
    loop.check_resumed(meta, corpus, {k: given[k] for k in FIXED_ON_RESUME if k in given}, saved, ckpt)
    hp = {**saved, **{k: v for k, v in given.items() if k not in FIXED_ON_RESUME}}   # steps may grow
    params = {n: to_xp(arrays[n], xp) for n in param_shapes(cfg)}
    params = flatten_params(unflatten_params(params, cfg.n_layers))   # in the order of a new run's
    adam = adam_from_arrays(arrays, meta.get("optimizer", {}).get("step"), xp)
    return hp, cfg, loop.resumed_state(meta["step"], params, adam, meta.get("rng"), f"checkpoint {ckpt}")


def pretrain(out, resume=False, stop_after=None, backend="numpy", stream=None, **given):
    """Train (or resume) a decoder in directory `out`; returns the metrics dict."""
    xp, out = get_xp(backend), Path(out)
    loop.check_out(out, out / "ckpt", resume, "checkpoint")
    hp = None if resume else new_hparams(given)   # bad options fail before data loads
    corpus = loop.load_corpus()
    if resume:
        hp, cfg, state = resume_run(out / "ckpt.npz", given, corpus, xp)
    else:                                          # fresh weights from the seed; vocab from the tokenizer
        cfg = get_preset(hp["preset"], vocab_size=corpus.n_vocab)
        params = flatten_params(init_params(cfg, seed=hp["seed"], dtype=get_dtype(hp["dtype"]), xp=xp))
        rng = np.random.default_rng([1, hp["seed"]])
        state = loop.State(0, params, adam_init(params), rng.bit_generator.state)
    stop = min(hp["steps"], stop_after or hp["steps"])
    loop.check_unfinished(out, state.step, stop, hp["steps"], "pass more steps to train further")
    task = Pretraining(out, hp, cfg, corpus, stop, state.trainable)
    state, metrics, _ = loop.run(task, state, resume, stream)
    return task.metrics_json(metrics, state.step)
