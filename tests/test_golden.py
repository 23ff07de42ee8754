"""Golden vectors (refimpl/golden.py, docs/golden.md): export, verify, the committed set.

The committed set in tiny_data/golden is what other implementations check themselves against,
so the code must keep reproducing it: test_committed_golden_is_reproduced fails if any change
moves any tensor.
"""
import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from refimpl.errors import RefimplError
from refimpl.golden import verify as golden

COMMITTED = Path(__file__).resolve().parents[1] / "tiny_data" / "golden"
REGEN = ("regenerate with `refimpl golden export tiny_data/golden` (or `python -c \"from "
         "refimpl.golden import export; export('tiny_data/golden')\"`) ONLY if the change is "
         "intended, and give the reason in the commit message: every port checked against the "
         "old set must be re-checked")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden") / "g"
    golden.export(d)
    return d


def _verify(directory, actual=None):
    out = io.StringIO()
    ok = golden.verify(directory, actual, out=out)
    return ok, out.getvalue()


def _write_actual(path, arrays):
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
def test_export_then_verify_passes(exported):
    ok, report = _verify(exported)
    assert ok, report
    assert report.strip().splitlines()[-1].startswith("PASS")
    assert "NOT OK" not in report and "OK       latents [2, 3, 3, 48]" in report


