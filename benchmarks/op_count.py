"""Count the array operations of one training step: what would each be a kernel launch on a GPU.

    python benchmarks/op_count.py [--preset demo] [--runs 4]     # prints one JSON object

`refimpl bench` reports the same count as `array_ops_per_step`. On a GPU the step is bound by the
number of array operations (each one a kernel launch plus Python and autograd overhead), not by
arithmetic, so this count is the figure to bring down. It is measured on the CPU, exactly: every
array of the step is a `Counted` ndarray, and each ufunc call (elementwise ops, matmul, reductions),
each NumPy function (concatenate, einsum, where, ...), each fancy-index read or write, and each
astype/copy adds one. Views (reshape, transpose, basic slices) add nothing.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl import backend  # noqa: E402
from refimpl.config import get_preset  # noqa: E402
from refimpl.core.coprocessor import init_coprocessor  # noqa: E402
from refimpl.core.decoder import init_params  # noqa: E402
from refimpl.core.layout import sample_trace_positions  # noqa: E402
from refimpl.training.optim import adam_init  # noqa: E402
from refimpl.training.train import TrainConfig, train_step  # noqa: E402

METADATA = {"result_type", "shape", "ndim", "size", "broadcast_to", "may_share_memory", "iscomplexobj"}


class Counted(np.ndarray):
    """An ndarray that counts the operations made on it (see the module docstring)."""
    ops = Counter()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        Counted.ops[f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__] += 1
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(o) for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*map(_plain, inputs), **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in METADATA:
            Counted.ops[func.__name__] += 1
        return _wrap(func(*_plain_tree(args), **_plain_tree(kwargs)))

    def __getitem__(self, index):
        if _fancy(index):
            Counted.ops["gather"] += 1
        return _wrap(np.ndarray.__getitem__(self.view(np.ndarray), _plain_tree(index)))

    def __setitem__(self, index, value):
        Counted.ops["scatter" if _fancy(index) else "setitem"] += 1
        np.ndarray.__setitem__(self.view(np.ndarray), _plain_tree(index), _plain(value))

    def astype(self, *args, **kwargs):
        Counted.ops["astype"] += 1
        return _wrap(self.view(np.ndarray).astype(*args, **kwargs))

    def copy(self, *args, **kwargs):
        Counted.ops["copy"] += 1
        return _wrap(self.view(np.ndarray).copy(*args, **kwargs))


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, Counted) else x


def _plain_tree(x):
    if isinstance(x, (list, tuple)):
        return type(x)(_plain_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain_tree(v) for k, v in x.items()}
    return _plain(x)


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, Counted):
        return x.view(Counted)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _fancy(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (np.ndarray, list)) for i in items)


def register_with_autograd():
    from autograd.extend import VSpace
    from autograd.numpy.numpy_boxes import ArrayBox
    from autograd.numpy.numpy_vspaces import ArrayVSpace
    ArrayBox.register(Counted)
    VSpace.register(Counted, lambda x: ArrayVSpace(x))


def count_train_step(preset="demo", batch_size=8, n_traces=32, n_latents=16, n_ahead=16, trace_runs=None):
    """{total, by_op} for one form-B training step (loss, gradients, clipping, Adam) at these sizes."""
    register_with_autograd()
    saved = dict(backend.TRACE_RUNS)
    if trace_runs is not None:                              # count as another backend runs it (cupy: 1)
        backend.TRACE_RUNS["numpy"] = trace_runs
    try:
        return _count(preset, batch_size, n_traces, n_latents, n_ahead)
    finally:
        backend.TRACE_RUNS.update(saved)


def _count(preset, batch_size, n_traces, n_latents, n_ahead):
    cfg = get_preset(preset)
    T = cfg.max_seq_len
    rng = np.random.default_rng(0)
    dec = init_params(cfg, 0, np.float32)
    trainable = init_coprocessor(dec, cfg, n_latents)
    wrap = lambda tree: {k: _wrap(v) for k, v in tree.items()}  # noqa: E731
    dec = {**wrap({k: dec[k] for k in ("embed_tokens", "norm")}), "layers": [wrap(lay) for lay in dec["layers"]]}
    trainable = wrap(trainable)
    tokens = rng.integers(0, cfg.vocab_size, (batch_size, T))
    positions = sample_trace_positions(rng, batch_size, T, n_traces, n_ahead)
    tc = TrainConfig(n_latents=n_latents, n_ahead=n_ahead, n_traces=n_traces, batch_size=batch_size, seq_len=T)
    adam = adam_init(trainable)                             # the run's state, not part of a step
    Counted.ops.clear()
    train_step(dec, trainable, adam, cfg, tc, tokens, positions, 1e-4)
    return {"total": sum(Counted.ops.values()), "by_op": dict(Counted.ops.most_common())}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--traces", type=int, default=32)
    p.add_argument("--trace-runs", type=int, default=None, help="runs of traces (default: NumPy's; CuPy uses 1)")
    args = p.parse_args()
    print(json.dumps(count_train_step(args.preset, args.batch_size, args.traces, trace_runs=args.trace_runs)))
