"""The memory model: the peak memory of a run, estimated from its sizes before anything is allocated.

One model for every command. A training step keeps, until its backward pass has used them, the
arrays that autograd's tape holds for every op (per slot and layer: the block input, the two
normed inputs, q and k after RoPE, v, the attention output, its merged heads, the MLP's gate, up
and gated activations: 9·D + 3·F numbers), for the coprocessor's K·N_L soft slots and the
decoder's K·G group slots; the logits and softmax of every read-out; the decoder's cache; the
coprocessor's weights and Adam state; and the larger of two transients: the backward pass (the
tape, the logits, the largest block of attention scores) or the Adam update (the gradients, the new
weights and moments, and one chunk's flat copies and temporaries). Evaluation and generation keep no tape:
their peak is one layer's working set, the read-out logits and the cache. A fixed allowance covers
the interpreter, NumPy, autograd, the tokenizer and the data (PROCESS_BYTES, measured).

`preflight` compares an estimate with the memory available (Linux MemAvailable, a GPU's free
memory, or REFIMPL_MEMORY_AVAILABLE for tests) and refuses, with one line, a run that cannot fit.
docs/robustness.md has the estimate beside measured peaks.
"""
import math
import os
from dataclasses import dataclass

from .errors import RefimplError, require

PROCESS_BYTES = 60 * 2**20      # python, numpy, autograd, tiktoken and the data: 56 MB measured (bench probe)
TAPE_FACTOR = 1.15              # measured: NumPy temporaries and the allocator on top of the arrays counted
ADAM_CHUNK = 2**23              # elements Adam updates at once (training.optim.CHUNK)
ENV_AVAILABLE = "REFIMPL_MEMORY_AVAILABLE"
GB = 1e9


@dataclass(frozen=True)
class Estimate:
    parts: dict                 # name -> bytes

    @property
    def total(self):
        return sum(self.parts.values())


def decoder_size(cfg):
    """Parameters of the decoder: embedding, L blocks, final norm."""
    return cfg.vocab_size * cfg.d_model + cfg.n_layers * _block_size(cfg) + cfg.d_model


def _block_size(cfg):
    D, F, Dkv = cfg.d_model, cfg.d_ff, cfg.kv_heads * cfg.head_dim
    return 2 * D * D + 2 * D * Dkv + 3 * D * F + 2 * D


def _tape(cfg, slots):
    # numbers autograd keeps per slot through L blocks and the final norm
    return slots * (cfg.n_layers * (9 * cfg.d_model + 3 * cfg.d_ff) + cfg.d_model)


def _layer(cfg, slots):
    # one layer's forward or backward working set
    return slots * (9 * cfg.d_model + 3 * cfg.d_ff)


def _cache(cfg, batch, length):
    return 2 * cfg.n_layers * batch * length * cfg.kv_heads * cfg.head_dim


def train_step(cfg, batch_size, seq_len, n_traces, n_latents, n_ahead, mode="coprocessor", itemsize=4):
    """One coprocessor (or pause-token) training step, form B."""
    B, T, K = batch_size, seq_len, n_traces
    G, reads = n_latents + n_ahead - 1, batch_size * n_traces * n_ahead
    slots = B * K * (G + (0 if mode == "pause" else n_latents))
    trainable = n_latents * cfg.d_model + (0 if mode == "pause" else cfg.n_layers * _block_size(cfg) + cfg.d_model)
    run = math.ceil(K / 4)                                   # the largest run of traces (layout.context_runs)
    backward = TAPE_FACTOR * _tape(cfg, slots) + reads * cfg.vocab_size + 2 * B * cfg.n_heads * run * G * (T + G)
    return _estimate({
        "decoder weights": decoder_size(cfg),
        "coprocessor weights and Adam state": 3 * trainable,
        "decoder cache": _cache(cfg, B, T),
        "backward pass or Adam update, the larger": max(backward, _update(trainable)),
    }, itemsize)


def pretrain_step(cfg, batch_size, seq_len, itemsize=4):
    """One decoder pretraining step: every weight trains."""
    B, T, P = batch_size, seq_len, decoder_size(cfg)
    backward = TAPE_FACTOR * _tape(cfg, B * T) + B * T * cfg.vocab_size + 2 * B * cfg.n_heads * T * T
    return _estimate({"weights and Adam state": 3 * P, "backward pass or Adam update, the larger": max(backward, _update(P))},
                     itemsize)


def _update(n):
    # Adam's transient: the gradients, the new weights and moments, one chunk's flat copies and temporaries
    return TAPE_FACTOR * (4 * n + 6 * min(n, ADAM_CHUNK))


