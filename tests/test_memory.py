"""The memory model and the pre-flight: a run that cannot fit is refused with one line, before it
allocates or writes anything; the estimate agrees with a measured peak."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refimpl import memory
from refimpl.cli import load_bench
from refimpl.config import get_preset
from refimpl.errors import RefimplError

ROOT = Path(__file__).resolve().parents[1]


def _cli(args, available, tmp_path):
    env = {**os.environ, memory.ENV_AVAILABLE: available, "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "refimpl", *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    return p, time.perf_counter() - t0


@pytest.mark.parametrize("size, flag", [("--n-latents", "100000"), ("--batch-size", "100000")])
def test_train_too_large_is_refused_with_one_line(tmp_path, size, flag):
    p, seconds = _cli(["train", "--out", "r", size, flag, "--steps", "2"], "21.9GB", tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("refimpl: error: this run needs about ") and "21.9 GB is available" in lines[0]
    assert f"({size} {flag} dominates)" in lines[0] and f"use {size} " in lines[0] and "--force" in lines[0]
    assert not (tmp_path / "r").exists(), "something was written before the pre-flight"
    assert seconds < 30, f"the refusal took {seconds:.1f} s: it must come before any work"


def test_the_suggested_size_fits_and_one_more_does_not():
    cfg = get_preset("demo")
    sizes = dict(batch_size=8, seq_len=128, n_traces=16, n_latents=100000, n_ahead=16)
    available = 21.9e9
    with pytest.raises(RefimplError) as e:
        memory.preflight(lambda **k: memory.train_step(cfg, **k), sizes, available, ["n_latents", "batch_size"])
    fit = int(str(e.value).split("use n_latents=")[1].split()[0])
    assert memory.train_step(cfg, **{**sizes, "n_latents": fit}).total <= available
    assert memory.train_step(cfg, **{**sizes, "n_latents": fit + 1}).total > available


def test_force_skips_the_check_and_the_run_goes_on(tmp_path):
    p, _ = _cli(["pretrain", "--preset", "nano", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--eval-batches", "1", "--out", "p"], "1MB", tmp_path)
    assert p.returncode == 2 and "--force skips this check" in p.stderr and not (tmp_path / "p").exists()
    p, _ = _cli(["pretrain", "--preset", "nano", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--eval-batches", "1", "--out", "p", "--force"], "1MB", tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "p" / "ckpt.npz").is_file()


def test_available_memory_is_read_and_pinned(monkeypatch):
    monkeypatch.delenv(memory.ENV_AVAILABLE, raising=False)
    assert memory.available_bytes() > 100e6                                  # /proc/meminfo on Linux
    monkeypatch.setenv(memory.ENV_AVAILABLE, "1.5GiB")
    assert memory.available_bytes() == int(1.5 * 2**30)
    monkeypatch.setenv(memory.ENV_AVAILABLE, "lots")
    with pytest.raises(RefimplError, match="is not a size"):
        memory.available_bytes()


@pytest.mark.parametrize("case", [dict(preset="demo", batch_size=2, n_traces=8, n_latents=4, n_ahead=4),
                                  dict(preset="demo", batch_size=4, n_traces=16, n_latents=8, n_ahead=8)])
def test_estimate_agrees_with_the_measured_peak(case):
    """The benchmark's memory probe (a fresh process, one train step, VmHWM) against the estimate."""
    bench = load_bench()
    bc = bench.BenchConfig(**case, torch=False, memory_traces=())
    conf = json.dumps({**{k: getattr(bc, k) for k in bc.__dataclass_fields__}, "memory_traces": []})
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), conf], capture_output=True,
                         text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"] * 2**20
    cfg = get_preset(case["preset"])
    estimate = memory.train_step(cfg, case["batch_size"], cfg.max_seq_len, case["n_traces"], case["n_latents"],
                                 case["n_ahead"]).total
    assert 0.75 <= estimate / measured <= 1.25, (estimate / 2**20, measured / 2**20)


def test_the_model_knows_adams_chunk():
    from refimpl.training import optim
    assert memory.ADAM_CHUNK == optim.CHUNK
