"""Checkpoints: NAME.npz (arrays by Hugging Face name; Adam's moments as adam.m.<name>, adam.v.<name>) and
NAME.json (metadata with npz_sha256 and meta_sha256), written atomically, npz first: a temp JSON left by a
kill between the renames is taken when its npz_sha256 matches. Arrays are finite floats, saved or loaded
(never unpickled, onto any backend); every problem is one line naming the file and the fix."""
import hashlib
import json
from contextlib import suppress
from pathlib import Path

import numpy as np

from ..backend import to_numpy, to_xp
from ..config import ModelConfig
from ..core.coprocessor import INITS, MODES, SOFT_TOKENS
from ..core.decoder import flatten_params, param_shapes, unflatten_params
from ..data.pretrained import decoder_file, tokenizer_for
from ..errors import RefimplError, require
from ..files import check_schema, read_json, read_npz, sha256_of, temp_files, unusable, write_atomically

FORMAT_VERSION = 1
ADAM_M, ADAM_V = "adam.m.", "adam.v."
RETRAIN = "restore it from a backup or retrain"
META_TC = ("n_latents", "n_ahead", "mode", "init")    # in a coprocessor's metadata and its train_config
META = {**dict.fromkeys(("kind", "npz_sha256", "tokenizer", "tokenizer_sha256", "decoder_hash", "data_hash",
                         "mode", "init"), str), **dict.fromkeys(("step", "n_latents", "n_ahead"), int),
        **dict.fromkeys(("arrays", "config", "train_config", "rng", "rng_state", "optimizer", "extra"), dict)}


def checkpoint_paths(path):
    """(npz path, json path) for "x", "x.npz" or "x.json"."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


# Save and load a pair
def save_checkpoint(path, arrays, meta):
    """Write arrays ({name: array}, any backend) and meta (JSON-able dict with "kind") as a pair."""
    require(isinstance(meta.get("kind"), str), "checkpoint metadata needs a 'kind' string: pass it in meta")
    host = {name: np.ascontiguousarray(to_numpy(a)) for name, a in arrays.items()}
    bad = [n for n, a in host.items() if a.dtype.hasobject]
    require(not bad, f"array {bad[:1]} has dtype object, which a checkpoint cannot hold: pass numeric arrays")
    bad = unusable(host, "f")
    require(not bad, f"refusing to save {checkpoint_paths(path)[0]}: {len(bad)} arrays ({bad[:1]} first) "
                     "hold NaN or infinity or are not real numbers; lower the learning rate that made them")
    npz_path, json_path = checkpoint_paths(path)
    full = {**meta, "format_version": FORMAT_VERSION, "npz_file": npz_path.name, "npz_sha256": "",
            "arrays": {n: array_spec(a) for n, a in sorted(host.items())}}
    _json_text(full)                                    # bad metadata fails before the npz is written

    def write_npz(f):        # streamed to the file, then hashed from it: no copy of the arrays in memory
        np.savez(f, allow_pickle=False, **host)
        f.seek(0)
        full["npz_sha256"] = sha256_of(f)
    write_atomically([(npz_path, write_npz), (json_path, lambda f: f.write(_json_text(full)))])  # npz first
    for stale in temp_files(npz_path) + temp_files(json_path):  # left by killed saves
        stale.unlink(missing_ok=True)


def _json_text(full):
    # the metadata with its meta_sha256, as the JSON file's bytes; RefimplError if it is not plain JSON
    try:
        full["meta_sha256"] = meta_sha256(json.loads(json.dumps(full, allow_nan=False)))
        return (json.dumps(full, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise RefimplError(f"checkpoint metadata is not plain JSON ({e}): pass only str, int, finite float, "
                           "list and dict values") from None


def load_checkpoint(path):
    """(arrays {name: host np.ndarray}, meta dict); RefimplError if anything is missing or corrupt."""
    npz_path, json_path = checkpoint_paths(path)
    require(not Path(path).is_dir(), f"checkpoint path {path} is a directory: pass the checkpoint file in it "
                                     f"(e.g. {Path(path) / 'ckpt.npz'})")
    for p in (json_path, npz_path):
        require(p.is_file(), f"checkpoint file {p} is missing: check the path, or create it "
                             "(`refimpl pretrain` writes decoders, `refimpl train` coprocessors)")
    meta = _read_meta(json_path)
    with open(npz_path, "rb") as f:                     # hashed and parsed from one open file, in chunks
        sha = sha256_of(f)
        if sha != meta["npz_sha256"]:  # a save killed between its two renames: its JSON is a temp file
            for temp in temp_files(json_path):
                with suppress(RefimplError, OSError):
                    if (candidate := _read_meta(temp))["npz_sha256"] == sha:
                        meta = candidate
                        break
        require(sha == meta["npz_sha256"], f"checkpoint {npz_path} is corrupt (sha256 mismatch with "
                                           f"{json_path.name}: truncated, modified or half saved); {RETRAIN}")
        f.seek(0)
        arrays = read_npz(npz_path, "checkpoint", RETRAIN, f)
    bad = unusable(arrays, "f")
    require(not bad, f"checkpoint {npz_path}: array {bad[:1]} holds NaN or infinity or is not real numbers "
                     f"({len(bad)} such arrays): it cannot be used; {RETRAIN}")
    for name, spec in meta["arrays"].items():
        got = array_spec(arrays[name]) if name in arrays else "missing"
        require(got == spec, f"checkpoint {npz_path}: array {name} is {got}, but {json_path.name} says "
                             f"{spec}; {RETRAIN}")
    return arrays, meta


def meta_sha256(meta):
    """sha256 of checkpoint metadata as loaded from JSON, without its own meta_sha256 field."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def array_spec(a):
    """dtype and shape as one string, e.g. '<f4[2049, 48]' (the JSON's list of arrays)."""
    return f"{a.dtype.str}{list(a.shape)}"


