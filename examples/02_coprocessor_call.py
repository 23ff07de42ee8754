"""One coprocessor call (SPEC §4-5): decoder cache + soft tokens -> N_L latents, appended.

    python examples/02_coprocessor_call.py [--coprocessor runs/demo/copy-nl16/coprocessor.npz] [--small]
"""
import argparse

import numpy as np

from refimpl.config import get_preset
from refimpl.core import decoder as dec
from refimpl.core.coprocessor import augment, init_coprocessor
from refimpl.data.corpus import TINY_DATA
from refimpl.data.tokenizer import load_tokenizer
from refimpl.training.checkpoint import load_coprocessor, load_decoder
from refimpl.training.heldout import embedding_norm, mean_row_norm


def main(small, coprocessor, n_latents=8):
    tok = load_tokenizer()
    if small:
        cfg = get_preset("nano", vocab_size=tok.n_vocab)
        params, dec_hash = dec.init_params(cfg, seed=0), None
    else:
        params, cfg, meta = load_decoder(TINY_DATA / "checkpoints" / "decoder-demo.npz")
        dec_hash = meta["decoder_hash"]
    if coprocessor:
        trainable, _, _ = load_coprocessor(coprocessor, dec_hash)
    else:   # an untrained coprocessor: a copy of the decoder plus random soft tokens
        trainable = init_coprocessor(params, cfg, n_latents)
    prompt = np.array([[tok.eot_id] + tok.encode("Q: 348+275=? A:")])           # [1, p+1]
    logits, cache = dec.prefill(params, cfg, prompt)                            # C_p
    z = augment(trainable, cfg, cache)                                          # [1, N_L, D], ONE call
    print(f"prompt of {prompt.shape[1]} tokens -> latents z {z.shape}")
    print(f"latent norm {mean_row_norm(z):.2f} vs token-embedding norm {embedding_norm(params):.2f}")
    lat_logits, aug_cache = dec.extend(params, cfg, cache, z)                   # positions p+1..p+N_L
    print(f"cache {cache.length} -> {aug_cache.length} slots; positions {aug_cache.positions[0].tolist()}")
    for name, c, last in (("plain", cache, logits[:, -1]), ("augmented", aug_cache, lat_logits[:, -1])):
        new, _ = dec.generate(params, cfg, c, last, n_new=5)
        print(f"{name:>9}: {tok.decode(prompt[0, 1:])!r} -> {tok.decode(new[0])!r}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="random nano decoder instead of the shipped one")
    ap.add_argument("--coprocessor", default=None, help="a coprocessor.npz from `refimpl train`")
    a = ap.parse_args()
    main(a.small, a.coprocessor)
