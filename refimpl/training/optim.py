"""Adam(W) with explicit state, the learning-rate schedule, and global-norm gradient clipping.

autograd.misc.optimizers.adam hides its state inside a closure, so a run using it cannot be
checkpointed. Here the state is a plain value: {"m": {name: array}, "v": {name: array},
"step": int}. Every function is pure (it returns new arrays and never writes into its inputs)
and runs on NumPy or CuPy arrays alike (`xp_of`). Parameters and gradients are flat dicts keyed
by name (the Hugging Face names of `decoder.flatten_params` for decoder weights).

Arithmetic keeps the parameters' dtype: every scalar is a Python float, never a NumPy float64
scalar, which would silently promote float32 arrays to float64 under NumPy 2 (STYLE.md, traps).

Update (Kingma & Ba 2015; decoupled weight decay as in Loshchilov & Hutter 2019, "AdamW"):
    m <- b1 m + (1 - b1) g           v <- b2 v + (1 - b2) g^2
    p <- p - lr wd p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""
import math

from ..backend import xp_of


def adam_init(params_flat):
    """Zero first and second moments for every parameter, step 0."""
    def zeros(p):
        return xp_of(p).zeros_like(p)
    return {"m": {k: zeros(p) for k, p in params_flat.items()},
            "v": {k: zeros(p) for k, p in params_flat.items()}, "step": 0}


def adam_update(params_flat, grads_flat, state, lr, beta1=0.9, beta2=0.95, eps=1e-8,
                weight_decay=0.0, decay=None):
    """One bias-corrected Adam(W) step -> (new params, new state).

    A parameter whose gradient is None (no path to the loss) keeps its value and moments.
    decay: names to apply weight decay to (default: all of them).
    """
    t = state["step"] + 1
    lr, beta1, beta2, eps, wd = float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)
    step_size = lr / (1.0 - beta1 ** t)
    inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** t)
    new_p, new_m, new_v = {}, {}, {}
    for name, p in params_flat.items():
        g, m, v = grads_flat.get(name), state["m"][name], state["v"][name]
        if g is None:
            new_p[name], new_m[name], new_v[name] = p, m, v
            continue
        xp = xp_of(p)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * (g * g)
        if wd and (decay is None or name in decay):
            p = p * (1.0 - lr * wd)
        p = p - step_size * m / (xp.sqrt(v) * inv_sqrt_bc2 + eps)
        new_p[name], new_m[name], new_v[name] = p, m, v
    return new_p, {"m": new_m, "v": new_v, "step": t}


def lr_schedule(step, peak_lr, warmup, total, min_ratio=0.1):
    """Learning rate of update number `step` (0-based): linear warmup to peak_lr over `warmup`
    updates, then cosine decay to min_ratio * peak_lr at `total`. A Python float."""
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def global_norm(grads):
    """sqrt of the sum of squares of every gradient (accumulated in float64), a Python float."""
    total = 0.0
    for g in grads.values():
        if g is not None:
            xp = xp_of(g)
            total += float(xp.square(g, dtype=xp.float64).sum())
    return math.sqrt(total)


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by one factor so that their global norm is at most max_norm.

    Returns (grads, norm before clipping). max_norm None or <= 0 disables clipping. A
    non-finite norm is returned as is, with the gradients untouched, for the caller to report.
    """
    norm = global_norm(grads)
    if not max_norm or max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return dict(grads), norm
    scale = float(max_norm) / (norm + 1e-6)
    return {k: None if g is None else g * scale for k, g in grads.items()}, norm




