"""The training objective (SPEC §6) in three forms that must agree exactly.

Loss = mean cross-entropy of the frozen decoder over all B*K*N_A ahead targets, each trace's
decoder inputs being [z_1..z_{N_L}, x_{p+1}..x_{p+N_A-1}] after the prefix x_0..x_p.

- A `loss_packed`:     decoder prefill, coprocessor through the packed mask, then ONE decoder pass
                       over [original tokens; all K groups] with the packed [S, S] mask (Fig. 2).
- B `loss_cached`:     decoder prefill (a constant: the decoder is frozen), coprocessor and decoder
                       groups blockwise against that cache. This is what training uses.
- C `loss_sequential`: a loop over traces using only the §5 inference API (prefill, augment,
                       extend). The ground truth.

Each returns (loss, out) where out holds `nll` [B, K, N_A], `logits` [B, K, N_A, V] and
`latents` [B, K, N_L, D] (None with N_L = 0). `trainable` is None or N_L = 0 for the plain
decoder: then every form reduces to teacher-forced decoding of the same targets.
"""

from ..backend import to_numpy, xp_of
from .coprocessor import augment, latents_cached, latents_packed
from .decoder import embed, extend, hidden, lm_head, prefill
from .layout import build_layout, trace_hidden
from .ops import concat, cross_entropy, mean, reshape, take_rows


def _scored(h_all, layout, params, xp):
    """Read out the scored slots of h_all [B, S, D]: logits [B, K, N_A, V] and nll [B, K, N_A]."""
    B, K, N_A = layout.targets.shape
    logits = lm_head(params, take_rows(h_all, xp.asarray(layout.readout)))  # [B, K*N_A, V]
    logits = reshape(logits, (B, K, N_A, -1))
    return logits, cross_entropy(logits, xp.asarray(layout.targets))


def _group_inputs(params, cfg, latents, layout, xp):
    """Decoder inputs of the K groups: [B, K*G, D] = per trace [z_1..z_{N_L}, x_{p+1}..x_{p+N_A-1}]."""
    B, K, _ = layout.ahead_inputs.shape
    ahead = reshape(embed(params, cfg, xp.asarray(layout.ahead_inputs.reshape(B, -1))),
                    (B, K, layout.n_ahead - 1, cfg.d_model))                # [B, K, N_A-1, D]
    groups = ahead if latents is None else concat(latents, ahead, 2)       # [B, K, G, D]
    return reshape(groups, (B, K * layout.group_len, cfg.d_model))


def _latents(trainable, layout, make):
    return None if trainable is None or layout.n_latents == 0 else make()


def loss_cached(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                ahead_positions="original"):
    """Form B: the cached three-pass form. tokens int [B, T], trace_positions int [B, K]."""
    layout = _layout(trainable, tokens, trace_positions, n_latents, n_ahead, ahead_positions)
    xp = xp_of(dec_params["embed_tokens"])
    h_prefix, cache = hidden(dec_params, cfg, xp.asarray(tokens))          # [B, T, D], constant
    z = _latents(trainable, layout, lambda: latents_cached(trainable, cfg, cache, layout))
    h_all = h_prefix
    if layout.group_len > 0:
        B = tokens.shape[0]
        h_groups = trace_hidden(dec_params, cfg, _group_inputs(dec_params, cfg, z, layout, xp),
                                layout.group_positions.reshape(B, -1), cache,
                                layout.context_visible(), layout.group_len)  # [B, K*G, D]
        h_all = concat(h_prefix, h_groups, 1)                               # packed slot order
    return _finish(*_scored(h_all, layout, dec_params, xp), z)


def loss_packed(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                ahead_positions="original"):
    """Form A: one decoder pass over [original tokens; K groups] with the packed mask."""
    layout = _layout(trainable, tokens, trace_positions, n_latents, n_ahead, ahead_positions)
    xp = xp_of(dec_params["embed_tokens"])
    tokens = xp.asarray(tokens)
    _, cache = hidden(dec_params, cfg, tokens)                              # the coprocessor reads it
    z = _latents(trainable, layout, lambda: latents_packed(trainable, cfg, cache, layout))
    x = embed(dec_params, cfg, tokens)                                      # [B, T, D]
    if layout.group_len > 0:
        x = concat(x, _group_inputs(dec_params, cfg, z, layout, xp), 1)     # [B, S, D]
    h_all, _ = hidden(dec_params, cfg, x, xp.asarray(layout.packed_positions()),
                      may_attend=xp.asarray(layout.packed_may_attend()))
    return _finish(*_scored(h_all, layout, dec_params, xp), z)


def loss_sequential(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                    ahead_positions="original"):
    """Form C: trace by trace, through prefill -> augment -> extend(latents) -> extend(ahead)."""
    layout = _layout(trainable, tokens, trace_positions, n_latents, n_ahead, ahead_positions)
    xp = xp_of(dec_params["embed_tokens"])
    B, K = layout.trace_positions.shape
    logits, nll, latents = [], [], []
    for b in range(B):
        for k in range(K):
            lg, z = _one_trace(dec_params, trainable, cfg, xp.asarray(tokens[b:b + 1]),
                               int(layout.trace_positions[b, k]), layout,
                               xp.asarray(layout.group_positions[b:b + 1, k, layout.n_latents:]))
            logits.append(lg)
            nll.append(cross_entropy(lg, xp.asarray(layout.targets[b:b + 1, k])))  # [1, N_A]
            latents.append(z)
    stack = lambda xs, shape: reshape(_concat_all(xs), shape)
    z = None if latents[0] is None else stack(latents, (B, K, layout.n_latents, -1))
    return _finish(stack(logits, (B, K, layout.n_ahead, -1)), stack(nll, (B, K, layout.n_ahead)), z)


def _one_trace(dec_params, trainable, cfg, tokens, p, layout, ahead_positions):
    """Logits [1, N_A, V] of one trace's targets, and its latents [1, N_L, D] (or None).

    ahead_positions int [1, N_A-1]: the position ids of x_{p+1}..x_{p+N_A-1} (SPEC §5).
    """
    logits, cache = prefill(dec_params, cfg, tokens[:, :p + 1])             # x_0..x_p
    read = logits[:, -1:]                                                   # reads x_{p+1} if N_L = 0
    z = None
    if trainable is not None and layout.n_latents > 0:
        z = augment(trainable, cfg, cache)                                  # [1, N_L, D]
        read, cache = extend(dec_params, cfg, cache, z)                     # positions p+1..p+N_L
    if layout.n_ahead > 1:
        ahead = tokens[:, p + 1:p + layout.n_ahead]                         # x_{p+1}..x_{p+N_A-1}
        ahead_logits, _ = extend(dec_params, cfg, cache, ahead, ahead_positions)
        read = concat(read, ahead_logits, 1)
    first = read.shape[1] - layout.n_ahead                                  # the last latent
    return take_rows(read, xp_of(tokens).arange(first, read.shape[1])[None]), z


def _concat_all(arrays):
    out = arrays[0]
    for a in arrays[1:]:
        out = concat(out, a, 0)
    return out


def _layout(trainable, tokens, trace_positions, n_latents, n_ahead, ahead_positions):
    n_latents = 0 if trainable is None else n_latents
    return build_layout(to_numpy(tokens), to_numpy(trace_positions), n_latents, n_ahead, ahead_positions)


def _finish(logits, nll, latents):
    return mean(nll), {"logits": logits, "nll": nll, "latents": latents}


FORMS = {"packed": loss_packed, "cached": loss_cached, "sequential": loss_sequential}