def test_export_is_deterministic(exported, tmp_path):
    golden.export(tmp_path / "again")
    for name in (golden.TENSORS, golden.MANIFEST):
        assert (exported / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_committed_golden_is_reproduced(exported):
    """The code still computes the committed tensors (to rounding; bit-identical on one machine)."""
    m_new, new = golden.load(exported)
    m_old, old = golden.load(COMMITTED)
    for m in (m_new, m_old):
        m["generator"].pop("numpy_version")
    assert m_new == m_old, f"tiny_data/golden/manifest.json is stale: {REGEN}"
    for name, a in old.items():
        b = new[name]
        same = np.array_equal(a, b) if a.dtype.kind in "biu" else np.allclose(b, a, rtol=1e-10, atol=1e-12)
        assert same and a.dtype == b.dtype, (
            f"golden tensor {name} changed (max diff {np.abs(b.astype(float) - a.astype(float)).max():.2e}): "
            f"{REGEN}")


def test_committed_golden_verifies():
    ok, report = _verify(COMMITTED)
    assert ok, report


def test_committed_golden_is_small():
    size = sum(p.stat().st_size for p in COMMITTED.iterdir())
    assert size < 2_000_000, f"tiny_data/golden is {size} bytes: keep it under 2 MB"


def test_manifest_lists_every_tensor_and_vice_versa():
    manifest = json.loads((COMMITTED / golden.MANIFEST).read_text())
    with np.load(COMMITTED / golden.TENSORS, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    assert list(manifest["tensors"]) == list(arrays)
    for name, spec in manifest["tensors"].items():
        assert spec["shape"] == list(arrays[name].shape), name
        assert spec["dtype"] == arrays[name].dtype.name, name
        assert {"rtol", "atol", "meaning", "tolerance_reason", "role", "required"} <= set(spec), name
        assert spec["meaning"] and spec["tolerance_reason"], name
    assert arrays["tokens"].dtype == np.int64 and arrays["packed.mask"].dtype == bool
    floats = [n for n, a in arrays.items() if a.dtype.kind == "f"]
    assert all(arrays[n].dtype == np.float64 for n in floats)
    # a gradient for every trainable coprocessor weight and the soft tokens, and nothing else
    trainable = [n[len("coprocessor."):] for n in arrays if n.startswith("coprocessor.")]
    assert "model.embed_tokens.weight" not in trainable
    grads = sorted(n for n in arrays if n.startswith("grad."))
    assert grads == sorted(["grad.coprocessor." + n for n in trainable] + ["grad.soft_tokens"])
    c = manifest["config"]
    assert c["batch_size"] >= 2 and c["n_traces"] >= 3 and arrays["adam.losses"].shape == (5,)
    assert set(manifest["adam"]) >= {"lr", "beta1", "beta2", "eps", "weight_decay", "clipping"}
    assert manifest["required_for_actual"] == [n for n, s in manifest["tensors"].items() if s["required"]]


def test_state_is_what_the_manifest_says():
    """Coprocessor = perturbed copy of the decoder; adam.losses[0] is the loss."""
    _, g = golden.load(COMMITTED)
    name = "model.layers.1.self_attn.q_proj.weight"
    dec, cop = g["decoder." + name], g["coprocessor." + name]
    assert not np.array_equal(dec, cop) and np.abs(cop - dec).max() < 0.2 * np.abs(dec).max()
    assert g["adam.losses"][0] == g["loss"]
    assert np.isclose(g["loss"], g["trace_loss"].mean())
    assert (g["packed.mask"].diagonal(axis1=1, axis2=2)).all()


# ---------------------------------------------------------------------------------------------
# Mismatches are reported NOT OK, with a failing return and exit status
def test_perturbed_actual_is_not_ok(exported, tmp_path):
    _, arrays = golden.load(exported)
    actual = dict(arrays)
    logits = actual["ahead.logits"].copy()
    i = int(np.argmax(np.abs(logits)))
    logits.flat[i] = -logits.flat[i]                                   # flip one value
    actual["ahead.logits"] = logits
    ok, report = _verify(exported, _write_actual(tmp_path / "a.npz", actual))
    assert not ok
    assert "NOT OK   ahead.logits" in report and report.strip().splitlines()[-1].startswith("FAIL")
    assert "OK       latents" in report                              # the rest still passes
    # the unperturbed copy passes
    ok, report = _verify(exported, _write_actual(tmp_path / "b.npz", arrays))
    assert ok, report


def test_perturbed_golden_weight_is_not_ok(exported, tmp_path):
    d = tmp_path / "g"
    shutil.copytree(exported, d)
    _, arrays = golden.load(d)
    w = arrays["coprocessor.model.layers.0.self_attn.q_proj.weight"].copy()
    w[0, 0] += 0.5
    arrays["coprocessor.model.layers.0.self_attn.q_proj.weight"] = w
    (d / golden.TENSORS).write_bytes(golden.npz_bytes(arrays))
    ok, report = _verify(d)
    assert not ok
    assert "NOT OK   latents" in report and "OK       baseline.logits" in report


def test_cli_exit_status(exported, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="refimpl golden")
    golden.add_arguments(parser)
    assert golden.run(parser.parse_args(["verify", str(exported)])) == 0
    _, arrays = golden.load(exported)
    bad = {**arrays, "loss": arrays["loss"] + 1.0}
    path = _write_actual(tmp_path / "bad.npz", bad)
    assert golden.run(parser.parse_args(["verify", str(exported), "--actual", str(path)])) == 1
    assert "NOT OK   loss" in capsys.readouterr().out
    assert golden.run(parser.parse_args(["export", str(tmp_path / "cli")])) == 0
    assert (tmp_path / "cli" / golden.TENSORS).is_file()
    with pytest.raises(RefimplError, match="needs an action"):
        golden.run(parser.parse_args([]))


def test_missing_names_fail_only_when_required(exported, tmp_path):
    manifest, arrays = golden.load(exported)
    required = manifest["required_for_actual"]
    only_required = {n: arrays[n] for n in required}
    ok, report = _verify(exported, _write_actual(tmp_path / "r.npz", only_required))
    assert ok, report
    assert "missing (optional) baseline.logits" in report
    without_loss = {n: a for n, a in only_required.items() if n != "loss"}
    ok, report = _verify(exported, _write_actual(tmp_path / "m.npz", without_loss))
    assert not ok and "MISSING  loss []" in report and "(1 required)" in report


def test_wrong_shape_and_nan_are_not_ok(exported, tmp_path):
    _, arrays = golden.load(exported)
    latents = arrays["latents"].copy()
    latents.flat[3] = np.nan
    actual = {**arrays, "trace_loss": arrays["trace_loss"].T, "latents": latents}
    ok, report = _verify(exported, _write_actual(tmp_path / "s.npz", actual))
    assert not ok
    assert "NOT OK   trace_loss: shape [3, 2], expected [2, 3]" in report
    assert "NOT OK   latents" in report


# ---------------------------------------------------------------------------------------------
# Malformed inputs are one-line RefimplErrors
def test_malformed_files_raise_one_line_errors(exported, tmp_path):
    with pytest.raises(RefimplError, match="not found"):
        golden.verify(tmp_path / "nowhere")
    with pytest.raises(RefimplError, match="actual tensors file .* not found"):
        golden.verify(exported, tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(RefimplError, match="not a readable .npz"):
        golden.verify(exported, tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", latents=np.array([{"a": 1}], dtype=object))
    with pytest.raises(RefimplError, match="object arrays"):
        golden.verify(exported, tmp_path / "obj.npz")

    d = tmp_path / "g"
    shutil.copytree(exported, d)
    (d / golden.MANIFEST).write_text("{not json")
    with pytest.raises(RefimplError, match="not valid JSON"):
        golden.verify(d)
    manifest = json.loads((exported / golden.MANIFEST).read_text())
    (d / golden.MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(RefimplError, match="format_version 99"):
        golden.verify(d)
    extra = {**manifest, "tensors": {**manifest["tensors"], "ghost": manifest["tensors"]["loss"]}}
    (d / golden.MANIFEST).write_text(json.dumps(extra))
    with pytest.raises(RefimplError, match="disagree") as e:
        golden.verify(d)
    assert "\n" not in str(e.value)
