"""The one training loop of `refimpl pretrain` and `refimpl train`. Per step: a batch, loss and gradients on
the arrays' device, ONE read to the host (loss, gradient norm, latent norm, weights finite: anything
non-finite stops the run, the last checkpoint untouched), Adam. Evaluation every eval_every steps; every
save_every steps metrics.json, then the checkpoint. Ctrl-C saves first. A resume is bit for bit."""
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from autograd.tracer import getval

from ..backend import to_numpy, xp_of
from ..data.corpus import data_hash, load_tokens
from ..data.tokenizer import load_tokenizer
from ..errors import RefimplError, require
from ..files import atomic_write_json, check_schema, finite_json, read_json
from .autodiff import value_and_grad
from .checkpoint import checkpoint_paths
from .heldout import row_norm
from .optim import adam_update, clip_scale, global_norm, lr_schedule

BETAS, EPS = (0.9, 0.95), 1e-8
BIT_GENERATORS = {n: getattr(np.random, n) for n in ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")}


@dataclass(frozen=True)
class State:
    """Everything a run needs to continue after `step` updates (replaced, never mutated)."""
    step: int
    trainable: dict   # flat {name: array}: what the optimizer moves
    adam: dict        # optim.adam_init / adam_update state
    rng_state: dict   # bit_generator state of the batch sampler


@dataclass(frozen=True)
class Schedule:
    steps: int                  # the LR schedule's length (warmup, then cosine decay)
    stop: int                   # this run trains up to this step
    lr: float                   # peak learning rate
    warmup: int
    clip: float                 # max global gradient norm (0: off)
    weight_decay: float
    eval_every: int             # 0: only at eval_at
    save_every: int             # 0: only at stop
    eval_at: int                # a step that is always evaluated
    eval_first: bool = False    # evaluate the untrained state of a new run too
    decay: frozenset = None     # names that get weight decay (None: all)


def update(loss_fn, trainable, adam, lr, clip, weight_decay=0.0, decay=None, kept="no update was made"):
    """One Adam(W) update of loss_fn(boxed trainable) -> (loss, latents or None): (trainable, adam, stats
    {"loss", "grad_norm"[, "latent_norm"]}); a non-finite stat raises (`kept`: what is left)."""
    def traced(boxed):
        loss, latents = loss_fn(boxed)
        return loss, {} if latents is None else {"latent_norm": row_norm(getval(latents))}

    loss, grads, aux = value_and_grad(traced, trainable)
    norm = global_norm(grads)                                   # one device reduction
    xp = xp_of(norm)
    host = to_numpy(xp.stack([xp.asarray(loss, dtype=xp.float64), norm, all_finite(trainable),  # the one read
                              *aux.values()]))
    stats = dict(zip(("loss", "grad_norm", "finite", *aux), host.tolist()))
    require(stats.pop("finite") == 1, f"training diverged at step {adam['step']}: its update left weights "
                                      f"that are not finite; {kept}")
    for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
        require(math.isfinite(stats[key]), f"training diverged at step {adam['step'] + 1}: the {what} is "
                                           f"{stats[key]} (not finite); {kept}")
    trainable, adam = adam_update(trainable, grads, adam, lr, *BETAS, EPS, weight_decay, decay,
                                  grad_scale=clip_scale(norm, clip))
    return trainable, adam, stats


def all_finite(arrays):
    """A device scalar: 1 if every array in {name: array} is finite (the next step's read reports it)."""
    xp = xp_of(*arrays.values())
    return xp.stack([xp.isfinite(a).all() for a in arrays.values()]).all()


def run(task, state, resumed=False, stream=None):
    """Train from state (resumed: from the checkpoint in task.out) to task.schedule.stop -> (final state,
    metrics {"evals": [...], "history": [...]}, step of the checkpoint on disk)."""
    sched, saved = task.schedule, state.step if resumed else None
    bar = Progress(sched.steps, start=state.step, label=task.label, stream=stream)
    bar.write(task.header(state))
    metrics = resumed_metrics(task, state.step, bar.write) if resumed else {"evals": [], "history": []}
    n_slots, seconds = 0, 0.0
    try:
        if state.step == 0 and sched.eval_first:
            _evaluate(task, state, metrics, bar, None, saved)
        while state.step < sched.stop:
            t0 = time.perf_counter()
            state, stats = _step(task, state, saved)
            metrics["history"].append({"step": state.step, **stats})
            n_slots, seconds = n_slots + task.slots, seconds + time.perf_counter() - t0
            rate = n_slots / seconds
            bar.update(state.step, **{k: v for k, v in stats.items() if k != "lr"},
                       **{f"{task.unit}/s": f"{rate:,.0f}"})
            if sched.eval_every and state.step % sched.eval_every == 0 or state.step == sched.eval_at:
                _evaluate(task, state, metrics, bar, rate, saved)
                n_slots, seconds = 0, 0.0
            if sched.save_every and state.step % sched.save_every == 0 or state.step == sched.stop:
                _save(task, state, metrics, saved)
                saved = state.step
    except KeyboardInterrupt:
        bar.close()
        metrics["history"][:] = [h for h in metrics["history"] if h["step"] <= state.step]
        if saved != state.step:
            _save(task, state, metrics, saved)
        raise RefimplError(f"interrupted after step {state.step}: checkpoint saved in {task.out}/; "
                           "resume it to continue") from None
    bar.close()
    last = metrics["evals"][-1] if metrics["evals"] else None
    evaluated = f"; last evaluation (step {last['step']}): {task.describe(last)}" if last else ""
    bar.write(f"{task.label}: done at step {state.step}{evaluated}; checkpoint {task.ckpt}")
    return state, metrics, saved


def _step(task, state, saved):
    """One update on a fresh batch -> (new state, {"lr", "loss", "grad_norm"[, "latent_norm"]})."""
    sched, rng = task.schedule, sampler(state.rng_state, "the run")
    batch = task.sample(rng)
    lr = lr_schedule(state.step, sched.lr, sched.warmup, sched.steps)
    trainable, adam, stats = update(lambda t: task.loss(t, batch), state.trainable, state.adam, lr,
                                    sched.clip, sched.weight_decay, sched.decay, _advice(task, saved))
    return State(state.step + 1, trainable, adam, rng.bit_generator.state), {"lr": lr, **stats}


def _advice(task, saved):
    """What a diverged run leaves, and the flag most likely at fault."""
    sched = task.schedule
    kept = (f"the last good checkpoint {task.ckpt} (step {saved}) is untouched" if saved is not None
            else "no checkpoint was written")
    culprit = (f"weight_decay={sched.weight_decay}" if sched.lr * sched.weight_decay >= 1 < sched.weight_decay
               else f"lr={sched.lr}")      # decoupled decay multiplies the weights by 1 - lr x weight_decay
    return f"{kept}: lower {culprit} (or clip={sched.clip}), then resume or start again"


def _evaluate(task, state, metrics, bar, rate, saved):
    _check_weights(task, state, saved)
    record = task.evaluate(state, metrics, rate)
    require(finite_json(record), f"training diverged at step {state.step}: the held-out evaluation is not "
            f"finite ({task.describe(record)}); {_advice(task, saved)}")
    metrics["evals"].append(record)
    atomic_write_json(task.metrics_path, task.metrics_json(metrics, state.step))
    bar.write(f"step {record['step']}: {task.describe(record)}")


def _check_weights(task, state, saved):
    require(to_numpy(all_finite(state.trainable)) == 1, f"training diverged at step {state.step}: its update "
            f"left weights that are not finite; {_advice(task, saved)}")


def _save(task, state, metrics, saved):
    _check_weights(task, state, saved)
    atomic_write_json(task.metrics_path, task.metrics_json(metrics, state.step))  # first: a resume cuts back
    task.save(state)


# Data, and the checks of a resumed run
@dataclass(frozen=True)
class Corpus:
    n_vocab: int
    tokenizer_sha256: str
    data_hash: str
    train: np.ndarray   # int32 [N]
    val: np.ndarray     # int32 [M]


def load_corpus(tokenizer=None, source="mixture"):
    """The splits of a data source (corpus.SOURCES) as ids of `tokenizer` (default: the shipped one), and
    the hashes of the data and the tokenizer."""
    tok = tokenizer or load_tokenizer()
    return Corpus(tok.n_vocab, tok.sha256, data_hash(), *(load_tokens(s, tok, source) for s in ("train", "val")))


RUNS = {"ckpt.json": "a decoder run (`refimpl pretrain`)",
        "coprocessor.json": "a coprocessor run (`refimpl train`)"}


def check_out(out, ckpt, resume, what):
    """A resumed run needs its checkpoint `ckpt` in out; a new one refuses to replace it; neither writes into
    a directory that holds a run of the other kind."""
    exists = any(p.exists() for p in checkpoint_paths(ckpt))
    other = [kind for name, kind in RUNS.items() if name != checkpoint_paths(ckpt)[1].name
             and (out / name).exists()]
    require(not other, f"{out} holds {other[0] if other else ''}, whose metrics.json this run would "
                       "overwrite: choose another output directory")
    require(exists or not resume, f"no {what} in {out} to resume: start a new run, or check the directory")
    require(resume or not exists, f"{out} already holds a {what}: resume it, or choose another output "
                                  "directory")


def check_unfinished(out, step, stop, steps, fix):
    """A resumed run must have steps left: one that is done changes nothing."""
    require(step < stop, f"{out} is already at step {step} of steps={steps}"
                         f"{'' if stop == steps else f' (stop {stop})'}: nothing was changed; {fix}")


def check_resumed(meta, corpus, given, saved, where):
    """A resumed run reads its data and keeps the hyperparameters in `given` as `saved` (its first ones)."""
    for key, now in (("tokenizer_sha256", corpus.tokenizer_sha256), ("data_hash", corpus.data_hash)):
        require(meta.get(key) == now, f"{where} was trained with other data ({key} {str(meta.get(key))[:12]}"
                                      f"... vs {now[:12]}...): restore that data, or start a new run")
    differ = "; ".join(f"{k}={v} differs from the resumed run's {saved.get(k)}"
                       for k, v in given.items() if v != saved.get(k))
    require(not differ, f"{differ} (in {where}): resume with the values it was started with, or start a new "
                        "run in another directory")


def resumed_state(step, trainable, adam, rng_state, where):
    """The State of a checkpoint (Adam's moments in the arrays' order), its Adam and rng state checked."""
    names = list(trainable)
    missing = [pre + n for n in names for pre, got in (("adam.m.", adam["m"]), ("adam.v.", adam["v"]))
               if n not in got or got[n].shape != trainable[n].shape]
    require(not missing, f"{where} lacks optimizer state {missing[:2]} (or it has another shape): it cannot "
                         "resume; start a new run")
    require(type(adam["step"]) is int and adam["step"] >= 0,
            f"{where} has optimizer step {adam['step']!r}: expected an int >= 0; the metadata is corrupt")
    adam = {**{key: {n: adam[key][n] for n in names} for key in ("m", "v")}, "step": adam["step"]}
    sampler(rng_state, where)
    return State(step, trainable, adam, rng_state)


def sampler(rng_state, where):
    """A numpy Generator positioned at rng_state (a bit_generator state), or a one-line error."""
    try:
        rng = np.random.Generator(BIT_GENERATORS[rng_state["bit_generator"]]())   # KeyError: not one of them
        rng.bit_generator.state = rng_state
        return rng
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise RefimplError(f"{where} has no usable rng state ({type(e).__name__}): it cannot be resumed "
                           "exactly; start a new run") from None


def resumed_metrics(task, step, warn):
    """The metrics so far, cut back to `step`; none, with a warning, if metrics.json is unreadable (training
    stays exact: only the record of the steps before is lost)."""
    try:
        fix = "the history before this resume is dropped"
        saved = check_schema(read_json(task.metrics_path, "run metrics", fix), task.METRICS, "run metrics", fix)
        evals, history = task.read_metrics(saved)
        return {"evals": [e for e in evals if e["step"] <= step],
                "history": [h for h in history if h["step"] <= step]}
    except (OSError, RefimplError, KeyError) as e:
        warn(f"warning: {e if isinstance(e, RefimplError) else f'{task.metrics_path} is unreadable ({e!r})'}")
        return {"evals": [], "history": []}


# The progress line
class Progress:
    """`label step 120/1000 | 0:12<1:28 | loss 2.31 | tok/s 5,120`: one line rewritten with \\r (at
    most every 0.1 s) on a terminal, else a plain line every tenth of the run."""

    def __init__(self, total, start=0, label="", stream=None):
        self.total, self.start, self.label, self.stream = total, start, label, stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every, self.t0, self.last, self.dirty = max(1, (total - start) // 10), time.time(), 0.0, False

    def update(self, step, **fields):
        now = time.time()
        if step < self.total and (now - self.last < 0.1 if self.tty else (step - self.start) % self.every):
            return
        self.last, elapsed, done = now, now - self.t0, step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        parts = [f"{self.label} step {step}/{self.total}", f"{_clock(elapsed)}<{_clock(eta)}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        line = " | ".join(parts)
        self._put(f"\r{line}\x1b[K" if self.tty else line + "\n", dirty=self.tty)

    def write(self, message):     # a permanent line that does not garble the bar
        self._put(("\r\x1b[K" if self.dirty else "") + message + "\n")

    def close(self):
        self._put("\n" if self.dirty else "")

    def _put(self, text, dirty=False):
        self.stream.write(text)
        self.stream.flush()
        self.dirty = dirty


def _clock(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
