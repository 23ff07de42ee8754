"""The ops of the transformer, each an autograd primitive with its backward pass beside it.

Every op that a gradient flows through is defined here, forward and VJP side by side
(the llm.c `layernorm.py` pattern), and written against the array module of its inputs
(`xp_of`), never against `autograd.numpy`. autograd's own VJPs for sum/mean/dot/getitem
allocate host NumPy arrays and fail on CuPy; these do not. Each op is checked against finite
differences and against autograd's derivative of the plain NumPy composition in
tests/test_ops.py.

Conventions: activations are [..., D]; attention heads are batched as [B, H, T, Dh];
Linear weights are stored [out, in] (Hugging Face layout), so linear(x, w) = x @ w.T.
A VJP never writes into the cotangent g it receives.
"""
import math

from autograd.extend import defvjp, defvjp_argnums, primitive

from .backend import xp_of


# ---------------------------------------------------------------------------------------------
# linear: y = x @ w.T
@primitive
def linear(x, w):
    # [..., In], [Out, In] -> [..., Out]
    return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])


def _linear_vjp(argnums, y, args, kwargs):
    x, w = args

    def vjp(g):
        g2 = g.reshape(-1, w.shape[0])                                   # [N, Out]
        dx = (g2 @ w).reshape(x.shape) if 0 in argnums else None         # [N, In]
        dw = g2.T @ x.reshape(-1, x.shape[-1]) if 1 in argnums else None  # [Out, In]
        return [d for i, d in ((0, dx), (1, dw)) if i in argnums]
    return vjp


defvjp_argnums(linear, _linear_vjp)


# ---------------------------------------------------------------------------------------------
# RMSNorm: y = w * x / sqrt(mean(x^2) + eps)
def _rms_inverse(x, eps):
    # [..., D] -> [..., 1]
    xp = xp_of(x)
    return 1.0 / xp.sqrt((x * x).mean(-1, keepdims=True) + eps)


@primitive
def rmsnorm(x, w, eps):
    # [..., D], [D] -> [..., D]
    return x * _rms_inverse(x, eps) * w


def _rmsnorm_vjp(argnums, y, args, kwargs):
    x, w, eps = args

    def vjp(g):
        r = _rms_inverse(x, eps)                                          # [..., 1]
        out = []
        if 0 in argnums:
            gw = g * w
            out.append(r * (gw - x * (r * r) * (gw * x).mean(-1, keepdims=True)))
        if 1 in argnums:
            out.append((g * x * r).reshape(-1, x.shape[-1]).sum(0))      # [D]
        return out
    return vjp


defvjp_argnums(rmsnorm, _rmsnorm_vjp)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding, "rotate-half" pairing (dim i with dim i + Dh/2), explicit positions.
def rotate_half(x):
    # [..., Dh] -> [..., Dh]: [x1, x2] -> [-x2, x1]
    xp = xp_of(x)
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_tables(positions, head_dim, theta, dtype):
    """cos, sin for integer position ids: [B, T] -> two [B, 1, T, Dh] (broadcast over heads).

    Angle of pair i at position p is p * theta^(-2i/Dh), i = 0..Dh/2-1, computed in float64.
    """
    xp = xp_of(positions)
    inv_freq = theta ** (-xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)  # [Dh/2]
    angles = positions.astype(xp.float64)[..., None] * inv_freq                     # [B, T, Dh/2]
    angles = xp.concatenate([angles, angles], axis=-1)[:, None]                     # [B, 1, T, Dh]
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


@primitive
def rope(x, cos, sin):
    # [B, H, T, Dh], [B, 1, T, Dh], [B, 1, T, Dh] -> [B, H, T, Dh]
    return x * cos + rotate_half(x) * sin


def _rope_vjp(y, x, cos, sin):
    # the transpose of rotate_half is -rotate_half
    return lambda g: g * cos - rotate_half(g * sin)


defvjp(rope, _rope_vjp)


