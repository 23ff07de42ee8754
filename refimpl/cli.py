"""The command line, `refimpl COMMAND ...`: the only module that knows flags. Each command is a pair:
`_X_args(parser)` declares its flags, `_X(args)` calls the library. A user error is ONE line on stderr,
`refimpl: error: ...` (the library's `seq_len=999` shown as `--seq-len 999`), exit 2."""
import argparse
import importlib.util
import json
import re
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from . import __version__
from .backend import BACKENDS, DTYPES
from .config import PRESETS, get_preset
from .errors import RefimplError, require

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
MAX_INT = 2**31 - 1  # larger counts only end in an out-of-memory or NumPy size error
TRAIN_SIZES = ("batch_size", "seq_len", "n_traces", "n_latents", "n_ahead")  # the memory model's step sizes
HELP = {  # the help of flags several commands share; each command adds its default
    "preset": "model size", "dtype": "parameter dtype", "batch_size": "sequences per batch",
    "steps": "optimizer steps in the whole run, which set the LR schedule", "lr": "peak learning rate",
    "seq_len": "tokens per sequence (0: the decoder's max_seq_len)", "clip": "max global gradient norm",
    "warmup": "linear warmup steps; cosine decay to 0.1 x lr follows",
    "weight_decay": "decoupled (AdamW) weight decay on weight matrices",
    "eval_every": "held-out loss every N steps, and at the end (0: only at the end)",
    "eval_batches": "held-out batches per evaluation", "seed": "seed of the init and of the batch sampler",
    "n_latents": "latent embeddings N_L written per augmentation point",
    "n_ahead": "tokens N_A after each augmentation point that the loss scores",
    "n_traces": "augmentation points (traces) K per sequence",
    "init": "coprocessor init: a copy of the decoder, or random (the ablation)",
    "mode": "what trains: the coprocessor, or the pause-token baseline",
    "latent_positions": "position ids of the latents: behind the augmentation point (max(0, p-N_L+1)..p, the "
                        "method) or after it (p+1..p+N_L, the ablation); docs/method.md C8",
    "horizon": "ahead positions scored (0: 2 x the largest N_A)", "limit": "reasoning prompts used (0: all)",
    "skip_windows": "held-out windows skipped first (64: past every training-time evaluation)",
    "split": "reasoning prompts ('long': 3..5-digit answers only; 'fewshot': few-shot prompts for an LLM)",
    "prompt_batch": "prompts decoded together (left-padded)", "max_new_tokens": "tokens decoded per prompt",
    "latency_repeats": "timed repeats of each latency measurement",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line: refimpl: error: <what>; see --help."""
    def error(self, message):
        raise RefimplError(f"{message} (see `{self.prog} --help`)")


def _bounded(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if kind is int and value > MAX_INT:
            raise argparse.ArgumentTypeError(f"must be at most {MAX_INT}, got {text!r}")
        return value
    return parse


positive_int = _bounded(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _bounded(float, lambda v: 0 < v < float("inf"), "a positive number")
nonneg_float = _bounded(float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def _table_args(p, kinds, defaults, helps=None, given_only=False):
    """A flag per item of kinds (a type or a tuple of choices); its help (helps or HELP) names its default."""
    for name, kind in kinds.items():
        choices = kind if isinstance(kind, tuple) else None
        p.add_argument("--" + name.replace("_", "-"), type=None if choices else kind, choices=choices,
                       default=None if given_only else defaults[name],
                       help=f"{(helps or {}).get(name, HELP.get(name))} (default {defaults[name]})")


def _model_args(p, decoder=True, dtype=True):
    """The flags of the decoder a command runs, and where."""
    if decoder:
        p.add_argument("--decoder", help="frozen decoder checkpoint (.npz), or the name of a fetched model "
                       "(default: the shipped decoder)")
    p.add_argument("--backend", choices=BACKENDS, default="numpy", help="numpy or cupy (GPU) (default numpy)")
    if dtype:
        p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                       help="dtype of the arrays (default float32)")


def _run_args(p):
    """The flags of a training run that saves and resumes."""
    p.add_argument("--resume", action="store_true", help="resume the run saved in --out exactly")
    p.add_argument("--stop-after", type=positive_int, metavar="STEP", help="stop (and save) after this step, "
                   "keeping the schedule of --steps; go on later with --resume (default: run to --steps)")


def _force_arg(p):
    p.add_argument("--force", action="store_true", help="skip the memory pre-flight: run even when the "
                   "estimated peak memory exceeds what is available (the kernel may then kill the run)")


def _decoder_path(args):
    from .data.corpus import SHIPPED_DECODER
    from .data.pretrained import decoder_file
    return decoder_file(args.decoder) if args.decoder else SHIPPED_DECODER  # a name: the fetched model


def _decoder_config(args, key="config"):
    """The decoder checkpoint's ModelConfig from its JSON alone (None if unreadable: loading reports it);
    key="model": the name of the pretrained LLM it was converted from (None for a decoder refimpl trained)."""
    from .config import ModelConfig
    from .files import read_json
    from .training.checkpoint import checkpoint_paths
    try:
        meta = read_json(checkpoint_paths(_decoder_path(args))[1], "", "")
        return ModelConfig.from_dict(meta["config"]) if key == "config" else meta.get(key)
    except (OSError, KeyError, TypeError, AttributeError, RefimplError):
        return None


def _data_args(p):
    from .data.corpus import SOURCES
    p.add_argument("--data", choices=SOURCES, help="the source of the training and held-out windows: the "
                   "English text, the reasoning lines, or their mixture (default: text with a pretrained LLM "
                   "as --decoder, mixture with a decoder refimpl trained, which learnt the mixture)")


def _data(args):
    return args.data or ("text" if _decoder_config(args, "model") else "mixture")


def _check_memory(args, estimate, cfg, adjustable=(), itemsize=None, **sizes):
    """Refuse, before anything is allocated or written, a run whose estimated peak memory estimate(cfg,
    **sizes) cannot fit; a seq_len of 0 (or None) is cfg's max_seq_len, no cfg (a bad decoder) skips it."""
    from .memory import check_fits
    if cfg is not None:
        itemsize = itemsize or (8 if getattr(args, "dtype", None) == "float64" else 4)
        if "seq_len" in sizes:
            sizes["seq_len"] = sizes["seq_len"] or cfg.max_seq_len
        check_fits(lambda **k: estimate(cfg, itemsize=itemsize, **k), sizes, list(adjustable),
                   getattr(args, "backend", "numpy"), args.force)


def _demo_args(p):
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smaller version that takes under a minute")
    _model_args(p, dtype=False)


def _demo(args):
    from .demo import plan, run_demo
    from .memory import train_step
    largest = max((tc for _, tc in plan(args.quick, args.backend)),
                  key=lambda tc: tc.n_latents * tc.n_traces * tc.batch_size)
    _check_memory(args, train_step, _decoder_config(args), **{k: getattr(largest, k) for k in TRAIN_SIZES})
    run_demo(args.out, args.quick, _decoder_path(args), args.backend)


def _pretrain_args(p):
    from .training.pretrain import DEFAULTS
    # every value is None unless given: a resumed run keeps its own, and a changed one is refused
    _table_args(p, {"preset": tuple(PRESETS), "steps": positive_int, "batch_size": positive_int,
                    "seq_len": positive_int, "lr": positive_float, "warmup": nonneg_int,
                    "weight_decay": nonneg_float, "clip": nonneg_float, "eval_every": positive_int,
                    "eval_batches": positive_int, "save_every": positive_int, "seed": nonneg_int,
                    "dtype": tuple(DTYPES)},
                {**DEFAULTS, "seq_len": "the preset's max_seq_len", "warmup": "min(100, steps/10)"},
                {"steps": HELP["steps"] + "; may be raised on --resume", "seq_len": "tokens per sequence",
                 "clip": "max global gradient norm, 0 = off",
                 "save_every": "checkpoint every N steps, and at the end",
                 "eval_every": "held-out loss every N steps, and at the end"}, given_only=True)
    _model_args(p, decoder=False, dtype=False)
    p.add_argument("--out", help="output directory (default runs/pretrain-<preset>)")
    _run_args(p)


def _pretrain(args):
    from .files import run_lock
    from .memory import pretrain_step
    from .training.pretrain import DEFAULTS, pretrain
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    preset = given.get("preset", DEFAULTS["preset"])
    _check_memory(args, pretrain_step, get_preset(preset), ["batch_size", "seq_len"],
                  batch_size=given.get("batch_size", DEFAULTS["batch_size"]), seq_len=given.get("seq_len"))
    out = args.out or f"runs/pretrain-{preset}"
    with run_lock(out):  # a second run into the same --out is refused
        pretrain(out, resume=args.resume, stop_after=args.stop_after, backend=args.backend, **given)


def _train_args(p):
    from .core.coprocessor import INITS, MODES
    from .core.layout import LATENT_POSITIONS
    from .training.train import TrainConfig
    p.add_argument("--out", required=True, help="output directory")
    _table_args(p, {**dict.fromkeys(("n_latents", "n_ahead", "n_traces", "batch_size", "eval_batches"),
                                    positive_int),
                    **dict.fromkeys(("seq_len", "steps", "warmup", "seed", "eval_every"), nonneg_int),
                    "lr": positive_float, "weight_decay": nonneg_float, "clip": positive_float,
                    "init": INITS, "mode": MODES, "latent_positions": LATENT_POSITIONS}, vars(TrainConfig()))
    _data_args(p)
    _model_args(p)
    _run_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _train(args):
    from .files import run_lock
    from .memory import train_step
    from .training.train import TrainConfig, train
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "data"},
                     data=_data(args))
    _check_memory(args, lambda cfg, **k: train_step(cfg, mode=tc.mode, **k), _decoder_config(args),
                  ["n_latents", "batch_size", "n_traces", "n_ahead", "seq_len"],
                  **{k: getattr(tc, k) for k in TRAIN_SIZES})
    with run_lock(args.out):  # a second run into the same --out is refused
        m = train(_decoder_path(args), tc, args.out, args.backend, args.dtype, args.resume, args.quiet,
                  args.stop_after)
    print(f"held-out ahead-token loss: decoder alone {m['baseline_heldout_loss']:.4f}, "
          f"augmented {m['augmented_heldout_loss']:.4f} "
          f"(position 1: {m['relative_ppl_change_pct'][0]:+.2f}% perplexity)")
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'coprocessor.npz'}")


