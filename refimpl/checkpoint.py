"""Checkpoints: one `.npz` of named arrays plus a sidecar `.json` of metadata, written atomically.

    ckpt.npz   params by Hugging Face name; optimizer moments as adam.m.<name>, adam.v.<name>
    ckpt.json  {"format_version", "kind" ("decoder" | "coprocessor" | ...), "config", "step",
                "rng" (the bit_generator state, for exact resume), "tokenizer_sha256",
                "data_hash", "extra", "arrays" ({name: [shape, dtype]}), "npz_sha256", ...}

Each file is written to a temporary file in the same directory, flushed and fsync'ed, moved over
the old one with os.replace, and the directory is fsync'ed: a crash leaves either the old file or
the new one, never a mix. The npz goes first and the JSON second; the JSON carries the npz's
sha256, so a pair from two different saves is detected on load. Loading never unpickles
(`allow_pickle=False`), and every problem is a one-line RefimplError naming the file and the fix.

Arrays are saved from the host (`to_numpy`) and loaded onto any backend, so a checkpoint written
on a GPU loads on a CPU and back.
"""
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .backend import to_numpy, to_xp
from .config import ModelConfig
from .decoder import flatten_params, param_shapes, unflatten_params
from .errors import RefimplError, require

FORMAT_VERSION = 1
KNOWN_VERSIONS = (1,)
RETRAIN = "restore it from a backup or retrain"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def checkpoint_paths(path):
    """(npz path, json path) for "x", "x.npz" or "x.json"."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


def checkpoint_exists(path):
    """True if either file of the checkpoint pair exists."""
    return any(p.exists() for p in checkpoint_paths(path))


# ---------------------------------------------------------------------------------------------
# Atomic writes
def atomic_write_bytes(path, blob):
    """Write blob to path so that a crash leaves the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Save and load
