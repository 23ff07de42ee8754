"""Every primitive in refimpl.core.ops against the plain composition it stands for.

For each op, hypothesis draws small shapes and a seed, and we check:
- forward == the plain composition written with autograd.numpy;
- VJP == autograd's derivative of that plain composition, with every differentiable argument
  boxed and with only some of them boxed (autograd then asks the VJP for those argnums only);
- VJP == central finite differences of sum(op(...) * g) along random directions (float64);
- float32 in -> float32 out, forward and backward (NumPy 2 promotes silently otherwise).
trace_attention is also pinned to `attention` over the concatenated keys with the full mask.

Every fast path that differs from the plain one is pinned to it too:
- trace_attention cut into runs of traces with a shorter context == one run over all of it;
- the backward that reuses the forward's softmax statistic (lse) == the one that recomputes it;
- layout.context_runs never cuts off a context slot a trace may see;
- the groups' pass with runs == without (loss and every gradient of a train step).
"""
import math
from dataclasses import dataclass

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import make_vjp
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.backend import n_context_runs
from refimpl.config import get_preset
from refimpl.core import coprocessor, objective, ops
from refimpl.core.coprocessor import init_coprocessor
from refimpl.core.decoder import init_params
from refimpl.core.layout import build_layout, context_runs, sample_trace_positions
from refimpl.core.objective import loss_cached
from refimpl.training.autodiff import value_and_grad

F64_RTOL = 1e-10
FD_EPS = 1e-6
CFG = get_preset("nano", vocab_size=53, init_std=0.2)


# ---------------------------------------------------------------------------------------------
# Plain compositions (autograd.numpy only; no refimpl code)
def plain_softmax(s):
    # the shift is a constant for the softmax, and anp.max has a VJP, so this is exact
    e = anp.exp(s - anp.max(s, axis=-1, keepdims=True))
    return e / anp.sum(e, axis=-1, keepdims=True)


def plain_logsumexp(x):
    m = anp.max(x, axis=-1, keepdims=True)
    return anp.log(anp.sum(anp.exp(x - m), axis=-1)) + m[..., 0]


def plain_rotate_half(x):
    half = x.shape[-1] // 2
    return anp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def plain_attention(q, k, v, bias):
    s = anp.matmul(q, anp.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1]) + bias
    return anp.matmul(plain_softmax(s), v)


def full_trace_bias(ctx_bias, own_bias, K):
    """The [B, 1, K*G, Tc + K*G] additive mask that trace_attention's two biases stand for:
    context visibility per trace, own_bias inside a trace's block, -inf across traces."""
    B, _, _, _, Tc = ctx_bias.shape
    G = own_bias.shape[0]
    ctx = np.broadcast_to(ctx_bias, (B, 1, K, G, Tc)).reshape(B, 1, K * G, Tc)
    own = np.full((K * G, K * G), -np.inf, dtype=own_bias.dtype)
    for t in range(K):
        own[t * G:(t + 1) * G, t * G:(t + 1) * G] = own_bias
    own = np.broadcast_to(own, (B, 1, K * G, K * G))
    return np.concatenate([ctx, own], axis=-1)


def trace_as_full(attend, cat, resh, q, k_ctx, v_ctx, k_own, v_own, ctx_bias, own_bias):
    # trace_attention written as one attention over [k_ctx; every trace's own keys]
    B, H, K, G, Dh = q.shape
    flat = lambda a: resh(a, (B, H, K * G, Dh))                                # noqa: E731
    out = attend(flat(q), cat(k_ctx, flat(k_own)), cat(v_ctx, flat(v_own)),
                 full_trace_bias(ctx_bias, own_bias, K))
    return resh(out, (B, H, K, G, Dh))


def plain_trace_attention(*args):
    return trace_as_full(plain_attention, lambda a, b: anp.concatenate([a, b], axis=2),
                         anp.reshape, *args)


def plain_cross_entropy(logits, targets):
    onehot = np.eye(logits.shape[-1], dtype=logits.dtype)[targets]
    return plain_logsumexp(logits) - anp.sum(logits * onehot, axis=-1)