def _golden_args(parser):
    from .golden.state import SETUP
    sub = parser.add_subparsers(dest="golden_command", metavar="ACTION", parser_class=_Parser)
    what = "compute the golden vectors and write DIR/manifest.json and DIR/tensors.npz (deterministic)"
    p = sub.add_parser("export", help=what, description=what)
    p.add_argument("dir", help="output directory (e.g. tiny_data/golden/default)")
    p.add_argument("--seed", type=nonneg_int, default=SETUP["seed"],
                   help=f"seed of the golden state (default {SETUP['seed']}, the committed sets)")
    p.add_argument("--latent-positions", choices=("behind", "after"), default="behind",
                   help="the latents' position ids (default behind, the method; after: the ablation, "
                        "the committed set tiny_data/golden/latents-after)")
    p.add_argument("--gqa", action="store_true", help="the grouped-query state (4 query heads, 2 key/value "
                   "heads; the committed set tiny_data/golden/gqa) instead of the multi-head one")
    _force_arg(p)
    p = sub.add_parser("verify", help="check refimpl (or another implementation) against DIR",
                       description="Recompute every output from DIR's inputs and compare, or with --actual "
                                   "compare another implementation's tensors. DIR holds one set or one "
                                   "subfolder per set (default, gqa, latents-after). Exit 1 on any mismatch.")
    p.add_argument("dir", help="golden directory (e.g. tiny_data/golden)")
    p.add_argument("--actual", metavar="FILE.npz", help="another implementation's outputs, with the golden "
                   "names (default: none, refimpl recomputes every output)")