def evaluation(cfg, batch_size, seq_len, n_traces, n_latents, horizon, itemsize=4):
    """The held-out measurement: the loss forms without a tape."""
    B, T, K, G = batch_size, seq_len, n_traces, n_latents + horizon - 1
    numbers = {
        "weights": 2 * decoder_size(cfg),
        "decoder cache": _cache(cfg, B, T),
        "one layer": _layer(cfg, B * K * G) + B * cfg.n_heads * math.ceil(K / 4) * G * (T + G),
        "read-out logits": 2 * B * K * horizon * cfg.vocab_size,
    }
    return _estimate(numbers, itemsize)


def generation(cfg, batch_size, prompt_len, max_new_tokens, n_latents, itemsize=4):
    """Decoding a batch of prompts, with N_L latents appended once."""
    B, T = batch_size, prompt_len + max_new_tokens + n_latents
    numbers = {
        "weights": 2 * decoder_size(cfg),
        "decoder cache": 2 * _cache(cfg, B, T),
        "prompt pass": _layer(cfg, B * prompt_len) + B * cfg.n_heads * prompt_len * prompt_len,
        "logits": B * max(prompt_len, n_latents) * cfg.vocab_size,
    }
    return _estimate(numbers, itemsize)


def _estimate(numbers, itemsize):
    return Estimate({"process": PROCESS_BYTES, **{k: v * itemsize for k, v in numbers.items()}})


# ---------------------------------------------------------------------------------------------
# The pre-flight check
def available_bytes(backend="numpy"):
    """Memory this run may use: REFIMPL_MEMORY_AVAILABLE (bytes, or e.g. '21.9GB'), else the GPU's
    free memory (cupy) or MemAvailable of /proc/meminfo; None where it cannot be read."""
    pinned = os.environ.get(ENV_AVAILABLE)
    if pinned:
        return parse_bytes(pinned)
    if backend == "cupy":
        from .backend import get_xp
        free, _ = get_xp("cupy").cuda.runtime.memGetInfo()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parse_bytes(text):
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        return int(float(number) * units[t[len(number):].strip()])
    except (ValueError, KeyError):
        raise RefimplError(f"{ENV_AVAILABLE}={text!r} is not a size: use bytes or e.g. 21.9GB") from None


def preflight(estimate_of, sizes, available, adjustable, backend_word="memory"):
    """Refuse a run whose estimate exceeds the available memory, with one line.

    estimate_of(**sizes) -> Estimate; sizes: {name: value} of the run; adjustable: the size names a
    user can lower, in the order to suggest them. The size whose halving saves the most
    "dominates"; the message gives the largest value of it that fits. None available: no check.
    """
    if available is None or not adjustable and estimate_of(**sizes).total <= available:
        return
    if not adjustable:
        raise RefimplError(f"this run needs about {estimate_of(**sizes).total / GB:.1f} GB of {backend_word}; "
                           f"{available / GB:.1f} GB is available; force=True skips this check")
    need = estimate_of(**sizes).total
    if need <= available:
        return
    saving = {n: need - estimate_of(**{**sizes, n: max(1, sizes[n] // 2)}).total for n in adjustable}
    top = max(adjustable, key=lambda n: saving[n])
    fit = _largest_fit(estimate_of, sizes, top, available)
    others = [f"{n}={sizes[n]}" for n in adjustable if n != top and sizes[n] > 1]
    use = f"use {top}={fit} or less" if fit else f"no {top} fits with the other sizes as they are"
    raise RefimplError(f"this run needs about {need / GB:.1f} GB of {backend_word} ({top}={sizes[top]} dominates); "
                       f"{available / GB:.1f} GB is available: {use}"
                       + (f", or lower one of {', '.join(others)}" if others else "")
                       + "; force=True skips this check")


def _largest_fit(estimate_of, sizes, name, available):
    lo, hi = 0, sizes[name]                                   # lo fits (0: none), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate_of(**{**sizes, name: mid}).total <= available else (lo, mid)
    if lo == 0 and estimate_of(**{**sizes, name: 1}).total > available:
        return 0
    return max(lo, 1)


def check_fits(estimate_of, sizes, adjustable, backend="numpy", force=False):
    """The pre-flight of a command: nothing when force, else `preflight` against `available_bytes`."""
    require(isinstance(force, bool), "force must be True or False")
    if not force:
        preflight(estimate_of, sizes, available_bytes(backend), adjustable,
                  "GPU memory" if backend == "cupy" else "memory")