def plain_take_rows(x, idx):
    return x[np.arange(x.shape[0])[:, None], idx]


def plain_split_heads(x, n_heads):
    B, T, D = x.shape
    return anp.transpose(anp.reshape(x, (B, T, n_heads, D // n_heads)), (0, 2, 1, 3))


def plain_merge_heads(x):
    B, H, T, Dh = x.shape
    return anp.reshape(anp.transpose(x, (0, 2, 1, 3)), (B, T, H * Dh))


def plain_repeat_kv(x, n_rep):
    # Hugging Face's repeat_kv: x[:, :, None].expand(B, Hkv, n_rep, ...).reshape(B, Hkv * n_rep, ...)
    B, Hkv = x.shape[:2]
    return anp.reshape(anp.concatenate([x[:, :, None]] * n_rep, axis=2), (B, Hkv * n_rep) + x.shape[2:])


# ---------------------------------------------------------------------------------------------
# Drawing inputs: hypothesis draws the shapes and a seed; the seed draws the values.
def ints(data, lo, hi, label):
    return data.draw(st.integers(lo, hi), label=label)


def head_dim(data):
    return data.draw(st.sampled_from([2, 4, 6, 8]), label="Dh")


def lead_shape(data):
    return tuple(data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=2), label="lead"))


def normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def visible_rows(rng, shape):
    """A random boolean may-attend [..., Tq, Tk] in which every query row sees at least one key."""
    m = rng.random(shape) < 0.6
    first = rng.integers(0, shape[-1], size=shape[:-1])
    return m | (np.arange(shape[-1]) == first[..., None])


def draw_linear(data, rng, dt):
    x = normal(rng, lead_shape(data) + (ints(data, 1, 5, "In"),), dt)
    return x, normal(rng, (ints(data, 1, 5, "Out"), x.shape[-1]), dt)


def draw_rmsnorm(data, rng, dt):
    x = normal(rng, lead_shape(data) + (ints(data, 1, 6, "D"),), dt)
    eps = data.draw(st.sampled_from([1e-5, 0.3]), label="eps")
    return x, (1.0 + normal(rng, x.shape[-1:], dt, 0.5)).astype(dt), eps


def draw_rope(data, rng, dt):
    B, H, T, Dh = ints(data, 1, 3, "B"), ints(data, 1, 3, "H"), ints(data, 1, 6, "T"), head_dim(data)
    positions = rng.integers(-1, 1000, size=(B, T))
    cos, sin = ops.rope_tables(positions, Dh, 10000.0, dt)
    return normal(rng, (B, H, T, Dh), dt), cos, sin


def draw_attention(data, rng, dt):
    B, H, Dh = ints(data, 1, 3, "B"), ints(data, 1, 3, "H"), head_dim(data)
    Tq, Tk = ints(data, 1, 6, "Tq"), ints(data, 1, 6, "Tk")
    mask_b = data.draw(st.sampled_from([1, B]), label="mask_B")
    bias = ops.additive_mask(visible_rows(rng, (mask_b, 1, Tq, Tk)), dt)
    return (normal(rng, (B, H, Tq, Dh), dt, 1.5), normal(rng, (B, H, Tk, Dh), dt, 1.5),
            normal(rng, (B, H, Tk, Dh), dt), bias)


def draw_trace_attention(data, rng, dt):
    B, H, Dh = ints(data, 1, 2, "B"), ints(data, 1, 2, "H"), head_dim(data)
    K, G, Tc = ints(data, 1, 3, "K"), ints(data, 1, 4, "G"), ints(data, 1, 5, "Tc")
    ctx_vis = rng.random((B, 1, K, 1, Tc)) < 0.6          # a trace may see no context at all
    own = np.tril(np.ones((G, G), dtype=bool))            # causal: every slot sees itself
    if data.draw(st.booleans(), label="own_random"):
        own = (rng.random((G, G)) < 0.5) | np.eye(G, dtype=bool)
    return (normal(rng, (B, H, K, G, Dh), dt, 1.5), normal(rng, (B, H, Tc, Dh), dt, 1.5),
            normal(rng, (B, H, Tc, Dh), dt), normal(rng, (B, H, K, G, Dh), dt, 1.5),
            normal(rng, (B, H, K, G, Dh), dt), ops.additive_mask(ctx_vis, dt),
            ops.additive_mask(own, dt))


def draw_swiglu(data, rng, dt):
    shape = lead_shape(data) + (ints(data, 1, 6, "F"),)
    return normal(rng, shape, dt, 3.0), normal(rng, shape, dt)


def draw_embedding(data, rng, dt):
    V, D = ints(data, 2, 11, "V"), ints(data, 1, 5, "D")
    ids = rng.integers(0, V, size=(ints(data, 1, 3, "B"), ints(data, 1, 6, "T")))  # repeats likely
    return normal(rng, (V, D), dt), ids


def draw_take_rows(data, rng, dt):
    B, S, D, R = ints(data, 1, 3, "B"), ints(data, 1, 6, "S"), ints(data, 1, 4, "D"), ints(data, 1, 6, "R")
    return normal(rng, (B, S, D), dt), rng.integers(0, S, size=(B, R))


def draw_cross_entropy(data, rng, dt):
    lead = lead_shape(data)
    V = ints(data, 2, 11, "V")
    return normal(rng, lead + (V,), dt, 3.0), rng.integers(0, V, size=lead)


def draw_mean(data, rng, dt):
    return (normal(rng, lead_shape(data) + (ints(data, 1, 5, "D"),), dt),)


def draw_add(data, rng, dt):
    shape = lead_shape(data) + (ints(data, 1, 5, "D"),)
    return normal(rng, shape, dt), normal(rng, shape, dt)


def draw_concat(data, rng, dt):
    shape = lead_shape(data) + (ints(data, 1, 4, "D"),)
    ax = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    other = list(shape)
    other[ax] = ints(data, 1, 4, "n_b")
    return normal(rng, shape, dt), normal(rng, tuple(other), dt), ax


def draw_reshape(data, rng, dt):
    shape = lead_shape(data) + (ints(data, 1, 4, "D"),)
    new = data.draw(st.sampled_from([(-1,), tuple(reversed(shape)), (1,) + shape, (-1, shape[-1])]),
                    label="new_shape")
    return normal(rng, shape, dt), new


def draw_split_heads(data, rng, dt):
    H, Dh = ints(data, 1, 3, "H"), head_dim(data)
    return normal(rng, (ints(data, 1, 3, "B"), ints(data, 1, 6, "T"), H * Dh), dt), H


def draw_merge_heads(data, rng, dt):
    B, H, T, Dh = ints(data, 1, 3, "B"), ints(data, 1, 3, "H"), ints(data, 1, 6, "T"), head_dim(data)
    return (normal(rng, (B, H, T, Dh), dt),)


def draw_repeat_kv(data, rng, dt):
    B, Hkv, T, Dh = ints(data, 1, 3, "B"), ints(data, 1, 3, "Hkv"), ints(data, 1, 5, "T"), head_dim(data)
    return normal(rng, (B, Hkv, T, Dh), dt), ints(data, 1, 3, "n_rep")


def draw_broadcast_rows(data, rng, dt):
    lead = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2), label="lead"))
    return normal(rng, (ints(data, 1, 4, "N"), ints(data, 1, 4, "D")), dt), lead


