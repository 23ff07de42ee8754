"""Augmented decoding (SPEC §5) and `refimpl generate`: prompts in, text out.

One implementation of decoding with a coprocessor, shared by the CLI and by the evaluation
(paper Tables 2 and 8):

    prefill   [eot] + prompt                      -> cache C_p, logits          (left-padded batch)
    decode    `delay` tokens without latents      (the decoder does not wait for the coprocessor)
    augment   z = coprocessor(C_p, S)             ONE call on the PROMPT's cache, maybe in a thread
    extend    the decoder runs z after those tokens; positions keep counting
    decode    the next token is read at the last latent, then greedy or sampled decoding goes on

With delay = 0 this is exactly the paper's "coprocessor called once at the end of the prompt".
With delay = N the latents arrive N tokens late (paper Table 8). The decoder waits for them at
token N if they are not ready, so the output depends only on N, never on thread timing.

Prompts of different lengths share a batch by left padding: pad slots get position id -1, which
no other slot attends to, and each prompt's real tokens get positions 0..len-1.
"""
import functools
import sys
import threading
from dataclasses import dataclass

import numpy as np

from ..backend import get_dtype, get_xp, xp_of
from ..core.coprocessor import augment
from ..core.decoder import KVCache, extend, prefill, sample_next
from ..core.layout import AHEAD_POSITIONS
from ..data.tokenizer import load_tokenizer
from ..errors import RefimplError, require
from ..training.checkpoint import check_tokenizer, coprocessor_file, load_coprocessor, load_decoder

PAD_POSITION = -1


# ---------------------------------------------------------------------------------------------
# Prompts as a left-padded batch
def encode_prompts(tokenizer, prompts):
    """Texts -> token id lists [eot] + encode(prompt): every document starts after an eot."""
    return [[tokenizer.eot_id] + tokenizer.encode(p) for p in prompts]


def left_pad(prompt_ids, pad_id=0):
    """Ragged id lists -> tokens int64 [B, T] and positions int64 [B, T] (-1 on pad slots)."""
    require(len(prompt_ids) > 0 and all(len(p) > 0 for p in prompt_ids),
            "every prompt needs at least one token: pass non-empty prompts")
    T = max(len(p) for p in prompt_ids)
    tokens = np.full((len(prompt_ids), T), pad_id, dtype=np.int64)
    positions = np.full((len(prompt_ids), T), PAD_POSITION, dtype=np.int64)
    for b, p in enumerate(prompt_ids):
        tokens[b, T - len(p):] = p
        positions[b, T - len(p):] = np.arange(len(p))
    return tokens, positions


@functools.lru_cache(maxsize=4)
def stop_token_ids(tokenizer, at_newline=True):
    """Ids that end a completion: eot, plus every token whose text holds a newline."""
    ids = [tokenizer.eot_id]
    if at_newline:
        ids += [i for i in range(tokenizer.n_vocab) if i != tokenizer.eot_id
                and "\n" in tokenizer.decode([i])]
    return tuple(ids)


