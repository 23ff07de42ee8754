"""Augmented decoding, the one implementation, and `refimpl generate` (docs/method.md §3): prefill
[eot] + prompt (left-padded), decode `delay` tokens, append the latents of ONE coprocessor call on the
PROMPT's cache (maybe run in a thread), go on from the last latent. delay = N (Table 8) waits for the
latents at token N: the output depends on N only, never on thread timing."""
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np

from ..backend import get_dtype, get_xp, xp_of
from ..core.coprocessor import augment
from ..core.decoder import KVCache, extend, prefill, sample_next
from ..core.layout import LATENT_POSITIONS, latent_position_ids
from ..errors import require
from ..training.checkpoint import coprocessor_file, load_coprocessor, load_model


def left_pad(prompt_ids):
    """Ragged id lists -> tokens and positions, int64 [B, T]; pads: id 0 at position -1 (never attended)."""
    require(len(prompt_ids) > 0 and all(len(p) > 0 for p in prompt_ids),
            "every prompt needs at least one token: pass non-empty prompts")
    T = max(len(p) for p in prompt_ids)
    tokens = np.array([[0] * (T - len(p)) + list(p) for p in prompt_ids], dtype=np.int64)
    return tokens, np.array([[-1] * (T - len(p)) + list(range(len(p))) for p in prompt_ids], dtype=np.int64)


@lru_cache(maxsize=4)
def stop_token_ids(tokenizer, at_newline=True):
    """Ids that end a completion: eot, and with at_newline every token whose text holds a newline."""
    eot, scanned = tokenizer.eot_id, range(tokenizer.n_vocab) if at_newline else ()
    return (eot, *(i for i in scanned if i != eot and "\n" in tokenizer.decode([i])))


def warn_stderr(message):
    print(f"refimpl: warning: {' '.join(str(message).split())}", file=sys.stderr)


@dataclass
class Decoded:
    tokens: list            # per prompt, the new ids up to and including the stop token
    cache: KVCache          # the decoder cache after the last token fed
    prompt_len: int         # T of the padded prompt batch
    latents: object = None  # z [B, N_L, D] if the latents were appended, else None
    latents_at: int = None  # tokens generated before the latents were appended (the delay)


def generate(dec_params, cfg, prompt_ids, trainable=None, max_new_tokens=32, temperature=0.0,
             seed=0, delay=0, stop_ids=(), background=False, warn=warn_stderr, latent_positions="behind"):
    """Decode a batch of prompts (module docstring); if the coprocessor raises, `warn` gets one line and no
    latents are used. T + max_new_tokens - 1 token slots (T: the longest prompt) must fit in max_seq_len."""
    require(latent_positions in LATENT_POSITIONS, f"unknown latent_positions={latent_positions!r}: "
            f"use one of {', '.join(LATENT_POSITIONS)}")
    require(max_new_tokens >= 0 and delay >= 0,
            f"max_new_tokens={max_new_tokens} and delay={delay} must both be >= 0")
    xp = xp_of(dec_params["embed_tokens"])
    tokens, positions = left_pad(prompt_ids)                                  # [B, T]
    B, T = tokens.shape
    require(T > cfg.max_seq_len or T + max_new_tokens - 1 <= cfg.max_seq_len, f"a prompt of {T} tokens plus "
            f"max_new_tokens={max_new_tokens} runs past the decoder's max_seq_len={cfg.max_seq_len}: pass "
            f"max_new_tokens={cfg.max_seq_len - T + 1} or less, or shorten the prompt")
    logits, cache = prefill(dec_params, cfg, xp.asarray(tokens), xp.asarray(positions))
    last = logits[:, -1]                                                      # [B, V]
    # () -> (z [B, N_L, D], ids): augment on the prompt's cache when called, or in a thread started now
    pending = None if trainable is None else partial(augment, trainable, cfg, cache, latent_positions)
    if pending is not None and background:
        pool = ThreadPoolExecutor(max_workers=1)
        pending = pool.submit(pending).result                 # waits for the thread, raises augment's error
        pool.shutdown(wait=False)                             # the thread ends when augment returns
    rng, out, done, z, z_at = np.random.default_rng(seed), [], np.zeros(B, dtype=bool), None, None
    token_pos = cache.next_positions(1)                                       # [B, 1]
    for i in range(max_new_tokens):
        if pending is not None and i == delay:
            try:
                z = pending()[0]                                              # [B, N_L, D]
            except Exception as e:                # noqa: BLE001  any failure: decode without latents
                warn(f"the coprocessor failed ({type(e).__name__}: {e}); decoding without latents")
            else:                                           # ids [B, N_L] behind / after the LAST token
                ids = latent_position_ids(cache.positions.max(1), z.shape[1], latent_positions, xp)
                lg, cache = extend(dec_params, cfg, cache, z, ids)
                last, z_at = lg[:, -1], i                                     # read at the last latent
        nxt = sample_next(last, temperature, rng)                             # [B]
        out.append(nxt)
        done |= np.isin(nxt, stop_ids)
        if done.all() or i == max_new_tokens - 1:
            break
        lg, cache = extend(dec_params, cfg, cache, xp.asarray(nxt[:, None]), token_pos)  # [B, 1, V]
        last, token_pos = lg[:, -1], token_pos + 1
    rows = [[int(t) for t in row] for row in (np.stack(out, 1) if out else np.zeros((B, 0)))]  # [B][n]
    ends = [next((j for j, t in enumerate(ids) if t in stop_ids), len(ids) - 1) for ids in rows]
    return Decoded([ids[:end + 1] for ids, end in zip(rows, ends)], cache, T, z, z_at)   # up to the stop


def complete(dec_params, cfg, tokenizer, prompts, trainable=None, stop_at_newline=False, **options):
    """(texts, Decoded) of [eot] + prompt; a text ends at eot (excluded), or a newline if stop_at_newline."""
    ids = [[tokenizer.eot_id] + tokenizer.encode(p) for p in prompts]
    stops = stop_token_ids(tokenizer, stop_at_newline)
    dec = generate(dec_params, cfg, ids, trainable, stop_ids=stops, **options)
    texts = [tokenizer.decode([t for t in new if t != tokenizer.eot_id]) for new in dec.tokens]
    return [t.split("\n")[0] if stop_at_newline else t for t in texts], dec


def trained_latent_positions(meta):
    """The latent_positions a coprocessor checkpoint was trained with (checked on load)."""
    return meta["train_config"]["latent_positions"]


def generate_from_files(decoder_path, coprocessor_path, prompts, backend="numpy", dtype="float32", **options):
    """`refimpl generate`: the coprocessor at its trained latent positions (unusable: warn, no latents)."""
    xp, dt = get_xp(backend), get_dtype(dtype)
    dec_params, cfg, meta, tokenizer = load_model(decoder_path, dt, xp)
    trainable, latent_positions = None, "behind"
    if coprocessor_path is not None:
        try:
            path = coprocessor_file(coprocessor_path)
            trainable, _, cop_meta = load_coprocessor(path, meta["decoder_hash"], dt, xp)
        except Exception as e:  # noqa: BLE001  (the documented fall-back, whatever is wrong with the file)
            warn_stderr(f"coprocessor {coprocessor_path} not used ({e}); decoding with the decoder alone")
        else:
            latent_positions = trained_latent_positions(cop_meta)
    return complete(dec_params, cfg, tokenizer, prompts, trainable, background=True,
                    latent_positions=latent_positions, **options)[0]
