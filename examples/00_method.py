"""The whole method of Liu et al., "Deliberation in Latent Space via Differentiable Cache Augmentation"
(ICML 2025), in plain NumPy + autograd; read it after docs/method.md. `python examples/00_method.py [DIR]`
computes loss, latents, ahead logits and gradients twice (packed; per trace), compares them with the golden
set DIR (default tiny_data/golden/default), OK iff max|a - b| <= 1e-9 max|b|, and exits 1 if any is not."""
# %%
# ## Load the golden set: config, frozen decoder, trainable coprocessor + soft tokens
import json
import math
import sys
from collections import namedtuple
from pathlib import Path

import autograd.numpy as anp
import numpy as np
from autograd import grad

DIR = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_data/golden/default")
DIR = DIR if DIR.exists() else Path(__file__).resolve().parents[1] / DIR     # else from the repo root
cfg = json.loads((DIR / "manifest.json").read_text())["config"]
with np.load(DIR / "tensors.npz") as f:
    gold = {k: f[k] for k in f.files}
m = cfg["model"]
V, D, L, H, F = m["vocab_size"], m["d_model"], m["n_layers"], m["n_heads"], m["d_ff"]
EPS, THETA, HKV, DH = m["norm_eps"], m["rope_theta"], m.get("n_kv_heads", H), D // H   # HKV < H: GQA
B, T, K, NL, NA = cfg["batch_size"], cfg["seq_len"], cfg["n_traces"], cfg["n_latents"], cfg["n_ahead"]
G = NL + NA - 1                                              # slots per trace group: N_L latents, N_A-1 x
LATENT_POS = cfg.get("latent_positions")
if LATENT_POS not in ("behind", "after") or cfg.get("ahead_positions") != "original":   # C8, C10
    sys.exit(f"00_method.py: {DIR}: supports latent_positions 'behind'/'after' and ahead_positions "
             f"'original', not {LATENT_POS!r} and {cfg.get('ahead_positions')!r}")
frozen = {k: v for k, v in gold.items() if k.startswith("decoder.")}
trainable = {k: v for k, v in gold.items() if k.startswith("coprocessor.") or k == "soft_tokens"}
E = frozen["decoder.model.embed_tokens.weight"]              # [V, D]: embeddings (unscaled) and tied head
tokens, points = gold["tokens"], gold["trace_positions"]     # int [B, T], int [B, K]: sorted points p


# %%
# ## Llama pieces: RMSNorm, rotary embedding (rotate-half), softmax, SwiGLU MLP
def rmsnorm(x, w):  # [..., D], [D] -> [..., D]
    return w * x / anp.sqrt(anp.mean(x ** 2, axis=-1, keepdims=True) + EPS)


