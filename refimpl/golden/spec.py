"""The golden files: names, meanings and tolerances of every tensor, the manifest, and export.

    DIR/manifest.json   format_version, generator, full config (with the position convention,
                        config.ahead_positions) and the conventions a port must share, Adam
                        settings, and for EVERY tensor: shape, dtype, rtol, atol, meaning, reason
    DIR/tensors.npz     the tensors, in float64 (int64 / bool for ids and masks), written
                        deterministically (fixed zip timestamps, fixed order)
"""
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.decoder import flatten_params, init_params
from .state import ADAM, NOISE, SETUP, SOFT_TOKENS, check_forms, compute, make_state

FORMAT_VERSION = 1


MANIFEST, TENSORS = "manifest.json", "tensors.npz"


CHOICES = {
    "architecture": "Llama: pre-norm RMSNorm, RoPE rotate-half, SwiGLU MLP, no biases, unscaled "
                    "token embeddings, LM head tied to model.embed_tokens.weight",
    "rope": "rotate-half: dim i pairs with dim i + Dh/2 and turns by angle pos * theta^(-2i/Dh), "
            "q' = q*cos + rotate_half(q)*sin, rotate_half(x) = [-x[Dh/2:], x[:Dh/2]]",
    "rmsnorm": "w * x / sqrt(mean(x^2) + eps)",
    "coprocessor_context": "coprocessor layer l attends to the DECODER's layer-l cached keys "
                           "(after RoPE) and values of x_0..x_p, then to its own soft-token keys; "
                           "the prefix is never recomputed with coprocessor weights",
    "latent_readout": "final hidden state after the coprocessor's final RMSNorm (model.norm), "
                      "at the soft-token slots; no projection",
    "latent_position_ids": "p+1+j for soft token / latent j = 0..N_L-1",
    "soft_tokens": "one [N_L, D] array shared by every trace and every sequence",
    "mask": "original token: causal over original tokens. Slot of trace k (latent or ahead): "
            "original tokens x_0..x_{p_k}, and the slots of its own trace at or before itself. "
            "Nothing else (no other trace, no original token after p_k). Same rule in the "
            "coprocessor, whose trace groups are the N_L soft tokens alone",
    "readout": "target x_{p+1} is read at the last latent slot, target x_{p+1+j} at ahead token "
               "x_{p+j} (j >= 1)",
    "loss": "mean over B*K*N_A targets of the cross-entropy (natural log) of the frozen decoder",
    "trainable": "coprocessor blocks + coprocessor final norm + soft tokens; the decoder is "
                 "frozen, the coprocessor's embedding and head are unused (absent here)",
}


AHEAD_IDS = {"original": "p+1..p+N_A-1", "continue": "p+N_L+1..p+N_L+N_A-1"}


def choices(ahead_positions):
    """The conventions of a golden set, with the position ids of its ahead tokens."""
    ids = {"original": "p+1+j for ahead token x_{p+1+j}, j = 0..N_A-2: its position in the sequence",
           "continue": "p+N_L+1+j for ahead token x_{p+1+j}, j = 0..N_A-2: counting on after the latents"}
    return {**CHOICES, "ahead_position_ids": ids[ahead_positions]}


