"""The multi-trace training layout and its masks (paper §3.2 and Fig. 2; docs/method.md §4 states
the slots, their position ids, the targets and the packed mask). Host index data only: `TraceLayout`
holds every index and mask as host NumPy arrays, built once; `context_runs` cuts the traces into
runs that each need only a prefix of the cache (a fast path)."""
import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import require

ORIGINAL, LATENT, AHEAD = 0, 1, 2  # slot kinds
LATENT_POSITIONS = ("behind", "after")  # position ids of the latents (docs/method.md, C8)


def sample_trace_positions(rng, batch_size, seq_len, n_traces, n_ahead):
    """K distinct augmentation points per sequence, uniform on [0, T-1-N_A], sorted: int64 [B, K]."""
    n_valid = seq_len - n_ahead
    require(n_ahead >= 1, f"n_ahead={n_ahead} must be >= 1: at least one ahead token is scored")
    require(n_valid >= 1, f"n_ahead={n_ahead} leaves no augmentation point in a sequence of {seq_len} "
                          f"tokens (a point p needs p + n_ahead <= T - 1): use seq_len={n_ahead + 1} or more"
                          + (f", or n_ahead={seq_len - 1} or less" if seq_len > 1 else ""))
    require(1 <= n_traces <= n_valid,
            f"n_traces={n_traces} does not fit: a sequence of {seq_len} tokens with n_ahead={n_ahead} "
            f"has {n_valid} augmentation points; use 1..{n_valid} traces or longer sequences")
    return np.stack([np.sort(rng.choice(n_valid, size=n_traces, replace=False))
                     for _ in range(batch_size)]).astype(np.int64)


@dataclass(frozen=True)
class TraceLayout:
    """Indices and masks of the packed layout for tokens [B, T] and the augmentation points [B, K]."""
    seq_len: int
    n_latents: int
    n_ahead: int
    trace_positions: np.ndarray     # int [B, K]: the augmentation points p (0-based token indices)
    ahead_inputs: np.ndarray        # int [B, K, N_A-1]: x_{p+1} .. x_{p+N_A-1}
    targets: np.ndarray             # int [B, K, N_A]:   x_{p+1} .. x_{p+N_A}
    group_position_ids: np.ndarray  # int [B, K, G]: position ids of each group's slots
    read_slots: np.ndarray          # int [B, K*N_A]: packed slot where each target is read

    @property
    def n_traces(self):
        return self.trace_positions.shape[1]

    @property
    def group_len(self):
        return self.n_latents + self.n_ahead - 1

    def context_visible(self):
        """bool [B, K, T]: original token t is visible to trace k iff t <= p_k."""
        return np.arange(self.seq_len)[None, None, :] <= self.trace_positions[..., None]

    def packed_positions(self):
        """int [B, S]: the original tokens' positions, then every group's."""
        B = self.trace_positions.shape[0]
        original = np.broadcast_to(np.arange(self.seq_len), (B, self.seq_len))
        return np.concatenate([original, self.group_position_ids.reshape(B, -1)], axis=1)

    def slot_kinds(self):
        """int [S]: ORIGINAL, LATENT or AHEAD for every packed slot."""
        group = [LATENT] * self.n_latents + [AHEAD] * (self.n_ahead - 1)
        return np.array([ORIGINAL] * self.seq_len + group * self.n_traces, dtype=np.int64)

    def packed_may_attend(self, group_len=None):
        """bool [B, S, S], S = T + K*group_len: the one-pass mask (paper Fig. 2, method.md §4).
        group_len: G by default; the coprocessor's packed pass has groups of its N_L soft tokens."""
        group_len = self.group_len if group_len is None else group_len
        (B, K), T = self.trace_positions.shape, self.seq_len
        S = T + K * group_len
        trace_of = np.concatenate([np.full(T, -1), np.repeat(np.arange(K), group_len)])  # [S]
        index = np.arange(S)
        causal = index[None, :] <= index[:, None]                                        # [S, S]
        same_group = (trace_of[:, None] == trace_of[None, :]) & (trace_of[:, None] >= 0)
        # original query: causal over originals. group query: originals <= p_k, own group causally.
        prefix_limit = np.concatenate([np.broadcast_to(np.arange(T), (B, T)),                # [B, S]
                                       np.repeat(self.trace_positions, group_len, axis=1)], axis=1)
        sees_original = (trace_of == -1)[None, None, :] & (index[None, None, :] <= prefix_limit[:, :, None])
        return sees_original | (same_group & causal)[None]