def _read_meta(json_path):
    meta = read_json(json_path, "checkpoint metadata", f"it was truncated or modified; {RETRAIN}")
    require("format_version" in meta, f"checkpoint metadata {json_path} has no "
            "format_version: it is not a refimpl checkpoint; pass the .npz/.json pair written by refimpl")
    version = meta["format_version"]
    require(version == FORMAT_VERSION, f"checkpoint {json_path} has format_version {version!r}, but this "
                                       f"refimpl reads [{FORMAT_VERSION}]: upgrade refimpl or re-save it")
    require(meta.get("meta_sha256", None) in (None, meta_sha256(meta)),  # absent in older files
            f"checkpoint metadata {json_path} was modified or damaged after it was saved (meta_sha256 "
            f"mismatch); {RETRAIN}")
    missing = [k for k in ("kind", "npz_sha256", "arrays") if k not in meta]
    require(not missing, f"checkpoint metadata {json_path} lacks {missing}: it is corrupt; {RETRAIN}")
    check_schema(meta, META, f"checkpoint metadata {json_path}", f"it is corrupt; {RETRAIN}")
    require(meta.get("step", 0) >= 0, f"checkpoint metadata {json_path} has step {meta.get('step')}: it is "
                                      f"corrupt; {RETRAIN}")
    return meta


# Adam's state as named arrays (adam.m.<name>, adam.v.<name>); its step goes to the metadata
def adam_to_arrays(adam):
    return {**{ADAM_M + k: a for k, a in adam["m"].items()}, **{ADAM_V + k: a for k, a in adam["v"].items()}}


def adam_from_arrays(arrays, step, xp=np, dtype=None):
    """The Adam state held in checkpoint arrays (whatever moments they hold), onto backend xp."""
    def moments(prefix):
        return {k[len(prefix):]: to_xp(a, xp, dtype) for k, a in arrays.items() if k.startswith(prefix)}
    return {"m": moments(ADAM_M), "v": moments(ADAM_V), "step": step}


