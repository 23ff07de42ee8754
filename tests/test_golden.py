"""Golden vectors (refimpl/golden/, docs/golden.md): export, verify, and the three committed sets.

tiny_data/golden/original and tiny_data/golden/continue (one per position convention of the
ahead tokens), and tiny_data/golden/gqa (grouped-query attention, "original" positions) are what
other implementations check themselves against, so the code must keep reproducing all three:
test_committed_set_is_reproduced and test_gqa_set_is_reproduced fail if any change moves any tensor.
"""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from refimpl.cli import main
from refimpl.errors import RefimplError
from refimpl.golden.spec import CONVENTIONS, MANIFEST, TENSORS, export, npz_bytes
from refimpl.golden.verify import load, verify, verify_all

COMMITTED = Path(__file__).resolve().parents[1] / "tiny_data" / "golden"
SETS = {"continue": "continue", "gqa": "original", "original": "original"}   # folder: its position convention


def regen(convention):
    return (f"regenerate with `refimpl golden export tiny_data/golden/{convention} --ahead-positions "
            f"{convention}` ONLY if the change is intended, and give the reason in the commit message: "
            "every port checked against the old set must be re-checked")


@pytest.fixture(scope="module", params=CONVENTIONS)
def convention(request):
    return request.param


@pytest.fixture(scope="module")
def exported(convention, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"golden-{convention}") / convention
    export(d, ahead_positions=convention)
    return d


def _verify(directory, actual=None):
    out = io.StringIO()
    ok = verify(directory, actual, out=out)
    return ok, out.getvalue()


def _write_actual(path, arrays):
    np.savez(path, **arrays)
    return path


def _last_line(text):
    return text.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Export, and the committed sets
def test_export_then_verify_passes(exported, convention):
    ok, report = _verify(exported)
    assert ok, report
    assert _last_line(report).startswith("PASS")
    assert f"ahead_positions {convention})" in report.splitlines()[0]
    assert "NOT OK" not in report and "OK       latents [2, 3, 3, 48]" in report


