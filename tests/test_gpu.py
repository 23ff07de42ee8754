"""The CuPy backend: what can be pinned on a CPU, and the checks that need a GPU.

On every machine:
- every op on the gradient path of a training step is one of refimpl.ops.PRIMITIVES (their
  VJPs are xp-generic; autograd's own VJPs allocate host NumPy arrays and fail on CuPy), and a
  float32 step stays float32 in every recorded value;
- `--backend cupy` (and backend="cupy" in the Python API) fails at once, with the one-line
  message of backend.get_xp, when CuPy is absent;
- a coprocessor checkpoint holds plain host arrays, so it loads on either backend.

With CuPy and a GPU (skipped otherwise, with the reason):
- parity: the same seeded step on NumPy and on CuPy gives the same loss and every gradient,
  float64 to rtol 1e-9 and float32 to rtol 2e-3 of the largest entry (see TOLERANCES);
- the loss and its gradients never synchronize the device (cupyx.allow_synchronize(False));
- checkpoints written from CuPy load on NumPy and back, and training resumes across them.
"""
import json
import sys

import numpy as np
import pytest

from refimpl.config import get_preset
from refimpl.core import ops
from refimpl.core.coprocessor import init_coprocessor
from refimpl.core.decoder import init_params
from refimpl.core.layout import sample_trace_positions
from refimpl.core.objective import loss_cached
from refimpl.errors import RefimplError
from refimpl.training.autodiff import value_and_grad
from refimpl.training.optim import adam_init
from refimpl.training.train import TrainConfig, train_step

CFG = get_preset("nano", vocab_size=61, init_std=0.2)
SHAPE = dict(batch_size=2, seq_len=20, n_traces=3, n_latents=3, n_ahead=4)

# float64: both backends do the same arithmetic in a different order (cuBLAS vs OpenBLAS
# blocking, tree vs pairwise sums): differences are a few ulps amplified by depth, far below
# 1e-9. float32: the same orders at 6e-8 per rounding, through 3 layers of two networks, the
# softmaxes and the loss mean; 2e-3 of the largest entry is loose enough for that and far
# tighter than any indexing or mask mistake, which moves gradients by O(1) relative.
TOLERANCES = {"float64": 1e-9, "float32": 2e-3}


def problem(dtype=np.float64, xp=np, seed=0):
    dec = init_params(CFG, seed=seed, dtype=dtype, xp=xp)
    trainable = init_coprocessor(dec, CFG, SHAPE["n_latents"], seed=seed)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (SHAPE["batch_size"], SHAPE["seq_len"]))
    positions = sample_trace_positions(rng, SHAPE["batch_size"], SHAPE["seq_len"], SHAPE["n_traces"],
                                       SHAPE["n_ahead"])
    return dec, trainable, tokens, positions


def loss_and_grads(dec, trainable, tokens, positions):
    return value_and_grad(lambda t: loss_cached(dec, t, CFG, tokens, positions, SHAPE["n_latents"],
                                                SHAPE["n_ahead"])[0], trainable)[:2]


# ---------------------------------------------------------------------------------------------
# The autograd graph of one training step, recorded node by node
class Recorded:
    """Patches refimpl.autodiff's VJPNode so that every node of the trace records its primitive."""

    def __init__(self, monkeypatch):
        from autograd.core import VJPNode
        self.nodes = []
        record = self.nodes

        class RecordingNode(VJPNode):
            __slots__ = ()

            def __init__(self, value, fun, args, kwargs, parent_argnums, parents):
                record.append((fun, getattr(value, "dtype", None)))
                super().__init__(value, fun, args, kwargs, parent_argnums, parents)

        monkeypatch.setattr("refimpl.training.autodiff.VJPNode", RecordingNode)


def checkpoint_meta(tc):
    """The metadata `refimpl train` writes next to a coprocessor (the part load_coprocessor checks)."""
    from dataclasses import asdict
    return {"decoder_hash": "h", "train_config": asdict(tc), "mode": tc.mode, "init": tc.init,
            "n_latents": tc.n_latents, "n_ahead": tc.n_ahead, "config": CFG.to_dict()}


