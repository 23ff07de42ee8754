"""The decoder: a Llama-style transformer with an explicit kv-cache (paper §3; docs/method.md §1),
in picoGPT's style: pure functions of a params tree (Hugging Face names) that is also the checkpoint.
The cache holds keys AFTER RoPE and every slot's position id (-1: padding); it grows by
concatenation, never item assignment, so autograd traces through it. `hidden` is the pure forward;
`forward`, `prefill` and `extend` check their arguments first (checks.py)."""
import functools
from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy, xp_of
from ..errors import require
from .checks import check_forward, check_prompt_length
from .ops import (
    add,
    additive_mask,
    attention,
    concat,
    embedding,
    linear,
    merge_heads,
    repeat_kv,
    reshape,
    rmsnorm,
    rope,
    rope_tables,
    split_heads,
    swiglu,
    trace_attention,
)

LAYER_KEYS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
              "post_attention_layernorm", "gate_proj", "up_proj", "down_proj")


# Parameters: a nested dict whose leaves carry the Hugging Face Llama leaf names.
def _layer_shapes(cfg):
    # {leaf: shape} of one block; Linear weights are [out, in]
    D, F, Dkv = cfg.d_model, cfg.d_ff, cfg.kv_heads * cfg.head_dim
    return dict(zip(LAYER_KEYS, [(D,), (D, D), (Dkv, D), (Dkv, D), (D, D), (D,), (F, D), (F, D), (D, F)]))


def init_params(cfg, seed=0, dtype=np.float32, xp=np):
    """Random decoder params: N(0, init_std) matrices (output projections by 1/sqrt(2L)), unit norms."""
    rng = np.random.default_rng(seed)
    out_std = cfg.init_std / np.sqrt(2 * cfg.n_layers)

    def init(key, shape):
        if len(shape) == 1:                                                    # an RMSNorm weight
            return xp.ones(shape, dtype=dtype)
        std = out_std if key in ("o_proj", "down_proj") else cfg.init_std
        return xp.asarray((rng.standard_normal(shape) * std).astype(dtype))

    layers = [{k: init(k, s) for k, s in _layer_shapes(cfg).items()} for _ in range(cfg.n_layers)]
    return {"embed_tokens": init("embed_tokens", (cfg.vocab_size, cfg.d_model)), "layers": layers,
            "norm": init("norm", (cfg.d_model,))}


def hf_name(path):
    """("layers", 0, "q_proj") -> model.layers.0.self_attn.q_proj.weight; ("norm",) -> model.norm.weight."""
    if len(path) == 1:
        return f"model.{path[0]}.weight"
    _, i, key = path
    group = "self_attn." if key in ("q_proj", "k_proj", "v_proj", "o_proj") else (
        "mlp." if key.endswith("_proj") else "")
    return f"model.layers.{i}.{group}{key}.weight"


def flatten_params(params):
    """Nested params -> {Hugging Face name: array} (embed_tokens may be absent, norm absent or None)."""
    flat = {hf_name((k,)): params[k] for k in ("embed_tokens", "norm") if k in params}
    for i, layer in enumerate(params["layers"]):
        flat.update({hf_name(("layers", i, k)): layer[k] for k in LAYER_KEYS})
    return flat


def unflatten_params(flat, n_layers):
    """{Hugging Face name: array} -> nested params; a clear error names any missing weight."""
    names = [{k: hf_name(("layers", i, k)) for k in LAYER_KEYS} for i in range(n_layers)]
    expected = ["model.norm.weight", *(n for layer in names for n in layer.values())]
    missing = [n for n in expected if n not in flat]
    require(not missing, f"weights missing {missing[:3]}{'...' if len(missing) > 3 else ''}: "
            "the file was written for another model; regenerate it or pass the matching config")
    params = {"layers": [{k: flat[n] for k, n in layer.items()} for layer in names],
              "norm": flat["model.norm.weight"]}
    if "model.embed_tokens.weight" in flat:
        params["embed_tokens"] = flat["model.embed_tokens.weight"]
    return params


def param_shapes(cfg):
    """{Hugging Face name: shape} that a config implies (for checkpoint validation)."""
    return flatten_params({"embed_tokens": (cfg.vocab_size, cfg.d_model), "norm": (cfg.d_model,),
                           "layers": [_layer_shapes(cfg)] * cfg.n_layers})


