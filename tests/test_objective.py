"""The method's invariants (docs/method.md §6): the three forms of the loss agree, no latents is the
plain decoder, gradients reach only the coprocessor, the decoder stays frozen, no future token leaks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.config import get_preset
from refimpl.core.coprocessor import SOFT_TOKENS, augment, init_coprocessor
from refimpl.core.decoder import flatten_params, forward, init_params, prefill
from refimpl.core.layout import LATENT_POSITIONS, build_layout, sample_trace_positions
from refimpl.core.objective import FORMS, loss_cached, loss_per_trace
from refimpl.core.ops import cross_entropy
from refimpl.training.autodiff import value_and_grad

V = 37
CFG = get_preset("nano", vocab_size=V)
DEC = init_params(CFG, seed=0, dtype=np.float64)


@st.composite
def problems(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    B = draw(st.integers(1, 2))
    n_ahead = draw(st.integers(1, 4))
    T = draw(st.integers(n_ahead + 2, 11))
    K = draw(st.integers(1, min(3, T - n_ahead)))
    n_latents = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["coprocessor", "pause"]))
    init = draw(st.sampled_from(["copy", "random"]))
    tokens = rng.integers(0, V, (B, T))
    positions = sample_trace_positions(rng, B, T, K, n_ahead)
    trainable = init_coprocessor(DEC, CFG, n_latents, init, mode, seed=int(rng.integers(100)))
    return tokens, positions, n_latents, n_ahead, trainable


@st.composite
def problems_any_positions(draw):
    return draw(problems()) + (draw(st.sampled_from(LATENT_POSITIONS)),)


def _run(form, trainable, tokens, positions, n_latents, n_ahead, latent_positions="behind"):
    def loss_fn(t):
        loss, out = FORMS[form](DEC, t, CFG, tokens, positions, n_latents, n_ahead, latent_positions)
        return loss, {k: (None if v is None else np.asarray(getattr(v, "_value", v))) for k, v in out.items()}
    return value_and_grad(loss_fn, trainable)


@settings(max_examples=16)
@given(problems_any_positions())
def test_packed_equals_cached_equals_per_trace(problem):
    """Invariant 4: loss, logits, latents and EVERY gradient agree across the three forms,
    with the latents behind the point (the method) and after it (the ablation)."""
    tokens, positions, n_latents, n_ahead, trainable, latent = problem
    ref_loss, ref_grads, ref_out = _run("per-trace", trainable, tokens, positions, n_latents, n_ahead, latent)
    for form in ("cached", "packed"):
        loss, grads, out = _run(form, trainable, tokens, positions, n_latents, n_ahead, latent)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=0)
        np.testing.assert_allclose(out["logits"], ref_out["logits"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out["latents"], ref_out["latents"], rtol=1e-10, atol=1e-12)
        for name in trainable:
            np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-9, atol=1e-13,
                                       err_msg=f"{form}: gradient of {name}")


def _plain_decoder_targets(tokens, positions, n_ahead):
    """Teacher-forced logits of the plain decoder at x_p .. x_{p+N_A-1}: [B, K, N_A, V]."""
    logits, _, _ = forward(DEC, CFG, tokens)
    idx = positions[..., None] + np.arange(n_ahead)                          # [B, K, N_A]
    return np.take_along_axis(logits[:, None], idx[..., None], axis=2)


@settings(max_examples=10)
@given(problems(), st.sampled_from(["none", "zero_latents"]))
def test_no_latents_equals_plain_decoder(problem, how):
    """Invariant 1: no coprocessor, or N_L = 0, gives exactly the plain decoder's logits and loss."""
    tokens, positions, n_latents, n_ahead, trainable = problem
    ref_logits = _plain_decoder_targets(tokens, positions, n_ahead)
    targets = build_layout(tokens, positions, 0, n_ahead).targets
    ref_loss = cross_entropy(ref_logits, targets).mean()
    t = None if how == "none" else trainable
    for form in FORMS.values():
        loss, out = form(DEC, t, CFG, tokens, positions, 0, n_ahead)
        np.testing.assert_allclose(out["logits"], ref_logits, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        assert out["latents"] is None


@pytest.mark.parametrize("mode, init", [("coprocessor", "copy"), ("coprocessor", "random"), ("pause", "copy")])
def test_gradient_reaches_every_trainable_array(mode, init):
    """Invariant 2: every coprocessor array on the path and the soft tokens get a nonzero gradient."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, V, (2, 12))
    positions = sample_trace_positions(rng, 2, 12, 3, 3)
    trainable = init_coprocessor(DEC, CFG, 2, init, mode, seed=1)
    if mode == "pause":
        assert set(trainable) == {SOFT_TOKENS}
    else:
        assert set(trainable) == set(flatten_params(DEC)) - {"model.embed_tokens.weight"} | {SOFT_TOKENS}
    _, grads, _ = _run("cached", trainable, tokens, positions, 2, 3)
    for name, g in grads.items():
        assert g is not None, f"no gradient path to {name}"
        assert g.shape == trainable[name].shape
        assert np.abs(g).max() > 0, f"zero gradient for {name}"


def test_decoder_never_boxed_and_unchanged():
    """Invariant 2: the decoder is a constant: its arrays are not even seen as variables."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, V, (2, 10))
    positions = sample_trace_positions(rng, 2, 10, 2, 2)
    trainable = init_coprocessor(DEC, CFG, 2)
    before = {k: v.copy() for k, v in flatten_params(DEC).items()}
    seen = []

    def loss_fn(t):
        seen.extend(k for k, v in flatten_params(DEC).items() if hasattr(v, "_node"))
        return loss_cached(DEC, t, CFG, tokens, positions, 2, 2)[0]
    _, grads, _ = value_and_grad(loss_fn, trainable)
    assert seen == []
    assert not set(grads) & set(before) - set(trainable)
    for k, v in flatten_params(DEC).items():
        np.testing.assert_array_equal(v, before[k])
    # the coprocessor's copy does not alias the decoder's arrays
    assert all(not np.shares_memory(trainable[k], DEC_v) for k, DEC_v in flatten_params(DEC).items()
               if k in trainable)


@settings(max_examples=10)
@given(problems(), st.integers(0, 2**16))
def test_future_tokens_do_not_leak(problem, seed):
    """Invariant 7: tokens after p_k never change trace k's latents or first-target logits."""
    tokens, positions, n_latents, n_ahead, trainable = problem
    rng = np.random.default_rng(seed)
    b, k = rng.integers(tokens.shape[0]), rng.integers(positions.shape[1])
    p = positions[b, k]
    changed = tokens.copy()
    changed[b, p + 1:] = rng.integers(0, V, tokens.shape[1] - p - 1)
    for form in (loss_cached, loss_per_trace):
        _, a = form(DEC, trainable, CFG, tokens, positions, n_latents, n_ahead)
        _, c = form(DEC, trainable, CFG, changed, positions, n_latents, n_ahead)
        np.testing.assert_array_equal(a["latents"][b, k], c["latents"][b, k])
        np.testing.assert_allclose(a["logits"][b, k, 0], c["logits"][b, k, 0], rtol=1e-13, atol=1e-13)


def test_augment_is_one_call_at_the_end_of_the_prompt():
    """§5: augment(cache) equals the cached form's latents for a trace at the last prompt token."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, V, (1, 9))
    trainable = init_coprocessor(DEC, CFG, 3, seed=2)
    _, cache = prefill(DEC, CFG, tokens[:, :6])
    z, ids = augment(trainable, CFG, cache)
    _, out = loss_cached(DEC, trainable, CFG, tokens, np.array([[5]]), 3, 1)
    assert z.shape == (1, 3, CFG.d_model)
    np.testing.assert_array_equal(ids, [[3, 4, 5]])                      # behind the point p = 5
    np.testing.assert_allclose(z, out["latents"][:, 0], rtol=1e-12, atol=1e-14)


def test_float32_stays_float32():
    dec32 = init_params(CFG, seed=0, dtype=np.float32)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, V, (2, 10))
    positions = sample_trace_positions(rng, 2, 10, 2, 2)
    trainable = init_coprocessor(dec32, CFG, 2)
    loss, grads, _ = value_and_grad(
        lambda t: loss_cached(dec32, t, CFG, tokens, positions, 2, 2)[0], trainable)
    assert loss.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())


def test_latent_positions_behind():
    """'behind' puts latent j at p-N_L+1+j (clamped at 0); the ahead tokens keep their ids p+1.."""
    tokens = np.arange(12)[None] % V
    behind = build_layout(tokens, np.array([[3, 1]]), 3, 3).group_position_ids[0]
    np.testing.assert_array_equal(behind, [[1, 2, 3, 4, 5], [0, 0, 1, 2, 3]])   # z1..z3, then x4 x5 / x2 x3
    trainable = init_coprocessor(DEC, CFG, 3, seed=3)
    _, cache = prefill(DEC, CFG, tokens[:, :4])
    a = loss_cached(DEC, trainable, CFG, tokens, np.array([[3]]), 3, 3, "behind")[1]
    np.testing.assert_allclose(a["latents"][:, 0], augment(trainable, CFG, cache, "behind")[0], rtol=1e-12, atol=1e-14)
    b = loss_cached(DEC, trainable, CFG, tokens, np.array([[3]]), 3, 3, "after")[1]
    assert not np.allclose(a["latents"], b["latents"])                            # the ids reach the coprocessor
