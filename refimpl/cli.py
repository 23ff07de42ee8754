"""The command line, `refimpl COMMAND ...` (also `python -m refimpl`): the only module that knows flags.

Each command is a pair: `_X_args(parser)` declares its flags, `_X(args)` calls the library. The
library names a bad value by its parameter name (`seq_len=999 exceeds ...`); `main` shows it under
the flag's name (`--seq-len 999 exceeds ...`). Every user error is a RefimplError, printed as ONE
line, `refimpl: error: ...`, on stderr with exit status 2 and no traceback; so are bad arguments,
a path that cannot be read or written (OSError) and running out of memory.
"""
import argparse
import importlib.util
import json
import re
import sys
from dataclasses import fields, replace
from pathlib import Path

from . import __version__
from .backend import BACKENDS, DTYPES
from .config import PRESETS, get_preset
from .errors import RefimplError, require

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
MAX_INT = 2**31 - 1  # larger counts only end in an out-of-memory or NumPy size error


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line: refimpl: error: <what>; see --help."""

    def error(self, message):
        raise RefimplError(f"{message} (see `{self.prog} --help`)")


def _bounded(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if kind is int and value > MAX_INT:
            raise argparse.ArgumentTypeError(f"must be at most {MAX_INT}, got {text!r}")
        return value
    return parse


positive_int = _bounded(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _bounded(float, lambda v: 0 < v < float("inf"), "a positive number")
nonneg_float = _bounded(float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def _flag(name):
    return "--" + name.replace("_", "-")


def _model_args(p, dtype=True):
    """The flags every command that loads a decoder shares."""
    p.add_argument("--decoder", default=None, help="frozen decoder checkpoint (.npz); default: the shipped one")
    p.add_argument("--backend", choices=BACKENDS, default="numpy", help="numpy (CPU) or cupy (GPU)")
    if dtype:
        p.add_argument("--dtype", choices=list(DTYPES), default="float32")


def _dataclass_args(p, config, kinds, helps=None):
    """One flag per dataclass field named in kinds ({field: argparse type}), its default the field's."""
    defaults = {f.name: f.default for f in fields(config)}
    for name, kind in kinds.items():
        p.add_argument(_flag(name), type=kind, default=defaults[name], help=(helps or {}).get(name))


def _force_arg(p):
    p.add_argument("--force", action="store_true", help="skip the memory pre-flight: run even when the "
                   "estimated peak memory exceeds what is available (the kernel may then kill the run)")


def _itemsize(args):
    return 8 if getattr(args, "dtype", None) == "float64" else 4


