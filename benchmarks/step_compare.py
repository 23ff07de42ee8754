"""Time the training step (the cached form) of two refimpl trees (before / after a change) and PyTorch eager,
side by side in one run: each runs in its own worker process, and the rounds are interleaved.

    python benchmarks/step_compare.py --before /path/to/old/checkout [--preset gpu --backend cupy]
                                      [--batch-size 8 --traces 32 --rounds 7] [--no-torch]

A worker builds the same seeded case (a random decoder of the preset, a copy-init coprocessor,
N_L 16, N_A 16), runs one warm-up step, then times one step per round (synchronised on a GPU).
Prints one JSON object: the per-round seconds, their medians and the round-by-round ratios.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(tree, preset, backend, batch_size, traces, n_latents, n_ahead, torch_step):
    """In a child process: build the case, then answer each 'step' line with its seconds."""
    sys.path.insert(0, str(tree))
    import numpy as np

    from refimpl.backend import get_xp
    from refimpl.config import get_preset
    from refimpl.core.coprocessor import init_coprocessor
    from refimpl.core.decoder import flatten_params, init_params
    from refimpl.core.layout import sample_trace_positions
    from refimpl.training.optim import adam_init
    from refimpl.training.train import TrainConfig, train_step
    xp, cfg = get_xp(backend), get_preset(preset)
    T, rng = cfg.max_seq_len, np.random.default_rng(0)
    dec = init_params(cfg, 0, np.float32, xp)
    trainable = init_coprocessor(dec, cfg, n_latents)
    tokens = rng.integers(0, cfg.vocab_size, (batch_size, T))
    positions = sample_trace_positions(rng, batch_size, T, traces, n_ahead)
    tc = TrainConfig(n_latents=n_latents, n_ahead=n_ahead, n_traces=traces, batch_size=batch_size, seq_len=T)
    sync = (lambda: xp.cuda.Device().synchronize()) if backend == "cupy" else (lambda: None)
    if torch_step:
        sys.path.insert(0, str(HERE))
        import torch
        from torch_step import TorchStep
        host = lambda tree: {k: np.asarray(xp.asnumpy(v) if backend == "cupy" else v)
                             for k, v in tree.items()}
        ts = TorchStep(host(flatten_params(dec)), host(trainable), cfg.to_dict(), n_latents, n_ahead,
                       device="cuda" if backend == "cupy" else "cpu")
        run = lambda: ts.step(tokens, positions)
        sync = (lambda: torch.cuda.synchronize()) if backend == "cupy" else (lambda: None)
    else:
        state = {"t": trainable, "a": adam_init(trainable)}
        # the old tree's train_step expects device tokens; the new one checks host tokens itself
        tok = tokens if "training" in train_step.__module__ else xp.asarray(tokens)

        def run():
            state["t"], state["a"], stats = train_step(dec, state["t"], state["a"], cfg, tc, tok, positions,
                                                       1e-4)
            return stats["loss"]
    run()
    sync()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        sync()
        t0 = time.perf_counter()
        loss = run()
        sync()
        print(json.dumps({"s": time.perf_counter() - t0, "loss": float(loss)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="a checkout of refimpl before the change")
    p.add_argument("--after", default=str(HERE.parent), help="the checkout after it (default: this one)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--backend", default="numpy")
    for flag, default in (("--batch-size", 8), ("--traces", 32), ("--rounds", 7)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args()
    names = ["before", "after"] + ([] if a.no_torch else ["torch"])
    procs = {}
    for name in names:
        tree = str(Path(a.before if name == "before" else a.after).resolve())   # the workers run in /
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import step_compare; step_compare.worker("
                f"{tree!r}, {a.preset!r}, {a.backend!r}, {a.batch_size}, {a.traces}, 16, 16, "
                f"{name == 'torch'})")
        procs[name] = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, cwd="/")
        assert procs[name].stdout.readline().strip() == "ready", f"worker {name} failed"
    times, losses = {n: [] for n in names}, {}
    for _ in range(a.rounds):
        for name in names:
            print("step", file=procs[name].stdin, flush=True)
            r = json.loads(procs[name].stdout.readline())
            times[name].append(r["s"])
            losses.setdefault(name, r["loss"])
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    def ratio(x, y):
        return statistics.median(a / b for a, b in zip(times[x], times[y]))
    out = {"preset": a.preset, "backend": a.backend, "batch_size": a.batch_size, "traces": a.traces,
           "rounds": a.rounds, "seconds": times, "first_loss": losses,
           "median_s": {n: statistics.median(t) for n, t in times.items()},
           "after_over_before": ratio("after", "before")}
    if "torch" in times:
        out.update(after_over_torch=ratio("after", "torch"), before_over_torch=ratio("before", "torch"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
