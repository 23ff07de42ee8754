"""`refimpl bench`, its FLOP count and its PyTorch baseline; and the fast paths it measures.

Every fast path in ops/traces that differs from the plain one is pinned to it here:
- trace_attention cut into runs of traces with a shorter context == one run over all of it;
- the backward that reuses the forward's softmax statistic (lse) == the one that recomputes it;
- traces.context_runs never cuts off a context slot a trace may see;
- trace_hidden with runs == without (loss and every gradient of a train step).
"""
import json

import numpy as np
import pytest
from autograd import make_vjp
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.bench import QUICK, BenchConfig, load_torch_step, make_case, render_table, step_flops
from refimpl.cli import main
from refimpl.config import get_preset
from refimpl.core import ops
from refimpl.core.coprocessor import init_coprocessor
from refimpl.core.decoder import flatten_params, init_params
from refimpl.core.layout import build_layout, context_runs, sample_trace_positions
from refimpl.core.objective import loss_cached
from refimpl.training.autodiff import value_and_grad

CFG = get_preset("nano", vocab_size=53, init_std=0.2)


# ---------------------------------------------------------------------------------------------
# The command
@pytest.fixture(scope="module")
def quick_json():
    """One `refimpl bench --quick --json` run (nano preset), shared by the tests below."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", "--quick", "--preset", "nano", "--json"]) == 0
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1, "--json must print exactly one line: one JSON object"
    return json.loads(lines[0])


REQUIRED = ["preset", "backend", "dtype", "gemm_peak_gflops", "train_step_s", "train_step_gflops", "traces",
            "sequential_step_s", "sequential_method", "peak_rss_mb_by_traces", "augment_latency_s",
            "autoregressive_latency_s", "torch_train_step_s", "flops_formula", "targets"]


def test_bench_json_has_every_figure(quick_json):
    r = quick_json
    assert not [k for k in REQUIRED if k not in r]
    assert (r["preset"], r["backend"], r["dtype"], r["traces"]) == ("nano", "numpy", "float32", 4)
    for k in ("gemm_peak_gflops", "train_step_s", "train_step_gflops", "sequential_step_s",
              "augment_latency_s", "autoregressive_latency_s"):
        assert isinstance(r[k], float) and r[k] > 0, k
    assert set(r["peak_rss_mb_by_traces"]) == {"2", "4"}
    assert all(v["step_mb"] > 0 and v["peak_rss_mb"] >= v["baseline_rss_mb"] for v in r["memory_probe"].values())
    case = make_case(BenchConfig(**{**QUICK, "preset": "nano"}))           # the same seeded batch
    assert r["train_step_gflop"] == pytest.approx(step_flops(
        case["cfg"], 2, 64, 4, 4, 4, case["positions"])["total"] / 1e9)
    assert set(r["targets"]) == {"train_step <= 1.5 x torch", ">= 25% of GEMM peak", "form B >= 10 x form C",
                                 "memory K=32->64 <= 2.2x", "augment <= 0.3 x autoregressive"}
    if load_torch_step()[0] is None:
        assert r["torch_train_step_s"] is None and r["torch_note"]
    else:                                      # same weights, same batch: the first losses agree
        assert r["torch_train_step_s"] > 0 and r["torch_loss_abs_diff"] < 1e-4


def test_bench_table(quick_json):
    text = render_table(quick_json)
    assert "train step (form B)" in text and "targets (set for the demo preset):" in text


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
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_torch_step_equals_refimpl(dtype, rtol):
    module, why = load_torch_step()
    if module is None:
        pytest.skip(why)
    import torch
    dec = init_params(CFG, seed=3, dtype=dtype)
    trainable = init_coprocessor(dec, CFG, 3, seed=3)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, CFG.vocab_size, (2, 24))
    positions = sample_trace_positions(rng, 2, 24, 5, 4)
    loss, grads, _ = value_and_grad(lambda t: loss_cached(dec, t, CFG, tokens, positions, 3, 4)[0], trainable)
    step = module.TorchStep(flatten_params(dec), trainable, CFG.to_dict(), 3, 4)
    t_loss = step.loss(tokens, positions)
    t_loss.backward()
    assert abs(t_loss.item() - float(loss)) <= rtol * abs(float(loss))
    for name, g in grads.items():
        got = step.train[name].grad.numpy()
        np.testing.assert_allclose(got, g, rtol=10 * rtol, atol=10 * rtol * np.abs(g).max(), err_msg=name)
    assert torch.get_num_threads() >= 1


# ---------------------------------------------------------------------------------------------
# Fast paths == plain paths
def _trace_args(rng, B, H, K, G, Tc, Dh, dtype=np.float64):
    """trace_attention inputs whose context visibility is a prefix per trace (as in training)."""
    seen = rng.integers(0, Tc + 1, size=(B, K))                           # trace k sees slots < seen
    vis = np.arange(Tc) < seen[..., None]                                 # [B, K, Tc]
    f = lambda *s, scale=1.5: (rng.standard_normal(s) * scale).astype(dtype)  # noqa: E731
    args = (f(B, H, K, G, Dh), f(B, H, Tc, Dh), f(B, H, Tc, Dh, scale=1.0), f(B, H, K, G, Dh),
            f(B, H, K, G, Dh, scale=1.0), ops.additive_mask(vis[:, None, :, None, :], dtype),
            ops.additive_mask(np.tril(np.ones((G, G), dtype=bool)), dtype))
    return args, vis


@settings(max_examples=40)
@given(data=st.data())
def test_trace_attention_in_runs_equals_one_run(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    B, H, K, G, Tc = (data.draw(st.integers(1, n), label=name) for name, n in
                      (("B", 2), ("H", 2), ("K", 6), ("G", 4), ("Tc", 7)))
    args, vis = _trace_args(rng, B, H, K, G, Tc, 4)
    runs = context_runs(vis, n_runs=data.draw(st.integers(1, 4), label="n_runs"))
    g = rng.standard_normal(args[0].shape)
    diff = (0, 1, 2, 3, 4)
    one_vjp, one = make_vjp(ops.trace_attention, diff)(*args)
    runs_vjp, cut = make_vjp(lambda *a: ops.trace_attention(*a, runs=runs), diff)(*args)
    np.testing.assert_allclose(cut, one, rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(runs_vjp(g), one_vjp(g))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"d/darg{i}, runs {runs}")


@settings(max_examples=30)
@given(data=st.data())
def test_context_runs_cover_the_traces_and_every_visible_slot(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    B, K, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 12))
    vis = rng.random((B, K, T)) < data.draw(st.sampled_from([0.0, 0.3, 0.9]))  # any pattern, even none
    runs = context_runs(vis, n_runs=data.draw(st.integers(1, 5)))
    assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]] and runs[-1][1] == K
    for k0, k1, n in runs:
        assert k1 > k0 and 1 <= n <= T
        assert not vis[:, k0:k1, n:].any(), "a run cut off a context slot one of its traces sees"


@pytest.mark.parametrize("op", ["attention", "trace_attention"])
def test_backward_from_forward_lse_equals_recomputed(op, monkeypatch):
    """The VJP that takes the forward's lse == the VJP that recomputes it (the fallback)."""
    rng = np.random.default_rng(7)
    if op == "attention":
        vis = rng.random((2, 1, 5, 6)) < 0.6
        vis[..., 0] = True
        args = (rng.standard_normal((2, 3, 5, 4)) * 2, rng.standard_normal((2, 3, 6, 4)) * 2,
                rng.standard_normal((2, 3, 6, 4)), ops.additive_mask(vis, np.float64))
        diff = (0, 1, 2)
    else:
        args, _ = _trace_args(rng, 2, 2, 3, 4, 6, 4)
        diff = (0, 1, 2, 3, 4)
    fn = getattr(ops, op)
    g = rng.standard_normal(fn(*args).shape)
    vjp_hit, _ = make_vjp(fn, diff)(*args)
    monkeypatch.setattr(ops, "_lse_or_none", lambda out: None)         # as if the handoff were lost
    vjp_miss, _ = make_vjp(fn, diff)(*args)
    for i, (a, b) in enumerate(zip(vjp_hit(g), vjp_miss(g))):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13, err_msg=f"{op} d/darg{diff[i]}")


