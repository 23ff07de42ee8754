"""The golden state: a small seeded decoder, coprocessor, token batch and trace positions, and every
output computed from it with refimpl's own functions, after checking that the three forms agree."""
import itertools

import numpy as np

from ..config import get_preset
from ..core.coprocessor import SOFT_TOKENS, init_coprocessor
from ..core.decoder import forward, init_params
from ..core.layout import build_layout
from ..core.objective import FORMS, loss_cached
from ..training.autodiff import value_and_grad
from ..training.optim import adam_init, adam_update

# The golden state: nano (3 layers, 3 heads of 16, d=48) with a small vocab; d_ff 96 instead of
# 128 keeps tensors.npz under 2 MB (three float64 copies of the blocks: decoder, coprocessor,
# gradients); init_std 0.2 (not 0.02) so attention is far from uniform and a wrong position id,
# RoPE pairing or mask moves the outputs by O(0.1), not O(1e-6).
SETUP = {"preset": "nano", "vocab_size": 67, "d_ff": 96, "init_std": 0.2, "seed": 1234, "batch_size": 2,
         "seq_len": 16, "n_traces": 3, "n_latents": 3, "n_ahead": 4}
SIZES = ("batch_size", "seq_len", "n_traces", "n_latents", "n_ahead")
# Fixed, not sampled: both ends of the valid range [0, T-1-N_A] = [0, 11], and two adjacent
# traces (3, 4), whose groups must not see each other.
TRACE_POSITIONS = [[0, 6, 11], [3, 4, 10]]
# The grouped-query set (tiny_data/golden/gqa): 4 query heads of 12 reading 2 key/value heads.
GQA = {"n_heads": 4, "n_kv_heads": 2}
NOISE = {"decoder_norms": 0.1, "coprocessor_matrices": 0.05, "coprocessor_norms": 0.05}
ADAM = {"steps": 5, "lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def golden_config(setup=SETUP):
    fields = {k: v for k, v in setup.items() if k not in ("preset", "seed", *SIZES)}   # config fields
    return get_preset(setup["preset"], **fields)


def make_state(seed=SETUP["seed"], setup=SETUP):
    """(cfg, decoder params, coprocessor trainable dict, tokens [B, T], trace positions [B, K]).
    The noise (manifest state.how) makes a port that ignores norm weights or mixes the two models up fail."""
    cfg = golden_config(setup)
    rng = np.random.default_rng([seed, 1])
    dec = init_params(cfg, seed=seed, dtype=np.float64)
    norms = [(layer, k) for layer in dec["layers"] for k in ("input_layernorm", "post_attention_layernorm")]
    for owner, k in [*norms, (dec, "norm")]:
        owner[k] = owner[k] + NOISE["decoder_norms"] * rng.standard_normal(owner[k].shape)
    trainable = init_coprocessor(dec, cfg, setup["n_latents"], init="copy", seed=seed)
    for name, w in [(n, w) for n, w in trainable.items() if n != SOFT_TOKENS]:
        scale = NOISE["coprocessor_norms"] if w.ndim == 1 else NOISE["coprocessor_matrices"] * w.std()
        trainable[name] = w + scale * rng.standard_normal(w.shape)
    tokens = rng.integers(0, cfg.vocab_size, (setup["batch_size"], setup["seq_len"])).astype(np.int64)
    return cfg, dec, trainable, tokens, np.array(TRACE_POSITIONS, dtype=np.int64)


def compute(cfg, dec, trainable, tokens, trace_positions, n_latents, n_ahead, latent_positions, adam=ADAM):
    """{name: array} of every output tensor (manifest_text.json lists them with their meanings)."""
    rest = (cfg, tokens, trace_positions, n_latents, n_ahead, latent_positions)
    logits, _, cache = forward(dec, cfg, tokens)                             # [B, T, V]
    layout = build_layout(tokens, trace_positions, n_latents, n_ahead, latent_positions)
    loss, res = loss_cached(dec, trainable, *rest)
    out = {"baseline.logits": logits,
           "decoder_cache.k": np.stack(cache.k), "decoder_cache.v": np.stack(cache.v),  # [L, B, Hkv, T, Dh]
           "packed.position_ids": layout.packed_positions().astype(np.int64),  # [B, S]
           "packed.mask": layout.packed_may_attend(),                        # [B, S, S]
           "latents": res["latents"],                                        # [B, K, N_L, D]
           "ahead.targets": layout.targets.astype(np.int64),                 # [B, K, N_A]
           "ahead.logits": res["logits"],                                    # [B, K, N_A, V]
           "trace_loss": res["nll"].mean(-1),                                # [B, K]
           "loss": np.asarray(loss, dtype=np.float64)}                       # []
    state, losses, params = adam_init(trainable), [], dict(trainable)
    for step in range(adam["steps"]):
        value, grads, _ = value_and_grad(lambda tr: loss_cached(dec, tr, *rest)[0], params)
        if step == 0:                                              # grad.soft_tokens, grad.coprocessor.*
            out.update({f"grad.{'' if n == SOFT_TOKENS else 'coprocessor.'}{n}": g for n, g in grads.items()})
        losses.append(float(value))
        params, state = adam_update(params, grads, state, **{k: v for k, v in adam.items() if k != "steps"})
    out["adam.losses"] = np.array(losses)                                    # [steps]
    return out


def check_forms(cfg, dec, trainable, tokens, trace_positions, n_latents, n_ahead, latent_positions):
    """AssertionError unless the three forms (objective.FORMS) agree on loss, logits, latents, gradients."""
    rest = (cfg, tokens, trace_positions, n_latents, n_ahead, latent_positions)
    results = {}
    for name, fn in FORMS.items():
        _, res = fn(dec, trainable, *rest)
        loss, grads, _ = value_and_grad(lambda tr, fn=fn: fn(dec, tr, *rest)[0], trainable)
        results[name] = {"loss": loss, "logits": res["logits"], "latents": res["latents"],
                         **{"grad." + k: g for k, g in grads.items()}}
    for name, (key, ref) in itertools.product(FORMS, results["cached"].items()):   # cached vs itself too
        got = results[name][key]
        if not np.allclose(got, ref, rtol=1e-9, atol=1e-9 * (np.abs(ref).max() + 1e-30)):
            raise AssertionError(f"golden export: forms disagree on {key} (cached vs {name}, max diff "
                                 f"{np.abs(got - ref).max():.3e}): refimpl has a bug; run "
                                 "tests/test_objective.py")