# ---------------------------------------------------------------------------------------------
# The latents: computed now, or in a background thread while the decoder goes on
class PendingLatents:
    """z = augment(trainable, cfg, cache) [B, N_L, D], started at once; `result()` waits for it."""

    def __init__(self, trainable, cfg, cache, background):
        self._args, self._z, self._error = (trainable, cfg, cache), None, None
        self._thread = threading.Thread(target=self._run, daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    def _run(self):
        try:
            self._z = augment(*self._args)
        except Exception as e:  # reported by result(), in the decoding thread
            self._error = e

    def result(self):
        if self._thread is None:
            self._run()
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._z


def warn_stderr(message):
    print(f"refimpl: warning: {' '.join(str(message).split())}", file=sys.stderr)


@dataclass
class Decoded:
    tokens: list            # per prompt, the new ids up to and including the stop token
    cache: KVCache          # the decoder cache after the last token fed
    prompt_len: int         # T of the padded prompt batch
    latents: object = None  # z [B, N_L, D] if the latents were appended, else None
    latents_at: int = None  # tokens generated before the latents were appended (the delay)


# ---------------------------------------------------------------------------------------------
# Decoding
def generate_ids(dec_params, cfg, prompt_ids, trainable=None, max_new_tokens=32, temperature=0.0,
                 seed=0, delay=0, stop_ids=(), background=False, warn=warn_stderr,
                 ahead_positions="original"):
    """Decode a left-padded batch of prompts, with the coprocessor called once on the prompt.

    The latents are appended once `delay` tokens have been generated. If the coprocessor
    raises, `warn` gets one line and decoding goes on without latents.

    The decoder reads at most T + max_new_tokens - 1 token slots (T: the longest prompt), and
    that must fit in max_seq_len: decoding past the context the decoder was trained on is an
    error, never a silent extrapolation. The N_L latents are extra slots, as in training.
    ahead_positions (SPEC §5): after the latents, token positions keep counting after them
    ("continue") or go on from the last token's position ("original"), as the coprocessor was
    trained.
    """
    require(ahead_positions in AHEAD_POSITIONS, f"unknown ahead_positions {ahead_positions!r}: "
            f"use one of {', '.join(AHEAD_POSITIONS)}")
    require(max_new_tokens >= 0 and delay >= 0, "--max-new-tokens and --delay must be >= 0")
    xp = xp_of(dec_params["embed_tokens"])
    tokens, positions = left_pad(prompt_ids)                                  # [B, T]
    T = tokens.shape[1]
    require(T > cfg.max_seq_len or T + max_new_tokens - 1 <= cfg.max_seq_len,
            f"a prompt of {T} tokens plus --max-new-tokens {max_new_tokens} runs past the decoder's "
            f"max_seq_len={cfg.max_seq_len}: pass --max-new-tokens {cfg.max_seq_len - T + 1} or "
            "less, or shorten the prompt")
    logits, cache = prefill(dec_params, cfg, xp.asarray(tokens), xp.asarray(positions))
    last = logits[:, -1]                                                      # [B, V]
    pending = None if trainable is None else PendingLatents(trainable, cfg, cache, background)
    rng, B = np.random.default_rng(seed), tokens.shape[0]
    out, done, z, z_at = [], np.zeros(B, dtype=bool), None, None
    token_pos = cache.next_positions(1)                                       # [B, 1]
    for i in range(max_new_tokens):
        if pending is not None and i == delay:
            z, pending = _await(pending, warn), None
            if z is not None:
                lg, cache = extend(dec_params, cfg, cache, z)                  # after the last slot
                last, z_at = lg[:, -1], i                                     # read at the last latent
                if ahead_positions == "continue":
                    token_pos = cache.next_positions(1)
        nxt = sample_next(last, temperature, rng)                             # [B]
        out.append(nxt)
        done |= np.isin(nxt, stop_ids)
        if done.all() or i == max_new_tokens - 1:
            break
        lg, cache = extend(dec_params, cfg, cache, xp.asarray(nxt[:, None]), token_pos)  # [B, 1, V]
        last, token_pos = lg[:, -1], token_pos + 1
    new = np.stack(out, 1) if out else np.zeros((B, 0), dtype=np.int64)        # [B, n]
    return Decoded([_until_stop(row, stop_ids) for row in new], cache, tokens.shape[1], z, z_at)


def _await(pending, warn):
    try:
        return pending.result()
    except Exception as e:
        warn(f"the coprocessor failed ({type(e).__name__}: {e}); decoding without latents")
        return None


def _until_stop(row, stop_ids):
    ids = [int(t) for t in row]
    for j, t in enumerate(ids):
        if t in stop_ids:
            return ids[:j + 1]
    return ids


def complete(dec_params, cfg, tokenizer, prompts, trainable=None, max_new_tokens=32,
             temperature=0.0, seed=0, delay=0, stop_at_newline=False, background=False,
             warn=warn_stderr, ahead_positions="original"):
    """(completion texts, Decoded) for text prompts fed as [eot] + prompt.

    A completion ends at eot (not included) and, with stop_at_newline, at the first newline.
    """
    stops = stop_token_ids(tokenizer, stop_at_newline)
    dec = generate_ids(dec_params, cfg, encode_prompts(tokenizer, prompts), trainable,
                       max_new_tokens, temperature, seed, delay, stops, background, warn,
                       ahead_positions)
    texts = [tokenizer.decode([t for t in ids if t != tokenizer.eot_id]) for ids in dec.tokens]
    return [t.split("\n")[0] if stop_at_newline else t for t in texts], dec


def generate_text(dec_params, cfg, tokenizer, prompts, trainable=None, **options):
    """Completions (list of str) of text prompts; options as `complete`."""
    return complete(dec_params, cfg, tokenizer, prompts, trainable, **options)[0]




def load_or_fallback(path, decoder_hash, dtype=np.float32, xp=np, warn=warn_stderr, with_meta=False):
    """The coprocessor's trainable arrays, or None (with one warning) if it cannot be used.

    with_meta: return (trainable, meta) instead; meta is {} when falling back.
    """
    try:
        trainable, _, meta = load_coprocessor(coprocessor_file(path), decoder_hash, dtype, xp)
    except (RefimplError, OSError, ValueError, KeyError) as e:
        warn(f"coprocessor {path} not used ({e}); decoding with the decoder alone")
        trainable, meta = None, {}
    return (trainable, meta) if with_meta else trainable


def generate_from_files(decoder_path, coprocessor_path, prompts, backend="numpy", dtype="float32", **options):
    """`refimpl generate`: completions of prompts by a decoder checkpoint, with a coprocessor if given.

    The coprocessor decodes under the position convention it was trained with; an unusable one
    falls back to the decoder alone with one warning. options: as `complete`.
    """
    xp, dt = get_xp(backend), get_dtype(dtype)
    dec_params, cfg, meta = load_decoder(decoder_path, dt, xp)
    tokenizer = load_tokenizer()
    check_tokenizer(meta, tokenizer.sha256, decoder_path)
    trainable, cop_meta = (None, {}) if coprocessor_path is None else load_or_fallback(
        coprocessor_path, meta["decoder_hash"], dt, xp, with_meta=True)
    ahead = cop_meta.get("train_config", {}).get("ahead_positions", "continue")
    return generate_text(dec_params, cfg, tokenizer, prompts, trainable, background=True,
                         ahead_positions=ahead, **options)
