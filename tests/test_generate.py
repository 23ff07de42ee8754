"""Augmented decoding (docs/method.md §3): equal to the hand-written sequence with the latents behind
the point and after it, batched = unbatched, delays append the latents where they should, the CLI
decodes under the convention the checkpoint was trained with, an older checkpoint is refused in one
line, and a missing or broken coprocessor falls back cleanly."""
from dataclasses import replace

import numpy as np
import pytest

from refimpl.cli import main
from refimpl.config import get_preset
from refimpl.core.coprocessor import augment
from refimpl.core.decoder import decode, extend, init_params, prefill
from refimpl.data.tokenizer import load_tokenizer
from refimpl.evaluation.generate import complete, generate, left_pad, trained_latent_positions
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
    small = TrainConfig(n_latents=N_L, n_ahead=3, n_traces=4, batch_size=2, seq_len=24, steps=2, eval_every=0,
                        eval_batches=1)
    train(dec_path, small, root / "run", quiet=True)                      # "behind": the default
    train(dec_path, replace(small, latent_positions="after"), root / "run-after", quiet=True)
    params, cfg, meta = load_decoder(dec_path, np.float64)
    trainable = load_coprocessor(root / "run" / "coprocessor.npz", meta["decoder_hash"], np.float64)[0]
    tok = load_tokenizer()
    ids = [[tok.eot_id] + tok.encode(p) for p in PROMPTS]
    return dict(root=root, dec_path=dec_path, params=params, cfg=cfg, meta=meta, trainable=trainable,
                tok=tok, ids=ids)


def by_hand(s, ids, n_new, delay=0, latents="behind"):
    """docs/method.md §3 with the inference API only: prefill, decode `delay` plain tokens, augment on
    the PROMPT's cache, extend by the latents (at the N_L ids up to the last token's, or at the next
    N_L ids), then decode greedily from the last latent's logits, the tokens after the latents at
    their own positions."""
    params, cfg = s["params"], s["cfg"]
    logits, prompt_cache = prefill(params, cfg, np.array([ids]))
    first, cache = np.zeros((1, 0), dtype=np.int64), prompt_cache
    if delay:
        first, cache = decode(params, cfg, prompt_cache, logits[:, -1], delay)     # no latents yet
    z, _ = augment(s["trainable"], cfg, prompt_cache, latents)                # [1, N_L, D]
    q = len(ids) - 1 + delay                                                  # the last token's position
    ids_z = np.arange(q + 1, q + 1 + N_L) if latents == "after" else np.maximum(np.arange(q - N_L + 1, q + 1), 0)
    lg, cache = extend(params, cfg, cache, z, ids_z[None])
    out, pos = first[0].tolist(), len(ids) + delay
    for _ in range(n_new - delay):
        out.append(int(np.argmax(lg[0, -1])))
        lg, cache = extend(params, cfg, cache, np.array([[out[-1]]]), np.array([[pos]]))
        pos += 1
    return out


@pytest.mark.parametrize("latents", ["behind", "after"])
def test_augmented_generation_equals_decoding_by_hand(setup, latents):
    prompts = setup["ids"] + [setup["ids"][0][:2]]       # a 2-token prompt: "behind" ids clamp at 0
    dec = generate(setup["params"], setup["cfg"], prompts, setup["trainable"], max_new_tokens=6,
                   latent_positions=latents)
    for ids, got in zip(prompts, dec.tokens):            # batched, left-padded, vs one by one
        assert got == by_hand(setup, ids, 6, latents=latents)
    assert dec.latents.shape == (len(prompts), N_L, setup["cfg"].d_model) and dec.latents_at == 0
    plain = generate(setup["params"], setup["cfg"], prompts, max_new_tokens=6)
    assert plain.tokens != dec.tokens                     # the latents matter, so the test can fail


def test_batched_equals_unbatched_without_coprocessor(setup):
    batched = generate(setup["params"], setup["cfg"], setup["ids"], max_new_tokens=5).tokens
    single = [generate(setup["params"], setup["cfg"], [ids], max_new_tokens=5).tokens[0] for ids in setup["ids"]]
    assert batched == single


