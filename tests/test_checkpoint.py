"""Checkpoints: bit-exact round trip, atomic writes, and one-line errors for bad files."""
import hashlib
import io
import json
import os

import numpy as np
import pytest

from refimpl.config import get_preset
from refimpl.core.decoder import flatten_params, init_params
from refimpl.errors import RefimplError
from refimpl.training import checkpoint as ck


def sample_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"model.norm.weight": rng.standard_normal(8).astype(np.float32),
            "adam.m.model.norm.weight": rng.standard_normal(8).astype(np.float32),
            "w64": rng.standard_normal((3, 4)),
            "f16": np.arange(5, dtype=np.float16)}


def sample_meta(step=3):
    rng = np.random.default_rng(7)
    rng.integers(0, 10, size=3)
    return {"kind": "decoder", "config": {"d_model": 8}, "step": step,
            "rng": rng.bit_generator.state, "tokenizer_sha256": "ab" * 32, "data_hash": "cd" * 32,
            "extra": {"note": "x", "lr": 1e-3}}


def test_round_trip_bit_exact(tmp_path):
    arrays, meta = sample_arrays(), sample_meta()
    ck.save_checkpoint(tmp_path / "ckpt.npz", arrays, meta)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.json", "ckpt.npz"]     # no temp files left
    loaded, got = ck.load_checkpoint(tmp_path / "ckpt")                  # suffix optional
    assert set(loaded) == set(arrays)
    for k, a in arrays.items():
        assert loaded[k].dtype == a.dtype and loaded[k].tobytes() == a.tobytes()
    for k, v in meta.items():
        assert got[k] == v
    assert got["format_version"] == ck.FORMAT_VERSION
    assert got["npz_sha256"] == hashlib.sha256((tmp_path / "ckpt.npz").read_bytes()).hexdigest()
    rng = np.random.Generator(np.random.PCG64())                         # the rng state resumes
    rng.bit_generator.state = got["rng"]
    ref = np.random.default_rng(7)
    ref.integers(0, 10, size=3)
    assert rng.integers(0, 1 << 30, size=4).tolist() == ref.integers(0, 1 << 30, size=4).tolist()


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    ck.save_checkpoint(path, sample_arrays(0), sample_meta(step=1))

    def crash(src, dst):
        raise OSError("simulated crash")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, sample_arrays(1), sample_meta(step=2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.json", "ckpt.npz"]     # the temp file is gone
    arrays, meta = ck.load_checkpoint(path)
    assert meta["step"] == 1
    np.testing.assert_array_equal(arrays["w64"], sample_arrays(0)["w64"])


def test_crash_between_the_two_files_is_detected(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    ck.save_checkpoint(path, sample_arrays(0), sample_meta(step=1))
    real_replace, calls = os.replace, []

    def crash_on_json(src, dst):
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise OSError("simulated crash")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_json)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, sample_arrays(1), sample_meta(step=2))
    monkeypatch.undo()
    assert str(calls[0]).endswith(".npz")                               # npz first, then JSON
    with pytest.raises(RefimplError, match=r"ckpt\.npz is corrupt \(sha256 mismatch"):
        ck.load_checkpoint(path)


def one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_files(tmp_path):
    path = tmp_path / "ckpt.npz"
    with pytest.raises(RefimplError) as e:
        ck.load_checkpoint(path)
    assert "ckpt.json is missing" in one_line(e)
    ck.save_checkpoint(path, sample_arrays(), sample_meta())
    path.unlink()
    with pytest.raises(RefimplError) as e:
        ck.load_checkpoint(path)
    assert f"{path} is missing" in one_line(e)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_npz(tmp_path, damage):
    path = tmp_path / "ckpt.npz"
    ck.save_checkpoint(path, sample_arrays(), sample_meta())
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = b"not a zip file"
    path.write_bytes(bytes(blob))
    with pytest.raises(RefimplError) as e:
        ck.load_checkpoint(path)
    msg = one_line(e)
    assert str(path) in msg and "corrupt" in msg and "retrain" in msg


def test_corrupt_json(tmp_path):
    path = tmp_path / "ckpt.npz"
    ck.save_checkpoint(path, sample_arrays(), sample_meta())
    json_path = tmp_path / "ckpt.json"
    text = json_path.read_text()
    json_path.write_text(text[: len(text) // 2])
    with pytest.raises(RefimplError) as e:
        ck.load_checkpoint(path)
    assert str(json_path) in one_line(e) and "not valid JSON" in one_line(e)
    meta = json.loads(text)
    meta["format_version"] = 99
    json_path.write_text(json.dumps(meta))
    with pytest.raises(RefimplError) as e:
        ck.load_checkpoint(path)
    assert "format_version 99" in one_line(e)


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([np.inf]), np.arange(3), np.array([True]),
                                 np.array([1j]), np.array(["x"])], ids=["nan", "inf", "int", "bool", "complex", "text"])