def one_train_step(dtype):
    dec, trainable, tokens, positions = problem(dtype)
    tc = TrainConfig(**SHAPE, steps=1)
    return train_step(dec, trainable, adam_init(trainable), CFG, tc, tokens, positions, 1e-3)


@pytest.mark.parametrize("mode", ["coprocessor", "pause"])
def test_every_op_on_the_gradient_path_is_a_refimpl_primitive(monkeypatch, mode):
    """autograd's own primitives (anp.sum, getitem, dot, ...) have host-only VJPs: none may appear."""
    rec = Recorded(monkeypatch)
    dec, _, tokens, positions = problem(np.float64)
    trainable = init_coprocessor(dec, CFG, SHAPE["n_latents"], mode=mode)
    tc = TrainConfig(**SHAPE, steps=1, mode=mode)
    train_step(dec, trainable, adam_init(trainable), CFG, tc, tokens, positions, 1e-3)
    recorded = {fun for fun, _ in rec.nodes}
    assert len(rec.nodes) > 20, "the step recorded no graph: the patch missed value_and_grad"
    foreign = sorted(getattr(f, "__name__", str(f)) for f in recorded - set(ops.PRIMITIVES))
    assert not foreign, f"ops on the gradient path that are not refimpl primitives: {foreign}"


def test_float32_step_stays_float32(monkeypatch):
    """No accidental float64 promotion anywhere on the recorded graph, nor in the update."""
    rec = Recorded(monkeypatch)
    trainable, adam, stats = one_train_step(np.float32)
    dtypes = {(getattr(f, "__name__", f), str(d)) for f, d in rec.nodes if d is not None and d.kind == "f"}
    assert dtypes and all(d == "float32" for _, d in dtypes), sorted(dtypes)
    for tree in (trainable, adam["m"], adam["v"]):
        assert {str(a.dtype) for a in tree.values()} == {"float32"}
    assert np.isfinite(stats["loss"])


# ---------------------------------------------------------------------------------------------
# A stand-in for a device array on the CPU: any read back to the host raises
class HostRead(AssertionError):
    pass


class DeviceArray(np.ndarray):
    """An ndarray that refuses what forces a GPU to synchronise: int(), float(), bool(), .item(),
    .tolist() and conversion to a plain host array through refimpl.backend.to_numpy."""

    def _refuse(self, *args, **kwargs):
        raise HostRead("a device array was read back to the host inside the loss and gradient")

    __int__ = __float__ = __index__ = __bool__ = item = tolist = _refuse


@pytest.fixture
def device_arrays(monkeypatch):
    """Register DeviceArray with autograd and make to_numpy refuse it; returns a converter."""
    from autograd.extend import VSpace
    from autograd.numpy.numpy_boxes import ArrayBox
    from autograd.numpy.numpy_vspaces import ArrayVSpace

    import refimpl.backend as backend
    ArrayBox.register(DeviceArray)
    VSpace.register(DeviceArray, lambda x: ArrayVSpace(x))
    host = backend.to_numpy
    reads = []

    def counting_to_numpy(x):
        if isinstance(x, DeviceArray):
            reads.append(x.shape)
            return np.asarray(x).view(np.ndarray).copy()
        return host(x)
    for module in ("refimpl.backend", "refimpl.core.checks", "refimpl.training.train"):
        if hasattr(__import__(module, fromlist=["x"]), "to_numpy"):
            monkeypatch.setattr(f"{module}.to_numpy", counting_to_numpy)
    to_device = lambda tree: {k: np.asarray(v).view(DeviceArray) for k, v in tree.items()}  # noqa: E731
    return to_device, reads