def tensor_specs(cfg, setup=SETUP, adam=ADAM, ahead_positions="original"):
    """Ordered {name: spec} of every tensor in the golden file: inputs, then outputs in the order
    they are computed. spec: shape, dtype, rtol, atol, role, meaning, tolerance_reason, required."""
    B, T, K = setup["batch_size"], setup["seq_len"], setup["n_traces"]
    NL, NA, V, D = setup["n_latents"], setup["n_ahead"], cfg.vocab_size, cfg.d_model
    L, H, Dh = cfg.n_layers, cfg.n_heads, cfg.head_dim
    S = T + K * (NL + NA - 1)
    shapes = {n: list(s) for n, s in _weight_shapes(cfg).items()}
    specs = {}

    def add(name, shape, dtype, tol, role, meaning, required=False):
        rtol, atol, reason = TOLERANCES[tol]
        specs[name] = {"shape": list(shape), "dtype": dtype, "rtol": rtol, "atol": atol,
                       "role": role, "required": required, "meaning": meaning,
                       "tolerance_reason": reason}

    add("tokens", [B, T], "int64", "exact", "input", "token ids x_0..x_{T-1} of each sequence")
    add("trace_positions", [B, K], "int64", "exact", "input",
        "augmentation points p_k (0-based): latents are inserted after x_{p_k}")
    for n, s in shapes.items():
        add("decoder." + n, s, "float64", "weight", "input", f"frozen decoder weight {n} (Linear [out, in])"
            if len(s) == 2 else f"frozen decoder weight {n}")
    for n, s in shapes.items():
        if n != "model.embed_tokens.weight":
            add("coprocessor." + n, s, "float64", "weight", "input",
                f"coprocessor weight {n}: decoder copy + seeded noise")
    add("soft_tokens", [NL, D], "float64", "weight", "input", "trainable soft tokens S, shared by all traces")
    add("baseline.logits", [B, T, V], "float64", "forward", "output",
        "plain decoder logits over the tokens, positions 0..T-1, causal")
    add("decoder_cache.k", [L, B, H, T, Dh], "float64", "forward", "output",
        "decoder prefill keys per layer, AFTER RoPE (what the coprocessor reads)")
    add("decoder_cache.v", [L, B, H, T, Dh], "float64", "forward", "output",
        "decoder prefill values per layer")
    add("packed.position_ids", [B, S], "int64", "exact", "output",
        "position ids of the packed sequence [x_0..x_{T-1}; group_1; ..; group_K], "
        f"group k = [p+1..p+N_L (latents), {AHEAD_IDS[ahead_positions]} (ahead tokens)]")
    add("packed.mask", [B, S, S], "bool", "exact", "output",
        "one-pass may-attend mask of the packed decoder sequence [query, key] (SPEC §6)")
    add("latents", [B, K, NL, D], "float64", "coprocessor", "output",
        "coprocessor output z per trace: final hidden state after its final RMSNorm", True)
    add("ahead.targets", [B, K, NA], "int64", "exact", "output", "targets x_{p+1}..x_{p+N_A} per trace")
    add("ahead.logits", [B, K, NA, V], "float64", "augmented", "output",
        "decoder logits at the read-out slots (last latent, then ahead tokens x_{p+1}..x_{p+N_A-1})",
        True)
    add("trace_loss", [B, K], "float64", "loss", "output",
        "mean cross-entropy over that trace's N_A targets", True)
    add("loss", [], "float64", "loss", "output", "training loss: mean over B*K*N_A targets", True)
    for n, s in shapes.items():
        if n != "model.embed_tokens.weight":
            add("grad.coprocessor." + n, s, "float64", "grad", "output", f"d loss / d coprocessor {n}", True)
    add("grad.soft_tokens", [NL, D], "float64", "grad", "output", "d loss / d soft_tokens", True)
    add("adam.losses", [adam["steps"]], "float64", "trajectory", "output",
        f"loss before each of {adam['steps']} Adam updates from this state (adam.losses[0] == loss)",
        True)
    return specs


def _weight_shapes(cfg):
    return {n: a.shape for n, a in flatten_params(init_params(cfg, seed=0, dtype=np.float64)).items()}


# (rtol, atol, reason). An element passes when |actual - expected| <= atol + rtol * |expected|.
# Chosen for a float32 port against this float64 reference: examples/torch_port.py in float32,
# run on the committed state and 5 other seeds, uses at most 0.13 of any tolerance
# (docs/golden.md has the table), while a wrong convention (RoPE pairing, position
# ids, mask, read-out, coprocessor/decoder mix-up) moves latents and logits by 1 or more.
TOLERANCES = {
    "exact": (0.0, 0.0, "integers and masks: must be identical"),
    "weight": (1e-6, 1e-7, "inputs echoed back: float32 rounding of a float64 value is <= 6e-8 "
                           "relative"),
    "forward": (1e-4, 1e-4, "float64 reference vs float32 port, 3 decoder layers; float32 "
                            "rounding (6e-8) grows to ~1e-5 absolute on O(1) values"),
    "coprocessor": (1e-4, 1e-4, "float32 port: the decoder's 3 layers (cache), then 3 coprocessor "
                                "layers and a final RMSNorm; errors compound with depth"),
    "augmented": (2e-4, 2e-4, "float32 port: 3 decoder + 3 coprocessor + 3 decoder layers deep"),
    "loss": (1e-5, 5e-5, "float32 port: mean of log-softmax values; averaging shrinks the error"),
    "grad": (1e-3, 3e-5, "float32 port: the backward pass doubles the depth, and cancellations "
                         "make small elements relatively noisy; atol covers elements near zero"),
    "trajectory": (1e-3, 1e-3, "float32 port: 5 Adam steps at lr 1e-2; m/sqrt(v) turns the rounding "
                               "of near-zero gradients into whole-lr steps (seen: 7e-4 absolute); "
                               "a missing weight decay moves it by ~1e-2"),
}