def rope(x, pos):  # [B, n, S, Dh], int [B, S] -> [B, n, S, Dh]: dim i turns with dim i + Dh/2
    angle = pos[:, None, :, None].astype(np.float64) * THETA ** (-np.arange(0, DH, 2) / DH)  # [B,1,S,Dh/2]
    angle = np.concatenate([angle, angle], axis=-1)                                          # [B,1,S,Dh]
    rotated = anp.concatenate([-x[..., DH // 2:], x[..., :DH // 2]], axis=-1)               # rotate_half(x)
    return x * np.cos(angle) + rotated * np.sin(angle)


def softmax(s):  # [..., N] -> [..., N]
    e = anp.exp(s - anp.max(s, axis=-1, keepdims=True))
    return e / anp.sum(e, axis=-1, keepdims=True)


def mlp(W, pre, x):  # [B, S, D] -> [B, S, D]: down(silu(gate(x)) * up(x)); Linear weights are [out, in]
    g = x @ W[pre + "gate_proj.weight"].T                    # [B, S, F]
    return (g / (1 + anp.exp(-g)) * (x @ W[pre + "up_proj.weight"].T)) @ W[pre + "down_proj.weight"].T


# %%
# ## Attention over an explicit kv-cache, a block, a model (pre = "decoder." or "coprocessor.")
Cache = namedtuple("Cache", "k v pos")   # per layer: keys after RoPE, values [B, Hkv, C, Dh]; ids int [B, C]


def attention(W, pre, x, pos, k0, v0, may):  # [B,S,D], k0/v0 [B,Hkv,C,Dh], may [B,S,C+S] -> [B,S,D], k, v
    heads = lambda y, n: y.reshape(*y.shape[:2], n, DH).transpose((0, 2, 1, 3))  # [B,S,n*Dh] -> [B,n,S,Dh]
    q = rope(heads(x @ W[pre + "q_proj.weight"].T, H), pos)              # [B, H, S, Dh]
    k = rope(heads(x @ W[pre + "k_proj.weight"].T, HKV), pos)            # [B, Hkv, S, Dh]
    k = anp.concatenate([k0, k], axis=2)                                 # [B, Hkv, C+S, Dh]: cache first
    v = anp.concatenate([v0, heads(x @ W[pre + "v_proj.weight"].T, HKV)], axis=2)
    kr, vr = anp.repeat(k, H // HKV, axis=1), anp.repeat(v, H // HKV, axis=1)  # head i reads i // (H/Hkv)
    s = q @ kr.transpose((0, 1, 3, 2)) / math.sqrt(DH)                   # [B, H, S, C+S]
    s = s + np.where(may, 0.0, -np.inf)[:, None]                         # additive mask
    o = (softmax(s) @ vr).transpose((0, 2, 1, 3)).reshape(x.shape)       # [B, S, D], heads in order
    return o @ W[pre + "o_proj.weight"].T, k, v


def block(W, pre, x, pos, k0, v0, may):  # [B, S, D] -> [B, S, D], this layer's grown k, v
    a, k, v = attention(W, pre + "self_attn.", rmsnorm(x, W[pre + "input_layernorm.weight"]),
                        pos, k0, v0, may)
    x = x + a
    return x + mlp(W, pre + "mlp.", rmsnorm(x, W[pre + "post_attention_layernorm.weight"])), k, v


def model(W, pre, x, pos, cache, may):  # [B, S, D] after cache's C slots -> final-normed [B, S, D], cache
    ks, vs = [], []
    for l in range(L):
        x, k, v = block(W, f"{pre}model.layers.{l}.", x, pos, cache.k[l], cache.v[l], may)
        ks, vs = ks + [k], vs + [v]
    return rmsnorm(x, W[pre + "model.norm.weight"]), Cache(ks, vs, np.concatenate([cache.pos, pos], 1))


def empty_cache(n):  # a cache of 0 slots for n sequences
    return Cache([np.zeros((n, HKV, 0, DH))] * L, [np.zeros((n, HKV, 0, DH))] * L, np.zeros((n, 0), int))


def extend(W, pre, cache, x, pos):  # the inference API: new slots see the whole cache, then causally
    C, S = cache.pos.shape[1], x.shape[1]
    may = np.concatenate([np.ones((S, C), bool), np.tril(np.ones((S, S), bool))], axis=1)   # [S, C+S]
    return model(W, pre, x, pos, cache, may[None])


def latent_ids(p):  # point p -> int [N_L]: position ids of its latents (and of the soft tokens)
    return np.maximum(0, p - NL + 1 + np.arange(NL)) if LATENT_POS == "behind" else p + 1 + np.arange(NL)


def nll(logits, targets):  # [..., V], int [...] -> [...]: cross-entropy, natural log
    mx = anp.max(logits, axis=-1, keepdims=True)
    logz = mx[..., 0] + anp.log(anp.sum(anp.exp(logits - mx), axis=-1))
    return logz - anp.sum(logits * np.eye(V)[targets], axis=-1)        # one-hot: no take_along_axis


# %%
# ## Form 1, per trace: prefill x_0..x_p, ONE coprocessor call on that cache, extend with z, x_{p+1..}
def per_trace(theta):  # trainable arrays -> loss, {golden name: array}
    W = {**frozen, **theta}
    Z, LG, NLL = [], [], []
    for b in range(B):
        for p in points[b]:
            x = tokens[b:b + 1]                                                       # [1, T]
            _, cache = extend(W, "decoder.", empty_cache(1), E[x[:, :p + 1]], np.arange(p + 1)[None])
            ids = latent_ids(p)[None]                                                 # [1, N_L]
            z, _ = extend(W, "coprocessor.", cache, theta["soft_tokens"][None], ids)  # latents [1, N_L, D]
            hz, cache = extend(W, "decoder.", cache, z, ids)                         # [1, N_L, D]
            ha, _ = extend(W, "decoder.", cache, E[x[:, p + 1:p + NA]], np.arange(p + 1, p + NA)[None])
            logits = anp.concatenate([hz[0, -1:], ha[0]]) @ E.T                      # [N_A, V]
            Z, LG, NLL = Z + [z[0]], LG + [logits], NLL + [nll(logits, x[0, p + 1:p + 1 + NA])]
    trace = anp.mean(anp.stack(NLL), axis=-1).reshape(B, K)                          # [B, K]
    return anp.mean(trace), {"latents": anp.stack(Z).reshape(B, K, NL, D), "trace_loss": trace,
                             "ahead.logits": anp.stack(LG).reshape(B, K, NA, V)}


# %%
# ## Form 2, packed: [x_0..x_{T-1}, then per trace k: z_1..z_NL, x_{p+1}..x_{p+NA-1}] with one mask
def packed_mask(ps, g):  # sorted points [K], group size g -> may-attend [T + K*g, T + K*g], row = query
    may = np.zeros((T + K * g, T + K * g), bool)             # plain numpy: a constant, so writing is fine
    may[:T, :T] = np.tril(np.ones((T, T), bool))             # an original token sees earlier originals
    for k, p in enumerate(ps):
        s = T + k * g
        may[s:s + g, :p + 1] = True                          # a group slot sees x_0..x_p
        may[s:s + g, s:s + g] = np.tril(np.ones((g, g), bool))   # and its own group, up to itself
    return may


pos_packed = np.stack([np.concatenate([np.arange(T)] + [np.concatenate(
    [latent_ids(p), np.arange(p + 1, p + NA)]) for p in ps]) for ps in points])      # [B, S = T + K*G]
may_packed = np.stack([packed_mask(ps, G) for ps in points])                         # [B, S, S]
readout = T + np.arange(K)[:, None] * G + NL - 1 + np.arange(NA)                    # [K, N_A] slots
targets = tokens[np.arange(B)[:, None, None], points[:, :, None] + 1 + np.arange(NA)]   # [B, K, N_A]


def packed(theta):  # trainable arrays -> loss, {golden name: array}
    W = {**frozen, **theta}
    h, cache = extend(W, "decoder.", empty_cache(B), E[tokens], pos_packed[:, :T])  # the decoder on x
    soft = anp.stack([anp.concatenate([theta["soft_tokens"]] * K)] * B)              # [B, K*N_L, D]
    ids = np.stack([np.concatenate([latent_ids(p) for p in ps]) for ps in points])   # [B, K*N_L]
    may = np.stack([packed_mask(ps, NL)[T:] for ps in points])                       # [B, K*N_L, T + K*N_L]
    z = model(W, "coprocessor.", soft, ids, cache, may)[0].reshape(B, K, NL, D)     # on the decoder's cache
    group = lambda b, k, p: anp.concatenate([z[b, k], E[tokens[b, p + 1:p + NA]]])  # [G, D]: z, x_{p+1..}
    x = anp.stack([anp.concatenate([E[tokens[b]]] + [group(b, k, p) for k, p in enumerate(points[b])])
                   for b in range(B)])                                              # [B, S, D]
    hp, _ = model(W, "decoder.", x, pos_packed, empty_cache(B), may_packed)         # [B, S, D]
    logits = hp[np.arange(B)[:, None, None], readout[None]] @ E.T                   # [B, K, N_A, V]
    trace = anp.mean(nll(logits, targets), axis=-1)                                 # [B, K]
    return anp.mean(trace), {"latents": z, "ahead.logits": logits, "trace_loss": trace,
                             "baseline.logits": h @ E.T, "decoder_cache.k": np.stack(cache.k),
                             "decoder_cache.v": np.stack(cache.v), "packed.position_ids": pos_packed,
                             "packed.mask": may_packed, "ahead.targets": targets}


# %%
# ## Gradients from autograd alone; compare both forms with the golden tensors, one line per tensor
def rel_diff(name, a):  # -> max|a - b| / max|b|, b golden (ids and masks: 0 if equal, else 1)
    b = gold[name]
    if a is None or np.shape(a) != b.shape:
        return np.inf
    return float((a != b).any()) if b.dtype.kind in "biu" else np.abs(a - b).max() / np.abs(b).max()


FORMS = {"packed": packed, "per-trace": per_trace}
diffs = {}                                                   # {name: {form: relative diff}}
print(f"{DIR}: latent_positions {LATENT_POS}, H {H}, H_kv {HKV}, B {B} T {T} K {K} N_L {NL} N_A {NA}")
for form, fn in FORMS.items():
    g = grad(lambda theta, fn=fn: fn(theta)[0])(trainable)   # d loss / d (coprocessor arrays, soft tokens)
    loss, out = fn(trainable)
    out = {"loss": loss, **out, **{"grad." + k: v for k, v in g.items()}}
    for name in dict.fromkeys([n for n in gold if n.startswith("grad.")] + list(out)):   # every gradient
        diffs.setdefault(name, {})[form] = rel_diff(name, out.get(name))
w, n_bad = max(map(len, diffs)), 0
print(f"  {'tensor':{w}s}   packed  per-trace   max|a - b| / max|b|, OK iff <= 1e-9")
for name in (n for n in gold if n in diffs):                 # file order: the first NOT OK is the clue
    bad = [form for form, r in diffs[name].items() if not r <= 1e-9]
    cols = "  ".join(f"{diffs[name][f]:7.1e}" if f in diffs[name] else "      -" for f in FORMS)
    print(f"  {name:{w}s}  {cols}    {'NOT OK (' + ', '.join(bad) + ')' if bad else 'OK'}")
    n_bad += bool(bad)
worst = max(r for d in diffs.values() for r in d.values())
print(f"{'FAIL' if n_bad else 'PASS'}: {len(diffs) - n_bad}/{len(diffs)} tensors OK, worst {worst:.1e}, "
      f"loss {loss:.12f}")
sys.exit(1 if n_bad else 0)
