"""One coprocessor training step on a fetched LLM: its time, peak memory and loss.

    refimpl fetch smollm2-135m && python tools/llm_train_step.py [--steps 3] [--seq-len 256]

Copy-initialised coprocessor, N_L 8, N_A 8, K 8 points, one window of T tokens from the start of
tiny_data's val text (tokenized with the model's own tokenizer), float32 NumPy. Prints one JSON
object: seconds per step (the first includes warm-up), the peak resident memory of this process
(VmHWM) beside refimpl.memory's estimate, the augmented loss of each step, and the frozen
decoder's own loss on the same targets (no latents).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl import memory  # noqa: E402
from refimpl.core.coprocessor import init_coprocessor  # noqa: E402
from refimpl.core.layout import sample_trace_positions  # noqa: E402
from refimpl.core.objective import loss_cached  # noqa: E402
from refimpl.data.corpus import load_tokens  # noqa: E402
from refimpl.training.checkpoint import load_model  # noqa: E402
from refimpl.training.optim import adam_init  # noqa: E402
from refimpl.training.train import TrainConfig, train_step  # noqa: E402


def vmhwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    N_L, N_A, K, B, T = 8, 8, 8, 1, a.seq_len
    dec, cfg, meta, tok = load_model(a.model)
    tokens = np.asarray(load_tokens("val", tok)[:T], dtype=np.int64)[None]              # [1, T]
    positions = sample_trace_positions(np.random.default_rng(0), B, T, K, N_A)
    tc = TrainConfig(n_latents=N_L, n_ahead=N_A, n_traces=K, batch_size=B, seq_len=T)
    trainable = init_coprocessor(dec, cfg, N_L)
    adam = adam_init(trainable)
    base = float(loss_cached(dec, None, cfg, tokens, positions, N_L, N_A)[0])
    seconds, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        trainable, adam, stats = train_step(dec, trainable, adam, cfg, tc, tokens, positions, 1e-4)
        seconds.append(time.perf_counter() - t0)
        losses.append(stats["loss"])
    estimate = memory.train_step(cfg, B, T, K, N_L, N_A).total / 2**20
    print(json.dumps({"model": a.model, "T": T, "B": B, "K": K, "n_latents": N_L, "n_ahead": N_A,
                      "latent_positions": tc.latent_positions, "step_seconds": seconds, "augmented_loss": losses,
                      "decoder_alone_loss": base, "peak_rss_mb": vmhwm_mb(), "memory_estimate_mb": estimate}))


if __name__ == "__main__":
    main()
