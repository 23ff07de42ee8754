"""Adam(W), the LR schedule and gradient clipping (refimpl/training/optim.py)."""
import math

import numpy as np
import pytest

from refimpl.errors import RefimplError
from refimpl.training.checkpoint import adam_from_arrays, adam_to_arrays
from refimpl.training.loop import resumed_state
from refimpl.training.optim import adam_init, adam_update, clip_scale, global_norm, lr_schedule


def clip_by_global_norm(grads, max_norm):
    """(grads scaled by clip_scale as adam_update scales them, the norm before clipping)."""
    norm = global_norm(grads)
    scale = clip_scale(norm, max_norm)
    return {k: g if g is None or scale is None else g * scale.astype(g.dtype) for k, g in grads.items()}, norm


def reference_adam(x, grad_fn, steps, lr, b1, b2, eps, wd):
    """Textbook AdamW (Loshchilov & Hutter, Algorithm 2, with eta = 1), one array, float64."""
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t in range(1, steps + 1):
        g = grad_fn(x)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        x = x - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * x)
    return x, m, v


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_reference_on_quadratic(wd):
    rng = np.random.default_rng(0)
    a, c = rng.uniform(0.5, 3.0, size=(5, 3)), rng.standard_normal((5, 3))
    b, d = rng.uniform(0.5, 3.0, size=4), rng.standard_normal(4)
    grad = {"w": lambda x: a * (x - c), "b": lambda x: b * (x - d)}   # of 0.5 * sum(a (x - c)^2)
    x0 = {"w": rng.standard_normal((5, 3)), "b": rng.standard_normal(4)}
    params, state = dict(x0), adam_init(x0)
    for _ in range(60):
        grads = {k: grad[k](p) for k, p in params.items()}
        params, state = adam_update(params, grads, state, 0.05, 0.9, 0.95, 1e-8, wd)
    assert state["step"] == 60
    for k, x in x0.items():
        x_ref, m_ref, v_ref = reference_adam(x, grad[k], 60, 0.05, 0.9, 0.95, 1e-8, wd)
        np.testing.assert_allclose(params[k], x_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(state["m"][k], m_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state["v"][k], v_ref, rtol=1e-12, atol=1e-14)
    if wd == 0.0:  # it approaches the minimum
        assert np.abs(params["w"] - c).max() < 0.25 * np.abs(x0["w"] - c).max()


def test_adam_is_pure_and_skips_missing_grads():
    p = {"a": np.ones(3), "b": np.ones(2)}
    s = adam_init(p)
    g = {"a": np.full(3, 0.5), "b": None}
    new_p, new_s = adam_update(p, g, s, 0.1)
    np.testing.assert_array_equal(p["a"], 1.0)              # inputs untouched
    np.testing.assert_array_equal(s["m"]["a"], 0.0)
    assert s["step"] == 0 and new_s["step"] == 1
    assert new_p["b"] is p["b"] and new_s["m"]["b"] is s["m"]["b"]
    np.testing.assert_allclose(new_p["a"], 1.0 - 0.1, rtol=1e-6)  # first step moves by ~lr


def test_weight_decay_only_on_selected_names():
    p = {"w": np.ones((2, 2)), "n": np.ones(2)}
    g = {k: np.zeros_like(v) for k, v in p.items()}
    new_p, _ = adam_update(p, g, adam_init(p), 0.1, weight_decay=0.5, decay={"w"})
    np.testing.assert_allclose(new_p["w"], 1.0 - 0.1 * 0.5)
    np.testing.assert_array_equal(new_p["n"], 1.0)


def test_float32_stays_float32():
    rng = np.random.default_rng(1)
    p = {"w": rng.standard_normal((4, 3)).astype(np.float32), "n": np.ones(3, np.float32)}
    g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}
    state = adam_init(p)
    for step in range(3):
        g, norm = clip_by_global_norm(g, 0.5)
        lr = lr_schedule(step, 1e-3, 2, 10)
        assert type(lr) is float and norm.shape == () and norm.dtype == np.float64   # norm: on the device
        p, state = adam_update(p, g, state, lr, weight_decay=0.1)
    for tree in (p, g, state["m"], state["v"]):
        assert all(a.dtype == np.float32 for a in tree.values())


def test_schedule_shape():
    peak, warmup, total = 1.0, 10, 100
    lrs = [lr_schedule(s, peak, warmup, total) for s in range(total + 5)]
    np.testing.assert_allclose(lrs[:warmup], np.arange(1, warmup + 1) / warmup)   # linear warmup
    assert lrs[warmup] == pytest.approx(peak)                                      # the peak
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))            # then decays
    assert lrs[total] == pytest.approx(0.1 * peak) and lrs[-1] == pytest.approx(0.1 * peak)
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5)                              # cosine midpoint
    assert lr_schedule(0, 2.0, 0, 10) == pytest.approx(2.0)                        # no warmup


