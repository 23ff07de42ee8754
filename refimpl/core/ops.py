"""Every op a gradient flows through, an autograd primitive with its VJP beside it (llm.c's
`layernorm.py` pattern), on the array module of its inputs (`xp_of`): autograd's own VJPs for
sum/mean/dot/getitem allocate host NumPy arrays and fail on CuPy. tests/test_ops.py checks each.

Activations are [..., D], heads [B, H, T, Dh], Linear weights [out, in]. A VJP never writes into
its cotangent g. For speed (docs/performance.md) the ops work in place on temporaries they own,
keep float32 as float32 (Python float scalars) and reuse what the forward knows (lse, below)."""
import math
import threading

from autograd.extend import defvjp, defvjp_argnums, primitive

from ..backend import xp_of


# linear: y = x @ w.T
@primitive
def linear(x, w):
    # [..., In], [Out, In] -> [..., Out]
    return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])


defvjp(linear, lambda y, x, w: lambda g: (g.reshape(-1, w.shape[0]) @ w).reshape(x.shape),     # dx = g w
       lambda y, x, w: lambda g: g.reshape(-1, w.shape[0]).T @ x.reshape(-1, x.shape[-1]))  # dw = g^T x


# RMSNorm: y = w * x / sqrt(mean(x^2) + eps)
def _rowdot(a, b):
    # [..., N], [..., N] -> [..., 1]: the dot product of every row, with no [..., N] temporary
    return xp_of(a).einsum("...i,...i->...", a, b)[..., None]


def _rms_inverse(x, eps):
    # [..., D] -> [..., 1]: 1 / sqrt(mean(x^2) + eps)
    xp = xp_of(x)
    r = _rowdot(x, x)                                                    # sum of squares
    r *= 1.0 / x.shape[-1]
    r += eps
    xp.sqrt(r, out=r)
    return xp.reciprocal(r, out=r)


@primitive
def rmsnorm(x, w, eps):
    # [..., D], [D] -> [..., D]
    y = x * _rms_inverse(x, eps)
    y *= w
    return y


def _rmsnorm_vjp(argnums, y, args, kwargs):
    x, w, eps = args

    def vjp(g):
        r = _rms_inverse(x, eps)                                          # [..., 1]
        xhat = x * r                                                      # [..., D]
        out = {}
        if 1 in argnums:
            out[1] = (g * xhat).reshape(-1, x.shape[-1]).sum(0)          # [D]
        if 0 in argnums:                  # dx = r * (gw - xhat * mean(gw * xhat)), gw = g * w
            gw = g * w
            c = _rowdot(gw, xhat)
            c *= 1.0 / x.shape[-1]
            xhat *= c
            gw -= xhat
            gw *= r
            out[0] = gw
        return [out[i] for i in argnums]
    return vjp


defvjp_argnums(rmsnorm, _rmsnorm_vjp)


# Rotary position embedding, "rotate-half" pairing (dim i with dim i + Dh/2), explicit positions.
def rotate_half(x):
    # [..., Dh] -> [..., Dh]: [x1, x2] -> [-x2, x1]
    half = x.shape[-1] // 2
    return xp_of(x).concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_tables(positions, head_dim, theta, dtype):
    """cos, sin for integer position ids: [B, T] -> two [B, 1, T, Dh] (broadcast over heads).
    Angle of pair i at position p is p * theta^(-2i/Dh), i = 0..Dh/2-1, computed in float64."""
    xp = xp_of(positions)
    inv_freq = theta ** (-xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)  # [Dh/2]
    angles = positions.astype(xp.float64)[..., None] * inv_freq                     # [B, T, Dh/2]
    angles = xp.concatenate([angles, angles], axis=-1)[:, None]                     # [B, 1, T, Dh]
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


@primitive
def rope(x, cos, sin):
    # [B, H, T, Dh], [B, 1, T, Dh], [B, 1, T, Dh] -> [B, H, T, Dh]: x * cos + rotate_half(x) * sin
    y = x * cos
    r = rotate_half(x)
    r *= sin
    y += r
    return y


def _rope_vjp(y, x, cos, sin):
    # the transpose of rotate_half is -rotate_half: dx = g * cos - rotate_half(g * sin)
    def vjp(g):
        dx = g * cos
        dx -= rotate_half(g * sin)
        return dx
    return vjp


defvjp(rope, _rope_vjp)


# Masked attention: softmax(q k^T / sqrt(Dh) + bias) v, bias 0 where a query may attend a key and
# -inf elsewhere. Like FlashAttention the backward recomputes the probabilities instead of keeping
# them alive, from the forward's row log-sum-exp (lse, [..., 1]): P = exp(S - lse), no max, no sum,
# no division over the [Tq, Tk] scores.
def additive_mask(may_attend, dtype):
    """Boolean may-attend [..., Tq, Tk] -> additive bias of the same shape: 0 or -inf."""
    xp = xp_of(may_attend)
    return xp.where(may_attend, 0.0, -xp.inf).astype(dtype)


