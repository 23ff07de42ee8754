"""Weight interop with Llama implementations, and an independent PyTorch port (optional).

Needs torch (and transformers for the Hugging Face tests): `pip install torch transformers
safetensors`, or `pip install -e .[interop]`. Without them every test here is skipped, with the
reason. The expected values are the committed golden sets tiny_data/golden/{default, gqa,
latents-after}, compared with each set's own per-tensor tolerances (`refimpl.golden.verify.compare`),
so these tests check the same contract a port is held to; examples/torch_port.py must pass each set
at the float64 tier in float64 and at the float32 tier in float32 (its planted bugs are in
tests/test_golden.py). Run with `pytest tests/test_interop.py -s` to see the max diffs.

Hugging Face computes RoPE angles in float32 even in a float64 model (its inv_freq and position
products are cast to float), so its outputs differ from ours by ~1e-6, not 1e-15.
"""
import importlib.util
import inspect
import io
from pathlib import Path

import numpy as np
import pytest

from refimpl.golden.verify import compare, load, verify

pytestmark = pytest.mark.interop
ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tiny_data" / "golden"
SETS = ("default", "gqa", "latents-after")


@pytest.fixture(scope="module", params=SETS)
def gold(request):
    return load(COMMITTED / request.param)


def _check(name, spec, expected, actual):
    row = compare(name, spec, expected, actual)
    print(row["line"][:110])
    assert row["ok"], row["line"]
    return row["max_abs"]


# ---------------------------------------------------------------------------------------------
# Hugging Face LlamaForCausalLM / LlamaModel loaded with our weights
def _hf_config(manifest):
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    c, m = manifest["config"], manifest["config"]["model"]
    return transformers.LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["d_ff"],
        num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
        num_key_value_heads=m.get("n_kv_heads") or m["n_heads"], head_dim=c["head_dim"], rms_norm_eps=m["norm_eps"],
        rope_theta=m["rope_theta"], max_position_embeddings=m["max_seq_len"], hidden_act="silu",
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attn_implementation="eager")


def _state_dict(arrays, prefix, torch):
    return {n[len(prefix):]: torch.from_numpy(a) for n, a in arrays.items() if n.startswith(prefix)}


def _layer_kv(past, i):
    """keys, values of layer i from a transformers cache (across API versions)."""
    if hasattr(past, "layers"):
        return past.layers[i].keys, past.layers[i].values
    if hasattr(past, "key_cache"):
        return past.key_cache[i], past.value_cache[i]
    return past[i][0], past[i][1]


def _hf_decoder(manifest, arrays, torch):
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    model = transformers.LlamaForCausalLM(_hf_config(manifest)).double().eval()
    sd = _state_dict(arrays, "decoder.", torch)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]                 # tied head
    model.load_state_dict(sd, strict=True)
    return model


def test_hf_llama_decoder_logits_and_cache(gold):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    manifest, g = gold
    model = _hf_decoder(manifest, g, torch)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(g["tokens"]), use_cache=True)
    L = manifest["config"]["model"]["n_layers"]
    past = out.get("cache")                                # older transformers call it past_key_values
    if past is None:
        past = out.past_key_values
    ks, vs = zip(*[_layer_kv(past, i) for i in range(L)])
    spec = manifest["tensors"]
    print()
    diffs = [_check("baseline.logits", spec["baseline.logits"], g["baseline.logits"], out.logits.numpy()),
             _check("decoder_cache.k", spec["decoder_cache.k"], g["decoder_cache.k"], torch.stack(ks).numpy()),
             _check("decoder_cache.v", spec["decoder_cache.v"], g["decoder_cache.v"], torch.stack(vs).numpy())]
    assert max(diffs) < 1e-5   # float32 RoPE angles inside HF; everything else float64


