"""Golden vectors: a versioned debug state that another implementation checks itself against.

The llm.c pattern (karpathy/llm.c, `test_gpt2`): the reference writes its inputs, outputs, loss,
every gradient and a short loss trajectory for one small seeded state; a port loads the same
inputs, writes the same names, and the comparison goes tensor by tensor, printing the first
values side by side, the max abs and max rel diff, and OK / NOT OK.

    DIR/manifest.json   format_version, generator, full config and [choice]s, Adam settings,
                        and for EVERY tensor: shape, dtype, rtol, atol, meaning, tolerance reason
    DIR/tensors.npz     the tensors, in float64 (int64 / bool for ids and masks), written
                        deterministically (fixed zip timestamps, fixed order)

`export(dir)` builds the state from a seed and computes everything with the project's own
functions (`loss_cached`, `value_and_grad`, `adam_update`), after checking that the packed,
cached and sequential forms agree. `verify(dir)` recomputes every output from the weights and
tokens stored in the file (not from the seed: a port feeds the same inputs) and compares;
`verify(dir, actual=FILE.npz)` compares another implementation's outputs instead. docs/golden.md
is the implementer's guide. Command line: `refimpl golden export DIR`, `refimpl golden verify DIR
[--actual FILE.npz]`.
"""
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from . import __version__
from .autodiff import value_and_grad
from .config import ModelConfig, get_preset
from .coprocessor import SOFT_TOKENS, init_coprocessor
from .decoder import flatten_params, forward, init_params, unflatten_params
from .errors import RefimplError, require
from .objective import loss_cached, loss_packed, loss_sequential
from .optim import adam_init, adam_update
from .traces import build_layout

FORMAT_VERSION = 1
MANIFEST, TENSORS = "manifest.json", "tensors.npz"

# The golden state: nano (3 layers, 3 heads of 16, d=48) with a small vocab; d_ff 96 instead of
# 128 keeps tensors.npz under 2 MB (three float64 copies of the blocks: decoder, coprocessor,
# gradients); init_std 0.2 (not 0.02) so attention is far from uniform and a wrong position id,
# RoPE pairing or mask moves the outputs by O(0.1), not O(1e-6).
SETUP = {"preset": "nano", "vocab_size": 67, "d_ff": 96, "init_std": 0.2, "seed": 1234, "batch_size": 2,
         "seq_len": 16, "n_traces": 3, "n_latents": 3, "n_ahead": 4}