def _stored_config(path):
    """The ModelConfig in a checkpoint's JSON sidecar, read without loading its arrays (None if unreadable:
    loading the checkpoint then reports the problem)."""
    from .config import ModelConfig
    from .training.checkpoint import checkpoint_paths
    try:
        return ModelConfig.from_dict(json.loads(checkpoint_paths(path)[1].read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError, RefimplError):
        return None


def _preflight(estimate_of, sizes, adjustable, args):
    """Refuse, before anything is allocated or written, a run whose estimated peak memory cannot fit."""
    from .memory import check_fits
    check_fits(estimate_of, sizes, adjustable, getattr(args, "backend", "numpy"), args.force)


def _decoder_path(args):
    from .data.corpus import SHIPPED_DECODER
    from .data.pretrained import decoder_file
    return decoder_file(args.decoder) if args.decoder else SHIPPED_DECODER  # a name: the fetched model


# ---------------------------------------------------------------------------------------------
# demo
def _demo_args(p):
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smaller version that takes under a minute")
    _model_args(p, dtype=False)
    _force_arg(p)


def _demo(args):
    from .demo import plan, run_demo
    from .memory import train_step
    cfg = _stored_config(_decoder_path(args))
    if cfg is not None:
        largest = max((tc for _, tc in plan(args.quick, args.backend)),
                      key=lambda tc: tc.n_latents * tc.n_traces * tc.batch_size)
        _preflight(lambda **k: train_step(cfg, **k), dict(batch_size=largest.batch_size, seq_len=cfg.max_seq_len,
                   n_traces=largest.n_traces, n_latents=largest.n_latents, n_ahead=largest.n_ahead), [], args)
    run_demo(args.out, args.quick, _decoder_path(args), args.backend)


# ---------------------------------------------------------------------------------------------
# pretrain
def _pretrain_args(p):
    from .training.pretrain import DEFAULTS as d
    p.add_argument("--preset", choices=list(PRESETS), help=f"model size (default {d['preset']})")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps in the whole run, which set the LR "
                   f"schedule (default {d['steps']}); may be raised on --resume")
    p.add_argument("--stop-after", type=positive_int, metavar="STEP", help="stop (and save) after this step, "
                   "keeping the schedule of --steps; continue later with --resume")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per step (default {d['batch_size']})")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: the preset's max_seq_len)")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {d['lr']})")
    p.add_argument("--warmup", type=nonneg_int, help="linear warmup steps (default: min(100, steps/10)); "
                   "cosine decay to 0.1 x lr follows")
    p.add_argument("--weight-decay", type=nonneg_float, help=f"decoupled (AdamW) weight decay on weight "
                   f"matrices (default {d['weight_decay']})")
    p.add_argument("--clip", type=nonneg_float, help=f"max global gradient norm, 0 = off (default {d['clip']})")
    p.add_argument("--eval-every", type=positive_int, help=f"held-out loss every N steps (default "
                   f"{d['eval_every']}, and at the end)")
    p.add_argument("--eval-batches", type=positive_int, help=f"val batches per evaluation (default {d['eval_batches']})")
    p.add_argument("--save-every", type=positive_int, help=f"checkpoint every N steps (default {d['save_every']}, "
                   "and at the end)")
    p.add_argument("--seed", type=nonneg_int, help=f"seed of the init and of the batch sampler (default {d['seed']})")
    p.add_argument("--dtype", choices=list(DTYPES), help=f"parameter dtype (default {d['dtype']})")
    p.add_argument("--backend", choices=BACKENDS, default="numpy", help="numpy (CPU) or cupy (GPU)")
    p.add_argument("--out", default=None, help="output directory (default runs/pretrain-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    _force_arg(p)


def _pretrain(args):
    from .config import get_preset
    from .memory import pretrain_step
    from .training.checkpoint import run_lock
    from .training.pretrain import DEFAULTS, pretrain
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    cfg = get_preset(given.get("preset", DEFAULTS["preset"]))
    sizes = dict(batch_size=given.get("batch_size", DEFAULTS["batch_size"]),
                 seq_len=given.get("seq_len") or cfg.max_seq_len)
    _preflight(lambda **k: pretrain_step(cfg, itemsize=8 if given.get("dtype") == "float64" else 4, **k), sizes,
               ["batch_size", "seq_len"], args)
    out = args.out or f"runs/pretrain-{given.get('preset', DEFAULTS['preset'])}"
    with run_lock(out):  # a second run into the same --out is refused
        pretrain(out, resume=args.resume, stop_after=args.stop_after, backend=args.backend, **given)


# ---------------------------------------------------------------------------------------------
# train
def _train_args(p):
    from .core.coprocessor import INITS, MODES
    from .core.layout import LATENT_POSITIONS
    from .training.train import TrainConfig
    p.add_argument("--out", required=True, help="output directory")
    _dataclass_args(p, TrainConfig, {
        **dict.fromkeys(("n_latents", "n_ahead", "n_traces", "batch_size", "eval_batches"), positive_int),
        **dict.fromkeys(("seq_len", "steps", "warmup", "seed", "eval_every"), nonneg_int),
        "lr": positive_float, "weight_decay": nonneg_float, "clip": positive_float})
    d = TrainConfig()
    p.add_argument("--init", choices=INITS, default=d.init,
                   help=f"coprocessor init (default {d.init}): a copy of the decoder, or random (the ablation)")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help=f"what trains (default {d.mode}): the coprocessor, or the pause-token baseline")
    p.add_argument("--latent-positions", choices=LATENT_POSITIONS, default=d.latent_positions,
                   help=f"position ids of the latents (default {d.latent_positions}): behind the augmentation point "
                        "(max(0, p-N_L+1)..p, the method) or after it (p+1..p+N_L, the ablation); docs/method.md C8")
    _model_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="STEP",
                   help="stop (and save) after this step, keeping the schedule of --steps")
    p.add_argument("--quiet", action="store_true")
    _force_arg(p)


