"""The benchmark harness behind `refimpl bench`: how fast the reference is, every figure measured
side by side in ONE run.

    refimpl bench                        # demo preset, NumPy, float32: a readable table
    refimpl bench --json                 # one JSON object (docs/performance.md lists the fields)
    refimpl bench --preset gpu --backend cupy --json      # the GPU figures

It lives outside the package: `refimpl bench` (refimpl/cli.py, which owns the flags) loads this
file by path and calls `run_bench(BenchConfig(...))`. Run as a script, `python benchmarks/bench.py
'<BenchConfig as JSON>'`, it is the memory probe's child: one train step in a fresh process.

A timing alone says little on a busy machine, so every figure comes with the one it is
compared to, measured in the same process: the training step and the large-GEMM peak and the
PyTorch step are timed in interleaved rounds, and the ratios are taken round by round (their
median is reported). The load average before and after is recorded with them.

What is timed (docs/performance.md has the method and the figures):
- train_step_s: `refimpl.training.train.train_step` (the cached form, `loss_cached` + value_and_grad + clip
  + Adam), median;
- per_trace_step_s: value_and_grad of the per-trace form (`loss_per_trace`) at the same K, on a subset of
  the sequences, scaled linearly (its cost is linear in the number of traces), or on all;
- peak_rss_mb_by_traces: one train step at K = 8, 16, 32, 64, each in a fresh subprocess;
- augment_latency_s vs autoregressive_latency_s: one coprocessor call + the decoder over its N_L
  latents vs N_L decode steps, each ending with the next token on the host;
- torch_train_step_s: the same step in PyTorch eager (benchmarks/torch_step.py), same weights.
"""
import ctypes
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

import refimpl
from refimpl import memory
from refimpl.backend import get_dtype, get_xp, to_numpy, trace_runs
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
TORCH_STEP = HERE.parent / "torch_step.py"
REFIMPL_ROOT = Path(refimpl.__file__).resolve().parents[1]  # the child imports this same refimpl

# Targets of issue 7 (demo preset, float32, NumPy, one run); reported as met / missed, never hidden.
TARGETS = {
    "torch_ratio_max": 1.5,          # train_step_s / torch_train_step_s
    "fraction_of_peak_min": 0.25,    # train_step_gflops / gemm_peak_gflops
    "per_trace_speedup_min": 10.0,  # per_trace_step_s / train_step_s at the same K
    "memory_growth_32_64_max": 2.2,  # step memory at K=64 / at K=32
    "latency_ratio_max": 0.3,        # augment_latency_s / autoregressive_latency_s
}