@dataclass(frozen=True)
class OpCase:
    op: object             # the refimpl primitive
    draw: object           # (data, rng, dtype) -> args
    diff: tuple            # the argnums that carry gradients
    plain: object          # the autograd.numpy composition with the same signature

    @property
    def name(self):
        return self.op.__name__


CASES = [
    OpCase(ops.linear, draw_linear, (0, 1), lambda x, w: anp.matmul(x, anp.transpose(w))),
    OpCase(ops.rmsnorm, draw_rmsnorm, (0, 1),
           lambda x, w, eps: w * x / anp.sqrt(anp.mean(x * x, axis=-1, keepdims=True) + eps)),
    OpCase(ops.rope, draw_rope, (0,), lambda x, cos, sin: x * cos + plain_rotate_half(x) * sin),
    OpCase(ops.attention, draw_attention, (0, 1, 2), plain_attention),
    OpCase(ops.trace_attention, draw_trace_attention, (0, 1, 2, 3, 4), plain_trace_attention),
    OpCase(ops.swiglu, draw_swiglu, (0, 1), lambda a, b: a / (1.0 + anp.exp(-a)) * b),
    OpCase(ops.embedding, draw_embedding, (0,), lambda table, ids: table[ids]),
    OpCase(ops.take_rows, draw_take_rows, (0,), plain_take_rows),
    OpCase(ops.cross_entropy, draw_cross_entropy, (0,), plain_cross_entropy),
    OpCase(ops.mean, draw_mean, (0,), anp.mean),
    OpCase(ops.add, draw_add, (0, 1), lambda a, b: a + b),
    OpCase(ops.concat, draw_concat, (0, 1), lambda a, b, axis: anp.concatenate([a, b], axis=axis)),
    OpCase(ops.reshape, draw_reshape, (0,), anp.reshape),
    OpCase(ops.split_heads, draw_split_heads, (0,), plain_split_heads),
    OpCase(ops.merge_heads, draw_merge_heads, (0,), plain_merge_heads),
    OpCase(ops.repeat_kv, draw_repeat_kv, (0,), plain_repeat_kv),
    OpCase(ops.broadcast_rows, draw_broadcast_rows, (0,),
           lambda x, lead: x * np.ones(tuple(lead) + x.shape, dtype=x.dtype)),
]
by_name = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def draw_args(case, data, dtype=np.float64):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return case.draw(data, rng, dtype), rng