def _train(args):
    from .memory import train_step
    from .training.checkpoint import run_lock
    from .training.train import TrainConfig, train
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    cfg = _stored_config(_decoder_path(args))
    if cfg is not None:
        sizes = dict(batch_size=tc.batch_size, seq_len=tc.seq_len or cfg.max_seq_len, n_traces=tc.n_traces,
                     n_latents=tc.n_latents, n_ahead=tc.n_ahead)
        _preflight(lambda **k: train_step(cfg, mode=tc.mode, itemsize=_itemsize(args), **k), sizes,
                   ["n_latents", "batch_size", "n_traces", "n_ahead", "seq_len"], args)
    with run_lock(args.out):  # a second run into the same --out is refused
        m = train(_decoder_path(args), tc, args.out, args.backend, args.dtype, args.resume, args.quiet,
                  args.stop_after)
    print(f"held-out ahead-token loss: decoder alone {m['baseline_heldout_loss']:.4f}, "
          f"augmented {m['augmented_heldout_loss']:.4f} "
          f"(position 1: {m['relative_ppl_change_pct'][0]:+.2f}% perplexity)")
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'coprocessor.npz'}")


# ---------------------------------------------------------------------------------------------
# golden
def _golden_args(parser):
    from .golden.state import SETUP
    sub = parser.add_subparsers(dest="golden_command", metavar="ACTION", parser_class=_Parser)
    p = sub.add_parser("export", help="write DIR/manifest.json and DIR/tensors.npz",
                       description="Compute the golden vectors and write DIR/manifest.json and DIR/tensors.npz "
                                   "(deterministic).")
    p.add_argument("dir", help="output directory (e.g. tiny_data/golden/default)")
    p.add_argument("--seed", type=nonneg_int, default=SETUP["seed"],
                   help=f"seed of the golden state (default {SETUP['seed']}, the committed sets)")
    p.add_argument("--latent-positions", choices=("behind", "after"), default="behind",
                   help="the latents' position ids in the set (default behind, the method; after: the ablation, "
                        "the committed set tiny_data/golden/latents-after)")
    p.add_argument("--gqa", action="store_true", help="the grouped-query state (4 query heads, 2 key/value "
                   "heads; the committed set tiny_data/golden/gqa) instead of the multi-head one")
    _force_arg(p)
    p = sub.add_parser("verify", help="check refimpl (or another implementation) against DIR",
                       description="Recompute every output from DIR's inputs and compare, or with --actual "
                                   "compare another implementation's tensors. DIR may hold one set or one "
                                   "subfolder per convention. Exit 1 on any mismatch.")
    p.add_argument("dir", help="golden directory (e.g. tiny_data/golden)")
    p.add_argument("--actual", metavar="FILE.npz", help="another implementation's outputs, with the golden names")


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
    cfg, s = golden_config(SETUP), SETUP                     # float64, and the per-trace form at export: small
    _preflight(lambda **k: train_step(cfg, itemsize=8, **k), dict(batch_size=s["batch_size"], seq_len=s["seq_len"],
               n_traces=s["n_traces"], n_latents=s["n_latents"], n_ahead=s["n_ahead"]), [], args)
    manifest = export(args.dir, seed=args.seed, latent_positions=args.latent_positions, gqa=args.gqa)
    size = sum((Path(args.dir) / f).stat().st_size for f in (MANIFEST, TENSORS))
    print(f"wrote {len(manifest['tensors'])} tensors to {args.dir}/{TENSORS} and {args.dir}/{MANIFEST} "
          f"({size / 1024:.0f} KiB)")


# ---------------------------------------------------------------------------------------------
# eval
def _eval_args(p):
    from .data.corpus import EVAL_SPLITS
    from .evaluation.runner import EvalConfig
    p.add_argument("--coprocessor", action="append", default=[], metavar="PATH",
                   help="coprocessor checkpoint or run directory (repeatable)")
    p.add_argument("--runs", default=None, metavar="DIR", help="a folder of runs (subfolders with coprocessor.npz)")
    p.add_argument("--out", default=None, help="write report.json, report.md and plots here")
    p.add_argument("--no-plots", action="store_true")
    _dataclass_args(p, EvalConfig, {
        **dict.fromkeys(("eval_batches", "batch_size", "n_traces", "prompt_batch", "max_new_tokens",
                         "latency_repeats"), positive_int),
        **dict.fromkeys(("seq_len", "horizon", "limit", "seed", "skip_windows"), nonneg_int)},
        {"seq_len": "0: max_seq_len", "horizon": "0: 2 x the largest N_A", "limit": "0: all prompts",
         "seed": "of the held-out points"})
    p.add_argument("--split", choices=EVAL_SPLITS, default=EvalConfig.split,
                   help="reasoning prompts ('long': 3..5-digit answers only; 'fewshot': few-shot prompts for a real LLM)")
    p.add_argument("--delays", type=nonneg_int, nargs="+", default=list(EvalConfig.delays), help="Table 8 delays")
    _model_args(p)
    p.add_argument("--quiet", action="store_true")
    _force_arg(p)


