"""`refimpl demo`: the paper's tables rebuilt at tiny scale, in one command (docs/results.md §4, §5).
Trains every run the tables need into OUT/runs/NAME (reusing a finished run with the same options),
evaluates them with the shipped long-trained coprocessor, and writes OUT/report.md, report.json and the
plots. The CPU plan fits 10 minutes on 2 cores; `--backend cupy`: the GPU plan; `--quick`: a smoke test."""
import time
from dataclasses import asdict, replace
from pathlib import Path

from .data.corpus import SHIPPED_DECODER, TINY_DATA
from .errors import RefimplError, require
from .evaluation.plots import make_plots
from .evaluation.report import write_report
from .evaluation.runner import EvalConfig, evaluate_runs, run_paths
from .files import check_schema, read_json
from .training.train import METRICS, TrainConfig, saved_train_config, train

# The recipe (docs/results.md, "Screens"): the method's defaults, lr 3e-3; each run changes from BASE what
# its table varies. The main run (the largest N_L) alone evaluates while it trains (the break-even curve).
BASE = TrainConfig(n_latents=8, n_ahead=8, n_traces=16, batch_size=4, steps=600, lr=3e-3, warmup=60,
                   eval_every=0, eval_batches=4)
MAIN = {"eval_every": 50}
FULL = [
    ("copy-nl2", {"n_latents": 2}),                         # Tables 1, 2: N_L
    ("copy-nl4", {"n_latents": 4}),
    ("copy-nl8", MAIN),                                     # the main run (also Table 8, the curve)
    ("pause-nl8", {"mode": "pause"}),                       # Table 3: latents = soft tokens, input-free
    ("random-nl8", {"init": "random"}),                     # Tables 5/7
    ("copy-nl8-na4", {"n_ahead": 4}),                       # Table 6
    ("copy-nl8-after", {"latent_positions": "after"}),      # Table P: the latents after the point
]
QUICK_BASE = replace(BASE, steps=40, warmup=4, eval_batches=2)
QUICK = [(name, {**changes, "eval_every": 10} if changes is MAIN else changes)
         for name, changes in FULL if name != "copy-nl4"]
# One GPU (`--backend cupy`): 2048 traces a step; the main run 800 steps = 1.64M traces, the others 200;
# lr 1e-2, the better of 3e-3 and 1e-2 at this batch in the GPU runs of docs/results.md (not re-screened).
GPU_BASE = replace(BASE, batch_size=64, n_traces=32, steps=200, warmup=20, lr=1e-2, eval_batches=1)
GPU = [(name, {"steps": 800, "warmup": 50, "eval_every": 25} if changes is MAIN else changes)
       for name, changes in FULL]
EVAL_FULL = EvalConfig(eval_batches=6, batch_size=8, n_traces=16, limit=300, skip_windows=64)
EVAL_QUICK = replace(EVAL_FULL, eval_batches=2, n_traces=8, limit=100, latency_repeats=3)


def plan(quick, backend="numpy"):
    """[(run name, TrainConfig)]: the quick plan, the GPU plan (backend "cupy") or the CPU plan."""
    base, runs = (QUICK_BASE, QUICK) if quick else (GPU_BASE, GPU) if backend == "cupy" else (BASE, FULL)
    return [(name, replace(base, **changes)) for name, changes in runs]


def _reusable(run_dir, tc):
    """True if run_dir holds a finished run with exactly these options (not one with a removed option)."""
    try:
        m = check_schema(read_json(run_dir / "metrics.json", "", ""), METRICS, "", "")
        return (run_dir / "coprocessor.npz").is_file() and "train_config" in m and \
            saved_train_config(m["train_config"]) == asdict(tc) and m.get("steps") == tc.steps
    except (OSError, RefimplError):
        return False


def extra_runs(decoder, shipped=TINY_DATA / "shipped-coprocessor"):
    """The shipped long-trained coprocessor, when the demo runs against the decoder it was trained with."""
    ckpt = Path(shipped) / "coprocessor.npz"
    return [ckpt] if Path(decoder).resolve() == SHIPPED_DECODER.resolve() and ckpt.is_file() else []


def run_demo(out="runs/demo", quick=False, decoder=None, backend="numpy", log=print):
    decoder = Path(decoder or SHIPPED_DECODER)
    require(decoder.is_file(), f"decoder checkpoint {decoder} is missing: restore tiny_data/ from git, or "
                               "pass --decoder DIR/ckpt.npz from `refimpl pretrain`")
    out, t0, runs = Path(out), time.perf_counter(), plan(quick, backend)
    for i, (name, tc) in enumerate(runs, 1):
        run_dir = out / "runs" / name
        if _reusable(run_dir, tc):
            log(f"[{i}/{len(runs)}] {name}: reusing {run_dir}")
            continue
        log(f"[{i}/{len(runs)}] training {name}: mode={tc.mode} init={tc.init} N_L={tc.n_latents} "
            f"N_A={tc.n_ahead} K={tc.n_traces} steps={tc.steps} ({tc.steps * tc.batch_size * tc.n_traces:,} "
            "traces)")
        for stale in ("coprocessor.npz", "coprocessor.json", "metrics.json"):     # the demo's own earlier run
            (run_dir / stale).unlink(missing_ok=True)
        m = train(decoder, tc, run_dir, backend=backend)
        log(f"    held-out ahead loss: decoder alone {m['baseline_heldout_loss']:.4f}, "
            f"augmented {m['augmented_heldout_loss']:.4f} ({m['train_seconds']:.0f} s)")
    log(f"[eval] measuring the tables ({time.perf_counter() - t0:.0f} s so far)")
    paths = run_paths(runs=out / "runs") + extra_runs(decoder)
    report, loaded = evaluate_runs(decoder, paths, EVAL_QUICK if quick else EVAL_FULL, backend, log=log)
    report["demo"] = {"quick": quick, "backend": backend, "runs": {n: asdict(tc) for n, tc in runs},
                      "seconds": time.perf_counter() - t0}
    report["plots"] = [str(p) for p in make_plots(report, loaded, out)]
    write_report(report, out)
    log(f"done in {time.perf_counter() - t0:.0f} s; report: {out / 'report.md'}, {out / 'report.json'}")
    log(f"plots: {', '.join(report['plots'])}")
    return report
