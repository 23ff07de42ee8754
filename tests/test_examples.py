"""Every script in examples/ runs, with a small setting, and prints what it promises."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl.data.corpus import SHIPPED_DECODER
from refimpl.training.train import TrainConfig, train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args, cwd):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("script, args, expect", [
    ("01_decoder_and_cache.py", ["--small"], "cached (chunks"),
    ("02_coprocessor_call.py", ["--small"], "latents z (1, 8, 48)"),
    ("03_three_forms.py", [], "cached vs per-trace: max |gradient diff|"),
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
    assert len(losses) == 1                                  # per-trace, cached, packed: one number


def test_coprocessor_call_decodes_as_refimpl_generate(tmp_path):
    """examples/02 on a trained run prints the completion `refimpl generate` prints for its prompt, under
    the latent positions read from the checkpoint (here the non-default "after")."""
    train(SHIPPED_DECODER, TrainConfig(n_latents=2, n_ahead=2, n_traces=2, batch_size=1, seq_len=32, steps=1,
                                       eval_every=0, eval_batches=1, latent_positions="after"),
          tmp_path / "run", quiet=True)
    out = _run(EXAMPLES / "02_coprocessor_call.py", "--coprocessor", tmp_path / "run", cwd=tmp_path)
    line = next(x for x in out.splitlines() if x.startswith("augmented:"))
    prompt, completion = (ast.literal_eval(part) for part in line.split(": ", 1)[1].split(" -> "))
    assert "latents 'after' the point" in out
    cli = _run("-m", "refimpl", "generate", "--coprocessor", tmp_path / "run", "--prompt", prompt,
               "--max-new-tokens", "5", cwd=tmp_path)
    assert cli == prompt + completion + "\n"
