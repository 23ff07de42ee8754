"""Every script in examples/ runs, with a small setting, and prints what it promises."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args, cwd):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("script, args, expect", [
    ("01_decoder_and_cache.py", ["--small"], "cached (chunks"),
    ("02_coprocessor_call.py", ["--small"], "latents z (1, 8, 48)"),
    ("03_three_forms.py", [], "cached vs sequential: max |gradient diff|"),
])
def test_example_runs(script, args, expect, tmp_path):
    assert expect in _run(EXAMPLES / script, *args, cwd=tmp_path)


def test_example_tiny_training_run(tmp_path):
    out = _run(EXAMPLES / "04_tiny_training_run.py", "--out", tmp_path / "run", "--pretrain-steps", "3",
               "--steps", "2", cwd=tmp_path)
    assert out.count("ahead position") == 4


def test_three_forms_agree_in_the_example(tmp_path):
    out = _run(EXAMPLES / "03_three_forms.py", cwd=tmp_path)
    losses = {line.split("loss")[1].strip() for line in out.splitlines() if line.startswith("form")}
    assert len(losses) == 1                                  # packed, cached, sequential: one number
