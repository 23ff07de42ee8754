"""examples/00_method.py, the whole method in plain autograd, passes every golden set at the float64 tier,
fails (naming the tensor) when a golden tensor is off by one part in a million, and stays a one-screen
file that needs nothing from refimpl."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "00_method.py"
GOLDEN = ROOT / "tiny_data" / "golden"


def _sets():
    """Every golden set the script supports: ahead tokens at their own position ids."""
    found = []
    for manifest in sorted(GOLDEN.glob("*/manifest.json")):
        if json.loads(manifest.read_text())["config"].get("ahead_positions") == "original":
            found.append(manifest.parent)
    return found


def _run(directory):
    return subprocess.run([sys.executable, str(SCRIPT), str(directory)], capture_output=True, text=True,
                          check=False, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("directory", _sets(), ids=lambda d: d.name)
def test_passes_every_golden_set(directory):
    r = _run(directory)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PASS" in r.stdout and "NOT OK" not in r.stdout


def test_there_is_a_golden_set_to_check():
    assert _sets(), f"no golden set with ahead_positions 'original' under {GOLDEN}"


@pytest.mark.parametrize("name", ["latents", "grad.soft_tokens"])
def test_fails_and_names_a_tensor_off_by_1e_6(name, tmp_path):
    src = _sets()[0]
    shutil.copy(src / "manifest.json", tmp_path / "manifest.json")
    with np.load(src / "tensors.npz") as f:
        tensors = {k: f[k] for k in f.files}
    tensors[name] = tensors[name] * (1 + 1e-6)
    np.savez(tmp_path / "tensors.npz", **tensors)
    r = _run(tmp_path)
    assert r.returncode != 0, r.stdout[-3000:]
    bad = [line for line in r.stdout.splitlines() if "NOT OK" in line]
    assert bad and all(line.split()[0] == name for line in bad), r.stdout[-3000:]
    assert "FAIL" in r.stdout


def test_refuses_an_unknown_latent_position_convention(tmp_path):
    src = _sets()[0]
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["config"]["latent_positions"] = "sideways"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(src / "tensors.npz", tmp_path / "tensors.npz")
    r = _run(tmp_path)
    assert r.returncode != 0 and "sideways" in r.stderr


def test_stays_short_plain_and_autograd_only():
    text = SCRIPT.read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"^\s*(import|from)\s+refimpl", text, re.MULTILINE) and "refimpl." not in text
    assert "defvjp" not in text and "primitive" not in text
    imports = re.findall(r"^(?:import|from)\s+([\w.]+)", text, re.MULTILINE)
    assert {i.split(".")[0] for i in imports} <= {"json", "math", "sys", "collections", "pathlib", "numpy",
                                                    "autograd"}
    assert text.count("# %%") >= 5