@pytest.mark.parametrize("delay", [0, 2])
def test_background_thread_equals_synchronous(setup, delay):
    args = (setup["params"], setup["cfg"], setup["ids"], setup["trainable"])
    sync = generate(*args, max_new_tokens=5, delay=delay, background=False)
    threaded = generate(*args, max_new_tokens=5, delay=delay, background=True)
    assert sync.tokens == threaded.tokens and threaded.latents_at == delay


def test_delay_appends_latents_after_n_tokens(setup):
    delay, n_new = 2, 5
    dec = generate(setup["params"], setup["cfg"], setup["ids"], setup["trainable"], max_new_tokens=n_new,
                       delay=delay, latent_positions="after")
    plain = generate(setup["params"], setup["cfg"], setup["ids"], max_new_tokens=n_new)
    T = dec.prompt_len
    assert dec.latents_at == delay
    assert dec.cache.length == T + delay + N_L + (n_new - 1 - delay)       # the last token is never fed
    _, positions = left_pad(setup["ids"])
    for b, ids in enumerate(setup["ids"]):
        assert dec.tokens[b][:delay] == plain.tokens[b][:delay]           # the decoder did not wait
        assert dec.tokens[b] == by_hand(setup, ids, n_new, delay, latents="after")
        slots = dec.cache.positions[b, T + delay:T + delay + N_L]          # latents after the delay tokens
        assert slots.tolist() == list(range(len(ids) + delay, len(ids) + delay + N_L))
    assert np.array_equal(dec.cache.positions[:, :T], positions)


def test_missing_coprocessor_falls_back_with_a_warning(setup, capsys, tmp_path):
    other = tmp_path / "other.npz"                            # a decoder the run was not trained against
    save_decoder(other, init_params(setup["cfg"], seed=1), setup["cfg"])
    for dec, coprocessor, why in ((setup["dec_path"], tmp_path / "missing.npz", "missing.npz"),
                                  (other, setup["root"] / "run", "another decoder")):
        common = ["generate", "--decoder", str(dec), "--max-new-tokens", "4"] + \
            [a for p in PROMPTS[:2] for a in ("--prompt", p)]
        assert main(common) == 0
        want = capsys.readouterr()
        assert main(common + ["--coprocessor", str(coprocessor)]) == 0
        got = capsys.readouterr()
        assert got.out == want.out and want.err == ""
        assert got.err.count("\n") == 1 and got.err.startswith("refimpl: warning: coprocessor") and why in got.err


def test_raising_coprocessor_falls_back_to_plain_decoding(setup):
    broken = {**setup["trainable"], "soft_tokens": np.zeros((N_L, 5))}     # wrong width: augment raises
    warnings = []
    for background in (False, True):
        got = complete(setup["params"], setup["cfg"], setup["tok"], PROMPTS, broken, max_new_tokens=4,
                       background=background, warn=warnings.append)[0]
        assert got == complete(setup["params"], setup["cfg"], setup["tok"], PROMPTS, max_new_tokens=4)[0]
    assert len(warnings) == 2 and all("coprocessor failed" in w for w in warnings)