# ---------------------------------------------------------------------------------------------
# Masked attention: softmax(q k^T / sqrt(Dh) + bias) v. bias is 0 where a query may attend a key
# and -inf elsewhere (`additive_mask`). The backward recomputes the probabilities, as
# FlashAttention does, instead of keeping them alive between the passes.
def additive_mask(may_attend, dtype):
    """Boolean may-attend [..., Tq, Tk] -> additive bias of the same shape: 0 or -inf."""
    xp = xp_of(may_attend)
    return xp.where(may_attend, 0.0, -xp.inf).astype(dtype)


def _softmax(s):
    # [..., Tk] -> [..., Tk], in place on s
    xp = xp_of(s)
    s -= s.max(-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s


def _attention_probs(q, k, bias):
    # [B, H, Tq, Dh], [B, H, Tk, Dh], [B|1, H|1, Tq, Tk] -> [B, H, Tq, Tk]
    s = q @ k.swapaxes(-1, -2)
    s *= 1.0 / math.sqrt(q.shape[-1])
    s += bias
    return _softmax(s)


@primitive
def attention(q, k, v, bias):
    # [B, H, Tq, Dh], [B, H, Tk, Dh], [B, H, Tk, Dh], [B|1, 1, Tq, Tk] -> [B, H, Tq, Dh]
    return _attention_probs(q, k, bias) @ v


def _attention_vjp(argnums, out, args, kwargs):
    q, k, v, bias = args
    scale = 1.0 / math.sqrt(q.shape[-1])

    def vjp(g):
        p = _attention_probs(q, k, bias)                                  # [B, H, Tq, Tk]
        grads = {}
        if 2 in argnums:
            grads[2] = p.swapaxes(-1, -2) @ g                             # [B, H, Tk, Dh]
        ds = g @ v.swapaxes(-1, -2)                                       # dP: [B, H, Tq, Tk]
        ds -= (g * out).sum(-1, keepdims=True)                            # rowdot(dP, P) = rowdot(g, out)
        ds *= p
        ds *= scale
        if 0 in argnums:
            grads[0] = ds @ k                                             # [B, H, Tq, Dh]
        if 1 in argnums:
            grads[1] = ds.swapaxes(-1, -2) @ q                            # [B, H, Tk, Dh]
        return [grads[i] for i in argnums]
    return vjp


defvjp_argnums(attention, _attention_vjp)


# ---------------------------------------------------------------------------------------------
# Trace attention: the blockwise form of the multi-trace mask (SPEC §6, cached form).
# K traces of G slots each attend to (a) a shared context cache of Tc slots, through a per-trace
# visibility bias, and (b) the slots of their own trace, causally. One softmax spans both.
# This equals `attention` over the concatenated keys with the full block mask, without ever
# building the [K*G, Tc + K*G] mask (tests/test_ops.py checks the equality).
def _trace_scores(q, k_ctx, ctx_bias, k_own, own_bias):
    # [B,H,K,G,Dh], [B,H,Tc,Dh], [B,1,K,1,Tc], [B,H,K,G,Dh], [G,G] -> [B,H,K,G,Tc], [B,H,K,G,G]
    B, H, K, G, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh)
    s_ctx = (q.reshape(B, H, K * G, Dh) @ k_ctx.swapaxes(-1, -2)).reshape(B, H, K, G, -1)
    s_ctx *= scale
    s_ctx += ctx_bias
    s_own = q @ k_own.swapaxes(-1, -2)
    s_own *= scale
    s_own += own_bias
    return s_ctx, s_own


def _trace_probs(q, k_ctx, ctx_bias, k_own, own_bias):
    # joint softmax over the Tc context keys and the G own keys
    xp = xp_of(q)
    s_ctx, s_own = _trace_scores(q, k_ctx, ctx_bias, k_own, own_bias)
    m = xp.maximum(s_ctx.max(-1, keepdims=True), s_own.max(-1, keepdims=True))
    s_ctx -= m
    s_own -= m
    xp.exp(s_ctx, out=s_ctx)
    xp.exp(s_own, out=s_own)
    z = s_ctx.sum(-1, keepdims=True) + s_own.sum(-1, keepdims=True)
    s_ctx /= z
    s_own /= z
    return s_ctx, s_own