# ---------------------------------------------------------------------------------------------
# Export
def export(directory, seed=SETUP["seed"], ahead_positions="original", check=True):
    """Write DIR/manifest.json and DIR/tensors.npz for the golden state; returns the manifest."""
    setup = {**SETUP, "seed": seed}
    cfg, dec, trainable, tokens, trace_positions = make_state(seed, setup)
    NL, NA = setup["n_latents"], setup["n_ahead"]
    if check:
        check_forms(cfg, dec, trainable, tokens, trace_positions, NL, NA, ahead_positions)
    outputs = compute(cfg, dec, trainable, tokens, trace_positions, NL, NA, ahead_positions)
    arrays = {"tokens": tokens, "trace_positions": trace_positions,
              **{"decoder." + n: a for n, a in flatten_params(dec).items()},
              **{"coprocessor." + n: a for n, a in trainable.items() if n != SOFT_TOKENS},
              "soft_tokens": trainable[SOFT_TOKENS], **outputs}
    specs = tensor_specs(cfg, setup, ahead_positions=ahead_positions)
    manifest = _manifest(cfg, setup, specs, ahead_positions)
    arrays = {n: np.asarray(arrays[n]) for n in specs}
    for n, spec in specs.items():
        a = arrays[n]
        if list(a.shape) != spec["shape"] or a.dtype.name != spec["dtype"]:
            raise AssertionError(f"golden export: {n} is {a.dtype}{list(a.shape)}, its spec says "
                                 f"{spec['dtype']}{spec['shape']}: refimpl has a bug")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TENSORS).write_bytes(npz_bytes(arrays))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _manifest(cfg, setup, specs, ahead_positions):
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"name": "refimpl.golden", "refimpl_version": __version__,
                      "command": "refimpl golden export DIR", "numpy_version": np.__version__},
        "config": {"model": cfg.to_dict(), "head_dim": cfg.head_dim, "batch_size": setup["batch_size"],
                   "seq_len": setup["seq_len"], "n_traces": setup["n_traces"],
                   "n_latents": setup["n_latents"], "n_ahead": setup["n_ahead"],
                   "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps, "dtype": "float64",
                   "ahead_positions": ahead_positions, "choices": choices(ahead_positions)},
        "state": {"seed": setup["seed"], "preset": setup["preset"],
                  "how": "decoder = init_params(seed) float64 with RMSNorm weights 1 + N(0, 0.1^2); "
                         "coprocessor = copy of the decoder + N(0, (0.05 std(W))^2) per matrix and "
                         "N(0, 0.05^2) per norm; soft tokens N(0, std(E)); tokens uniform ids; "
                         "trace positions fixed (both ends of [0, T-1-N_A], two adjacent)",
                  "noise": NOISE},
        "adam": {**ADAM, "form": "AdamW, bias-corrected: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; "
                 "p = p (1 - lr wd); p = p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps) "
                 "(= torch.optim.AdamW)", "weight_decay_on": "every trainable array (blocks, "
                 "norms, soft tokens)", "clipping": "none", "lr_schedule": "constant",
                 "gradient": "of `loss` w.r.t. the trainable arrays only (the decoder is frozen)"},
        "comparison": "element passes iff |actual - expected| <= atol + rtol * |expected| and both "
                      "are finite; ints and bools must be equal; shapes must match",
        "tolerance_policy": "set for a float32 port against this float64 reference: each class is "
                            ">= 7x the largest error of examples/torch_port.py in float32 over the "
                            "committed state and 5 other seeds, and far below the effect of a wrong "
                            "convention (>= 1 on latents/logits); see docs/golden.md",
        "required_for_actual": [n for n, s in specs.items() if s["required"]],
        "required_rule": "with --actual, a missing name fails only if listed here: the training "
                         "contract (latents, ahead logits, trace losses, loss, every gradient, the "
                         "Adam trajectory); inputs echoed back and intermediates are optional",
        "tensors": specs,
    }


def npz_bytes(arrays):
    """A deterministic .npz: members in the given order, fixed timestamps, no pickles."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array(a, order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return buf.getvalue()
