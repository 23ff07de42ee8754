"""Model configuration: one frozen dataclass and named presets (minGPT style).

`nano` is for tests (runs in milliseconds); `demo` is the shipped decoder, sized so the demo
trains in minutes on 2 CPU cores; `gpu` is large enough for a GPU to matter.
"""
import dataclasses
from dataclasses import dataclass

from .errors import RefimplError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2049
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 384
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    n_kv_heads: int = None      # grouped-query attention: key/value heads; None = n_heads (multi-head)

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def kv_heads(self):
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RefimplError(f"config {name}={value!r} is invalid: it must be a positive int")
        if self.d_model % self.n_heads:
            raise RefimplError(f"config d_model={self.d_model} is not divisible by n_heads="
                               f"{self.n_heads}: pick n_heads that divides d_model")
        kv = self.n_kv_heads
        if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0 or self.n_heads % kv):
            raise RefimplError(f"config n_kv_heads={kv!r} does not divide n_heads={self.n_heads}: pick a positive "
                               "divisor of n_heads (query head i reads key/value head i // (n_heads/n_kv_heads))")
        if self.head_dim % 2:
            raise RefimplError(f"config head_dim={self.head_dim} is odd: RoPE pairs dimensions, "
                               "so d_model/n_heads must be even")
        reals = (self.rope_theta, self.norm_eps, self.init_std)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in reals) or not (
                self.rope_theta > 1 and self.norm_eps > 0 and self.init_std > 0):
            raise RefimplError(f"config rope_theta={self.rope_theta!r}, norm_eps={self.norm_eps!r}, "
                               f"init_std={self.init_std!r}: rope_theta must be a number > 1, "
                               "norm_eps and init_std numbers > 0")

    def to_dict(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k == "n_kv_heads" and v is None)}

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RefimplError(f"unknown config keys {sorted(unknown)}: known keys are {sorted(names)}")
        return cls(**d)


PRESETS = {
    "nano": ModelConfig(d_model=48, n_layers=3, n_heads=3, d_ff=128, max_seq_len=64),
    "demo": ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=128),
    "gpu": ModelConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1536, max_seq_len=512),
}


def get_preset(name, **overrides):
    """A named preset, optionally with fields replaced (e.g. vocab_size for a test)."""
    if name not in PRESETS:
        raise RefimplError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
