"""Model configuration: one frozen dataclass and named presets (minGPT style): `nano` for tests, `demo` the
shipped decoder (trains in minutes on 2 CPU cores), `gpu` large enough for a GPU to matter."""
import dataclasses
from dataclasses import dataclass

from .errors import require


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

    head_dim = property(lambda self: self.d_model // self.n_heads)
    kv_heads = property(lambda self: self.n_heads if self.n_kv_heads is None else self.n_kv_heads)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31,
                    f"config {name}={value!r} is invalid: it must be a positive int below 2**31")
        require(self.d_model % self.n_heads == 0, f"config d_model={self.d_model} is not divisible by "
                f"n_heads={self.n_heads}: pick n_heads that divides d_model")
        kv = self.n_kv_heads
        ok_kv = isinstance(kv, int) and not isinstance(kv, bool) and kv > 0 and self.n_heads % kv == 0
        require(kv is None or ok_kv, f"config n_kv_heads={kv!r} does not divide n_heads={self.n_heads}: "
                "pick a divisor of n_heads (query head i reads key/value head i // (n_heads/n_kv_heads))")
        require(self.head_dim % 2 == 0, f"config head_dim={self.head_dim} is odd: RoPE pairs dimensions, "
                                        "so d_model/n_heads must be even")
        reals = (self.rope_theta, self.norm_eps, self.init_std)
        require(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in reals)
                and 1 < self.rope_theta <= 1e12 and 0 < self.norm_eps <= 1 and 0 < self.init_std <= 10,
                f"config rope_theta={self.rope_theta!r}, norm_eps={self.norm_eps!r}, init_std="
                f"{self.init_std!r}: rope_theta must be a number in (1, 1e12], norm_eps in (0, 1], init_std "
                "in (0, 10]")

    def to_dict(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k == "n_kv_heads" and v is None)}

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        require(not unknown, f"unknown config keys {unknown}: known keys are {sorted(names)}")
        return cls(**d)


PRESETS = {
    "nano": ModelConfig(d_model=48, n_layers=3, n_heads=3, d_ff=128, max_seq_len=64),
    "demo": ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=128),
    "gpu": ModelConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1536, max_seq_len=512),
}


def get_preset(name, **overrides):
    """A named preset, optionally with fields replaced (e.g. vocab_size for a test)."""
    require(name in PRESETS, f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
