"""The command line: `refimpl <command> ...` (also `python -m refimpl`).

Each command lives in its own module, which exposes `add_arguments(parser)` and `run(args)`
(returning an exit status or None for 0). Registering a command is one line in COMMANDS. A
module that fails to import breaks only its own command, which then reports the failure.

Every user error is a RefimplError; main() prints it as ONE line, `refimpl: error: ...`, on
stderr and returns 2, without a traceback. Bad arguments, a missing command, a path that cannot
be read or written (OSError) and running out of memory get the same one-line treatment.
"""
import argparse
import importlib
import sys

from . import __version__
from .errors import RefimplError

# (command, module, one-line help). Add a command with one line here.
COMMANDS = [
    ("demo", "refimpl.demo", "train, evaluate and report the paper's tables at tiny scale (the main job)"),
    ("pretrain", "refimpl.pretrain", "train the decoder from scratch on the pretraining mixture"),
    ("train", "refimpl.train", "train a coprocessor (or pause tokens) against a frozen decoder"),
    ("golden", "refimpl.golden", "export or verify golden vectors for other implementations"),
    ("eval", "refimpl.evaluate", "the paper's tables on held-out data for a decoder and coprocessor runs"),
    ("generate", "refimpl.generate", "complete prompts, optionally with a coprocessor (and --delay)"),
    ("bench", "refimpl.bench", "time the training step, form C, memory and latency, side by side with PyTorch"),
]


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line: refimpl: error: <what>; see --help."""

    def error(self, message):
        raise RefimplError(f"{message} (see `{self.prog} --help`)")


MAX_INT = 2**31 - 1  # larger counts only end in an out-of-memory or NumPy size error


def positive_int(text):
    """argparse type: an int >= 1 (and <= MAX_INT)."""
    return _bounded(text, int, lambda v: v >= 1, "a positive integer")


def nonneg_int(text):
    """argparse type: an int >= 0 (and <= MAX_INT)."""
    return _bounded(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    """argparse type: a finite float > 0."""
    return _bounded(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def nonneg_float(text):
    """argparse type: a finite float >= 0."""
    return _bounded(text, float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def _bounded(text, kind, ok, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    if kind is int and value > MAX_INT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INT}, got {text!r}")
    return value


def build_parser():
    parser = _Parser(prog="refimpl", description="Differentiable cache augmentation "
                     "(Liu et al., ICML 2025): a NumPy + autograd reference implementation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.add_argument("--version", action="version", version=f"refimpl {__version__}")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # a broken command must not take the others down
            p.set_defaults(_run=_broken(name, module, e))
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _broken(name, module, exc):
    def run(args):
        raise RefimplError(f"command {name!r} is unavailable: importing {module} failed "
                           f"({type(exc).__name__}: {exc}); fix that module or reinstall refimpl")
    return run


def main(argv=None):
    """Parse argv, run the command; return the exit status (2 on a user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise RefimplError(f"a command is required, one of {', '.join(c[0] for c in COMMANDS)} "
                               "(see `refimpl --help`)")
        status = args._run(args)
        return 0 if status is None else int(status)
    except RefimplError as e:
        print(f"refimpl: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: no permission, a file for a dir, disk full
        where = f" {e.filename}" if e.filename else ""
        print(f"refimpl: error: cannot use{where}: {e.strerror or e}; check the path, its "
              "permissions and the free disk space", file=sys.stderr)
        return 2
    except MemoryError:
        print("refimpl: error: out of memory: use a smaller --batch-size, --seq-len, --prompt-batch "
              "or model preset", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refimpl: error: interrupted", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
