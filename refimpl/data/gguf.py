"""Read a llama-architecture GGUF file (llama.cpp's format) as a GGUFModel, every tensor dequantized to
float32 under refimpl's Hugging Face Llama names. `gguf` (llama.cpp's own reader, pure Python + NumPy) is an
optional dependency: `pip install 'refimpl[llm]'`."""
from collections import namedtuple

import numpy as np

from ..config import ModelConfig
from ..errors import RefimplError, require

# GGUF tensor name -> Hugging Face Llama name; a layer's are blk.{i}.<LAYER_NAMES key>.weight
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
# tokenizer.ggml.*: V token strings (id = index; bytes spelled with GPT-2's byte-to-unicode table), V types
# (1 normal, 3 control), "left right" merges in priority order, the pre-tokenizer's name (e.g. "smollm")
Vocab = namedtuple("Vocab", "tokens token_types merges pre")
# {Hugging Face name: float32 array}, ModelConfig, Vocab, {name, file type, tensor types, special ids, ...}
GGUFModel = namedtuple("GGUFModel", "arrays config vocab info")


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise RefimplError("reading GGUF needs the `gguf` package: pip install 'refimpl[llm]'") from None
    return gguf


def read_gguf(path):
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise RefimplError(f"{path} is not a readable GGUF file ({e}): re-download it") from None
    meta = {name: field_value(field) for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    require(arch == "llama", f"{path} holds a {arch!r} model; refimpl reads llama-architecture GGUF files")
    cfg = gguf_config(meta, path)
    arrays = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name, path)
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims fastest first: [D_in, D_out]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rows(w, cfg.n_heads if "q_proj" in name else cfg.kv_heads)
        arrays[name] = np.ascontiguousarray(w)
    head = arrays.pop("lm_head.weight", None)  # refimpl's LM head is tied: a separate one must be equal
    require(head is None or np.array_equal(head, arrays.get("model.embed_tokens.weight")),
            f"{path} has an LM head separate from its token embeddings; refimpl's decoder ties the two")
    vocab = Vocab(list(meta["tokenizer.ggml.tokens"]), [int(v) for v in meta["tokenizer.ggml.token_type"]],
                  list(meta.get("tokenizer.ggml.merges", [])), meta.get("tokenizer.ggml.pre", "default"))
    info = {"name": meta.get("general.name"), "file_type": meta.get("general.file_type"),
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
            "tokenizer_model": meta.get("tokenizer.ggml.model"),
            **{k: meta.get("tokenizer.ggml." + k) for k in ("bos_token_id", "eos_token_id", "add_bos_token")},
            "chat_template": meta.get("tokenizer.chat_template")}
    return GGUFModel(arrays, cfg, vocab, info)


def field_value(field):
    """A GGUF metadata field as a Python value: str, int, float, bool or a list of them."""
    parts = [field.parts[i] for i in field.data]
    kinds = [t.name for t in field.types]
    strings = kinds[-1] == "STRING"
    values = [bytes(p).decode("utf-8", errors="replace") if strings else p.tolist()[0] for p in parts]
    return values if kinds[0] == "ARRAY" else values[0]


def gguf_config(meta, path="<gguf>"):
    """The ModelConfig of llama.* metadata; a one-line error names a missing key or an unsupported feature."""
    def get(key, default=None):
        value = meta.get("llama." + key, default)
        require(value is not None, f"{path} lacks metadata llama.{key}: it is not a complete llama GGUF file")
        return value

    def short(x):  # a float32 value as the shortest decimal that rounds to it: 9.99999974738e-06 -> 1e-05
        return float(str(np.float32(x)))

    scaling = meta.get("llama.rope.scaling.type", "none")
    require(scaling == "none", f"{path} uses RoPE scaling ({scaling}), which refimpl's decoder lacks")
    n_heads, d_model = int(get("attention.head_count")), int(get("embedding_length"))
    kv = int(get("attention.head_count_kv", n_heads))
    vocab = int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    require(int(get("rope.dimension_count", d_model // n_heads)) == d_model // n_heads,
            f"{path} rotates only part of each head (partial RoPE), which refimpl's decoder lacks")
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=int(get("block_count")), n_heads=n_heads,
                       d_ff=int(get("feed_forward_length")), max_seq_len=int(get("context_length")),
                       rope_theta=short(get("rope.freq_base", 10000.0)),
                       norm_eps=short(get("attention.layer_norm_rms_epsilon")),
                       n_kv_heads=None if kv == n_heads else kv)


def hf_tensor_name(name, path="<gguf>"):
    """GGUF tensor name -> Hugging Face's: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    require(len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES
            and parts[3] == "weight", f"{path} holds tensor {name!r}, which a llama decoder without biases, "
            "RoPE scaling or extra layers does not have: refimpl cannot load this model")
    return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"


def unpermute_rows(w, n_heads):
    """Undo llama.cpp's q/k row permutation (its RoPE rotates pairs (x0, x1); refimpl's, like HF's, halves):
    [H*Dh, D] with each head's rows in pair order (0, Dh/2, 1, Dh/2+1, ...) -> half order (0, 1, ...)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