# The decoder
def decoder_hash(params_flat):
    """sha256 over the names, shapes, dtypes and bytes (as stored) of the decoder's arrays."""
    h = hashlib.sha256()
    for name in sorted(params_flat):
        a = np.ascontiguousarray(to_numpy(params_flat[name]))
        h.update(f"{name} {list(a.shape)} {a.dtype.str}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_decoder(path, params, cfg, meta_extra=None, arrays_extra=None):
    """Save decoder params (nested or flat), config, decoder_hash, more metadata and arrays (Adam's)."""
    flat = flatten_params(params) if "layers" in params else dict(params)
    check_decoder_shapes(flat, cfg, checkpoint_paths(path)[0])
    meta = {"step": 0, **(meta_extra or {}), "kind": "decoder", "config": cfg.to_dict(),
            "decoder_hash": decoder_hash(flat)}
    save_checkpoint(path, {**flat, **(arrays_extra or {})}, meta)


def load_decoder(path, dtype=np.float32, xp=np):
    """(nested params on xp in dtype, ModelConfig, meta); meta["decoder_hash"] hashes the stored arrays."""
    arrays, cfg, meta = read_decoder(path)
    flat = {n: to_xp(a, xp, dtype) for n, a in arrays.items() if n.startswith("model.")}
    return unflatten_params(flat, cfg.n_layers), cfg, meta


def read_decoder(path):
    """(host arrays, ModelConfig, meta) of a decoder checkpoint, its kind, config, shapes and hash checked."""
    arrays, meta = load_checkpoint(path)
    npz_path = checkpoint_paths(path)[0]
    require(meta.get("kind") == "decoder", f"checkpoint {npz_path} holds a {meta.get('kind')!r}, not a "
                                           "decoder: pass the checkpoint written by `refimpl pretrain`")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, RefimplError) as e:
        raise RefimplError(f"checkpoint {npz_path} has no usable config ({e}); {RETRAIN}") from None
    flat = {n: a for n, a in arrays.items() if n.startswith("model.")}
    check_decoder_shapes(flat, cfg, npz_path)
    require(meta.get("decoder_hash") in (None, decoder_hash(flat)),  # None: not recorded
            f"checkpoint {npz_path}: its weights do not match the decoder_hash in its metadata; {RETRAIN}")
    return arrays, cfg, meta


def check_decoder_shapes(flat, cfg, where):
    problem = _arrays_problem(flat, param_shapes(cfg))
    require(problem is None, f"checkpoint {where} does not match its config ({problem}): the file and config "
                             "do not belong together; re-save or retrain it")


def _arrays_problem(arrays, shapes, exact=False):
    """What is wrong with arrays for shapes {name: shape} (None: nothing); exact: no other names."""
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes)) if exact else []
    if missing or extra:
        return f"missing {missing[:3]}" if missing else f"unknown {extra[:3]}"
    return next((f"{k} has shape {list(arrays[k].shape)}, but its config implies {list(s)}"
                 for k, s in shapes.items() if tuple(arrays[k].shape) != tuple(s)), None)


def load_model(name_or_path, dtype=np.float32, xp=np):
    """(params, ModelConfig, meta, tokenizer) of a model name (smollm2-135m, from `refimpl fetch`) or a
    decoder checkpoint; refused if trained with another tokenizer."""
    path = decoder_file(name_or_path)
    params, cfg, meta = load_decoder(path, dtype, xp)
    tokenizer, saved = tokenizer_for(path, meta), meta.get("tokenizer_sha256")   # None: not recorded
    require(saved is None or saved == tokenizer.sha256, f"checkpoint {path} was trained with another "
            f"tokenizer (sha256 {str(saved)[:12]}..., the current one {tokenizer.sha256[:12]}...): restore "
            "that tokenizer, or retrain it")
    require(tokenizer.n_vocab <= cfg.vocab_size, f"decoder {path} has {cfg.vocab_size} embeddings, fewer "
            f"than its tokenizer's {tokenizer.n_vocab} ids: pass the tokenizer it belongs with")
    return params, cfg, meta, tokenizer


# The coprocessor: its trainable arrays (and Adam's state), tied to the decoder it was trained against
def save_coprocessor(path, trainable, adam, meta):
    save_checkpoint(path, {**trainable, **adam_to_arrays(adam)},
                    {**meta, "kind": "coprocessor", "step": adam["step"]})


def coprocessor_file(path):
    """A run directory or a checkpoint path -> the checkpoint path (DIR/coprocessor.npz)."""
    path = Path(path)
    return path / "coprocessor.npz" if path.is_dir() else path


