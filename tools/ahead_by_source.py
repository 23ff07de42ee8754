"""Split a run's held-out ahead-token gap by where the point lies: English text or a reasoning line.

    python tools/ahead_by_source.py --decoder smollm2-135m --coprocessor RUN [--seq-len 256]
        [--skip-windows 64] [--eval-batches 4] [--batch-size 4] [--n-traces 16]

The val mixture interleaves English documents and one-line reasoning problems (docs/data.md). A
pretrained LLM has never seen the reasoning format, while the coprocessor trains on it, so an
average over both mixes two effects. This scores the same held-out points as `refimpl eval` (same
windows, seed and trace positions) and reports, for the points whose first ahead token x_{p+1}
lies in each source, the relative perplexity change (%) at ahead position 1 and the mean over
2..N_A, with the number of points. Prints one JSON object.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refimpl.data.corpus import load_tokens  # noqa: E402
from refimpl.evaluation.generate import trained_latent_positions  # noqa: E402
from refimpl.training.checkpoint import coprocessor_file, load_coprocessor, load_model  # noqa: E402
from refimpl.training.heldout import heldout_set, point_nll, relative_ppl_change  # noqa: E402


def source_labels(tokens, tokenizer):
    """bool [len(tokens)]: True where the token belongs to a reasoning line (a document "Q: ...")."""
    labels = np.zeros(len(tokens), bool)
    bounds = [0] + (np.nonzero(tokens == tokenizer.eot_id)[0] + 1).tolist() + [len(tokens)]
    for start, end in zip(bounds, bounds[1:]):
        labels[start:end] = tokenizer.decode(tokens[start:min(end, start + 4)].tolist()).startswith("Q:")
    return labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", required=True)
    ap.add_argument("--coprocessor", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--skip-windows", type=int, default=64)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--n-traces", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    dec, cfg, dec_meta, tok = load_model(args.decoder)
    trainable, _, meta = load_coprocessor(coprocessor_file(args.coprocessor), dec_meta["decoder_hash"])
    n_ahead, n_latents = int(meta["n_ahead"]), int(meta["n_latents"])
    val = load_tokens("val", tok)
    T = args.seq_len
    held = heldout_set(val, args.eval_batches, args.batch_size, T, args.n_traces, n_ahead, args.seed,
                       args.skip_windows)
    labels = source_labels(np.asarray(val), tok)
    windows = [pos for _, positions in held for pos in positions]                  # [n_windows][K]
    points = np.concatenate([labels[(args.skip_windows + i) * T + pos + 1]             # x_{p+1}'s source
                             for i, pos in enumerate(windows)])                        # [n_points]
    base = point_nll(dec, None, cfg, held, 0, n_ahead)
    aug = point_nll(dec, trainable, cfg, held, n_latents, n_ahead, trained_latent_positions(meta))
    out = {"run": str(args.coprocessor), "step": meta.get("step"), "n_ahead": n_ahead}
    for name, mask in (("all", np.ones_like(points)), ("english", ~points), ("reasoning", points)):
        change = relative_ppl_change(base[mask].mean(0), aug[mask].mean(0))
        out[name] = {"points": int(mask.sum()), "base_nll_pos1": round(float(base[mask, 0].mean()), 4),
                     "position_1": round(float(change[0]), 2), "positions_2_on": round(float(change[1:].mean()), 2)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
