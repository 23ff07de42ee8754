"""Golden vectors (refimpl/golden/, docs/golden.md): export, verify and its tiers, the three committed sets.

tiny_data/golden/default (the method: latents "behind"), gqa (grouped-query, "behind") and latents-after
(the ablation) are what other implementations check themselves against, so the code must keep
reproducing all three: test_committed_set_is_reproduced fails if any change moves any tensor.
Ports with a planted bug (examples/torch_port.py --bug, needs torch) must FAIL, or pass only the float32 tier.
"""
import importlib.util
import inspect
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.cli import main
from refimpl.errors import RefimplError
from refimpl.golden.spec import FLOAT64_TIER, MANIFEST, TENSORS, export, npz_bytes
from refimpl.golden.verify import load, verify, verify_all
from refimpl.training.train import TrainConfig

COMMITTED = Path(__file__).resolve().parents[1] / "tiny_data" / "golden"
SETS = {"default": [], "gqa": ["--gqa"], "latents-after": ["--latent-positions", "after"]}   # folder: export flags


def regen(name):
    return (f"regenerate with `refimpl golden export tiny_data/golden/{name} {' '.join(SETS[name])}` ONLY if the "
            "change is intended, and give the reason in the commit message: every port checked against the old "
            "set must be re-checked")


@pytest.fixture(scope="module", params=sorted(SETS))
def name(request):
    return request.param


@pytest.fixture(scope="module")
def exported(name, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"golden-{name}") / name
    assert main(["golden", "export", str(d)] + SETS[name]) == 0
    return d


def _verify(directory, actual=None):
    out = io.StringIO()
    tier = verify(directory, actual, out=out)
    return tier, out.getvalue()


def _write_actual(path, arrays):
    np.savez(path, **arrays)
    return path


def _last_line(text):
    return text.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Export, and the committed sets
