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
    monkeypatch.setattr(demo, "QUICK", [("copy-nl1", dict(n_latents=1)), ("copy-nl2", dict()),
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
    assert report["demo"]["seconds"] > 0
    assert any(line.startswith("report:") for line in lines)
    assert list(tmp_path.glob("*.png"))
    # a second call reuses every finished run and only re-evaluates
    lines.clear()
    demo.run_demo(tmp_path, quick=True, decoder=decoder, log=lines.append)
    assert sum("reusing" in line for line in lines) == 4


def test_demo_missing_decoder(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--decoder", str(tmp_path / "nope.npz")]) == 2
    assert "missing" in capsys.readouterr().err
