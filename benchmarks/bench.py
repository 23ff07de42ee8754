"""The benchmark harness behind `refimpl bench` (refimpl/cli.py owns the flags, loads this file by
path and calls `run_bench`); docs/performance.md lists the figures and the method. Run as a script,
`python benchmarks/bench.py '<BenchConfig as JSON>'`, it is the memory probe's child: one train step.

A timing alone says little on a busy machine, so each figure is measured beside the one it is
compared to, in the same process: the train step, the GEMM peak and the PyTorch step
(benchmarks/torch_step.py) run in interleaved rounds, and each ratio is the median of the per-round
ratios. The per-trace form is timed on a subset of the sequences and scaled (its cost is linear in
the traces); memory is one step per K in a fresh subprocess.
"""
import ctypes
import gc
import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median

import numpy as np

import refimpl
from refimpl import memory
from refimpl.backend import get_dtype, get_xp, n_context_runs, to_numpy
from refimpl.config import get_preset
from refimpl.core.coprocessor import augment, init_coprocessor
from refimpl.core.decoder import decode, extend, flatten_params, init_params, prefill, sample_next
from refimpl.core.layout import sample_trace_positions
from refimpl.core.objective import loss_per_trace
from refimpl.errors import require
from refimpl.training.autodiff import value_and_grad
from refimpl.training.optim import adam_init
from refimpl.training.train import TrainConfig, train_step

HERE = Path(__file__).resolve()                       # run by the memory probe as a script
REFIMPL_ROOT = Path(refimpl.__file__).resolve().parents[1]  # the child imports this same refimpl

# Targets of issue 7 (demo preset, float32, NumPy, one run); reported as met / missed, never hidden.
TARGETS = {  # name: (figure, comparison, bound)
    "train_step <= 1.5 x torch": ("torch_ratio", "<=", 1.5),           # train_step_s / torch_train_step_s
    ">= 25% of GEMM peak": ("fraction_of_peak", ">=", 0.25),           # train_step_gflops / gemm_peak_gflops
    "cached >= 10 x per-trace": ("per_trace_speedup", ">=", 10.0),     # per_trace_step_s / train_step_s
    "memory K=32->64 <= 2.2x": ("memory_growth_32_64", "<=", 2.2),     # step memory at K=64 / at K=32
    "augment <= 0.3 x autoregressive": ("latency_ratio", "<=", 0.3),   # augment / autoregressive latency
}

FLOPS_FORMULA = (
    "Model FLOPs per layer and slot: 2*(4*D^2 + 3*D*F) for q,k,v,o and the SwiGLU MLP, plus 4*D*keys "
    "for q.k^T and p.v over the keys the slot may see (prefill token t: t+1; slot j of the group or "
    "soft tokens of a trace at p: p+1 context + j+1 own). Per step: 1 x decoder prefill over B*T "
    "tokens (no gradient) + 3 x coprocessor over B*K*N_L soft slots (forward, input and weight "
    "gradients) + 2 x decoder over B*K*(N_L+N_A-1) group slots (forward and input gradient: the frozen "
    "decoder's weight gradients are never computed) + 2 x 2*D*V per read-out for the tied LM head "
    "(B*K*N_A read-outs); x n_layers except the head. Not counted: masked-out keys the blockwise "
    "attention still computes, the backward's recomputation of q.k^T, elementwise ops, gathers, "
    "clipping, Adam. train_step_gflops_if_all_x3 also counts the groups and the head x3 (the usual "
    "convention), i.e. the frozen decoder's weight gradients that are never computed.")


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "demo"
    backend: str = "numpy"
    dtype: str = "float32"
    batch_size: int = 8
    n_traces: int = 32
    n_latents: int = 16
    n_ahead: int = 16
    rounds: int = 5                       # interleaved rounds of (GEMM, train step, torch step)
    memory_traces: tuple = (8, 16, 32, 64)
    per_trace_sequences: int = 1          # time the per-trace form on this many sequences, then scale; 0: all
    latency_repeats: int = 7
    gemm_size: int = 0                    # n of the [n, n] @ [n, n] peak; 0: 2048 (NumPy), 8192 (CuPy)
    threads: int = 0                      # 0: leave the BLAS / torch thread count as it is
    torch: bool = True
    seed: int = 0


