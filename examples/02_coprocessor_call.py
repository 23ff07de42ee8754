"""One coprocessor call (docs/method.md §2-3): decoder cache + soft tokens -> N_L latents, appended.

Prefills a prompt, calls the coprocessor ONCE on its cache, appends the latents, then decodes the
prompt with and without them through evaluation.generate.complete (the one implementation of
augmented decoding, under the checkpoint's latent positions): what `refimpl generate` prints.

    refimpl demo --quick                                                  # writes runs/demo/runs/copy-nl8/
    python examples/02_coprocessor_call.py --coprocessor runs/demo/runs/copy-nl8
    python examples/02_coprocessor_call.py            # the shipped decoder, an untrained coprocessor
    python examples/02_coprocessor_call.py --small    # a random nano decoder (seconds)
"""
import argparse

import numpy as np

from refimpl.config import get_preset
from refimpl.core import decoder as dec
from refimpl.core.coprocessor import augment, init_coprocessor
from refimpl.data.corpus import SHIPPED_DECODER
from refimpl.data.tokenizer import load_tokenizer
from refimpl.evaluation.generate import complete, trained_latent_positions
from refimpl.training.checkpoint import coprocessor_file, load_coprocessor, load_decoder
from refimpl.training.heldout import embedding_norm, mean_row_norm

PROMPT, NEW_TOKENS = "Q: 348+275=? A:", 5


def load(small, coprocessor, n_latents=8):
    """(decoder params, cfg, trainable, latent_positions): a trained coprocessor under the convention it
    was trained with, or an untrained one (a copy of the decoder plus random soft tokens), "behind"."""
    if small:
        cfg = get_preset("nano", vocab_size=load_tokenizer().n_vocab)
        params = dec.init_params(cfg, seed=0)
    else:
        params, cfg, meta = load_decoder(SHIPPED_DECODER)
    if not coprocessor:
        return params, cfg, init_coprocessor(params, cfg, n_latents), "behind"
    trainable, _, cop_meta = load_coprocessor(coprocessor_file(coprocessor), meta["decoder_hash"])
    return params, cfg, trainable, trained_latent_positions(cop_meta)


def main(small, coprocessor):
    tok = load_tokenizer()
    params, cfg, trainable, latents = load(small, coprocessor)
    prompt = np.array([[tok.eot_id] + tok.encode(PROMPT)])                    # [1, p+1]
    p = prompt.shape[1] - 1
    _, cache = dec.prefill(params, cfg, prompt)                               # C_p
    z, z_positions = augment(trainable, cfg, cache, latents)                  # [1, N_L, D], ONE call
    print(f"prompt of {p + 1} tokens -> latents z {z.shape}")
    print(f"latent norm {mean_row_norm(z):.2f} vs token-embedding norm {embedding_norm(params):.2f}")
    _, aug_cache = dec.extend(params, cfg, cache, z, z_positions)
    print(f"latents {latents!r} the point: cache {cache.length} -> {aug_cache.length} slots; "
          f"positions {aug_cache.positions[0].tolist()}")
    print(f"the tokens after the latents keep their own ids: the first at position {p + 1}")
    for name, t in (("plain", None), ("augmented", trainable)):
        texts, _ = complete(params, cfg, tok, [PROMPT], t, max_new_tokens=NEW_TOKENS,
                            latent_positions=latents)
        print(f"{name:>9}: {PROMPT!r} -> {texts[0]!r}")
    if coprocessor:
        print(f"the augmented completion is what this prints after the prompt: refimpl generate "
              f"--coprocessor {coprocessor} --prompt '{PROMPT}' --max-new-tokens {NEW_TOKENS}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="random nano decoder instead of the shipped one")
    ap.add_argument("--coprocessor", help="a run folder or coprocessor.npz from `refimpl train`")
    a = ap.parse_args()
    if a.small and a.coprocessor:
        ap.error("--coprocessor needs the shipped decoder it was trained against: drop --small")
    main(a.small, a.coprocessor)
