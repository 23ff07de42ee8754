"""The coprocessor (paper §3.1, Fig. 1; docs/method.md §2): it reads the frozen decoder's kv-cache
plus N_L trainable soft tokens and emits N_L latent embeddings in ONE parallel forward pass. It has
the decoder's architecture; its layer l attends over the DECODER's layer-l cache, then over its
soft tokens causally; the latents are its final hidden states (after its final RMSNorm). The
pause-token baseline (paper Table 3) has no coprocessor: the soft tokens are the latents."""
import numpy as np

from ..backend import n_context_runs, xp_of
from ..errors import require
from .decoder import causal_may_attend, flatten_params, groups_hidden, hidden, init_params, unflatten_params
from .layout import context_runs, latent_position_ids
from .ops import broadcast_rows, reshape

SOFT_TOKENS = "soft_tokens"
MODES = ("coprocessor", "pause")
INITS = ("copy", "random")


def init_coprocessor(decoder_params, cfg, n_latents, init="copy", mode="coprocessor", seed=0):
    """Trainable arrays as a flat dict: Hugging Face names for blocks and final norm, plus soft_tokens
    (only they in mode="pause"). init="copy" (paper default) or "random" (the paper's ablation).
    Soft tokens ~ N(0, std(E)) [choice], so they look like token embeddings."""
    require(mode in MODES, f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    require(init in INITS, f"unknown init {init!r}: use one of {', '.join(INITS)}")
    require(isinstance(n_latents, int) and n_latents >= 1,
            f"n_latents={n_latents!r} must be a positive int to train a coprocessor or pause tokens")
    E = decoder_params["embed_tokens"]
    xp, rng = xp_of(E), np.random.default_rng(seed)
    soft = rng.standard_normal((n_latents, cfg.d_model)) * float(xp.std(E))
    trainable = {SOFT_TOKENS: xp.asarray(soft.astype(E.dtype))}
    if mode == "pause":
        return trainable
    source = decoder_params if init == "copy" else init_params(cfg, seed + 1, E.dtype, xp)
    blocks = {k: v.copy() for k, v in flatten_params(source).items() if k != "model.embed_tokens.weight"}
    return {**blocks, **trainable}


def latents(trainable, cfg, lead_shape, run):
    """The latents for soft tokens broadcast to [*lead_shape, N_L, D]: run(coprocessor params,
    soft-token inputs) computes them; in pause mode they are the soft tokens themselves."""
    soft_in = broadcast_rows(trainable[SOFT_TOKENS], tuple(lead_shape))    # [*lead, N_L, D]
    if set(trainable) == {SOFT_TOKENS}:                                    # pause tokens only
        return soft_in
    return run(unflatten_params(trainable, cfg.n_layers), soft_in)         # the flat dict, nested


# Inference: one coprocessor call at the end of a cache (paper §3)
def augment(trainable, cfg, cache, latent_positions="behind"):
    """The latents z [B, N_L, D] and their position ids int [B, N_L] for a decoder cache whose last
    slot is the augmentation point p: ONE call. Soft token j sits at max(0, p - N_L + 1 + j)
    ("behind"; "after": p + 1 + j) and sees every valid cached slot and the soft tokens before it."""
    B, n = cache.positions.shape[0], trainable[SOFT_TOKENS].shape[0]
    point = cache.positions.max(1)                                          # [B]: p
    positions = latent_position_ids(point, n, latent_positions, xp_of(point))   # [B, N_L]
    mask = causal_may_attend(cache.positions, positions)                    # [B, N_L, Tc + N_L]
    z = latents(trainable, cfg, (B,),
                lambda params, soft: hidden(params, cfg, soft, positions, cache, mask)[0])  # [B, N_L, D]
    return z, positions


# Training: latents for K traces at once (paper §3.2)
def latents_cached(trainable, cfg, cache, layout):
    """The cached form: every trace's latents in one blockwise pass over the decoder cache: [B, K, N_L, D]."""
    B, K, N = layout.trace_positions.shape[0], layout.n_traces, layout.n_latents
    visible = layout.context_visible()                                      # [B, K, T]

    def run(params, soft):                                                  # soft [B, K, N_L, D]
        runs = context_runs(visible, n_context_runs(xp_of(soft)))
        ids = layout.group_position_ids[..., :N]                               # [B, K, N_L]
        z = groups_hidden(params, cfg, soft, ids, cache, visible, runs)
        return reshape(z, (B, K, N, -1))
    return latents(trainable, cfg, (B, K), run)


def latents_packed(trainable, cfg, cache, layout):
    """The packed form: the same latents through the one-pass packed mask (rows of the K soft groups)."""
    B, K, N, T = layout.trace_positions.shape[0], layout.n_traces, layout.n_latents, layout.seq_len
    xp = xp_of(cache.positions)
    mask = xp.asarray(layout.packed_may_attend(group_len=N)[:, T:, :])       # [B, K*N_L, T+K*N_L]
    positions = xp.asarray(layout.group_position_ids[..., :N].reshape(B, K * N))   # [B, K*N_L]

    def run(params, soft):                                                  # soft [B, K, N_L, D]
        z, _ = hidden(params, cfg, reshape(soft, (B, K * N, -1)), positions, cache, mask)
        return reshape(z, (B, K, N, -1))
    return latents(trainable, cfg, (B, K), run)