# The forward's lse, handed to its VJP: autograd calls a primitive's VJP maker right after the
# forward; the forward leaves (output, lse) here, the maker takes it back by the identity of that
# output, or else recomputes it (None). Thread-local: `generate --delay` runs the coprocessor in a thread.
_handoff = threading.local()


def _leave_lse(out, lse):
    _handoff.last = (out, lse)
    return out


def _lse_or_none(out):
    last, _handoff.last = getattr(_handoff, "last", None), None
    return last[1] if last is not None and last[0] is out else None


def _scaled(q):
    # q / sqrt(Dh): scaling q costs Tk/Dh times less than scaling the scores
    return q * (1.0 / math.sqrt(q.shape[-1]))


def _stable_exp(*scores):
    # in place: each scores array s <- exp(s - m), m the row max over all of them jointly;
    # returns the row sum z (over all of them) and lse = m + log(z), both [..., 1]
    xp = xp_of(scores[0])
    m = scores[0].max(-1, keepdims=True)
    for s in scores[1:]:
        xp.maximum(m, s.max(-1, keepdims=True), out=m)
    z = 0.0
    for s in scores:
        s -= m
        xp.exp(s, out=s)
        z = z + s.sum(-1, keepdims=True)
    return z, m + xp.log(z)


def _probs_in_place(lse, *scores):
    # each scores array s <- P = exp(s - lse), one softmax across all of them; lse None: recompute it
    if lse is None:
        z, _ = _stable_exp(*scores)
        for s in scores:
            s /= z
    else:
        for s in scores:
            s -= lse
            xp_of(s).exp(s, out=s)


def _dscores(dp, rowdot, p):
    # in place on dP: dS = P * (dP - rowdot(dP, P)) of the scaled scores; rowdot(dP, P) = rowdot(g, out)
    dp -= rowdot
    dp *= p
    return dp


def _scores(qs, k, bias):
    # [B, H, Tq, Dh] (scaled), [B, H, Tk, Dh], [B|1, 1, Tq, Tk] -> [B, H, Tq, Tk]
    s = qs @ k.swapaxes(-1, -2)
    s += bias
    return s


@primitive
def attention(q, k, v, bias):
    # [B, H, Tq, Dh], [B, H, Tk, Dh], [B, H, Tk, Dh], [B|1, 1, Tq, Tk] -> [B, H, Tq, Dh]
    e = _scores(_scaled(q), k, bias)
    z, lse = _stable_exp(e)                                               # e = exp(S - m)
    out = e @ v
    out /= z                                                              # normalise [.., Dh], not [.., Tk]
    return _leave_lse(out, lse)


def _attention_vjp(argnums, out, args, kwargs):
    q, k, v, bias = args
    lse = _lse_or_none(out)

    def vjp(g):
        qs = _scaled(q)
        p = _scores(qs, k, bias)                                          # [B, H, Tq, Tk]
        _probs_in_place(lse, p)
        grads = {}
        if 2 in argnums:
            grads[2] = p.swapaxes(-1, -2) @ g                             # [B, H, Tk, Dh]
        ds = _dscores(g @ v.swapaxes(-1, -2), _rowdot(g, out), p)         # [B, H, Tq, Tk]
        if 0 in argnums:
            grads[0] = ds @ k
            grads[0] *= 1.0 / math.sqrt(q.shape[-1])                      # [B, H, Tq, Dh]
        if 1 in argnums:
            grads[1] = ds.swapaxes(-1, -2) @ qs                           # [B, H, Tk, Dh]
        return [grads[i] for i in argnums]
    return vjp


defvjp_argnums(attention, _attention_vjp)


# Trace attention: the blockwise form of the multi-trace mask (paper Fig. 2; the cached form).
# K traces of G slots each attend to a shared context cache of Tc slots (through a per-trace
# visibility bias) and to their own trace's slots causally, with one softmax over both: `attention`
# over the concatenated keys and the full block mask, without building that [K*G, Tc + K*G] mask.
# runs = ((k_start, k_stop, n_ctx), ...) (host ints covering 0..K; None: one run): trace k sees
# context slots t <= p_k only, so a run of traces needs only the first n_ctx (`layout.context_runs`).
def _shared_matmul(a, b):
    # [B,H,K,G,X], [B,H,X,Y] -> [B,H,K,G,Y]: every trace's rows times the one context matrix
    B, H, K, G, X = a.shape
    return (a.reshape(B, H, K * G, X) @ b).reshape(B, H, K, G, -1)