# Fixed, not sampled: both ends of the valid range [0, T-1-N_A] = [0, 11], and two adjacent
# traces (3, 4), whose groups must not see each other.
TRACE_POSITIONS = [[0, 6, 11], [3, 4, 10]]
NOISE = {"decoder_norms": 0.1, "coprocessor_matrices": 0.05, "coprocessor_norms": 0.05}
ADAM = {"steps": 5, "lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}

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
    "ahead_position_ids": "p+N_L+1+j for ahead token x_{p+1+j}, j = 0..N_A-2",
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

# ---------------------------------------------------------------------------------------------
# The state: config, weights, tokens
def golden_config(setup=SETUP):
    return get_preset(setup["preset"], vocab_size=setup["vocab_size"], d_ff=setup["d_ff"],
                      init_std=setup["init_std"])


def make_state(seed=SETUP["seed"], setup=SETUP):
    """(cfg, decoder params, coprocessor trainable dict, tokens [B, T], trace positions [B, K]).

    Decoder: init_params(seed) in float64, its RMSNorm weights set to 1 + N(0, 0.1^2) so that a
    port ignoring norm weights fails. Coprocessor: a COPY of the decoder, every array perturbed
    (matrices by N(0, (0.05 std(W))^2), norms by N(0, 0.05^2)), so a port that mixes the two up
    fails. Soft tokens N(0, std(E)) from init_coprocessor.
    """
    cfg = golden_config(setup)
    rng = np.random.default_rng([seed, 1])
    dec = init_params(cfg, seed=seed, dtype=np.float64)
    for layer in dec["layers"]:
        for k in ("input_layernorm", "post_attention_layernorm"):
            layer[k] = layer[k] + NOISE["decoder_norms"] * rng.standard_normal(layer[k].shape)
    dec["norm"] = dec["norm"] + NOISE["decoder_norms"] * rng.standard_normal(dec["norm"].shape)
    trainable = init_coprocessor(dec, cfg, setup["n_latents"], init="copy", seed=seed)
    for name, w in list(trainable.items()):
        if name == SOFT_TOKENS:
            continue
        scale = NOISE["coprocessor_norms"] if w.ndim == 1 else NOISE["coprocessor_matrices"] * w.std()
        trainable[name] = w + scale * rng.standard_normal(w.shape)
    tokens = rng.integers(0, cfg.vocab_size, (setup["batch_size"], setup["seq_len"])).astype(np.int64)
    return cfg, dec, trainable, tokens, np.array(TRACE_POSITIONS, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Every output, computed with the project's own functions
def compute(cfg, dec, trainable, tokens, trace_positions, n_latents, n_ahead, adam=ADAM):
    """{name: array} of every output tensor (see `tensor_specs` for the list and meanings)."""
    out = {}
    logits, _, cache = forward(dec, cfg, tokens)                            # [B, T, V]
    out["baseline.logits"] = logits
    out["decoder_cache.k"] = np.stack(cache.k)                              # [L, B, H, T, Dh]
    out["decoder_cache.v"] = np.stack(cache.v)
    layout = build_layout(tokens, trace_positions, n_latents, n_ahead)
    out["packed.position_ids"] = layout.packed_positions().astype(np.int64)  # [B, S]
    out["packed.mask"] = layout.packed_may_attend()                          # [B, S, S]

    def loss_fn(tr):
        return loss_cached(dec, tr, cfg, tokens, trace_positions, n_latents, n_ahead)[0]

    loss, res = loss_cached(dec, trainable, cfg, tokens, trace_positions, n_latents, n_ahead)
    out["latents"] = res["latents"]                                          # [B, K, N_L, D]
    out["ahead.targets"] = layout.targets.astype(np.int64)                   # [B, K, N_A]
    out["ahead.logits"] = res["logits"]                                      # [B, K, N_A, V]
    out["trace_loss"] = res["nll"].mean(-1)                                  # [B, K]
    out["loss"] = np.asarray(loss, dtype=np.float64)                         # []
    state, losses, params = adam_init(trainable), [], dict(trainable)
    for step in range(adam["steps"]):
        value, grads, _ = value_and_grad(loss_fn, params)
        if step == 0:
            out.update({_grad_name(n): g for n, g in grads.items()})
        losses.append(float(value))
        params, state = adam_update(params, grads, state, adam["lr"], adam["beta1"], adam["beta2"],
                                    adam["eps"], adam["weight_decay"])
    out["adam.losses"] = np.array(losses)                                    # [steps]
    return out


def check_forms(cfg, dec, trainable, tokens, trace_positions, n_latents, n_ahead, rtol=1e-9):
    """Raise AssertionError unless packed, cached and sequential forms agree (loss, logits,
    latents, every gradient). Run at export time; cheap at golden size."""
    results = {}
    for name, fn in (("cached", loss_cached), ("packed", loss_packed), ("sequential", loss_sequential)):
        def loss_fn(tr, fn=fn):
            loss, res = fn(dec, tr, cfg, tokens, trace_positions, n_latents, n_ahead)
            return loss, {}
        _, res = fn(dec, trainable, cfg, tokens, trace_positions, n_latents, n_ahead)
        loss, grads, _ = value_and_grad(loss_fn, trainable)
        results[name] = {"loss": loss, "logits": res["logits"], "latents": res["latents"],
                         **{"grad." + k: g for k, g in grads.items()}}
    for name in ("packed", "sequential"):
        for key, ref in results["cached"].items():
            got = results[name][key]
            if not np.allclose(got, ref, rtol=rtol, atol=rtol * (np.abs(ref).max() + 1e-30)):
                raise AssertionError(f"golden export: forms disagree on {key} (cached vs {name}, "
                                     f"max diff {np.abs(got - ref).max():.3e}): refimpl has a bug; "
                                     "run tests/test_objective.py")


# ---------------------------------------------------------------------------------------------
# Names, meanings and tolerances
def _grad_name(name):
    return "grad.soft_tokens" if name == SOFT_TOKENS else "grad.coprocessor." + name


def tensor_specs(cfg, setup=SETUP, adam=ADAM):
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
        "group k = [p+1..p+N_L (latents), p+N_L+1..p+N_L+N_A-1 (ahead tokens)]")
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
def export(directory, seed=SETUP["seed"], check=True):
    """Write DIR/manifest.json and DIR/tensors.npz for the golden state; returns the manifest."""
    setup = {**SETUP, "seed": seed}
    cfg, dec, trainable, tokens, trace_positions = make_state(seed, setup)
    NL, NA = setup["n_latents"], setup["n_ahead"]
    if check:
        check_forms(cfg, dec, trainable, tokens, trace_positions, NL, NA)
    outputs = compute(cfg, dec, trainable, tokens, trace_positions, NL, NA)
    arrays = {"tokens": tokens, "trace_positions": trace_positions,
              **{"decoder." + n: a for n, a in flatten_params(dec).items()},
              **{"coprocessor." + n: a for n, a in trainable.items() if n != SOFT_TOKENS},
              "soft_tokens": trainable[SOFT_TOKENS], **outputs}
    specs = tensor_specs(cfg, setup)
    manifest = _manifest(cfg, setup, specs)
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


def _manifest(cfg, setup, specs):
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"name": "refimpl.golden", "refimpl_version": __version__,
                      "command": "refimpl golden export DIR", "numpy_version": np.__version__},
        "config": {"model": cfg.to_dict(), "head_dim": cfg.head_dim, "batch_size": setup["batch_size"],
                   "seq_len": setup["seq_len"], "n_traces": setup["n_traces"],
                   "n_latents": setup["n_latents"], "n_ahead": setup["n_ahead"],
                   "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps, "dtype": "float64",
                   "choices": CHOICES},
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