def build_layout(tokens, trace_positions, n_latents, n_ahead, latent_positions="behind"):
    """The layout for tokens int [B, T] and the augmentation points trace_positions int [B, K] (host).
    latent_positions "behind" (the method) puts the last latent on p, where the decoder predicts
    x_{p+1}; "after" (the ablation) at p+1+j. Ahead tokens keep their own position ids (method.md §4)."""
    require(latent_positions in LATENT_POSITIONS,
            f"unknown latent_positions {latent_positions!r}: use one of {', '.join(LATENT_POSITIONS)}")
    tokens, trace_positions = np.asarray(tokens), np.asarray(trace_positions)
    require(tokens.ndim == 2, f"tokens have shape {tokens.shape}: expected [B, T]")
    B, T = tokens.shape
    require(n_latents >= 0, f"n_latents={n_latents} must be >= 0")
    require(n_ahead >= 1, f"n_ahead={n_ahead} must be >= 1: at least one ahead token is scored")
    require(trace_positions.ndim == 2 and trace_positions.shape[0] == B and trace_positions.shape[1] >= 1
            and trace_positions.dtype.kind in "iu", f"trace positions have shape {trace_positions.shape} "
            f"{trace_positions.dtype}: expected int [{B}, K] with K >= 1")
    trace_positions = trace_positions.astype(np.int64)
    lo, hi = int(trace_positions.min()), int(trace_positions.max())
    require(lo >= 0 and hi + n_ahead <= T - 1,
            f"trace position {hi if hi + n_ahead > T - 1 else lo} leaves no room for n_ahead={n_ahead} "
            f"targets in {T} tokens: positions must lie in [0, {T - 1 - n_ahead}]")
    K, G = trace_positions.shape[1], n_latents + n_ahead - 1
    offsets = trace_positions[..., None] + 1 + np.arange(n_ahead)                    # [B, K, N_A]
    targets = np.take_along_axis(tokens[:, None, :], offsets, axis=2)                # x_{p+1..p+N_A}
    latent_ids = latent_position_ids(trace_positions, n_latents, latent_positions)  # [B, K, N_L]
    ahead_ids = trace_positions[..., None] + 1 + np.arange(n_ahead - 1)             # [B, K, N_A-1]: p+j
    group_position_ids = np.concatenate([latent_ids, ahead_ids], axis=-1)           # [B, K, G]
    # target j of trace k is read at group slot N_L-1+j; with N_L = 0, j = 0 reads x_p itself
    slot = T + np.arange(K)[:, None] * G + (n_latents - 1) + np.arange(n_ahead)     # [K, N_A]
    read_slots = np.broadcast_to(slot, (B, K, n_ahead)).copy()
    if n_latents == 0:
        read_slots[..., 0] = trace_positions
    return TraceLayout(T, n_latents, n_ahead, trace_positions, targets[..., :-1], targets,
                       group_position_ids, read_slots.reshape(B, K * n_ahead))


def latent_position_ids(points, n_latents, latent_positions="behind", xp=np):
    """Position ids of the N_L latents inserted after each point p: int [...] -> int [..., N_L]."""
    ids = points[..., None] + 1 + xp.arange(n_latents)                              # after: p+1..p+N_L
    return xp.maximum(ids - n_latents, 0) if latent_positions == "behind" else ids   # behind: p-N_L+1..p


def format_mask(may_attend, labels, header=()):
    """A printable picture of one [S, S] may-attend mask, a row per query: '#' sees, '.' does not.
    header: (name, [S] values) rows printed above it, one value per key column."""
    width = max(len(str(lab)) for lab in [*labels, *(name for name, _ in header)])
    rows = [(name, [str(v) for v in values]) for name, values in header]
    rows += [(lab, ["#" if v else "." for v in row]) for lab, row in zip(labels, may_attend)]
    return "\n".join(f"{lab!s:>{width}}  " + " ".join(cells) for lab, cells in rows)


def worked_example(text="abcdef", points=(1, 3), n_latents=2, n_ahead=2, latent_positions="behind"):
    """docs/method.md §4's worked example: the packed slots, their position ids, and the mask.
    Latent j of the trace at x_p is z<j+1>@x_p (column z); an ahead token is its own letter."""
    tokens = np.arange(len(text))[None]                                             # [1, T]
    layout = build_layout(tokens, np.array([points]), n_latents, n_ahead, latent_positions)
    names = list(text) + [f"z{j + 1}@{text[p]}" if j < n_latents else text[p + 1 + j - n_latents]
                          for p in points for j in range(layout.group_len)]
    header = (("slot", [n[0] for n in names]), ("position id", layout.packed_positions()[0]))
    return format_mask(layout.packed_may_attend()[0], names, header)


# The cached form of the same attention pattern
def context_runs(context_visible, n_runs=4):
    """Runs of consecutive traces for `ops.trace_attention`: bool [B, K, T] (host) -> ((k_start, k_stop,
    n_ctx), ...), n_runs (nearly) equal runs covering 0..K; no trace of a run sees a slot >= n_ctx.
    Sorted points make the early runs short (0.63 of the context work at K=32, T=128, 4 runs)."""
    vis = np.asarray(context_visible)
    _, K, T = vis.shape
    last = np.where(vis.any(-1), T - np.argmax(vis[..., ::-1], axis=-1), 0)         # [B, K]: 1 + last seen
    need = last.max(0)                                                               # [K]
    bounds = np.linspace(0, K, min(n_runs, K) + 1).round().astype(int)
    return tuple((int(a), int(b), max(1, int(need[a:b].max()))) for a, b in itertools.pairwise(bounds))
