"""Adam(W) with explicit state, the learning-rate schedule, and global-norm gradient clipping.

autograd.misc.optimizers.adam hides its state inside a closure, so a run using it cannot be
checkpointed. Here the state is a plain value: {"m": {name: array}, "v": {name: array},
"step": int}. Every function is pure (it returns new arrays and never writes into its inputs)
and runs on NumPy or CuPy arrays alike (`xp_of`). Parameters and gradients are flat dicts keyed
by name (the Hugging Face names of `decoder.flatten_params` for decoder weights).

Arithmetic keeps the parameters' dtype: Adam's scalars are Python floats, which NumPy 2 (NEP 50)
casts to the array's dtype, never NumPy float64 scalars, which would promote float32 to float64.
Clipping stays on the device: the norm is a 0-d float64 array, and the scale is cast to each
gradient's dtype, which is what NEP 50 does with a Python float (bit-identical).

Update (Kingma & Ba 2015; decoupled weight decay as in Loshchilov & Hutter 2019, "AdamW"):
    m <- b1 m + (1 - b1) g           v <- b2 v + (1 - b2) g^2
    p <- p - lr wd p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""
import math
from functools import reduce
from itertools import accumulate
from operator import add

import numpy as np

from ..backend import xp_of
from ..errors import require


def adam_init(params_flat):
    """Zero first and second moments for every parameter, step 0."""
    def zeros(p):
        return xp_of(p).zeros_like(p)
    return {"m": {k: zeros(p) for k, p in params_flat.items()},
            "v": {k: zeros(p) for k, p in params_flat.items()}, "step": 0}


CHUNK = 2**23   # Adam updates the parameters in flat chunks of at most this many elements (or one array)


def adam_update(params_flat, grads_flat, state, lr, beta1=0.9, beta2=0.95, eps=1e-8,
                weight_decay=0.0, decay=None, grad_scale=None):
    """One bias-corrected Adam(W) step -> (new params, new state).

    The parameters with a gradient are updated in a few flat chunks (CHUNK elements, 32 MB in
    float32): each element gets the same arithmetic as in a per-array update (bit-identical,
    tests/test_optim.py), in 15 array operations per chunk instead of 13 per parameter, and the
    chunk bounds the temporaries. The new arrays are views into their chunk. A parameter whose
    gradient is None (no path to the loss) keeps its value and moments. decay: names to apply weight
    decay to (default: all). grad_scale: a 0-d device array the gradients are multiplied by first
    (clip_scale), or None.
    """
    t = state["step"] + 1
    new_p, new_m, new_v = dict(params_flat), dict(state["m"]), dict(state["v"])
    live = [n for n in params_flat if grads_flat.get(n) is not None]
    hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), t, grad_scale)
    for names in _chunks(live, params_flat):
        trees = (params_flat, grads_flat, state["m"], state["v"])
        p, m, v = _adam_flat(*(_flat([tree[n] for n in names]) for tree in trees), hyper,
                             _decay_factors(params_flat, names, decay, 1.0 - float(lr) * float(weight_decay)))
        for out, flat in ((new_p, p), (new_m, m), (new_v, v)):
            out.update(zip(names, _unflat(flat, [params_flat[n] for n in names])))
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


def _flat(arrays):
    # [a_1, ..., a_n] -> one 1-d array
    return xp_of(arrays[0]).concatenate([a.reshape(-1) for a in arrays])


def _unflat(flat, like):
    # one 1-d array -> views shaped like `like`
    offsets = [0] + list(accumulate(a.size for a in like))
    return [flat[i:j].reshape(a.shape) for i, j, a in zip(offsets, offsets[1:], like)]


def _decay_factors(params, names, decay, factor):
    # host float64 [N]: factor on the elements of decayed parameters, 1 elsewhere
    return np.concatenate([np.full(params[n].size, factor if decay is None or n in decay else 1.0) for n in names])


def lr_schedule(step, peak_lr, warmup, total, min_ratio=0.1):
    """Learning rate of update number `step` (0-based): linear warmup to peak_lr over `warmup`
    updates, then cosine decay to min_ratio * peak_lr at `total`. A Python float."""
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def global_norm(grads):
    """sqrt of the sum of squares of every gradient: a 0-d float64 array on the gradients' device.

    The per-array sums are added in dict order, one after the other, in float64; nothing is read
    back to the host.
    """
    xp = xp_of(*grads.values())
    squares = [xp.square(g, dtype=xp.float64).sum() for g in grads.values() if g is not None]
    return xp.sqrt(reduce(add, squares, xp.zeros((), xp.float64)))


def clip_scale(norm, max_norm):
    """The clipping factor as a 0-d float64 device array: max_norm / (norm + 1e-6) where a finite
    norm exceeds max_norm, else 1; None when clipping is off (max_norm None or <= 0)."""
    if not max_norm or max_norm <= 0:
        return None
    xp = xp_of(norm)
    return xp.where((norm > max_norm) & xp.isfinite(norm), float(max_norm) / (norm + 1e-6), 1.0)


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by one factor so that their global norm is at most max_norm.

    Returns (grads, norm before clipping as a 0-d float64 device array). The scale is
    max_norm / (norm + 1e-6) where norm > max_norm, else 1, computed on the device; max_norm None
    or <= 0 disables clipping, and a non-finite norm leaves the gradients as they are.
    """
    norm = global_norm(grads)
    scale = clip_scale(norm, max_norm)
    if scale is None:
        return dict(grads), norm
    return {k: None if g is None else g * scale.astype(g.dtype) for k, g in grads.items()}, norm
