"""`refimpl demo` end to end on a nano decoder with a shrunken plan (the real one takes minutes)."""
import json
from dataclasses import replace

import pytest

import refimpl.demo as demo
from refimpl.cli import main
from refimpl.evaluation.runner import EvalConfig


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("dec")
    assert main(["pretrain", "--preset", "nano", "--steps", "3", "--batch-size", "2",
                 "--eval-batches", "1", "--out", str(out)]) == 0
    return out / "ckpt.npz"


@pytest.fixture
def tiny_plan(monkeypatch):
    base = replace(demo.QUICK_BASE, n_latents=2, n_ahead=2, n_traces=2, batch_size=2, seq_len=32,
                   steps=2, warmup=1, eval_batches=1)
    monkeypatch.setattr(demo, "QUICK_BASE", base)
    monkeypatch.setattr(demo, "QUICK", [("copy-nl1", dict(n_latents=1)), ("copy-nl2", dict(eval_every=1)),
                                        ("pause-nl2", dict(mode="pause")), ("random-nl2", dict(init="random"))])
    monkeypatch.setattr(demo, "EVAL_QUICK", EvalConfig(eval_batches=1, batch_size=2, n_traces=2, seq_len=32,
                                                       limit=6, prompt_batch=6, max_new_tokens=3,
                                                       delays=(0, 1), latency_repeats=1))


def test_demo_writes_report_and_reuses_runs(decoder, tmp_path, tiny_plan):
    lines = []
    report = demo.run_demo(tmp_path, quick=True, decoder=decoder, log=lines.append)
    saved = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    assert saved["demo"]["quick"] is True and set(saved["demo"]["runs"]) == {"copy-nl1", "copy-nl2",
                                                                              "pause-nl2", "random-nl2"}
    assert "Table 1" in md and "Table 2" in md and "Table 3" in md
    lead = md.splitlines()[2]                       # the title, a blank line, then the one sentence
    assert lead.startswith("**At this scale, augmentation ") and "copy-nl2 after 8 training traces" in lead
    assert "![break-even curve](breakeven.png)" in md and (tmp_path / "breakeven.png").is_file()
    assert report["demo"]["seconds"] > 0
    assert any("report: " in line and "report.md" in line for line in lines)
    assert list(tmp_path.glob("*.png"))
    # a second call reuses every finished run and only re-evaluates
    lines.clear()
    demo.run_demo(tmp_path, quick=True, decoder=decoder, log=lines.append)
    assert sum("reusing" in line for line in lines) == 4


def test_the_quick_plan_is_the_full_one_without_copy_nl4():
    quick, full = dict(demo.plan(True)), dict(demo.plan(False))
    assert list(quick) == ["copy-nl2", "copy-nl8", "pause-nl8", "random-nl8", "copy-nl8-na4", "copy-nl8-after"]
    assert list(full) == ["copy-nl2", "copy-nl4", *list(quick)[1:]]
    assert all(tc.steps == 40 for tc in quick.values()) and all(tc.steps == 600 for tc in full.values())
    assert {n for n, tc in full.items() if tc.latent_positions != "behind"} == {"copy-nl8-after"}
    assert full["pause-nl8"].mode == "pause" and full["random-nl8"].init == "random"
    assert [n for n, tc in full.items() if tc.eval_every] == ["copy-nl8"]          # the curve's run
    assert [n for n, tc in quick.items() if tc.eval_every] == ["copy-nl8"]


def test_the_gpu_plan_is_the_cpu_one_at_a_larger_budget():
    """`refimpl demo --backend cupy`: the same runs and options, batch 64 x K 32, the main run >= 1.6M traces."""
    cpu, gpu = dict(demo.plan(False)), dict(demo.plan(False, "cupy"))
    traces = lambda tc: tc.steps * tc.batch_size * tc.n_traces      # steps x batch x K
    assert list(gpu) == list(cpu) and dict(demo.plan(False, "numpy")) == cpu
    assert traces(gpu["copy-nl8"]) >= 1_600_000 and traces(cpu["copy-nl8"]) == 38_400
    assert all(traces(tc) >= 10 * traces(cpu[n]) for n, tc in gpu.items())
    assert gpu["copy-nl8"].eval_every and 0 < gpu["copy-nl8"].steps // gpu["copy-nl8"].eval_every <= 40
    for name, tc in gpu.items():             # nothing but the budget differs from the CPU plan
        same = {k for k in ("n_latents", "n_ahead", "mode", "init", "latent_positions")}
        assert {k: getattr(tc, k) for k in same} == {k: getattr(cpu[name], k) for k in same}
    assert dict(demo.plan(True, "cupy")) == dict(demo.plan(True))                   # --quick stays quick


def test_the_shipped_coprocessor_joins_only_the_shipped_decoders_demo(tmp_path):
    from refimpl.data.corpus import SHIPPED_DECODER
    (tmp_path / "coprocessor.npz").write_bytes(b"")
    assert demo.extra_runs(SHIPPED_DECODER, tmp_path) == [tmp_path / "coprocessor.npz"]
    assert demo.extra_runs(tmp_path / "other.npz", tmp_path) == []
    assert demo.extra_runs(SHIPPED_DECODER, tmp_path / "none") == []


def test_demo_missing_decoder(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--decoder", str(tmp_path / "nope.npz")]) == 2
    assert "missing" in capsys.readouterr().err
