"""The decoder and its kv-cache (paper §3; docs/method.md §1, cached == uncached).

The key property is "cached == uncached": any chunking of a sequence through the cache gives the
full forward's logits, hidden states and cache, and cached greedy generation gives the tokens of
re-running the whole sequence each step (picoGPT style). A cache mask sliced at the wrong offset
passes most other tests; only these catch it.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.config import ModelConfig, get_preset
from refimpl.core import decoder
from refimpl.core.decoder import (
    decode,
    flatten_params,
    forward,
    init_params,
    param_shapes,
    prefill,
    unflatten_params,
)
from refimpl.core.ops import embedding
from refimpl.errors import RefimplError

TOL = dict(rtol=1e-10, atol=1e-10)


def seeded(data):
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


@st.composite
def chunkings(draw, max_len=9):
    """A sequence length T and a partition of it into chunk lengths, in order."""
    T = draw(st.integers(1, max_len), label="T")
    cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=T - 1), label="cuts")) if T > 1 else []
    bounds = [0, *cuts, T]
    return T, [b - a for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------------------------------------
# cached == uncached
@settings(max_examples=60)
@given(data=st.data(), chunks=chunkings())
def test_chunked_cached_forward_equals_full_forward(nano_cfg, params64, data, chunks):
    T, sizes = chunks
    B = data.draw(st.integers(1, 2), label="B")
    tokens = seeded(data).integers(0, nano_cfg.vocab_size, size=(B, T))
    logits, h, full = forward(params64, nano_cfg, tokens)

    cache, parts_logits, parts_h, start = None, [], [], 0
    for n in sizes:
        chunk = tokens[:, start:start + n]
        if data.draw(st.booleans(), label="as_embeddings"):   # latents enter as embeddings
            chunk = embedding(params64["embed_tokens"], chunk)
        lg, hh, cache = forward(params64, nano_cfg, chunk, cache=cache)
        parts_logits.append(lg)
        parts_h.append(hh)
        start += n

    np.testing.assert_allclose(np.concatenate(parts_logits, 1), logits, **TOL)
    np.testing.assert_allclose(np.concatenate(parts_h, 1), h, **TOL)
    assert np.array_equal(cache.positions, full.positions)
    assert np.array_equal(full.positions, np.broadcast_to(np.arange(T), (B, T)))
    assert len(cache.k) == len(cache.v) == nano_cfg.n_layers
    for layer, (k, v, fk, fv) in enumerate(zip(cache.k, cache.v, full.k, full.v)):
        assert k.shape == fk.shape == (B, nano_cfg.n_heads, T, nano_cfg.head_dim)
        np.testing.assert_allclose(k, fk, err_msg=f"layer {layer} keys", **TOL)
        np.testing.assert_allclose(v, fv, err_msg=f"layer {layer} values", **TOL)


@settings(max_examples=20)
@given(data=st.data())
def test_cached_greedy_generation_equals_full_recompute(nano_cfg, params64, data):
    """decoder.decode (kv-cache) == re-running the full uncached forward for every token."""
    B = data.draw(st.integers(1, 2), label="B")
    T = data.draw(st.integers(1, 6), label="T_prompt")
    n_new = data.draw(st.integers(1, 6), label="n_new")
    prompt = seeded(data).integers(0, nano_cfg.vocab_size, size=(B, T))

    logits, cache = prefill(params64, nano_cfg, prompt)
    new, cache = decode(params64, nano_cfg, cache, logits[:, -1], n_new)

    seq = prompt
    for _ in range(n_new):                                 # picoGPT: no cache, whole sequence
        nxt = forward(params64, nano_cfg, seq)[0][:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    assert new.dtype == np.int64 and new.shape == (B, n_new)
    assert np.array_equal(new, seq[:, T:])
    _, _, full = forward(params64, nano_cfg, seq)
    assert np.array_equal(cache.positions, full.positions)
    for k, fk in zip(cache.k, full.k):
        np.testing.assert_allclose(k, fk, **TOL)


# ---------------------------------------------------------------------------------------------
# positions: RoPE makes attention depend on relative position only
@given(data=st.data(), shift=st.integers(1, 2000), chunks=chunkings(max_len=7))
def test_shifting_all_positions_leaves_logits_unchanged(nano_cfg, params64, data, shift, chunks):
    T, sizes = chunks
    tokens = seeded(data).integers(0, nano_cfg.vocab_size, size=(1, T))
    want = forward(params64, nano_cfg, tokens)[0]
    # the first chunk gets explicit shifted positions; later chunks continue after the cache
    first = sizes[0]
    lg, _, cache = forward(params64, nano_cfg, tokens[:, :first], positions=np.arange(first)[None] + shift)
    parts, start = [lg], first
    for n in sizes[1:]:
        lg, _, cache = forward(params64, nano_cfg, tokens[:, start:start + n], cache=cache)
        parts.append(lg)
        start += n
    assert np.array_equal(cache.positions[0], np.arange(T) + shift)
    np.testing.assert_allclose(np.concatenate(parts, 1), want, rtol=1e-9, atol=1e-9)


def test_positions_matter(nano_cfg, params64):
    """Control for the shift test: a non-uniform change of positions does change the logits."""
    tokens = np.array([[3, 1, 4, 1, 5]])
    base = forward(params64, nano_cfg, tokens)[0]
    spread = forward(params64, nano_cfg, tokens, positions=np.arange(5)[None] * 3)[0]
    assert np.abs(spread[0, 1:] - base[0, 1:]).max() > 1e-3
    np.testing.assert_allclose(spread[0, 0], base[0, 0], **TOL)   # one token: no relative position


# ---------------------------------------------------------------------------------------------
# padding: position id -1 marks slots nobody else attends to
@settings(max_examples=10)
@given(data=st.data())
def test_left_padding_is_invisible(nano_cfg, params64, data):
    rng = seeded(data)
    lengths = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3), label="lengths")
    n_new = data.draw(st.integers(1, 4), label="n_new")
    T = max(lengths)
    prompts = [rng.integers(0, nano_cfg.vocab_size, size=n) for n in lengths]
    tokens = np.stack([np.concatenate([rng.integers(0, nano_cfg.vocab_size, size=T - len(p)), p])
                       for p in prompts])                  # pads hold arbitrary token ids
    positions = np.stack([np.concatenate([np.full(T - len(p), -1), np.arange(len(p))]) for p in prompts])

    logits, cache = prefill(params64, nano_cfg, tokens, positions)
    new, _ = decode(params64, nano_cfg, cache, logits[:, -1], n_new)
    for b, p in enumerate(prompts):
        want_logits, want_cache = prefill(params64, nano_cfg, p[None])
        np.testing.assert_allclose(logits[b, T - len(p):], want_logits[0], **TOL)
        want_new, _ = decode(params64, nano_cfg, want_cache, want_logits[:, -1], n_new)
        assert np.array_equal(new[b], want_new[0])


def test_padding_slot_still_sees_itself(nano_cfg):
    mask = decoder.causal_may_attend(np.array([[-1, 0]]), np.array([[-1, 1]]))
    # rows: new slots (pad, pos 1); cols: cached pad, cached 0, new pad, new 1
    assert mask.tolist() == [[[False, True, True, False], [False, True, False, True]]]


def test_explicit_default_mask_equals_no_mask(nano_cfg, params64):
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    pos = np.broadcast_to(np.arange(3), (2, 3))
    mask = decoder.causal_may_attend(None, pos)[:1]        # a batch-1 mask broadcasts over B
    a = forward(params64, nano_cfg, tokens)[0]
    b = forward(params64, nano_cfg, tokens, may_attend=mask)[0]
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# determinism and the parameter tree
def leaves(params):
    return list(flatten_params(params).values())


def test_same_seed_gives_bit_identical_params_and_logits(nano_cfg):
    tokens = np.array([[5, 6, 7, 8]])
    p1, p2, p3 = (init_params(nano_cfg, seed=s) for s in (7, 7, 8))
    assert all(a.dtype == np.float32 for a in leaves(p1))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(p1), leaves(p2)))
    assert np.array_equal(forward(p1, nano_cfg, tokens)[0], forward(p2, nano_cfg, tokens)[0])
    assert not np.array_equal(p1["embed_tokens"], p3["embed_tokens"])
    assert not np.array_equal(forward(p1, nano_cfg, tokens)[0], forward(p3, nano_cfg, tokens)[0])


def test_float32_forward_stays_float32(nano_cfg, params32, params64):
    tokens = np.array([[1, 2, 3, 4]])
    logits, h, cache = forward(params32, nano_cfg, tokens)
    assert logits.dtype == h.dtype == cache.k[0].dtype == cache.v[-1].dtype == np.float32
    np.testing.assert_allclose(logits, forward(params64, nano_cfg, tokens)[0], rtol=1e-4, atol=1e-4)


def spec_names(n_layers):
    """The architecture of docs/method.md §1, written out."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(n_layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [f"model.layers.{i}.{n}_layernorm.weight" for n in ("input", "post_attention")]
    return names


