"""refimpl.autodiff.value_and_grad: same gradients as autograd.grad, None off the path, and
frozen arrays never boxed, so no VJP is ever asked for them (docs/method.md §6, invariant 2)."""
import autograd
import numpy as np
import pytest
from autograd.core import primitive_vjps

from refimpl.core import ops
from refimpl.core.decoder import LAYER_KEYS, flatten_params, forward, hf_name, unflatten_params
from refimpl.training.autodiff import value_and_grad

TOKENS = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])


def lm_loss(params, cfg, tokens=TOKENS):
    # teacher-forced next-token loss, built from refimpl ops only
    logits = forward(params, cfg, tokens[:, :-1])[0]
    return ops.mean(ops.cross_entropy(logits, tokens[:, 1:]))


def latent_loss(params, cfg, z, tokens=TOKENS):
    # embeddings z [B, T, D] enter the decoder (as latents do); score the tokens after them
    logits = forward(params, cfg, z)[0]
    return ops.mean(ops.cross_entropy(logits, tokens[:, 1:z.shape[1] + 1]))


@pytest.fixture
def vjp_requests(monkeypatch):
    """Record every VJP autograd asks a refimpl primitive for: (op name, argnums, those args)."""
    calls = []
    for prim in ops.PRIMITIVES:
        maker = primitive_vjps[prim]

        def recording(argnums, ans, args, kwargs, maker=maker, name=prim.__name__):
            calls.append((name, tuple(argnums), [args[i] for i in argnums]))
            return maker(argnums, ans, args, kwargs)
        monkeypatch.setitem(primitive_vjps, prim, recording)
    return calls


def test_value_and_grad_equals_autograd_grad(nano_cfg, params64):
    flat = flatten_params(params64)
    loss, grads, aux = value_and_grad(lambda p: lm_loss(unflatten_params(p, nano_cfg.n_layers), nano_cfg),
                                      flat)
    want = flatten_params(autograd.grad(lambda p: lm_loss(p, nano_cfg))(params64))
    assert aux == {}
    assert float(loss) == float(lm_loss(params64, nano_cfg))
    assert not isinstance(loss, autograd.tracer.Box)
    assert sorted(grads) == sorted(flat)
    for name, g in grads.items():
        assert g.shape == flat[name].shape and g.dtype == np.float64
        assert np.abs(g).max() > 0, f"{name} got a zero gradient"
        np.testing.assert_allclose(g, want[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_leaves_off_the_path_get_none_and_aux_passes_through(nano_cfg, params64):
    trainable = {**flatten_params(params64), "unused": np.ones(3), "zeroed": np.ones(2)}

    def loss_fn(p):
        loss = lm_loss(unflatten_params(p, nano_cfg.n_layers), nano_cfg)
        return ops.add(loss, ops.mean(p["zeroed"]) * 0.0), {"note": 1}
    _, grads, aux = value_and_grad(loss_fn, trainable)
    assert grads["unused"] is None
    assert np.array_equal(grads["zeroed"], np.zeros(2))    # on the path, zero: not None
    assert aux == {"note": 1}

    loss, grads, _ = value_and_grad(lambda p: lm_loss(params64, nano_cfg), {"w": np.ones(2)})
    assert grads == {"w": None} and np.isfinite(loss)      # loss independent of every leaf


def test_frozen_arrays_are_never_boxed(nano_cfg, params64, vjp_requests):
    """Train the latents z and layer 1; freeze everything else (embedding, norms, layers 0, 2)."""
    L, B, T = nano_cfg.n_layers, TOKENS.shape[0], 4
    z = np.random.default_rng(0).standard_normal((B, T, nano_cfg.d_model))
    layer1 = {k: v for k, v in flatten_params(params64).items() if k.startswith("model.layers.1.")}
    frozen = {k: v for k, v in flatten_params(params64).items() if k not in layer1}
    frozen_before = {k: v.copy() for k, v in frozen.items()}

    def loss_fn(p):
        params = unflatten_params({**frozen, **{k: p[k] for k in layer1}}, L)
        return latent_loss(params, nano_cfg, p["z"])
    loss, grads, _ = value_and_grad(loss_fn, {"z": z, **layer1})

    requested = [(name, argnums, a) for name, argnums, arrays in vjp_requests for a in arrays]
    assert requested, "the recorder saw no VJP request"
    for name, argnums, a in requested:
        hit = [k for k, f in frozen.items() if a is f]
        assert not hit, f"{name} was asked for a VJP wrt frozen {hit} (argnums {argnums})"
    # controls: the recorder does see weight argnums when the weight is trainable, and sees
    # frozen layers' linears asked for their input only
    q1 = layer1[hf_name(("layers", 1, "q_proj"))]
    assert any(name == "linear" and any(a is q1 for a in arrays) for name, _, arrays in vjp_requests)
    assert ("linear", (0,)) in {(name, argnums) for name, argnums, _ in vjp_requests}
    assert all(np.array_equal(frozen[k], frozen_before[k]) for k in frozen)

    # and the gradients are autograd's
    want_z, want_l1 = autograd.grad(
        lambda zz, l1: latent_loss(unflatten_params({**frozen, **l1}, L), nano_cfg, zz), (0, 1))(z, layer1)
    np.testing.assert_allclose(grads["z"], want_z, rtol=1e-12, atol=1e-14)
    for k in layer1:
        assert np.abs(grads[k]).max() > 0, k
        np.testing.assert_allclose(grads[k], want_l1[k], rtol=1e-12, atol=1e-14, err_msg=k)
    assert set(grads) == {"z", *layer1} and np.isfinite(loss)


def test_only_trainable_layer_keys_are_requested(nano_cfg, params64, vjp_requests):
    """Control with every weight trainable: VJPs wrt weights are requested (the recorder works)."""
    flat = flatten_params(params64)
    value_and_grad(lambda p: lm_loss(unflatten_params(p, nano_cfg.n_layers), nano_cfg), flat)
    asked = {id(a) for _, _, arrays in vjp_requests for a in arrays}
    for i in range(nano_cfg.n_layers):
        for k in LAYER_KEYS:
            assert id(flat[hf_name(("layers", i, k))]) in asked, (i, k)


def test_float32_gradients_stay_float32(nano_cfg, params32):
    flat = flatten_params(params32)
    loss, grads, _ = value_and_grad(lambda p: lm_loss(unflatten_params(p, nano_cfg.n_layers), nano_cfg),
                                    flat)
    assert np.asarray(loss).dtype == np.float32
    assert {name: g.dtype for name, g in grads.items()} == {name: np.dtype(np.float32) for name in flat}
