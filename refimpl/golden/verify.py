"""Verify: compare refimpl (recomputed from a set's own inputs) or another implementation with a golden
set, tensor by tensor, the llm.c `test_gpt2` way, and report the tier passed (docs/golden.md)."""
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..core.coprocessor import SOFT_TOKENS
from ..core.decoder import unflatten_params
from ..errors import RefimplError, require
from ..files import read_json, read_npz, unusable
from .spec import FLOAT64_TIER, FORMAT_VERSION, LATENT_POSITIONS, MANIFEST, TENSORS, tensor_specs
from .state import ADAM, SIZES, compute

FIX = "regenerate it with `refimpl golden export DIR`"


def load(directory):
    """(manifest, {name: array}) of a golden directory; malformed files raise RefimplError."""
    directory = Path(directory)
    mpath, tpath = directory / MANIFEST, directory / TENSORS
    for p in (mpath, tpath):
        require(p.is_file(), f"golden file {p} not found: pass a folder from `refimpl golden export DIR`")
    manifest = read_json(mpath, "golden manifest", FIX)
    _check_manifest(manifest, mpath)
    arrays, specs = load_npz(tpath, "golden tensors"), manifest["tensors"]
    bad = [n for n in {**specs, **arrays} if n not in specs or n not in arrays
           or list(arrays[n].shape) != specs[n]["shape"] or arrays[n].dtype.name != specs[n].get("dtype")]
    require(not bad, f"golden {directory}: manifest and {TENSORS} disagree on {bad[:3]} (missing in one, "
                     "or another shape or dtype): the files are from different exports; regenerate both")
    bad = unusable(arrays, "biuf")
    require(not bad, f"golden tensors {tpath}: {bad[:3]} hold NaN or infinity, or are not numbers: {FIX}")
    _check_inputs(manifest, arrays, directory)
    return manifest, arrays


def _check_inputs(manifest, arrays, directory):
    """Token ids and trace positions valid for the config; every tensor of the shape the config implies."""
    c, specs = manifest["config"], manifest["tensors"]
    cfg, tok, pos = ModelConfig.from_dict(c["model"]), arrays.get("tokens"), arrays.get("trace_positions")
    require(tok is not None and pos is not None and tok.ndim == pos.ndim == 2 and len(tok) == len(pos)
            and tok.dtype.kind == pos.dtype.kind == "i",
            f"golden {directory}: tokens and trace_positions must be int arrays [B, T] and [B, K]: {FIX}")
    T, last = tok.shape[1], tok.shape[1] - 1 - c["n_ahead"]
    require(T <= cfg.max_seq_len and ((tok >= 0) & (tok < cfg.vocab_size)).all() and (pos >= 0).all()
            and (pos <= last).all() and (np.diff(pos, axis=1) > 0).all(), f"golden {directory}: token ids "
            f"must lie in 0..vocab_size-1, T <= max_seq_len, and each row of trace_positions increase within "
            f"0..T-1-n_ahead (0..{last}): {FIX}")
    sizes = dict(zip(SIZES, (*tok.shape, pos.shape[1], c["n_latents"], c["n_ahead"])))
    want = {n: spec["shape"] for n, spec in tensor_specs(cfg, sizes, c["latent_positions"]).items()}
    bad = sorted(n for n in {**want, **specs} if want.get(n) != specs.get(n, {}).get("shape"))
    require(not bad, f"golden {directory}: {bad[:3]} are not the tensors, or not of the shapes, that its "
                     f"config implies: {FIX}")


