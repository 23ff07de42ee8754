"""Augmented decoding (SPEC §5): equal to the hand-written sequence, batched = unbatched, delays
append the latents where they should, and a missing or broken coprocessor falls back cleanly."""
import numpy as np
import pytest

from refimpl.cli import main
from refimpl.config import get_preset
from refimpl.core.coprocessor import augment
from refimpl.core.decoder import extend, generate, init_params, prefill
from refimpl.data.tokenizer import load_tokenizer
from refimpl.evaluation.generate import generate_ids, generate_text, left_pad, load_or_fallback
from refimpl.training.checkpoint import load_coprocessor, load_decoder, save_decoder
from refimpl.training.train import TrainConfig, train

N_L = 3
PROMPTS = ["Q: 12+34=? A:", "Q: q=3 y=q*4. y=? A:", "Q: 7*8=? A:"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # A random nano decoder with init_std 0.2: a few pretraining steps give a model that repeats one
    # token, under which a wrong latent or position would go unnoticed; this one's tokens vary.
    root = tmp_path_factory.mktemp("gen")
    dec_path = root / "dec" / "ckpt.npz"
    cfg = get_preset("nano", init_std=0.2)
    save_decoder(dec_path, init_params(cfg, seed=0), cfg)
    train(dec_path, TrainConfig(n_latents=N_L, n_ahead=3, n_traces=4, batch_size=2, seq_len=24, steps=2,
                                eval_every=0, eval_batches=1), root / "run", quiet=True)
    params, cfg, meta = load_decoder(dec_path, np.float64)
    trainable = load_coprocessor(root / "run" / "coprocessor.npz", meta["decoder_hash"], np.float64)[0]
    tok = load_tokenizer()
    ids = [[tok.eot_id] + tok.encode(p) for p in PROMPTS]
    return dict(root=root, dec_path=dec_path, params=params, cfg=cfg, meta=meta, trainable=trainable,
                tok=tok, ids=ids)


def by_hand(s, ids, n_new, delay=0):
    """§5 with the inference API only: prefill, decode `delay` plain tokens, augment on the PROMPT's
    cache, extend by the latents, decode greedily from the last latent's logits."""
    params, cfg = s["params"], s["cfg"]
    logits, prompt_cache = prefill(params, cfg, np.array([ids]))
    first, cache = np.zeros((1, 0), dtype=np.int64), prompt_cache
    if delay:
        first, cache = generate(params, cfg, prompt_cache, logits[:, -1], delay)   # no latents yet
    z = augment(s["trainable"], cfg, prompt_cache)                            # [1, N_L, D]
    lg, cache = extend(params, cfg, cache, z)
    rest, _ = generate(params, cfg, cache, lg[:, -1], n_new - delay)
    return np.concatenate([first, rest], 1)[0].tolist()


def test_augmented_generation_equals_the_section5_sequence(setup):
    dec = generate_ids(setup["params"], setup["cfg"], setup["ids"], setup["trainable"], max_new_tokens=6)
    for ids, got in zip(setup["ids"], dec.tokens):       # batched, left-padded, vs one by one
        assert got == by_hand(setup, ids, 6)
    assert dec.latents.shape == (len(PROMPTS), N_L, setup["cfg"].d_model) and dec.latents_at == 0
    plain = generate_ids(setup["params"], setup["cfg"], setup["ids"], max_new_tokens=6)
    assert plain.tokens != dec.tokens                     # the latents matter, so the test can fail


def test_batched_equals_unbatched_without_coprocessor(setup):
    batched = generate_ids(setup["params"], setup["cfg"], setup["ids"], max_new_tokens=5).tokens
    single = [generate_ids(setup["params"], setup["cfg"], [ids], max_new_tokens=5).tokens[0] for ids in setup["ids"]]
    assert batched == single


@pytest.mark.parametrize("delay", [0, 2])
def test_background_thread_equals_synchronous(setup, delay):
    args = (setup["params"], setup["cfg"], setup["ids"], setup["trainable"])
    sync = generate_ids(*args, max_new_tokens=5, delay=delay, background=False)
    threaded = generate_ids(*args, max_new_tokens=5, delay=delay, background=True)
    assert sync.tokens == threaded.tokens and threaded.latents_at == delay


def test_delay_appends_latents_after_n_tokens(setup):
    delay, n_new = 2, 5
    dec = generate_ids(setup["params"], setup["cfg"], setup["ids"], setup["trainable"], max_new_tokens=n_new,
                       delay=delay)
    plain = generate_ids(setup["params"], setup["cfg"], setup["ids"], max_new_tokens=n_new)
    T = dec.prompt_len
    assert dec.latents_at == delay
    assert dec.cache.length == T + delay + N_L + (n_new - 1 - delay)       # the last token is never fed
    _, positions = left_pad(setup["ids"])
    for b, ids in enumerate(setup["ids"]):
        assert dec.tokens[b][:delay] == plain.tokens[b][:delay]           # the decoder did not wait
        assert dec.tokens[b] == by_hand(setup, ids, n_new, delay)
        slots = dec.cache.positions[b, T + delay:T + delay + N_L]          # latents after the delay tokens
        assert slots.tolist() == list(range(len(ids) + delay, len(ids) + delay + N_L))
    assert np.array_equal(dec.cache.positions[:, :T], positions)


def test_missing_coprocessor_falls_back_with_a_warning(setup, capsys, tmp_path):
    warnings = []
    assert load_or_fallback(tmp_path / "nope.npz", setup["meta"]["decoder_hash"], warn=warnings.append) is None
    assert load_or_fallback(setup["root"] / "run", "0" * 64, warn=warnings.append) is None  # another decoder
    assert len(warnings) == 2 and "another decoder" in warnings[1]
    common = ["generate", "--decoder", str(setup["dec_path"]), "--max-new-tokens", "4"] + \
        [a for p in PROMPTS[:2] for a in ("--prompt", p)]
    assert main(common) == 0
    want = capsys.readouterr()
    assert main(common + ["--coprocessor", str(tmp_path / "missing.npz")]) == 0
    got = capsys.readouterr()
    assert got.out == want.out and want.err == ""
    assert got.err.count("\n") == 1 and got.err.startswith("refimpl: warning: coprocessor")


def test_raising_coprocessor_falls_back_to_plain_decoding(setup):
    broken = {**setup["trainable"], "soft_tokens": np.zeros((N_L, 5))}     # wrong width: augment raises
    warnings = []
    for background in (False, True):
        got = generate_text(setup["params"], setup["cfg"], setup["tok"], PROMPTS, broken, max_new_tokens=4,
                            background=background, warn=warnings.append)
        assert got == generate_text(setup["params"], setup["cfg"], setup["tok"], PROMPTS, max_new_tokens=4)
    assert len(warnings) == 2 and all("coprocessor failed" in w for w in warnings)


def test_cli_with_coprocessor_and_delay_matches_python_api(setup, capsys):
    s = setup
    assert main(["generate", "--decoder", str(s["dec_path"]), "--coprocessor", str(s["root"] / "run"),
                 "--prompt", PROMPTS[0], "--max-new-tokens", "4", "--delay", "1"]) == 0
    out = capsys.readouterr()
    params, cfg, meta = load_decoder(s["dec_path"])
    trainable = load_coprocessor(s["root"] / "run" / "coprocessor.npz", meta["decoder_hash"])[0]
    want = generate_text(params, cfg, s["tok"], PROMPTS[:1], trainable, max_new_tokens=4, delay=1)
    assert out.out == PROMPTS[0] + want[0] + "\n" and out.err == ""


def test_sampling_is_seeded(setup):
    run = lambda seed: generate_text(setup["params"], setup["cfg"], setup["tok"], PROMPTS, setup["trainable"],
                                     max_new_tokens=4, temperature=1.0, seed=seed)
    assert run(3) == run(3)


@pytest.mark.parametrize("ahead, delay", [("continue", 0), ("original", 0), ("original", 2)])
def test_token_positions_after_latents(setup, ahead, delay):
    """SPEC §5: after the latents, tokens keep counting after them, or go on from the last token."""
    d = generate_ids(setup["params"], setup["cfg"], [setup["ids"][0]], setup["trainable"],
                     max_new_tokens=delay + 3, delay=delay, ahead_positions=ahead)
    p = len(setup["ids"][0]) - 1                                             # last prompt position
    pos = d.cache.positions[0, len(setup["ids"][0]):].tolist()              # everything fed after the prompt
    early = list(range(p + 1, p + 1 + delay))                                # tokens before the latents
    latents = list(range(p + 1 + delay, p + 1 + delay + N_L))
    start = latents[-1] + 1 if ahead == "continue" else p + 1 + delay
    assert pos == early + latents + [start, start + 1]                        # the last token is not fed back
