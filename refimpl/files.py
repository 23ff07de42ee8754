"""Every file refimpl writes or reads, safely. Writes are atomic (a crash leaves the old file or the new
one, never a torn one, and a failed write leaves no partial file); a run holds DIR/.lock while it writes.
Reads validate before use: JSON within size and nesting limits, of the expected type, finite; arrays real
and finite. Every problem is one line naming the file, the field and the fix (docs/robustness.md)."""
import hashlib
import json
import math
import os
import tempfile
import time
import zipfile
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import numpy as np

from .errors import RefimplError, require

TEST_HOOK_SAVE_PAUSE = "REFIMPL_TEST_HOOK_SAVE_PAUSE"
MAX_JSON_BYTES = 1 << 26
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# Writing
def atomic_write_bytes(path, blob):
    """Write blob (bytes, or a function of the open binary file) to path, atomically."""
    write_atomically([(Path(path), blob)])


def atomic_write_json(path, obj):
    require(finite_json(obj), f"refusing to write {path}: it would hold NaN or infinity, numbers from a run "
                              "that diverged; lower its learning rate and run again")
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_atomically(files):
    """[(path, bytes or write(f))]: each to a complete, fsync'ed temporary file, then renamed, in order."""
    temps, path = [], files[0][0]
    try:
        for path, blob in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
            with os.fdopen(fd, "w+b") as f:
                blob(f) if callable(blob) else f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        for tmp, (path, _) in zip(temps, files):
            if flag := os.environ.get(TEST_HOOK_SAVE_PAUSE):  # tests: path into FLAG, wait for its removal
                Path(flag + ".new").write_text(str(path))
                os.replace(flag + ".new", flag)
                deadline = time.monotonic() + 60
                while os.path.exists(flag) and time.monotonic() < deadline:
                    time.sleep(0.01)
            os.replace(tmp, path)
    except BaseException as e:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:   # e.g. a full disk: name the file
            e.filename = str(path)
        raise
    with suppress(OSError):  # fsync the directory, on platforms that can open and fsync one
        fd = os.open(files[0][0].parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_files(path):
    """Temporary files of earlier writes of path that were killed before their rename."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


@contextmanager
def run_lock(directory):
    """Hold DIR/.lock (an exclusive flock: it dies with its process) while a run writes into DIR; a second
    run is refused. A directory this call created that holds nothing else is removed again."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RefimplError(f"another refimpl run is writing to {directory} (it holds {lock}): "
                               "wait for it to end or stop it, or write to another directory") from None
        yield
    finally:
        os.close(fd)
        if created and [p.name for p in directory.iterdir()] == [lock.name]:
            lock.unlink()
            directory.rmdir()


# Reading
def read_json(path, what, fix, kind=dict):
    """The JSON value of file path, a `kind`: one line naming `what` and `fix` if it is unreadable, over
    64 MiB, not UTF-8, not JSON, nested too deep to parse, holds NaN or Infinity, or is not a `kind`."""
    path = Path(path)
    require(path.stat().st_size <= MAX_JSON_BYTES, f"{what} {path} is over {MAX_JSON_BYTES >> 20} MiB: {fix}")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise RefimplError(f"{what} {path} is nested too deep to be refimpl's: {fix}") from None
    except ValueError as e:                                  # UnicodeDecodeError and JSONDecodeError too
        raise RefimplError(f"{what} {path} is not valid JSON ({str(e)[:100]}): {fix}") from None
    require(finite_json(value), f"{what} {path} holds NaN or Infinity (or a number too large for a float): {fix}")
    require(isinstance(value, kind), f"{what} {path} holds a JSON {type(value).__name__}, not a "
                                     f"{kind.__name__}: {fix}")
    return value


def finite_json(obj):
    """True if obj is JSON without NaN or infinity."""
    try:
        return bool(json.dumps(obj, allow_nan=False))
    except ValueError:
        return False


NUMBER = (int, float)


def check_schema(value, schema, where, fix, at="top level"):
    """value against schema: a type or tuple of types (NUMBER: a finite int or float; bool only where named),
    [schema of every item], or {key: schema} (keys optional, others ignored). One line naming the field."""
    if isinstance(schema, dict) and isinstance(value, dict):
        for key in (k for k in schema if k in value):
            check_schema(value[key], schema[key], where, fix, f"field {key!r}")
    elif isinstance(schema, list) and isinstance(value, list):
        for item in value:
            check_schema(item, schema[0], where, fix, f"an item of {at}")
    else:
        kinds = schema if isinstance(schema, tuple) else (schema,)
        ok = isinstance(value, kinds) if all(isinstance(k, type) for k in kinds) else False
        ok = ok and (bool in kinds or not isinstance(value, bool)) and not (
            isinstance(value, float) and not math.isfinite(value))
        require(ok, f"{where}: {at} is {str(value)[:40]!r}, which is not what refimpl wrote there: {fix}")
    return value


def unusable(arrays, kinds="fiu"):
    """Names of the host arrays in {name: array} whose dtype kind is not one of `kinds` (default: real
    numbers; no bool, complex, text or object) or that hold NaN or infinity."""
    return [n for n, a in arrays.items() if a.dtype.kind not in kinds or a.dtype.kind == "f" and
            not np.isfinite(a).all()]


def read_npz(path, what, fix, file=None):
    """{name: array} of the .npz at path (read from `file`, its open binary file, if given), never unpickling:
    one line naming `what` and the fix for a file that is not a zip, damaged, or holds object arrays."""
    with open(path, "rb") if file is None else nullcontext(file) as f:
        start = f.tell()
        require(zipfile.is_zipfile(f), f"{what} {path} is not a readable .npz (not a zip archive); {fix}")
        f.seek(start)
        try:
            with np.load(f, allow_pickle=False) as z:
                return {name: z[name] for name in z.files}
        except Exception as e:  # noqa: BLE001  (damage: OSError, BadZipFile, EOFError, zlib.error, ...)
            if isinstance(e, ValueError) and ("pickle" in str(e).lower() or "object" in str(e).lower()):
                raise RefimplError(f"{what} {path} holds an object (pickled) array, which refimpl never loads "
                                   "(unpickling can run code): save plain numeric arrays") from None
            raise RefimplError(f"{what} {path} is not a readable .npz ({type(e).__name__}: {e}); {fix}") from None


def sha256_of(file, chunk=1 << 22):
    """Hex sha256 of a binary file: a path, or an open file from its position on."""
    h = hashlib.sha256()
    with open(file, "rb") if isinstance(file, (str, Path)) else nullcontext(file) as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