def test_lse_handoff_is_taken_only_by_its_own_output():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 3, 2)) for _ in range(3))
    bias = np.zeros((1, 1, 3, 3))
    out = ops.attention(q, k, v, bias)
    other = ops.attention(q, k, v, bias)                                  # a later call replaces it
    assert ops._lse_or_none(out) is None
    out = ops.attention(q, k, v, bias)
    assert ops._lse_or_none(out).shape == (1, 1, 3, 1)
    assert ops._lse_or_none(out) is None and other is not None             # taken once


def test_train_step_gradients_with_and_without_runs(monkeypatch):
    dec = init_params(CFG, seed=1, dtype=np.float64)
    trainable = init_coprocessor(dec, CFG, 3, seed=1)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (2, 30))
    positions = sample_trace_positions(rng, 2, 30, 8, 4)
    assert len(context_runs(build_layout(tokens, positions, 3, 4).context_visible())) == 4

    def run():
        return value_and_grad(lambda t: loss_cached(dec, t, CFG, tokens, positions, 3, 4)[0], trainable)
    loss, grads, _ = run()
    monkeypatch.setattr("refimpl.traces.context_runs", lambda visible: None)   # one run over all of T
    loss1, grads1, _ = run()
    assert float(loss) == pytest.approx(float(loss1), rel=1e-13)
    for name in grads:
        np.testing.assert_allclose(grads[name], grads1[name], rtol=1e-10, atol=1e-14, err_msg=name)


def test_quick_config_is_small():
    bc = BenchConfig(**QUICK)
    assert bc.batch_size * bc.n_traces <= 8 and max(bc.memory_traces) <= 4