def test_loss_and_gradients_never_read_the_device_on_the_host(device_arrays):
    """CPU-side guard of the GPU path: no host read-back anywhere inside value_and_grad(loss_cached)."""
    to_device, reads = device_arrays
    dec, trainable, tokens, positions = problem(np.float32)
    dec = {"embed_tokens": to_device({"e": dec["embed_tokens"]})["e"], "norm": to_device({"n": dec["norm"]})["n"],
           "layers": [to_device(layer) for layer in dec["layers"]]}
    loss, grads = loss_and_grads(dec, to_device(trainable), tokens, positions)
    assert isinstance(loss, DeviceArray) and all(g is not None for g in grads.values())
    assert reads == []
    with pytest.raises(HostRead):                                        # the guard itself works
        float(loss)
    tokens_on_device = to_device({"t": tokens})["t"]                      # what main did before the fix:
    loss_and_grads(dec, to_device(trainable), tokens_on_device, positions)  # its token check read them back
    assert reads, "the guard missed a read-back of device token ids"


# ---------------------------------------------------------------------------------------------
# --backend cupy without CuPy: one line, at once, from backend.get_xp
@pytest.fixture
def no_cupy(monkeypatch):
    """CuPy unimportable and unloaded, so the check behaves the same on a GPU machine."""
    import refimpl.backend as backend
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(backend, "_cupy", None)
    with pytest.raises(RefimplError) as e:
        backend.get_xp("cupy")
    return " ".join(str(e.value).split())


def _cli_error(argv, capsys):
    from refimpl.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("refimpl: error: "), err
    return lines[0][len("refimpl: error: "):]


@pytest.mark.parametrize("argv", [
    ["pretrain", "--preset", "nano", "--steps", "1"],
    ["train", "--steps", "1"],
    ["eval"],
    ["generate", "--prompt", "2 + 2 ="],
    ["bench", "--quick", "--preset", "nano"],
], ids=lambda a: a[0])
def test_backend_cupy_without_cupy_fails_at_once_with_one_line(argv, no_cupy, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "out")] if argv[0] in ("pretrain", "train") else []
    assert _cli_error(argv + out + ["--backend", "cupy"], capsys) == no_cupy
    assert not (tmp_path / "out").exists(), "something was written before the backend check"


def test_python_api_backend_cupy_without_cupy(no_cupy, tmp_path):
    from benchmarks.bench import BenchConfig, run_bench
    from refimpl.evaluation.runner import evaluate_runs
    from refimpl.training.pretrain import pretrain
    from refimpl.training.train import train
    calls = [lambda: pretrain(tmp_path / "p", backend="cupy", preset="nano", steps=1),
             lambda: train(tmp_path / "missing.npz", TrainConfig(steps=1), tmp_path / "t", backend="cupy"),
             lambda: evaluate_runs(tmp_path / "missing.npz", [], backend="cupy"),
             lambda: run_bench(BenchConfig(preset="nano", backend="cupy"))]
    for call in calls:
        with pytest.raises(RefimplError) as e:
            call()
        assert " ".join(str(e.value).split()) == no_cupy


def test_coprocessor_checkpoint_holds_host_arrays_any_backend_can_load(tmp_path):
    """The file side of 'a checkpoint from one backend loads on the other' (the GPU side is below)."""
    from refimpl.training.checkpoint import load_coprocessor, save_coprocessor
    trainable, adam, _ = one_train_step(np.float32)
    save_coprocessor(tmp_path / "c.npz", trainable, adam, checkpoint_meta(TrainConfig(**SHAPE, steps=1)))
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:              # plain arrays, no pickles
        assert all(z[n].dtype == np.float32 for n in z.files)
    back, adam2, meta = load_coprocessor(tmp_path / "c.npz", "h", np.float32, np)
    assert adam2["step"] == 1 and json.loads((tmp_path / "c.json").read_text())["step"] == 1
    for k, a in trainable.items():
        assert back[k].tobytes() == a.tobytes()