def test_export_is_deterministic_and_verifies_at_float64(exported, name, tmp_path):
    kw = {"gqa": name == "gqa", "latent_positions": "after" if name == "latents-after" else "behind"}
    export(tmp_path / "again", **kw)
    for f in (TENSORS, MANIFEST):
        assert (exported / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    tier, report = _verify(exported)
    assert tier == "float64" and _last_line(report).startswith("PASS float64: 40/40"), report
    assert f"latent_positions {kw['latent_positions']}, ahead_positions original)" in report.splitlines()[0]


def test_committed_set_is_reproduced(exported, name):
    """The code still computes the committed tensors (to rounding: another machine's BLAS moves
    the last bits, ~1e-14) and the same manifest."""
    (m_new, new), (m_old, old) = load(exported), load(COMMITTED / name)
    for m in (m_new, m_old):
        m["generator"].pop("numpy_version")
    assert m_new == m_old, f"tiny_data/golden/{name}/manifest.json is stale: {regen(name)}"
    for n, a in old.items():
        b = new[n]
        same = np.array_equal(a, b) if a.dtype.kind in "biu" else np.allclose(b, a, rtol=1e-10, atol=1e-12)
        assert same and a.dtype == b.dtype, (
            f"golden tensor {n} changed (max diff {np.abs(b.astype(float) - a.astype(float)).max():.2e}): "
            + regen(name))


def test_the_default_set_is_the_training_default():
    """The method has one statement: `refimpl train`'s latent ids, the default set's and export's default agree,
    and the ahead tokens sit at their own ids (the only convention the code has)."""
    c = load(COMMITTED / "default")[0]["config"]
    assert c["latent_positions"] == TrainConfig().latent_positions, (
        "tiny_data/golden/default no longer states the training default: " + regen("default"))
    assert c["ahead_positions"] == "original"
    assert inspect.signature(export).parameters["latent_positions"].default == TrainConfig().latent_positions


def test_committed_sets_verify_together(capsys):
    assert main(["golden", "verify", str(COMMITTED)]) == 0
    lines = capsys.readouterr().out.splitlines()
    headers = [line for line in lines if line.startswith("golden ")]
    assert [line for line in lines if line.startswith("PASS")] == [
        line for line in lines if line.startswith("PASS float64: 40/40")] and len(headers) == len(SETS) == 3
    for folder, header in zip(sorted(SETS), headers):
        assert header.startswith(f"golden {COMMITTED / folder} ")
    for folder in SETS:
        size = sum(p.stat().st_size for p in (COMMITTED / folder).iterdir())
        assert size < 2_000_000, f"tiny_data/golden/{folder} is {size} bytes: keep it under 2 MB"
    assert sorted(p.name for p in COMMITTED.iterdir()) == sorted(SETS)


def test_manifest_lists_every_tensor_and_vice_versa(name):
    manifest = json.loads((COMMITTED / name / MANIFEST).read_text())
    with np.load(COMMITTED / name / TENSORS, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    assert list(manifest["tensors"]) == list(arrays)
    for n, spec in manifest["tensors"].items():
        assert spec["shape"] == list(arrays[n].shape) and spec["dtype"] == arrays[n].dtype.name, n
        assert {"rtol", "atol", "meaning", "tolerance_reason", "role", "required"} <= set(spec), n
        assert spec["meaning"] and spec["tolerance_reason"] and "$" not in spec["meaning"], n
    assert arrays["tokens"].dtype == np.int64 and arrays["packed.mask"].dtype == bool
    assert all(a.dtype == np.float64 for a in arrays.values() if a.dtype.kind == "f")
    trainable = [n[len("coprocessor."):] for n in arrays if n.startswith("coprocessor.")]
    assert "model.embed_tokens.weight" not in trainable
    grads = sorted(n for n in arrays if n.startswith("grad."))
    assert grads == sorted(["grad.coprocessor." + n for n in trainable] + ["grad.soft_tokens"])
    c = manifest["config"]
    assert c["batch_size"] >= 2 and c["n_traces"] >= 3 and arrays["adam.losses"].shape == (5,)
    assert set(manifest["adam"]) >= {"lr", "beta1", "beta2", "eps", "weight_decay", "clipping"}
    assert manifest["required_for_actual"] == [n for n, s in manifest["tensors"].items() if s["required"]]
    assert manifest["generator"]["command"] == " ".join(["refimpl golden export DIR"] + SETS[name])
    tier64 = f"{FLOAT64_TIER:.0e}".replace("e-0", "e-")                 # "1e-9", as the text writes it
    assert f"<= {tier64} * max|expected|" in manifest["tiers"]["float64"] and "float32" in manifest["tiers"]
    assert "$" not in manifest["tolerance_policy"]


def test_manifest_states_its_convention_and_the_ids_follow_it(name):
    """latent j at max(0, p-N_L+1+j) ("behind") or p+1+j ("after"); ahead token x_{p+1+a} at p+1+a."""
    manifest, g = load(COMMITTED / name)
    c = manifest["config"]
    behind = c["latent_positions"] == "behind"
    assert behind == (name != "latents-after") and c["ahead_positions"] == "original"
    rule = "max(0, p-N_L+1+j) for soft token" if behind else "p+1+j for soft token"
    assert c["choices"]["latent_position_ids"].startswith(rule)
    assert c["choices"]["ahead_position_ids"] == "p+j for ahead token x_{p+j}: its own position in the sequence"
    NL, NA, T = c["n_latents"], c["n_ahead"], c["seq_len"]
    G = NL + NA - 1
    for b, row in enumerate(g["trace_positions"]):
        for k, p in enumerate(row):
            group = g["packed.position_ids"][b, T + k * G:T + (k + 1) * G]
            assert list(group[:NL]) == [max(0, p - NL + 1 + j) if behind else p + 1 + j for j in range(NL)]
            assert list(group[NL:]) == [p + 1 + a for a in range(NA - 1)]
    assert 0 in g["trace_positions"]                                  # "behind" clamps at 0 there


def test_the_sets_differ_only_where_the_convention_enters():
    """Same inputs, decoder outputs and mask; the latents' ids, and from them every later output, differ by O(1)."""
    (manifest, d), (_, a) = load(COMMITTED / "default"), load(COMMITTED / "latents-after")
    for n, spec in manifest["tensors"].items():
        if spec["role"] == "input":
            assert np.array_equal(d[n], a[n]), n
    for n in ("baseline.logits", "decoder_cache.k", "decoder_cache.v"):
        assert np.allclose(d[n], a[n], rtol=1e-10, atol=1e-12), n
    assert np.array_equal(d["packed.mask"], a["packed.mask"])
    assert not np.array_equal(d["packed.position_ids"], a["packed.position_ids"])
    assert np.abs(d["latents"] - a["latents"]).max() > 1.0 and np.abs(d["ahead.logits"] - a["ahead.logits"]).max() > 1.0


def test_state_is_what_the_manifest_says(name):
    """Coprocessor = perturbed copy of the decoder; adam.losses[0] is the loss."""
    _, g = load(COMMITTED / name)
    w = "model.layers.1.self_attn.q_proj.weight"
    dec, cop = g["decoder." + w], g["coprocessor." + w]
    assert not np.array_equal(dec, cop) and np.abs(cop - dec).max() < 0.2 * np.abs(dec).max()
    assert g["adam.losses"][0] == g["loss"] and np.isclose(g["loss"], g["trace_loss"].mean())
    assert (g["packed.mask"].diagonal(axis1=1, axis2=2)).all()


def test_gqa_set_has_grouped_heads_and_says_so():
    """4 query heads of 12 read 2 key/value heads: k/v projections [24, 48], a 2-head cache; the manifest
    states the repeat order. Same trace positions, and so the same layout, as the default set."""
    (manifest, g), (m_default, mha) = load(COMMITTED / "gqa"), load(COMMITTED / "default")
    c = manifest["config"]
    assert (c["model"]["n_heads"], c["model"]["n_kv_heads"], c["head_dim"]) == (4, 2, 12)
    assert "query head i reads key/value head i // 2" in c["choices"]["grouped_query_attention"]
    assert g["decoder.model.layers.0.self_attn.k_proj.weight"].shape == (24, 48)
    assert g["coprocessor.model.layers.2.self_attn.v_proj.weight"].shape == (24, 48)
    assert g["decoder_cache.k"].shape == g["decoder_cache.v"].shape == (3, 2, 2, 16, 12)
    assert "2 key/value heads" in manifest["tensors"]["decoder_cache.k"]["meaning"]
    for n in ("trace_positions", "packed.position_ids", "packed.mask"):
        assert np.array_equal(g[n], mha[n]), n
    assert "grouped_query_attention" not in m_default["config"]["choices"]


# ---------------------------------------------------------------------------------------------
# Tiers, and mismatches reported NOT OK with a failing return and exit status
def test_tiers(tmp_path):
    """Exact copy: PASS float64. Floats moved by 1e-7 of their size: PASS float32 only, naming the worst tensor."""
    d = COMMITTED / "default"
    _, arrays = load(d)
    assert _verify(d, _write_actual(tmp_path / "same.npz", arrays))[0] == "float64"
    rng = np.random.default_rng(0)
    noisy = {n: a * (1 + 1e-7 * rng.standard_normal(a.shape)) if a.dtype.kind == "f" else a for n, a in arrays.items()}
    tier, report = _verify(d, _write_actual(tmp_path / "noisy.npz", noisy))
    assert tier == "float32", report
    assert _last_line(report).startswith("PASS float32 (fails float64: 95 tensors, worst ") and "NOT OK" not in report


def test_perturbed_actual_is_not_ok(tmp_path):
    d = COMMITTED / "default"
    _, arrays = load(d)
    logits = arrays["ahead.logits"].copy()
    i = int(np.argmax(np.abs(logits)))
    logits.flat[i] = -logits.flat[i]                                   # flip one value
    tier, report = _verify(d, _write_actual(tmp_path / "a.npz", {**arrays, "ahead.logits": logits}))
    assert tier is None and "NOT OK   ahead.logits" in report and _last_line(report).startswith("FAIL:")
    assert "OK       latents" in report                                # the rest still passes


def test_latents_after_fail_the_default_set(tmp_path):
    """The ablation's outputs (a port that puts the latents after the point) fail the method's set."""
    _, after = load(COMMITTED / "latents-after")
    tier, report = _verify(COMMITTED / "default", _write_actual(tmp_path / "c.npz", after))
    assert tier is None
    assert "NOT OK   packed.position_ids" in report and "NOT OK   latents" in report
    assert "OK       baseline.logits" in report


def test_perturbed_golden_weight_is_not_ok(tmp_path):
    d = tmp_path / "g"
    shutil.copytree(COMMITTED / "default", d)
    _, arrays = load(d)
    w = arrays["coprocessor.model.layers.0.self_attn.q_proj.weight"].copy()
    w[0, 0] += 0.5
    arrays["coprocessor.model.layers.0.self_attn.q_proj.weight"] = w
    (d / TENSORS).write_bytes(npz_bytes(arrays))
    tier, report = _verify(d)
    assert tier is None and "NOT OK   latents" in report and "OK       baseline.logits" in report


def test_cli_exit_status_and_actual_against_several_sets(tmp_path, capsys):
    _, arrays = load(COMMITTED / "default")
    path = _write_actual(tmp_path / "bad.npz", {**arrays, "loss": arrays["loss"] + 1.0})
    assert main(["golden", "verify", str(COMMITTED / "default"), "--actual", str(path)]) == 1
    assert "NOT OK   loss" in capsys.readouterr().out
    assert main(["golden"]) == 2
    assert "refimpl: error: golden needs an action" in capsys.readouterr().err
    path = _write_actual(tmp_path / "port.npz", arrays)
    assert main(["golden", "verify", str(COMMITTED), "--actual", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 3 golden sets (default, gqa, latents-after)" in err
    assert f"e.g. {COMMITTED / 'default'}" in err
    assert main(["golden", "verify", str(COMMITTED / "default"), "--actual", str(path)]) == 0


def test_missing_names_fail_only_when_required(tmp_path):
    d = COMMITTED / "default"
    manifest, arrays = load(d)
    only_required = {n: arrays[n] for n in manifest["required_for_actual"]}
    tier, report = _verify(d, _write_actual(tmp_path / "r.npz", only_required))
    assert tier == "float64" and "missing (optional) baseline.logits" in report
    without_loss = {n: a for n, a in only_required.items() if n != "loss"}
    tier, report = _verify(d, _write_actual(tmp_path / "m.npz", without_loss))
    assert tier is None and "MISSING  loss []" in report and "(1 required)" in report


def test_wrong_shape_and_nan_are_not_ok(tmp_path):
    d = COMMITTED / "default"
    _, arrays = load(d)
    latents = arrays["latents"].copy()
    latents.flat[3] = np.nan
    actual = {**arrays, "trace_loss": arrays["trace_loss"].T, "latents": latents}
    tier, report = _verify(d, _write_actual(tmp_path / "s.npz", actual))
    assert tier is None
    assert "NOT OK   trace_loss: shape [3, 2], expected [2, 3]" in report and "NOT OK   latents" in report


# ---------------------------------------------------------------------------------------------
# Ports with a planted bug (examples/torch_port.py --bug; needs torch)
def _torch_port():
    pytest.importorskip("torch", reason="examples/torch_port.py needs torch (pip install -e .[interop])")
    spec = importlib.util.spec_from_file_location("torch_port", COMMITTED.parents[1] / "examples" / "torch_port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bug(tmp_path, bug, golden="default", dtype="float32"):
    _torch_port().main([str(COMMITTED / golden), str(tmp_path / "port.npz"), "--dtype", dtype, "--bug", bug])
    return _verify(COMMITTED / golden, tmp_path / "port.npz")


@pytest.mark.interop
@pytest.mark.parametrize("bug,golden,not_ok", [
    ("rope-interleaved", "default", ["latents", "ahead.logits"]),
    ("latent-positions", "default", ["packed.position_ids", "latents", "ahead.logits"]),   # latents after
    ("latent-positions", "latents-after", ["packed.position_ids", "latents", "ahead.logits"]),
    ("coprocessor-is-decoder", "default", ["latents", "ahead.logits"]),
    ("no-final-norm", "default", ["latents", "ahead.logits"]),
    ("packed-arange", "default", ["packed.position_ids", "ahead.logits"]),              # latents still OK
    ("gqa-tiled", "gqa", ["latents", "ahead.logits"]),
])
def test_torch_port_with_a_planted_bug_fails(bug, golden, not_ok, tmp_path):
    tier, report = _run_bug(tmp_path, bug, golden)
    assert tier is None and _last_line(report).startswith("FAIL:")
    for n in not_ok:
        assert f"NOT OK   {n} " in report, n
    assert ("OK       latents" in report) == (bug == "packed-arange")


@pytest.mark.interop
def test_float64_port_with_float32_rope_angles_passes_only_the_float32_tier(tmp_path):
    """RoPE angles computed in float32 (as Hugging Face does) cost ~1e-6: within every float32 tolerance,
    far beyond the float64 tier."""
    tier, report = _run_bug(tmp_path, "rope-float32", dtype="float64")
    assert tier == "float32" and _last_line(report).startswith("PASS float32 (fails float64: "), report


# ---------------------------------------------------------------------------------------------
# Malformed inputs are one-line RefimplErrors
def _one_line(match, fn, *args, **kwargs):
    with pytest.raises(RefimplError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)


def test_malformed_files_raise_one_line_errors(tmp_path):
    good = COMMITTED / "default"
    _one_line("not found", verify, tmp_path / "nowhere")
    _one_line("actual tensors file .* not found", verify, good, tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _one_line("not a readable .npz", verify, good, tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", latents=np.array([{"a": 1}], dtype=object))
    _one_line("object \\(pickled\\) array", verify, good, tmp_path / "obj.npz")

    d = tmp_path / "g"
    shutil.copytree(good, d)
    (d / MANIFEST).write_text("{not json")
    _one_line("not valid JSON", verify, d)
    manifest = json.loads((good / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    _one_line("format_version 99", verify, d)
    for field, value, match in (
            ("ahead_positions", "continue", (r"config.ahead_positions 'continue', not one of original; "
                                             r"regenerate it with `refimpl golden export DIR` .* commit 2d4e58e")),
            ("ahead_positions", None, "config.ahead_positions None"),
            ("latent_positions", "x", "config.latent_positions 'x', not one of behind, after; regenerate")):
        (d / MANIFEST).write_text(json.dumps({**manifest, "config": {**manifest["config"], field: value}}))
        _one_line(match, verify, d)
    extra = {**manifest, "tensors": {**manifest["tensors"], "ghost": manifest["tensors"]["loss"]}}
    (d / MANIFEST).write_text(json.dumps(extra))
    _one_line("disagree", verify, d)
    (tmp_path / "empty").mkdir()
    _one_line("holds no manifest.json, nor subfolders", verify_all, tmp_path / "empty")
    _one_line("latent_positions='x' is not one of", export, tmp_path / "x", latent_positions="x")


BAD_DTYPES = {"complex": lambda a: a + 1e6j, "complex, zero imaginary part": lambda a: a.astype(np.complex128),
              "bool": lambda a: a > 0, "text": lambda a: a.astype(str), "bytes": lambda a: a.astype("S8"),
              "datetime": lambda a: a.astype(np.int64).astype("datetime64[s]"),
              "NaN": lambda a: np.where(a == a.flat[0], np.nan, a), "infinity": lambda a: a * np.inf}


@given(bad=st.sampled_from(sorted(BAD_DTYPES)), data=st.data())
def test_an_actual_array_of_any_bad_dtype_or_value_is_not_ok(bad, data, tmp_path_factory):
    """An --actual file whose arrays are not finite real numbers where floats are expected never passes."""
    src = COMMITTED / "default"
    _, golden = load(src)
    floats = sorted(n for n, a in golden.items() if a.dtype.kind == "f")
    names = data.draw(st.lists(st.sampled_from(floats), min_size=1, unique=True), label="names")
    path = _write_actual(tmp_path_factory.mktemp("actual") / "a.npz",
                         {n: BAD_DTYPES[bad](a) if n in names else a for n, a in golden.items()})
    tier, out = _verify(src, path)
    assert tier is None and "PASS" not in out and all(f"NOT OK   {n}" in out for n in names), out


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=6)


@given(data=st.data())
def test_a_manifest_with_missing_extra_or_changed_fields_never_passes_by_accident(data, tmp_path_factory):
    """Delete, change or add any field at any level of a manifest: verify gives a one-line error, or
    compares every output tensor the manifest lists; it never passes having compared fewer."""
    src = COMMITTED / "default"
    m = json.loads((src / MANIFEST).read_text())
    node, path = m, []
    while isinstance(node, dict) and node and data.draw(st.booleans(), label="deeper"):
        path.append(data.draw(st.sampled_from(sorted(node)), label="key"))
        node = node[path[-1]]
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["delete", "change", "add"] if path else ["add"]), label="action")
    if action == "delete":
        del parent[path[-1]]
    elif action == "change":
        parent[path[-1]] = data.draw(JSON, label="value")
    else:
        target = node if isinstance(node, dict) else parent
        target[data.draw(st.text(min_size=1, max_size=6), label="new key")] = data.draw(JSON, label="value")
    d = tmp_path_factory.mktemp("manifest") / "set"
    shutil.copytree(src, d)
    (d / MANIFEST).write_text(json.dumps(m))
    try:
        tier, out = _verify(d)
    except RefimplError as e:
        assert "\n" not in str(e)
        return
    if tier is not None:
        outputs = [n for n, spec in m["tensors"].items() if spec["role"] == "output"]
        assert f"{len(outputs)}/{len(outputs)} compared tensors OK" in out, out


def test_verify_cannot_pass_by_accident(tmp_path):
    """A manifest whose entries lack their role fails; so does a verify that compared nothing."""
    src = COMMITTED / "default"
    d = tmp_path / "norole"
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    for spec in m["tensors"].values():
        spec.pop("role")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RefimplError, match="or a role"):
        verify(d, out=io.StringIO())
    np.savez(tmp_path / "none.npz", unrelated=np.zeros(3))          # nothing compared: only optional names
    m = json.loads((src / "manifest.json").read_text())
    d = tmp_path / "optional"
    shutil.copytree(src, d)
    for spec in m["tensors"].values():
        spec["required"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    out = io.StringIO()
    assert verify(d, tmp_path / "none.npz", out) is None and "(no tensor compared)" in out.getvalue()


@pytest.mark.parametrize("where, key, value", [("adam", "steps", 10**9), ("config", "n_latents", True),
                                               ("config", "n_ahead", 10**6)])
def test_a_manifest_that_asks_for_too_much_is_refused_in_one_line(tmp_path, where, key, value):
    d = tmp_path / "big"
    shutil.copytree(COMMITTED / "default", d)
    m = json.loads((d / "manifest.json").read_text())
    m[where][key] = value
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RefimplError, match="adam.steps in 1..100"):
        verify(d, out=io.StringIO())