def load_coprocessor(path, want_decoder_hash, dtype=np.float32, xp=np):
    """(trainable, adam state, meta) of a coprocessor trained against the decoder of want_decoder_hash."""
    arrays, meta = load_checkpoint(path)
    require(meta.get("kind") == "coprocessor", f"{path} is a {meta.get('kind')!r} checkpoint, not a "
                                               "coprocessor: pass a file written by `refimpl train`")
    require(meta.get("decoder_hash") == want_decoder_hash, f"coprocessor {path} was trained against "
            f"another decoder (hash {str(meta.get('decoder_hash'))[:12]}, this one is "
            f"{want_decoder_hash[:12]}): pass the decoder it was trained with, or retrain it")
    trainable = {k: a for k, a in arrays.items() if not k.startswith("adam.")}
    _check_coprocessor(trainable, meta, path)
    trainable = {k: to_xp(a, xp, dtype) for k, a in trainable.items()}
    return trainable, adam_from_arrays(arrays, meta["step"], xp, dtype), meta


def _check_coprocessor(trainable, meta, path):
    # the metadata that eval, generate and resuming read must agree with the arrays
    soft, n, is_int = trainable.get(SOFT_TOKENS), meta.get("n_latents"), lambda v: type(v) is int
    problems = [what for what, ok in (
        ("no step", "step" in meta),
        ("no soft_tokens [N_L, D] array", soft is not None and soft.ndim == 2),
        (f"mode {meta.get('mode')!r}", meta.get("mode") in MODES),
        (f"init {meta.get('init')!r}", meta.get("init") in INITS),
        (f"n_latents {n!r} vs soft_tokens", soft is not None and is_int(n) and n == soft.shape[0]),
        (f"n_ahead {meta.get('n_ahead')!r}", is_int(meta.get("n_ahead")) and meta["n_ahead"] >= 1),
        ("train_config is not a dict", isinstance(meta.get("train_config"), dict)),
        ("train_config disagrees on n_latents, n_ahead, mode or init", all(meta.get("train_config", {}).get(k)
                                                                           == meta.get(k) for k in META_TC)),
    ) if not ok]
    require(not problems, f"coprocessor {path} has corrupt metadata ({'; '.join(problems)}): {RETRAIN} it "
                          "with `refimpl train`")
    check_train_config(meta["train_config"], f"coprocessor {path}")
    problem = _coprocessor_arrays_problem(trainable, meta)
    require(problem is None, f"coprocessor {path} holds the wrong arrays ({problem}): {RETRAIN} it")


def _coprocessor_arrays_problem(trainable, meta):
    # what is wrong with the arrays (None: nothing): pause tokens are soft_tokens alone, a coprocessor
    # has every block array of its config and the final norm
    others = set(trainable) - {SOFT_TOKENS}
    if meta["mode"] == "pause":
        return f"pause tokens with {sorted(others)[:3]}" if others else None
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, RefimplError) as e:
        return f"its config is unusable: {e}"
    shapes = {**param_shapes(cfg), SOFT_TOKENS: (trainable[SOFT_TOKENS].shape[0], cfg.d_model)}
    del shapes["model.embed_tokens.weight"]
    return _arrays_problem(trainable, shapes, exact=True)


# Options removed after commit 2d4e58e, with the one value today's method has (docs/results.md §5)
REMOVED_OPTIONS = {"ahead_positions": "original", "soft_init": "normal", "soft_lr_scale": 1.0,
                   "readout": "norm"}


def check_train_config(saved, source):
    """saved without the removed options; a one-line error for a run trained with one that is gone, or
    before the latents' position ids were recorded (they sat 'after' the point then)."""
    require("latent_positions" in saved, f"{source} was trained before the latents' position ids were "
            "recorded (they sat 'after' the point then): retrain it, or use refimpl at commit 2d4e58e")
    for key, value in saved.items():
        today = REMOVED_OPTIONS.get(key, value)
        require(value == today, f"{source} was trained with {key}={value!r}, an option removed from refimpl "
                f"(today: {today!r}): retrain it, or use refimpl at commit 2d4e58e")
    return {k: v for k, v in saved.items() if k not in REMOVED_OPTIONS}
