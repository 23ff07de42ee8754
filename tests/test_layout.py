"""The packed multi-trace layout and its mask (paper Fig. 2; docs/method.md §4, the mask invariant)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.core.layout import (
    AHEAD,
    LATENT,
    LATENT_POSITIONS,
    ORIGINAL,
    build_layout,
    sample_trace_positions,
    worked_example,
)
from refimpl.errors import RefimplError


@pytest.mark.parametrize("latent_positions, latent_ids", [("behind", [[0, 1], [2, 3]]), ("after", [[2, 3], [4, 5]])])
def test_worked_example(latent_positions, latent_ids):
    # N_L=2, N_A=2, traces at b (1) and d (3) of "a b c d e f" (docs/method.md §4, the worked example)
    layout = build_layout(np.arange(6)[None], np.array([[1, 3]]), n_latents=2, n_ahead=2,
                          latent_positions=latent_positions)
    m = layout.packed_may_attend()[0]
    names = list("abcdef") + ["z1@b", "z2@b", "c+", "z1@d", "z2@d", "e+"]
    sees = {names[i]: {names[j] for j in np.flatnonzero(m[i])} for i in range(len(names))}
    assert sees["z1@b"] == {"a", "b", "z1@b"}
    assert sees["c+"] == {"a", "b", "z1@b", "z2@b", "c+"}
    assert sees["z2@d"] == {"a", "b", "c", "d", "z1@d", "z2@d"}
    assert sees["f"] == set("abcdef")
    (l1, l2), ahead = latent_ids, [2, 4]                     # the ahead tokens keep their own ids
    np.testing.assert_array_equal(layout.packed_positions()[0], [0, 1, 2, 3, 4, 5, *l1, ahead[0], *l2, ahead[1]])
    np.testing.assert_array_equal(layout.targets[0], [[2, 3], [4, 5]])
    # target x_{p+1} read at the last latent, x_{p+2} at the ahead token
    np.testing.assert_array_equal(layout.read_slots[0], [7, 8, 10, 11])
    assert "z2@d  # # # # . . . . . # # ." in worked_example(latent_positions=latent_positions)


@st.composite
def layouts(draw):
    B = draw(st.integers(1, 2))
    n_ahead = draw(st.integers(1, 4))
    T = draw(st.integers(n_ahead + 1, 12))
    K = draw(st.integers(1, T - n_ahead))
    n_latents = draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    positions = sample_trace_positions(rng, B, T, K, n_ahead)
    tokens = rng.integers(0, 50, (B, T))
    convention = draw(st.sampled_from(LATENT_POSITIONS))
    return tokens, build_layout(tokens, positions, n_latents, n_ahead, convention), convention


@given(layouts())
def test_mask_properties(case):
    tokens, layout, _ = case
    T, K, G = layout.seq_len, layout.n_traces, layout.group_len
    m = layout.packed_may_attend()                                          # [B, S, S]
    S = T + K * G
    assert m.shape == (tokens.shape[0], S, S)
    trace_of = np.concatenate([np.full(T, -1), np.repeat(np.arange(K), G)])
    for b in range(m.shape[0]):
        assert m[b].diagonal().all(), "every query sees itself"
        for q in range(S):
            seen = np.flatnonzero(m[b, q])
            if trace_of[q] < 0:   # original token: causal over originals only
                np.testing.assert_array_equal(seen, np.arange(q + 1))
                continue
            k = trace_of[q]
            p = layout.trace_positions[b, k]
            originals = seen[seen < T]
            own = seen[seen >= T]
            np.testing.assert_array_equal(originals, np.arange(p + 1))    # no future original token
            assert (trace_of[own] == k).all(), "no other trace is visible"
            assert (own <= q).all() and len(own) == q - (T + k * G) + 1    # causal inside the group


@given(layouts())
def test_layout_indices(case):
    tokens, layout, convention = case
    B, K = layout.trace_positions.shape
    N_L, N_A = layout.n_latents, layout.n_ahead
    kinds = layout.slot_kinds()
    pos = layout.packed_positions()
    for b in range(B):
        for k in range(K):
            p = layout.trace_positions[b, k]
            np.testing.assert_array_equal(layout.targets[b, k], tokens[b, p + 1:p + 1 + N_A])
            np.testing.assert_array_equal(layout.ahead_inputs[b, k], tokens[b, p + 1:p + N_A])
            # latents at max(0, p-N_L+1)..p ("behind") or p+1..p+N_L ("after"); ahead token x_{p+j} at p+j
            latents = p + 1 + np.arange(N_L)
            latents = np.maximum(latents - N_L, 0) if convention == "behind" else latents
            ahead = p + 1 + np.arange(N_A - 1)
            np.testing.assert_array_equal(layout.group_position_ids[b, k], np.r_[latents, ahead])
            read = layout.read_slots[b, k * N_A:(k + 1) * N_A]
            # target x_{p+1} is read at the last latent (or at x_p without latents), x_{p+1+j} at x_{p+j}
            assert pos[b, read[0]] == (latents[-1] if N_L else p)
            np.testing.assert_array_equal(pos[b, read[1:]], p + np.arange(1, N_A))
            if N_L == 0:
                assert read[0] == p and kinds[read[0]] == ORIGINAL
            else:
                assert kinds[read[0]] == LATENT
                assert N_A == 1 or kinds[read[0] + 1] == AHEAD
            assert all(kinds[r] == AHEAD for r in read[1:])


def test_sample_trace_positions():
    rng = np.random.default_rng(0)
    p = sample_trace_positions(rng, 4, 20, 5, 3)
    assert p.shape == (4, 5) and p.dtype == np.int64
    assert (p >= 0).all() and (p <= 20 - 1 - 3).all()
    assert all(len(set(row)) == 5 and (np.diff(row) > 0).all() for row in p)
    np.testing.assert_array_equal(p, sample_trace_positions(np.random.default_rng(0), 4, 20, 5, 3))


@pytest.mark.parametrize("kwargs, words", [
    (dict(positions=[[5]], n_latents=1, n_ahead=3), "no room"),
    (dict(positions=[[-1]], n_latents=1, n_ahead=1), "no room"),
    (dict(positions=[[0]], n_latents=-1, n_ahead=1), "n_latents"),
    (dict(positions=[[0]], n_latents=1, n_ahead=0), "n_ahead"),
])
def test_layout_errors(kwargs, words):
    with pytest.raises(RefimplError, match=words):
        build_layout(np.zeros((1, 8), np.int64), np.array(kwargs["positions"]),
                     kwargs["n_latents"], kwargs["n_ahead"])


def test_too_many_traces():
    with pytest.raises(RefimplError, match="n_traces"):
        sample_trace_positions(np.random.default_rng(0), 1, 8, 6, 4)


def test_latents_behind_the_point():
    """'behind': latent j at max(0, p-N_L+1+j), the last latent at p; ahead tokens at p+1.."""
    layout = build_layout(np.arange(10)[None], np.array([[1, 5]]), n_latents=3, n_ahead=3)
    np.testing.assert_array_equal(layout.group_position_ids[0], [[0, 0, 1, 2, 3], [3, 4, 5, 6, 7]])