def _trace_scores(qs, k_ctx, ctx_bias, k_own, own_bias):
    # [B,H,K,G,Dh] (scaled), [B,H,Tc,Dh], [B,1,K,1,Tc], [B,H,K,G,Dh], [G,G] -> [B,H,K,G,Tc], [B,H,K,G,G]
    s_ctx = _shared_matmul(qs, k_ctx.swapaxes(-1, -2))
    s_ctx += ctx_bias
    return s_ctx, _scores(qs, k_own, own_bias)


def _runs_or_one_run(runs, q, k_ctx):
    # None -> one run: every trace against the whole context
    return ((0, q.shape[2], k_ctx.shape[2]),) if runs is None else runs


def _run_args(run, q, k_ctx, v_ctx, k_own, v_own, ctx_bias):
    # the traces k_start..k_stop-1 and the first n_ctx context slots (views)
    r, n = slice(run[0], run[1]), run[2]
    return (q[:, :, r], k_ctx[:, :, :n], v_ctx[:, :, :n], k_own[:, :, r], v_own[:, :, r],
            ctx_bias[:, :, r, :, :n])


def _trace_forward(q, k_ctx, v_ctx, k_own, v_own, ctx_bias, own_bias):
    # one run -> out [B,H,K,G,Dh], lse [B,H,K,G,1]
    e_ctx, e_own = _trace_scores(_scaled(q), k_ctx, ctx_bias, k_own, own_bias)
    z, lse = _stable_exp(e_ctx, e_own)                                    # joint softmax, unnormalised
    out = _shared_matmul(e_ctx, v_ctx)
    out += e_own @ v_own
    out /= z
    return out, lse


@primitive
def trace_attention(q, k_ctx, v_ctx, k_own, v_own, ctx_bias, own_bias, *, runs=None):
    # [B,H,K,G,Dh], [B,H,Tc,Dh] x2, [B,H,K,G,Dh] x2, [B,1,K,1,Tc], [G,G] -> [B,H,K,G,Dh]
    parts = [_trace_forward(*_run_args(run, q, k_ctx, v_ctx, k_own, v_own, ctx_bias), own_bias)
             for run in _runs_or_one_run(runs, q, k_ctx)]
    if len(parts) == 1:
        return _leave_lse(*parts[0])
    return _leave_lse(*(xp_of(q).concatenate(p, axis=2) for p in zip(*parts)))


def _trace_backward(argnums, g, out, lse, q, k_ctx, v_ctx, k_own, v_own, ctx_bias, own_bias):
    # one run -> {argnum: gradient}; lse None: recompute it
    B, H, K, G, Dh = q.shape
    qs = _scaled(q)
    p_ctx, p_own = _trace_scores(qs, k_ctx, ctx_bias, k_own, own_bias)
    _probs_in_place(lse, p_ctx, p_own)
    grads = {}
    if 2 in argnums:                                                      # [B,H,Tc,Dh]
        grads[2] = p_ctx.reshape(B, H, K * G, -1).swapaxes(-1, -2) @ g.reshape(B, H, K * G, Dh)
    if 4 in argnums:                                                      # [B,H,K,G,Dh]
        grads[4] = p_own.swapaxes(-1, -2) @ g
    rowdot = _rowdot(g, out)                                              # [B,H,K,G,1]
    ds_ctx = _dscores(_shared_matmul(g, v_ctx.swapaxes(-1, -2)), rowdot, p_ctx)   # [B,H,K,G,Tc]
    ds_own = _dscores(g @ v_own.swapaxes(-1, -2), rowdot, p_own)                  # [B,H,K,G,G]
    if 0 in argnums:
        grads[0] = _shared_matmul(ds_ctx, k_ctx)
        grads[0] += ds_own @ k_own
        grads[0] *= 1.0 / math.sqrt(Dh)
    if 1 in argnums:
        grads[1] = ds_ctx.reshape(B, H, K * G, -1).swapaxes(-1, -2) @ qs.reshape(B, H, K * G, Dh)
    if 3 in argnums:
        grads[3] = ds_own.swapaxes(-1, -2) @ qs
    return grads


def _trace_attention_vjp(argnums, out, args, kwargs):
    q, k_ctx, v_ctx, k_own, v_own, ctx_bias, own_bias = args
    runs = _runs_or_one_run(kwargs.get("runs"), q, k_ctx)
    lse = _lse_or_none(out)

    def vjp(g):
        parts = []
        for run in runs:
            r = slice(run[0], run[1])                                     # this run's traces
            run_lse = None if lse is None else lse[:, :, r]
            parts.append(_trace_backward(argnums, g[:, :, r], out[:, :, r], run_lse,
                                         *_run_args(run, q, k_ctx, v_ctx, k_own, v_own, ctx_bias), own_bias))
        return [_join_runs(i, runs, parts, k_ctx) for i in argnums]
    return vjp