# The kv-cache
@dataclass(frozen=True)
class KVCache:
    k: tuple            # L arrays [B, Hkv, Tc, Dh], keys after RoPE (Hkv = n_kv_heads)
    v: tuple            # L arrays [B, Hkv, Tc, Dh]
    positions: object   # int [B, Tc]; -1 marks padding

    @property
    def length(self):
        return self.positions.shape[1]

    def append(self, ks, vs, positions):
        """A new cache with Tn slots appended: ks, vs are L arrays [B, Hkv, Tn, Dh]."""
        return KVCache(tuple(concat(a, b, 2) for a, b in zip(self.k, ks)),
                       tuple(concat(a, b, 2) for a, b in zip(self.v, vs)),
                       xp_of(self.positions).concatenate([self.positions, positions], axis=1))

    def next_positions(self, n):
        """Position ids [B, n] continuing after the last cached slot."""
        return self.positions.max(1, keepdims=True) + 1 + xp_of(self.positions).arange(n)[None]


def causal_may_attend(cache_positions, positions):
    """Default mask: new slot i sees every valid cached slot and new slots j <= i; padding (position
    -1) only itself. cache_positions int [B, Tc] (or None), positions int [B, T] -> bool [B, T, Tc+T]."""
    xp = xp_of(positions)
    T = positions.shape[1]
    key_pos = positions if cache_positions is None else xp.concatenate([cache_positions, positions], 1)
    Tc = key_pos.shape[1] - T
    slots = xp.tri(T, Tc + T, Tc, dtype=bool)                 # [T, Tc+T]: every cached slot, new slots j <= i
    itself = xp.eye(T, Tc + T, Tc, dtype=bool)                # [T, Tc+T]: new slot i itself
    return slots[None] & ((key_pos >= 0)[:, None, :] | itself[None])


# The transformer
def block(layer, x, cos, sin, attend, cfg):
    """One pre-norm Llama block: [B, T, D] -> [B, T, D], and the new slots' keys (after RoPE) and
    values [B, Hkv, T, Dh] (grouped-query: H/Hkv query heads read each key/value head).
    attend(q, k, v) -> [B, H, T, Dh] is handed this layer's new keys and values."""
    H, Hkv, eps = cfg.n_heads, cfg.kv_heads, cfg.norm_eps
    h = rmsnorm(x, layer["input_layernorm"], eps)                                # [B, T, D]
    q = rope(split_heads(linear(h, layer["q_proj"]), H), cos, sin)               # [B, H, T, Dh]
    k = rope(split_heads(linear(h, layer["k_proj"]), Hkv), cos, sin)             # [B, Hkv, T, Dh]
    v = split_heads(linear(h, layer["v_proj"]), Hkv)                             # [B, Hkv, T, Dh]
    x = add(x, linear(merge_heads(attend(q, k, v)), layer["o_proj"]))            # [B, T, D]
    h = rmsnorm(x, layer["post_attention_layernorm"], eps)
    gated = swiglu(linear(h, layer["gate_proj"]), linear(h, layer["up_proj"]))   # [B, T, F]
    return add(x, linear(gated, layer["down_proj"])), k, v


