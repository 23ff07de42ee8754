"""The golden files: the tensor list with shapes and tolerances, the manifest, and export.

    DIR/manifest.json   format_version, generator, full config (with the latents' position ids,
                        config.latent_positions) and the conventions a port must share, Adam
                        settings, the tiers, and for EVERY tensor: shape, dtype, rtol, atol, meaning, reason
    DIR/tensors.npz     the tensors, in float64 (int64 / bool for ids and masks), written
                        deterministically (fixed zip timestamps, fixed order)

The manifest's prose, tolerances and tensor list are data: manifest_text.json beside this file.
"""
import io
import json
import zipfile
from pathlib import Path
from string import Template

import numpy as np

from .. import __version__
from ..core.decoder import flatten_params, init_params
from ..errors import require
from .state import ADAM, GQA, NOISE, SETUP, SOFT_TOKENS, check_forms, compute, make_state

FORMAT_VERSION = 1
FLOAT64_TIER = 1e-9            # the float64 tier: max|actual - expected| <= FLOAT64_TIER * max|expected|
MANIFEST, TENSORS = "manifest.json", "tensors.npz"
TEXT = json.loads(Path(__file__).with_name("manifest_text.json").read_text(encoding="utf-8"))
LATENT_POSITIONS = tuple(TEXT["latent_positions"])              # ("behind", "after"): a set's convention


# ---------------------------------------------------------------------------------------------
# The tensor list
def tensor_specs(cfg, setup=SETUP, adam=ADAM, latent_positions="behind"):
    """Ordered {name: spec} of every tensor in the golden file: inputs, then outputs in the order
    they are computed. spec: shape, dtype, rtol, atol, role, required, meaning, tolerance_reason."""
    B, T, K, NL, NA = (setup[k] for k in ("batch_size", "seq_len", "n_traces", "n_latents", "n_ahead"))
    dims = {"B": B, "T": T, "K": K, "NL": NL, "NA": NA, "V": cfg.vocab_size, "D": cfg.d_model, "L": cfg.n_layers,
            "H": cfg.n_heads, "Hkv": cfg.kv_heads, "Dh": cfg.head_dim, "S": T + K * (NL + NA - 1),
            "steps": adam["steps"]}
    weights = flatten_params(init_params(cfg, seed=0, dtype=np.float64))
    weights = {n: list(a.shape) for n, a in weights.items()}
    fill = {"steps": adam["steps"], "latent_ids": TEXT["latent_positions"][latent_positions]["latent_ids"],
            "kv_note": _gqa(cfg, "cache_note")}
    specs = {}
    for row in TEXT["tensors"]:
        if row["shape"] == "weights":                                  # one entry per weight name
            entries = [(w, s) for w, s in weights.items() if w not in row["except"]]
        else:
            entries = [("", [dims[d] for d in row["shape"]])]
        tol = TEXT["tolerances"][row["class"]]
        for w, shape in entries:
            meaning = row["matrix_meaning"] if len(shape) == 2 and "matrix_meaning" in row else row["meaning"]
            specs[Template(row["name"]).substitute(w=w)] = {
                "shape": shape, "dtype": row["dtype"], "rtol": tol["rtol"], "atol": tol["atol"],
                "role": row["role"], "required": row.get("required", False),
                "meaning": Template(meaning).substitute(fill, w=w), "tolerance_reason": tol["reason"]}
    return specs


def _gqa(cfg, key):
    # TEXT["gqa"][key] filled in for a grouped-query config ("" for multi-head)
    return "" if cfg.n_kv_heads is None else Template(TEXT["gqa"][key]).substitute(
        Hkv=cfg.kv_heads, H=cfg.n_heads, rep=cfg.n_heads // cfg.kv_heads)


def _manifest(cfg, setup, specs, latent_positions):
    convention = TEXT["latent_positions"][latent_positions]
    choices = {**TEXT["choices"], "latent_position_ids": convention["choice"]}
    gqa = cfg.n_kv_heads is not None
    if gqa:
        choices["grouped_query_attention"] = _gqa(cfg, "choice")
    policy = {**convention, **(TEXT["gqa"]["margin"].get(latent_positions, {}) if gqa else {})}
    flags = " --gqa" * gqa + ("" if latent_positions == "behind" else f" --latent-positions {latent_positions}")
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"name": "refimpl.golden", "refimpl_version": __version__,
                      "command": "refimpl golden export DIR" + flags,
                      "numpy_version": np.__version__},
        "config": {"model": cfg.to_dict(), "head_dim": cfg.head_dim,
                   **{k: setup[k] for k in ("batch_size", "seq_len", "n_traces", "n_latents", "n_ahead")},
                   "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps, "dtype": "float64",
                   "latent_positions": latent_positions, "ahead_positions": "original", "choices": choices},
        "state": {"seed": setup["seed"], "preset": setup["preset"], "how": TEXT["state_how"], "noise": NOISE},
        "adam": {**ADAM, **TEXT["adam"]},
        "comparison": TEXT["comparison"],
        "tiers": TEXT["tiers"],
        "tolerance_policy": Template(TEXT["tolerance_policy"]).substitute(policy),
        "required_for_actual": [n for n, s in specs.items() if s["required"]],
        "required_rule": TEXT["required_rule"],
        "tensors": specs,
    }


# ---------------------------------------------------------------------------------------------
# Export
def export(directory, seed=SETUP["seed"], latent_positions="behind", check=True, gqa=False):
    """Write DIR/manifest.json and DIR/tensors.npz for the golden state; returns the manifest.

    latent_positions: "behind" (the method, `refimpl train`'s default) or "after" (the ablation).
    gqa: the grouped-query state (state.GQA: 4 query heads reading 2 key/value heads) instead of nano's
    multi-head one. The committed sets: tiny_data/golden/{default, gqa, latents-after}."""
    require(latent_positions in LATENT_POSITIONS,
            f"latent_positions={latent_positions!r} is not one of {LATENT_POSITIONS}")
    setup = {**SETUP, **(GQA if gqa else {}), "seed": seed}
    cfg, dec, trainable, tokens, trace_positions = make_state(seed, setup)
    run = (cfg, dec, trainable, tokens, trace_positions, setup["n_latents"], setup["n_ahead"],
           latent_positions)
    if check:
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TENSORS).write_bytes(npz_bytes(arrays))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
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