def test_only_finite_float_arrays_are_saved_or_loaded(tmp_path, bad):
    """A checkpoint holds finite floats only: saving anything else is refused before a byte is written, and
    a file that holds it anyway (hashes re-made) is refused on load, naming the file and the array."""
    path = tmp_path / "ckpt.npz"
    with pytest.raises(RefimplError, match="NaN or infinity or are not real numbers") as e:
        ck.save_checkpoint(path, {**sample_arrays(), "bad": bad}, sample_meta())
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
    ck.save_checkpoint(path, sample_arrays(), sample_meta())
    np.savez(path, **sample_arrays(), bad=bad)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["npz_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta["arrays"]["bad"] = ck.array_spec(bad)
    meta["meta_sha256"] = ck.meta_sha256(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(RefimplError, match=r"ckpt.npz: array \['bad'\] holds NaN or infinity or is not real"):
        ck.load_checkpoint(path)


def test_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "ckpt.npz"
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([{"a": 1}], dtype=object))           # a pickled array
    blob = buf.getvalue()
    path.write_bytes(blob)
    meta = {**sample_meta(), "format_version": 1, "npz_sha256": hashlib.sha256(blob).hexdigest(),
            "arrays": {"evil": "|O[1]"}}
    (tmp_path / "ckpt.json").write_text(json.dumps(meta))
    with pytest.raises(RefimplError) as e:
        ck.load_checkpoint(path)
    assert "pickled" in one_line(e) and str(path) in one_line(e)
    with pytest.raises(RefimplError, match="dtype object"):
        ck.save_checkpoint(tmp_path / "other.npz", {"evil": np.array([None], dtype=object)},
                           sample_meta())


def test_metadata_must_be_plain_json(tmp_path):
    with pytest.raises(RefimplError, match="not plain JSON"):
        ck.save_checkpoint(tmp_path / "c.npz", sample_arrays(), {**sample_meta(), "x": object()})
    with pytest.raises(RefimplError, match="kind"):
        ck.save_checkpoint(tmp_path / "c.npz", sample_arrays(), {"step": 1})
    assert not any(p.exists() for p in ck.checkpoint_paths(tmp_path / "c"))


def nano():
    cfg = get_preset("nano", vocab_size=50)
    return cfg, init_params(cfg, seed=3)


def test_decoder_round_trip_and_hash(tmp_path):
    cfg, params = nano()
    flat = flatten_params(params)
    ck.save_decoder(tmp_path / "dec", params, cfg, {"step": 7, "extra": {"why": "test"}})
    loaded, cfg2, meta = ck.load_decoder(tmp_path / "dec.npz")
    assert cfg2 == cfg and meta["step"] == 7 and meta["kind"] == "decoder"
    assert meta["decoder_hash"] == ck.decoder_hash(flat) == ck.decoder_hash(flatten_params(loaded))
    for k, a in flatten_params(loaded).items():
        assert a.dtype == np.float32 and a.tobytes() == flat[k].tobytes()
    as64, _, _ = ck.load_decoder(tmp_path / "dec.npz", dtype=np.float64)
    assert as64["norm"].dtype == np.float64
    changed = dict(flat)
    changed["model.norm.weight"] = flat["model.norm.weight"].copy()
    changed["model.norm.weight"][0] += 1e-3
    assert ck.decoder_hash(changed) != ck.decoder_hash(flat)
    assert ck.decoder_hash(dict(reversed(list(flat.items())))) == ck.decoder_hash(flat)


def test_decoder_shape_mismatch_is_clear(tmp_path):
    cfg, params = nano()
    flat = flatten_params(params)
    flat["model.norm.weight"] = np.ones(5, np.float32)
    with pytest.raises(RefimplError) as e:
        ck.save_decoder(tmp_path / "dec", flat, cfg)
    assert "model.norm.weight has shape [5]" in one_line(e)
    ck.save_checkpoint(tmp_path / "dec", flat, {"kind": "decoder", "config": cfg.to_dict()})
    with pytest.raises(RefimplError) as e:
        ck.load_decoder(tmp_path / "dec")
    assert "dec.npz" in one_line(e) and "implies [48]" in one_line(e)
    ck.save_checkpoint(tmp_path / "cop", {"x": np.ones(1)}, {"kind": "coprocessor"})
    with pytest.raises(RefimplError, match="not a decoder"):
        ck.load_decoder(tmp_path / "cop")


@pytest.mark.gpu
def test_gpu_checkpoint_loads_on_cpu_and_back(tmp_path):
    cp = pytest.importorskip("cupy")
    from refimpl.backend import get_xp
    try:
        get_xp("cupy")
    except RefimplError:
        pytest.skip("no usable GPU")
    cfg, params = nano()
    on_gpu = {k: cp.asarray(v) for k, v in flatten_params(params).items()}
    ck.save_decoder(tmp_path / "dec", on_gpu, cfg)
    cpu, _, _ = ck.load_decoder(tmp_path / "dec")
    gpu, _, _ = ck.load_decoder(tmp_path / "dec", xp=cp)
    assert isinstance(gpu["norm"], cp.ndarray)
    for k, a in flatten_params(cpu).items():
        assert cp.asnumpy(flatten_params(gpu)[k]).tobytes() == a.tobytes()