def _check_manifest(m, mpath):
    """The fields that verify reads: format, per-tensor shape and tolerances, config, adam, generator."""
    require(isinstance(m.get("tensors"), dict) and "config" in m,
            f"golden manifest {mpath} lacks 'tensors' or 'config': {FIX}")
    require(type(m.get("format_version")) is int and m["format_version"] == FORMAT_VERSION,
            f"golden manifest {mpath} has format_version "
            f"{m.get('format_version')!r}, this refimpl reads {FORMAT_VERSION}: {FIX} (or use its refimpl)")
    number = lambda v, most=1e300: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= most
    bad = [n for n, spec in m["tensors"].items() if not (isinstance(spec, dict) and number(
        spec.get("rtol"), 0.01) and number(spec.get("atol"), 0.01) and isinstance(spec.get("shape"), list)
        and spec.get("role") in ("input", "output"))]
    require(not bad, f"golden manifest {mpath}: the entries of {bad[:3]} lack a shape list, "
                     f"numeric rtol/atol up to 0.01 or a role (input or output); {FIX}")
    c, adam = m["config"], m.get("adam")
    count = lambda v, most: type(v) is int and 1 <= v <= most
    require(isinstance(c, dict) and isinstance(c.get("model"), dict) and count(c.get("n_latents"), 64)
            and count(c.get("n_ahead"), 64) and isinstance(adam, dict)
            and count(adam.get("steps"), 100) and all(number(adam.get(k)) for k in ADAM)
            and max(adam["beta1"], adam["beta2"]) < 1 and min(adam["lr"], adam["eps"]) > 0
            and isinstance(m.get("generator", {}), dict),
            f"golden manifest {mpath} has a malformed config, adam or generator section (n_latents and "
            f"n_ahead are ints in 1..64, adam.steps in 1..100, betas below 1, lr and eps above 0); {FIX}")
    hints = {"ahead_positions": " (a 'continue' set: check it with refimpl at commit 2d4e58e)"}
    for key, known in (("ahead_positions", ["original"]), ("latent_positions", LATENT_POSITIONS)):
        require(c.get(key) in known, f"golden manifest {mpath} has config.{key} {c.get(key)!r}, not one of "
                f"{', '.join(known)}; {FIX}{hints.get(key, '')}")
    try:
        ModelConfig.from_dict(c["model"])
    except RefimplError as e:
        raise RefimplError(f"golden manifest {mpath}: {e}; {FIX}") from None


def load_npz(path, what):
    """{name: array} from an .npz, never unpickling; a one-line RefimplError otherwise."""
    require(Path(path).is_file(), f"{what} file {path} not found: check the path")
    return read_npz(path, f"{what} file", "write it with np.savez")


def recompute(manifest, arrays):
    """Every output tensor, recomputed from the inputs stored in a golden set."""
    c = manifest["config"]
    cfg = ModelConfig.from_dict(c["model"])
    part = {p: {n[len(p):]: a for n, a in arrays.items() if n.startswith(p)}      # names without p
            for p in ("decoder.", "coprocessor.")}
    dec = unflatten_params(part["decoder."], cfg.n_layers)
    require("embed_tokens" in dec, f"golden file lacks decoder.model.embed_tokens.weight: {FIX}")
    trainable = {**part["coprocessor."], SOFT_TOKENS: arrays["soft_tokens"]}
    return compute(cfg, dec, trainable, arrays["tokens"], arrays["trace_positions"], c["n_latents"],
                   c["n_ahead"], c["latent_positions"], {k: manifest["adam"][k] for k in ADAM})


def compare(name, spec, expected, actual):
    """One comparison -> {ok, missing, max_abs, max_rel, of_max (= max|a - e| / max|e|), line}."""
    e, inf = np.asarray(expected), float("inf")
    if actual is None:
        status = "MISSING" if spec.get("required") else "missing (optional)"
        return {"ok": not spec.get("required"), "missing": True, "of_max": 0.0,
                "line": f"{status:<8} {name} {list(e.shape)}"}
    a, exact = np.asarray(actual), e.dtype.kind in "biu"
    if a.shape != e.shape or a.dtype.kind not in ("biu" if exact else "fiu"):    # no complex, bool, text
        what = (f"shape {list(a.shape)}, expected {list(e.shape)}" if a.shape != e.shape
                else f"dtype {a.dtype}, expected {'integers' if exact else 'real numbers'}")
        return {"ok": False, "missing": False, "max_abs": inf, "max_rel": inf, "of_max": inf,
                "line": f"NOT OK   {name}: {what}"}
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    diff, finite = np.abs(a64 - e64), bool(np.isfinite(a64).all())
    ok = (a.dtype.kind in "biu" and not diff.any()) if exact else (
        finite and bool((diff <= spec["atol"] + spec["rtol"] * np.abs(e64)).all()))
    big = np.abs(e64) > max(spec["atol"], 1e-300)                     # near zero: judged by atol
    max_abs = float(diff.max(initial=0)) if finite else inf
    max_rel = None if exact else float((diff[big] / np.abs(e64[big])).max(initial=0)) if finite else inf
    of_max = (0.0 if ok else inf) if exact else max_abs / max(float(np.abs(e64).max(initial=0)), 1e-300)
    first = "  ".join(f"{_fmt(x)}|{_fmt(y)}" for x, y in zip(e.ravel()[:3], a.ravel()[:3]))
    line = (f"{'OK' if ok else 'NOT OK':<8} {name} {list(e.shape)}  max_abs {max_abs:.2e}  max_rel "
            f"{'-' if exact else f'{max_rel:.2e}'}  of_max {of_max:.1e}  (rtol {spec['rtol']:g}, "
            f"atol {spec['atol']:g})  expected|actual: {first}")
    return {"ok": ok, "missing": False, "line": line, "max_abs": max_abs, "max_rel": max_rel,
            "of_max": of_max}


