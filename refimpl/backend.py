"""Array backend: the one place that decides which module holds the arrays (NumPy or CuPy).

Ops never import numpy or cupy directly for computation; they ask `xp_of(array)` for the
module that owns their inputs, so the same code runs on both. The default dtype is float32;
float64 is used for gradient checks and golden vectors.
"""
import numpy as np
from autograd.tracer import getval

from .errors import RefimplError

BACKENDS = ("numpy", "cupy")
DTYPES = {"float32": np.float32, "float64": np.float64}
_cupy = None  # the cupy module once `get_xp("cupy")` succeeded
# Runs of traces in the blockwise trace attention (layout.context_runs): on a CPU, 4 runs skip the
# context no trace of a run can see (fewer FLOPs, measured 5% faster at the demo preset); on a GPU,
# where a step is bound by kernel launches, one run launches 4x fewer (docs/performance.md).
TRACE_RUNS = {"numpy": 4, "cupy": 1}


def get_xp(name="numpy"):
    """The array module for a backend name: numpy, or cupy (registered with autograd)."""
    if name == "numpy":
        return np
    if name != "cupy":
        raise RefimplError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    return _load_cupy()


def get_dtype(name):
    """np.float32 / np.float64 from a name; RefimplError for anything else."""
    if name not in DTYPES:
        raise RefimplError(f"unknown dtype {name!r}: use float32 or float64")
    return DTYPES[name]


def xp_of(*arrays):
    """The module (numpy or cupy) that owns these arrays (autograd boxes are looked through)."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(getval(a), _cupy.ndarray):
                return _cupy
    return np


def trace_runs(xp):
    """How many runs of traces the blockwise attention uses on backend module xp."""
    return TRACE_RUNS.get(xp.__name__, 1)


def to_numpy(x):
    """A host NumPy copy of a NumPy or CuPy array (scalars pass through as arrays)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_xp(x, xp, dtype=None):
    """Move a host array to backend module xp, optionally casting floating arrays to dtype."""
    a = xp.asarray(x)
    if dtype is not None and a.dtype.kind == "f":
        a = a.astype(dtype, copy=False)
    return a


def tree_map(fn, tree):
    """Apply fn to every array leaf of a nested dict/list params tree."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [tree_map(fn, v) for v in tree]
    return fn(tree)


def _load_cupy():
    """Import cupy, check a GPU is visible, and teach autograd to trace cupy arrays."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy
    except ImportError:
        raise RefimplError("backend 'cupy' needs CuPy: pip install -e '.[gpu]' (on a machine with "
                           "an NVIDIA GPU), or use --backend numpy") from None
    try:
        n_gpu = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise RefimplError(f"backend 'cupy': no usable GPU ({type(e).__name__}); "
                           "use --backend numpy") from None
    if n_gpu == 0:
        raise RefimplError("backend 'cupy': CuPy found no GPU; use --backend numpy")
    _register_with_autograd(cupy)
    _cupy = cupy
    return cupy


def _register_with_autograd(cupy):
    """Register cupy.ndarray with autograd's ArrayBox and a VSpace that allocates on the GPU."""
    from autograd.extend import VSpace
    from autograd.numpy.numpy_boxes import ArrayBox

    class CupyVSpace(VSpace):
        def __init__(self, value):
            self.shape, self.dtype = value.shape, value.dtype

        @property
        def size(self):
            return int(np.prod(self.shape))

        @property
        def ndim(self):
            return len(self.shape)

        def zeros(self):
            return cupy.zeros(self.shape, dtype=self.dtype)

        def ones(self):
            return cupy.ones(self.shape, dtype=self.dtype)

        def _add(self, x, y):
            return x + y

        def _mut_add(self, x, y):
            x += y
            return x

        def _inner_prod(self, x, y):
            return float(cupy.vdot(x.ravel(), y.ravel()))

    ArrayBox.register(cupy.ndarray)
    VSpace.register(cupy.ndarray, CupyVSpace)
