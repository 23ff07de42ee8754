"""The coprocessor training step in plain PyTorch eager: the baseline that `refimpl bench` times.

It computes the same loss as refimpl's cached form B (`objective.loss_cached`) in the way a
PyTorch user would write it, and never imports refimpl:
  1. decoder prefill over the T tokens under no_grad (the decoder is frozen): its kv-cache;
  2. the coprocessor over the K*N_L soft slots, each trace attending to the decoder's cached
     x_0..x_p and causally to its own soft slots;
  3. the frozen decoder over the K groups [z_1..z_N_L, x_p+1..x_p+N_A-1] against the same cache,
     the latents at positions max(0, p-N_L+1)..p ("behind", the method) or p+1..p+N_L ("after",
     the ablation; the coprocessor uses the same ids), the ahead tokens at their own positions p+1..p+N_A-1;
  4. tied LM head on the N_A read-out slots of each group, mean cross-entropy.
Attention over "context cache + own group" is one softmax over the concatenated scores
[B, H, K, G, T + G] (`trace_attend`), so no [K*G, T + K*G] mask is built, as in refimpl.
Then loss.backward(), global-norm clipping and torch.optim.Adam (refimpl's Adam: beta2 0.95).

Weights are dicts of Hugging Face Llama names -> tensors; the coprocessor's has no embedding.
tests/test_bench.py checks that the loss equals refimpl's on the same weights.
"""
import math

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope_tables(pos, dh, theta, dtype):
    # pos int [B, S] -> cos, sin [B, 1, S, Dh] (rotate-half pairing, angles in float64)
    inv_freq = theta ** (-torch.arange(0, dh, 2, dtype=torch.float64, device=pos.device) / dh)
    ang = pos.to(torch.float64)[..., None] * inv_freq
    ang = torch.cat([ang, ang], -1)[:, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def causal_attend(q, k, v):
    # prefill: [B, H, T, Dh] -> [B, H, T, Dh]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def trace_attend(q, k, v, k_ctx, v_ctx, ctx_bias, G):
    """K groups of G slots: context keys through ctx_bias [B, 1, K, 1, T], own keys causally."""
    B, H, KG, Dh = q.shape
    K, T = KG // G, k_ctx.shape[2]
    q = q / math.sqrt(Dh)
    q5, k5, v5 = (a.reshape(B, H, K, G, Dh) for a in (q, k, v))
    s_ctx = (q @ k_ctx.transpose(-1, -2)).view(B, H, K, G, T) + ctx_bias
    causal = torch.ones(G, G, dtype=torch.bool, device=q.device).tril()
    s_own = (q5 @ k5.transpose(-1, -2)).masked_fill(~causal, -math.inf)
    p = torch.softmax(torch.cat([s_ctx, s_own], -1), -1)                      # [B, H, K, G, T+G]
    out = (p[..., :T].reshape(B, H, KG, T) @ v_ctx).view(B, H, K, G, Dh) + p[..., T:] @ v5
    return out.view(B, H, KG, Dh)


def llama_layers(w, x, pos, cfg, attend_for_layer):
    """Embeddings [B, S, D] through every block and model.norm; also each layer's k, v."""
    B, S, D = x.shape
    H, eps = cfg["n_heads"], cfg["norm_eps"]
    dh = D // H
    cos, sin = rope_tables(pos, dh, cfg["rope_theta"], x.dtype)
    split = lambda t: t.view(B, S, H, dh).transpose(1, 2)                    # noqa: E731
    kvs = []
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = rope(split(h @ w[p + "self_attn.q_proj.weight"].T), cos, sin)
        k = rope(split(h @ w[p + "self_attn.k_proj.weight"].T), cos, sin)
        v = split(h @ w[p + "self_attn.v_proj.weight"].T)
        kvs.append((k, v))
        att = attend_for_layer(i)(q, k, v)
        x = x + att.transpose(1, 2).reshape(B, S, D) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(x, w["model.norm.weight"], eps), kvs


def loss_cached(dec, cop, soft, tokens, trace_positions, n_latents, n_ahead, cfg, latent_positions="behind"):
    """Mean cross-entropy over B*K*N_A ahead targets. tokens, trace_positions: int64 tensors."""
    B, T = tokens.shape
    K, D, NL, NA = trace_positions.shape[1], soft.shape[1], n_latents, n_ahead
    G = NL + NA - 1
    E = dec["model.embed_tokens.weight"]
    arange = lambda n: torch.arange(n, device=tokens.device)                  # noqa: E731
    with torch.no_grad():                                                     # 1. prefill
        _, cache = llama_layers(dec, E[tokens], arange(T).expand(B, T), cfg, lambda i: causal_attend)
    ctx_bias = torch.zeros(B, 1, K, 1, T, dtype=soft.dtype, device=soft.device).masked_fill(
        (arange(T) > trace_positions[..., None])[:, None, :, None], -math.inf)  # x_t, t > p: hidden

    def against_cache(G_):
        return lambda i: lambda q, k, v: trace_attend(q, k, v, *cache[i], ctx_bias, G_)

    lat = trace_positions[..., None] + 1 + arange(NL)                        # [B, K, N_L]: "after"
    if latent_positions == "behind":
        lat = (lat - NL).clamp(min=0)                                         # p-N_L+1..p, clamped at 0
    pos_lat = lat.reshape(B, K * NL)
    z, _ = llama_layers(cop, soft.expand(B, K, NL, D).reshape(B, K * NL, D), pos_lat, cfg,
                        against_cache(NL))                                    # 2. coprocessor
    targets = torch.gather(tokens[:, None, :].expand(B, K, T), 2,
                           trace_positions[..., None] + 1 + arange(NA))       # [B, K, N_A]
    groups = torch.cat([z.view(B, K, NL, D), E[targets[..., :-1]]], 2).view(B, K * G, D)
    own = trace_positions[..., None] + 1 + arange(NA - 1)                   # x_{p+j} at its own id p+j
    pos_grp = torch.cat([lat, own], -1).reshape(B, K * G)
    h, _ = llama_layers(dec, groups, pos_grp, cfg, against_cache(G))         # 3. decoder groups
    h_read = h.view(B, K, G, D)[:, :, NL - 1:]                                # [B, K, N_A, D]
    logits = h_read @ E.T                                                     # 4. head, loss
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class TorchStep:
    """State and one training step (loss, backward, clip, Adam) from NumPy weights."""

    def __init__(self, dec_np, trainable_np, cfg, n_latents, n_ahead, lr=1e-4, clip=1.0, device="cpu",
                 latent_positions="behind"):
        self.cfg, self.n_latents, self.n_ahead, self.lr, self.clip = cfg, n_latents, n_ahead, lr, clip
        self.latent_positions = latent_positions
        self.device = device
        self.dec = {k: torch.tensor(v, device=device) for k, v in dec_np.items()}
        self.train = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in trainable_np.items()}
        self.opt = torch.optim.Adam(list(self.train.values()), lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def loss(self, tokens, trace_positions):
        t = {k: v for k, v in self.train.items() if k != "soft_tokens"}
        as_ids = lambda a: torch.as_tensor(a, dtype=torch.int64, device=self.device)  # noqa: E731
        return loss_cached(self.dec, t, self.train["soft_tokens"], as_ids(tokens), as_ids(trace_positions),
                           self.n_latents, self.n_ahead, self.cfg, self.latent_positions)

    def step(self, tokens, trace_positions):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(tokens, trace_positions)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.train.values()), self.clip)
        self.opt.step()
        return loss.item()