QUICK = {"batch_size": 2, "n_traces": 4, "n_latents": 4, "n_ahead": 4, "rounds": 2, "memory_traces": (2, 4),
         "latency_repeats": 2, "gemm_size": 256}


# ---------------------------------------------------------------------------------------------
# The case: a random decoder of the preset (timing does not depend on trained weights)
def make_case(bc):
    """Everything one train step needs: dict with cfg, dec, trainable, adam, tc, tokens, positions, xp,
    and step(), which runs `train_step` on them."""
    xp, cfg = get_xp(bc.backend), get_preset(bc.preset)
    B, T, K = bc.batch_size, cfg.max_seq_len, bc.n_traces
    tc = TrainConfig(n_latents=bc.n_latents, n_ahead=bc.n_ahead, n_traces=K, batch_size=B, seq_len=T)
    tc.validate()
    rng = np.random.default_rng(bc.seed)
    dec = init_params(cfg, bc.seed, get_dtype(bc.dtype), xp)
    trainable = init_coprocessor(dec, cfg, bc.n_latents, seed=bc.seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T))       # on the host: the loss checks them there
    positions = sample_trace_positions(rng, B, T, K, bc.n_ahead)
    case = {"cfg": cfg, "dec": dec, "trainable": trainable, "adam": adam_init(trainable), "tc": tc,
            "tokens": tokens, "positions": positions, "xp": xp}

    def step():                                     # one train step, the state carried over: its loss
        case["trainable"], case["adam"], stats = train_step(
            dec, case["trainable"], case["adam"], cfg, tc, tokens, positions, 1e-4)
        return stats["loss"]
    case["step"] = step
    return case


def step_flops(cfg, batch_size, seq_len, n_traces, n_latents, n_ahead, trace_positions):
    """Model FLOPs of one training step by part (see FLOPS_FORMULA); trace_positions int [B, K]."""
    D, Fd, L, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    B, T, G = batch_size, seq_len, n_latents + n_ahead - 1
    p = np.asarray(trace_positions, dtype=np.int64)
    linear = 2 * (4 * D * D + 3 * D * Fd)                                   # per slot and layer

    def slots(n):                                   # the n slots after each trace point, summed
        keys = int(n * (p + 1).sum()) + p.size * n * (n + 1) // 2           # context + own (causal)
        return L * (p.size * n * linear + 4 * D * keys)

    parts = {"prefill": L * B * (T * linear + 4 * D * T * (T + 1) // 2),
             "coprocessor": 3 * slots(n_latents), "decoder_groups": 2 * slots(G),
             "lm_head": 2 * 2 * D * V * B * n_traces * n_ahead}
    total = sum(parts.values())
    x3 = total + (parts["decoder_groups"] + parts["lm_head"]) // 2     # + the frozen decoder's weight grads
    return {**parts, "total": total, "total_if_all_x3": x3}


# ---------------------------------------------------------------------------------------------
# Threads, timing, machine load
def blas_threads(n=0):
    """Set the threads of the OpenBLAS NumPy links to (if n > 0); the count in use, None for another BLAS."""
    try:
        maps = Path("/proc/self/maps").read_text().split("\n")
    except OSError:
        return None
    for path in sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}):
        lib = ctypes.CDLL(path)
        for prefix, suffix in itertools.product(("scipy_openblas_", "openblas_"), ("64_", "")):
            get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if get is not None and put is not None:
                if n > 0:
                    put(ctypes.c_int(n))
                return int(get())
    return None


def timed(fn, xp=np, cpu=None):
    """(wall seconds, result) of one call, synchronised on a GPU; appends its CPU seconds to cpu."""
    sync = xp.cuda.Device().synchronize if xp.__name__ == "cupy" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0, out