def save_checkpoint(path, arrays, meta):
    """Write arrays ({name: array}, any backend) and meta (JSON-able dict with "kind") as a pair."""
    require(isinstance(meta.get("kind"), str), "checkpoint metadata needs a 'kind' string "
                                               "(e.g. 'decoder'); pass it in meta")
    host = {name: np.ascontiguousarray(to_numpy(a)) for name, a in arrays.items()}
    bad = [n for n, a in host.items() if a.dtype.hasobject]
    require(not bad, f"array {bad[:1]} has dtype object, which a checkpoint cannot hold: "
                     "pass numeric arrays")
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **host)
    blob = buf.getvalue()
    npz_path, json_path = checkpoint_paths(path)
    full = {**meta, "format_version": FORMAT_VERSION, "npz_file": npz_path.name,
            "npz_sha256": hashlib.sha256(blob).hexdigest(),
            "arrays": {n: array_spec(a) for n, a in sorted(host.items())}}
    try:
        text = json.dumps(full, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RefimplError(f"checkpoint metadata is not plain JSON ({e}): pass only str, int, "
                           "finite float, list and dict values") from None
    atomic_write_bytes(npz_path, blob)
    atomic_write_bytes(json_path, (text + "\n").encode())


def load_checkpoint(path):
    """(arrays {name: host np.ndarray}, meta dict); RefimplError if anything is missing or corrupt."""
    npz_path, json_path = checkpoint_paths(path)
    for p in (json_path, npz_path):
        require(p.is_file(), f"checkpoint file {p} is missing: check the path, or create it "
                             "(e.g. with `refimpl pretrain --out DIR`)")
    meta = _read_meta(json_path)
    blob = npz_path.read_bytes()
    require(hashlib.sha256(blob).hexdigest() == meta["npz_sha256"],
            f"checkpoint {npz_path} is corrupt (sha256 mismatch with {json_path.name}): it was "
            f"truncated, modified or its save was interrupted; {RETRAIN}")
    arrays = _read_arrays(blob, npz_path)
    listed = meta.get("arrays", {})
    missing = sorted(set(listed) - set(arrays))
    require(not missing, f"checkpoint {npz_path} lacks arrays {missing[:3]} that {json_path.name} "
                         f"lists: the pair is inconsistent; {RETRAIN}")
    for name, spec in listed.items():
        require(array_spec(arrays[name]) == spec,
                f"checkpoint {npz_path}: array {name} is {array_spec(arrays[name])}, but "
                f"{json_path.name} says {spec}; {RETRAIN}")
    return arrays, meta


def array_spec(a):
    """dtype and shape as one string, e.g. '<f4[2049, 48]' (the JSON's list of arrays)."""
    return f"{a.dtype.str}{list(a.shape)}"


def _read_meta(json_path):
    try:
        meta = json.loads(json_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RefimplError(f"checkpoint metadata {json_path} is not valid JSON ({e}): it was "
                           f"truncated or modified; {RETRAIN}") from None
    require(isinstance(meta, dict) and "format_version" in meta,
            f"checkpoint metadata {json_path} has no format_version: it is not a refimpl "
            "checkpoint; pass the .npz/.json pair written by refimpl")
    version = meta["format_version"]
    require(version in KNOWN_VERSIONS,
            f"checkpoint {json_path} has format_version {version!r}, but this refimpl reads "
            f"{list(KNOWN_VERSIONS)}: upgrade refimpl or re-save the checkpoint")
    require(isinstance(meta.get("npz_sha256"), str) and isinstance(meta.get("arrays"), dict),
            f"checkpoint metadata {json_path} lacks npz_sha256 or arrays: it is corrupt; {RETRAIN}")
    return meta


def _read_arrays(blob, npz_path):
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise RefimplError(f"checkpoint {npz_path} holds an object (pickled) array, which "
                               "refimpl never loads because unpickling can run code: re-save "
                               "it with numeric arrays only") from None
        raise RefimplError(f"checkpoint {npz_path} is not a readable .npz ({e}); {RETRAIN}") from None
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError ...
        raise RefimplError(f"checkpoint {npz_path} is not a readable .npz ({type(e).__name__}: "
                           f"{e}); {RETRAIN}") from None


# ---------------------------------------------------------------------------------------------
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
    """Save decoder params (nested or flat) with kind "decoder", its config and decoder_hash.

    meta_extra: more top-level metadata (step, rng, tokenizer_sha256, data_hash, extra, ...).
    arrays_extra: more arrays, e.g. the optimizer state from optim.state_to_arrays.
    """
    flat = flatten_params(params) if "layers" in params else dict(params)
    check_decoder_shapes(flat, cfg, checkpoint_paths(path)[0])
    meta = {"step": 0, **(meta_extra or {}), "kind": "decoder", "config": cfg.to_dict(),
            "decoder_hash": decoder_hash(flat)}
    save_checkpoint(path, {**flat, **(arrays_extra or {})}, meta)


def load_decoder(path, dtype=np.float32, xp=np):
    """(nested params on backend xp cast to dtype, ModelConfig, meta) from a decoder checkpoint.

    meta["decoder_hash"] is the hash of the arrays as stored (before any cast).
    """
    arrays, meta = load_checkpoint(path)
    npz_path = checkpoint_paths(path)[0]
    require(meta.get("kind") == "decoder",
            f"checkpoint {npz_path} holds a {meta.get('kind')!r}, not a decoder: pass the "
            "checkpoint written by `refimpl pretrain`")
    cfg = decoder_config(meta, npz_path)
    flat = {n: a for n, a in arrays.items() if n.startswith("model.")}
    check_decoder_shapes(flat, cfg, npz_path)
    stored = meta.get("decoder_hash")
    require(stored is None or stored == decoder_hash(flat),
            f"checkpoint {npz_path}: its weights do not match the decoder_hash in its metadata; {RETRAIN}")
    flat = {n: to_xp(a, xp, dtype) for n, a in flat.items()}
    return unflatten_params(flat, cfg.n_layers), cfg, meta


def decoder_config(meta, where):
    """The ModelConfig stored in checkpoint metadata, with an error naming the file."""
    try:
        return ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as e:
        raise RefimplError(f"checkpoint {where} has no usable config ({e}): it is corrupt; "
                           f"{RETRAIN}") from None
    except RefimplError as e:
        raise RefimplError(f"checkpoint {where}: {e}") from None


def check_decoder_shapes(flat, cfg, where):
    """Every decoder weight present with the shape cfg implies; a one-line error otherwise."""
    for name, shape in param_shapes(cfg).items():
        require(name in flat, f"checkpoint {where} lacks decoder weight {name}: it was written "
                              "for another model; pass a checkpoint that matches its config")
        got = tuple(flat[name].shape)
        require(got == tuple(shape), f"checkpoint {where}: {name} has shape {list(got)}, but its "
                                     f"config implies {list(shape)}; the file and config do not "
                                     "belong together; re-save or retrain it")