# ---------------------------------------------------------------------------------------------
# Loading
def load(directory):
    """(manifest, {name: array}) of a golden directory; malformed files raise RefimplError."""
    directory = Path(directory)
    mpath, tpath = directory / MANIFEST, directory / TENSORS
    for p in (mpath, tpath):
        require(p.is_file(), f"golden file {p} not found: pass a directory written by "
                             "`refimpl golden export DIR`")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RefimplError(f"golden manifest {mpath} is not valid JSON ({e}): regenerate it with "
                           "`refimpl golden export DIR`") from None
    require(isinstance(manifest, dict) and isinstance(manifest.get("tensors"), dict)
            and "config" in manifest, f"golden manifest {mpath} lacks 'tensors' or 'config': "
            "regenerate it with `refimpl golden export DIR`")
    version = manifest.get("format_version")
    require(version == FORMAT_VERSION, f"golden manifest {mpath} has format_version {version!r}, "
            f"this refimpl reads {FORMAT_VERSION}: use the matching refimpl or regenerate the file")
    _check_manifest(manifest, mpath)
    arrays = load_npz(tpath, "golden tensors")
    specs = manifest["tensors"]
    missing = [n for n in specs if n not in arrays]
    extra = [n for n in arrays if n not in specs]
    require(not missing and not extra, f"golden {directory}: manifest and {TENSORS} disagree "
            f"(missing in npz {missing[:3]}, not in manifest {extra[:3]}): regenerate both together")
    for n, spec in specs.items():
        require(list(arrays[n].shape) == list(spec.get("shape", [])),
                f"golden {directory}: {n} has shape {list(arrays[n].shape)}, the manifest says "
                f"{spec.get('shape')}: the files are from different exports; regenerate them")
    return manifest, arrays


def _check_manifest(manifest, mpath):
    """The fields that verify reads: per-tensor shape and tolerances, config, adam, generator."""
    fix = "regenerate it with `refimpl golden export DIR`"
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")
    bad = [n for n, spec in manifest["tensors"].items() if not (isinstance(spec, dict) and number(
        spec.get("rtol")) and number(spec.get("atol")) and isinstance(spec.get("shape"), list))]
    require(not bad, f"golden manifest {mpath}: the entries of {bad[:3]} lack a shape list or "
                     f"numeric rtol/atol; {fix}")
    c, adam = manifest["config"], manifest.get("adam")
    require(isinstance(c, dict) and isinstance(c.get("model"), dict) and isinstance(c.get("n_latents"), int)
            and isinstance(c.get("n_ahead"), int) and isinstance(adam, dict)
            and isinstance(adam.get("steps"), int) and all(number(adam.get(k)) for k in ADAM)
            and isinstance(manifest.get("generator", {}), dict),
            f"golden manifest {mpath} has a malformed config, adam or generator section; {fix}")
    try:
        ModelConfig.from_dict(c["model"])
    except RefimplError as e:
        raise RefimplError(f"golden manifest {mpath}: {e}; {fix}") from None