def cotangent(rng, like):
    a = np.asarray(like)
    return (rng.standard_normal(a.shape)).astype(a.dtype)


def vjp_of(fun, args, argnums, g):
    """Gradients of sum(fun(*args) * g) wrt args[argnums], only those args boxed."""
    vjp, _ = make_vjp(fun, tuple(argnums))(*args)
    return dict(zip(argnums, vjp(g)))


def assert_close(actual, expected, rtol, what):
    expected = np.asarray(expected)
    atol = rtol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# ---------------------------------------------------------------------------------------------
def test_every_primitive_has_a_case():
    assert [c.op for c in CASES] == list(ops.PRIMITIVES)


@by_name
@given(data=st.data())
def test_forward_equals_plain_composition(case, data):
    args, _ = draw_args(case, data)
    out = case.op(*args)
    assert np.all(np.isfinite(out))
    assert_close(out, case.plain(*args), 1e-12, case.name)


@by_name
@given(data=st.data())
def test_vjp_equals_autograd_of_plain_composition(case, data):
    """Full argnums, each argnum alone, and a drawn subset: the partial-argnums paths.
    Also: a VJP never writes into the cotangent it receives."""
    args, rng = draw_args(case, data)
    g = cotangent(rng, case.plain(*args))
    want = vjp_of(case.plain, args, case.diff, g)
    subset = tuple(sorted(data.draw(st.sets(st.sampled_from(case.diff), min_size=1), label="subset")))
    g_before = np.array(g, copy=True)
    for argnums in {case.diff, subset, *((i,) for i in case.diff)}:
        got = vjp_of(case.op, args, argnums, g)
        assert np.array_equal(g, g_before), f"{case.name}'s VJP wrote into its cotangent"
        assert sorted(got) == list(argnums)
        for i in argnums:
            assert got[i].shape == np.shape(args[i])
            assert_close(got[i], want[i], F64_RTOL, f"{case.name} d/darg{i} (boxed {argnums})")