FLOPS_FORMULA = (
    "Model FLOPs of the attention pattern, per layer and slot: 2*(4*D^2 + 3*D*F) for q,k,v,o and "
    "the SwiGLU MLP, plus 4*D*keys for q.k^T and p.v over the keys the slot may see (prefill token "
    "t: t+1; slot j of the group or soft tokens of a trace at p: p+1 context + j+1 own). Per step: "
    "1 x decoder prefill over B*T tokens (no gradient) + 3 x coprocessor over B*K*N_L soft slots "
    "(forward, input and weight gradients) + 2 x decoder over B*K*G group slots, G = N_L+N_A-1 "
    "(forward and input gradient: the frozen decoder's weight gradients are never computed) + "
    "2 x 2*D*V per read-out for the tied LM head (B*K*N_A read-outs); x n_layers except the head. "
    "Not counted: masked-out keys that the blockwise attention still computes, the backward's "
    "recomputation of q.k^T, every elementwise op, gathers, clipping and Adam. "
    "train_step_gflops_if_all_x3 counts the decoder groups and the head x3 as well (the usual "
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
    per_trace_sequences: int = 1         # the per-trace form is timed on this many sequences, then scaled; 0: all
    latency_repeats: int = 7
    gemm_size: int = 0                    # n of the [n, n] @ [n, n] peak; 0: 2048 (NumPy), 8192 (CuPy)
    threads: int = 0                      # 0: leave the BLAS / torch thread count as it is
    torch: bool = True
    seed: int = 0


QUICK = dict(batch_size=2, n_traces=4, n_latents=4, n_ahead=4, rounds=2, memory_traces=(2, 4),
             latency_repeats=2, gemm_size=256)


# ---------------------------------------------------------------------------------------------
# The case: a random decoder of the preset (timing does not depend on trained weights)
def make_case(bc, n_traces=None):
    """Everything one train step needs: dict with cfg, dec, trainable, adam, tc, tokens, positions."""
    xp, dt = get_xp(bc.backend), get_dtype(bc.dtype)
    cfg = get_preset(bc.preset)
    K = n_traces or bc.n_traces
    T = cfg.max_seq_len
    tc = TrainConfig(n_latents=bc.n_latents, n_ahead=bc.n_ahead, n_traces=K, batch_size=bc.batch_size,
                     seq_len=T)
    tc.validate()
    rng = np.random.default_rng(bc.seed)
    dec = init_params(cfg, bc.seed, dt, xp)
    trainable = init_coprocessor(dec, cfg, bc.n_latents, seed=bc.seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(bc.batch_size, T))
    positions = sample_trace_positions(rng, bc.batch_size, T, K, bc.n_ahead)
    return {"cfg": cfg, "dec": dec, "trainable": trainable, "adam": adam_init(trainable), "tc": tc,
            "tokens": tokens, "positions": positions, "xp": xp}


def train_step_fn(case, lr=1e-4):
    """A closure running `train_step` on the case (state carried over); returns the loss. The token
    ids stay on the host: the loss checks them there and moves them to the device itself."""
    tokens = case["tokens"]

    def step():
        case["trainable"], case["adam"], stats = train_step(
            case["dec"], case["trainable"], case["adam"], case["cfg"], case["tc"], tokens,
            case["positions"], lr)
        return stats["loss"]
    return step


# ---------------------------------------------------------------------------------------------
# FLOPs
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
    # the usual "x3 for every part on the gradient path" convention counts the frozen decoder's
    # weight gradients too, which are never computed: reported beside the total, never instead
    x3 = total + (parts["decoder_groups"] + parts["lm_head"]) // 2
    return {**parts, "total": total, "total_if_all_x3": x3}


# ---------------------------------------------------------------------------------------------
# Threads, timing, machine load
def _openblas():
    """(get, set) for the OpenBLAS NumPy links to, or None (another BLAS)."""
    try:
        maps = open("/proc/self/maps").read().split("\n")
    except OSError:
        return None
    libs = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    return get, put
    return None


def blas_threads(n=0):
    """Set NumPy's BLAS threads to n (if n > 0 and OpenBLAS); return the count in use (or None)."""
    fns = _openblas()
    if fns is None:
        return None
    if n > 0:
        fns[1](ctypes.c_int(n))
    return int(fns[0]())


def _sync(xp):
    if xp.__name__ == "cupy":
        xp.cuda.Device().synchronize()


def timed(fn, xp=np, cpu=None):
    """(wall seconds, result) of one call, synchronised on a GPU; appends CPU seconds to cpu."""
    _sync(xp)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(xp)
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


def _torch_threads():
    import torch
    return torch.get_num_threads()


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# The PyTorch step (benchmarks/torch_step.py), when torch is installed
def load_torch_step():
    """The benchmarks/torch_step.py module, or (None, why not)."""
    try:
        import torch  # noqa: F401  (optional)
    except ImportError:
        return None, "torch is not installed"
    if not TORCH_STEP.is_file():
        return None, f"{TORCH_STEP} is missing"
    spec = importlib.util.spec_from_file_location("refimpl_bench_torch_step", TORCH_STEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, None


def make_torch_step(case, bc, threads):
    """A TorchStep on the case's weights (same device kind as the backend), or (None, why not)."""
    module, why = load_torch_step()
    if module is None:
        return None, why
    import torch  # optional: load_torch_step found it
    device = "cpu"
    if bc.backend == "cupy":
        if not torch.cuda.is_available():
            return None, "torch has no CUDA device"
        device = "cuda"
    if threads and device == "cpu":
        torch.set_num_threads(threads)                                     # the same count as BLAS
    host = lambda tree: {k: to_numpy(v) for k, v in tree.items()}  # noqa: E731
    step = module.TorchStep(host(flatten_params(case["dec"])), host(case["trainable"]),
                            case["cfg"].to_dict(), bc.n_latents, bc.n_ahead, device=device,
                            latent_positions=case["tc"].latent_positions)
    return step, None


# ---------------------------------------------------------------------------------------------
# The measurements
def measure_train_steps(bc, threads, log):
    """Interleaved rounds of GEMM peak, our train step and the torch step; medians and ratios."""
    case = make_case(bc)
    xp, dt = case["xp"], get_dtype(bc.dtype)
    step = train_step_fn(case)
    torch_step, torch_note = (None, "--no-torch") if not bc.torch else make_torch_step(case, bc, threads)
    first_loss = step()                                                     # warm-up: the same state
    torch_first = torch_step.step(case["tokens"], case["positions"]) if torch_step else None
    ours, theirs, gemm, ours_cpu, theirs_cpu = [], [], [], [], []
    for r in range(bc.rounds):
        gemm.append(gemm_gflops(xp, dt, bc.gemm_size or (8192 if bc.backend == "cupy" else 2048)))
        ours.append(timed(step, xp, ours_cpu)[0])
        if torch_step:
            theirs.append(timed(lambda: torch_step.step(case["tokens"], case["positions"]), cpu=theirs_cpu)[0])
        log(f"round {r + 1}/{bc.rounds}: step {ours[-1]:.3f}s"
            + (f", torch {theirs[-1]:.3f}s" if theirs else "") + f", GEMM {gemm[-1]:.1f} GFLOP/s")
    flops = step_flops(case["cfg"], bc.batch_size, case["tc"].seq_len, bc.n_traces, bc.n_latents, bc.n_ahead,
                       case["positions"])
    out = {"gemm_peak_gflops": max(gemm), "gemm_gflops_by_round": gemm,
           "train_step_s": statistics.median(ours), "train_step_s_by_round": ours,
           "train_step_gflop": flops["total"] / 1e9, "flops_by_part_gflop": {k: v / 1e9 for k, v in flops.items()},
           "first_step_loss": first_loss, "train_step_cpu_s": statistics.median(ours_cpu)}
    out["train_step_gflops"] = out["train_step_gflop"] / out["train_step_s"]
    out["train_step_gflops_if_all_x3"] = flops["total_if_all_x3"] / 1e9 / out["train_step_s"]
    out["fraction_of_peak"] = statistics.median(
        out["train_step_gflop"] / s / g for s, g in zip(ours, gemm))       # same-round GEMM
    out["torch_train_step_s"] = statistics.median(theirs) if theirs else None
    out["torch_train_step_s_by_round"] = theirs or None
    out["torch_train_step_cpu_s"] = statistics.median(theirs_cpu) if theirs_cpu else None
    out["torch_note"] = torch_note
    out["torch_threads"] = _torch_threads() if torch_step else None
    out["torch_first_step_loss"] = torch_first
    out["torch_loss_abs_diff"] = None if torch_first is None else abs(torch_first - first_loss)
    out["torch_ratio"] = statistics.median(a / b for a, b in zip(ours, theirs)) if theirs else None
    return out


def measure_per_trace(bc, log):
    """The per-trace form's value_and_grad at the same K on `per_trace_sequences` sequences, scaled to B."""
    case = make_case(bc)
    n = bc.batch_size if bc.per_trace_sequences <= 0 else min(bc.per_trace_sequences, bc.batch_size)
    xp = case["xp"]

    def grad(tokens, positions):
        loss, _, _ = value_and_grad(lambda t: loss_per_trace(
            case["dec"], t, case["cfg"], xp.asarray(tokens), positions, bc.n_latents, bc.n_ahead)[0],
            case["trainable"])
        return float(to_numpy(loss))
    grad(case["tokens"][:1], case["positions"][:1, :1])                     # warm-up: one trace
    seconds, _ = timed(lambda: grad(case["tokens"][:n], case["positions"][:n]), xp)
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
        lg, _ = extend(dec, cfg, cache, augment(trainable, cfg, cache))      # cache + N_L latents
        return sample_next(lg[:, -1], 0.0, rng)                              # next token, on the host

    def autoregressive():
        return decode(dec, cfg, cache, logits[:, -1], bc.n_latents)[0]    # N_L decode steps

    aug, seq = [], []
    augmented(), autoregressive()
    for _ in range(bc.latency_repeats):                                     # interleaved
        aug.append(timed(augmented, xp)[0])
        seq.append(timed(autoregressive, xp)[0])
    out = {"augment_latency_s": statistics.median(aug), "autoregressive_latency_s": statistics.median(seq),
           "latency_prompt_tokens": prompt_len, "latency_batch": 1}
    out["latency_ratio"] = statistics.median(a / s for a, s in zip(aug, seq))
    log(f"latency: augment {out['augment_latency_s'] * 1e3:.1f} ms, "
        f"{bc.n_latents} decode steps {out['autoregressive_latency_s'] * 1e3:.1f} ms")
    return out


def measure_memory(bc, threads, log):
    """Peak memory of one train step at each K in memory_traces, each in a fresh subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REFIMPL_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if threads:
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    by_k = {}
    for k in bc.memory_traces:
        conf = json.dumps({**asdict(replace(bc, n_traces=k)), "memory_traces": []})
        proc = subprocess.run([sys.executable, str(HERE), conf], env=env,
                              capture_output=True, text=True)
        require(proc.returncode == 0, f"the memory probe at K={k} failed: {proc.stderr.strip()[-500:]}")
        by_k[str(k)] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"memory K={k}: step {by_k[str(k)]['step_mb']:.0f} MB over a baseline of "
            f"{by_k[str(k)]['baseline_rss_mb']:.0f} MB")
    return by_k


def _memory_probe(conf):
    """In a fresh process: RSS before one train step, and the peak RSS during it.

    The peak is the kernel's high-water mark of this process image (VmHWM), reset to the
    current RSS just before the step where the kernel allows it (/proc/self/clear_refs).
    ru_maxrss is reported too, but it is not used: Linux carries it over from the parent
    process across fork and exec, so it can show the parent's size.
    """
    bc = BenchConfig(**{**conf, "memory_traces": tuple(conf["memory_traces"])})
    case = make_case(bc)
    step = train_step_fn(case)
    gc.collect()
    reset = _reset_peak_rss()
    baseline = _proc_status_mb("VmRSS")
    pool = case["xp"].get_default_memory_pool() if bc.backend == "cupy" else None
    pool_before = 0 if pool is None else pool.total_bytes()
    step()
    peak = _proc_status_mb("VmHWM")
    out = {"baseline_rss_mb": baseline, "peak_rss_mb": peak, "step_mb": peak - baseline,
           "peak_reset_before_step": reset,
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if pool is not None:                            # CuPy's pool keeps what it allocated: its peak
        out["gpu_step_mb"] = (pool.total_bytes() - pool_before) / 2 ** 20
        out["gpu_before_mb"] = pool_before / 2 ** 20                    # weights, Adam state, the case
    print(json.dumps(out))


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024                         # kB
    raise OSError(f"/proc/self/status has no {field}")


# ---------------------------------------------------------------------------------------------
def run_bench(bc, log=lambda m: None):
    """Every figure as one dict (the --json object)."""
    get_xp(bc.backend)                                                      # fails at once without CuPy
    get_dtype(bc.dtype)
    threads = blas_threads(bc.threads) if bc.backend == "numpy" else None
    result = {"preset": bc.preset, "backend": bc.backend, "dtype": bc.dtype, "traces": bc.n_traces,
              "batch_size": bc.batch_size, "n_latents": bc.n_latents, "n_ahead": bc.n_ahead,
              "blas_threads": threads, "cpu_count": os.cpu_count(), "load_average_start": _load(),
              "bench_config": asdict(bc)}
    result["seq_len"] = get_preset(bc.preset).max_seq_len
    result.update(measure_train_steps(bc, threads or bc.threads, log))
    result.update(measure_per_trace(bc, log))
    result["per_trace_speedup"] = result["per_trace_step_s"] / result["train_step_s"]
    mem = measure_memory(bc, threads or bc.threads, log)
    result["peak_rss_mb_by_traces"] = {k: v["peak_rss_mb"] for k, v in mem.items()}
    result["step_mb_by_traces"] = {k: v["step_mb"] for k, v in mem.items()}
    result["memory_probe"] = mem
    key = "step_mb"
    if bc.backend == "cupy":
        key = "gpu_step_mb"
        result["gpu_step_mb_by_traces"] = {k: v[key] for k, v in mem.items()}
    if "32" in mem and "64" in mem:
        result["memory_growth_32_64"] = mem["64"][key] / mem["32"][key]
    result.update(memory_estimates(bc, mem))
    result.update(measure_latency(bc, log))
    result["array_ops_per_step"] = count_ops(bc, log)
    result["flops_formula"] = FLOPS_FORMULA
    result["load_average_end"] = _load()
    result["targets"] = check_targets(result)
    return result


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
    """Array operations of one training step at this preset and size, counted on the CPU exactly as
    the backend runs it (benchmarks/op_count.py)."""
    spec = importlib.util.spec_from_file_location("refimpl_bench_op_count", Path(__file__).with_name("op_count.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = trace_runs(get_xp(bc.backend))
    n = module.count_train_step(bc.preset, bc.batch_size, bc.n_traces, bc.n_latents, bc.n_ahead, trace_runs=runs)
    log(f"array operations per step: {n['total']} (trace runs: {runs})")
    return n["total"]


def check_targets(r):
    """Each issue-7 target: the figure, the bound, met or not (None when not measured)."""
    def target(value, bound, op):
        return {"value": value, "bound": bound,
                "met": None if value is None else (value <= bound if op == "<=" else value >= bound)}
    return {
        "train_step <= 1.5 x torch": target(r.get("torch_ratio"), TARGETS["torch_ratio_max"], "<="),
        ">= 25% of GEMM peak": target(r.get("fraction_of_peak"), TARGETS["fraction_of_peak_min"], ">="),
        "cached >= 10 x per-trace": target(r.get("per_trace_speedup"), TARGETS["per_trace_speedup_min"], ">="),
        "memory K=32->64 <= 2.2x": target(r.get("memory_growth_32_64"), TARGETS["memory_growth_32_64_max"], "<="),
        "augment <= 0.3 x autoregressive": target(r.get("latency_ratio"), TARGETS["latency_ratio_max"], "<="),
    }


def render_table(r):
    """The readable form of run_bench's dict."""
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)
    lines = [
        f"refimpl bench: preset {r['preset']} (T={r['seq_len']}), {r['backend']}, {r['dtype']}, "
        f"B={r['batch_size']}, K={r['traces']}, N_L={r['n_latents']}, N_A={r['n_ahead']}, "
        f"BLAS threads {r['blas_threads']}, load {r['load_average_start']} -> {r['load_average_end']}",
        "",
        f"  GEMM peak (same run)          {f(r['gemm_peak_gflops'], '.1f')} GFLOP/s",
        f"  train step (cached form)      {f(r['train_step_s'])} s   "
        f"{f(r['train_step_gflops'], '.1f')} GFLOP/s ({f(r['train_step_gflop'], '.1f')} GFLOP), "
        f"{f(100 * r['fraction_of_peak'], '.0f')}% of peak",
        f"  torch eager step              {f(r['torch_train_step_s'])} s   "
        + (f"ours / torch = {r['torch_ratio']:.2f}" if r["torch_ratio"] else r["torch_note"] or ""),
        f"  per-trace form step           {f(r['per_trace_step_s'])} s   "
        f"the cached form is {r['per_trace_speedup']:.1f}x faster",
        f"  {'augment latency (N_L=%d)' % r['n_latents']:30s}{f(r['augment_latency_s'] * 1e3, '.1f')} ms  "
        f"vs {f(r['autoregressive_latency_s'] * 1e3, '.1f')} ms for {r['n_latents']} decode steps "
        f"(ratio {r['latency_ratio']:.2f})",
        "  step memory by K              " + ", ".join(
            f"K={k}: {v:.0f} MB" for k, v in r["step_mb_by_traces"].items())
        + (f"  (K=32->64: {r['memory_growth_32_64']:.2f}x)" if "memory_growth_32_64" in r else ""),
        "",
        "  targets (set for the demo preset): " + "; ".join(
            f"{name}: {_verdict(t['met'])} ({f(t['value'], '.2f')})" for name, t in r["targets"].items()),
    ]
    return "\n".join(lines)


def _verdict(met):
    return "n/a" if met is None else ("met" if met else "MISSED")


if __name__ == "__main__":                                                 # the memory probe's child
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/bench.py '<BenchConfig as JSON>' (the memory probe's child); "
                 "to benchmark, run `refimpl bench`")
    _memory_probe(json.loads(sys.argv[1]))