def gemm_gflops(xp, dtype, n, repeats=3):
    """Best GFLOP/s of an [n, n] @ [n, n] matmul in dtype."""
    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n)).astype(dtype)) for _ in range(2))
    timed(lambda: a @ b, xp)
    best = min(timed(lambda: a @ b, xp)[0] for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _load_average():
    return [round(x, 2) for x in os.getloadavg()]


def _sibling(name):
    """benchmarks/<name>.py as a module, loaded by path (as this file is)."""
    spec = importlib.util.spec_from_file_location(f"refimpl_bench_{name}", HERE.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# The PyTorch step (benchmarks/torch_step.py), when torch is installed
def load_torch_step():
    """The benchmarks/torch_step.py module, or (None, why not)."""
    try:
        import torch  # noqa: F401  (optional)
    except ImportError:
        return None, "torch is not installed"
    if not HERE.with_name("torch_step.py").is_file():
        return None, f"{HERE.with_name('torch_step.py')} is missing"
    return _sibling("torch_step"), None


def make_torch_step(case, bc, threads):
    """A TorchStep on the case's weights (same device kind as the backend), or (None, why not)."""
    module, why = load_torch_step()
    if module is None:
        return None, why
    import torch  # optional: load_torch_step found it
    if bc.backend == "cupy" and not torch.cuda.is_available():
        return None, "torch has no CUDA device"
    device = "cuda" if bc.backend == "cupy" else "cpu"
    if threads and device == "cpu":
        torch.set_num_threads(threads)                                     # the same count as BLAS
    host = lambda tree: {k: to_numpy(v) for k, v in tree.items()}
    return module.TorchStep(host(flatten_params(case["dec"])), host(case["trainable"]), case["cfg"].to_dict(),
                            bc.n_latents, bc.n_ahead, device=device,
                            latent_positions=case["tc"].latent_positions), None


# ---------------------------------------------------------------------------------------------
# The measurements
def measure_train_steps(bc, threads, log):
    """Interleaved rounds of GEMM peak, our train step and the torch step; medians and ratios."""
    case = make_case(bc)
    xp, step = case["xp"], case["step"]
    torch_step, torch_note = (None, "--no-torch") if not bc.torch else make_torch_step(case, bc, threads)
    torch_run = lambda: torch_step.step(case["tokens"], case["positions"])
    first_loss = step()                                                     # warm-up: the same state
    torch_first = torch_run() if torch_step else None
    ours, theirs, gemm, ours_cpu, theirs_cpu = [], [], [], [], []
    gemm_n = bc.gemm_size or (8192 if bc.backend == "cupy" else 2048)
    for r in range(bc.rounds):
        gemm.append(gemm_gflops(xp, get_dtype(bc.dtype), gemm_n))
        ours.append(timed(step, xp, ours_cpu)[0])
        if torch_step:
            theirs.append(timed(torch_run, cpu=theirs_cpu)[0])
        log(f"round {r + 1}/{bc.rounds}: step {ours[-1]:.3f}s"
            + (f", torch {theirs[-1]:.3f}s" if theirs else "") + f", GEMM {gemm[-1]:.1f} GFLOP/s")
    flops = step_flops(case["cfg"], bc.batch_size, case["tc"].seq_len, bc.n_traces, bc.n_latents, bc.n_ahead,
                       case["positions"])
    gflop = flops["total"] / 1e9
    out = {"gemm_peak_gflops": max(gemm), "gemm_gflops_by_round": gemm,
           "train_step_s": median(ours), "train_step_s_by_round": ours, "train_step_cpu_s": median(ours_cpu),
           "train_step_gflop": gflop, "flops_by_part_gflop": {k: v / 1e9 for k, v in flops.items()},
           "train_step_gflops": gflop / median(ours),
           "train_step_gflops_if_all_x3": flops["total_if_all_x3"] / 1e9 / median(ours),
           "fraction_of_peak": median(gflop / s / g for s, g in zip(ours, gemm)),    # same-round GEMM
           "first_step_loss": first_loss, "torch_note": torch_note, "torch_first_step_loss": torch_first}
    if not torch_step:
        return {**out, **dict.fromkeys(["torch_train_step_s", "torch_train_step_s_by_round", "torch_ratio",
                                        "torch_train_step_cpu_s", "torch_threads", "torch_loss_abs_diff"])}
    import torch  # optional: make_torch_step found it
    return {**out, "torch_train_step_s": median(theirs), "torch_train_step_s_by_round": theirs,
            "torch_ratio": median(a / b for a, b in zip(ours, theirs)),
            "torch_train_step_cpu_s": median(theirs_cpu), "torch_threads": torch.get_num_threads(),
            "torch_loss_abs_diff": abs(torch_first - first_loss)}


def measure_per_trace(bc, log):
    """The per-trace form's value_and_grad at the same K on `per_trace_sequences` sequences, scaled to B."""
    case = make_case(bc)
    n = bc.batch_size if bc.per_trace_sequences <= 0 else min(bc.per_trace_sequences, bc.batch_size)

    def grad(tokens, positions):
        loss, _, _ = value_and_grad(lambda t: loss_per_trace(
            case["dec"], t, case["cfg"], case["xp"].asarray(tokens), positions, bc.n_latents, bc.n_ahead)[0],
            case["trainable"])
        return float(to_numpy(loss))
    grad(case["tokens"][:1], case["positions"][:1, :1])                     # warm-up: one trace
    seconds, _ = timed(lambda: grad(case["tokens"][:n], case["positions"][:n]), case["xp"])
    log(f"the per-trace form on {n} sequence(s) x {bc.n_traces} traces: {seconds:.2f}s")
    scale = bc.batch_size / n
    method = ("measured on all sequences" if n == bc.batch_size else
              f"measured on {n} of {bc.batch_size} sequences ({n * bc.n_traces} traces, one run), "
              f"scaled x{scale:g}: its cost is linear in the number of traces")
    return {"per_trace_step_s": seconds * scale, "per_trace_measured_s": seconds,
            "per_trace_method": f"value_and_grad(loss_per_trace), no Adam; {method}"}


def measure_latency(bc, log):
    """Augment (coprocessor + decoder over N_L latents) vs N_L decode steps, after one prompt."""
    case = make_case(bc)
    cfg, dec, trainable, xp = case["cfg"], case["dec"], case["trainable"], case["xp"]
    prompt_len = max(1, cfg.max_seq_len - bc.n_latents - 1)
    logits, cache = prefill(dec, cfg, xp.asarray(case["tokens"][:1, :prompt_len]))
    rng = np.random.default_rng(0)

    def augmented():
        lg, _ = extend(dec, cfg, cache, *augment(trainable, cfg, cache))     # cache + N_L latents
        return sample_next(lg[:, -1], 0.0, rng)                              # next token, on the host

    def autoregressive():
        return decode(dec, cfg, cache, logits[:, -1], bc.n_latents)[0]      # N_L decode steps

    aug, seq = [], []
    augmented(), autoregressive()
    for _ in range(bc.latency_repeats):                                     # interleaved
        aug.append(timed(augmented, xp)[0])
        seq.append(timed(autoregressive, xp)[0])
    log(f"latency: augment {median(aug) * 1e3:.1f} ms, "
        f"{bc.n_latents} decode steps {median(seq) * 1e3:.1f} ms")
    return {"augment_latency_s": median(aug), "autoregressive_latency_s": median(seq),
            "latency_prompt_tokens": prompt_len, "latency_batch": 1,
            "latency_ratio": median(a / s for a, s in zip(aug, seq))}


def measure_memory(bc, threads, log):
    """Peak memory of one train step at each K in memory_traces, each in a fresh subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REFIMPL_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if threads:
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    by_k = {}
    for k in bc.memory_traces:
        conf = json.dumps({**asdict(replace(bc, n_traces=k)), "memory_traces": []})
        proc = subprocess.run([sys.executable, str(HERE), conf], env=env, capture_output=True, text=True,
                              check=False)
        require(proc.returncode == 0, f"the memory probe at K={k} failed: {proc.stderr.strip()[-500:]}")
        m = by_k[str(k)] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"memory K={k}: step {m['step_mb']:.0f} MB over a baseline of {m['baseline_rss_mb']:.0f} MB")
    return by_k


def _proc_status_mb(field):
    """A field of /proc/self/status (VmRSS, VmHWM: kB) in MB."""
    return int(Path("/proc/self/status").read_text().split(f"\n{field}:")[1].split()[0]) / 1024


def _memory_probe(conf):
    """In a fresh process: RSS before one train step, and the peak RSS during it: the kernel's high-water
    mark VmHWM, reset just before the step where the kernel allows it (/proc/self/clear_refs). ru_maxrss
    is reported but not used: Linux carries it over from the parent across fork and exec."""
    bc = BenchConfig(**{**conf, "memory_traces": tuple(conf["memory_traces"])})
    case = make_case(bc)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    baseline = _proc_status_mb("VmRSS")
    pool = case["xp"].get_default_memory_pool() if bc.backend == "cupy" else None
    pool_before = 0 if pool is None else pool.total_bytes()
    case["step"]()
    peak = _proc_status_mb("VmHWM")
    out = {"baseline_rss_mb": baseline, "peak_rss_mb": peak, "step_mb": peak - baseline,
           "peak_reset_before_step": reset,
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if pool is not None:                            # CuPy's pool keeps what it allocated: its peak
        out["gpu_step_mb"] = (pool.total_bytes() - pool_before) / 2 ** 20
        out["gpu_before_mb"] = pool_before / 2 ** 20                    # weights, Adam state, the case
    print(json.dumps(out))


def memory_estimates(bc, mem):
    """refimpl.memory's estimate beside each measured peak: the whole process on a CPU (VmHWM), the
    device arrays on a GPU (the pool's growth during the step, against the estimate without the
    process allowance)."""
    cfg = get_preset(bc.preset)
    itemsize = get_dtype(bc.dtype)().itemsize
    est = {k: memory.train_step(cfg, bc.batch_size, cfg.max_seq_len, int(k), bc.n_latents, bc.n_ahead,
                                itemsize=itemsize).total / 2**20 for k in mem}
    if bc.backend == "cupy":
        est = {k: v - memory.PROCESS_BYTES / 2**20 for k, v in est.items()}
        measured = {k: v["gpu_step_mb"] + v.get("gpu_before_mb", 0.0) for k, v in mem.items()}
    else:
        measured = {k: v["peak_rss_mb"] for k, v in mem.items()}
    return {"memory_estimate_mb_by_traces": est, "memory_measured_mb_by_traces": measured,
            "memory_estimate_ratio_by_traces": {k: est[k] / measured[k] for k in mem if measured[k]}}


def count_ops(bc, log):
    """Array operations of one training step at this size, counted on the CPU exactly as the backend
    runs it (benchmarks/op_count.py; its case is NumPy, float32, seed 0)."""
    runs = n_context_runs(get_xp(bc.backend))
    case = make_case(replace(bc, backend="numpy", dtype="float32", seed=0))
    n = _sibling("op_count").count_train_step(case, trace_runs=runs)["total"]
    log(f"array operations per step: {n} (trace runs: {runs})")
    return n


# ---------------------------------------------------------------------------------------------
def run_bench(bc, log=lambda m: None):
    """Every figure as one dict (the --json object)."""
    get_xp(bc.backend)                                                      # fails at once without CuPy
    get_dtype(bc.dtype)
    threads = blas_threads(bc.threads) if bc.backend == "numpy" else None
    result = {"preset": bc.preset, "backend": bc.backend, "dtype": bc.dtype, "traces": bc.n_traces,
              "batch_size": bc.batch_size, "n_latents": bc.n_latents, "n_ahead": bc.n_ahead,
              "seq_len": get_preset(bc.preset).max_seq_len, "blas_threads": threads,
              "cpu_count": os.cpu_count(), "load_average_start": _load_average(), "bench_config": asdict(bc)}
    result.update(measure_train_steps(bc, threads or bc.threads, log))
    result.update(measure_per_trace(bc, log))
    result["per_trace_speedup"] = result["per_trace_step_s"] / result["train_step_s"]
    mem = result["memory_probe"] = measure_memory(bc, threads or bc.threads, log)
    step_key = "gpu_step_mb" if bc.backend == "cupy" else "step_mb"
    for field in ["peak_rss_mb", "step_mb"] + (["gpu_step_mb"] if bc.backend == "cupy" else []):
        result[f"{field}_by_traces"] = {k: v[field] for k, v in mem.items()}
    if "32" in mem and "64" in mem:
        result["memory_growth_32_64"] = mem["64"][step_key] / mem["32"][step_key]
    result.update(memory_estimates(bc, mem))
    result.update(measure_latency(bc, log))
    result["array_ops_per_step"] = count_ops(bc, log)
    result["flops_formula"] = FLOPS_FORMULA
    result["load_average_end"] = _load_average()
    result["targets"] = check_targets(result)
    return result


def check_targets(r):
    """Each target: the figure, the bound, met or not (None when not measured)."""
    checks = {}
    for name, (key, op, bound) in TARGETS.items():
        value = r.get(key)
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        checks[name] = {"value": value, "bound": bound, "met": met}
    return checks


def render_table(r):
    """The readable form of run_bench's dict."""
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)
    verdict = {None: "n/a", True: "met", False: "MISSED"}
    latency = f"augment latency (N_L={r['n_latents']})"
    return "\n".join([
        (f"refimpl bench: preset {r['preset']} (T={r['seq_len']}), {r['backend']}, {r['dtype']}, "
         f"B={r['batch_size']}, K={r['traces']}, N_L={r['n_latents']}, N_A={r['n_ahead']}, "
         f"BLAS threads {r['blas_threads']}, load {r['load_average_start']} -> {r['load_average_end']}"),
        "",
        f"  GEMM peak (same run)          {f(r['gemm_peak_gflops'], '.1f')} GFLOP/s",
        (f"  train step (cached form)      {f(r['train_step_s'])} s   "
         f"{f(r['train_step_gflops'], '.1f')} GFLOP/s ({f(r['train_step_gflop'], '.1f')} GFLOP), "
         f"{f(100 * r['fraction_of_peak'], '.0f')}% of peak"),
        f"  torch eager step              {f(r['torch_train_step_s'])} s   "
        + (f"ours / torch = {r['torch_ratio']:.2f}" if r["torch_ratio"] else r["torch_note"] or ""),
        (f"  per-trace form step           {f(r['per_trace_step_s'])} s   "
         f"the cached form is {r['per_trace_speedup']:.1f}x faster"),
        (f"  {latency:30s}{f(r['augment_latency_s'] * 1e3, '.1f')} ms  "
         f"vs {f(r['autoregressive_latency_s'] * 1e3, '.1f')} ms for {r['n_latents']} decode steps "
         f"(ratio {r['latency_ratio']:.2f})"),
        "  step memory by K              " + ", ".join(
            f"K={k}: {v:.0f} MB" for k, v in r["step_mb_by_traces"].items())
        + (f"  (K=32->64: {r['memory_growth_32_64']:.2f}x)" if "memory_growth_32_64" in r else ""),
        "",
        "  targets (set for the demo preset): " + "; ".join(
            f"{name}: {verdict[t['met']]} ({f(t['value'], '.2f')})" for name, t in r["targets"].items()),
    ])


if __name__ == "__main__":                                                 # the memory probe's child
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/bench.py '<BenchConfig as JSON>' (the memory probe's child); "
                 "to benchmark, run `refimpl bench`")
    _memory_probe(json.loads(sys.argv[1]))