@by_name
@settings(max_examples=15)
@given(data=st.data())
def test_vjp_equals_finite_differences(case, data):
    args, rng = draw_args(case, data)
    g = cotangent(rng, case.op(*args))
    grads = vjp_of(case.op, args, case.diff, g)

    def f(shifted):
        return float(np.sum(case.op(*shifted) * g))

    for i in case.diff:
        for _ in range(2):
            d = rng.standard_normal(np.shape(args[i]))
            plus = list(args)
            minus = list(args)
            plus[i] = args[i] + FD_EPS * d
            minus[i] = args[i] - FD_EPS * d
            numeric = (f(plus) - f(minus)) / (2 * FD_EPS)
            analytic = float(np.sum(grads[i] * d))
            scale = 1.0 + float(np.sum(np.abs(grads[i] * d)))
            assert abs(numeric - analytic) <= 1e-6 * scale, (case.name, i, numeric, analytic)


@by_name
@settings(max_examples=10)
@given(data=st.data())
def test_float32_stays_float32(case, data):
    args, rng = draw_args(case, data, np.float32)
    out = case.op(*args)
    assert np.asarray(out).dtype == np.float32, f"{case.name} forward gave {np.asarray(out).dtype}"
    g = cotangent(rng, out)
    grads = vjp_of(case.op, args, case.diff, g)
    for i, d in grads.items():
        assert np.asarray(d).dtype == np.float32, f"{case.name} d/darg{i} is {np.asarray(d).dtype}"
    # and float32 is float64 to float32 accuracy
    args64 = tuple(a.astype(np.float64) if getattr(a, "dtype", None) == np.float32 else a for a in args)
    assert_close(out, case.op(*args64), 1e-4, case.name)
    want = vjp_of(case.op, args64, case.diff, g.astype(np.float64))
    for i in case.diff:
        assert_close(grads[i], want[i], 1e-3, f"{case.name} d/darg{i}")