def _golden(args):
    from .golden.spec import MANIFEST, TENSORS, export
    from .golden.verify import verify_all
    command = getattr(args, "golden_command", None)
    require(command in ("export", "verify"), "golden needs an action: `refimpl golden export DIR` "
            "or `refimpl golden verify DIR [--actual FILE.npz]`")
    if command == "verify":
        return 0 if verify_all(args.dir, args.actual) else 1
    from .golden.state import SETUP, golden_config
    from .memory import train_step
    _check_memory(args, train_step, golden_config(SETUP), itemsize=8, **{k: SETUP[k] for k in TRAIN_SIZES})
    require(args.dir.strip(), "golden export needs a directory to write: pass DIR, e.g. tiny_data/golden/default")
    manifest = export(args.dir, seed=args.seed, latent_positions=args.latent_positions, gqa=args.gqa)
    size = sum((Path(args.dir) / f).stat().st_size for f in (MANIFEST, TENSORS))
    print(f"wrote {len(manifest['tensors'])} tensors to {args.dir}/{TENSORS} and {args.dir}/{MANIFEST} "
          f"({size / 1024:.0f} KiB)")


def _eval_args(p):
    from .data.corpus import EVAL_SPLITS
    from .evaluation.runner import EvalConfig
    p.add_argument("--coprocessor", action="append", default=[], metavar="PATH", help="coprocessor "
                   "checkpoint or run directory; repeatable (default: none, the decoder alone)")
    p.add_argument("--runs", metavar="DIR", help="a folder of runs, subfolders with coprocessor.npz "
                   "(default: none)")
    p.add_argument("--out", help="write report.json, report.md and plots here (default: print the report)")
    p.add_argument("--no-plots", action="store_true", help="write no plots into --out")
    _table_args(p, {**dict.fromkeys(("eval_batches", "batch_size", "n_traces", "prompt_batch",
                                     "max_new_tokens", "latency_repeats"), positive_int),
                    **dict.fromkeys(("seq_len", "horizon", "limit", "seed", "skip_windows"), nonneg_int),
                    "split": EVAL_SPLITS}, vars(EvalConfig()), {"seed": "seed of the held-out points"})
    _data_args(p)
    p.add_argument("--delays", type=nonneg_int, nargs="+", default=list(EvalConfig.delays),
                   help=f"Table 8 delays (default {' '.join(map(str, EvalConfig.delays))})")
    _model_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _eval(args):
    from .evaluation.plots import make_plots
    from .evaluation.report import render_markdown, write_report
    from .evaluation.runner import EvalConfig, evaluate_runs, run_paths
    from .memory import evaluation
    ec = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)
                       if f.name not in ("delays", "data")}, delays=tuple(args.delays), data=_data(args))
    _check_memory(args, evaluation, _decoder_config(args), ["batch_size", "n_traces"],
                  batch_size=ec.batch_size, seq_len=ec.seq_len, n_traces=ec.n_traces, n_latents=64,
                  horizon=ec.horizon or 32)
    log = (lambda m: None) if args.quiet else (lambda m: print(f"eval: {m}", file=sys.stderr, flush=True))
    report, runs = evaluate_runs(_decoder_path(args), run_paths(args.coprocessor, args.runs), ec,
                                 args.backend, args.dtype, log)
    report["config"]["arguments"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    if args.out is not None and not args.no_plots:
        report["plots"] = [str(p) for p in make_plots(report, runs, args.out)]
    written = write_report(report, args.out) if args.out is not None else []
    print(render_markdown(report))
    if written:
        print(f"wrote {', '.join(map(str, written + report.get('plots', [])))}")


def _generate_args(p):
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (prompts of any lengths, left-padded)")
    p.add_argument("--coprocessor", help="coprocessor checkpoint or run directory; if missing or unusable, "
                   "decoding falls back to the decoder alone with a warning (default: none)")
    _table_args(p, {"max_new_tokens": nonneg_int, "temperature": nonneg_float, "seed": nonneg_int,
                    "delay": nonneg_int}, {"max_new_tokens": 32, "temperature": 0.0, "seed": 0, "delay": 0},
                {"temperature": "sampling temperature, 0 = greedy", "seed": "seed of the sampler",
                 "delay": "asynchronous use: the coprocessor runs in a background thread and its latents are "
                          "appended after N new tokens"})
    p.add_argument("--stop-at-newline", action="store_true", help="end each completion at a newline")
    _model_args(p)


def _generate(args):
    from .evaluation.generate import generate_from_files
    from .memory import generation
    bad = [p for p in args.prompt if any("\ud800" <= c <= "\udfff" for c in p)]  # bytes that are not UTF-8
    require(not bad, f"--prompt {bad[:1]} is not UTF-8 text (the shell passed other bytes): pass UTF-8")
    prompt_len = 1 + max(len(p.encode()) for p in args.prompt)  # at most one token per byte, + eot
    _check_memory(args, generation, _decoder_config(args), ["max_new_tokens"], batch_size=len(args.prompt),
                  prompt_len=prompt_len, max_new_tokens=args.max_new_tokens, n_latents=64)
    texts = generate_from_files(_decoder_path(args), args.coprocessor, args.prompt, args.backend, args.dtype,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                seed=args.seed, delay=args.delay, stop_at_newline=args.stop_at_newline)
    print("\n\n".join(p + t for p, t in zip(args.prompt, texts)))


def _bench_args(p):
    p.add_argument("--preset", choices=list(PRESETS), default="demo", help="model size (default demo)")
    _model_args(p, decoder=False)
    # None unless given: --quick's sizes, then the flags given, replace BenchConfig's defaults
    _table_args(p, {**dict.fromkeys(("traces", "batch_size", "rounds"), positive_int),
                    "per_trace_sequences": nonneg_int},
                {"traces": 32, "batch_size": 8, "rounds": 5, "per_trace_sequences": 1},
                {"traces": "K of the step timing", "batch_size": "B of the step timing",
                 "rounds": "timed rounds",
                 "per_trace_sequences": "time the per-trace form on this many sequences and scale (0: all)"},
                given_only=True)
    p.add_argument("--memory-traces", type=lambda k: None if k == "none" else positive_int(k), nargs="*",
                   metavar="K", help="K values of the memory probe; none (or no value) to skip "
                   "(default 8 16 32 64)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="BLAS and torch threads (default 0: as is)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def load_bench():
    """The benchmark harness, benchmarks/bench.py of the source tree (outside the package)."""
    require(BENCH.is_file(), f"{BENCH} is missing: `refimpl bench` runs from a source checkout of refimpl "
                             "(git clone, then pip install -e .)")
    spec = importlib.util.spec_from_file_location("refimpl_benchmarks_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(args):
    from .memory import train_step
    bench = load_bench()
    bc = bench.BenchConfig(preset=args.preset, backend=args.backend, dtype=args.dtype, threads=args.threads,
                           torch=not args.no_torch)
    bc = replace(bc, **bench.QUICK) if args.quick else bc
    given = {"n_traces": args.traces, "batch_size": args.batch_size, "rounds": args.rounds,
             "per_trace_sequences": args.per_trace_sequences,
             "memory_traces": None if args.memory_traces is None else tuple(filter(None, args.memory_traces))}
    bc = replace(bc, **{k: v for k, v in given.items() if v is not None})
    flag = "--traces" if bc.n_traces >= max(bc.memory_traces, default=0) else "--memory-traces"
    try:                                          # bench's own flag for the estimate's n_traces
        _check_memory(args, train_step, get_preset(bc.preset), ["batch_size", "n_traces"],
                      batch_size=bc.batch_size, seq_len=0, n_latents=bc.n_latents, n_ahead=bc.n_ahead,
                      n_traces=max((bc.n_traces, *bc.memory_traces)))
    except RefimplError as e:
        raise RefimplError(str(e).replace("n_traces=", flag + " ")) from None
    log = (lambda m: None) if args.json else (lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
    result = bench.run_bench(bc, log)
    print(json.dumps(result) if args.json else bench.render_table(result))


def _fetch_args(p):
    from .data.pretrained import CACHE_ENV, MODELS
    p.add_argument("name", choices=list(MODELS), help=f"the model; it is cached in ${CACHE_ENV} "
                   "(default ~/.cache/refimpl) and then usable as --decoder NAME")


def _fetch(args):
    from .llm.fetch import fetch
    path = fetch(args.name, log=lambda m: print(f"fetch: {m}", file=sys.stderr, flush=True))
    print(f"{args.name}: {path} (use it with --decoder {args.name})")


COMMANDS = {  # name: (help, declare flags, run)
    "demo": ("train, evaluate and report the paper's tables at tiny scale (the main job)", _demo_args, _demo),
    "pretrain": ("train the decoder from scratch on the pretraining mixture", _pretrain_args, _pretrain),
    "train": ("train a coprocessor (or pause tokens) against a frozen decoder", _train_args, _train),
    "golden": ("export or verify golden vectors for other implementations", _golden_args, _golden),
    "eval": ("the paper's tables on held-out data for a decoder and coprocessor runs", _eval_args, _eval),
    "generate": ("complete prompts, optionally with a coprocessor (and --delay)", _generate_args, _generate),
    "fetch": ("download a pretrained LLM, converted once to a frozen decoder", _fetch_args, _fetch),
    "bench": ("time the train step, the per-trace form, memory and latency vs PyTorch", _bench_args, _bench),
}


def build_parser():
    parser = _Parser(prog="refimpl", description="Differentiable cache augmentation (Liu et al., ICML 2025): "
                     "a NumPy + autograd reference implementation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.add_argument("--version", action="version", version=f"refimpl {__version__}")
    for name, (help_text, declare, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        declare(p)
        if name not in ("golden", "fetch"):  # golden export has its own; fetch allocates nothing
            _force_arg(p)
        p.set_defaults(_run=run, _parser=p)
    return parser


def main(argv=None):
    """Parse argv, run the command; return the exit status (2 on a user error)."""
    parser, args = build_parser(), None
    try:
        args = parser.parse_args(argv)
        require(args.command is not None, f"a command is required, one of {', '.join(COMMANDS)} "
                                          "(see `refimpl --help`)")
        with np.errstate(all="ignore"):   # overflow is caught where it matters: no non-finite result passes
            status = args._run(args)
        return 0 if status is None else int(status)
    except RefimplError as e:
        message = " ".join(str(e).split()).replace("force=True", "--force")  # golden export's too
        for action in getattr(getattr(args, "_parser", None), "_actions", []):  # seq_len=9 -> --seq-len 9
            if action.option_strings:
                message = re.sub(rf"(?<![\w-]){action.dest}=", action.option_strings[-1] + " ", message)
    except OSError as e:  # a path that cannot be read or written: no permission, a file for a dir, disk full
        message = (f"cannot use{f' {e.filename}' if e.filename else ''}: {e.strerror or e}; check the path, "
                   "its permissions and the free disk space")
    except UnicodeEncodeError as e:  # printing to a terminal or pipe that cannot show the text
        message = (f"cannot print {e.object[e.start:e.end]!r} in the {e.encoding} encoding: set "
                   "PYTHONIOENCODING=utf-8")
    except MemoryError:
        message = "out of memory: use a smaller --batch-size, --seq-len, --prompt-batch or model preset"
    except KeyboardInterrupt:
        message = "interrupted"
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    print(f"refimpl: error: {message}", file=sys.stderr)
    return 2
