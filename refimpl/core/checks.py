"""Validation at the API boundary: every check of a user's arrays, in one place, before the math
(which trusts its inputs, as picoGPT's forward does). Token ids are checked on the host, before
they move to a device, so that a check never makes a GPU synchronise inside the loss."""
import numpy as np

from ..backend import to_numpy
from ..errors import require


def host_tokens(tokens, cfg):
    """Token ids as a host int64 [B, T] array with every id in [0, vocab_size); else one-line error."""
    _require_array(tokens, "token ids", "int [B, T]")
    require(tokens.dtype.kind in "iu", f"token ids must be an integer array, got {tokens.dtype}: "
                                       "encode text with the tokenizer first")
    require(tokens.ndim == 2, f"token ids have shape {tuple(tokens.shape)}: expected [B, T]")
    host = to_numpy(tokens).astype(np.int64, copy=False)
    if host.size:
        lo, hi = int(host.min()), int(host.max())
        require(lo >= 0 and hi < cfg.vocab_size, f"token id {hi if hi >= cfg.vocab_size else lo} is out of "
                f"range [0, {cfg.vocab_size}): the tokens come from another tokenizer or are corrupt")
    return host


def check_forward(cfg, inputs, positions, cache, may_attend):
    """The arguments of decoder.forward: inputs [B, T] ids or [B, T, D] embeddings, positions int
    [B, T] or None, cache a KVCache of B rows or None, may_attend bool [B|1, T, Tc + T] or None."""
    require(hasattr(inputs, "dtype"),
            f"inputs must be an array of token ids or embeddings, got {type(inputs).__name__}")
    if inputs.dtype.kind == "f":
        require(inputs.ndim == 3 and inputs.shape[-1] == cfg.d_model,
                f"input embeddings have shape {tuple(inputs.shape)}: expected [B, T, {cfg.d_model}]")
    else:
        host_tokens(inputs, cfg)
    B, T = inputs.shape[:2]
    require(cache is None or hasattr(cache, "positions") and hasattr(cache, "append"),
            f"cache must be a KVCache (from prefill/extend/forward) or None, got {type(cache).__name__}")
    require(cache is None or cache.positions.shape[0] == B,
            f"the cache holds {0 if cache is None else cache.positions.shape[0]} sequences but the inputs "
            f"hold {B}: pass inputs with one row per cached sequence")
    if positions is not None:
        _require_array(positions, "position ids", f"int [{B}, {T}]")
        require(tuple(positions.shape) == (B, T) and positions.dtype.kind in "iu", f"position ids have shape "
                f"{tuple(positions.shape)} {positions.dtype}: expected int [{B}, {T}]")
    if may_attend is not None:
        Tk = T + (0 if cache is None else cache.positions.shape[1])
        _require_array(may_attend, "mask", f"bool [{B}, {T}, {Tk}]")
        shape = tuple(may_attend.shape)
        require(len(shape) == 3 and shape[0] in (1, B) and shape[1:] == (T, Tk) and may_attend.dtype == bool,
                f"mask has shape {shape} {may_attend.dtype}: "
                f"expected bool [{B}, {T}, {Tk}] or [1, {T}, {Tk}]")


def check_prompt_length(tokens, cfg):
    _require_array(tokens, "token ids", "int [B, T]")
    require(tokens.shape[-1] <= cfg.max_seq_len, f"sequence of {tokens.shape[-1]} tokens is longer than "
            f"max_seq_len={cfg.max_seq_len}: shorten the prompt or use a config with a longer context")


def _require_array(a, what, expected):
    require(hasattr(a, "shape") and hasattr(a, "dtype"),
            f"{what} must be an array, got {type(a).__name__}: pass a NumPy (or CuPy) array {expected}")