def _fmt(x):
    return str(bool(x)) if isinstance(x, (bool, np.bool_)) else (
        str(int(x)) if float(x).is_integer() and abs(x) < 1e6 else f"{float(x):.7g}")


def verify(directory, actual=None, out=None):
    """Print DIR's report against refimpl recomputing it (actual None) or FILE.npz (a missing name fails
    only if in required_for_actual). Returns the tier passed: "float64", "float32" or None (FAIL)."""
    manifest, golden = load(directory)
    specs, c = manifest["tensors"], manifest["config"]
    got = recompute(manifest, golden) if actual is None else load_npz(actual, "actual tensors")
    names = [n for n, s in specs.items() if actual is not None or s.get("role") == "output"]
    source = actual or "refimpl recomputed from the file's inputs"
    print(f"golden {directory} (format {manifest['format_version']}, refimpl "
          f"{manifest.get('generator', {}).get('refimpl_version', '?')}, latent_positions "
          f"{c['latent_positions']}, ahead_positions {c['ahead_positions']}) vs {source}", file=out)
    rows = {n: compare(n, specs[n], golden[n], got.get(n)) for n in names}
    for r in rows.values():
        print(r["line"], file=out)
    extra = sorted(set(got) - set(specs))                              # recomputed: none
    if extra:
        print(f"note: {len(extra)} names not in the golden file were ignored: {', '.join(extra[:5])}"
              + (" ..." if len(extra) > 5 else ""), file=out)
    bad = [n for n, r in rows.items() if not r["ok"]] + ([] if any(not r["missing"] for r in rows.values())
                                                          else ["(no tensor compared)"])
    off64 = sorted(((r["of_max"], n) for n, r in rows.items() if r["of_max"] > FLOAT64_TIER), reverse=True)
    tier = "FAIL" if bad else "PASS float64" if not off64 else (
        f"PASS float32 (fails float64: {len(off64)} tensors, worst {off64[0][1]} of_max {off64[0][0]:.1e})")
    checked = [r for r in rows.values() if not r["missing"]]
    missing = [r for r in rows.values() if r["missing"]]
    worst = max((r["max_rel"] for r in checked if r["max_rel"] is not None), default=0.0)
    print(f"{tier}: {sum(r['ok'] for r in checked)}/{len(checked)} compared tensors OK, {len(missing)} "
          f"missing ({sum(not r['ok'] for r in missing)} required), worst max_rel {worst:.2e}"
          + (f"; NOT OK or MISSING: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}" if bad else ""),
          file=out)
    return None if bad else "float32" if off64 else "float64"


def verify_all(directory, actual=None, out=None):
    """`verify` on DIR, or on each set in DIR/*/ (tiny_data/golden holds default, gqa, latents-after)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file() or not directory.is_dir():
        return verify(directory, actual, out)
    sets = sorted(d for d in directory.iterdir() if (d / MANIFEST).is_file())
    require(sets, f"golden directory {directory} holds no {MANIFEST}, nor subfolders with one: pass a "
                  "directory written by `refimpl golden export DIR`")
    require(actual is None or len(sets) == 1, f"{directory} holds {len(sets)} golden sets "
            f"({', '.join(d.name for d in sets)}): compare the outputs with the one set your port computes, "
            f"e.g. {next((d for d in sets if d.name == 'default'), sets[0])}")
    return all([verify(d, actual, out) for d in sets])  # noqa: C419 (a list: every set reports, even a FAIL)
