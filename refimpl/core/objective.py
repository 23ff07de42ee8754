"""The method on one screen (`trace_loss`, paper §3, Fig. 1), then the training loss (paper §3.2),
its mean over all B*K*N_A ahead targets, in three forms that must agree (docs/method.md §4):
per-trace (the ground truth), cached (what training uses) and packed. Each returns (loss, out), out
holding `nll` [B, K, N_A], `logits` [B, K, N_A, V] and `latents` [B, K, N_L, D] (None with N_L = 0).
`trainable` None or N_L = 0 is the plain decoder: every form is then teacher-forced decoding."""
import functools

from ..backend import n_context_runs, xp_of
from .checks import host_tokens
from .coprocessor import augment, latents_cached, latents_packed
from .decoder import extend, groups_hidden, hidden, lm_head, prefill
from .layout import build_layout, context_runs
from .ops import concat, cross_entropy, embedding, mean, reshape, take_rows


def trace_loss(decoder, trainable, cfg, tokens, p, n_ahead, latent_positions="behind"):
    """Loss of the N_A tokens after x_p with the latents inserted there: nll [1, N_A], logits
    [1, N_A, V], latents [1, N_L, D] (None without a coprocessor). tokens int [1, T] on the device."""
    xp = xp_of(tokens)
    logits, cache = prefill(decoder, cfg, tokens[:, :p + 1])             # [1, p+1, V], cache of x_0..x_p
    z = None                                                            # without a coprocessor: the decoder
    if trainable is not None:
        z, ids = augment(trainable, cfg, cache, latent_positions)       # [1, N_L, D]: ONE call; ids p-N_L+1..p
        logits, cache = extend(decoder, cfg, cache, z, ids)             # [1, N_L, V]
    last = xp.full((1, 1), logits.shape[1] - 1)                         # [1, 1]: the last slot so far
    read = take_rows(logits, last)                                      # [1, 1, V]: it predicts x_{p+1}
    if n_ahead > 1:
        ahead = tokens[:, p + 1:p + n_ahead]                             # [1, N_A-1]: x_{p+1}..x_{p+N_A-1}
        own = xp.arange(p + 1, p + n_ahead)[None]                        # [1, N_A-1]: their own position ids
        ahead_logits, _ = extend(decoder, cfg, cache, ahead, own)       # [1, N_A-1, V]
        read = concat(read, ahead_logits, 1)                            # [1, N_A, V]
    targets = tokens[:, p + 1:p + 1 + n_ahead]                          # [1, N_A]: x_{p+1}..x_{p+N_A}
    return cross_entropy(read, targets), read, z                        # nll [1, N_A]


def loss_per_trace(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                   latent_positions="behind"):
    """The per-trace form: `trace_loss` trace by trace; tokens int [B, T], trace_positions int [B, K]."""
    layout, tokens = _entry(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                            latent_positions)
    B, K = layout.trace_positions.shape
    with_z = trainable if layout.n_latents else None
    traces = [trace_loss(dec_params, with_z, cfg, tokens[b:b + 1], int(layout.trace_positions[b, k]), n_ahead,
                         latent_positions) for b in range(B) for k in range(K)]
    nll, logits, z = zip(*traces)
    z = None if with_z is None else _stack(z, (B, K, n_latents, -1))
    return _finish(_stack(logits, (B, K, n_ahead, -1)), _stack(nll, (B, K, n_ahead)), z)


def loss_cached(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                latent_positions="behind"):
    """The cached form: one prefill, then the K traces' latents and decoder groups blockwise against it."""
    layout, tokens = _entry(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                            latent_positions)
    h_prefix, cache = hidden(dec_params, cfg, tokens)                        # [B, T, D]: a constant
    z = latents_cached(trainable, cfg, cache, layout) if layout.n_latents else None   # [B, K, N_L, D]
    h_all = h_prefix
    if layout.group_len > 0:
        visible = layout.context_visible()                                   # [B, K, T] (host)
        runs = context_runs(visible, n_context_runs(xp_of(tokens)))          # traces sharing a context prefix
        groups = _group_inputs(dec_params, z, layout)                        # [B, K, G, D]
        h_groups = groups_hidden(dec_params, cfg, groups, layout.group_position_ids, cache, visible, runs)
        h_all = concat(h_prefix, h_groups, 1)                                # [B, S, D]: packed slot order
    return _finish(*_scored(h_all, layout, dec_params), z)


def loss_packed(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                latent_positions="behind"):
    """The packed form: one decoder pass over [original tokens; K groups] with the packed [S, S] mask."""
    layout, tokens = _entry(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead,
                            latent_positions)
    xp = xp_of(tokens)
    _, cache = hidden(dec_params, cfg, tokens)                               # the coprocessor reads it
    z = latents_packed(trainable, cfg, cache, layout) if layout.n_latents else None
    x = embedding(dec_params["embed_tokens"], tokens)                        # [B, T, D]
    if layout.group_len > 0:
        B, K, G = layout.group_position_ids.shape
        groups = reshape(_group_inputs(dec_params, z, layout), (B, K * G, cfg.d_model))
        x = concat(x, groups, 1)                                             # [B, S, D]
    h_all, _ = hidden(dec_params, cfg, x, xp.asarray(layout.packed_positions()),
                      may_attend=xp.asarray(layout.packed_may_attend()))     # [B, S, D]
    return _finish(*_scored(h_all, layout, dec_params), z)


def _entry(dec_params, trainable, cfg, tokens, trace_positions, n_latents, n_ahead, latent_positions):
    host = host_tokens(tokens, cfg)
    n_latents = 0 if trainable is None else n_latents
    layout = build_layout(host, trace_positions, n_latents, n_ahead, latent_positions)
    return layout, xp_of(dec_params["embed_tokens"]).asarray(host)


def _group_inputs(params, latents, layout):
    """Decoder inputs of the K groups [B, K, G, D]: per trace [z_1..z_{N_L}, x_{p+1}..x_{p+N_A-1}]."""
    E = params["embed_tokens"]
    ahead = embedding(E, xp_of(E).asarray(layout.ahead_inputs))                # [B, K, N_A-1, D]
    return ahead if latents is None else concat(latents, ahead, 2)           # [B, K, G, D]


def _scored(h_all, layout, params):
    """Read out the scored slots of h_all [B, S, D]: logits [B, K, N_A, V] and nll [B, K, N_A]."""
    xp = xp_of(h_all)
    B, K, N_A = layout.targets.shape
    logits = lm_head(params, take_rows(h_all, xp.asarray(layout.read_slots)))   # [B, K*N_A, V]
    logits = reshape(logits, (B, K, N_A, -1))
    return logits, cross_entropy(logits, xp.asarray(layout.targets))


def _stack(arrays, shape):
    # the per-trace results, in trace order, as one array of shape [B, K, ...]
    return reshape(functools.reduce(lambda a, b: concat(a, b, 0), arrays), shape)


def _finish(logits, nll, latents):
    return mean(nll), {"logits": logits, "nll": nll, "latents": latents}


FORMS = {"per-trace": loss_per_trace, "cached": loss_cached, "packed": loss_packed}