def _eval(args):
    from .evaluation.plots import make_plots
    from .evaluation.report import render_markdown, write_report
    from .evaluation.runner import EvalConfig, evaluate_runs, run_paths
    ec = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig) if f.name != "delays"},
                    delays=tuple(args.delays))
    cfg = _stored_config(_decoder_path(args))
    if cfg is not None:
        from .memory import evaluation
        sizes = dict(batch_size=ec.batch_size, seq_len=ec.seq_len or cfg.max_seq_len, n_traces=ec.n_traces,
                     n_latents=64, horizon=ec.horizon or 32)
        _preflight(lambda **k: evaluation(cfg, itemsize=_itemsize(args), **k), sizes, ["batch_size", "n_traces"], args)
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


# ---------------------------------------------------------------------------------------------
# generate
def _generate_args(p):
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (prompts of any lengths, left-padded)")
    p.add_argument("--coprocessor", default=None, help="coprocessor checkpoint or run directory; if missing or "
                   "unusable, decoding falls back to the decoder alone with a warning")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=32)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the sampler")
    p.add_argument("--delay", type=nonneg_int, default=0, help="asynchronous use: the coprocessor runs in a "
                   "background thread and its latents are appended after N new tokens")
    p.add_argument("--stop-at-newline", action="store_true", help="end each completion at a newline")
    _model_args(p)
    _force_arg(p)


def _generate(args):
    from .evaluation.generate import generate_from_files
    from .memory import generation
    cfg = _stored_config(_decoder_path(args))
    if cfg is not None:                                      # a prompt has at most one token per byte, + eot
        sizes = dict(batch_size=len(args.prompt), prompt_len=1 + max(len(p.encode()) for p in args.prompt),
                     max_new_tokens=args.max_new_tokens, n_latents=64)
        _preflight(lambda **k: generation(cfg, itemsize=_itemsize(args), **k), sizes, ["max_new_tokens"], args)
    texts = generate_from_files(_decoder_path(args), args.coprocessor, args.prompt, args.backend, args.dtype,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                seed=args.seed, delay=args.delay, stop_at_newline=args.stop_at_newline)
    print("\n\n".join(p + t for p, t in zip(args.prompt, texts)))


