"""Grouped-query attention (GQA): n_kv_heads key/value heads, query head i reads kv head
i // (n_heads / n_kv_heads), as Hugging Face's `repeat_kv` orders them."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.config import get_preset
from refimpl.core.coprocessor import init_coprocessor
from refimpl.core.decoder import extend, forward, init_params, prefill
from refimpl.core.layout import sample_trace_positions
from refimpl.core.objective import FORMS
from refimpl.errors import RefimplError
from refimpl.training.autodiff import value_and_grad

V = 41
MHA = get_preset("nano", vocab_size=V, n_heads=4, init_std=0.2)


def gqa(n_kv):
    return get_preset("nano", vocab_size=V, n_heads=4, n_kv_heads=n_kv, init_std=0.2)


def test_n_kv_heads_equal_to_n_heads_is_multi_head_attention_bit_for_bit():
    cfg = gqa(4)
    a, b = init_params(MHA, seed=3, dtype=np.float64), init_params(cfg, seed=3, dtype=np.float64)
    tokens = np.random.default_rng(0).integers(0, V, (2, 9))
    np.testing.assert_array_equal(forward(a, MHA, tokens)[0], forward(b, cfg, tokens)[0])
    assert cfg.to_dict()["n_kv_heads"] == 4 and "n_kv_heads" not in MHA.to_dict()


@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa_equals_mha_with_each_kv_head_repeated(n_kv):
    """A GQA decoder is the MHA decoder whose k/v projections repeat each kv head n_heads/n_kv times."""
    cfg, rep, Dh = gqa(n_kv), MHA.n_heads // n_kv, MHA.head_dim
    small = init_params(cfg, seed=5, dtype=np.float64)
    full = {**small, "layers": [dict(layer) for layer in small["layers"]]}
    for layer in full["layers"]:
        for name in ("k_proj", "v_proj"):                                   # [Hkv*Dh, D] -> [H*Dh, D]
            w = layer[name].reshape(n_kv, Dh, -1)
            layer[name] = np.repeat(w, rep, axis=0).reshape(MHA.n_heads * Dh, -1)
    tokens = np.random.default_rng(1).integers(0, V, (2, 11))
    np.testing.assert_allclose(forward(small, cfg, tokens)[0], forward(full, MHA, tokens)[0], rtol=1e-12, atol=1e-12)
    _, cache = prefill(small, cfg, tokens[:, :6])
    assert cache.k[0].shape[1] == n_kv                                       # the cache holds n_kv_heads heads
    logits, _ = extend(small, cfg, cache, tokens[:, 6:])
    np.testing.assert_allclose(logits, forward(small, cfg, tokens)[0][:, 6:], rtol=1e-12, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([1, 2]), st.sampled_from(["after", "behind"]),
       st.sampled_from(["coprocessor", "pause"]))
def test_three_forms_agree_under_gqa(seed, n_kv, latent, mode):
    cfg = gqa(n_kv)
    rng = np.random.default_rng(seed)
    dec = init_params(cfg, seed=seed % 7, dtype=np.float64)
    B, T, K, N_L, N_A = 2, 10, 2, 2, 3
    tokens = rng.integers(0, V, (B, T))
    positions = sample_trace_positions(rng, B, T, K, N_A)
    trainable = init_coprocessor(dec, cfg, N_L, mode=mode, seed=seed % 5)
    results = {}
    for form, fn in FORMS.items():
        results[form] = value_and_grad(lambda t, fn=fn: fn(dec, t, cfg, tokens, positions, N_L, N_A, latent)[0],
                                       trainable)
    ref_loss, ref_grads, _ = results["per-trace"]
    for form in ("cached", "packed"):
        loss, grads, _ = results[form]
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        for name, g in ref_grads.items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-9, atol=1e-13, err_msg=f"{form}: {name}")


def test_n_kv_heads_must_divide_n_heads():
    with pytest.raises(RefimplError, match="n_kv_heads=3 does not divide n_heads=4"):
        gqa(3)