def test_hf_names_round_trip_and_shapes(nano_cfg, params64):
    flat = flatten_params(params64)
    assert sorted(flat) == sorted(spec_names(nano_cfg.n_layers))
    assert {n: a.shape for n, a in flat.items()} == param_shapes(nano_cfg)
    D, F = nano_cfg.d_model, nano_cfg.d_ff                 # Linear weights are [out, in]
    assert flat["model.layers.0.mlp.gate_proj.weight"].shape == (F, D)
    assert flat["model.layers.0.mlp.down_proj.weight"].shape == (D, F)
    back = unflatten_params(flat, nano_cfg.n_layers)
    assert all(a is b for a, b in zip(leaves(back), leaves(params64)))
    assert list(flatten_params(back)) == list(flat)


def test_unflatten_without_embedding_and_with_missing_weight(nano_cfg, params64):
    flat = flatten_params(params64)
    del flat["model.embed_tokens.weight"]                  # allowed: the coprocessor omits it
    assert "embed_tokens" not in unflatten_params(flat, nano_cfg.n_layers)
    del flat["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RefimplError, match="missing.*layers.1.mlp.up_proj"):
        unflatten_params(flat, nano_cfg.n_layers)


# ---------------------------------------------------------------------------------------------
# bad inputs: one-line RefimplError that names the problem
def bad_input_calls(cfg, p):
    tok = np.array([[1, 2, 3]])
    return {
        "token too large": (lambda: forward(p, cfg, np.array([[1, cfg.vocab_size]])),
                            ["token id", str(cfg.vocab_size), "out of range"]),
        "negative token": (lambda: forward(p, cfg, np.array([[-1, 2]])), ["token id -1", "out of range"]),
        "1-d tokens": (lambda: forward(p, cfg, np.array([1, 2])), ["token ids", "[B, T]"]),
        "float tokens, wrong last dim": (lambda: forward(p, cfg, np.zeros((1, 3, cfg.d_model + 1))),
                                         ["embeddings", str(cfg.d_model)]),
        "float 2-d tokens": (lambda: forward(p, cfg, tok.astype(np.float64)), ["embeddings", "[B, T"]),
        "list tokens": (lambda: forward(p, cfg, [[1, 2]]), ["array", "list"]),
        "positions 1-d": (lambda: forward(p, cfg, tok, positions=np.arange(3)), ["position ids", "[1, 3]"]),
        "positions too short": (lambda: forward(p, cfg, tok, positions=np.arange(2)[None]),
                                ["position ids", "[1, 3]"]),
        "float positions": (lambda: forward(p, cfg, tok, positions=np.arange(3.0)[None]),
                            ["position ids", "int"]),
        "mask wrong Tk": (lambda: forward(p, cfg, tok, may_attend=np.ones((1, 3, 4), bool)), ["mask", "3"]),
        "mask 2-d": (lambda: forward(p, cfg, tok, may_attend=np.ones((3, 3), bool)),
                     ["mask", "(3, 3)", "[1, 3, 3]"]),
        "mask wrong batch": (lambda: forward(p, cfg, np.ones((2, 3), int),
                                             may_attend=np.ones((3, 3, 3), bool)),
                             ["mask", "(3, 3, 3)", "[2, 3, 3]"]),
        "mask not bool": (lambda: forward(p, cfg, tok, may_attend=np.ones((1, 3, 3))), ["mask", "bool"]),
        "prompt too long": (lambda: prefill(p, cfg, np.zeros((1, cfg.max_seq_len + 1), int)),
                            ["longer than max_seq_len", str(cfg.max_seq_len)]),
        "d_model % n_heads": (lambda: get_preset("nano", n_heads=5), ["divisible", "n_heads"]),
        "odd head_dim": (lambda: ModelConfig(d_model=12, n_heads=4), ["head_dim=3", "odd"]),
        "zero layers": (lambda: get_preset("nano", n_layers=0), ["n_layers=0", "positive"]),
        "negative vocab": (lambda: get_preset("nano", vocab_size=-3), ["vocab_size=-3", "positive"]),
        "float d_ff": (lambda: get_preset("nano", d_ff=64.0), ["d_ff", "positive int"]),
        "bad rope_theta": (lambda: get_preset("nano", rope_theta=1.0), ["rope_theta"]),
        "unknown preset": (lambda: get_preset("huge"), ["unknown preset", "nano"]),
        "unknown config key": (lambda: ModelConfig.from_dict({"n_layer": 3}),
                               ["unknown config keys", "n_layer"]),
    }


CASE_NAMES = list(bad_input_calls(get_preset("nano"), None))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_inputs_raise_one_line_refimpl_error(nano_cfg, params64, name):
    call, words = bad_input_calls(nano_cfg, params64)[name]
    with pytest.raises(RefimplError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"