def run_layers(params, cfg, x, positions, attend):
    """Embeddings [B, T, D] through every block (layer i attends with attend(i, q, k, v)): hidden
    states AFTER the final RMSNorm [B, T, D], and every layer's new keys and values."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)    # [B, 1, T, Dh]
    ks, vs = [], []
    for i, layer in enumerate(params["layers"]):
        x, k, v = block(layer, x, cos, sin, functools.partial(attend, i), cfg)
        ks.append(k)
        vs.append(v)
    return rmsnorm(x, params["norm"], cfg.norm_eps), ks, vs


def lm_head(params, h):
    # tied head: [..., D] -> [..., V]
    return linear(h, params["embed_tokens"])


def hidden(params, cfg, inputs, positions=None, cache=None, may_attend=None):
    """Final hidden states (after the final norm) [B, T, D] and the cache extended by T slots. inputs:
    token ids int [B, T] or embeddings [B, T, D] (e.g. latents); positions: int [B, T], default counting
    on after the cache; may_attend: bool [B|1, T, Tc + T], default `causal_may_attend`. Unchecked."""
    xp = xp_of(inputs)
    x = inputs if inputs.dtype.kind == "f" else embedding(params["embed_tokens"], inputs)   # [B, T, D]
    B, T, _ = x.shape
    if positions is None:
        positions = xp.broadcast_to(xp.arange(T), (B, T)) if cache is None else cache.next_positions(T)
    if may_attend is None:
        may_attend = causal_may_attend(None if cache is None else cache.positions, positions)
    bias = additive_mask(may_attend[:, None], x.dtype)                           # [B|1, 1, T, Tc+T]

    def attend(i, q, k, v):                                                      # k, v [B, Hkv, T, Dh]
        if cache is not None:
            k, v = concat(cache.k[i], k, 2), concat(cache.v[i], v, 2)            # [B, Hkv, Tc+T, Dh]
        return attention(q, *_heads(cfg, k, v), bias)

    h, ks, vs = run_layers(params, cfg, x, positions, attend)
    return h, KVCache(tuple(ks), tuple(vs), positions) if cache is None else cache.append(ks, vs, positions)


def _heads(cfg, k, v):
    # grouped-query attention: [B, Hkv, ...] -> [B, H, ...], query head i reads kv head i // (H / Hkv)
    n = cfg.n_heads // cfg.kv_heads
    return (k, v) if n == 1 else (repeat_kv(k, n), repeat_kv(v, n))


def groups_hidden(params, cfg, inputs, positions, cache, context_visible, runs):
    """K groups of G slots against one shared cache of T slots, blockwise (paper Fig. 2, the cached
    form): inputs [B, K, G, D], positions int [B, K, G] -> hidden [B, K*G, D]. Group k sees the cached
    slots context_visible [B, K, T] (host) allows, and its own slots causally; runs: `context_runs`."""
    xp = xp_of(inputs)
    B, K, G, D = inputs.shape
    H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    ctx_bias = additive_mask(xp.asarray(context_visible)[:, None, :, None, :], inputs.dtype)  # [B,1,K,1,T]
    own_bias = additive_mask(xp.tril(xp.ones((G, G), dtype=bool)), inputs.dtype)          # [G, G]

    def attend(i, q, k, v):                                  # q [B, H, K*G, Dh], k, v [B, Hkv, K*G, Dh]
        q = reshape(q, (B, H, K, G, Dh))
        k, v = _heads(cfg, *(reshape(a, (B, Hkv, K, G, Dh)) for a in (k, v)))
        k_ctx, v_ctx = _heads(cfg, cache.k[i], cache.v[i])                      # [B, H, T, Dh]
        out = trace_attention(q, k_ctx, v_ctx, k, v, ctx_bias, own_bias, runs=runs)
        return reshape(out, (B, H, K * G, Dh))

    flat = xp.asarray(positions).reshape(B, K * G)
    h, _, _ = run_layers(params, cfg, reshape(inputs, (B, K * G, D)), flat, attend)
    return h


# The entry points: forward, and the inference API built on it (prefill, extend, decode)
def forward(params, cfg, inputs, positions=None, cache=None, may_attend=None):
    """logits [B, T, V], final hidden states [B, T, D], and the cache extended by T slots (checked)."""
    check_forward(cfg, inputs, positions, cache, may_attend)
    h, new_cache = hidden(params, cfg, inputs, positions, cache, may_attend)
    return lm_head(params, h), h, new_cache


def prefill(params, cfg, tokens, positions=None):
    """Run a prompt: logits [B, T, V] and its cache."""
    check_prompt_length(tokens, cfg)
    logits, _, cache = forward(params, cfg, tokens, positions)
    return logits, cache


def extend(params, cfg, cache, inputs, positions=None):
    """Append tokens or embeddings after a cache: logits [B, Tn, V] and the longer cache. Positions
    are not checked against max_seq_len: training places latents and ahead tokens up to
    max_seq_len + N_L - 2 (the user-facing limit is in evaluation.generate.generate)."""
    logits, _, cache = forward(params, cfg, inputs, positions, cache)
    return logits, cache


def sample_next(logits, temperature, rng):
    """Next token ids [B] from last-slot logits [B, V]: greedy at temperature 0."""
    logits = to_numpy(logits).astype(np.float64)
    require(np.isfinite(logits).all(), "the decoder computed logits that are not finite: its weights are "
                                       "damaged or overflow; restore them or retrain")
    if temperature <= 0:
        return logits.argmax(-1)
    p = np.exp((logits - logits.max(-1, keepdims=True)) / temperature)   # <= 0 before the division: no inf
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def decode(params, cfg, cache, last_logits, n_new, temperature=0.0, rng=None, positions=None):
    """Decode n_new tokens after a cache whose last slot produced last_logits [B, V]: the new ids
    int64 [B, n_new] (host) and the final cache. positions: int [B, 1], the first new token's
    position id (default: counting on after the cache); each later token takes the next one."""
    xp = xp_of(last_logits)
    rng = rng or np.random.default_rng(0)
    out = []
    for i in range(n_new):
        nxt = sample_next(last_logits, temperature, rng)                        # [B]
        out.append(nxt)
        pos = None if positions is None else positions + i                      # [B, 1]
        logits, cache = extend(params, cfg, cache, xp.asarray(nxt[:, None]), pos)
        last_logits = logits[:, -1]
    return np.stack(out, axis=1).astype(np.int64), cache