def _ctx_matmul(p_ctx, v_ctx):
    # [B,H,K,G,Tc], [B,H,Tc,Dh] -> [B,H,K,G,Dh]
    B, H, K, G, Tc = p_ctx.shape
    return (p_ctx.reshape(B, H, K * G, Tc) @ v_ctx).reshape(B, H, K, G, -1)


@primitive
def trace_attention(q, k_ctx, v_ctx, k_own, v_own, ctx_bias, own_bias):
    # [B,H,K,G,Dh], [B,H,Tc,Dh] x2, [B,H,K,G,Dh] x2, [B,1,K,1,Tc], [G,G] -> [B,H,K,G,Dh]
    p_ctx, p_own = _trace_probs(q, k_ctx, ctx_bias, k_own, own_bias)
    return _ctx_matmul(p_ctx, v_ctx) + p_own @ v_own


def _trace_attention_vjp(argnums, out, args, kwargs):
    q, k_ctx, v_ctx, k_own, v_own, ctx_bias, own_bias = args
    B, H, K, G, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh)

    def vjp(g):
        p_ctx, p_own = _trace_probs(q, k_ctx, ctx_bias, k_own, own_bias)
        g2 = g.reshape(B, H, K * G, Dh)
        grads = {}
        if 2 in argnums:                                                  # [B,H,Tc,Dh]
            grads[2] = p_ctx.reshape(B, H, K * G, -1).swapaxes(-1, -2) @ g2
        if 4 in argnums:                                                  # [B,H,K,G,Dh]
            grads[4] = p_own.swapaxes(-1, -2) @ g
        rowdot = (g * out).sum(-1, keepdims=True)                         # [B,H,K,G,1]
        ds_ctx = (g2 @ v_ctx.swapaxes(-1, -2)).reshape(p_ctx.shape)
        ds_ctx -= rowdot
        ds_ctx *= p_ctx
        ds_ctx *= scale
        ds_own = g @ v_own.swapaxes(-1, -2)
        ds_own -= rowdot
        ds_own *= p_own
        ds_own *= scale
        if 0 in argnums:
            grads[0] = _ctx_matmul(ds_ctx, k_ctx) + ds_own @ k_own
        if 1 in argnums:
            grads[1] = ds_ctx.reshape(B, H, K * G, -1).swapaxes(-1, -2) @ q.reshape(B, H, K * G, Dh)
        if 3 in argnums:
            grads[3] = ds_own.swapaxes(-1, -2) @ q
        return [grads[i] for i in argnums]
    return vjp


defvjp_argnums(trace_attention, _trace_attention_vjp)


# ---------------------------------------------------------------------------------------------
# SwiGLU gate: silu(a) * b, with silu(a) = a * sigmoid(a)
def _sigmoid(a):
    xp = xp_of(a)
    return 1.0 / (1.0 + xp.exp(-a))


@primitive
def swiglu(a, b):
    # [..., F], [..., F] -> [..., F]
    return a * _sigmoid(a) * b


def _swiglu_vjp(argnums, y, args, kwargs):
    a, b = args

    def vjp(g):
        sig = _sigmoid(a)
        out = []
        if 0 in argnums:
            out.append(g * b * sig * (1.0 + a * (1.0 - sig)))
        if 1 in argnums:
            out.append(g * a * sig)
        return out
    return vjp


defvjp_argnums(swiglu, _swiglu_vjp)


# ---------------------------------------------------------------------------------------------
# Embedding gather and its scatter-add backward
def scatter_add_rows(xp, n_rows, idx, values):
    """zeros [n_rows, D] with values [N, D] added at rows idx [N] (repeats accumulate)."""
    out = xp.zeros((n_rows, values.shape[-1]), dtype=values.dtype)
    if xp.__name__ == "numpy":
        xp.add.at(out, idx, values)
    else:
        import cupyx
        cupyx.scatter_add(out, idx, values)
    return out


@primitive
def embedding(table, ids):
    # [V, D], int [...] -> [..., D]
    return table[ids]


def _embedding_vjp(y, table, ids):
    xp = xp_of(table)
    return lambda g: scatter_add_rows(xp, table.shape[0], ids.ravel(), g.reshape(-1, table.shape[1]))