# ---------------------------------------------------------------------------------------------
# On a GPU
def cupy_or_skip():
    pytest.importorskip("cupy", reason="CuPy is not installed (pip install -e '.[gpu]' on a GPU machine)")
    from refimpl.backend import get_xp
    try:
        return get_xp("cupy")
    except RefimplError as e:
        pytest.skip(f"no usable GPU: {e}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cupy_step_equals_numpy_step(dtype):
    cp = cupy_or_skip()
    dt = np.dtype(dtype)
    loss_np, grads_np = loss_and_grads(*problem(dt))
    loss_gpu, grads_gpu = loss_and_grads(*problem(dt, xp=cp))             # the same seeded values
    rtol = TOLERANCES[dtype]
    assert isinstance(loss_gpu, cp.ndarray) and loss_gpu.dtype == dt
    np.testing.assert_allclose(float(loss_gpu), float(loss_np), rtol=rtol)
    for name, g in grads_np.items():
        got = cp.asnumpy(grads_gpu[name])
        assert got.dtype == dt, name
        np.testing.assert_allclose(got, g, rtol=rtol, atol=rtol * float(np.abs(g).max()), err_msg=name)


@pytest.mark.gpu
def test_loss_and_gradients_never_synchronize_the_device():
    """Inside value_and_grad(loss_cached) nothing is copied to the host: no sync until float(loss).

    Token ids and trace positions arrive as host arrays, as the layout is host data by design
    (it is uploaded, never downloaded).
    """
    cp = cupy_or_skip()
    import cupyx
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    dec, trainable, tokens, positions = problem(np.float32, xp=cp)
    loss_and_grads(dec, trainable, tokens, positions)                     # warm-up: kernels compiled
    with cupyx.allow_synchronize(False):
        loss, grads = loss_and_grads(dec, trainable, tokens, positions)
    assert np.isfinite(float(loss)) and all(g is not None for g in grads.values())


@pytest.mark.gpu
def test_full_train_step_synchronizes_only_for_the_loss(monkeypatch):
    """A whole train_step (loss, gradients, norm, clipping, Adam) reads the device back ONCE: the
    stats transfer that feeds the log and the NaN guard. Any other sync raises inside the step."""
    cp = cupy_or_skip()
    import cupyx
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    import refimpl.training.loop as loop
    reads, host = [], loop.to_numpy

    def the_one_read(x):
        reads.append(x.shape)
        with cupyx.allow_synchronize(True):
            return host(x)
    monkeypatch.setattr(loop, "to_numpy", the_one_read)
    dec, trainable, tokens, positions = problem(np.float32, xp=cp)
    tc = TrainConfig(**SHAPE, steps=1)
    adam = adam_init(trainable)
    trainable, adam, _ = train_step(dec, trainable, adam, CFG, tc, tokens, positions, 1e-3)   # warm-up
    reads.clear()
    with cupyx.allow_synchronize(False):
        train_step(dec, trainable, adam, CFG, tc, tokens, positions, 1e-3)
    assert len(reads) == 1, reads


@pytest.mark.gpu
def test_checkpoints_cross_backends_and_training_resumes(tmp_path):
    cp = cupy_or_skip()
    from refimpl.training.checkpoint import load_coprocessor, save_coprocessor
    dec, _, tokens, positions = problem(np.float64)
    dec_gpu, trainable_gpu, _, _ = problem(np.float64, xp=cp)            # the same seeded values
    tc = TrainConfig(**SHAPE, steps=2)
    tr_gpu, adam_gpu, _ = train_step(dec_gpu, trainable_gpu, adam_init(trainable_gpu), CFG, tc,
                                     tokens, positions, 1e-3)
    save_coprocessor(tmp_path / "gpu.npz", tr_gpu, adam_gpu, checkpoint_meta(tc))
    tr_cpu, adam_cpu, _ = load_coprocessor(tmp_path / "gpu.npz", "h", np.float64, np)
    assert all(isinstance(a, np.ndarray) for a in tr_cpu.values())
    next_cpu = train_step(dec, tr_cpu, adam_cpu, CFG, tc, tokens, positions, 1e-3)[0]
    save_coprocessor(tmp_path / "cpu.npz", tr_cpu, adam_cpu, checkpoint_meta(tc))
    tr_back, adam_back, _ = load_coprocessor(tmp_path / "cpu.npz", "h", np.float64, cp)
    assert all(isinstance(a, cp.ndarray) for a in tr_back.values())
    next_gpu = train_step(dec_gpu, tr_back, adam_back, CFG, tc, tokens, positions, 1e-3)[0]
    for k, a in next_cpu.items():
        np.testing.assert_allclose(cp.asnumpy(next_gpu[k]), a, rtol=1e-9, atol=1e-12, err_msg=k)