# ---------------------------------------------------------------------------------------------
# bench: the harness lives in benchmarks/bench.py, outside the package
def _bench_args(p):
    p.add_argument("--preset", choices=list(PRESETS), default="demo")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--traces", type=positive_int, default=None, help="K for the step timing (default 32)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="B (default 8)")
    p.add_argument("--rounds", type=positive_int, default=None, help="timed rounds (default 5)")
    p.add_argument("--memory-traces", type=positive_int, nargs="*", default=None,
                   help="K values of the memory probe (default 8 16 32 64; none to skip)")
    p.add_argument("--per-trace-sequences", type=nonneg_int, default=None,
                   help="time the per-trace form on this many sequences and scale (default 1; 0: all)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="BLAS and torch threads (default: as is)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _force_arg(p)


def load_bench():
    """The benchmark harness module (benchmarks/bench.py of the source tree)."""
    require(BENCH.is_file(), f"{BENCH} is missing: `refimpl bench` runs from a source checkout of refimpl "
                             "(git clone, then pip install -e .)")
    spec = importlib.util.spec_from_file_location("refimpl_benchmarks_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(args):
    bench = load_bench()
    bc = bench.BenchConfig(preset=args.preset, backend=args.backend, dtype=args.dtype, threads=args.threads,
                           torch=not args.no_torch)
    bc = replace(bc, **bench.QUICK) if args.quick else bc
    given = {"n_traces": args.traces, "batch_size": args.batch_size, "rounds": args.rounds,
             "per_trace_sequences": args.per_trace_sequences,
             "memory_traces": None if args.memory_traces is None else tuple(args.memory_traces)}
    bc = replace(bc, **{k: v for k, v in given.items() if v is not None})
    from .memory import train_step
    cfg = get_preset(bc.preset)
    sizes = dict(batch_size=bc.batch_size, seq_len=cfg.max_seq_len, n_latents=bc.n_latents, n_ahead=bc.n_ahead,
                 n_traces=max((bc.n_traces, *bc.memory_traces)))
    _preflight(lambda **k: train_step(cfg, itemsize=_itemsize(args), **k), sizes, ["batch_size", "n_traces"], args)
    log = (lambda m: None) if args.json else (lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
    result = bench.run_bench(bc, log)
    print(json.dumps(result) if args.json else bench.render_table(result))


# ---------------------------------------------------------------------------------------------
# fetch
def _fetch_args(p):
    from .data.pretrained import CACHE_ENV, MODELS
    p.add_argument("name", choices=list(MODELS), help=f"the model; it is cached in ${CACHE_ENV} "
                   "(default ~/.cache/refimpl) and then usable as --decoder NAME")


def _fetch(args):
    from .llm.fetch import fetch
    path = fetch(args.name, log=lambda m: print(f"fetch: {m}", file=sys.stderr, flush=True))
    print(f"{args.name}: {path} (use it with --decoder {args.name})")


# ---------------------------------------------------------------------------------------------
COMMANDS = {  # name: (help, declare flags, run)
    "demo": ("train, evaluate and report the paper's tables at tiny scale (the main job)", _demo_args, _demo),
    "pretrain": ("train the decoder from scratch on the pretraining mixture", _pretrain_args, _pretrain),
    "train": ("train a coprocessor (or pause tokens) against a frozen decoder", _train_args, _train),
    "golden": ("export or verify golden vectors for other implementations", _golden_args, _golden),
    "eval": ("the paper's tables on held-out data for a decoder and coprocessor runs", _eval_args, _eval),
    "generate": ("complete prompts, optionally with a coprocessor (and --delay)", _generate_args, _generate),
    "fetch": ("download a pretrained LLM (smollm2-135m) and convert it once into a frozen decoder", _fetch_args,
              _fetch),
    "bench": ("time the training step, the per-trace form, memory and latency, side by side with PyTorch", _bench_args,
              _bench),
}


def build_parser():
    parser = _Parser(prog="refimpl", description="Differentiable cache augmentation (Liu et al., ICML 2025): "
                     "a NumPy + autograd reference implementation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.add_argument("--version", action="version", version=f"refimpl {__version__}")
    for name, (help_text, declare, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        declare(p)
        p.set_defaults(_run=run, _parser=p)
    return parser


def flag_names(message, parser):
    """'seq_len=999 exceeds ...' -> '--seq-len 999 exceeds ...' for every flag of this command."""
    for action in getattr(parser, "_actions", []):
        if action.option_strings and action.nargs == 0:                  # force=True -> --force
            message = message.replace(f"{action.dest}=True", _flag(action.dest))
        elif action.option_strings:
            message = re.sub(rf"(?<![\w-]){action.dest}=", _flag(action.dest) + " ", message)
    return message


def main(argv=None):
    """Parse argv, run the command; return the exit status (2 on a user error)."""
    parser, args = build_parser(), None
    try:
        args = parser.parse_args(argv)
        require(args.command is not None, f"a command is required, one of {', '.join(COMMANDS)} "
                                          "(see `refimpl --help`)")
        status = args._run(args)
        return 0 if status is None else int(status)
    except RefimplError as e:
        message = flag_names(" ".join(str(e).split()), getattr(args, "_parser", None)).replace("force=True", "--force")
        print(f"refimpl: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: no permission, a file for a dir, disk full
        where = f" {e.filename}" if e.filename else ""
        print(f"refimpl: error: cannot use{where}: {e.strerror or e}; check the path, its permissions and "
              "the free disk space", file=sys.stderr)
        return 2
    except MemoryError:
        print("refimpl: error: out of memory: use a smaller --batch-size, --seq-len, --prompt-batch or model "
              "preset", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refimpl: error: interrupted", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
