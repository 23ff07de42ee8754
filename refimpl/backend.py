"""Array backend: the one place that picks NumPy or CuPy. Ops ask `xp_of(array)` for the module that owns
their inputs, so the same code runs on both; float32 by default, float64 for gradient checks, golden sets."""
import numpy as np
from autograd.tracer import getval

from .errors import RefimplError, require

BACKENDS = ("numpy", "cupy")
DTYPES = {"float32": np.float32, "float64": np.float64}
_cupy = None  # the cupy module once `get_xp("cupy")` succeeded
# Runs of traces in the blockwise trace attention (layout.context_runs): on a CPU, 4 runs skip the
# context no trace of a run can see (fewer FLOPs, measured 5% faster at the demo preset); on a GPU,
# where a step is bound by kernel launches, one run launches 4x fewer (docs/performance.md).
TRACE_RUNS = {"numpy": 4, "cupy": 1}


def get_xp(name="numpy"):
    """The array module for a backend name: numpy, or cupy (checked for a GPU, registered with autograd)."""
    global _cupy
    require(name in BACKENDS, f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "numpy" or _cupy is not None:
        return np if name == "numpy" else _cupy
    try:
        import cupy
    except ImportError:
        raise RefimplError("backend 'cupy' needs CuPy: pip install -e '.[gpu]' (on a machine with "
                           "an NVIDIA GPU), or use --backend numpy") from None
    try:
        n_gpu = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 (CUDA driver missing or broken)
        raise RefimplError(f"backend 'cupy': no GPU ({type(e).__name__}); use --backend numpy") from None
    require(n_gpu > 0, "backend 'cupy': CuPy found no GPU; use --backend numpy")
    _register_with_autograd(cupy)
    _cupy = cupy
    return cupy


def get_dtype(name):
    require(name in DTYPES, f"unknown dtype {name!r}: use float32 or float64")
    return DTYPES[name]


def xp_of(*arrays):
    """The module (numpy or cupy) that owns these arrays (autograd boxes are looked through)."""
    if _cupy is not None and any(isinstance(getval(a), _cupy.ndarray) for a in arrays):
        return _cupy
    return np


def n_context_runs(xp):
    """How many runs of traces (TRACE_RUNS) the blockwise trace attention is cut into on backend module xp."""
    return TRACE_RUNS.get(xp.__name__, 1)


def to_numpy(x):
    """A host NumPy copy of a NumPy or CuPy array (scalars pass through as arrays)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_xp(x, xp, dtype=None):
    """A host array on backend module xp, floating arrays cast to dtype if given."""
    a = xp.asarray(x)
    return a.astype(dtype, copy=False) if dtype is not None and a.dtype.kind == "f" else a


def _register_with_autograd(cupy):
    from autograd.extend import VSpace
    from autograd.numpy.numpy_boxes import ArrayBox

    class CupyVSpace(VSpace):  # VSpace's own _add and _mut_add (x + y, x += y) serve cupy arrays
        def __init__(self, value):
            self.shape, self.dtype = value.shape, value.dtype

        size = property(lambda self: int(np.prod(self.shape)))  # autograd's grad checks size == 1

        def zeros(self):
            return cupy.zeros(self.shape, dtype=self.dtype)

        def ones(self):
            return cupy.ones(self.shape, dtype=self.dtype)

        def _inner_prod(self, x, y):
            return float(cupy.vdot(x.ravel(), y.ravel()))

    ArrayBox.register(cupy.ndarray)
    VSpace.register(cupy.ndarray, CupyVSpace)