def test_hf_llama_runs_the_augmented_loss(gold):
    """The whole objective with stock HF modules: the coprocessor is a LlamaModel over the soft
    tokens with past_key_values = the DECODER's cache, a custom 4-D mask and explicit position
    ids (the latents' by the set's config.latent_positions); the decoder is LlamaForCausalLM over the packed
    sequence with the packed mask and position ids. Latents, ahead logits, loss and every coprocessor
    gradient match."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    manifest, g = gold
    c = manifest["config"]
    B, T = g["tokens"].shape
    K, NL, NA, D, L = c["n_traces"], c["n_latents"], c["n_ahead"], c["model"]["d_model"], c["model"]["n_layers"]
    decoder = _hf_decoder(manifest, g, torch)
    cop = transformers.LlamaModel(_hf_config(manifest)).double()
    sd = _state_dict(g, "coprocessor.model.", torch)
    sd["embed_tokens.weight"] = torch.from_numpy(g["decoder.model.embed_tokens.weight"])  # unused
    cop.load_state_dict(sd, strict=True)
    soft = torch.tensor(g["soft_tokens"], requires_grad=True)

    cache = transformers.DynamicCache()
    for i in range(L):
        cache.update(torch.from_numpy(g["decoder_cache.k"][i]), torch.from_numpy(g["decoder_cache.v"][i]), i)
    tp = g["trace_positions"]
    latent_ids = tp[..., None] + 1 + np.arange(NL)                                     # "after": p+1+j
    if c["latent_positions"] == "behind":
        latent_ids = np.maximum(latent_ids - NL, 0)                                    # max(0, p-N_L+1+j)
    latent_pos = latent_ids.reshape(B, K * NL)
    # coprocessor mask: the decoder prefix x_0..x_p of its trace, its own soft tokens causally
    sees = np.zeros((B, K * NL, T + K * NL), bool)
    for b in range(B):
        for k in range(K):
            for j in range(NL):
                sees[b, k * NL + j, :tp[b, k] + 1] = True
                sees[b, k * NL + j, T + k * NL:T + k * NL + j + 1] = True
    cache_arg = "cache" if "cache" in inspect.signature(cop.forward).parameters else "past_key_values"
    z = cop(inputs_embeds=soft.expand(B * K, NL, D).reshape(B, K * NL, D), **{cache_arg: cache},
            position_ids=torch.from_numpy(latent_pos), attention_mask=_additive(sees, torch),
            use_cache=True).last_hidden_state.view(B, K, NL, D)

    E = decoder.model.embed_tokens.weight
    groups = torch.cat([z, E[torch.from_numpy(g["ahead.targets"][..., :-1])]], 2).view(B, -1, D)
    x = torch.cat([E[torch.from_numpy(g["tokens"])], groups], 1)
    G = NL + NA - 1
    group_pos = np.concatenate([latent_ids, tp[..., None] + 1 + np.arange(NA - 1)], -1)  # ahead x_{p+j} at p+j
    pos = np.concatenate([np.broadcast_to(np.arange(T), (B, T)), group_pos.reshape(B, K * G)], 1)
    assert np.array_equal(pos, g["packed.position_ids"])
    logits = decoder(inputs_embeds=x, position_ids=torch.from_numpy(pos),
                     attention_mask=_additive(g["packed.mask"], torch)).logits
    readout = torch.tensor([T + k * G + NL - 1 + j for k in range(K) for j in range(NA)])
    ahead = logits[:, readout].view(B, K, NA, -1)
    loss = torch.nn.functional.cross_entropy(ahead.flatten(0, 2), torch.from_numpy(g["ahead.targets"]).flatten())
    loss.backward()

    spec = manifest["tensors"]
    print()
    _check("latents", spec["latents"], g["latents"], z.detach().numpy())
    _check("ahead.logits", spec["ahead.logits"], g["ahead.logits"], ahead.detach().numpy())
    _check("loss", spec["loss"], g["loss"], loss.detach().numpy())
    grads = {"grad.coprocessor.model." + n: p.grad for n, p in cop.named_parameters() if p.grad is not None}
    grads["grad.soft_tokens"] = soft.grad
    expected = [n for n in spec if n.startswith("grad.")]
    assert sorted(grads) == sorted(expected)
    worst = max(_check(n, spec[n], g[n], grads[n].numpy()) for n in expected)
    print(f"max grad diff {worst:.2e}")


def _additive(may_attend, torch):
    """bool [B, Tq, Tk] -> HF 4-D additive mask [B, 1, Tq, Tk] (0 or the dtype's min)."""
    m = torch.from_numpy(np.asarray(may_attend))
    return torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, torch.finfo(torch.float64).min)[:, None]


