"""Adam(W) with explicit state {"m": {name: array}, "v": {name: array}, "step": int} (a checkpoint holds
it), the learning-rate schedule, global-norm clipping. Pure functions on NumPy or CuPy; Python-float
scalars keep float32 float32 (NEP 50). AdamW (Kingma & Ba 2015; decoupled decay, Loshchilov & Hutter 2019):
    m <- b1 m + (1 - b1) g           v <- b2 v + (1 - b2) g^2
    p <- p - lr wd p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""
import math
from functools import reduce
from itertools import accumulate, pairwise
from operator import add

import numpy as np

from ..backend import xp_of

CHUNK = 2**23   # Adam updates the parameters in flat chunks of at most this many elements (or one array)


def adam_init(params_flat):
    return {"m": {k: xp_of(p).zeros_like(p) for k, p in params_flat.items()},
            "v": {k: xp_of(p).zeros_like(p) for k, p in params_flat.items()}, "step": 0}


def adam_update(params_flat, grads_flat, state, lr, beta1=0.9, beta2=0.95, eps=1e-8,
                weight_decay=0.0, decay=None, grad_scale=None):
    """One bias-corrected Adam(W) step -> (new params, new state), in flat chunks of at most CHUNK elements
    (15 array operations per chunk, not 13 per parameter; bit-identical; new arrays are views of a chunk).
    A None gradient keeps value and moments. decay: the names that get weight decay (None: all);
    grad_scale: a 0-d device array the gradients are multiplied by first (clip_scale), or None."""
    t, decayed = state["step"] + 1, 1.0 - float(lr) * float(weight_decay)
    hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), t, grad_scale)
    new_p, new_m, new_v = dict(params_flat), dict(state["m"]), dict(state["v"])
    for names in _chunks([n for n in params_flat if grads_flat.get(n) is not None], params_flat):
        like = [params_flat[n] for n in names]
        xp, offsets = xp_of(like[0]), [0, *accumulate(a.size for a in like)]
        factors = np.concatenate([np.full(a.size, decayed if decay is None or n in decay else 1.0)
                                  for n, a in zip(names, like)])                      # host float64 [N]
        flat = [xp.concatenate([tree[n].reshape(-1) for n in names])                  # p, g, m, v [N]
                for tree in (params_flat, grads_flat, state["m"], state["v"])]
        for out, new in zip((new_p, new_m, new_v), _adam_flat(*flat, hyper, factors)):
            out.update((n, new[i:j].reshape(a.shape)) for n, (i, j), a in zip(names, pairwise(offsets), like))
    return new_p, {"m": new_m, "v": new_v, "step": t}


def _adam_flat(p, g, m, v, hyper, decay_factors):
    # the AdamW update of flat vectors p, g, m, v [N] -> new p, m, v [N]
    lr, beta1, beta2, eps, wd, t, grad_scale = hyper
    xp = xp_of(p)
    if grad_scale is not None:
        g = g * grad_scale.astype(g.dtype)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    if wd:
        p = p * xp.asarray(decay_factors, dtype=p.dtype)
    p = p - (lr / (1.0 - beta1 ** t)) * m / (xp.sqrt(v) * (1.0 / math.sqrt(1.0 - beta2 ** t)) + eps)
    return p, m, v


def _chunks(names, params):
    # consecutive names grouped so that each group holds at most CHUNK elements (or one array)
    groups, size = [], CHUNK
    for n in names:
        if size + params[n].size > CHUNK:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += params[n].size
    return groups


def lr_schedule(step, peak_lr, warmup, total, min_ratio=0.1):
    """Learning rate of update number `step` (0-based), a Python float: linear warmup to peak_lr over
    `warmup` updates, then cosine decay to min_ratio * peak_lr at `total`."""
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def global_norm(grads):
    """sqrt of the sum of squares of every gradient, added in dict order: a 0-d float64 device array."""
    xp = xp_of(*grads.values())
    squares = [xp.square(g, dtype=xp.float64).sum() for g in grads.values() if g is not None]
    return xp.sqrt(reduce(add, squares, xp.zeros((), xp.float64)))


def clip_scale(norm, max_norm):
    """max_norm / (norm + 1e-6) where a finite norm exceeds max_norm, else 1 (None: clipping off), a 0-d
    float64 device array, cast to each gradient's dtype (the bits of a Python float)."""
    if not max_norm or max_norm <= 0:
        return None
    xp = xp_of(norm)
    return xp.where((norm > max_norm) & xp.isfinite(norm), float(max_norm) / (norm + 1e-6), 1.0)
