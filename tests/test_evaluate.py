"""`refimpl eval`: batched accuracy = per-prompt decoding by hand, the report's tables come from the
runs given (and say "not run" otherwise), the same held-out points for every run, bad inputs refused."""
import json

import numpy as np
import pytest

from refimpl.cli import main
from refimpl.config import get_preset
from refimpl.core.coprocessor import augment
from refimpl.core.decoder import extend, init_params, prefill
from refimpl.data.corpus import load_reasoning_eval, load_tokens
from refimpl.data.tokenizer import load_tokenizer
from refimpl.errors import RefimplError
from refimpl.evaluation.report import NOT_RUN, TABLES, copy_runs, render_markdown, table2, table_positions
from refimpl.evaluation.runner import EvalConfig, Run, _accuracy, load_runs, measure, reasoning_accuracy
from refimpl.training.checkpoint import load_coprocessor, load_decoder, save_decoder
from refimpl.training.heldout import ahead_nll, heldout_set, relative_ppl_change
from refimpl.training.train import TrainConfig, train

SMALL = dict(n_ahead=3, n_traces=4, batch_size=2, seq_len=24, steps=2, eval_every=0, eval_batches=1)
EVAL = ["--limit", "8", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "24", "--n-traces", "4",
        "--latency-repeats", "2", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # A random nano decoder (init_std 0.2) rather than a briefly pretrained one, whose greedy output
    # is one repeated token: with varied tokens, batched vs per-prompt decoding can really differ.
    root = tmp_path_factory.mktemp("eval")
    dec = root / "dec" / "ckpt.npz"
    cfg = get_preset("nano", init_std=0.2)
    save_decoder(dec, init_params(cfg, seed=0), cfg)
    for name, n_latents, every in (("copy2", 2, 0), ("copy4", 4, 1)):     # copy4 evaluates every step: a curve
        train(dec, TrainConfig(n_latents=n_latents, **{**SMALL, "eval_every": every}), root / "runs" / name,
              quiet=True)
    assert main(["eval", "--decoder", str(dec), "--runs", str(root / "runs"), "--out", str(root / "out")] + EVAL) == 0
    report = json.loads((root / "out" / "report.json").read_text())
    return dict(root=root, dec=dec, report=report, tables={t["id"]: t for t in report["tables"]})


def test_report_has_the_tables_of_the_runs_given(setup):
    t, report = setup["tables"], setup["report"]
    assert [r["name"] for r in report["runs"]] == ["copy2", "copy4"]
    assert t["table1"]["status"] == t["table2"]["status"] == t["table8"]["status"] == t["latency"]["status"] == "ok"
    assert t["breakeven"]["status"] == "ok" and list(t["breakeven"]["curves"]) == ["copy4"]
    assert t["table1"]["header"][1:3] == ["N_L=2 (copy2)", "N_L=4 (copy4)"]
    assert [row[0] for row in t["table1"]["rows"]] == [1, 2, 3, 4, 6]       # paper's 1,2,4 + N_A=3 + 2*N_A
    assert t["table1"]["sources"]["N_L=4 (copy4)"].endswith("copy4/coprocessor.npz")
    assert all(len(v) == 6 for v in t["table1"]["relative_ppl_change_pct"].values())
    assert [row[0] for row in t["table2"]["rows"][-3:]] == ["overall", "paper GSM8K", "paper MMLU"]
    assert report["measurements"]["async"]["run"] == "copy4"                # the largest N_L
    assert [row[0] for row in t["table8"]["rows"]] == ["decoder alone", "on time", "1 token late",
                                                       "2 tokens late", "3 tokens late"]
    on_time = report["measurements"]["async"]["by_delay"]["0"]
    assert on_time == report["measurements"]["runs"]["copy4"]["accuracy"]  # delay 0 is Table 2's decoding
    for row in t["latency"]["rows"]:
        assert all(isinstance(x, float) and x > 0 for x in row[2:])
    for tid in ("table3", "table5", "table6", "positions"):
        assert t[tid]["status"] == NOT_RUN and t[tid]["missing"]
    md = (setup["root"] / "out" / "report.md").read_text()
    assert "## Table 1" in md and md.count(f"*{NOT_RUN}*") == 4 and "copy4" in md and "-1.53" in md
    assert "arXiv 2412.17747" in md and "docs/method.md" in md
    assert "Liu et al. 2025, Table 1 (" in t["table1"]["note"] and "Table 8 (" in t["table8"]["note"]


def test_every_run_is_split_by_the_source_of_its_first_target(setup):
    """report.json: per run, the change at every position for the points whose x_{p+1} is English text
    and for those in a reasoning line, with their counts; report.md has the table."""
    m = setup["report"]["measurements"]
    assert m["data"] == "mixture" and setup["report"]["config"]["data"] == "mixture"
    total = sum(m["baseline"]["points"].values())
    for name, run in m["runs"].items():
        by = run["by_source"]
        assert set(by) == {"text", "reasoning"} and sum(d["points"] for d in by.values()) == total
        assert {s: d["points"] for s, d in by.items()} == m["baseline"]["points"]
        for d in by.values():
            assert d["relative_ppl_change_pct"] is None or len(d["relative_ppl_change_pct"]) == m["horizon"]
    rows = setup["tables"]["sources"]["rows"]
    assert [r[:2] for r in rows] == [[n, s] for n in m["runs"] for s in ("text", "reasoning")]


def test_data_text_scores_english_points_only(setup, tmp_path):
    out = tmp_path / "text"
    assert main(["eval", "--decoder", str(setup["dec"]), "--runs", str(setup["root"] / "runs"), "--out", str(out),
                 "--data", "text", "--no-plots"] + EVAL) == 0
    m = json.loads((out / "report.json").read_text())["measurements"]
    assert m["data"] == "text" and m["baseline"]["points"]["reasoning"] == 0 < m["baseline"]["points"]["text"]


def test_every_run_scored_on_the_same_heldout_points(setup):
    params, cfg, meta = load_decoder(setup["dec"])
    heldout = heldout_set(load_tokens("val", load_tokenizer()), 1, 2, 24, 4, 6)
    base = ahead_nll(params, None, cfg, heldout, 0, 6)
    trainable = load_coprocessor(setup["root"] / "runs" / "copy2" / "coprocessor.npz", meta["decoder_hash"])[0]
    want = relative_ppl_change(base, ahead_nll(params, trainable, cfg, heldout, 2, 6, "behind"))
    got = setup["report"]["measurements"]["runs"]["copy2"]["relative_ppl_change_pct"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_plots_are_nonempty_pngs(setup):
    paths = setup["report"]["plots"]
    assert len(paths) == 6 and any(p.endswith("breakeven.png") for p in paths)
    for p in paths:
        blob = open(p, "rb").read()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000


def by_hand(params, cfg, tok, trainable, prompt, n_new=10):
    """docs/data.md with docs/method.md §3: [eot]+prompt, augment once with the latents behind the last
    prompt token (the default), greedy with the tokens after the latents at their original positions,
    first line, stripped."""
    ids = [tok.eot_id] + tok.encode(prompt)
    logits, cache = prefill(params, cfg, np.array([ids]))
    if trainable is not None:
        (z, _), p = augment(trainable, cfg, cache, "behind"), len(ids) - 1
        logits, cache = extend(params, cfg, cache, z, np.maximum(np.arange(p - z.shape[1] + 1, p + 1), 0)[None])
    out = []
    for pos in range(len(ids), len(ids) + n_new):
        out.append(int(np.argmax(logits[0, -1])))
        logits, cache = extend(params, cfg, cache, np.array([[out[-1]]]), np.array([[pos]]))
    out = out[:out.index(tok.eot_id)] if tok.eot_id in out else out
    return tok.decode(out).split("\n")[0].strip()


def test_batched_accuracy_equals_per_prompt_decoding(setup):
    params, cfg, meta = load_decoder(setup["dec"], np.float64)
    trainable = load_coprocessor(setup["root"] / "runs" / "copy4" / "coprocessor.npz", meta["decoder_hash"],
                                 np.float64)[0]
    tok, problems = load_tokenizer(), load_reasoning_eval("test")[:10]
    for t in (None, trainable):
        batched, _ = reasoning_accuracy(params, cfg, tok, problems, t, prompt_batch=4)
        single, _ = reasoning_accuracy(params, cfg, tok, problems, t, prompt_batch=1)
        assert batched == single
        assert batched["predictions"] == [by_hand(params, cfg, tok, t, p["prompt"]) for p in problems]
    late = [reasoning_accuracy(params, cfg, tok, problems, trainable, delay=2, prompt_batch=b)[0] for b in (4, 1)]
    assert late[0] == late[1]


def test_accuracy_counts_per_task():
    problems = [{"task": t, "prompt": "Q", "answer": a} for t, a in (("add", " 5"), ("add", " 7"), ("mul", " 6"))]
    acc = _accuracy(problems, [True, False, True], ["5", "1", "6"])
    assert acc["overall"] == pytest.approx(200 / 3) and acc["correct"] == 2 and acc["n"] == 3
    assert acc["by_task"]["add"] == {"correct": 1, "n": 2, "accuracy": 50.0}


def test_tables_say_not_run_without_runs_and_fill_in_with_them(setup):
    m = setup["report"]["measurements"]
    alone = [t for t in TABLES if t is table2]                  # the decoder alone needs no run
    for table in TABLES:
        assert table(m, [])["status"] == ("ok" if table in alone else NOT_RUN)
    assert [row[0] for row in table2(m, [])["rows"]][-3:] == ["overall", "paper GSM8K", "paper MMLU"]
    assert len(table2(m, [])["header"]) == 2 and "decoder alone only" in table2(m, [])["note"]
    assert render_markdown({**setup["report"], "tables": [t(m, []) for t in TABLES]}).count(NOT_RUN) == len(TABLES) - 1
    fake = lambda name, **meta: Run(name, f"{name}.npz", {"mode": "coprocessor", "init": "copy", "n_latents": 2,
                                                          "n_ahead": 3, "train_config": {"latent_positions": "behind"},
                                                          **meta}, None)
    m = {**m, "runs": {**m["runs"], "p": m["runs"]["copy2"], "r": m["runs"]["copy4"], "a5": m["runs"]["copy4"]}}
    runs = [fake("copy2"), fake("p", mode="pause"), fake("r", init="random"), fake("a5", n_ahead=5)]
    t3, t5, t6 = (table(m, runs) for table in TABLES[2:5])
    assert t3["status"] == t5["status"] == t6["status"] == "ok"
    assert [row[0] for row in t3["rows"]] == ["decoder alone", "pause tokens (p)", "cache augmentation (copy2)"]
    assert "do NOT depend on the input" in t3["note"]
    assert [row[0] for row in t5["rows"]] == ["decoder alone", "random (r)", "copy (copy2)"]
    assert [row[0] for row in t6["rows"]] == ["3 (copy2)", "5 (a5)"] and set(t6["sources"]) == {"copy2", "a5"}


def test_coprocessor_of_another_decoder_is_refused(setup, tmp_path, capsys):
    cfg = get_preset("nano", init_std=0.2)
    other = tmp_path / "other.npz"
    save_decoder(other, init_params(cfg, seed=1), cfg)
    with pytest.raises(RefimplError, match="another decoder"):
        load_runs([setup["root"] / "runs" / "copy2" / "coprocessor.npz"], load_decoder(other)[2]["decoder_hash"])
    assert main(["eval", "--decoder", str(other), "--coprocessor", str(setup["root"] / "runs" / "copy2")] + EVAL) == 2
    assert "another decoder" in capsys.readouterr().err


def test_horizon_that_does_not_fit_is_refused(setup, capsys):
    with pytest.raises(RefimplError, match="does not fit"):       # checked before anything is measured
        measure(None, get_preset("nano"), None, [], EvalConfig(seq_len=24, horizon=22, n_traces=4), None, [])
    assert main(["eval", "--decoder", str(setup["dec"]), "--horizon", "30"] + EVAL) == 2
    assert "--horizon 30 does not fit --seq-len 24" in capsys.readouterr().err


def test_table_positions_pairs_runs_that_differ_only_in_the_latent_positions():
    def run(name, latents, n_latents=4, lr=1e-3):
        tc = {"lr": lr, "latent_positions": latents}
        meta = {"mode": "coprocessor", "init": "copy", "n_latents": n_latents, "n_ahead": 8, "train_config": tc}
        return Run(name, f"/x/{name}", meta, {})
    runs = [run("a4", "after"), run("a8", "after", 8), run("b4", "behind"), run("b4-lr", "behind", lr=3e-3)]
    m = {"horizon": 3, "runs": {r.name: {"relative_ppl_change_pct": [1.0, 2.0, 4.0],
                                         "accuracy": {"overall": 5.0}} for r in runs}}
    t = table_positions(m, runs)
    assert t["status"] == "ok"
    assert [row[:2] for row in t["rows"]] == [["behind", "b4"], ["after", "a4"]]    # b4-lr differs in lr too
    assert t["rows"][0][3:7] == [1.0, 2.0, 3.0, 7 / 3]     # n=1, n=2, mean of 2..N_A (H=3 here), mean of 1..H
    assert "'behind' (the method)" in t["note"] and "'after' (the ablation)" in t["note"]
    assert [r.name for r in copy_runs(runs)] == ["b4", "b4-lr"]   # the main convention (tie: the default)
    assert [r.name for r in copy_runs(runs[:3])] == ["a4", "a8"]  # else the convention most runs share
    assert table_positions(m, runs[1:2] + runs[3:])["status"] == NOT_RUN


def test_breakeven_curve_is_the_runs_own_heldout_gap(setup):
    """The curve: step x B x K traces, and the gap of each training-time evaluation to the decoder alone
    on the same held-out points (the baseline metrics.json records)."""
    metrics = json.loads((setup["root"] / "runs" / "copy4" / "metrics.json").read_text())
    curve = setup["tables"]["breakeven"]["curves"]["copy4"]
    assert curve["steps"] == [1, 2] and curve["traces"] == [2 * 4, 4 * 4] and curve["traces_per_step"] == 8
    for i, e in enumerate(metrics["evals"]):
        change = relative_ppl_change(metrics["baseline_ahead_loss"], e["ahead_loss"])
        assert curve["position_1"][i] == pytest.approx(change[0])
        assert curve["positions_2_on"][i] == pytest.approx(np.mean(change[1:]))
    rows = setup["tables"]["breakeven"]["rows"]
    assert [r[:3] for r in rows] == [["copy4", 1, 8], ["copy4", 2, 16]]


def test_breakeven_baseline_recomputed_for_runs_that_did_not_record_it(setup, tmp_path):
    """A run trained before metrics.json held the baseline gets it from its own held-out set."""
    from refimpl.evaluation.runner import _measure_curves
    params, cfg, meta = load_decoder(setup["dec"])
    run = load_runs([setup["root"] / "runs" / "copy4" / "coprocessor.npz"], meta["decoder_hash"])[0]
    old = {k: v for k, v in run.metrics.items() if k != "baseline_ahead_loss"}
    old_run = Run(run.name, run.path, run.meta, run.trainable, old)
    got = _measure_curves(params, cfg, [old_run], load_tokens("val", load_tokenizer()), lambda m: None)
    want = setup["tables"]["breakeven"]["curves"]["copy4"]
    np.testing.assert_allclose(got["copy4"]["position_1"], want["position_1"], rtol=1e-9)


def test_log_spaced_rows():
    from refimpl.evaluation.report import log_spaced
    xs = list(range(100, 10001, 100))
    picked = [xs[i] for i in log_spaced(xs)]
    assert picked == [100, 300, 500, 1000, 2200, 4700, 10000]       # at or past 100 * 10^(k/3)
    assert log_spaced([]) == [] and log_spaced([5]) == [0]


def test_break_even_is_the_first_crossing_and_where_the_gap_stays_below():
    from refimpl.evaluation.report import _crossings
    assert _crossings([1, 2, 3, 4], [5.0, -1.0, 2.0, -1.0]) == {"first": 2, "stays": 4}
    assert _crossings([1, 2], [3.0, 1.0]) == {"first": None, "stays": None}
    assert _crossings([1, 2], [None, -1.0]) == {"first": 2, "stays": 2}


def test_long_split_holds_multi_digit_answers_only():
    """The long split: 3..5-digit answers, correct, held out from every other split."""
    long = load_reasoning_eval("long")
    others = {p["prompt"] for split in ("val", "test") for p in load_reasoning_eval(split)}
    assert len(long) == 300 and not {p["prompt"] for p in long} & others
    assert {p["task"] for p in long} == {"add", "mul"}
    for p in long:
        expr = p["prompt"].removeprefix("Q: ").removesuffix("=? A:")
        assert eval(expr) == int(p["answer"]) and 3 <= len(p["answer"].strip()) <= 5


def test_headline_says_where_augmentation_helps_and_where_not_yet():
    """The report's first sentence: from the least- and the most-trained largest-N_L runs."""
    from refimpl.evaluation.report import headline
    def run(name, steps):
        meta = {"mode": "coprocessor", "init": "copy", "n_latents": 8, "n_ahead": 3, "step": steps,
                "train_config": {"batch_size": 4, "n_traces": 16, "latent_positions": "behind"}}
        return Run(name, f"/x/{name}", meta, {})
    runs = [run("demo", 600), run("long", 10000)]
    m = {"runs": {"demo": {"relative_ppl_change_pct": [5.0, -0.1, 0.3, 9.0]},
                  "long": {"relative_ppl_change_pct": [2.0, -0.5, -0.7, 9.0]}}}
    said = headline(m, runs)
    assert said.startswith("At this scale, augmentation helps at ahead positions 2..3 and does not yet help at "
                           "ahead position 1 (the token read at the last latent) (demo after 38,400 training "
                           "traces: position 1 +5.0%, positions 2..3 +0.10%; long after 640,000 training traces: "
                           "position 1 +2.0%, positions 2..3 -0.60%")
    m["runs"]["long"]["relative_ppl_change_pct"][0] = -1.0
    assert "helps at ahead positions 2..3 and ahead position 1" in headline(m, runs)
    assert headline(m, []) is None


def test_the_shipped_coprocessor_carries_its_break_even_curve():
    """tiny_data/shipped-coprocessor/metrics.json: 100 evaluations over 640,000 traces, the last below the
    decoder alone at every ahead position on its own held-out points (docs/results.md)."""
    from refimpl.data.corpus import TINY_DATA
    from refimpl.evaluation.runner import _measure_curves
    folder = TINY_DATA / "shipped-coprocessor"
    metrics = json.loads((folder / "metrics.json").read_text())
    run = Run("shipped", str(folder / "coprocessor.npz"), {"train_config": metrics["train_config"]}, None, metrics)
    curve = _measure_curves(None, None, [run], None, lambda m: None)["shipped"]
    assert len(curve["traces"]) == 100 and curve["traces"][-1] == 640_000
    assert curve["position_1"][0] > 50 and curve["position_1"][-1] < 0 and curve["positions_2_on"][-1] < -0.5
    assert max(relative_ppl_change(metrics["baseline_ahead_loss"], metrics["evals"][-1]["ahead_loss"])) < 0


def test_bootstrap_intervals_bracket_the_change_and_shrink_to_a_constant_shift():
    """runner.bootstrap: a constant shift d of every point's nll gives the interval [c, c], c = 100 (e^d - 1);
    noisy points give an interval that holds the point estimate, and wider for fewer points."""
    from refimpl.evaluation.runner import bootstrap
    from refimpl.training.heldout import relative_ppl_change
    rng = np.random.default_rng(0)
    base = 2 + rng.random((400, 8))                                                      # [P, H]
    lo, hi = bootstrap(base, base - 0.05, 8)["positions_2_8"]
    assert lo == pytest.approx(hi) == pytest.approx(100 * np.expm1(-0.05))
    noisy = base + rng.normal(0, 0.3, base.shape)
    ci = bootstrap(base, noisy, 8)
    point = relative_ppl_change(base.mean(0), noisy.mean(0))
    assert ci["position_1"][0] < point[0] < ci["position_1"][1]
    assert ci["positions_2_8"][0] < point[1:].mean() < ci["positions_2_8"][1]
    few = bootstrap(base[:50], noisy[:50], 8)["position_1"]
    assert few[1] - few[0] > ci["position_1"][1] - ci["position_1"][0] and set(bootstrap(base, noisy, 1)) == {
        "position_1"}
