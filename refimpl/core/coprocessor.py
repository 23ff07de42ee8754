"""The coprocessor (paper §3.1, Fig. 1; docs/method.md §2): it reads the frozen decoder's kv-cache
plus N_L trainable soft tokens and emits N_L latent embeddings in ONE parallel forward pass.

It has the decoder's architecture. Its layer l attends over the DECODER's layer-l cached keys and
values for the prefix, followed by its own layer-l keys and values for the soft tokens (causal
among themselves). The prefix is never recomputed with the coprocessor's weights. The latents are
its final hidden states at the soft-token slots, after its final RMSNorm. Its token embedding and
LM head are unused, so its trainable arrays are its blocks, its final norm and the soft tokens.

The read-out (docs/choices.md, C9) is told by the trainable arrays themselves, so checkpoints,
eval and generate need nothing else: "norm" (default) as above; "prenorm" has no final norm
(no model.norm.weight: z is the residual stream after the last block); "scaled" adds latent_scale
[N_L] (initialised to 1), which multiplies latent j after the final norm.

The pause-token baseline (paper Table 3) uses the same machinery with no coprocessor: the soft
tokens themselves are the latents, so they do NOT depend on the input. `latents` is the one place
that tells the modes and read-outs apart.
"""
import numpy as np

from ..backend import trace_runs, xp_of
from ..errors import require
from .decoder import causal_may_attend, flatten_params, groups_hidden, hidden, init_params, unflatten_params
from .layout import context_runs
from .ops import broadcast_rows, reshape, scale_rows

SOFT_TOKENS = "soft_tokens"
LATENT_SCALE = "latent_scale"
FINAL_NORM = "model.norm.weight"
MODES = ("coprocessor", "pause")
INITS = ("copy", "random")
READOUTS = ("norm", "prenorm", "scaled")


def init_coprocessor(decoder_params, cfg, n_latents, init="copy", mode="coprocessor", seed=0, readout="norm"):
    """Trainable arrays as a flat dict: Hugging Face names for blocks and final norm, plus soft_tokens.

    init="copy" starts from the decoder's weights (paper default); "random" from a fresh init (the
    paper's ablation). Soft tokens ~ N(0, std(E)) [choice], so they look like token embeddings.
    mode="pause" has only the soft tokens. readout="prenorm" leaves out the final norm; "scaled"
    adds latent_scale, ones [N_L] (the module docstring).
    """
    require(mode in MODES, f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    require(init in INITS, f"unknown init {init!r}: use one of {', '.join(INITS)}")
    require(readout in READOUTS, f"unknown readout {readout!r}: use one of {', '.join(READOUTS)}")
    require(mode == "coprocessor" or readout == "norm",
            f"readout={readout!r} needs mode='coprocessor': pause tokens are the latents themselves")
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
    blocks = {k: v.copy() for k, v in flatten_params(source).items()
              if k != "model.embed_tokens.weight" and not (readout == "prenorm" and k == FINAL_NORM)}
    if readout == "scaled":
        trainable[LATENT_SCALE] = xp.ones(n_latents, dtype=E.dtype)
    return {**blocks, **trainable}


def is_pause(trainable):
    """True when the trainable arrays are pause tokens only (no coprocessor blocks)."""
    return set(trainable) == {SOFT_TOKENS}


def readout_of(trainable):
    """How the latents are read out of these trainable arrays: "norm", "prenorm" or "scaled"
    (pause tokens: "norm", the soft tokens as they are)."""
    if LATENT_SCALE in trainable:
        return "scaled"
    return "prenorm" if not is_pause(trainable) and FINAL_NORM not in trainable else "norm"


def coprocessor_params(trainable, cfg):
    """The flat trainable dict (possibly autograd boxes) -> nested params for the decoder code
    (params["norm"] None for the "prenorm" read-out)."""
    return unflatten_params(trainable, cfg.n_layers, final_norm=readout_of(trainable) != "prenorm")


def latents(trainable, cfg, lead_shape, run):
    """The latents for soft tokens broadcast to [*lead_shape, N_L, D]: run(coprocessor params,
    soft-token inputs) computes them; in pause mode they are the soft tokens themselves; with
    latent_scale, latent j is multiplied by latent_scale[j]."""
    soft_in = broadcast_rows(trainable[SOFT_TOKENS], tuple(lead_shape))    # [*lead, N_L, D]
    if is_pause(trainable):
        return soft_in
    z = run(coprocessor_params(trainable, cfg), soft_in)                    # [*lead, N_L, D]
    return scale_rows(z, trainable[LATENT_SCALE]) if LATENT_SCALE in trainable else z


# ---------------------------------------------------------------------------------------------
# Inference: one coprocessor call at the end of a cache (paper §3)
def augment(trainable, cfg, cache, latent_positions="behind"):
    """Latents z [B, N_L, D] for a decoder cache whose last slot is the augmentation point.

    Soft token j gets position p + 1 + j, p the last cached position ("behind": p - N_L + 1 + j,
    clamped at 0). It sees every valid cached slot and the soft tokens before it.
    """
    B, n = cache.positions.shape[0], trainable[SOFT_TOKENS].shape[0]
    positions = latent_ids(cache, n, latent_positions)                      # [B, N_L]
    mask = causal_may_attend(cache.positions, positions)                    # [B, N_L, Tc + N_L]
    return latents(trainable, cfg, (B,), lambda params, soft: hidden(params, cfg, soft, positions, cache,
                                                                      mask)[0])


def latent_ids(cache, n_latents, latent_positions="behind"):
    """Position ids int [B, N_L] of N_L latents appended to a cache (layout.latent_position_ids)."""
    ids = cache.next_positions(n_latents)                                   # p+1..p+N_L
    return xp_of(ids).maximum(ids - n_latents, 0) if latent_positions == "behind" else ids


# ---------------------------------------------------------------------------------------------
# Training: latents for K traces at once (paper §3.2)
def latents_cached(trainable, cfg, cache, layout):
    """Form B: every trace's latents in one blockwise pass over the decoder cache: [B, K, N_L, D]."""
    B, K, N = layout.trace_positions.shape[0], layout.n_traces, layout.n_latents
    visible = layout.context_visible()                                      # [B, K, T]

    def run(params, soft):                                                  # soft [B, K, N_L, D]
        runs = context_runs(visible, trace_runs(xp_of(soft)))
        z = groups_hidden(params, cfg, soft, layout.latent_ids, cache, visible, runs)
        return reshape(z, (B, K, N, -1))
    return latents(trainable, cfg, (B, K), run)


def latents_packed(trainable, cfg, cache, layout):
    """Form A: the same latents through the one-pass packed mask (rows of the K soft groups)."""
    B, K, N, T = layout.trace_positions.shape[0], layout.n_traces, layout.n_latents, layout.seq_len
    xp = xp_of(cache.positions)
    mask = xp.asarray(layout.packed_may_attend(group_len=N)[:, T:, :])       # [B, K*N_L, T+K*N_L]
    positions = xp.asarray(layout.latent_ids.reshape(B, K * N))

    def run(params, soft):                                                  # soft [B, K, N_L, D]
        z, _ = hidden(params, cfg, reshape(soft, (B, K * N, -1)), positions, cache, mask)
        return reshape(z, (B, K, N, -1))
    return latents(trainable, cfg, (B, K), run)
