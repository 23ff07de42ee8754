"""The memory model: the peak memory of a run, estimated from its sizes before anything is allocated.

A training step keeps autograd's tape (per slot and layer: block input, two normed inputs, q and k after RoPE,
v, attention output, merged heads, the MLP's gate, up and gated activations: 9·D + 3·F numbers), the
read-outs' logits, the cache, the weights and Adam state, and the larger of the backward pass and the Adam
update. `preflight` refuses, in one line, a run that cannot fit (docs/robustness.md)."""
import math
import os

from .errors import RefimplError, require

PROCESS_BYTES = 60 * 2**20      # python, numpy, autograd, tiktoken and the data: 56 MB measured (bench probe)
TAPE_FACTOR = 1.15              # measured: NumPy temporaries and the allocator on top of the arrays counted
ADAM_CHUNK = 2**23              # elements Adam updates at once (training.optim.CHUNK)
ENV_AVAILABLE = "REFIMPL_MEMORY_AVAILABLE"
GB = 1e9
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class Estimate(dict):          # {part: bytes} of a run's peak: the process, and {part: numbers} * itemsize
    def __init__(self, numbers, itemsize):
        super().__init__({"process": PROCESS_BYTES, **{k: v * itemsize for k, v in numbers.items()}})

    @property
    def total(self):
        return sum(self.values())


def decoder_size(cfg):
    """Parameters of the decoder: embedding, L blocks (attention, MLP, two norms), final norm."""
    D, F, Dkv = cfg.d_model, cfg.d_ff, cfg.kv_heads * cfg.head_dim
    return cfg.vocab_size * D + cfg.n_layers * (2 * D * D + 2 * D * Dkv + 3 * D * F + 2 * D) + D


def _layer(cfg, slots):
    # one layer's forward or backward working set (and what the tape keeps per layer)
    return slots * (9 * cfg.d_model + 3 * cfg.d_ff)


def _cache(cfg, batch, length):
    return 2 * cfg.n_layers * batch * length * cfg.kv_heads * cfg.head_dim


def _backward_or_update(cfg, slots, logits, scores, n_trainable):
    # the larger transient: the backward pass (autograd's tape through L blocks and the final norm, the
    # logits, the largest block of attention scores) or Adam's update (the gradients, the new weights and
    # moments, one chunk's flat copies and temporaries), each with the allocator's share
    tape = TAPE_FACTOR * (cfg.n_layers * _layer(cfg, slots) + slots * cfg.d_model)
    return max(tape + logits + scores, TAPE_FACTOR * (4 * n_trainable + 6 * min(n_trainable, ADAM_CHUNK)))


def train_step(cfg, batch_size, seq_len, n_traces, n_latents, n_ahead, mode="coprocessor", itemsize=4):
    """One coprocessor (or pause-token) training step, in the cached form."""
    B, T, K, G = batch_size, seq_len, n_traces, n_latents + n_ahead - 1
    pause = mode == "pause"
    slots = B * K * (G + (0 if pause else n_latents))
    trainable = n_latents * cfg.d_model + (0 if pause else decoder_size(cfg) - cfg.vocab_size * cfg.d_model)
    run = math.ceil(K / 4)                                   # the largest run of traces (layout.context_runs)
    peak = _backward_or_update(cfg, slots, B * K * n_ahead * cfg.vocab_size,
                               2 * B * cfg.n_heads * run * G * (T + G), trainable)
    return Estimate({"decoder weights": decoder_size(cfg),
                     "coprocessor weights and Adam state": 3 * trainable, "decoder cache": _cache(cfg, B, T),
                     "backward pass or Adam update, the larger": peak}, itemsize)