def load_npz(path, what="tensors"):
    """{name: array} from an .npz, never unpickling; a one-line RefimplError otherwise."""
    path = Path(path)
    require(path.is_file(), f"{what} file {path} not found: check the path")
    require(zipfile.is_zipfile(path), f"{what} file {path} is not a readable .npz (not a zip "
                                      "archive): write it with np.savez")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {n: z[n] for n in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise RefimplError(f"{what} file {path} holds object arrays, which are never "
                               "unpickled: save plain numeric arrays (np.savez)") from None
        raise RefimplError(f"{what} file {path} is not a readable .npz ({e}): write it with "
                           "np.savez") from None
    except Exception as e:  # OSError, zipfile.BadZipFile, EOFError, zlib.error, ...
        raise RefimplError(f"{what} file {path} is not a readable .npz ({e}): write it with "
                           "np.savez") from None


# ---------------------------------------------------------------------------------------------
# Verify
def recompute(manifest, arrays):
    """Every output tensor, recomputed from the inputs stored in a golden file."""
    c = manifest["config"]
    cfg = ModelConfig.from_dict(c["model"])
    dec_flat = {n[len("decoder."):]: arrays[n] for n in arrays if n.startswith("decoder.")}
    dec = unflatten_params(dec_flat, cfg.n_layers)
    require("embed_tokens" in dec, "golden file lacks decoder.model.embed_tokens.weight: "
            "regenerate it")
    trainable = {n[len("coprocessor."):]: arrays[n] for n in arrays if n.startswith("coprocessor.")}
    trainable[SOFT_TOKENS] = arrays["soft_tokens"]
    return compute(cfg, dec, trainable, arrays["tokens"], arrays["trace_positions"],
                   c["n_latents"], c["n_ahead"], {k: manifest["adam"][k] for k in ADAM})


def compare(name, spec, expected, actual):
    """One comparison -> dict(ok, max_abs, max_rel, line) for the report."""
    e = np.asarray(expected)
    if actual is None:
        status = "MISSING" if spec.get("required") else "missing (optional)"
        return {"ok": not spec.get("required"), "missing": True,
                "line": f"{status:<8} {name} {list(e.shape)}"}
    a = np.asarray(actual)
    if a.shape != e.shape:
        return {"ok": False, "missing": False, "max_abs": float("inf"), "max_rel": float("inf"),
                "line": f"NOT OK   {name}: shape {list(a.shape)}, expected {list(e.shape)}"}
    if e.dtype.kind in "biu":
        ok = a.dtype.kind in "biu" and bool(np.array_equal(a, e))
        diff = np.abs(a.astype(np.int64) - e.astype(np.int64)) if a.dtype.kind in "biu" else np.abs(a - e)
        max_abs, max_rel = float(diff.max(initial=0)), None
    else:
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        diff = np.abs(a64 - e64)
        finite = bool(np.isfinite(a64).all())
        ok = finite and bool((diff <= spec["atol"] + spec["rtol"] * np.abs(e64)).all())
        max_abs = float(diff.max(initial=0)) if finite else float("inf")
        big = np.abs(e64) > max(spec["atol"], 1e-300)
        max_rel = float((diff[big] / np.abs(e64[big])).max(initial=0)) if finite else float("inf")
    first = "  ".join(f"{_fmt(x)}|{_fmt(y)}" for x, y in zip(e.ravel()[:3], a.ravel()[:3]))
    rel = "-" if max_rel is None else f"{max_rel:.2e}"
    line = (f"{'OK' if ok else 'NOT OK':<8} {name} {list(e.shape)}  max_abs {max_abs:.2e}  "
            f"max_rel {rel}  (rtol {spec['rtol']:g}, atol {spec['atol']:g})  "
            f"expected|actual: {first}")
    return {"ok": ok, "missing": False, "line": line, "max_abs": max_abs, "max_rel": max_rel}


def _fmt(x):
    return str(bool(x)) if isinstance(x, (bool, np.bool_)) else (
        str(int(x)) if float(x).is_integer() and abs(x) < 1e6 else f"{float(x):.7g}")


def verify(directory, actual=None, out=None):
    """Compare tensor by tensor and print a report; True iff every compared tensor is OK.

    actual None: recompute every output from the golden file's own inputs with refimpl.
    actual FILE.npz: compare another implementation's tensors (same names). A name absent from
    FILE is MISSING; it fails only if the manifest lists it in required_for_actual.
    """
    out = out or sys.stdout
    manifest, golden = load(directory)
    specs = manifest["tensors"]
    if actual is None:
        got = recompute(manifest, golden)
        names = [n for n, s in specs.items() if s.get("role") == "output"]
        source = "refimpl recomputed from the file's inputs"
    else:
        got = load_npz(actual, "actual tensors")
        names = list(specs)
        source = str(actual)
    gen = manifest.get("generator", {})
    print(f"golden {directory} (format {manifest['format_version']}, refimpl "
          f"{gen.get('refimpl_version', '?')}) vs {source}", file=out)
    rows = [compare(n, specs[n], golden[n], got.get(n)) for n in names]
    for r in rows:
        print(r["line"], file=out)
    bad = [n for n, r in zip(names, rows) if not r["ok"]]
    checked = [r for r in rows if not r["missing"]]
    n_missing = sum(r["missing"] for r in rows)
    extra = sorted(set(got) - set(specs)) if actual is not None else []
    if extra:
        print(f"note: {len(extra)} names not in the golden file were ignored: {', '.join(extra[:5])}"
              + (" ..." if len(extra) > 5 else ""), file=out)
    worst = max((r["max_rel"] for r in checked if r["max_rel"] is not None), default=0.0)
    n_ok = sum(r["ok"] for r in checked)
    n_req = sum(r["missing"] and not r["ok"] for r in rows)
    print(f"{'PASS' if not bad else 'FAIL'}: {n_ok}/{len(checked)} compared tensors OK, "
          f"{n_missing} missing ({n_req} required), worst max_rel {worst:.2e}"
          + (f"; NOT OK or MISSING: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}" if bad else ""),
          file=out)
    return not bad


# ---------------------------------------------------------------------------------------------
# Command line: `refimpl golden export DIR`, `refimpl golden verify DIR [--actual FILE.npz]`
def add_arguments(parser):
    sub = parser.add_subparsers(dest="golden_command", metavar="ACTION", parser_class=type(parser))
    p = sub.add_parser("export", help="write DIR/manifest.json and DIR/tensors.npz",
                       description="Compute the golden vectors and write DIR/manifest.json and "
                                   "DIR/tensors.npz (deterministic).")
    p.add_argument("dir", help="output directory (e.g. tiny_data/golden)")
    p.add_argument("--seed", type=int, default=SETUP["seed"],
                   help=f"seed of the golden state (default {SETUP['seed']}, the committed set)")
    p = sub.add_parser("verify", help="check refimpl (or another implementation) against DIR",
                       description="Recompute every output from DIR's inputs and compare, or with "
                                   "--actual compare another implementation's tensors. Exit 1 "
                                   "on any mismatch.")
    p.add_argument("dir", help="golden directory (e.g. tiny_data/golden)")
    p.add_argument("--actual", metavar="FILE.npz",
                   help="another implementation's outputs, with the golden names")


def run(args):
    command = getattr(args, "golden_command", None)
    require(command in ("export", "verify"), "golden needs an action: `refimpl golden export DIR` "
            "or `refimpl golden verify DIR [--actual FILE.npz]`")
    if command == "export":
        manifest = export(args.dir, seed=args.seed)
        size = sum((Path(args.dir) / f).stat().st_size for f in (MANIFEST, TENSORS))
        print(f"wrote {len(manifest['tensors'])} tensors to {args.dir}/{TENSORS} and "
              f"{args.dir}/{MANIFEST} ({size / 1024:.0f} KiB)")
        return 0
    return 0 if verify(args.dir, args.actual) else 1
