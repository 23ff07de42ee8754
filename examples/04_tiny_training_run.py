"""A tiny end-to-end run: pretrain a nano decoder, freeze it, train a coprocessor against it.

Prints the held-out loss of the frozen decoder alone and with augmentation at each ahead position
1..N_A (N_A = 4); about 45 s on two CPU cores. A decoder already in OUT/decoder is reused.

    python examples/04_tiny_training_run.py [--out runs/example] [--pretrain-steps 300] [--steps 200]
"""
import argparse
from pathlib import Path

from refimpl.cli import main as cli
from refimpl.training.train import TrainConfig, train


def main(out, pretrain_steps, steps):
    out = Path(out)
    if not (out / "decoder" / "ckpt.npz").exists():
        assert cli(["pretrain", "--preset", "nano", "--steps", str(pretrain_steps),
                    "--out", str(out / "decoder")]) == 0
    tc = TrainConfig(n_latents=4, n_ahead=4, n_traces=8, batch_size=4, seq_len=64, steps=steps,
                     lr=3e-3, warmup=max(1, steps // 10), eval_every=0, eval_batches=2)
    m = train(out / "decoder" / "ckpt.npz", tc, out / "coprocessor")
    for n, (b, a) in enumerate(zip(m["baseline_ahead_loss"], m["augmented_ahead_loss"]), 1):
        print(f"ahead position {n}: decoder alone {b:.3f}, augmented {a:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/example")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    main(a.out, a.pretrain_steps, a.steps)
