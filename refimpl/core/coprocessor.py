"""The coprocessor (SPEC §4): reads the frozen decoder's kv-cache plus N_L trainable soft tokens and
emits N_L latent embeddings in ONE parallel forward pass.

It has the decoder's architecture. Its layer l attends over the DECODER's layer-l cached keys and
values for the prefix, followed by its own layer-l keys and values for the soft tokens (causal
among themselves). The prefix is never recomputed with the coprocessor's weights. The latents are
its final hidden states at the soft-token slots, after its final RMSNorm. Its token embedding and
LM head are unused, so its trainable arrays are its blocks, its final norm and the soft tokens.

The pause-token baseline (paper Table 3) uses the same machinery with no coprocessor: the soft
tokens themselves are the latents.
"""
import numpy as np

from ..backend import xp_of
from ..errors import require
from .decoder import causal_may_attend, flatten_params, hidden, init_params, unflatten_params
from .layout import trace_hidden
from .ops import broadcast_rows, reshape

SOFT_TOKENS = "soft_tokens"
MODES = ("coprocessor", "pause")
INITS = ("copy", "random")


def init_coprocessor(decoder_params, cfg, n_latents, init="copy", mode="coprocessor", seed=0):
    """Trainable arrays as a flat dict: Hugging Face names for blocks and final norm, plus soft_tokens.

    init="copy" starts from the decoder's weights (paper default); "random" from a fresh init (the
    paper's ablation). Soft tokens ~ N(0, std(E)) [choice], so they look like token embeddings.
    mode="pause" has only the soft tokens.
    """
    require(mode in MODES, f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    require(init in INITS, f"unknown init {init!r}: use one of {', '.join(INITS)}")
    require(isinstance(n_latents, int) and n_latents >= 1,
            f"n_latents={n_latents!r} must be a positive int to train a coprocessor or pause tokens")
    E = decoder_params["embed_tokens"]
    xp, rng = xp_of(E), np.random.default_rng(seed)
    std = float(xp.std(E))
    soft = rng.standard_normal((n_latents, cfg.d_model)) * std
    trainable = {SOFT_TOKENS: xp.asarray(soft.astype(E.dtype))}
    if mode == "pause":
        return trainable
    source = decoder_params if init == "copy" else init_params(cfg, seed + 1, E.dtype, xp)
    blocks = {k: v.copy() for k, v in flatten_params(source).items() if k != "model.embed_tokens.weight"}
    return {**blocks, **trainable}


def is_pause(trainable):
    """True when the trainable arrays are pause tokens only (no coprocessor blocks)."""
    return set(trainable) == {SOFT_TOKENS}


def coprocessor_params(trainable, cfg):
    """The flat trainable dict (possibly autograd boxes) -> nested params for the decoder code."""
    return unflatten_params(trainable, cfg.n_layers)


# ---------------------------------------------------------------------------------------------
# §5 inference: one coprocessor call at the end of a cache
def augment(trainable, cfg, cache):
    """Latents z [B, N_L, D] for a decoder cache whose last slot is the augmentation point.

    Soft token j gets position p + 1 + j, p the last cached position [choice]. It sees every
    valid cached slot and the soft tokens before it.
    """
    soft = trainable[SOFT_TOKENS]                                           # [N_L, D]
    B, n = cache.positions.shape[0], soft.shape[0]
    soft_in = broadcast_rows(soft, (B,))                                    # [B, N_L, D]
    if is_pause(trainable):
        return soft_in
    positions = cache.next_positions(n)                                     # [B, N_L]
    z, _ = hidden(coprocessor_params(trainable, cfg), cfg, soft_in, positions, cache,
                  causal_may_attend(cache.positions, positions))
    return z


# ---------------------------------------------------------------------------------------------
# §6 training: latents for K traces at once
def latents_cached(trainable, cfg, cache, layout):
    """Form B: every trace's latents in one blockwise pass over the decoder cache: [B, K, N_L, D]."""
    soft = trainable[SOFT_TOKENS]
    B, K, N = layout.trace_positions.shape[0], layout.n_traces, layout.n_latents
    soft_in = broadcast_rows(soft, (B, K))                                  # [B, K, N_L, D]
    if is_pause(trainable):
        return soft_in
    z = trace_hidden(coprocessor_params(trainable, cfg), cfg, reshape(soft_in, (B, K * N, -1)),
                     layout.latent_positions.reshape(B, K * N), cache, layout.context_visible(), N)
    return reshape(z, (B, K, N, -1))


def latents_packed(trainable, cfg, cache, layout):
    """Form A: the same latents through the one-pass packed mask (rows of the K soft groups)."""
    soft = trainable[SOFT_TOKENS]
    B, K, N, T = layout.trace_positions.shape[0], layout.n_traces, layout.n_latents, layout.seq_len
    soft_in = broadcast_rows(soft, (B, K))                                  # [B, K, N_L, D]
    if is_pause(trainable):
        return soft_in
    xp = xp_of(cache.positions)
    may_attend = xp.asarray(layout.packed_may_attend(group_len=N)[:, T:, :])   # [B, K*N_L, T+K*N_L]
    z, _ = hidden(coprocessor_params(trainable, cfg), cfg, reshape(soft_in, (B, K * N, -1)),
                  xp.asarray(layout.latent_positions.reshape(B, K * N)), cache, may_attend)
    return reshape(z, (B, K, N, -1))