@pytest.mark.parametrize("run, latents", [("run", "behind"), ("run-after", "after")])
def test_cli_decodes_the_latents_where_they_were_trained(setup, capsys, run, latents):
    s = setup
    assert main(["generate", "--decoder", str(s["dec_path"]), "--coprocessor", str(s["root"] / run),
                 "--prompt", PROMPTS[0], "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    params, cfg, meta = load_decoder(s["dec_path"])
    trainable, _, cop_meta = load_coprocessor(s["root"] / run / "coprocessor.npz", meta["decoder_hash"])
    assert trained_latent_positions(cop_meta) == latents
    want = {lp: complete(params, cfg, s["tok"], PROMPTS[:1], trainable, max_new_tokens=6,
                         latent_positions=lp)[0][0] for lp in ("after", "behind")}
    assert want["after"] != want["behind"]               # so the test can fail
    assert out.out == PROMPTS[0] + want[latents] + "\n" and out.err == ""


@pytest.mark.parametrize("change, words", [
    ({"latent_positions": None}, "before the latents' position ids were recorded"),
    ({"ahead_positions": "continue"}, "ahead_positions='continue', an option removed"),
    ({"readout": "prenorm"}, "readout='prenorm', an option removed"),
    ({"soft_lr_scale": 3.0}, "soft_lr_scale=3.0, an option removed"),
    ({"soft_init": "embed"}, "soft_init='embed', an option removed")])
def test_an_older_checkpoint_gets_one_line_that_names_what_changed(setup, capsys, tmp_path, change, words):
    import json
    import shutil
    run = tmp_path / "old"
    shutil.copytree(setup["root"] / "run", run)
    meta = json.loads((run / "coprocessor.json").read_text())
    tc = {k: v for k, v in {**meta["train_config"], **change}.items() if v is not None}
    meta["train_config"] = tc
    meta.pop("meta_sha256", None)                                   # an edited file carries no hash
    (run / "coprocessor.json").write_text(json.dumps(meta))
    assert main(["eval", "--decoder", str(setup["dec_path"]), "--coprocessor", str(run), "--out",
                 str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "commit 2d4e58e" in err


def test_sampling_is_seeded(setup):
    run = lambda seed: complete(setup["params"], setup["cfg"], setup["tok"], PROMPTS, setup["trainable"],
                                max_new_tokens=4, temperature=1.0, seed=seed)[0]
    assert run(3) == run(3)


@pytest.mark.parametrize("latents, delay", [("after", 0), ("after", 2), ("behind", 0), ("behind", 2)])
def test_token_positions_after_latents(setup, latents, delay):
    """The latents sit behind the last token (p-N_L+1..p) or after it (p+1..p+N_L); after them, tokens
    go on from the last token's position, as if the latents took none."""
    d = generate(setup["params"], setup["cfg"], [setup["ids"][0]], setup["trainable"],
                 max_new_tokens=delay + 3, delay=delay, latent_positions=latents)
    p = len(setup["ids"][0]) - 1                                             # last prompt position
    pos = d.cache.positions[0, len(setup["ids"][0]):].tolist()              # everything fed after the prompt
    early = list(range(p + 1, p + 1 + delay))                                # tokens before the latents
    q = p + delay                                                            # the last token's position
    latents = list(range(q + 1, q + 1 + N_L) if latents == "after" else range(q - N_L + 1, q + 1))
    start = p + 1 + delay
    assert pos == early + latents + [start, start + 1]                        # the last token is not fed back


def test_the_shipped_coprocessor_decodes_against_the_shipped_decoder():
    """tiny_data/shipped-coprocessor: trained against the shipped decoder with the latents behind the
    point; `refimpl generate --coprocessor tiny_data/shipped-coprocessor` uses it at once."""
    from refimpl.data.corpus import SHIPPED_DECODER, TINY_DATA
    from refimpl.evaluation.generate import generate_from_files
    params, cfg, meta = load_decoder(SHIPPED_DECODER)
    trainable, _, cop_meta = load_coprocessor(TINY_DATA / "shipped-coprocessor" / "coprocessor.npz",
                                              meta["decoder_hash"])
    assert trained_latent_positions(cop_meta) == "behind"
    assert cop_meta["step"] == 10000 and trainable["soft_tokens"].shape == (8, cfg.d_model)
    warnings = []
    prompt = ["Q: 348+275=? A:"]
    got = generate_from_files(SHIPPED_DECODER, TINY_DATA / "shipped-coprocessor", prompt, max_new_tokens=6,
                              warn=warnings.append)
    assert not warnings and got == [" 691\n"]                      # the decoder alone: " 611\n" (623 is right)
    assert generate_from_files(SHIPPED_DECODER, None, prompt, max_new_tokens=6) == [" 611\n"]
