"""Held-out loss of the n-th token after an augmentation point, n = 1..N_A (paper Table 1), on fixed
points, for the decoder alone (`trainable=None`) and with augmentation: they differ only by the latents."""
from itertools import islice

import numpy as np

from ..backend import to_numpy, xp_of
from ..core.layout import sample_trace_positions
from ..core.objective import loss_cached
from ..data.corpus import iter_eval_batches
from ..errors import require


def heldout_set(val_tokens, n_batches, batch_size, seq_len, n_traces, n_ahead, seed=1234, skip_windows=0):
    """Fixed held-out windows and trace positions: [(tokens [B, T], positions [B, K])]. skip_windows: start
    after that many windows (training evaluates on at most the first 64: past them, no choice was made)."""
    available = len(val_tokens) // seq_len - skip_windows
    require(available >= n_batches * batch_size, f"the held-out data holds {max(available, 0)} windows of "
            f"seq_len={seq_len} tokens after skip_windows={skip_windows}, fewer than eval_batches={n_batches} x "
            f"batch_size={batch_size}: ask for fewer or shorter windows, or another data source")
    rng = np.random.default_rng(seed)
    windows = islice(iter_eval_batches(val_tokens[skip_windows * seq_len:], batch_size, seq_len), n_batches)
    return [(tokens, sample_trace_positions(rng, tokens.shape[0], seq_len, n_traces, n_ahead))
            for tokens in windows]


def ahead_nll(dec_params, trainable, cfg, heldout, n_latents, n_ahead, latent_positions="behind"):
    """Mean held-out nll per ahead position, float64 [N_A]."""
    nll = point_nll(dec_params, trainable, cfg, heldout, n_latents, n_ahead, latent_positions)  # [P, N_A]
    return nll.mean(0) if len(nll) else np.zeros(n_ahead)


def point_nll(dec_params, trainable, cfg, heldout, n_latents, n_ahead, latent_positions="behind"):
    """The held-out nll of every point: float64 [n_points, N_A], points in order (window, trace)."""
    rows = []
    for tokens, positions in heldout:
        _, out = loss_cached(dec_params, trainable, cfg, tokens, positions, n_latents, n_ahead,
                             latent_positions)
        rows.append(to_numpy(out["nll"]).astype(np.float64).reshape(-1, n_ahead))   # [B*K, N_A]
    return np.concatenate(rows) if rows else np.zeros((0, n_ahead))


def relative_ppl_change(base_nll, aug_nll):
    """Relative perplexity change in %, per position: 100 * (exp(aug - base) - 1)."""
    return 100.0 * np.expm1(np.asarray(aug_nll) - np.asarray(base_nll))


def row_norm(x):
    """Mean L2 norm of the rows of x [..., D], in float64 on x's device: a 0-d array."""
    x = x.astype(np.float64)
    return xp_of(x).sqrt((x * x).sum(-1)).mean()


def mean_row_norm(x):
    return float(to_numpy(row_norm(x)))


def embedding_norm(dec_params):
    """Mean L2 norm of the decoder's token embeddings, the scale latents are compared with."""
    return mean_row_norm(dec_params["embed_tokens"])
