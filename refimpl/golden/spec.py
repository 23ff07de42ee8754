"""The golden files DIR/manifest.json and DIR/tensors.npz (format: docs/golden.md): the tensor list
with shapes and tolerances (data: manifest_text.json beside this file), the manifest, and export."""
import io
import json
import zipfile
from pathlib import Path
from string import Template

import numpy as np

from .. import __version__
from ..core.decoder import flatten_params, param_shapes
from ..errors import RefimplError, require
from ..files import read_json, write_atomically
from .state import ADAM, GQA, NOISE, SETUP, SIZES, SOFT_TOKENS, check_forms, compute, make_state

FORMAT_VERSION = 1
FLOAT64_TIER = 1e-9            # the float64 tier: max|actual - expected| <= FLOAT64_TIER * max|expected|
MANIFEST, TENSORS = "manifest.json", "tensors.npz"
TEXT = json.loads(Path(__file__).with_name("manifest_text.json").read_text(encoding="utf-8"))
LATENT_POSITIONS = tuple(TEXT["latent_positions"])              # ("behind", "after"): a set's convention


def tensor_specs(cfg, setup=SETUP, latent_positions="behind"):
    """Ordered {name: spec} of every tensor: inputs, then outputs in the order they are computed."""
    B, T, K, NL, NA = (setup[k] for k in SIZES)
    dims = {"B": B, "T": T, "K": K, "NL": NL, "NA": NA, "V": cfg.vocab_size, "D": cfg.d_model,
            "L": cfg.n_layers, "H": cfg.n_heads, "Hkv": cfg.kv_heads, "Dh": cfg.head_dim,
            "S": T + K * (NL + NA - 1), "steps": ADAM["steps"]}
    fill = {"steps": ADAM["steps"], "latent_ids": TEXT["latent_positions"][latent_positions]["latent_ids"],
            "kv_note": _gqa(cfg, "cache_note")}
    specs = {}
    for row in TEXT["tensors"]:
        entries = ([(w, list(s)) for w, s in param_shapes(cfg).items() if w not in row["except"]]
                   if row["shape"] == "weights" else [("", [dims[d] for d in row["shape"]])])   # (w, shape)
        tol = TEXT["tolerances"][row["class"]]
        for w, shape in entries:
            meaning = row["matrix_meaning"] if len(shape) == 2 and "matrix_meaning" in row else row["meaning"]
            specs[Template(row["name"]).substitute(w=w)] = {
                "shape": shape, "dtype": row["dtype"], "rtol": tol["rtol"], "atol": tol["atol"],
                "role": row["role"], "required": row.get("required", False),
                "meaning": Template(meaning).substitute(fill, w=w), "tolerance_reason": tol["reason"]}
    return specs


def _gqa(cfg, key):                                # TEXT["gqa"][key] filled in ("" for multi-head)
    return "" if cfg.n_kv_heads is None else Template(TEXT["gqa"][key]).substitute(
        Hkv=cfg.kv_heads, H=cfg.n_heads, rep=cfg.n_heads // cfg.kv_heads)


def _manifest(cfg, setup, specs, latent_positions):
    convention, gqa = TEXT["latent_positions"][latent_positions], cfg.n_kv_heads is not None
    choices = {**TEXT["choices"], "latent_position_ids": convention["choice"],
               **({"grouped_query_attention": _gqa(cfg, "choice")} if gqa else {})}
    policy = {**convention, **(TEXT["gqa"]["margin"].get(latent_positions, {}) if gqa else {})}
    flags = " --gqa" * gqa + (latent_positions != "behind") * f" --latent-positions {latent_positions}"
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"name": "refimpl.golden", "refimpl_version": __version__,
                      "command": "refimpl golden export DIR" + flags, "numpy_version": np.__version__},
        "config": {"model": cfg.to_dict(), "head_dim": cfg.head_dim, **{k: setup[k] for k in SIZES},
                   "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps, "dtype": "float64",
                   "latent_positions": latent_positions, "ahead_positions": "original", "choices": choices},
        "state": {"seed": setup["seed"], "preset": setup["preset"], "how": TEXT["state_how"], "noise": NOISE},
        "adam": {**ADAM, **TEXT["adam"]}, "comparison": TEXT["comparison"], "tiers": TEXT["tiers"],
        "tolerance_policy": Template(TEXT["tolerance_policy"]).substitute(policy),
        "required_for_actual": [n for n, s in specs.items() if s["required"]],
        "required_rule": TEXT["required_rule"], "tensors": specs}


def export(directory, seed=SETUP["seed"], latent_positions="behind", gqa=False):
    """Write DIR/manifest.json and DIR/tensors.npz for the golden state; returns the manifest.
    latent_positions "behind" (the method) or "after" (the ablation); gqa: state.GQA's heads."""
    require(latent_positions in LATENT_POSITIONS,
            f"latent_positions={latent_positions!r} is not one of {LATENT_POSITIONS}")
    setup = {**SETUP, **(GQA if gqa else {}), "seed": seed}
    cfg, dec, trainable, tokens, trace_positions = state = make_state(seed, setup)
    run = (*state, setup["n_latents"], setup["n_ahead"], latent_positions)
    check_forms(*run)
    arrays = {"tokens": tokens, "trace_positions": trace_positions,
              **{"decoder." + n: a for n, a in flatten_params(dec).items()},
              **{"coprocessor." + n: a for n, a in trainable.items() if n != SOFT_TOKENS},
              "soft_tokens": trainable[SOFT_TOKENS], **compute(*run)}
    specs = tensor_specs(cfg, setup, latent_positions=latent_positions)
    arrays = {n: np.asarray(arrays[n]) for n in specs}
    for n, spec in specs.items():
        if list(arrays[n].shape) != spec["shape"] or arrays[n].dtype.name != spec["dtype"]:
            raise AssertionError(f"golden export: {n} is {arrays[n].dtype}{list(arrays[n].shape)}, its spec "
                                 f"says {spec['dtype']}{spec['shape']}: refimpl has a bug")
    manifest = _manifest(cfg, setup, specs, latent_positions)
    try:
        old = read_json(Path(directory) / MANIFEST, "", "")["generator"]["command"]
    except (RefimplError, OSError, KeyError, TypeError):
        old = None                                # no set there, or a damaged one: it is regenerated
    require(old in (None, manifest["generator"]["command"]), f"{directory} holds a golden set made by "
            f"`{old}`: regenerate it with the same flags, or export into another directory")
    write_atomically([(Path(directory) / TENSORS, npz_bytes(arrays)),                  # both, or nothing new
                      (Path(directory) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())])
    return manifest


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
