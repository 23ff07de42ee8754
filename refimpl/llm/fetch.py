"""`refimpl fetch NAME`: download a named pretrained model, convert it once, and load it with its tokenizer.

    fetch("smollm2-135m")    -> CACHE/smollm2-135m/decoder.npz (+ .json, tokenizer/), converted once
    load_model(name_or_path) -> (params, cfg, meta, tokenizer) for a converted LLM or the shipped decoder

The converted pair is an ordinary refimpl decoder checkpoint (float32, Hugging Face names, config with
n_kv_heads and rope_theta); its metadata names the model, its source and its tokenizer file.
"""
from pathlib import Path

import numpy as np

from ..data.gguf import gguf_module, read_gguf
from ..data.llm_tokenizer import save_llm_tokenizer, tokenizer_from_vocab
from ..data.pretrained import (
    DECODER,
    MODELS,
    TOKENIZER,
    decoder_file,
    download_gguf,
    model_dir,
    tokenizer_for,
)
from ..errors import require
from ..training.checkpoint import check_tokenizer, checkpoint_paths, load_decoder, run_lock, save_decoder


def fetch(name, log=print):
    """The converted decoder checkpoint of a named model: downloaded, checked and converted if absent."""
    directory = model_dir(name)
    target = directory / (DECODER + ".npz")
    gguf_module()  # fail early, before a download, if the gguf package is missing
    with run_lock(directory):
        if all(p.is_file() for p in (*checkpoint_paths(target), directory / TOKENIZER)):
            log(f"{name} is already converted: {target}")
            return target
        gguf = download_gguf(name, log)
        log(f"converting {gguf.name} to {target} (float32)")
        convert_gguf(gguf, directory, name)
    return target


def convert_gguf(gguf_path, directory, name=None):
    """Write DIR/tokenizer/ and the decoder pair DIR/decoder.{npz,json} of a llama GGUF file; returns the npz path."""
    directory = Path(directory)
    model = read_gguf(gguf_path)
    source = {"model": name, "gguf": Path(gguf_path).name}
    if name in MODELS:
        s = MODELS[name]
        source.update(package=f"{s.package}=={s.version}", wheel_sha256=s.wheel_sha256, gguf_sha256=s.gguf_sha256,
                      license=s.license, about=s.about)
    tok = tokenizer_from_vocab(model.vocab, source)
    require(tok.n_vocab == model.config.vocab_size, f"{gguf_path}: its vocabulary has {tok.n_vocab} tokens, "
            f"its embeddings {model.config.vocab_size} rows; the file is inconsistent")
    save_llm_tokenizer(tok, (directory / TOKENIZER).parent)
    meta = {"model": name, "source": source, "tokenizer": TOKENIZER, "tokenizer_sha256": tok.sha256,
            "gguf": model.info}
    save_decoder(directory / DECODER, model.arrays, model.config, meta_extra=meta)
    return directory / (DECODER + ".npz")


def load_model(name_or_path, dtype=np.float32, xp=np):
    """(params on xp in dtype, ModelConfig, meta, tokenizer) of a decoder: a model name such as smollm2-135m
    (fetched first), or a checkpoint path (a converted LLM, or a decoder trained by refimpl)."""
    path = decoder_file(name_or_path)
    params, cfg, meta = load_decoder(path, dtype, xp)
    tokenizer = tokenizer_for(path, meta)
    check_tokenizer(meta, tokenizer.sha256, path)
    require(tokenizer.n_vocab <= cfg.vocab_size, f"decoder {path} has {cfg.vocab_size} embeddings, fewer than "
            f"its tokenizer's {tokenizer.n_vocab} ids; the checkpoint and tokenizer do not belong together")
    return params, cfg, meta, tokenizer