defvjp(embedding, _embedding_vjp)


# ---------------------------------------------------------------------------------------------
# Row gather along axis 1: x [B, S, D], idx int [B, R] -> [B, R, D] (read-out of scored slots)
@primitive
def take_rows(x, idx):
    # [B, S, D], [B, R] -> [B, R, D]
    xp = xp_of(x)
    return x[xp.arange(x.shape[0])[:, None], idx]


def _take_rows_vjp(y, x, idx):
    xp = xp_of(x)
    B, S, D = x.shape
    flat = (idx + S * xp.arange(B)[:, None]).ravel()                      # rows of x.reshape(B*S, D)
    return lambda g: scatter_add_rows(xp, B * S, flat, g.reshape(-1, D)).reshape(B, S, D)


defvjp(take_rows, _take_rows_vjp)


# ---------------------------------------------------------------------------------------------
# Cross-entropy per scored target: nll = logsumexp(logits) - logits[target]
@primitive
def cross_entropy(logits, targets):
    # [..., V], int [...] -> [...]
    xp = xp_of(logits)
    m = logits.max(-1, keepdims=True)
    lse = xp.log(xp.exp(logits - m).sum(-1)) + m[..., 0]
    picked = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def _cross_entropy_vjp(nll, logits, targets):
    xp = xp_of(logits)

    def vjp(g):
        V = logits.shape[-1]
        p = xp.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        p2 = p.reshape(-1, V)
        p2[xp.arange(p2.shape[0]), targets.ravel()] -= 1.0                 # softmax - onehot
        return p * g[..., None]
    return vjp


defvjp(cross_entropy, _cross_entropy_vjp)


# ---------------------------------------------------------------------------------------------
# Shape and bookkeeping ops: exact, with trivial VJPs, so nothing on the path is autograd's own.
@primitive
def mean(x):
    # [...] -> []
    return x.mean()


defvjp(mean, lambda y, x: lambda g: xp_of(x).broadcast_to(g / x.size, x.shape).astype(x.dtype))


@primitive
def add(a, b):
    # [...], [...] (same shape) -> [...]
    return a + b


defvjp(add, lambda y, a, b: lambda g: g, lambda y, a, b: lambda g: g)


@primitive
def concat(a, b, axis):
    # two arrays equal but on axis -> one
    return xp_of(a, b).concatenate([a, b], axis=axis)


def _concat_vjp(part):
    def maker(y, a, b, axis):
        n = a.shape[axis]
        ax = axis % y.ndim
        cut = (slice(None),) * ax
        return lambda g: g[cut + (slice(0, n),)] if part == 0 else g[cut + (slice(n, None),)]
    return maker


defvjp(concat, _concat_vjp(0), _concat_vjp(1))


@primitive
def reshape(x, shape):
    # [...] -> shape
    return x.reshape(shape)


defvjp(reshape, lambda y, x, shape: lambda g: g.reshape(x.shape))


@primitive
def split_heads(x, n_heads):
    # [B, T, H*Dh] -> [B, H, T, Dh]
    B, T, D = x.shape
    return x.reshape(B, T, n_heads, D // n_heads).transpose(0, 2, 1, 3)


@primitive
def merge_heads(x):
    # [B, H, T, Dh] -> [B, T, H*Dh]
    B, H, T, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)


defvjp(split_heads, lambda y, x, n_heads: lambda g: merge_heads(g))
defvjp(merge_heads, lambda y, x: lambda g: split_heads(g, x.shape[1]))


@primitive
def broadcast_rows(x, lead_shape):
    # [N, D] -> [*lead_shape, N, D]: the same rows for every leading index (shared soft tokens)
    xp = xp_of(x)
    return xp.broadcast_to(x, tuple(lead_shape) + x.shape).copy()


defvjp(broadcast_rows, lambda y, x, lead_shape: lambda g: g.reshape((-1,) + x.shape).sum(0))


PRIMITIVES = (linear, rmsnorm, rope, attention, trace_attention, swiglu, embedding, take_rows,
              cross_entropy, mean, add, concat, reshape, split_heads, merge_heads, broadcast_rows)