# ---------------------------------------------------------------------------------------------
# The independent PyTorch port (examples/torch_port.py)
def _port():
    pytest.importorskip("torch", reason="torch is not installed: examples/torch_port.py needs it "
                                        "(pip install -e .[interop])")
    spec = importlib.util.spec_from_file_location("torch_port", ROOT / "examples" / "torch_port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_port_passes_the_golden_set_at_its_tier(name, dtype, tmp_path):
    """The port reads config.latent_positions and computes it: float64 passes the float64 tier, float32 the float32."""
    _port().main([str(COMMITTED / name), str(tmp_path / "port.npz"), "--dtype", dtype])
    report = io.StringIO()
    tier = verify(COMMITTED / name, tmp_path / "port.npz", out=report)
    last = report.getvalue().strip().splitlines()[-1]
    print("\n" + last)
    assert tier == dtype, report.getvalue()
    assert last.startswith(f"PASS {dtype}") and ", 0 missing" in last         # the port writes every golden name


# ---------------------------------------------------------------------------------------------
# Comparing generations with Hugging Face: refimpl feeds every prompt as <|endoftext|> + prompt
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Question: What is 8+3?\nAnswer:")


def test_text_prompts_are_fed_after_the_end_of_text_token():
    """`complete` (refimpl generate, eval) decodes [eot] + encode(prompt): pinned on the shipped decoder."""
    from refimpl.data.corpus import SHIPPED_DECODER
    from refimpl.evaluation.generate import complete, generate
    from refimpl.training.checkpoint import load_model
    params, cfg, _, tok = load_model(SHIPPED_DECODER)
    _, dec = complete(params, cfg, tok, list(PROMPTS[:2]), max_new_tokens=6)
    ids = [[tok.eot_id] + tok.encode(p) for p in PROMPTS[:2]]
    assert dec.tokens == generate(params, cfg, ids, max_new_tokens=6, stop_ids=(tok.eot_id,)).tokens
    assert dec.tokens != generate(params, cfg, [tok.encode(p) for p in PROMPTS[:2]], max_new_tokens=6,
                                  stop_ids=(tok.eot_id,)).tokens      # the prefix matters, so this can fail


def test_smollm2_greedy_equals_hugging_face_generate_on_the_same_ids():
    """Hugging Face's tokenizer adds no BOS for SmolLM2: given refimpl's ids ([<|endoftext|>] + prompt),
    HF's greedy `generate` gives the same tokens as refimpl's, token for token."""
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e .[interop]")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from refimpl.data.pretrained import MODELS, decoder_file
    from refimpl.evaluation.generate import complete
    from refimpl.training.checkpoint import load_model
    if not decoder_file("smollm2-135m").is_file():
        pytest.skip("run `refimpl fetch smollm2-135m` to test the real model")
    params, cfg, _, tok = load_model("smollm2-135m")
    assert tok.eot_id == 0 and tok.decode([0]) == "<|endoftext|>"
    gguf = decoder_file("smollm2-135m").parent / MODELS["smollm2-135m"].gguf_file
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for prompt in PROMPTS:
        ids = [tok.eot_id] + tok.encode(prompt)
        assert hf_tok.encode(prompt) == ids[1:]                              # no BOS added by HF
        _, dec = complete(params, cfg, tok, [prompt], max_new_tokens=8)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=tok.eot_id,
                              pad_token_id=tok.eot_id)                 # refimpl's stop rule: eot only
        print(repr(prompt), repr(tok.decode(dec.tokens[0])))
        assert dec.tokens[0] == out[0, len(ids):].tolist()
