"""`refimpl fetch NAME`: download a named pretrained model (data/pretrained.py) and convert it, once, into a
decoder checkpoint pair (float32, Hugging Face names) whose metadata names its source and tokenizer."""
from pathlib import Path

from ..data.gguf import gguf_module, read_gguf
from ..data.pretrained import DECODER, MODELS, TOKENIZER, download_gguf, model_dir
from ..data.tokenizer import save_llm_tokenizer, tokenizer_from_vocab
from ..errors import RefimplError, require
from ..files import run_lock
from ..training.checkpoint import checkpoint_paths, load_model, save_decoder


def fetch(name, log=print):
    """The converted decoder checkpoint of a named model: downloaded, checked and converted if absent."""
    directory = model_dir(name)
    target = directory / (DECODER + ".npz")
    gguf_module()  # fail early, before a download, if the gguf package is missing
    with run_lock(directory):
        if all(p.is_file() for p in (*checkpoint_paths(target), directory / TOKENIZER)):
            try:                        # the hashes recorded at conversion, the shapes, the tokenizer
                load_model(target)
                log(f"{name} is already converted (its hashes checked): {target}")
                return target
            except RefimplError as e:
                log(f"the converted {name} fails its check ({e}): converting it again")
        gguf = download_gguf(name, log)
        log(f"converting {gguf.name} to {target} (float32)")
        convert_gguf(gguf, directory, name)
    return target


def convert_gguf(gguf_path, directory, name=None):
    """Write DIR/tokenizer/ and the decoder pair DIR/decoder.{npz,json} of a llama GGUF file; the npz path."""
    directory = Path(directory)
    model = read_gguf(gguf_path)
    source = {"model": name, "gguf": Path(gguf_path).name}
    if name in MODELS:
        s = MODELS[name]
        source.update(package=f"{s.package}=={s.version}", wheel_sha256=s.wheel_sha256,
                      gguf_sha256=s.gguf_sha256, license=s.license, about=s.about)
    tok = tokenizer_from_vocab(model.vocab, source)
    require(tok.n_vocab == model.config.vocab_size, f"{gguf_path}: its vocabulary has {tok.n_vocab} tokens, "
            f"its embeddings {model.config.vocab_size} rows; the file is inconsistent")
    save_llm_tokenizer(tok, (directory / TOKENIZER).parent)
    meta = {"model": name, "source": source, "tokenizer": TOKENIZER, "tokenizer_sha256": tok.sha256,
            "gguf": model.info}
    save_decoder(directory / DECODER, model.arrays, model.config, meta_extra=meta)
    return directory / (DECODER + ".npz")