def test_export_is_deterministic(exported, convention, tmp_path):
    export(tmp_path / "again", ahead_positions=convention)
    for name in (TENSORS, MANIFEST):
        assert (exported / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_committed_set_is_reproduced(exported, convention):
    """The code still computes the committed tensors (to rounding: another machine's BLAS moves
    the last bits, ~1e-14) and the same manifest."""
    m_new, new = load(exported)
    m_old, old = load(COMMITTED / convention)
    for m in (m_new, m_old):
        m["generator"].pop("numpy_version")
    assert m_new == m_old, f"tiny_data/golden/{convention}/manifest.json is stale: {regen(convention)}"
    for name, a in old.items():
        b = new[name]
        same = np.array_equal(a, b) if a.dtype.kind in "biu" else np.allclose(b, a, rtol=1e-10, atol=1e-12)
        assert same and a.dtype == b.dtype, (
            f"golden tensor {name} changed (max diff {np.abs(b.astype(float) - a.astype(float)).max():.2e}): "
            f"{regen(convention)}")


def test_committed_sets_verify_together():
    out = io.StringIO()
    assert verify_all(COMMITTED, out=out), out.getvalue()
    headers = [line for line in out.getvalue().splitlines() if line.startswith("golden ")]
    passes = [line for line in out.getvalue().splitlines() if line.startswith("PASS")]
    assert len(headers) == len(passes) == len(SETS)
    for (folder, convention), header in zip(sorted(SETS.items()), headers):
        assert header.startswith(f"golden {COMMITTED / folder} ") and f"ahead_positions {convention})" in header


def test_committed_sets_are_small():
    for folder in SETS:
        size = sum(p.stat().st_size for p in (COMMITTED / folder).iterdir())
        assert size < 2_000_000, f"tiny_data/golden/{folder} is {size} bytes: keep it under 2 MB"


def test_manifest_lists_every_tensor_and_vice_versa(convention):
    manifest = json.loads((COMMITTED / convention / MANIFEST).read_text())
    with np.load(COMMITTED / convention / TENSORS, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    assert list(manifest["tensors"]) == list(arrays)
    for name, spec in manifest["tensors"].items():
        assert spec["shape"] == list(arrays[name].shape), name
        assert spec["dtype"] == arrays[name].dtype.name, name
        assert {"rtol", "atol", "meaning", "tolerance_reason", "role", "required"} <= set(spec), name
        assert spec["meaning"] and spec["tolerance_reason"], name
        assert "$" not in spec["meaning"], name                       # every template filled
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
    assert manifest["generator"]["name"] == "refimpl.golden"


def test_manifest_states_its_convention_and_the_ids_follow_it(convention):
    """config.ahead_positions names the folder's convention, and packed.position_ids obeys it:
    ahead token x_{p+1+a} at p+1+a ("original") or p+N_L+1+a ("continue")."""
    manifest, g = load(COMMITTED / convention)
    c = manifest["config"]
    assert c["ahead_positions"] == convention
    rule = {"original": "p+1+j", "continue": "p+N_L+1+j"}[convention]
    assert c["choices"]["ahead_position_ids"].startswith(rule + " for ahead token")
    NL, NA, T = c["n_latents"], c["n_ahead"], c["seq_len"]
    shift = NL if convention == "continue" else 0
    G = NL + NA - 1
    for b, row in enumerate(g["trace_positions"]):
        for k, p in enumerate(row):
            group = g["packed.position_ids"][b, T + k * G:T + (k + 1) * G]
            assert list(group[:NL]) == [p + 1 + j for j in range(NL)]
            assert list(group[NL:]) == [p + 1 + a + shift for a in range(NA - 1)]


def test_the_sets_differ_only_where_the_convention_enters():
    """Same inputs; the coprocessor never sees ahead tokens, so the decoder's outputs and the
    latents agree; the ahead tokens' ids, and from them the ahead logits, differ by O(1)."""
    (manifest, o), (_, c) = load(COMMITTED / "original"), load(COMMITTED / "continue")
    for name, spec in manifest["tensors"].items():
        if spec["role"] == "input":
            assert np.array_equal(o[name], c[name]), name
    for name in ("baseline.logits", "decoder_cache.k", "decoder_cache.v", "latents"):
        assert np.allclose(o[name], c[name], rtol=1e-10, atol=1e-12), name
    assert np.array_equal(o["packed.mask"], c["packed.mask"])
    assert not np.array_equal(o["packed.position_ids"], c["packed.position_ids"])
    assert np.abs(o["ahead.logits"] - c["ahead.logits"]).max() > 1.0


def test_state_is_what_the_manifest_says(convention):
    """Coprocessor = perturbed copy of the decoder; adam.losses[0] is the loss."""
    _, g = load(COMMITTED / convention)
    name = "model.layers.1.self_attn.q_proj.weight"
    dec, cop = g["decoder." + name], g["coprocessor." + name]
    assert not np.array_equal(dec, cop) and np.abs(cop - dec).max() < 0.2 * np.abs(dec).max()
    assert g["adam.losses"][0] == g["loss"]
    assert np.isclose(g["loss"], g["trace_loss"].mean())
    assert (g["packed.mask"].diagonal(axis1=1, axis2=2)).all()


# ---------------------------------------------------------------------------------------------
# The grouped-query set
@pytest.fixture(scope="module")
def exported_gqa(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden-gqa") / "gqa"
    export(d, gqa=True)
    return d


def test_gqa_set_is_reproduced(exported_gqa):
    regen_gqa = ("regenerate with `refimpl golden export tiny_data/golden/gqa --gqa` ONLY if the change is intended, "
                 "and give the reason in the commit message")
    (m_new, new), (m_old, old) = load(exported_gqa), load(COMMITTED / "gqa")
    for m in (m_new, m_old):
        m["generator"].pop("numpy_version")
    assert m_new == m_old, f"tiny_data/golden/gqa/manifest.json is stale: {regen_gqa}"
    for name, a in old.items():
        same = np.array_equal(a, new[name]) if a.dtype.kind in "biu" else np.allclose(new[name], a, rtol=1e-10,
                                                                                      atol=1e-12)
        assert same and a.dtype == new[name].dtype, f"golden tensor {name} changed: {regen_gqa}"


def test_gqa_set_has_grouped_heads_and_says_so():
    """4 query heads of 12 read 2 key/value heads: k/v projections [24, 48], a 2-head cache; the manifest
    states the repeat order. Same trace positions, and so the same layout, as the multi-head "original" set."""
    (manifest, g), (_, mha) = load(COMMITTED / "gqa"), load(COMMITTED / "original")
    c = manifest["config"]
    assert (c["model"]["n_heads"], c["model"]["n_kv_heads"], c["head_dim"]) == (4, 2, 12)
    assert "query head i reads key/value head i // 2" in c["choices"]["grouped_query_attention"]
    assert manifest["generator"]["command"] == "refimpl golden export DIR --gqa"
    assert g["decoder.model.layers.0.self_attn.k_proj.weight"].shape == (24, 48)
    assert g["coprocessor.model.layers.2.self_attn.v_proj.weight"].shape == (24, 48)
    assert g["decoder_cache.k"].shape == g["decoder_cache.v"].shape == (3, 2, 2, 16, 12)
    assert "2 key/value heads" in manifest["tensors"]["decoder_cache.k"]["meaning"]
    for name in ("trace_positions", "packed.position_ids", "packed.mask"):
        assert np.array_equal(g[name], mha[name]), name
    assert "grouped_query_attention" not in load(COMMITTED / "original")[0]["config"]["choices"]


def test_gqa_export_from_the_cli(exported_gqa, tmp_path):
    assert main(["golden", "export", str(tmp_path / "cli"), "--gqa"]) == 0
    for name in (TENSORS, MANIFEST):
        assert (tmp_path / "cli" / name).read_bytes() == (exported_gqa / name).read_bytes(), name


def _torch_port():
    pytest.importorskip("torch", reason="the PyTorch port needs torch")
    import importlib.util
    spec = importlib.util.spec_from_file_location("torch_port", COMMITTED.parents[1] / "examples" / "torch_port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.interop
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_port_passes_the_gqa_set(dtype, tmp_path):
    _torch_port().main([str(COMMITTED / "gqa"), str(tmp_path / "port.npz"), "--dtype", dtype])
    ok, report = _verify(COMMITTED / "gqa", tmp_path / "port.npz")
    assert ok and ", 0 missing" in report, report


@pytest.mark.interop
def test_torch_port_with_tiled_kv_heads_fails_the_gqa_set(tmp_path):
    """Key/value heads tiled [a, b, a, b] instead of repeated in place [a, a, b, b]: a classic GQA mistake."""
    _torch_port().main([str(COMMITTED / "gqa"), str(tmp_path / "port.npz"), "--dtype", "float32", "--bug",
                        "gqa-tiled"])
    ok, report = _verify(COMMITTED / "gqa", tmp_path / "port.npz")
    assert not ok and "NOT OK   latents" in report and "NOT OK   ahead.logits" in report


# ---------------------------------------------------------------------------------------------
# Mismatches are reported NOT OK, with a failing return and exit status
def test_perturbed_actual_is_not_ok(convention, tmp_path):
    d = COMMITTED / convention
    _, arrays = load(d)
    logits = arrays["ahead.logits"].copy()
    i = int(np.argmax(np.abs(logits)))
    logits.flat[i] = -logits.flat[i]                                   # flip one value
    ok, report = _verify(d, _write_actual(tmp_path / "a.npz", {**arrays, "ahead.logits": logits}))
    assert not ok
    assert "NOT OK   ahead.logits" in report and _last_line(report).startswith("FAIL")
    assert "OK       latents" in report                                # the rest still passes
    ok, report = _verify(d, _write_actual(tmp_path / "b.npz", arrays))    # the unperturbed copy passes
    assert ok, report


def test_the_other_conventions_outputs_are_not_ok(tmp_path):
    """A port with the wrong position convention fails on the ids and the ahead logits."""
    _, cont = load(COMMITTED / "continue")
    ok, report = _verify(COMMITTED / "original", _write_actual(tmp_path / "c.npz", cont))
    assert not ok
    assert "NOT OK   packed.position_ids" in report and "NOT OK   ahead.logits" in report
    assert "OK       latents" in report


def test_perturbed_golden_weight_is_not_ok(exported, tmp_path):
    d = tmp_path / "g"
    shutil.copytree(exported, d)
    _, arrays = load(d)
    w = arrays["coprocessor.model.layers.0.self_attn.q_proj.weight"].copy()
    w[0, 0] += 0.5
    arrays["coprocessor.model.layers.0.self_attn.q_proj.weight"] = w
    (d / TENSORS).write_bytes(npz_bytes(arrays))
    ok, report = _verify(d)
    assert not ok
    assert "NOT OK   latents" in report and "OK       baseline.logits" in report


def test_cli_exit_status(exported, convention, tmp_path, capsys):
    assert main(["golden", "verify", str(exported)]) == 0
    _, arrays = load(exported)
    path = _write_actual(tmp_path / "bad.npz", {**arrays, "loss": arrays["loss"] + 1.0})
    assert main(["golden", "verify", str(exported), "--actual", str(path)]) == 1
    assert "NOT OK   loss" in capsys.readouterr().out
    flag = [] if convention == "original" else ["--ahead-positions", convention]   # original: the default
    assert main(["golden", "export", str(tmp_path / "cli")] + flag) == 0
    for name in (TENSORS, MANIFEST):
        assert (tmp_path / "cli" / name).read_bytes() == (exported / name).read_bytes(), name
    assert main(["golden"]) == 2
    assert "refimpl: error: golden needs an action" in capsys.readouterr().err


def test_cli_verifies_every_committed_set(capsys):
    assert main(["golden", "verify", str(COMMITTED)]) == 0
    assert capsys.readouterr().out.count("\nPASS: ") == len(SETS)


def test_actual_against_several_sets_says_which_to_pick(tmp_path, capsys):
    _, arrays = load(COMMITTED / "original")
    path = _write_actual(tmp_path / "port.npz", arrays)
    assert main(["golden", "verify", str(COMMITTED), "--actual", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 3 golden sets (continue, gqa, original)" in err
    assert f"{COMMITTED / 'original'}" in err                          # the default convention's set
    assert main(["golden", "verify", str(COMMITTED / "original"), "--actual", str(path)]) == 0


def test_missing_names_fail_only_when_required(tmp_path):
    d = COMMITTED / "original"
    manifest, arrays = load(d)
    only_required = {n: arrays[n] for n in manifest["required_for_actual"]}
    ok, report = _verify(d, _write_actual(tmp_path / "r.npz", only_required))
    assert ok, report
    assert "missing (optional) baseline.logits" in report
    without_loss = {n: a for n, a in only_required.items() if n != "loss"}
    ok, report = _verify(d, _write_actual(tmp_path / "m.npz", without_loss))
    assert not ok and "MISSING  loss []" in report and "(1 required)" in report


def test_wrong_shape_and_nan_are_not_ok(tmp_path):
    d = COMMITTED / "original"
    _, arrays = load(d)
    latents = arrays["latents"].copy()
    latents.flat[3] = np.nan
    actual = {**arrays, "trace_loss": arrays["trace_loss"].T, "latents": latents}
    ok, report = _verify(d, _write_actual(tmp_path / "s.npz", actual))
    assert not ok
    assert "NOT OK   trace_loss: shape [3, 2], expected [2, 3]" in report
    assert "NOT OK   latents" in report


# ---------------------------------------------------------------------------------------------
# Malformed inputs are one-line RefimplErrors
def _one_line(match, fn, *args, **kwargs):
    with pytest.raises(RefimplError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)


def test_malformed_files_raise_one_line_errors(exported, tmp_path):
    _one_line("not found", verify, tmp_path / "nowhere")
    _one_line("actual tensors file .* not found", verify, exported, tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _one_line("not a readable .npz", verify, exported, tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", latents=np.array([{"a": 1}], dtype=object))
    _one_line("object arrays", verify, exported, tmp_path / "obj.npz")

    d = tmp_path / "g"
    shutil.copytree(exported, d)
    (d / MANIFEST).write_text("{not json")
    _one_line("not valid JSON", verify, d)
    manifest = json.loads((exported / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    _one_line("format_version 99", verify, d)
    config = {**manifest["config"], "ahead_positions": "x"}
    (d / MANIFEST).write_text(json.dumps({**manifest, "config": config}))
    _one_line("config.ahead_positions 'x', not one of original, continue", verify, d)
    extra = {**manifest, "tensors": {**manifest["tensors"], "ghost": manifest["tensors"]["loss"]}}
    (d / MANIFEST).write_text(json.dumps(extra))
    _one_line("disagree", verify, d)
    (tmp_path / "empty").mkdir()
    _one_line("holds no manifest.json, nor subfolders", verify_all, tmp_path / "empty")
    _one_line("ahead_positions='x' is not one of", export, tmp_path / "x", ahead_positions="x")
