"""The benchmark harness (benchmarks/bench.py) behind `refimpl bench`: its JSON figures, its FLOP
model, its PyTorch baseline (benchmarks/torch_step.py) and its command line. The fast paths it
times are pinned to the plain ones in tests/test_ops.py.
"""
import contextlib
import io
import json

import numpy as np
import pytest

from benchmarks.bench import QUICK, BenchConfig, load_torch_step, make_case, render_table, step_flops
from refimpl.cli import main
from refimpl.config import get_preset
from refimpl.core.coprocessor import init_coprocessor
from refimpl.core.decoder import flatten_params, init_params
from refimpl.core.layout import sample_trace_positions
from refimpl.core.objective import loss_cached
from refimpl.training.autodiff import value_and_grad

CFG = get_preset("nano", vocab_size=53, init_std=0.2)


# ---------------------------------------------------------------------------------------------
# The command
@pytest.fixture(scope="module")
def quick_json(tmp_path_factory):
    """One `refimpl bench --quick --json` run (nano preset), used by the tests below. It runs in a
    scratch directory: the harness and its memory probe are found by path, not from the cwd."""
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.chdir(tmp_path_factory.mktemp("bench"))
        assert main(["bench", "--quick", "--preset", "nano", "--json"]) == 0
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1, "--json must print exactly one line: one JSON object"
    return json.loads(lines[0])


REQUIRED = ["preset", "backend", "dtype", "gemm_peak_gflops", "train_step_s", "train_step_gflops", "traces",
            "per_trace_step_s", "per_trace_method", "peak_rss_mb_by_traces", "augment_latency_s",
            "autoregressive_latency_s", "torch_train_step_s", "flops_formula", "targets"]


def test_bench_json_has_every_figure(quick_json):
    r = quick_json
    assert not [k for k in REQUIRED if k not in r]
    assert (r["preset"], r["backend"], r["dtype"], r["traces"]) == ("nano", "numpy", "float32", 4)
    for k in ("gemm_peak_gflops", "train_step_s", "train_step_gflops", "per_trace_step_s",
              "augment_latency_s", "autoregressive_latency_s"):
        assert isinstance(r[k], float) and r[k] > 0, k
    assert set(r["peak_rss_mb_by_traces"]) == {"2", "4"}
    assert all(v["step_mb"] > 0 and v["peak_rss_mb"] >= v["baseline_rss_mb"]
               for v in r["memory_probe"].values())
    case = make_case(BenchConfig(**{**QUICK, "preset": "nano"}))           # the same seeded batch
    assert r["train_step_gflop"] == pytest.approx(step_flops(
        case["cfg"], 2, 64, 4, 4, 4, case["positions"])["total"] / 1e9)
    assert set(r["targets"]) == {"train_step <= 1.5 x torch", ">= 25% of GEMM peak",
                                 "cached >= 10 x per-trace", "memory K=32->64 <= 2.2x",
                                 "augment <= 0.3 x autoregressive"}
    if load_torch_step()[0] is None:
        assert r["torch_train_step_s"] is None and r["torch_note"]
    else:                                      # same weights, same batch: the first losses agree
        assert r["torch_train_step_s"] > 0 and r["torch_loss_abs_diff"] < 1e-4


def test_bench_table(quick_json):
    text = render_table(quick_json)
    assert "train step (cached form)" in text and "targets (set for the demo preset):" in text


def test_bench_rejects_bad_options(capsys):
    assert main(["bench", "--preset", "huge"]) == 2
    assert main(["bench", "--traces", "0"]) == 2
    assert main(["bench", "--quick", "--preset", "nano", "--traces", "100"]) == 2   # K > T - N_A
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 3 and all(line.startswith("refimpl: error: ") for line in err)


# ---------------------------------------------------------------------------------------------
# The FLOP count, by hand on a tiny config
def test_step_flops_by_hand():
    cfg = get_preset("nano", vocab_size=10, d_model=4, n_heads=2, d_ff=6, n_layers=1)
    D, F = 4, 6
    linear = 2 * (4 * D * D + 3 * D * F)                       # q, k, v, o; gate, up, down
    T, K, NL, NA, p = 5, 1, 2, 2, 1                            # one sequence, one trace at p = 1
    G = NL + NA - 1
    prefill = sum(linear + 4 * D * (t + 1) for t in range(T))                  # token t sees t+1 keys
    cop = sum(linear + 4 * D * (p + 1 + j + 1) for j in range(NL))            # x_0..x_p, soft 0..j
    dec = sum(linear + 4 * D * (p + 1 + j + 1) for j in range(G))
    head = 2 * D * 10 * NA
    got = step_flops(cfg, 1, T, K, NL, NA, np.array([[p]]))
    assert got["prefill"] == prefill and got["coprocessor"] == 3 * cop
    assert got["decoder_groups"] == 2 * dec and got["lm_head"] == 2 * head
    assert got["total"] == prefill + 3 * cop + 2 * dec + 2 * head


# ---------------------------------------------------------------------------------------------
# The PyTorch baseline computes the same loss and gradients
@pytest.mark.parametrize("latent_positions", ["behind", "after"])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_torch_step_equals_refimpl(dtype, rtol, latent_positions):
    module, why = load_torch_step()
    if module is None:
        pytest.skip(why)
    import torch  # optional: load_torch_step found it
    dec = init_params(CFG, seed=3, dtype=dtype)
    trainable = init_coprocessor(dec, CFG, 3, seed=3)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, CFG.vocab_size, (2, 24))
    positions = sample_trace_positions(rng, 2, 24, 5, 4)
    loss, grads, _ = value_and_grad(
        lambda t: loss_cached(dec, t, CFG, tokens, positions, 3, 4, latent_positions)[0], trainable)
    step = module.TorchStep(flatten_params(dec), trainable, CFG.to_dict(), 3, 4,
                            latent_positions=latent_positions)
    t_loss = step.loss(tokens, positions)
    t_loss.backward()
    assert abs(t_loss.item() - float(loss)) <= rtol * abs(float(loss))
    for name, g in grads.items():
        got = step.train[name].grad.numpy()
        np.testing.assert_allclose(got, g, rtol=10 * rtol, atol=10 * rtol * np.abs(g).max(), err_msg=name)
    assert torch.get_num_threads() >= 1


def test_quick_config_is_small():
    bc = BenchConfig(**QUICK)
    assert bc.batch_size * bc.n_traces <= 8 and max(bc.memory_traces) <= 4