def pretrain_step(cfg, batch_size, seq_len, itemsize=4):
    """One decoder pretraining step: every weight trains."""
    B, T, P = batch_size, seq_len, decoder_size(cfg)
    peak = _backward_or_update(cfg, B * T, B * T * cfg.vocab_size, 2 * B * cfg.n_heads * T * T, P)
    return Estimate({"weights and Adam state": 3 * P, "backward pass or Adam update, the larger": peak},
                    itemsize)


def evaluation(cfg, batch_size, seq_len, n_traces, n_latents, horizon, itemsize=4):
    """The held-out measurement: the loss forms without a tape."""
    B, T, K, G = batch_size, seq_len, n_traces, n_latents + horizon - 1
    return Estimate({"weights": 2 * decoder_size(cfg), "decoder cache": _cache(cfg, B, T),
                     "one layer": _layer(cfg, B * K * G) + B * cfg.n_heads * math.ceil(K / 4) * G * (T + G),
                     "read-out logits": 2 * B * K * horizon * cfg.vocab_size}, itemsize)


def generation(cfg, batch_size, prompt_len, max_new_tokens, n_latents, itemsize=4):
    """Decoding a batch of prompts, with N_L latents appended once."""
    B, P, T = batch_size, prompt_len, prompt_len + max_new_tokens + n_latents
    return Estimate({"weights": 2 * decoder_size(cfg), "decoder cache": 2 * _cache(cfg, B, T),
                     "prompt pass": _layer(cfg, B * P) + B * cfg.n_heads * P * P,
                     "logits": B * max(P, n_latents) * cfg.vocab_size}, itemsize)


# The pre-flight check
def available_bytes(backend="numpy"):
    """REFIMPL_MEMORY_AVAILABLE (bytes, or e.g. '21.9GB'), else the GPU's free memory (cupy) or
    MemAvailable of /proc/meminfo; None where it cannot be read."""
    pinned = os.environ.get(ENV_AVAILABLE)
    if pinned:
        text = pinned.strip().upper()
        number = text.rstrip("KMGTIB")
        try:
            return int(float(number) * UNITS[text[len(number):].strip()])
        except (ValueError, KeyError):
            raise RefimplError(f"{ENV_AVAILABLE}={pinned!r} is not a size: use bytes or e.g. 2GB") from None
    if backend == "cupy":
        from .backend import get_xp
        return get_xp("cupy").cuda.runtime.memGetInfo()[0]
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None


def preflight(estimate_of, sizes, available, adjustable, backend_word="memory"):
    """Refuse, in one line, a run whose estimate_of(**sizes) exceeds `available` (None: no check). Of the
    `adjustable` sizes, the one whose reduction to 1 saves the most "dominates": the line gives its largest
    fit."""
    need = estimate_of(**sizes).total
    if available is None or need <= available:
        return
    needs = f"this run needs about {need / GB:.1f} GB of {backend_word}"
    has = f"{available / GB:.1f} GB is available"
    if not adjustable:
        raise RefimplError(f"{needs}; {has}; force=True skips this check")
    top = max(adjustable, key=lambda n: need - estimate_of(**{**sizes, n: 1}).total)
    lo, hi = 0, sizes[top]                                   # lo fits (0: none), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate_of(**{**sizes, top: mid}).total <= available else (lo, mid)
    others = [f"{n}={sizes[n]}" for n in adjustable if n != top and sizes[n] > 1]
    rest = ", ".join(f"{n} {v}" for n, v in sizes.items() if n != top)
    use = f"use {top}={lo} or less" if lo else f"no {top} fits with the other sizes ({rest})"
    raise RefimplError(f"{needs} ({top}={sizes[top]} dominates); {has}: {use}"
                       + (f", or lower one of {', '.join(others)}" if others else "")
                       + "; force=True skips this check")


def check_fits(estimate_of, sizes, adjustable, backend="numpy", force=False):
    require(isinstance(force, bool), "force must be True or False")
    if not force:
        preflight(estimate_of, sizes, available_bytes(backend), adjustable,
                  "GPU memory" if backend == "cupy" else "memory")
