"""One training step's loss and gradients in the three forms of docs/method.md §4, which must agree.

A: one decoder pass with the packed multi-trace mask (the paper's Fig. 2b);
B: the cached form that training uses (one prefill, then the soft slots and the groups against it);
C: a per-trace loop through the inference API (prefill, augment, extend) - the ground truth.

    python examples/03_three_forms.py
"""
import numpy as np

from refimpl.config import get_preset
from refimpl.core.coprocessor import init_coprocessor
from refimpl.core.decoder import init_params
from refimpl.core.layout import build_layout, format_mask, sample_trace_positions
from refimpl.core.objective import FORMS
from refimpl.training.autodiff import value_and_grad


def main(n_latents=2, n_ahead=3, n_traces=3):
    cfg = get_preset("nano", vocab_size=50)
    decoder = init_params(cfg, seed=0, dtype=np.float64)                 # float64 for exactness
    trainable = init_coprocessor(decoder, cfg, n_latents, seed=1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 12))                      # [B, T]
    positions = sample_trace_positions(rng, 2, 12, n_traces, n_ahead)     # [B, K]
    print("trace positions (insert after token index):", positions.tolist())
    layout = build_layout(tokens, positions, n_latents, n_ahead)
    print("packed mask of sequence 0 ('#' = may attend; zk, ak = latent, ahead slots of trace k):")
    labels = [f"x{i}" for i in range(12)] + [f"z{k}" if j < n_latents else f"a{k}"
                                             for k in range(n_traces) for j in range(layout.group_len)]
    print(format_mask(layout.packed_may_attend()[0], labels=labels))

    def loss_and_grads(form):
        loss = lambda t: form(decoder, t, cfg, tokens, positions, n_latents, n_ahead)[0]
        return value_and_grad(loss, trainable)

    results = {name: loss_and_grads(form) for name, form in FORMS.items()}              # (loss, grads, _)
    for name, (loss, _, _) in results.items():
        print(f"form {name:>10}: loss {float(loss):.12f}")
    for name in ("packed", "cached"):
        worst = max(np.abs(results[name][1][k] - results["per-trace"][1][k]).max() for k in trainable)
        print(f"{name} vs per-trace: max |gradient diff| over {len(trainable)} arrays = {worst:.1e}")


if __name__ == "__main__":
    main()
