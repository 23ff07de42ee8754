"""Peak memory and time of writing and reading one checkpoint, against the size of its arrays.

    python benchmarks/checkpoint_memory.py [--gb 1.28] [--dir /tmp/ckpt-bench]   # prints one JSON object

A coprocessor checkpoint holds the trainable arrays and both Adam moments: 1.27 GB for SmolLM2-135M
(106M float32 values). Save and load each run in a fresh process, so each peak (`ru_maxrss`) is that
operation's own. Both stream the .npz through the file: the extra memory of either should be a small
fraction of the arrays (it was one full copy each when the .npz went through an in-memory buffer).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from refimpl.training.checkpoint import load_checkpoint, save_checkpoint
n = {n}
if {save}:
    arrays = {{f"a{{i}}": np.full(n // 8, float(i), dtype=np.float32) for i in range(8)}}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
if {save}:
    save_checkpoint({path!r}, arrays, {{"kind": "bench"}})
else:
    arrays, _ = load_checkpoint({path!r})
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"arrays_bytes": sum(a.nbytes for a in arrays.values()), "peak_before": before,
                  "peak": peak, "seconds": seconds}}))
"""


def measure(n, path, save):
    code = CHILD.format(root=str(ROOT), n=n, save=save, path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    extra = r["peak"] - r["peak_before"] - (0 if save else r["arrays_bytes"])   # save: arrays in before
    return {"seconds": round(r["seconds"], 2), "peak_gb": round(r["peak"] / 1e9, 3),
            "extra_over_arrays": round(max(extra, 0) / r["arrays_bytes"], 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.28, help="size of the checkpoint's arrays (GB)")
    ap.add_argument("--dir", default="/tmp/ckpt-bench", help="where the checkpoint is written (and left)")
    args = ap.parse_args()
    n = int(args.gb * 1e9 / 4) // 8 * 8                                   # float32 values, 8 arrays
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    path = Path(args.dir) / "bench.npz"
    print(json.dumps({"arrays_gb": round(n * 4 / 1e9, 3), "save": measure(n, path, True),
                      "load": measure(n, path, False)}, indent=1))


if __name__ == "__main__":
    main()