# ---------------------------------------------------------------------------------------------
# trace_attention is the blockwise fast path of `attention` with the full multi-trace mask
@settings(max_examples=60)
@given(data=st.data())
def test_trace_attention_equals_attention_over_concatenated_keys(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    args = draw_trace_attention(data, rng, np.float64)
    as_full = lambda *a: trace_as_full(ops.attention, lambda x, y: ops.concat(x, y, 2),  # noqa: E731
                                       ops.reshape, *a)
    out = ops.trace_attention(*args)
    assert_close(out, as_full(*args), 1e-12, "forward")
    g = rng.standard_normal(out.shape)
    diff = (0, 1, 2, 3, 4)
    got, want = vjp_of(ops.trace_attention, args, diff, g), vjp_of(as_full, args, diff, g)
    for i, name in zip(diff, ("q", "k_ctx", "v_ctx", "k_own", "v_own")):
        assert_close(got[i], want[i], F64_RTOL, f"d/d{name}")


def test_trace_attention_never_sees_other_traces_or_hidden_context():
    """Changing a key/value the mask hides changes nothing; changing a visible one does."""
    rng = np.random.default_rng(0)
    B, H, K, G, Tc, Dh = 1, 2, 3, 3, 4, 4
    q, k_ctx, v_ctx, k_own, v_own = (rng.standard_normal(s) for s in
                                     [(B, H, K, G, Dh), (B, H, Tc, Dh), (B, H, Tc, Dh),
                                      (B, H, K, G, Dh), (B, H, K, G, Dh)])
    ctx_vis = np.zeros((B, 1, K, 1, Tc), dtype=bool)
    ctx_vis[0, 0, 0, 0, :2] = True                         # trace 0 sees context slots 0, 1
    ctx_vis[0, 0, 1, 0, :] = True                          # trace 1 sees all; trace 2 sees none
    ctx_bias = ops.additive_mask(ctx_vis, np.float64)
    own_bias = ops.additive_mask(np.tril(np.ones((G, G), dtype=bool)), np.float64)
    base = ops.trace_attention(q, k_ctx, v_ctx, k_own, v_own, ctx_bias, own_bias)
    v_ctx2 = v_ctx.copy()
    v_ctx2[..., 3, :] += 1.0                               # context slot 3: seen by trace 1 only
    out = ops.trace_attention(q, k_ctx, v_ctx2, k_own, v_own, ctx_bias, own_bias)
    assert np.array_equal(out[:, :, [0, 2]], base[:, :, [0, 2]])
    assert not np.allclose(out[:, :, 1], base[:, :, 1])
    v_own2 = v_own.copy()
    v_own2[:, :, 2, 1] += 1.0                              # trace 2, slot 1
    out = ops.trace_attention(q, k_ctx, v_ctx, k_own, v_own2, ctx_bias, own_bias)
    assert np.array_equal(out[:, :, :2], base[:, :, :2])   # other traces untouched
    assert np.array_equal(out[:, :, 2, :1], base[:, :, 2, :1])  # earlier slot untouched (causal)
    assert not np.allclose(out[:, :, 2, 1:], base[:, :, 2, 1:])
    # trace 2 sees no context: its slot 0 attends only to itself
    np.testing.assert_allclose(base[:, :, 2, 0], v_own[:, :, 2, 0], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# RoPE tables follow the rotate-half convention of docs/choices.md (RoPE pairing) literally
@given(data=st.data())
def test_rope_tables_follow_the_spec_formula(data):
    Dh = head_dim(data)
    theta = data.draw(st.sampled_from([100.0, 10000.0]), label="theta")
    positions = np.array([data.draw(st.lists(st.integers(-1, 500), min_size=1, max_size=5), label="pos")])
    cos, sin = ops.rope_tables(positions, Dh, theta, np.float64)
    assert cos.shape == sin.shape == (1, 1, positions.shape[1], Dh)
    for t, pos in enumerate(positions[0]):
        for i in range(Dh // 2):
            angle = pos * theta ** (-2 * i / Dh)
            for dim in (i, i + Dh // 2):                   # dim i is paired with dim i + Dh/2
                assert cos[0, 0, t, dim] == pytest.approx(math.cos(angle), abs=1e-12)
                assert sin[0, 0, t, dim] == pytest.approx(math.sin(angle), abs=1e-12)


def test_rope_rotates_pairs_i_and_i_plus_half():
    # a unit vector on dim i at position p goes to (cos, sin) on dims (i, i + Dh/2)
    Dh, i, p = 8, 1, 3
    x = np.zeros((1, 1, 1, Dh))
    x[..., i] = 1.0
    cos, sin = ops.rope_tables(np.array([[p]]), Dh, 10000.0, np.float64)
    y = ops.rope(x, cos, sin)[0, 0, 0]
    angle = p * 10000.0 ** (-2 * i / Dh)
    expect = np.zeros(Dh)
    expect[i], expect[i + Dh // 2] = math.cos(angle), math.sin(angle)
    np.testing.assert_allclose(y, expect, atol=1e-15)
    assert ops.rope_tables(np.array([[p]]), Dh, 10000.0, np.float32)[0].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Fast paths == plain paths: the blockwise runs of trace_attention and the lse handoff
def _trace_args(rng, B, H, K, G, Tc, Dh, dtype=np.float64):
    """trace_attention inputs whose context visibility is a prefix per trace (as in training)."""
    seen = rng.integers(0, Tc + 1, size=(B, K))                           # trace k sees slots < seen
    vis = np.arange(Tc) < seen[..., None]                                 # [B, K, Tc]
    f = lambda *s, scale=1.5: (rng.standard_normal(s) * scale).astype(dtype)  # noqa: E731
    args = (f(B, H, K, G, Dh), f(B, H, Tc, Dh), f(B, H, Tc, Dh, scale=1.0), f(B, H, K, G, Dh),
            f(B, H, K, G, Dh, scale=1.0), ops.additive_mask(vis[:, None, :, None, :], dtype),
            ops.additive_mask(np.tril(np.ones((G, G), dtype=bool)), dtype))
    return args, vis


@settings(max_examples=40)
@given(data=st.data())
def test_trace_attention_in_runs_equals_one_run(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    B, H, K, G, Tc = (data.draw(st.integers(1, n), label=name) for name, n in
                      (("B", 2), ("H", 2), ("K", 6), ("G", 4), ("Tc", 7)))
    args, vis = _trace_args(rng, B, H, K, G, Tc, 4)
    runs = context_runs(vis, n_runs=data.draw(st.integers(1, 4), label="n_runs"))
    g = rng.standard_normal(args[0].shape)
    diff = (0, 1, 2, 3, 4)
    one_vjp, one = make_vjp(ops.trace_attention, diff)(*args)
    runs_vjp, cut = make_vjp(lambda *a: ops.trace_attention(*a, runs=runs), diff)(*args)
    np.testing.assert_allclose(cut, one, rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(runs_vjp(g), one_vjp(g))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"d/darg{i}, runs {runs}")


@settings(max_examples=30)
@given(data=st.data())
def test_context_runs_cover_the_traces_and_every_visible_slot(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    B, K, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 12))
    vis = rng.random((B, K, T)) < data.draw(st.sampled_from([0.0, 0.3, 0.9]))  # any pattern, even none
    runs = context_runs(vis, n_runs=data.draw(st.integers(1, 5)))
    assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]] and runs[-1][1] == K
    for k0, k1, n in runs:
        assert k1 > k0 and 1 <= n <= T
        assert not vis[:, k0:k1, n:].any(), "a run cut off a context slot one of its traces sees"


@pytest.mark.parametrize("op", ["attention", "trace_attention"])
def test_backward_from_forward_lse_equals_recomputed(op, monkeypatch):
    """The VJP that takes the forward's lse == the VJP that recomputes it (the fallback)."""
    rng = np.random.default_rng(7)
    if op == "attention":
        vis = rng.random((2, 1, 5, 6)) < 0.6
        vis[..., 0] = True
        args = (rng.standard_normal((2, 3, 5, 4)) * 2, rng.standard_normal((2, 3, 6, 4)) * 2,
                rng.standard_normal((2, 3, 6, 4)), ops.additive_mask(vis, np.float64))
        diff = (0, 1, 2)
    else:
        args, _ = _trace_args(rng, 2, 2, 3, 4, 6, 4)
        diff = (0, 1, 2, 3, 4)
    fn = getattr(ops, op)
    g = rng.standard_normal(fn(*args).shape)
    vjp_hit, _ = make_vjp(fn, diff)(*args)
    monkeypatch.setattr(ops, "_lse_or_none", lambda out: None)         # as if the handoff were lost
    vjp_miss, _ = make_vjp(fn, diff)(*args)
    for i, (a, b) in enumerate(zip(vjp_hit(g), vjp_miss(g))):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13, err_msg=f"{op} d/darg{diff[i]}")


def test_lse_handoff_is_taken_only_by_its_own_output():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 3, 2)) for _ in range(3))
    bias = np.zeros((1, 1, 3, 3))
    out = ops.attention(q, k, v, bias)
    other = ops.attention(q, k, v, bias)                                  # a later call replaces it
    assert ops._lse_or_none(out) is None
    out = ops.attention(q, k, v, bias)
    assert ops._lse_or_none(out).shape == (1, 1, 3, 1)
    assert ops._lse_or_none(out) is None and other is not None             # taken once


def test_train_step_gradients_with_and_without_runs(monkeypatch):
    dec = init_params(CFG, seed=1, dtype=np.float64)
    trainable = init_coprocessor(dec, CFG, 3, seed=1)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (2, 30))
    positions = sample_trace_positions(rng, 2, 30, 8, 4)
    assert len(context_runs(build_layout(tokens, positions, 3, 4).context_visible(), n_context_runs(np))) == 4

    def run():
        return value_and_grad(lambda t: loss_cached(dec, t, CFG, tokens, positions, 3, 4)[0], trainable)
    loss, grads, _ = run()
    used = set()

    def one_run(module):                                                   # one run over all of T
        return lambda visible, n_runs: used.add(module.__name__)
    for module in (coprocessor, objective):                                # the callers of context_runs
        monkeypatch.setattr(module, "context_runs", one_run(module))
    loss1, grads1, _ = run()
    assert used == {coprocessor.__name__, objective.__name__}, "a pass kept its runs"
    assert float(loss) == pytest.approx(float(loss1), rel=1e-13)
    for name in grads:
        np.testing.assert_allclose(grads[name], grads1[name], rtol=1e-10, atol=1e-14, err_msg=name)