def _join_runs(i, runs, parts, k_ctx):
    # gradient i of the whole from the runs': per-trace ones side by side, the context's summed
    if len(parts) == 1 and (i not in (1, 2) or runs[0][2] == k_ctx.shape[2]):
        return parts[0][i]
    xp = xp_of(k_ctx)
    if i not in (1, 2):
        return xp.concatenate([p[i] for p in parts], axis=2)
    total = xp.zeros_like(k_ctx)                                          # [B,H,Tc,Dh]
    for (_, _, n), p in zip(runs, parts):
        total[:, :, :n] += p[i]
    return total


defvjp_argnums(trace_attention, _trace_attention_vjp)


# SwiGLU gate: silu(a) * b, with silu(a) = a * sigmoid(a)
def _sigmoid(a):
    # 1 / (1 + exp(-a)), in one temporary
    xp = xp_of(a)
    s = xp.negative(a)
    xp.exp(s, out=s)
    s += 1.0
    return xp.reciprocal(s, out=s)


@primitive
def swiglu(a, b):
    # [..., F], [..., F] -> [..., F]
    y = _sigmoid(a)
    y *= a
    y *= b
    return y


def _swiglu_vjp(argnums, y, args, kwargs):
    a, b = args

    def vjp(g):
        sig = _sigmoid(a)
        silu = a * sig
        out = {}
        if 1 in argnums:
            out[1] = silu * g
        if 0 in argnums:      # d silu / da = sig * (1 + a * (1 - sig)) = silu + sig * (1 - silu)
            d = 1.0 - silu
            d *= sig
            d += silu
            d *= b
            d *= g
            out[0] = d
        return [out[i] for i in argnums]
    return vjp


defvjp_argnums(swiglu, _swiglu_vjp)


# Row gathers (the embedding; the read-out of scored slots) and their scatter-add backward
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


@primitive
def take_rows(x, idx):
    # [B, S, D], int [B, R] -> [B, R, D]: the rows idx of each sequence, gathered along axis 1
    return x[xp_of(x).arange(x.shape[0])[:, None], idx]


def _take_rows_vjp(y, x, idx):
    xp = xp_of(x)
    B, S, D = x.shape
    flat = (idx + S * xp.arange(B)[:, None]).ravel()                      # rows of x.reshape(B*S, D)
    return lambda g: scatter_add_rows(xp, B * S, flat, g.reshape(-1, D)).reshape(B, S, D)


defvjp(take_rows, _take_rows_vjp)


# Cross-entropy per scored target: nll = logsumexp(logits) - logits[target]
def _picked(logits, targets):
    # [..., V], int [...] -> [...]: logits[..., target]
    return xp_of(logits).take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@primitive
def cross_entropy(logits, targets):
    # [..., V], int [...] -> [...]
    _, lse = _stable_exp(logits.copy())                                    # [..., 1]
    return lse[..., 0] - _picked(logits, targets)


def _cross_entropy_vjp(nll, logits, targets):
    xp = xp_of(logits)

    def vjp(g):
        V = logits.shape[-1]
        lse = nll + _picked(logits, targets)                               # from the forward's answer
        p = logits - lse[..., None]
        xp.exp(p, out=p)                                                   # softmax, [..., V]
        p2 = p.reshape(-1, V)
        p2[xp.arange(p2.shape[0]), targets.ravel()] -= 1.0                 # softmax - onehot
        p *= g[..., None]
        return p
    return vjp


defvjp(cross_entropy, _cross_entropy_vjp)


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


defvjp(concat, lambda y, a, b, axis: lambda g: xp_of(g).split(g, [a.shape[axis]], axis)[0],
       lambda y, a, b, axis: lambda g: xp_of(g).split(g, [a.shape[axis]], axis)[1])


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
def repeat_kv(x, n_rep):
    # [B, Hkv, ...] -> [B, Hkv * n_rep, ...]: each key/value head n_rep times (Hugging Face `repeat_kv` order)
    return xp_of(x).repeat(x, n_rep, axis=1)


defvjp(repeat_kv, lambda y, x, n_rep: lambda g: g.reshape(x.shape[:2] + (n_rep,) + x.shape[2:]).sum(2))


@primitive
def broadcast_rows(x, lead_shape):
    # [N, D] -> [*lead_shape, N, D]: the same rows for every leading index (shared soft tokens)
    return xp_of(x).broadcast_to(x, tuple(lead_shape) + x.shape).copy()


defvjp(broadcast_rows, lambda y, x, lead_shape: lambda g: g.reshape((-1,) + x.shape).sum(0))


PRIMITIVES = (linear, rmsnorm, rope, attention, trace_attention, swiglu, embedding, take_rows,
              cross_entropy, mean, add, concat, reshape, split_heads, merge_heads, repeat_kv, broadcast_rows)
