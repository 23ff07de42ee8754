"""The decoder and its explicit kv-cache (docs/method.md §1).

Runs a prompt through the decoder in one call, then in chunks through the cache, and shows that both
give the same logits (the cached == uncached invariant); prints the cache's layout.

    python examples/01_decoder_and_cache.py            # the shipped demo decoder
    python examples/01_decoder_and_cache.py --small    # a random nano decoder (seconds)
"""
import itertools
import sys

import numpy as np

from refimpl.config import get_preset
from refimpl.core import decoder as dec
from refimpl.data.corpus import SHIPPED_DECODER
from refimpl.data.tokenizer import load_tokenizer
from refimpl.training.checkpoint import load_decoder


def main(small):
    tok = load_tokenizer()
    if small:
        cfg = get_preset("nano", vocab_size=tok.n_vocab)
        params = dec.init_params(cfg, seed=0)
    else:
        params, cfg, _ = load_decoder(SHIPPED_DECODER)
    tokens = np.array([[tok.eot_id] + tok.encode("Q: 348+275=? A: 623")])      # [1, T]
    T = tokens.shape[1]
    logits, h, cache = dec.forward(params, cfg, tokens)                        # one call
    print(f"tokens {tokens.shape} -> logits {logits.shape}, hidden {h.shape}")
    print(f"cache: {len(cache.k)} layers of keys {cache.k[0].shape} [B, H, T, Dh] (after RoPE), "
          f"positions {cache.positions[0].tolist()}")

    # the same prompt in three chunks, each appended to the cache
    cuts, chunks, cache = [0, 3, T // 2, T], [], None
    for a, b in itertools.pairwise(cuts):
        lg, _, cache = dec.forward(params, cfg, tokens[:, a:b], cache=cache)
        chunks.append(lg)
    diff = np.abs(np.concatenate(chunks, axis=1) - logits).max()
    print(f"cached (chunks {cuts}) vs uncached: max |logit diff| = {diff:.2e}")

    # greedy continuation through the cache
    prompt = tokens[:, :-3]
    last, cache = dec.prefill(params, cfg, prompt)
    new, _ = dec.decode(params, cfg, cache, last[:, -1], n_new=4)
    print(f"prompt {tok.decode(prompt[0])!r} -> greedy {tok.decode(new[0])!r}")


if __name__ == "__main__":
    main(small="--small" in sys.argv[1:])