def test_clip_by_global_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]]), "c": None}
    assert global_norm(g) == pytest.approx(5.0)
    clipped, norm = clip_by_global_norm(g, 1.0)
    assert norm == pytest.approx(5.0) and clipped["c"] is None
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["a"] / clipped["b"][0, 0], [0.75, 0.0])    # direction kept
    same, norm = clip_by_global_norm(g, 10.0)
    assert norm == pytest.approx(5.0) and same["a"].tobytes() == g["a"].tobytes()  # below: untouched
    off, _ = clip_by_global_norm(g, 0)
    assert off["b"] is g["b"]                                                      # 0 disables it
    nan, norm = clip_by_global_norm({"a": np.array([np.nan, 1.0])}, 1.0)
    assert math.isnan(norm) and nan["a"][1] == 1.0                                 # non-finite: as is


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_clipping_is_bit_identical_to_python_float_scaling(dtype):
    """The norm is one float64 device reduction (per-array sums added in order) and the scale a
    device value cast to each gradient's dtype: the same bits as the Python-float arithmetic
    (NEP 50 casts a Python float to the array's dtype)."""
    rng = np.random.default_rng(3)
    for trial in range(50):
        g = {k: (rng.standard_normal(rng.integers(1, 40)) * rng.uniform(1e-3, 1e3)).astype(dtype) for k in "abcdefghij"}
        total = 0.0
        for a in g.values():
            total += float(np.square(a, dtype=np.float64).sum())
        norm = math.sqrt(total)
        clipped, got = clip_by_global_norm(g, 1.0)
        assert float(got) == norm
        for k, a in g.items():
            want = a * (1.0 / (norm + 1e-6)) if norm > 1.0 else a
            assert clipped[k].dtype == dtype and clipped[k].tobytes() == want.tobytes(), (trial, k)


def test_state_arrays_round_trip():
    p = {"x.weight": np.arange(3.0), "y.weight": np.ones((2, 2))}
    g = {k: v + 1 for k, v in p.items()}
    _, s = adam_update(p, g, adam_init(p), 0.1)
    arrays = adam_to_arrays(s)
    assert set(arrays) == {"adam.m.x.weight", "adam.v.x.weight", "adam.m.y.weight", "adam.v.y.weight"}
    rng = np.random.default_rng(0).bit_generator.state
    back = resumed_state(1, p, adam_from_arrays(arrays, s["step"], np), rng, "ckpt.npz").adam
    assert back["step"] == 1 and list(back["m"]) == list(p)
    for k in p:
        np.testing.assert_array_equal(back["m"][k], s["m"][k])
        np.testing.assert_array_equal(back["v"][k], s["v"][k])
    del arrays["adam.v.y.weight"]
    with pytest.raises(RefimplError, match=r"ckpt.npz lacks optimizer state \['adam.v.y.weight'\]"):
        resumed_state(1, p, adam_from_arrays(arrays, 1, np), rng, "ckpt.npz")
    with pytest.raises(RefimplError, match="optimizer step None"):
        resumed_state(1, p, adam_from_arrays(adam_to_arrays(s), None, np), rng, "ckpt.npz")
    with pytest.raises(RefimplError, match="ckpt.npz has no usable rng state"):
        resumed_state(1, p, adam_from_arrays(adam_to_arrays(s), 1, np), {"bit_generator": "Nope"}, "ckpt.npz")


def _per_array_adam(params, grads, state, lr, b1, b2, eps, wd, decay, scale):
    """The plain per-array AdamW update, the reference for the flat one."""
    t = state["step"] + 1
    out_p, out_m, out_v = dict(params), dict(state["m"]), dict(state["v"])
    for n, p in params.items():
        g = grads.get(n)
        if g is None:
            continue
        g = g * scale.astype(g.dtype) if scale is not None else g
        m = b1 * state["m"][n] + (1.0 - b1) * g
        v = b2 * state["v"][n] + (1.0 - b2) * (g * g)
        if wd and (decay is None or n in decay):
            p = p * (1.0 - lr * wd)
        out_p[n] = p - (lr / (1.0 - b1 ** t)) * m / (np.sqrt(v) * (1.0 / math.sqrt(1.0 - b2 ** t)) + eps)
        out_m[n], out_v[n] = m, v
    return out_p, {"m": out_m, "v": out_v, "step": t}


@pytest.mark.parametrize("chunk", [2**23, 16, 3])                       # one chunk, several, one per array
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd, decay, clip", [(0.0, None, None), (0.1, None, 0.5), (0.1, {"w1"}, 2.0)])
def test_flat_adam_is_bit_identical_to_the_per_array_update(monkeypatch, chunk, dtype, wd, decay, clip):
    monkeypatch.setattr("refimpl.training.optim.CHUNK", chunk)
    rng = np.random.default_rng(4)
    shapes = {"w1": (3, 5), "b": (5,), "w2": (5, 2), "unused": (4,)}
    params = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    state = adam_init(params)
    flat, ref = (dict(params), state), (dict(params), state)
    for step in range(4):
        grads = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items() if n != "unused"}
        grads["unused"] = None
        scale = clip_scale(global_norm(grads), clip)
        flat = adam_update(flat[0], grads, flat[1], 0.01, 0.9, 0.95, 1e-8, wd, decay, grad_scale=scale)
        ref = _per_array_adam(ref[0], grads, ref[1], 0.01, 0.9, 0.95, 1e-8, wd, decay, scale)
        for n in shapes:
            for a, b in ((flat[0][n], ref[0][n]), (flat[1]["m"][n], ref[1]["m"][n]), (flat[1]["v"][n], ref[1]["v"][n])):
                assert a.dtype == dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b, err_msg=f"step {step}: {n}")
    assert flat[0]["unused"] is params["unused"]


