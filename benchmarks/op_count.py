"""Count the array operations of one training step: what would each be a kernel launch on a GPU.

    python benchmarks/op_count.py [--preset demo] [--trace-runs 1]     # prints one JSON object

`refimpl bench` reports it as `array_ops_per_step`: on a GPU the step is bound by the number of array
operations (each a kernel launch plus Python and autograd overhead), not by arithmetic. Counted on the
CPU, exactly: every array of the step is a `Counted` ndarray; each ufunc call, NumPy function,
fancy-index read or write, and astype/copy adds one. Views (reshape, transpose, slices) add nothing.
"""
import argparse
import json
from collections import Counter

import numpy as np

from refimpl import backend
from refimpl.training.optim import adam_init
from refimpl.training.train import train_step

METADATA = {"result_type", "shape", "ndim", "size", "broadcast_to", "may_share_memory", "iscomplexobj"}
OPS = Counter()                                             # operation name: count since the last clear


class Counted(np.ndarray):
    """An ndarray that counts the operations made on it in OPS (see the module docstring)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        OPS[f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__] += 1
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(o) for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*map(_plain, inputs), **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in METADATA:
            OPS[func.__name__] += 1
        return _wrap(func(*_plain(args), **_plain(kwargs)))

    def __getitem__(self, index):
        if _fancy(index):
            OPS["gather"] += 1
        return _wrap(np.ndarray.__getitem__(self.view(np.ndarray), _plain(index)))

    def __setitem__(self, index, value):
        OPS["scatter" if _fancy(index) else "setitem"] += 1
        np.ndarray.__setitem__(self.view(np.ndarray), _plain(index), _plain(value))

    def astype(self, *args, **kwargs):
        OPS["astype"] += 1
        return _wrap(self.view(np.ndarray).astype(*args, **kwargs))

    def copy(self, *args, **kwargs):
        OPS["copy"] += 1
        return _wrap(self.view(np.ndarray).copy(*args, **kwargs))


def _plain(x):
    """x with every Counted array in it (in lists, tuples, dicts) viewed as a plain ndarray."""
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x.view(np.ndarray) if isinstance(x, Counted) else x


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, Counted):
        return x.view(Counted)
    return tuple(_wrap(v) for v in x) if isinstance(x, tuple) else x


def _fancy(index):
    return any(isinstance(i, (np.ndarray, list)) for i in (index if isinstance(index, tuple) else (index,)))


def count_train_step(case, trace_runs=None):
    """{total, by_op} for one training step (loss, gradients, clipping, Adam) on a NumPy case of
    benchmarks/bench.make_case, counted with `trace_runs` runs of traces (cupy runs 1)."""
    from autograd.extend import VSpace
    from autograd.numpy.numpy_boxes import ArrayBox
    from autograd.numpy.numpy_vspaces import ArrayVSpace
    ArrayBox.register(Counted)
    VSpace.register(Counted, lambda x: ArrayVSpace(x))
    wrap = lambda tree: {k: _wrap(v) for k, v in tree.items()}
    dec = {**wrap({k: case["dec"][k] for k in ("embed_tokens", "norm")}),
           "layers": [wrap(layer) for layer in case["dec"]["layers"]]}
    trainable = wrap(case["trainable"])
    adam = adam_init(trainable)                             # the run's state, not part of a step
    saved = dict(backend.TRACE_RUNS)
    if trace_runs is not None:
        backend.TRACE_RUNS["numpy"] = trace_runs
    try:
        OPS.clear()
        train_step(dec, trainable, adam, case["cfg"], case["tc"], case["tokens"], case["positions"], 1e-4)
    finally:
        backend.TRACE_RUNS.update(saved)
    return {"total": sum(OPS.values()), "by_op": dict(OPS.most_common())}


if __name__ == "__main__":
    # this folder is on sys.path when run as a script
    from bench import BenchConfig, make_case
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--traces", type=int, default=32)
    p.add_argument("--trace-runs", type=int, default=None, help="default: NumPy's; CuPy runs 1")
    args = p.parse_args()
    case = make_case(BenchConfig(preset=args.preset, batch_size=args.batch_size, n_traces=args.traces))
    print(json.dumps(count_train_step(case, args.trace_runs)))
